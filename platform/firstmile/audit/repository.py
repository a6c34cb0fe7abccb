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

from firstmile.audit.canonical import GENESIS, TIMESTAMP_SQL_FORMAT, canonical_entry, loads
from firstmile.kit.db import TenantTx

_TS = f"to_char({{0}} AT TIME ZONE 'UTC', '{TIMESTAMP_SQL_FORMAT}')"


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

    def canonical(self) -> bytes:
        """The canonical bytes recomputed from the content (never read from storage)."""
        return canonical_entry(
            self.tenant_id, self.seq, self.kind, self.actor, self.subject, self.payload, self.created_at
        )


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


# The head upsert takes the tenant's head row lock (or creates it) and computes the new entry's
# hashes from the locked row, so appends are serialised per tenant and chained in one statement.
# The canonical text is assembled as parts[0] || created_at || parts[1] || seq || parts[2]
# (canonical.canonical_parts); statement_timestamp() is stable within the statement.
_APPEND = text(
    f"""
    WITH head AS (
      INSERT INTO audit_heads AS h (tenant_id, seq, entry_hash, prev_hash, updated_at)
      VALUES (
        :tenant, 0,
        sha256(CAST(:genesis AS bytea) || convert_to(
          CAST(:p0 AS text) || {_TS.format("statement_timestamp()")} || CAST(:p1 AS text) || '0'
            || CAST(:p2 AS text), 'UTF8')),
        CAST(:genesis AS bytea), statement_timestamp())
      ON CONFLICT (tenant_id) DO UPDATE SET
        seq = h.seq + 1,
        prev_hash = h.entry_hash,
        entry_hash = sha256(h.entry_hash || convert_to(
          CAST(:p0 AS text) || {_TS.format("excluded.updated_at")} || CAST(:p1 AS text) || (h.seq + 1)::text
            || CAST(:p2 AS text), 'UTF8')),
        updated_at = excluded.updated_at
      RETURNING h.seq, h.prev_hash, h.entry_hash, h.updated_at
    )
    INSERT INTO audit_entries
      (tenant_id, seq, kind, actor, subject, payload, created_at, prev_hash, entry_hash, leaf_hash)
    SELECT :tenant, head.seq, :kind, :actor, :subject, CAST(:payload AS jsonb), head.updated_at,
           head.prev_hash, head.entry_hash,
           sha256(decode('00', 'hex') || convert_to(
             CAST(:p0 AS text) || {_TS.format("head.updated_at")} || CAST(:p1 AS text) || head.seq::text
               || CAST(:p2 AS text), 'UTF8'))
    FROM head
    RETURNING seq, created_at, prev_hash, entry_hash, leaf_hash
    """
)


async def append_entry(
    tx: TenantTx,
    kind: str,
    actor: str,
    subject: str,
    payload_jcs: str,
    parts: tuple[str, str, str],
) -> tuple[int, datetime, bytes, bytes, bytes]:
    """Insert the next entry of the tenant's chain: (seq, created_at, prev_hash, entry_hash, leaf_hash)."""
    row = (
        await tx.execute(
            _APPEND,
            {
                "tenant": tx.tenant,
                "genesis": GENESIS,
                "p0": parts[0],
                "p1": parts[1],
                "p2": parts[2],
                "kind": kind,
                "actor": actor,
                "subject": subject,
                "payload": payload_jcs,
            },
        )
    ).one()
    return int(row[0]), row[1], bytes(row[2]), bytes(row[3]), bytes(row[4])


_COLUMNS = "tenant_id, seq, kind, actor, subject, payload::text, created_at, prev_hash, entry_hash, leaf_hash"


def _entry(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        row[0], int(row[1]), row[2], row[3], row[4], loads(row[5]), row[6], bytes(row[7]), bytes(row[8]),
        bytes(row[9]),
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


async def latest_entries(tx: TenantTx, kind: str | None, limit: int) -> list[AuditEntry]:
    """The newest ``limit`` entries (of ``kind`` when given), newest first: the admin UI's audit viewer."""
    where = "tenant_id = :tenant" + (" AND kind = :kind" if kind is not None else "")
    sql = f"SELECT {_COLUMNS} FROM audit_entries WHERE {where} ORDER BY seq DESC LIMIT :limit"
    rows = await tx.execute(text(sql), {"tenant": tx.tenant, "kind": kind, "limit": limit})
    return [_entry(r) for r in rows]


_GET = text(f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = :tenant AND seq = :seq")


async def get_entry(tx: TenantTx, seq: int) -> AuditEntry | None:
    row = (await tx.execute(_GET, {"tenant": tx.tenant, "seq": seq})).first()
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
