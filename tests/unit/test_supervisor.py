"""The supervisor of background tasks: a crash is logged and retried, never silent, and a task that keeps
failing is named by readiness until it recovers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from firstmile.kit.supervisor import Supervisor
from tests.support.logs import traceback_of


def _fast(failing_after: int = 3) -> Supervisor:
    return Supervisor(failing_after=failing_after, base_backoff_s=0.01, max_backoff_s=0.02)


async def _until(predicate: object, attempts: int = 500) -> None:
    for _ in range(attempts):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_periodic_job_that_raises_is_logged_retried_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def job() -> None:
        runs.append(len(runs))
        if len(runs) <= 4:
            raise RuntimeError(f"broken {len(runs)}")

    supervisor = _fast(3)
    supervisor.every("scan", 0.01, job)
    with caplog.at_level(logging.ERROR, logger="firstmile.supervisor"):
        supervisor.start()
        await _until(lambda: len(runs) >= 3 and supervisor.failing())
        assert supervisor.failing()["scan"].last_error == f"RuntimeError: broken {supervisor.states()['scan'].failures}"
        await _until(lambda: len(runs) >= 6)  # it kept running after the failures, and recovered
        assert supervisor.failing() == {}
        await supervisor.stop()
    failures = [r for r in caplog.records if r.getMessage() == "background task failed"]
    assert len(failures) == 4
    assert all("Traceback" in traceback_of(r) for r in failures)  # the traceback is in the log
    assert supervisor.states()["scan"].consecutive_failures == 0


async def test_a_loop_that_dies_is_restarted_and_one_that_returns_early_too() -> None:
    starts: list[str] = []

    async def loop(stop: asyncio.Event) -> None:
        starts.append("start")
        if len(starts) == 1:
            raise ConnectionError("lost")
        if len(starts) == 2:
            return  # returned while the process runs: it no longer does its work
        await stop.wait()

    supervisor = _fast()
    supervisor.forever("relay", loop)
    supervisor.start()
    await _until(lambda: len(starts) == 3)
    state = supervisor.states()["relay"]
    assert state.restarts == 2
    assert state.failures == 2
    await supervisor.stop(timeout_s=1)
    assert len(starts) == 3  # stopping ends the loop without another restart


async def test_a_loop_that_retries_on_its_own_reports_through_its_probe() -> None:
    health: list[tuple[int, str | None]] = [(0, None)]

    async def relay(stop: asyncio.Event) -> None:
        await stop.wait()

    supervisor = _fast(3)
    supervisor.forever("relay", relay, probe=lambda: health[-1])
    supervisor.start()
    await asyncio.sleep(0)
    assert supervisor.failing() == {}
    health.append((5, "OSError: connection refused"))
    assert supervisor.failing()["relay"].summary() == "failing: OSError: connection refused (5 in a row)"
    health.append((0, None))
    assert supervisor.failing() == {}
    await supervisor.stop(timeout_s=1)


async def test_a_task_that_ignores_stop_is_cancelled() -> None:
    async def stubborn(stop: asyncio.Event) -> None:
        await asyncio.sleep(3600)

    supervisor = _fast()
    supervisor.forever("stubborn", stubborn)
    supervisor.start()
    await asyncio.sleep(0)
    await asyncio.wait_for(supervisor.stop(timeout_s=0.05), 5)


def test_declarations_are_checked() -> None:
    supervisor = Supervisor()
    supervisor.every("a", 1, lambda: asyncio.sleep(0))
    with pytest.raises(ValueError, match="supervised already"):
        supervisor.every("a", 1, lambda: asyncio.sleep(0))
    with pytest.raises(ValueError, match="interval_s"):
        supervisor.every("b", 0, lambda: asyncio.sleep(0))
