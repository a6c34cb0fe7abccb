"""The analytics agent: runs queries off the event loop, with a timeout and a last-good-result fallback.

Recovery rule (ARCHITECTURE §4): a query that times out or fails answers with the
last result computed for the same tenant, query and parameters, marked
``stale`` with the time it was computed; with nothing cached it is a 503
``analytics-unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

from firstmile.analytics.queries import AnalyticsQueries, build_user_event_count, build_user_events
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import TenantId

T = TypeVar("T")
log = logging.getLogger("firstmile.analytics")


@dataclass(frozen=True, slots=True)
class Computed(Generic[T]):
    """A query result, when it was computed, and whether it is a cached answer to a failed run."""

    value: T
    computed_at: datetime
    stale: bool = False


class AnalyticsUnavailableError(RuntimeError):
    """A query failed or timed out and the caller wants no cached answer (the drop-off check)."""


class AnalyticsService:
    """Queries on ``store`` with a per-query timeout and an in-memory cache of last good results.

    ``timeout_seconds``: how long a request waits for a query. A query that runs
    over it keeps its worker thread until the engine finishes (chdb cannot cancel
    a statement from outside), which is why the pool is small and the service's
    own: slow analytics never starve the event loop's default executor.
    """

    def __init__(
        self,
        store: AnalyticsStore,
        timeout_seconds: float = 5.0,
        *,
        max_workers: int = 4,
        cache_entries: int = 2048,
        retry_after_seconds: int = 5,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        self.store = store
        self.queries = AnalyticsQueries(store)
        self.timeout_seconds = timeout_seconds
        self.retry_after_seconds = retry_after_seconds
        self._cache_entries = cache_entries
        self._cache: OrderedDict[tuple[TenantId, str, Hashable], Computed[object]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="analytics")

    async def run(self, tenant: TenantId, name: str, params: Hashable, compute: Callable[[], T]) -> Computed[T]:
        """Run ``compute`` (a query of ``tenant``) on a worker thread; fall back to the cache when it fails.

        ``(tenant, name, params)`` keys the cache: ``params`` must hold every input
        of the query that changes its answer.
        """
        key = (tenant, name, params)
        loop = asyncio.get_running_loop()
        try:
            value = await asyncio.wait_for(loop.run_in_executor(self._pool, compute), self.timeout_seconds)
        except Exception as exc:  # TimeoutError included
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
            log.warning(
                "analytics query %s", reason, extra={"fields": {"query": name, "tenant": str(tenant)}}, exc_info=exc
            )
            with self._cache_lock:
                cached = self._cache.get(key)
            if cached is None:
                raise ProblemError(
                    503,
                    "analytics-unavailable",
                    f"the {name} query {reason.split(':')[0]} and no earlier result is cached; retry later",
                    headers={"Retry-After": str(self.retry_after_seconds)},
                ) from exc
            return Computed(cast(T, cached.value), cached.computed_at, stale=True)
        fresh = Computed(value, datetime.now(UTC))
        with self._cache_lock:
            self._cache[key] = cast(Computed[object], fresh)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return fresh

    async def fresh(self, tenant: TenantId, name: str, compute: Callable[[], T]) -> T:
        """Run ``compute`` (a query of ``tenant``) on a worker thread under the timeout, never answered from the
        cache nor cached: :class:`AnalyticsUnavailableError` when it fails or times out (logged by the caller)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, compute), self.timeout_seconds)
        except Exception as exc:  # TimeoutError included
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
            raise AnalyticsUnavailableError(f"the {name} query of tenant {tenant} {reason}") from exc

    async def user_events(self, tenant: TenantId, user_id: str) -> list[dict[str, Any]]:
        """Every analytics row of one user (the data-subject export), under the same timeout as any query.

        Never answered from the cache: an export must be complete and current, so a query that
        fails or times out is a 503 ``analytics-unavailable`` and the caller writes nothing.
        """
        query = build_user_events(tenant, user_id)
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.store.run, tenant, query), self.timeout_seconds
            )
        except Exception as exc:  # TimeoutError included
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}"
            log.warning("analytics export query %s", reason, extra={"fields": {"tenant": str(tenant)}}, exc_info=exc)
            raise ProblemError(
                503,
                "analytics-unavailable",
                f"the user's analytics events could not be read ({reason}); nothing was exported, retry later",
                headers={"Retry-After": str(self.retry_after_seconds)},
            ) from exc

    async def holds_user(self, tenant: TenantId, user_id: str) -> bool:
        """Whether the store has any row of the user; ``True`` when it cannot tell (fail safe for erasure)."""
        query = build_user_event_count(tenant, user_id)
        loop = asyncio.get_running_loop()
        try:
            rows = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.store.run, tenant, query), self.timeout_seconds
            )
        except Exception as exc:
            log.warning("analytics user count failed", extra={"fields": {"tenant": str(tenant)}}, exc_info=exc)
            return True
        return bool(rows) and int(rows[0]["n"]) > 0

    async def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        """Store rows (see the store's ``insert``) on a worker thread: for async callers such as the sink."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.store.insert, rows)

    def close(self, *, close_store: bool = True) -> None:
        """Stop the worker threads (without waiting for a running query) and, unless told not to, close the store."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if close_store:
            self.store.close()
