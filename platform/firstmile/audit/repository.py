"""All SQL of the audit slice.

Every tenant-scoped function takes a :class:`~firstmile.kit.db.TenantTx` (a transaction
bound to the tenant, opened by a unit of work or by the operator's CLI, whose
``firstmile_admin`` policies see every tenant); every query also filters on ``tenant_id``.
Only :func:`pending_tenants` works across tenants, on a plain connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.audit.canonical import canonical_entry, canonical_v2, format_timestamp, leaf_hash, loads
from firstmile.kit.db import DriverStatement, TenantTx


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry as stored."""

    tenant_id: uuid.UUID
    seq: int
    kind: str
    actor: str
    subject: str
    payload: Any
    created_at: datetime
    prev_hash: bytes
    entry_hash: bytes
    leaf_hash: bytes
    entry_id: uuid.UUID | None = None
    """Set for entries that were queued (canonical version 2); None for version 1."""
    sequenced_at: datetime | None = None

    def canonical(self) -> bytes:
        """The canonical bytes recomputed from the content (never read from storage)."""
        return canonical_entry(
            self.tenant_id, self.seq, self.kind, self.actor, self.subject, self.payload, self.created_at,
            self.entry_id,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    tenant_id: uuid.UUID
    tree_size: int
    root_hash: bytes
    signed_at: datetime
    signature: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class HeadRow:
    seq: int
    entry_hash: bytes
    prev_hash: bytes
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EntryFilter:
    kind: str | None = None
    actor: str | None = None
    subject: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    after_seq: int | None = None


_QUEUE = DriverStatement.of(
    "INSERT INTO audit_queue (tenant_id, created_at, entry_id, kind, actor, subject, payload, leaf_hash) "
    "VALUES (:tenant, :created_at, :entry_id, :kind, :actor, :subject, :payload, :leaf)"
)
"""On the driver connection: every audited request sends it."""


async def queue_entry(
    tx: TenantTx,
    entry_id: uuid.UUID,
    created_at: datetime,
    kind: str,
    actor: str,
    subject: str,
    payload_jcs: str,
    leaf: bytes,
) -> None:
    """Queue one entry in the caller's transaction (one round trip, no shared lock)."""
    await tx.fetch_driver(
        _QUEUE,
        {
            "tenant": tx.tenant,
            "created_at": created_at,
            "entry_id": entry_id,
            "kind": kind,
            "actor": actor,
            "subject": subject,
            "payload": payload_jcs,
            "leaf": leaf,
        },
    )


@dataclass(frozen=True, slots=True)
class QueuedEntry:
    """An entry written but not yet sequenced: it has its leaf hash, not yet its place.

    ``payload_jcs`` is the payload as the queue holds it: the exact JCS text its writer hashed
    (migration ``0012``), so the sequencer checks the leaf hash without parsing the payload.
    Rows queued before that migration, or by a writer of an earlier release during a rolling
    upgrade, hold ``jsonb``'s text form instead; :meth:`canonical_candidates` covers both.
    """

    tenant_id: uuid.UUID
    entry_id: uuid.UUID
    kind: str
    actor: str
    subject: str
    payload_jcs: str
    created_at: datetime
    leaf_hash: bytes

    @property
    def seq(self) -> None:
        """No place in the log yet (readers show a queued entry as pending)."""
        return None

    @property
    def payload(self) -> Any:
        """The payload, parsed (for readers; the hot path never needs it)."""
        return loads(self.payload_jcs)

    def canonical(self) -> bytes:
        """The canonical bytes recomputed from the parsed content (what the log will verify)."""
        return canonical_entry(
            self.tenant_id, 0, self.kind, self.actor, self.subject, self.payload, self.created_at, self.entry_id
        )

    def canonical_stored(self) -> bytes:
        """The canonical bytes over the payload text exactly as queued (no parsing)."""
        return canonical_v2(
            self.tenant_id, self.entry_id, self.kind, self.actor, self.subject, self.payload_jcs,
            format_timestamp(self.created_at),
        )  # fmt: skip

    def checked_canonical(self) -> bytes | None:
        """The canonical bytes when they match the leaf hash, else None (the row was tampered with).

        One hash over the stored text and no parsing for every entry this release queues; a row
        that holds ``jsonb``'s text form (queued before migration 0012) is canonicalised from its
        parsed payload. Raises :class:`~firstmile.audit.canonical.CanonicalError` (a ``ValueError``)
        when the stored payload has no canonical form at all.
        """
        canonical = self.canonical_stored()
        if leaf_hash(canonical) == self.leaf_hash:
            return canonical
        canonical = self.canonical()
        return canonical if leaf_hash(canonical) == self.leaf_hash else None


_Q_COLUMNS = "tenant_id, entry_id, kind, actor, subject, payload, created_at, leaf_hash"


def _queued(row: Sequence[Any]) -> QueuedEntry:
    return QueuedEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bytes(row[7]))


_Q_NEXT = text(
    f"SELECT {_Q_COLUMNS} FROM audit_queue WHERE tenant_id = :tenant ORDER BY created_at, entry_id "
    "OFFSET :offset LIMIT :limit"
)
_Q_GET = text(f"SELECT {_Q_COLUMNS} FROM audit_queue WHERE tenant_id = :tenant AND entry_id = :entry_id")
_Q_LATEST = text(
    f"SELECT {_Q_COLUMNS} FROM audit_queue WHERE tenant_id = :tenant AND (CAST(:kind AS text) IS NULL OR kind = :kind) "
    "AND (CAST(:subject AS text) IS NULL OR subject = :subject) ORDER BY created_at DESC, entry_id DESC LIMIT :limit"
)
_Q_ABOUT = text(
    f"SELECT {_Q_COLUMNS} FROM audit_queue WHERE tenant_id = :tenant AND subject = :subject "
    "ORDER BY created_at, entry_id LIMIT :limit"
)


async def next_queued(tx: TenantTx, limit: int, offset: int = 0) -> list[QueuedEntry]:
    """The tenant's queued entries in queue order, ``offset`` onwards, at most ``limit``: the oldest are the
    sequencer's next batch; the verifier pages through them in one snapshot."""
    rows = await tx.execute(_Q_NEXT, {"tenant": tx.tenant, "limit": limit, "offset": offset})
    return [_queued(r) for r in rows]


async def get_queued(tx: TenantTx, entry_id: uuid.UUID) -> QueuedEntry | None:
    row = (await tx.execute(_Q_GET, {"tenant": tx.tenant, "entry_id": entry_id})).first()
    return None if row is None else _queued(row)


async def latest_queued(tx: TenantTx, kind: str | None, limit: int, subject: str | None = None) -> list[QueuedEntry]:
    """The newest ``limit`` queued entries (of ``kind``, about ``subject``, when given), newest first."""
    rows = await tx.execute(_Q_LATEST, {"tenant": tx.tenant, "kind": kind, "subject": subject, "limit": limit})
    return [_queued(r) for r in rows]


async def queued_about(tx: TenantTx, subject: str, limit: int) -> list[QueuedEntry]:
    rows = await tx.execute(_Q_ABOUT, {"tenant": tx.tenant, "subject": subject, "limit": limit})
    return [_queued(r) for r in rows]


_HEAD_FOR_UPDATE = text("SELECT seq, entry_hash FROM audit_heads WHERE tenant_id = :tenant FOR UPDATE")
_SEQUENCE_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended('firstmile.audit.sequencer:' || :tenant, 0))")

# The batch moves from the queue into the log in three statements of one transaction: the
# entries (their content copied from the queue rows, so it cannot differ from what was
# hashed), the head, and the dequeue, which the queue's trigger allows only for entries that
# this transaction inserted.
_SEQUENCE = text(
    """
    INSERT INTO audit_entries
      (tenant_id, seq, kind, actor, subject, payload, created_at, prev_hash, entry_hash, leaf_hash,
       entry_id, sequenced_at)
    SELECT q.tenant_id, u.seq, q.kind, q.actor, q.subject, CAST(q.payload AS jsonb), q.created_at, u.prev, u.hash,
           q.leaf_hash, q.entry_id, clock_timestamp()
    FROM unnest(CAST(:created AS timestamptz[]), CAST(:ids AS uuid[]), CAST(:seqs AS bigint[]),
                CAST(:prevs AS bytea[]), CAST(:hashes AS bytea[])) AS u(created_at, entry_id, seq, prev, hash)
    JOIN audit_queue q ON q.tenant_id = :tenant AND q.created_at = u.created_at AND q.entry_id = u.entry_id
    """
)
_HEAD_UPSERT = text(
    "INSERT INTO audit_heads AS h (tenant_id, seq, entry_hash, prev_hash, updated_at) "
    "VALUES (:tenant, :seq, :hash, :prev, clock_timestamp()) "
    "ON CONFLICT (tenant_id) DO UPDATE SET seq = excluded.seq, entry_hash = excluded.entry_hash, "
    "prev_hash = excluded.prev_hash, updated_at = excluded.updated_at"
)
_DEQUEUE = text("SELECT firstmile_audit_dequeue(:tenant, CAST(:created AS timestamptz[]), CAST(:ids AS uuid[]))")


async def try_sequence_lock(tx: TenantTx) -> bool:
    """A transaction-scoped lock that keeps two sequencers off one tenant at a time."""
    return bool((await tx.execute(_SEQUENCE_LOCK, {"tenant": str(tx.tenant)})).scalar_one())


async def lock_head(tx: TenantTx) -> tuple[int, bytes] | None:
    """The tenant's head (seq, entry_hash), locked until the transaction ends; None for an empty log."""
    row = (await tx.execute(_HEAD_FOR_UPDATE, {"tenant": tx.tenant})).first()
    return None if row is None else (int(row[0]), bytes(row[1]))


@dataclass(frozen=True, slots=True)
class Placed:
    """A queued entry's place in the log, computed by the sequencer."""

    entry: QueuedEntry
    seq: int
    prev_hash: bytes
    entry_hash: bytes


async def sequence_batch(tx: TenantTx, placed: Sequence[Placed]) -> int:
    """Insert ``placed`` into the log, move the head to the last one and dequeue them; the count."""
    if not placed:
        return 0
    created = [p.entry.created_at for p in placed]
    ids = [p.entry.entry_id for p in placed]
    params = {
        "tenant": tx.tenant,
        "created": created,
        "ids": ids,
        "seqs": [p.seq for p in placed],
        "prevs": [p.prev_hash for p in placed],
        "hashes": [p.entry_hash for p in placed],
    }
    inserted = (await tx.execute(_SEQUENCE, params)).rowcount
    if inserted != len(placed):
        raise RuntimeError(f"sequenced {inserted} of {len(placed)} queued entries")
    last = placed[-1]
    await tx.execute(
        _HEAD_UPSERT, {"tenant": tx.tenant, "seq": last.seq, "hash": last.entry_hash, "prev": last.prev_hash}
    )
    removed = int((await tx.execute(_DEQUEUE, {"tenant": tx.tenant, "created": created, "ids": ids})).scalar_one())
    if removed != len(placed):
        raise RuntimeError(f"dequeued {removed} of {len(placed)} sequenced entries")
    return removed


_QUEUED_TENANTS = text("SELECT tenant_id, queued, oldest FROM firstmile_audit_queued()")


async def queued_tenants(conn: AsyncConnection) -> list[tuple[uuid.UUID, int, datetime]]:
    """Tenants with queued entries: (tenant, how many, the oldest's created_at); any tenant."""
    return [(r[0], int(r[1]), r[2]) for r in await conn.execute(_QUEUED_TENANTS)]


_COLUMNS = (
    "tenant_id, seq, kind, actor, subject, payload::text, created_at, prev_hash, entry_hash, leaf_hash, "
    "entry_id, sequenced_at"
)


def _entry(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        row[0], int(row[1]), row[2], row[3], row[4], loads(row[5]), row[6], bytes(row[7]), bytes(row[8]),
        bytes(row[9]), row[10], row[11],
    )  # fmt: skip


async def list_entries(tx: TenantTx, where: EntryFilter, limit: int) -> list[AuditEntry]:
    """Entries in seq order matching ``where``, at most ``limit``."""
    clauses = ["tenant_id = :tenant"]
    params: dict[str, Any] = {"tenant": tx.tenant, "limit": limit}
    for column, value in (("kind", where.kind), ("actor", where.actor), ("subject", where.subject)):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if where.created_from is not None:
        clauses.append("created_at >= :created_from")
        params["created_from"] = where.created_from
    if where.created_to is not None:
        clauses.append("created_at < :created_to")
        params["created_to"] = where.created_to
    if where.after_seq is not None:
        clauses.append("seq > :after_seq")
        params["after_seq"] = where.after_seq
    sql = f"SELECT {_COLUMNS} FROM audit_entries WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT :limit"
    return [_entry(r) for r in await tx.execute(text(sql), params)]


async def latest_entries(tx: TenantTx, kind: str | None, limit: int, subject: str | None = None) -> list[AuditEntry]:
    """The newest ``limit`` entries (of ``kind``, about ``subject``, when given), newest first: the admin UI's
    audit viewer."""
    where = "tenant_id = :tenant" + (" AND kind = :kind" if kind is not None else "")
    where += " AND subject = :subject" if subject is not None else ""
    sql = f"SELECT {_COLUMNS} FROM audit_entries WHERE {where} ORDER BY seq DESC LIMIT :limit"
    rows = await tx.execute(text(sql), {"tenant": tx.tenant, "kind": kind, "subject": subject, "limit": limit})
    return [_entry(r) for r in rows]


_GET = text(f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = :tenant AND seq = :seq")
_GET_BY_ID = text(f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = :tenant AND entry_id = :entry_id")


async def get_entry(tx: TenantTx, seq: int) -> AuditEntry | None:
    row = (await tx.execute(_GET, {"tenant": tx.tenant, "seq": seq})).first()
    return None if row is None else _entry(row)


async def get_entry_by_id(tx: TenantTx, entry_id: uuid.UUID) -> AuditEntry | None:
    row = (await tx.execute(_GET_BY_ID, {"tenant": tx.tenant, "entry_id": entry_id})).first()
    return None if row is None else _entry(row)


_SCAN_FIRST = text(f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = :tenant ORDER BY seq LIMIT :limit")
_SCAN_NEXT = text(
    f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = :tenant AND seq > :after ORDER BY seq LIMIT :limit"
)


async def scan_entries(tx: TenantTx, after: int | None, limit: int) -> list[AuditEntry]:
    """The next ``limit`` stored rows in seq order after ``after`` (all rows, whatever their seq)."""
    if after is None:
        rows = await tx.execute(_SCAN_FIRST, {"tenant": tx.tenant, "limit": limit})
    else:
        rows = await tx.execute(_SCAN_NEXT, {"tenant": tx.tenant, "after": after, "limit": limit})
    return [_entry(r) for r in rows]


_LEAVES = text(
    "SELECT count(*), min(seq), max(seq), string_agg(leaf_hash, ''::bytea ORDER BY seq) FROM audit_entries "
    "WHERE tenant_id = :tenant AND seq >= :start AND seq < :stop"
)


class LeafGapError(RuntimeError):
    """Stored leaves are not contiguous (an entry is missing or has a malformed leaf hash)."""


async def packed_leaves(tx: TenantTx, start: int, stop: int) -> bytes:
    """The stored leaf hashes of entries ``start..stop-1``, back to back; all must exist."""
    if stop <= start:
        return b""
    count, low, high, packed = (await tx.execute(_LEAVES, {"tenant": tx.tenant, "start": start, "stop": stop})).one()
    data = bytes(packed or b"")
    if count != stop - start or low != start or high != stop - 1 or len(data) != 32 * (stop - start):
        raise LeafGapError(f"entries {start}..{stop - 1} are not all present with 32-byte leaf hashes")
    return data


_HEAD = text("SELECT seq, entry_hash, prev_hash, updated_at FROM audit_heads WHERE tenant_id = :tenant")


async def head(tx: TenantTx) -> HeadRow | None:
    row = (await tx.execute(_HEAD, {"tenant": tx.tenant})).first()
    return None if row is None else HeadRow(int(row[0]), bytes(row[1]), bytes(row[2]), row[3])


_CP_COLUMNS = "tenant_id, tree_size, root_hash, signed_at, signature, key_id"


def _checkpoint(row: Sequence[Any]) -> CheckpointRow:
    return CheckpointRow(row[0], int(row[1]), bytes(row[2]), row[3], bytes(row[4]), row[5])


_LATEST_CP = text(
    f"SELECT {_CP_COLUMNS} FROM audit_checkpoints WHERE tenant_id = :tenant ORDER BY tree_size DESC LIMIT 1"
)
_CP_AT = text(f"SELECT {_CP_COLUMNS} FROM audit_checkpoints WHERE tenant_id = :tenant AND tree_size = :size")
_CP_LIST = text(
    f"SELECT {_CP_COLUMNS} FROM audit_checkpoints WHERE tenant_id = :tenant AND tree_size > :after "
    "ORDER BY tree_size LIMIT :limit"
)


async def latest_checkpoint(tx: TenantTx) -> CheckpointRow | None:
    row = (await tx.execute(_LATEST_CP, {"tenant": tx.tenant})).first()
    return None if row is None else _checkpoint(row)


async def checkpoint_at(tx: TenantTx, tree_size: int) -> CheckpointRow | None:
    row = (await tx.execute(_CP_AT, {"tenant": tx.tenant, "size": tree_size})).first()
    return None if row is None else _checkpoint(row)


async def list_checkpoints(tx: TenantTx, after_size: int = -1, limit: int | None = None) -> list[CheckpointRow]:
    params = {"tenant": tx.tenant, "after": after_size, "limit": limit}
    return [_checkpoint(r) for r in await tx.execute(_CP_LIST, params)]


_INSERT_CP = text(
    "INSERT INTO audit_checkpoints (tenant_id, tree_size, root_hash, signed_at, signature, key_id) "
    "VALUES (:tenant, :size, :root, :signed_at, :signature, :key_id) ON CONFLICT (tenant_id, tree_size) DO NOTHING"
)


async def insert_checkpoint(tx: TenantTx, checkpoint: CheckpointRow) -> bool:
    """Store a checkpoint; False if one of that size exists already (another signer was first)."""
    result = await tx.execute(
        _INSERT_CP,
        {
            "tenant": checkpoint.tenant_id,
            "size": checkpoint.tree_size,
            "root": checkpoint.root_hash,
            "signed_at": checkpoint.signed_at,
            "signature": checkpoint.signature,
            "key_id": checkpoint.key_id,
        },
    )
    return bool(result.rowcount)


_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended('firstmile.audit.checkpoint:' || :tenant, 0))")


async def try_checkpoint_lock(tx: TenantTx) -> bool:
    """A transaction-scoped lock that keeps two checkpointers off one tenant at a time."""
    return bool((await tx.execute(_LOCK, {"tenant": str(tx.tenant)})).scalar_one())


_PENDING = text("SELECT tenant_id, log_size, checkpoint_size FROM firstmile_audit_pending(:entries, :seconds)")


async def pending_tenants(
    conn: AsyncConnection, every_entries: int, every_seconds: float
) -> list[tuple[uuid.UUID, int, int]]:
    """Tenants with entries beyond their last checkpoint that are due one (any tenant; no context needed)."""
    rows = await conn.execute(_PENDING, {"entries": every_entries, "seconds": every_seconds})
    return [(r[0], int(r[1]), int(r[2])) for r in rows]
