"""The embedded analytics store: the ClickHouse engine in-process through ``chdb``.

chdb runs one embedded server per process, bound to one data path: a second
``Session`` on another path fails ("EmbeddedServer already initialized with path
…"). So this module keeps a process-wide registry: every :class:`ChdbStore` on the
same path shares one session (reference-counted; the last ``close()`` closes
it), and asking for another path while one is open raises
:class:`ChdbPathInUseError`, which says which path holds the process.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from firstmile.analytics import experiment_users, sql
from firstmile.analytics.queries import Query
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.store import AnalyticsStoreError, check_scope

_T = TypeVar("_T")

_APPEND_BYTES = 8 * 1024 * 1024
"""Bulk loads stream the encoded rows to the engine in chunks of about this size."""


class ChdbPathInUseError(RuntimeError):
    """This process already has a chdb store open on another data path."""


@dataclass
class _Engine:
    path: str
    session: Any  # chdb.session.Session (untyped)
    lock: threading.RLock
    refs: int


_registry_lock = threading.Lock()
_engine: _Engine | None = None


def _acquire(path: Path) -> _Engine:
    global _engine
    resolved = str(path.expanduser().resolve())
    with _registry_lock:
        if _engine is not None:
            if _engine.path != resolved:
                raise ChdbPathInUseError(
                    f"chdb allows one data path per process: {_engine.path} is open, {resolved} was asked for; "
                    "close every store on the first path first, or use the same path"
                )
            _engine.refs += 1
            return _engine
        from chdb.session import Session

        Path(resolved).mkdir(parents=True, exist_ok=True)
        try:
            session = Session(resolved)  # type: ignore[no-untyped-call]
        except RuntimeError as exc:  # another chdb user in this process holds a different path
            raise ChdbPathInUseError(f"chdb could not open {resolved}: {exc}") from exc
        _engine = _Engine(path=resolved, session=session, lock=threading.RLock(), refs=1)
        return _engine


def _release(engine: _Engine) -> None:
    global _engine
    with _registry_lock:
        engine.refs -= 1
        if engine.refs == 0:
            with engine.lock:
                engine.session.close()
            if _engine is engine:
                _engine = None


class ChdbStore:
    """:class:`~firstmile.analytics.store.AnalyticsStore` on an embedded chdb database at ``path``.

    Thread-safe: one re-entrant lock per data path serialises statements (this
    process is the only one that can open the path).
    """

    def __init__(self, path: Path | str) -> None:
        self._engine = _acquire(Path(path))
        self._closed = False
        self.path = Path(self._engine.path)

    # -- port -------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        with self._engine.lock:
            created = not sql.scalar(self.dangerous_raw_sql(sql.EXPERIMENT_USERS_EXISTS, {}), default=1)
            for statement in sql.DDL:
                self._run(statement, {})
            if created and sql.scalar(self.dangerous_raw_sql(sql.EVENTS_PRESENT, {}), default=0):
                self.rebuild_experiment_users()  # an upgrade: the events are there, their fold is not

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        if not rows:
            return 0
        unique = sql.unique_rows(rows)
        with self._engine.lock:
            self._insert(unique)
            self._fold(unique)
        return len(unique)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        """Insert ``rows`` as they are, repeats within them included (see the port)."""
        with self._engine.lock:
            self._insert(rows)
            self._fold(rows)
        return len(rows)

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        statement, params = sql.rebuild_statement(tenant)
        with self._engine.lock:
            self._run(statement, params)
            return sql.scalar(self.dangerous_raw_sql(sql.count_experiment_users(tenant), params), default=0)

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        check_scope(tenant, query)
        return self.dangerous_raw_sql(query.sql, query.params)

    def dangerous_raw_sql(self, statement: str, params: sql.Params) -> list[dict[str, Any]]:
        with self._engine.lock:
            return sql.decode_json_each_row(self._run(statement, params))

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        with self._engine.lock:
            for statement in sql.ERASE_STATEMENTS:
                self._run(statement, {"tenant": str(tenant_id), "user": user_id})

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release(self._engine)

    # -- internals --------------------------------------------------------------------------------

    def _session(self) -> Any:
        if self._closed:
            raise AnalyticsStoreError("the analytics store is closed")
        return self._engine.session

    def _run(self, statement: str, params: sql.Params) -> bytes:
        try:
            result = self._session().query(statement, "JSONEachRow", params=sql.encode_params(params) or None)
        except RuntimeError as exc:  # chdb's ChdbError is a RuntimeError
            raise AnalyticsStoreError(str(exc)) from exc
        data: bytes = result.bytes()
        return data

    def _insert(self, rows: Sequence[AnalyticsEvent]) -> None:
        """The rows into ``events`` alone (``insert`` without the fold: the benchmark's baseline)."""
        self._stream(sql.INSERT_EVENTS_PREFIX, rows, sql.encode_rows, 256)

    def _fold(self, rows: Sequence[AnalyticsEvent]) -> None:
        folded = experiment_users.fold(rows, self._exposures)
        self._stream(sql.INSERT_EXPERIMENT_USERS_PREFIX, folded, experiment_users.encode, 128)

    def _exposures(self, tenant: uuid.UUID, users: list[str]) -> list[dict[str, Any]]:
        return self.dangerous_raw_sql(sql.LOOKUP_EXPOSURES, {"tenant": str(tenant), "users": users})

    def _stream(self, prefix: str, rows: Sequence[_T], encode: Callable[[Sequence[_T]], bytes], size: int) -> None:
        """Send ``rows`` to ``INSERT … FORMAT JSONCompactEachRow`` in chunks of about :data:`_APPEND_BYTES`
        (``size``: about how many bytes a row encodes to)."""
        if not rows:
            return
        step = max(1, _APPEND_BYTES // size)
        try:
            with self._session().send_insert(prefix, sql.INSERT_FORMAT) as inserter:
                for start in range(0, len(rows), step):
                    inserter.append(encode(rows[start : start + step]))
                inserter.finish()
        except RuntimeError as exc:
            raise AnalyticsStoreError(str(exc)) from exc

    def __enter__(self) -> ChdbStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
