"""An analytics store opened on first use."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from firstmile.analytics.queries import Query
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sql import Params
from firstmile.analytics.store import AnalyticsStore


class LazyStore:
    """Opens the analytics store on first use, so a worker that never touches analytics never
    opens it (chdb admits one process per data folder; use ClickHouse with several workers)."""

    def __init__(self, opener: Callable[[], AnalyticsStore]) -> None:
        self._opener = opener
        self._store: AnalyticsStore | None = None
        self._lock = threading.Lock()

    def _get(self) -> AnalyticsStore:
        with self._lock:
            if self._store is None:
                self._store = self._opener()
            return self._store

    def ensure_schema(self) -> None:
        self._get().ensure_schema()

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        return self._get().insert(rows)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        return self._get().bulk_load(rows)

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        return self._get().run(tenant, query)

    def dangerous_raw_sql(self, sql: str, params: Params) -> list[dict[str, Any]]:
        return self._get().dangerous_raw_sql(sql, params)

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        self._get().erase_user(tenant_id, user_id)

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        return self._get().rebuild_experiment_users(tenant)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
