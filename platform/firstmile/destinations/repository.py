"""All SQL of the destinations slice (its tables: :mod:`firstmile.destinations.models`)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import DriverStatement, TenantTx, json_text

# ---------------------------------------------------------------------------------------------------- the queue


@dataclass(frozen=True, slots=True)
class NewRow:
    """One thing a destination has to receive, before it is queued."""

    destination: str
    event_id: uuid.UUID
    kind: str
    user_id: str
    name: str
    occurred_at: datetime
    payload: Mapping[str, Any]
    sealed: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedRow:
    """A claimed row: what the worker sends."""

    id: int
    event_id: uuid.UUID
    kind: str
    user_id: str
    name: str
    occurred_at: datetime
    payload: dict[str, Any]
    sealed: str | None
    attempts: int
    created_at: datetime


_ENQUEUE = text(
    "INSERT INTO destination_queue (tenant_id, destination, event_id, kind, user_id, name, occurred_at, payload,"
    " sealed)"
    " SELECT :t, r.destination, r.event_id, r.kind, r.user_id, r.name, r.occurred_at, r.payload, r.sealed"
    " FROM jsonb_to_recordset(:rows) AS r(ord int, destination text, event_id uuid, kind text, user_id text,"
    " name text, occurred_at timestamptz, payload jsonb, sealed text)"
    " ORDER BY r.ord"
    " ON CONFLICT (tenant_id, destination, event_id, kind) DO NOTHING RETURNING destination"
).bindparams(bindparam("rows", type_=JSONB))


async def enqueue(tx: TenantTx, rows: Sequence[NewRow]) -> dict[str, int]:
    """Queue ``rows`` in their order (a row queued before is left as it is); how many were new, per destination."""
    if not rows:
        return {}
    records = [
        {"ord": i, "destination": r.destination, "event_id": str(r.event_id), "kind": r.kind, "user_id": r.user_id,
         "name": r.name, "occurred_at": r.occurred_at.isoformat(), "payload": dict(r.payload), "sealed": r.sealed}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    queued: dict[str, int] = {}
    for (destination,) in await tx.execute(_ENQUEUE, {"t": tx.tenant, "rows": records}):
        queued[destination] = queued.get(destination, 0) + 1
    return queued


_DELETE_USER = text("DELETE FROM destination_queue WHERE tenant_id = :t AND user_id = :u AND kind <> 'erase'")


async def delete_user(tx: TenantTx, user_id: str) -> int:
    """Delete everything queued about the user for every destination, but the erasures (an erasure, queued again
    when redelivered, is not repeated); how many rows."""
    return int((await tx.execute(_DELETE_USER, {"t": tx.tenant, "u": user_id})).rowcount)


_LOCK = DriverStatement.of("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_COLUMNS = "id, event_id, kind, user_id, name, occurred_at, payload, sealed, attempts, created_at"
_CLAIM = DriverStatement.of(
    # the selection is a MATERIALIZED CTE: as an ``IN (subquery)`` the planner may run the LIMIT ... FOR UPDATE
    # subquery again for each row it joins, and claim more than ``limit`` rows
    "WITH c AS MATERIALIZED ("
    "  SELECT q.id FROM destination_queue q"
    "  WHERE q.tenant_id = :t AND q.destination = :d AND q.status = 'pending' AND q.next_attempt_at <= :now"
    "   AND (q.claimed_until IS NULL OR q.claimed_until <= :now)"
    "   AND NOT EXISTS (SELECT 1 FROM destination_queue e"
    "    WHERE e.tenant_id = :t AND e.destination = :d AND e.user_id = q.user_id AND e.status = 'pending'"
    "     AND e.id < q.id AND (e.next_attempt_at > :now OR e.claimed_until > :now))"
    "  ORDER BY q.id LIMIT :limit FOR UPDATE OF q SKIP LOCKED)"
    # ``= ANY(ARRAY(...))``, not a join with ``c``: a prepared statement's generic plan hashed the whole table for it
    " UPDATE destination_queue u SET claim_id = :claim, claimed_until = :until, attempts = u.attempts + 1"
    " WHERE u.tenant_id = :t AND u.id = ANY(ARRAY(SELECT id FROM c))"
    f" RETURNING {', '.join('u.' + c.strip() for c in _COLUMNS.split(','))}"
)


_CLAIM_AHEAD = DriverStatement.of(
    # the claim of the worker's next batch while its current one (claim ``inflight``) is sent, as above but:
    # - a row of the batch in flight does not hold back its user's later rows: the worker sends its batches one after
    #   the other, so they follow it; the users of the batch in flight whose rows are not sent (``held``: an earlier
    #   row of theirs is not final) are left whole, and the worker leaves out of the next batch the users whose row
    #   the vendor did not take (their later rows wait, as the rule above has them wait);
    # - among the oldest ``window`` due rows only, still read in ``id`` order and only up to ``limit``: a backlog of
    #   rows held back is not read whole to find nothing. ``OFFSET 0`` keeps the NOT EXISTS a probe of the user's
    #   earlier rows per candidate (as an anti-join the planner may join each candidate with every claimed row).
    "WITH c AS MATERIALIZED ("
    "  SELECT q.id FROM destination_queue q"
    "  WHERE q.tenant_id = :t AND q.destination = :d AND q.status = 'pending' AND q.next_attempt_at <= :now"
    "   AND (q.claimed_until IS NULL OR q.claimed_until <= :now)"
    "   AND q.id <= (SELECT max(w.id) FROM (SELECT w.id FROM destination_queue w"
    "    WHERE w.tenant_id = :t AND w.destination = :d AND w.status = 'pending' AND w.next_attempt_at <= :now"
    "     AND (w.claimed_until IS NULL OR w.claimed_until <= :now) ORDER BY w.id LIMIT :window) w)"
    "   AND q.user_id <> ALL(CAST(:held AS text[]))"
    "   AND NOT EXISTS (SELECT 1 FROM destination_queue e"
    "    WHERE e.tenant_id = :t AND e.destination = :d AND e.user_id = q.user_id AND e.status = 'pending'"
    "     AND e.id < q.id AND (e.next_attempt_at > :now"
    "      OR (e.claimed_until > :now AND e.claim_id IS DISTINCT FROM CAST(:inflight AS uuid))) OFFSET 0)"
    "  ORDER BY q.id LIMIT :limit FOR UPDATE OF q SKIP LOCKED)"
    " UPDATE destination_queue u SET claim_id = :claim, claimed_until = :until, attempts = u.attempts + 1"
    " WHERE u.tenant_id = :t AND u.id = ANY(ARRAY(SELECT id FROM c))"
    f" RETURNING {', '.join('u.' + c.strip() for c in _COLUMNS.split(','))}"
)


def _lock_key(tx: TenantTx, destination: str) -> str:
    """The advisory lock one claim of a destination holds at a time."""
    return f"destinations:{tx.tenant}:{destination}"


def _queued(r: Any) -> QueuedRow:
    return QueuedRow(int(r[0]), r[1], str(r[2]), str(r[3]), str(r[4]), r[5], dict(r[6]), r[7], int(r[8]), r[9])


async def claim(
    tx: TenantTx, destination: str, now: datetime, until: datetime, claim_id: uuid.UUID, limit: int,
    *, window: int | None = None, inflight: uuid.UUID | None = None, held: Collection[str] = (), locked: bool = False,
) -> list[QueuedRow]:  # fmt: skip
    """Take up to ``limit`` due rows of ``destination`` until ``until``, oldest first: rows whose user has an
    earlier row waiting (a retry) or claimed are left, so each user's rows go out in order. One claim of a
    destination at a time (a transaction-scoped advisory lock), so two workers never split a user's rows.

    ``window``: the claim of the worker's next batch while its batch ``inflight`` (a claim id) is sent: among the
    oldest ``window`` due rows only, and a row of ``inflight`` holds back no later row of its user unless the user
    is in ``held`` (then none of the user's rows is taken): the worker sends that batch first, and leaves out of
    this one the users whose row the vendor did not take. ``locked``: the transaction took the lock already
    (:func:`finish` with ``lock``)."""
    # the worker's hottest statements go on the driver connection (TenantTx.fetch_driver): past SQLAlchemy's result
    # wrapping, whose cost per row counted at a batch of hundreds of rows (``make bench-destinations``)
    if not locked:
        await tx.fetch_driver(_LOCK, {"key": _lock_key(tx, destination)})
    params: dict[str, Any] = {"t": tx.tenant, "d": destination, "now": now, "until": until, "claim": claim_id,
                              "limit": limit}  # fmt: skip
    statement = _CLAIM
    if window is not None:
        statement = _CLAIM_AHEAD
        params |= {"window": max(window, limit), "inflight": inflight, "held": sorted(held)}
    rows = [_queued(r) for r in await tx.fetch_driver(statement, params)]
    return sorted(rows, key=lambda r: r.id)


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one claimed row."""

    id: int
    status: str
    """``pending`` (again, at ``next_attempt_at``), ``done`` or ``dead``."""
    next_attempt_at: datetime | None = None
    error: str | None = None
    outcome: Mapping[str, Any] | None = None
    refund: bool = False
    """The claim's attempt does not count (a vendor's rate limit, a row that was not sent)."""


_FINISH_SQL = (
    "UPDATE destination_queue q SET status = r.status, next_attempt_at = coalesce(r.next_at, q.next_attempt_at),"
    " last_error = coalesce(r.error, q.last_error), outcome = coalesce(r.outcome, q.outcome),"
    " attempts = q.attempts - r.refund, claim_id = NULL, claimed_until = NULL,"
    " finished_at = CASE WHEN r.status = 'pending' THEN NULL ELSE now() END"
    " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id bigint, status text, next_at timestamptz, error text,"
    " outcome jsonb, refund int)"
    " WHERE q.tenant_id = :t AND q.id = r.id AND q.claim_id = :claim"
    " RETURNING q.id"
)
_SUCCESS_SQL = (
    "INSERT INTO destination_state AS s (tenant_id, destination, last_success_at) VALUES (:t, :d, :at)"
    " ON CONFLICT (tenant_id, destination) DO UPDATE SET failing_since = NULL,"
    " last_success_at = excluded.last_success_at"
)


def _finishing(success: bool, lock: bool) -> DriverStatement:
    """The finish, with the destination's success recorded and its claim lock taken in the same statement (one
    round trip instead of three: the delivery worker records a batch and claims the next in one transaction)."""
    sql = f"WITH f AS ({_FINISH_SQL})"
    if success:
        sql += f", s AS ({_SUCCESS_SQL})"
    sql += " SELECT ARRAY(SELECT id FROM f)"
    if lock:
        sql += ", pg_advisory_xact_lock(hashtextextended(:key, 0))"
    return DriverStatement.of(sql)


_FINISH = {(success, lock): _finishing(success, lock) for success in (False, True) for lock in (False, True)}


async def finish(
    tx: TenantTx, claim_id: uuid.UUID, results: Sequence[Result], *, success: tuple[str, datetime] | None = None,
    lock: str | None = None,
) -> set[int]:  # fmt: skip
    """Record what became of claimed rows; the ids recorded (a row whose claim ran out and that another worker
    claimed since is not touched: that worker records it).

    ``success``: also record a success of that destination at that time (its failing streak ends); ``lock``: also
    take that destination's claim lock, as :func:`claim` does first (then ``claim(..., locked=True)``)."""
    if not results and success is None and lock is None:
        return set()
    rows = [
        {"id": r.id, "status": r.status, "next_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
         "error": r.error[:1000] if r.error else None, "outcome": dict(r.outcome) if r.outcome is not None else None,
         "refund": int(r.refund)}
        for r in results
    ]  # fmt: skip
    params: dict[str, Any] = {"t": tx.tenant, "claim": claim_id, "rows": json_text(rows)}
    if success is not None:
        params["d"], params["at"] = success
    if lock is not None:
        params["key"] = _lock_key(tx, lock)
    [found] = await tx.fetch_driver(_FINISH[success is not None, lock is not None], params)
    return {int(i) for i in found[0]}


_REPLAY = text(
    "UPDATE destination_queue SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,"
    " claim_id = NULL, claimed_until = NULL"
    " WHERE tenant_id = :t AND destination = :d AND status = 'dead'"
    " AND (CAST(:since AS timestamptz) IS NULL OR finished_at >= :since)"
)


async def replay(tx: TenantTx, destination: str, since: datetime | None) -> int:
    """Make the destination's dead rows (those that died at ``since`` or later) pending again; how many."""
    return int((await tx.execute(_REPLAY, {"t": tx.tenant, "d": destination, "since": since})).rowcount)


_DELETE_DESTINATION = text("DELETE FROM destination_queue WHERE tenant_id = :t AND destination = :d")


async def delete_destination(tx: TenantTx, destination: str) -> int:
    """Delete everything queued for a destination the manifest no longer has; how many rows."""
    await tx.execute(
        text("DELETE FROM destination_state WHERE tenant_id = :t AND destination = :d"),
        {"t": tx.tenant, "d": destination},
    )
    return int((await tx.execute(_DELETE_DESTINATION, {"t": tx.tenant, "d": destination})).rowcount)


_PURGE = text("DELETE FROM destination_queue WHERE tenant_id = :t AND status <> 'pending' AND finished_at < :before")


async def purge_finished(tx: TenantTx, before: datetime) -> int:
    """Delete the rows that finished (delivered or dead) before ``before``; how many."""
    return int((await tx.execute(_PURGE, {"t": tx.tenant, "before": before})).rowcount)


@dataclass(frozen=True, slots=True)
class Counts:
    """One destination's queue, as ``firstmile destinations status`` shows it."""

    pending: int = 0
    due: int = 0
    dead: int = 0
    done: int = 0
    oldest_pending: datetime | None = None


_COUNTS = text(
    "SELECT destination, count(*) FILTER (WHERE status = 'pending'),"
    " count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()),"
    " count(*) FILTER (WHERE status = 'dead'), count(*) FILTER (WHERE status = 'done'),"
    " min(created_at) FILTER (WHERE status = 'pending')"
    " FROM destination_queue WHERE tenant_id = :t GROUP BY destination"
)


async def counts(tx: TenantTx) -> dict[str, Counts]:
    return {
        str(r[0]): Counts(int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5])
        for r in await tx.execute(_COUNTS, {"t": tx.tenant})
    }


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A dead row, or a pending one that failed before: what the status command lists as last errors."""

    id: int
    event_id: uuid.UUID
    kind: str
    name: str
    status: str
    attempts: int
    error: str
    at: datetime | None


_LAST_ERRORS = text(
    "SELECT id, event_id, kind, name, status, attempts, last_error, coalesce(finished_at, created_at)"
    " FROM destination_queue WHERE tenant_id = :t AND destination = :d AND last_error IS NOT NULL"
    " AND status <> 'done' ORDER BY id DESC LIMIT :limit"
)


async def last_errors(tx: TenantTx, destination: str, limit: int) -> list[FailedRow]:
    params = {"t": tx.tenant, "d": destination, "limit": limit}
    return [
        FailedRow(int(r[0]), r[1], str(r[2]), str(r[3]), str(r[4]), int(r[5]), str(r[6]), r[7])
        for r in await tx.execute(_LAST_ERRORS, params)
    ]


_ROWS = text(
    "SELECT id, event_id, kind, user_id, name, status, attempts, last_error, outcome"
    " FROM destination_queue WHERE tenant_id = :t AND destination = :d ORDER BY id"
)


async def rows(tx: TenantTx, destination: str) -> list[dict[str, Any]]:
    """Every row of a destination's queue, oldest first (operators' and tests' view)."""
    return [
        {"id": int(r[0]), "event_id": r[1], "kind": r[2], "user_id": r[3], "name": r[4], "status": r[5],
         "attempts": int(r[6]), "last_error": r[7], "outcome": r[8]}
        for r in await tx.execute(_ROWS, {"t": tx.tenant, "d": destination})
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- across tenants


@dataclass(frozen=True, slots=True)
class Due:
    """A destination with pending rows (any tenant): how many are due now, how many wait, since when."""

    tenant_id: uuid.UUID
    destination: str
    due: int
    pending: int
    oldest: datetime
    oldest_due: datetime | None


_DUE = text("SELECT tenant_id, destination, due, pending, oldest, oldest_due FROM firstmile_destinations_due()")


async def due(conn: AsyncConnection) -> list[Due]:
    """Every tenant's destinations with pending rows (through the SECURITY DEFINER function of migration 0023)."""
    return [Due(r[0], str(r[1]), int(r[2]), int(r[3]), r[4], r[5]) for r in await conn.execute(_DUE)]


_FINISHED = text("SELECT tenant_id FROM firstmile_destinations_finished(:before)")


async def finished_tenants(conn: AsyncConnection, before: datetime) -> list[uuid.UUID]:
    """Tenants with rows that finished before ``before`` (to purge)."""
    return [r[0] for r in await conn.execute(_FINISHED, {"before": before})]


# ---------------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class CredentialRow:
    sealed: str
    previous: str | None
    previous_until: datetime | None
    version: int
    updated_at: datetime
    updated_by: str


_CREDENTIALS = text(
    "SELECT destination, sealed, previous, previous_until, version, updated_at, updated_by"
    " FROM destination_credentials WHERE tenant_id = :t"
)


async def credentials(tx: TenantTx) -> dict[str, CredentialRow]:
    """Every destination's stored credentials (sealed), by destination name."""
    return {
        str(r[0]): CredentialRow(r[1], r[2], r[3], int(r[4]), r[5], str(r[6]))
        for r in await tx.execute(_CREDENTIALS, {"t": tx.tenant})
    }


_PUT_CREDENTIALS = text(
    "INSERT INTO destination_credentials AS c (tenant_id, destination, sealed, previous, previous_until, updated_by)"
    " VALUES (:t, :d, :sealed, :previous, :previous_until, :by)"
    " ON CONFLICT (tenant_id, destination) DO UPDATE SET sealed = excluded.sealed, previous = excluded.previous,"
    " previous_until = excluded.previous_until, version = c.version + 1, updated_at = now(),"
    " updated_by = excluded.updated_by"
    " RETURNING version"
)


async def put_credentials(
    tx: TenantTx, destination: str, sealed: str, previous: str | None, previous_until: datetime | None, actor: str
) -> int:
    """Store a destination's credentials (replacing any); their new version."""
    params = {"t": tx.tenant, "d": destination, "sealed": sealed, "previous": previous,
              "previous_until": previous_until, "by": actor}  # fmt: skip
    return int((await tx.execute(_PUT_CREDENTIALS, params)).scalar_one())


_DELETE_CREDENTIALS = text("DELETE FROM destination_credentials WHERE tenant_id = :t AND destination = :d")


async def delete_credentials(tx: TenantTx, destination: str) -> bool:
    return int((await tx.execute(_DELETE_CREDENTIALS, {"t": tx.tenant, "d": destination})).rowcount) > 0


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class StateRow:
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    failing_since: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_success_at: datetime | None = None


_STATES = text(
    "SELECT destination, disabled_at, disabled_reason, failing_since, last_error, last_error_at, last_success_at"
    " FROM destination_state WHERE tenant_id = :t"
)


async def states(tx: TenantTx) -> dict[str, StateRow]:
    return {str(r[0]): StateRow(*r[1:]) for r in await tx.execute(_STATES, {"t": tx.tenant})}


_FAILURE = text(
    "INSERT INTO destination_state AS s (tenant_id, destination, failing_since, last_error, last_error_at)"
    " VALUES (:t, :d, :at, :error, :at)"
    " ON CONFLICT (tenant_id, destination) DO UPDATE"
    " SET failing_since = coalesce(s.failing_since, excluded.failing_since),"
    " last_error = excluded.last_error, last_error_at = excluded.last_error_at"
    " RETURNING failing_since, disabled_at"
)


async def record_failure(
    tx: TenantTx, destination: str, error: str, at: datetime, *, failing: bool = True
) -> tuple[datetime | None, datetime | None]:
    """Record an error; with ``failing`` (every attempt of a call failed) the failure streak starts now unless it
    had started. Returns (failing since, disabled at)."""
    if not failing:
        await tx.execute(
            text(
                "INSERT INTO destination_state AS s (tenant_id, destination, last_error, last_error_at)"
                " VALUES (:t, :d, :error, :at) ON CONFLICT (tenant_id, destination) DO UPDATE"
                " SET last_error = excluded.last_error, last_error_at = excluded.last_error_at"
            ),
            {"t": tx.tenant, "d": destination, "error": error[:1000], "at": at},
        )
        return None, None
    row = (await tx.execute(_FAILURE, {"t": tx.tenant, "d": destination, "error": error[:1000], "at": at})).one()
    return row[0], row[1]


_DISABLE = text(
    "INSERT INTO destination_state AS s (tenant_id, destination, disabled_at, disabled_reason)"
    " VALUES (:t, :d, :at, :reason)"
    " ON CONFLICT (tenant_id, destination) DO UPDATE SET disabled_at = excluded.disabled_at,"
    " disabled_reason = excluded.disabled_reason WHERE s.disabled_at IS NULL"
    " RETURNING 1"
)


async def disable(tx: TenantTx, destination: str, reason: str, at: datetime) -> bool:
    """Disable the destination; False when it was disabled already."""
    params = {"t": tx.tenant, "d": destination, "at": at, "reason": reason[:1000]}
    return (await tx.execute(_DISABLE, params)).first() is not None


_ENABLE = text(
    "UPDATE destination_state SET disabled_at = NULL, disabled_reason = NULL, failing_since = NULL"
    " WHERE tenant_id = :t AND destination = :d AND disabled_at IS NOT NULL RETURNING 1"
)


async def enable(tx: TenantTx, destination: str) -> bool:
    """Enable a disabled destination (its failure streak starts afresh); False when it was not disabled."""
    return (await tx.execute(_ENABLE, {"t": tx.tenant, "d": destination})).first() is not None
