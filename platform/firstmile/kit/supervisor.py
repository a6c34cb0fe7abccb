"""Supervision of a process's background tasks: logged, restarted with backoff, and visible to readiness.

The API process runs work besides requests: the in-process outbox relay (embedded mode),
the audit checkpointer, the stuck scan, the Keycloak event sync. None of it may fail
silently. :class:`Supervisor` runs each as one task that never dies of an exception:

- a **periodic** job (:meth:`Supervisor.every`) runs every ``interval_s``; a run that raises
  is logged with its traceback, and the next run comes after an exponential backoff
  (``base_backoff_s`` doubling up to ``max_backoff_s``, never later than the interval);
- a **long-running** loop (:meth:`Supervisor.forever`) is restarted the same way when it
  raises, or when it returns while the process is not stopping;
- a task that failed ``failing_after`` times in a row is *failing*: :meth:`failing` names it,
  and ``/health/ready`` answers 503 with the task and its last error until it recovers
  (one successful run, or a loop that stays up for ``healthy_after_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("firstmile.supervisor")


@dataclass
class TaskState:
    """What readiness and the logs know of one supervised task."""

    name: str
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    restarts: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    last_success_at: float | None = None
    running_since: float | None = None  # monotonic start of the current run

    def summary(self) -> str:
        if self.consecutive_failures == 0:
            return "ok"
        return f"failing: {self.last_error} ({self.consecutive_failures} in a row)"


Probe = Callable[[], tuple[int, str | None]]
"""What a long-running loop that retries on its own says of itself: failures in a row, and the last error."""


@dataclass
class _Spec:
    name: str
    job: Callable[[asyncio.Event], Awaitable[object]]
    interval_s: float | None  # None: a long-running loop
    probe: Probe | None = None
    state: TaskState = field(init=False)

    def __post_init__(self) -> None:
        self.state = TaskState(self.name)


class Supervisor:
    """Runs and watches background tasks until :meth:`stop` (see the module docstring)."""

    def __init__(
        self,
        *,
        failing_after: int = 3,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        healthy_after_s: float = 30.0,
    ) -> None:
        if failing_after < 1 or base_backoff_s <= 0 or max_backoff_s < base_backoff_s:
            raise ValueError("failing_after >= 1 and 0 < base_backoff_s <= max_backoff_s")
        self.failing_after = failing_after
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self._specs: list[_Spec] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    # -- declaring -------------------------------------------------------------------------------

    def every(self, name: str, interval_s: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` every ``interval_s`` seconds (the first run at once)."""
        if interval_s <= 0:
            raise ValueError(f"{name}: interval_s must be positive")
        self._add(_Spec(name, lambda _stop: job(), interval_s))

    def forever(
        self, name: str, run: Callable[[asyncio.Event], Awaitable[None]], *, probe: Probe | None = None
    ) -> None:
        """Keep ``run(stop)`` running until the supervisor stops (it should return soon after ``stop`` is set).

        A loop that retries its own failures (the outbox relay reconnecting to PostgreSQL) never
        raises; ``probe`` is how it tells the supervisor it keeps failing.
        """
        self._add(_Spec(name, run, None, probe))

    def _add(self, spec: _Spec) -> None:
        if any(s.name == spec.name for s in self._specs):
            raise ValueError(f"a task named {spec.name!r} is supervised already")
        if self._tasks:
            raise RuntimeError("declare every task before start()")
        self._specs.append(spec)

    # -- running ---------------------------------------------------------------------------------

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the supervisor stops: long-running loops watch it."""
        return self._stop

    def start(self) -> None:
        """Start every declared task on the running loop."""
        if self._tasks:
            return
        self._stop = asyncio.Event()
        for spec in self._specs:
            self._tasks.append(asyncio.create_task(self._supervise(spec), name=spec.name))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every task to stop, wait up to ``timeout_s``, then cancel what is left."""
        self._stop.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in pending:
            log.warning("background task did not stop in time; cancelled", extra={"fields": {"task": task.get_name()}})
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def states(self) -> dict[str, TaskState]:
        for spec in self._specs:
            if spec.probe is not None:
                failures, error = spec.probe()
                if failures:
                    spec.state.consecutive_failures = max(spec.state.consecutive_failures, failures)
                    spec.state.last_error = error
                elif spec.state.running_since is not None:
                    spec.state.consecutive_failures = 0
        return {spec.name: spec.state for spec in self._specs}

    def failing(self) -> dict[str, TaskState]:
        """The tasks that failed ``failing_after`` times in a row and have not recovered since."""
        now = time.monotonic()
        for spec in self._specs:
            state = spec.state
            up = state.running_since is not None and now - state.running_since >= self.healthy_after_s
            if spec.interval_s is None and spec.probe is None and up and state.consecutive_failures:
                self._succeeded(state)  # a restarted loop that has stayed up is healthy again
        return {
            name: state for name, state in self.states().items() if state.consecutive_failures >= self.failing_after
        }

    def _backoff(self, state: TaskState) -> float:
        exponent = max(1, state.consecutive_failures) - 1
        return float(min(self.max_backoff_s, self.base_backoff_s * 2.0**exponent))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _supervise(self, spec: _Spec) -> None:
        state = spec.state
        while not self._stop.is_set():
            began = time.monotonic()
            state.running_since = began
            try:
                state.runs += 1
                await spec.job(self._stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.running_since = None
                self._failed(spec, exc, ran_for=time.monotonic() - began)
                await self._pause(
                    self._backoff(state) if spec.interval_s is None else min(spec.interval_s, self._backoff(state))
                )
                if spec.interval_s is None:
                    state.restarts += 1
                continue
            state.running_since = None
            if spec.interval_s is not None:
                self._succeeded(state)
                await self._pause(spec.interval_s)
                continue
            if self._stop.is_set():
                break
            # a long-running loop that returned on its own has stopped doing its work: restart it
            self._failed(spec, RuntimeError("returned while the process was running"), ran_for=time.monotonic() - began)
            await self._pause(self._backoff(state))
            state.restarts += 1

    def _succeeded(self, state: TaskState) -> None:
        if state.consecutive_failures:
            log.info("background task recovered", extra={"fields": {"task": state.name}})
        state.consecutive_failures = 0
        state.last_success_at = time.time()

    def _failed(self, spec: _Spec, exc: BaseException, *, ran_for: float) -> None:
        state = spec.state
        if spec.interval_s is None and ran_for >= self.healthy_after_s:
            state.consecutive_failures = 0  # it ran well for a while before this failure
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = f"{type(exc).__name__}: {exc}"[:300]
        state.last_failure_at = time.time()
        log.error(
            "background task failed",
            exc_info=exc,
            extra={
                "fields": {
                    "task": state.name,
                    "consecutive_failures": state.consecutive_failures,
                    "retry_in_s": round(self._backoff(state), 2),
                }
            },
        )


__all__ = ["Supervisor", "TaskState"]
