"""Opening the configured analytics store (the settings pick the adapter)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sql import Params
from firstmile.analytics.store import AnalyticsStore
from firstmile.settings import Settings


def open_analytics_store(settings: Settings) -> AnalyticsStore:
    """The configured analytics store: chdb under the data dir, or a ClickHouse server."""
    if settings.analytics_backend == "clickhouse":
        if settings.clickhouse_url is None:
            raise RuntimeError("FIRSTMILE_CLICKHOUSE_URL must be set when FIRSTMILE_ANALYTICS_BACKEND=clickhouse")
        from firstmile.analytics.clickhouse_store import ClickHouseStore

        store: AnalyticsStore = ClickHouseStore.connect(
            settings.clickhouse_url.get_secret_value(), policy_role=settings.clickhouse_policy_role or None
        )
    else:
        from firstmile.analytics.chdb_store import ChdbStore

        store = ChdbStore(settings.analytics_path or settings.data_dir / "analytics")
    store.ensure_schema()
    return store


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

    def query(self, sql: str, params: Params) -> list[dict[str, Any]]:
        return self._get().query(sql, params)

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        self._get().erase_user(tenant_id, user_id)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
