"""Database engine, metadata and the tenant-scoped transaction.

Row-level security is the second wall: every tenant-owned table has a policy
``tenant_id = (select current_setting('firstmile.tenant_id'))``. The setting is
applied with ``set_config(..., is_local => true)``, the function form of
``SET LOCAL``, so it dies with the transaction and a pooled connection can never
carry one tenant's context into another's request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from sqlalchemy import CursorResult, Executable, MetaData, event, text
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util.typing import TupleAny

from firstmile.kit import telemetry
from firstmile.kit.scope import TenantId

T = TypeVar("T")
log = logging.getLogger("firstmile.db")

TENANT_SETTING = "firstmile.tenant_id"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
"""All tables of the platform; each slice's ``models.py`` adds its own."""

_SET_TENANT = text("SELECT set_config('firstmile.tenant_id', :tenant, true)")

Params = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A statement written with named parameters (``:name``, as for ``text()``), sent positionally (``$1``…)
    by :meth:`TenantTx.fetch_driver`; a name used twice is one parameter."""

    named: str
    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, named: str) -> DriverStatement:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        return cls(named, _NAMED_PARAMETER.sub(number, named), tuple(names))

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"statement parameters missing: {', '.join(missing)}")
        return [params[n] for n in self.names]


@dataclass(frozen=True, slots=True)
class TenantTx:
    """An open transaction in which row-level security sees exactly :attr:`tenant`.

    The only connection type repositories and services accept: it is made by
    :func:`tenant_transaction` (through a :class:`~firstmile.kit.uow.UnitOfWork` in the
    API and workers), so the tenant a statement filters on is the tenant the
    transaction is bound to. Whoever opened it commits; code that receives it never does.
    """

    conn: AsyncConnection
    tenant: TenantId
    driver: Any = None
    """The asyncpg connection under :attr:`conn`, when the opener had it at hand (else looked up on use)."""

    async def execute(self, statement: Executable, parameters: Params = None) -> CursorResult[*TupleAny]:
        """Run one statement in the transaction (``AsyncConnection.execute``)."""
        return await self.conn.execute(statement, parameters)

    async def fetch_driver(self, statement: DriverStatement, params: Mapping[str, Any]) -> list[Any]:
        """Run one statement on the driver connection, past SQLAlchemy; its rows (asyncpg records).

        For the request path's hottest statements: asyncpg prepares and caches the statement itself, and
        the call skips SQLAlchemy's compilation, result wrapping and greenlet switch. Parameters go as
        asyncpg takes them (``jsonb`` as JSON text). A connection lost meanwhile is invalidated and raised
        as :class:`ConnectionLostError`; a server error keeps its ``sqlstate``, which
        :func:`is_transient` reads as it does for SQLAlchemy's errors.
        """
        raw: Any = self.driver
        if raw is None:
            raw = (await self.conn.get_raw_connection()).driver_connection
        try:
            rows: list[Any] = await raw.fetch(statement.sql, *statement.arguments(params))
        except Exception as exc:
            if not raw.is_closed():
                raise
            await self.conn.invalidate()
            raise ConnectionLostError(f"the database connection was lost: {type(exc).__name__}: {exc}") from exc
        return rows


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    statement_timeout_ms: int | None = None,
    application_name: str = "firstmile",
) -> AsyncEngine:
    """An asyncpg-backed engine with a pool that is checked before use."""
    server_settings = {"application_name": application_name}
    if statement_timeout_ms is not None:
        server_settings["statement_timeout"] = str(statement_timeout_ms)
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args=connect_args,
        # msgspec: ~10x faster than the json module for the JSONB batches of the hot paths
        json_serializer=json_text,
        json_deserializer=msgspec.json.decode,
    )
    event.listen(engine.sync_engine, "checkout", _refuse_closed)
    return engine


def _refuse_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """A pooled connection the server has closed is not handed out: the pool drops it and every older one.

    The pool is not pinged before use; but when the server goes away (a restart, a failover, a killed
    backend) asyncpg learns of each idle connection's end from its socket, so a closed one is known for
    free. ``tenant_transaction`` sends its ``BEGIN`` on the driver connection, past SQLAlchemy's own
    disconnect handling, so without this it would fail there ("connection is closed") for every
    connection the pool still held. Raising ``InvalidatePoolError`` makes the pool discard the
    connections made before now (the server was restarted: they are all gone) and check out a new one.
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise InvalidatePoolError("the database closed this pooled connection")


class ConnectionLostError(ConnectionError):
    """The connection to the database was lost under a statement sent on the driver connection (transient)."""


async def _on_driver(conn: AsyncConnection, raw: Any, statement: str) -> None:
    """Run ``statement`` on ``conn``'s driver connection; a connection lost meanwhile is invalidated (it does not
    go back to the pool) and raised as :class:`ConnectionLostError`, which the unit of work retries."""
    try:
        await raw.execute(statement)
    except Exception as exc:
        if not raw.is_closed():
            raise
        await conn.invalidate()
        raise ConnectionLostError(f"the database connection was lost: {type(exc).__name__}: {exc}") from exc


def json_text(value: Any) -> str:
    """JSON text for a ``jsonb`` parameter (msgspec, as the engine's serializer)."""
    return msgspec.json.encode(value).decode()


async def bind_tenant(conn: AsyncConnection, tenant_id: TenantId) -> TenantTx:
    """Bind the transaction already open on ``conn`` to ``tenant_id`` (transaction-local).

    For the few operator paths that must look something up before they know the tenant
    (``tenants apply`` finds or creates the tenant by slug in the same transaction).
    """
    await conn.execute(_SET_TENANT, {"tenant": str(tenant_id)})
    return TenantTx(conn, tenant_id)


@asynccontextmanager
async def tenant_transaction(
    engine: AsyncEngine, tenant_id: TenantId, *, commit: bool = True
) -> AsyncIterator[TenantTx]:
    """A transaction in which row-level security sees exactly ``tenant_id``.

    Commits when the block ends normally (rolls back instead with ``commit=False``:
    a dry run), rolls back on any exception: services never commit, the owner of the
    unit of work does.

    ``BEGIN`` and the tenant setting travel in one simple-protocol round trip on
    the driver connection; SQLAlchemy runs in autocommit mode inside it, so it
    adds no ``BEGIN`` of its own. The tenant id is a :class:`uuid.UUID`, whose
    text form is safe to inline.
    """
    tenant = uuid.UUID(str(tenant_id))
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await _on_driver(conn, raw, f"BEGIN; SELECT set_config('{TENANT_SETTING}', '{tenant}', true)")
        try:
            yield TenantTx(conn, tenant_id, raw)
        except BaseException:
            try:
                await raw.execute("ROLLBACK")
            except Exception:  # a broken or busy connection must not go back to the pool
                await conn.invalidate()
            raise
        await _on_driver(conn, raw, "COMMIT" if commit else "ROLLBACK")


_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "08000", "08003", "08006"})
"""Serialization failure, deadlock, admin shutdown of the backend, crash shutdown (another backend crashed and the
server resets), cannot connect now (the server is starting up or recovering after a crash), connection exceptions."""


class StatementDeadlineError(TimeoutError):
    """A statement run under :func:`statement_deadline` ran past it (PostgreSQL cancelled it: ``57014``)."""


_SWAP_TIMEOUT = text(
    "WITH previous AS MATERIALIZED (SELECT current_setting('statement_timeout') AS value)"
    " SELECT previous.value, set_config('statement_timeout', :value, true) FROM previous"
)  # the previous value is read before the new one is set: the CTE is materialized first
_SET_TIMEOUT = text("SELECT set_config('statement_timeout', :value, true)")


async def across_tenants(engine: AsyncEngine, read: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``read`` on a connection outside any tenant transaction (autocommit, no tenant setting): the
    cross-tenant lookups of a worker, through SECURITY DEFINER functions, of which tenants have work for it."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        return await read(conn)


@asynccontextmanager
async def statement_deadline(tx: TenantTx, seconds: float) -> AsyncIterator[None]:
    """Run the block's statements under PostgreSQL's ``statement_timeout`` of ``seconds``, in a savepoint.

    For reads a decision may not wait for (a lock held by a migration, a slow plan): a statement past
    the deadline is cancelled by the server, the savepoint rolls back (with the timeout setting), the
    transaction stays usable, and :class:`StatementDeadlineError` is raised for the caller's fallback.
    Each statement gets the whole deadline (it is PostgreSQL's per-statement limit); keep the block to
    a few statements. Other errors pass through unchanged.
    """
    try:
        async with tx.conn.begin_nested():  # an error rolls the savepoint back, the timeout setting with it
            swapped = await tx.execute(_SWAP_TIMEOUT, {"value": f"{max(1, round(seconds * 1000))}ms"})
            previous = swapped.one()[0]
            yield
            await tx.execute(_SET_TIMEOUT, {"value": previous})
    except Exception as exc:
        origin = exc.orig if isinstance(exc, DBAPIError) else exc  # SQLAlchemy's, or asyncpg's from fetch_driver
        if getattr(origin, "sqlstate", None) == "57014":
            raise StatementDeadlineError(f"a statement ran past its deadline of {seconds:g} s") from exc
        raise


class DatabaseUnavailableError(RuntimeError):
    """The database kept failing transiently through every retry."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the whole unit of work may succeed: a lost connection or a conflict."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return sqlstate in _RETRYABLE_SQLSTATES
    if isinstance(getattr(exc, "sqlstate", None), str):  # an asyncpg error from TenantTx.fetch_driver
        return exc.sqlstate in _RETRYABLE_SQLSTATES  # type: ignore[attr-defined]
    return isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError))


async def retry_transient(operation: Callable[[], Awaitable[T]], *, attempts: int = 3, base_delay: float = 0.05) -> T:
    """Run ``operation``, retrying transient database failures with exponential backoff.

    The seed design's recovery rule for progress writes: a failed database call is
    retried (0.05 s, then 0.1 s later here) and given up after ``attempts`` with
    :class:`DatabaseUnavailableError`, which the API answers with 503. A dead pooled
    connection is invalidated by SQLAlchemy, so the retry gets a fresh one.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            telemetry.DB_RETRIES.inc()
            if attempt == attempts:
                raise DatabaseUnavailableError(f"database failed {attempts} times: {type(exc).__name__}") from exc
            log.warning(
                "transient database failure, retrying",
                extra={"fields": {"attempt": attempt, "error": type(exc).__name__}},
            )
            await asyncio.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover
