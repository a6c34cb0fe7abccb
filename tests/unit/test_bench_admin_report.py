"""The report of ``python -m benchmarks admin``: the session cookie parsing and the ratios against the baseline."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from benchmarks.admin import (
    BASELINE,
    IN_PROCESS,
    ME,
    PATHS,
    REDIS,
    AdminFacts,
    AdminRun,
    StepTiming,
    _report,
    session_cookie,
)
from benchmarks.common import BenchError
from benchmarks.cpu import CpuUse
from benchmarks.database import ServerInfo
from benchmarks.wrk import WrkResult


def _wrk(requests: int, p50: float, p99: float) -> WrkResult:
    return WrkResult(requests, 10.0, 0, 0, 0, 0, 0, 0, p50, (p50 + p99) / 2, p99, p99 * 2, p50, "")


def _run(store: str, endpoint: str, result: WrkResult, round_: int = 1, server_s: float = 5.0) -> AdminRun:
    return AdminRun(store, endpoint, round_, result, CpuUse(10.0, server_s, 2.0, 1.0, 15.0), 1.5)


def _facts(runs: list[AdminRun], redis: str | None = "7.0.15") -> AdminFacts:
    return AdminFacts(
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        elapsed_s=150.0,
        duration=10,
        warmup=3,
        connections=4,
        rounds=2,
        threads=1,
        machine={"cores": "2", "cpu": "x", "memory": "8 GiB", "os": "Linux", "python": "3.11"},
        pg=ServerInfo("15", {"server_version": "15"}, "/tmp"),
        redis=redis,
        paths=7,
        load_before=(1.0, 2.0, 3.0),
        load_after=(4.0, 5.0, 6.0),
        command="make bench-admin",
        runs=runs,
        steps=[StepTiming("session load, Redis", (0.0001, 0.0002, 0.0003, 0.0004))],
    )


def test_session_cookie_is_the_admin_cookie_among_the_set_cookie_headers() -> None:
    headers = [
        "__Host-fm_login=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=lax",
        '__Host-fm_admin="abc-DEF_123"; Path=/; Max-Age=28800; HttpOnly; Secure; SameSite=lax',
    ]
    assert session_cookie(headers) == ("__Host-fm_admin", "abc-DEF_123")
    assert session_cookie(["fm_admin=xyz; Path=/"]) == ("fm_admin", "xyz")


@pytest.mark.parametrize("headers", [[], ["__Host-fm_admin=; Max-Age=0"], ["other=1; Path=/"], ["garbage"]])
def test_no_session_cookie_is_a_bench_error(headers: list[str]) -> None:
    with pytest.raises(BenchError, match="no admin session cookie"):
        session_cookie(headers)


def test_step_percentiles_are_nearest_rank_in_microseconds() -> None:
    step = StepTiming("x", (0.0004, 0.0001, 0.0003, 0.0002))
    assert step.percentile_us(50) == pytest.approx(200.0)
    assert step.percentile_us(95) == pytest.approx(400.0)


def test_report_ratios_are_medians_against_the_baseline_of_the_same_server() -> None:
    runs = [
        _run(IN_PROCESS, BASELINE, _wrk(10_000, 2.0, 4.0)),
        _run(IN_PROCESS, ME, _wrk(9_000, 2.2, 5.0)),
        _run(IN_PROCESS, PATHS, _wrk(8_000, 3.0, 6.0)),
        _run(IN_PROCESS, BASELINE, _wrk(12_000, 4.0, 8.0), 2),
        _run(IN_PROCESS, ME, _wrk(11_000, 2.6, 7.0), 2),
        _run(IN_PROCESS, PATHS, _wrk(8_000, 3.0, 6.0), 2),
        _run(REDIS, BASELINE, _wrk(8_000, 2.5, 5.0), server_s=4.0),
        _run(REDIS, ME, _wrk(4_000, 5.0, 10.0), server_s=4.0),
        _run(REDIS, PATHS, _wrk(3_000, 6.0, 12.0), server_s=4.0),
    ]
    text = _report(_facts(runs))
    assert text.startswith("## Admin UI: session authentication vs the API key")
    assert "load average 1.00 / 2.00 / 3.00 (1 / 5 / 15 min) before the run" in text
    assert "- Redis: 7.0.15 on 127.0.0.1, same machine" in text
    assert "- Command: `make bench-admin`" in text
    # in-process: medians of two rounds (baseline 1,100 req/s, p50 3.0 ms; /me 1,000 req/s, p50 2.4 ms)
    me = "`GET /admin/api/me`, session cookie"
    assert f"| in-process | {me} | req/s | 1,100 | 1,000 | 0.91x |" in text
    assert f"| in-process | {me} | p50 | 3.00 ms | 2.40 ms | 0.80x |" in text
    # server CPU per request, median of the rounds: 5 s over 10,000 and 12,000 requests (500, 417 µs) → 458 µs
    # for the baseline, over 9,000 and 11,000 (556, 455 µs) → 505 µs for /me
    assert f"| in-process | {me} | server CPU per request | 458 µs | 505 µs | 1.10x |" in text
    # Redis against the Redis server's own baseline, not the in-process one
    assert "| Redis | `GET /admin/api/paths`, session cookie | req/s | 800 | 300 | 0.38x |" in text
    assert "| Redis | `GET /admin/api/paths`, session cookie | p99 | 5.00 ms | 12.00 ms | 2.40x |" in text
    # Redis ÷ in-process, with the baseline as the yardstick
    assert "| `GET /v1/onboarding/bench-admin-user`, API key (baseline) | req/s | 1,100 | 800 | 0.73x |" in text
    assert f"| {me} | p50 | 2.40 ms | 5.00 ms | 2.08x |" in text
    assert "| session load, Redis | 4 | 200 | 400 |" in text


def test_report_without_redis_has_no_redis_rows() -> None:
    runs = [_run(IN_PROCESS, BASELINE, _wrk(10_000, 2.0, 4.0)), _run(IN_PROCESS, ME, _wrk(9_000, 2.2, 5.0))]
    text = _report(_facts(runs, redis=None))
    assert "- Redis: not measured (no FIRSTMILE_BENCH_REDIS)" in text
    assert "| Redis |" not in text and "### Redis ÷ in-process" not in text
    assert "/admin/api/paths" not in text.split("### Ratios")[1]  # not measured: no row
