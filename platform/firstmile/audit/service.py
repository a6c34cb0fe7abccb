"""Appending to the audit log, signed checkpoints and proofs.

:func:`append` runs inside the caller's tenant transaction (a
:class:`~firstmile.kit.db.TenantTx`), so an entry commits or rolls back with the change it
describes. It never commits. Other slices write entries only through :func:`append` and
read them through :class:`AuditService`; the audit tables and repository are this slice's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import repository as repo
from firstmile.audit.canonical import (
    GENESIS,
    canonical_parts,
    entry_hash,
    format_timestamp,
    jcs,
    leaf_hash,
    loads,
)
from firstmile.audit.merkle import MerkleTree
from firstmile.audit.repository import AuditEntry, CheckpointRow
from firstmile.audit.signing import AuditSigner, checkpoint_body
from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork

log = logging.getLogger("firstmile.audit")

KINDS = ("decision", "admin", "auth", "key", "erasure", "export")
"""The kinds the platform writes; others that match :data:`KIND_PATTERN` are accepted too."""
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_TEXT = 1024
MAX_PAYLOAD_BYTES = 256 * 1024
SCAN_BATCH = 5000


class AuditError(RuntimeError):
    """An audit operation cannot proceed."""


class AuditIntegrityError(AuditError):
    """The stored log contradicts itself or a signed checkpoint: nothing is signed or served."""


class AuditNotFoundError(AuditError):
    """An entry or checkpoint that the request names does not exist."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(detail)
        self.what = what


class NotCheckpointedError(AuditError):
    """The entry exists but no checkpoint covers it yet."""


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
        raise ValueError(f"audit {name} must be a string of at most {MAX_TEXT} characters without NUL")


async def append(tx: TenantTx, kind: str, actor: str, subject: str, payload: Any) -> AuditEntry:
    """Append one entry to the tenant's chain in the caller's transaction (one round trip).

    Appends of one tenant are serialised by the row lock on its ``audit_heads`` row,
    held until the caller's transaction ends: keep audited transactions short.
    Raises :class:`ValueError` for an invalid kind, text or payload.
    """
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise ValueError(f"audit kind {kind!r} must match {KIND_PATTERN.pattern}")
    _check_text("actor", actor)
    _check_text("subject", subject)
    payload_jcs = jcs(payload, strict=True)
    if len(payload_jcs.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"audit payload exceeds {MAX_PAYLOAD_BYTES} bytes in canonical form")
    tenant = tx.tenant
    parts = canonical_parts(tenant, kind, actor, subject, payload_jcs)
    seq, created_at, prev, stored_entry, stored_leaf = await repo.append_entry(
        tx, kind, actor, subject, payload_jcs, parts
    )
    canonical = (parts[0] + format_timestamp(created_at) + parts[1] + str(seq) + parts[2]).encode("utf-8")
    if entry_hash(prev, canonical) != stored_entry or leaf_hash(canonical) != stored_leaf:
        # the database and this code disagree on the encoding: fail the caller's transaction
        raise AuditIntegrityError(f"audit entry {seq}: hashes computed in the database do not match")
    return AuditEntry(
        tenant, seq, kind, actor, subject, loads(payload_jcs), created_at, prev, stored_entry, stored_leaf
    )


class TreeCache:
    """Per-process Merkle trees of tenants' stored leaf hashes, grown on demand, LRU-bounded.

    A tree only grows: entries are immutable, so a prefix once read stays valid.
    ``max_leaves`` bounds the leaves held over all tenants (about 64 bytes each);
    the tree being used is never evicted.
    """

    def __init__(self, max_leaves: int = 4_000_000, chunk: int = 1 << 18) -> None:
        self.max_leaves = max_leaves
        self.chunk = chunk
        self._trees: OrderedDict[uuid.UUID, MerkleTree] = OrderedDict()
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}

    async def tree(self, tx: TenantTx, size: int) -> MerkleTree:
        """The tenant's tree with at least ``size`` leaves (entries ``0..size-1`` must exist)."""
        tenant_id: uuid.UUID = tx.tenant
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            tree = self._trees.get(tenant_id)
            if tree is None:
                tree = MerkleTree()
                self._trees[tenant_id] = tree
            self._trees.move_to_end(tenant_id)
            while tree.size < size:
                stop = min(size, tree.size + self.chunk)
                try:
                    packed = await repo.packed_leaves(tx, tree.size, stop)
                except repo.LeafGapError as exc:
                    raise AuditIntegrityError(str(exc)) from exc
                tree.extend_packed(packed)
            self._evict(keep=tenant_id)
            return tree

    def _evict(self, keep: uuid.UUID) -> None:
        total = sum(t.size for t in self._trees.values())
        for tenant in list(self._trees):
            if total <= self.max_leaves:
                break
            if tenant != keep:
                total -= self._trees.pop(tenant).size

    def forget(self, tenant_id: uuid.UUID) -> None:
        self._trees.pop(tenant_id, None)


async def _has_written(tx: TenantTx) -> bool:
    return (await tx.execute(text("SELECT pg_current_xact_id_if_assigned() IS NOT NULL"))).scalar_one() is True


async def _check_new_entries(tx: TenantTx, start: int, size: int) -> None:
    """Recompute the chain of entries ``start..size-1`` before signing over them."""
    if start == 0:
        prev = GENESIS
    else:
        before = await repo.get_entry(tx, start - 1)
        if before is None:
            raise AuditIntegrityError(f"entry {start - 1}, the last one checkpointed, is missing")
        prev = before.entry_hash
    expected, after = start, start - 1
    while expected < size:
        batch = await repo.scan_entries(tx, after, min(SCAN_BATCH, size - expected))
        if not batch:
            raise AuditIntegrityError(f"entry {expected} is missing")
        for entry in batch:
            if entry.seq != expected:
                raise AuditIntegrityError(f"entry {expected} is missing (found {entry.seq})")
            canonical = entry.canonical()
            if entry.prev_hash != prev or entry_hash(prev, canonical) != entry.entry_hash:
                raise AuditIntegrityError(f"entry {expected} does not chain to entry {expected - 1}")
            if leaf_hash(canonical) != entry.leaf_hash:
                raise AuditIntegrityError(f"entry {expected}: stored leaf hash does not match its content")
            prev, expected, after = entry.entry_hash, expected + 1, entry.seq


async def create_checkpoint(
    tx: TenantTx,
    signer: AuditSigner,
    cache: TreeCache | None = None,
    *,
    check_entries: bool = True,
) -> CheckpointRow | None:
    """Sign a checkpoint over the tenant's whole log, if it grew since the last one.

    Run it in a transaction of its own (it refuses one that has written: a tree
    cached from uncommitted leaves could outlive a rollback). Returns None when
    there is nothing new, or another checkpointer holds the tenant. Before signing,
    the new entries' chain is recomputed (``check_entries``) and the tree is checked
    against the last signed root; a mismatch raises :class:`AuditIntegrityError`.
    """
    tenant = tx.tenant
    if await _has_written(tx):
        raise AuditError("create_checkpoint needs a transaction that has not written")
    if not await repo.try_checkpoint_lock(tx):
        return None
    current = await repo.head(tx)
    if current is None:
        return None
    size = current.seq + 1
    latest = await repo.latest_checkpoint(tx)
    if latest is not None and latest.tree_size > size:
        raise AuditIntegrityError(f"the log has {size} entries but checkpoint {latest.tree_size} covers more")
    if latest is not None and latest.tree_size == size:
        return None
    start = 0 if latest is None else latest.tree_size
    if check_entries:
        await _check_new_entries(tx, start, size)
    tree = await (cache or TreeCache()).tree(tx, size)
    if latest is not None and tree.root(latest.tree_size) != latest.root_hash:
        raise AuditIntegrityError(f"stored entries no longer hash to the root signed at size {latest.tree_size}")
    root = tree.root(size)
    signed_at = datetime.now(UTC)
    body = checkpoint_body(tenant, size, root, signed_at)
    checkpoint = CheckpointRow(tenant, size, root, signed_at, signer.sign(body), signer.key_id)
    if not await repo.insert_checkpoint(tx, checkpoint):
        return None
    log.info("audit checkpoint signed", extra={"fields": {"tenant": str(tenant), "tree_size": size}})
    return checkpoint


async def maybe_checkpoint(
    tx: TenantTx,
    signer: AuditSigner,
    cache: TreeCache | None = None,
    *,
    every_entries: int = 1000,
    every_seconds: float = 60.0,
) -> CheckpointRow | None:
    """Checkpoint when ``every_entries`` entries are unsigned, or the oldest unsigned entry is
    ``every_seconds`` old: no entry waits longer than that (plus the polling interval)."""
    current = await repo.head(tx)
    if current is None:
        return None
    latest = await repo.latest_checkpoint(tx)
    signed = latest.tree_size if latest else 0
    unsigned = current.seq + 1 - signed
    if unsigned <= 0:
        return None
    due = unsigned >= every_entries
    if not due:
        oldest = await repo.get_entry(tx, signed)
        due = oldest is not None and datetime.now(UTC) - oldest.created_at >= timedelta(seconds=every_seconds)
    return await create_checkpoint(tx, signer, cache) if due else None


class Checkpointer:
    """The background loop that checkpoints every tenant due one (run it in the app's lifespan).

    It runs as the application role: ``firstmile_audit_pending`` names the tenants due a
    checkpoint, and each is checkpointed in its own tenant transaction, under the worker's
    operator context. Several processes may run one; a per-tenant advisory lock keeps them
    from signing twice.
    """

    context = OperatorContext("worker:audit-checkpointer")

    def __init__(
        self,
        engine: AsyncEngine,
        signer: AuditSigner,
        cache: TreeCache | None = None,
        *,
        every_entries: int = 1000,
        every_seconds: float = 60.0,
        poll_seconds: float | None = None,
    ) -> None:
        self.engine = engine
        self.signer = signer
        self.cache = cache or TreeCache()
        self.every_entries = every_entries
        self.every_seconds = every_seconds
        self.poll_seconds = poll_seconds if poll_seconds is not None else min(every_seconds, 5.0)

    async def run_once(self) -> list[CheckpointRow]:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            due = await repo.pending_tenants(conn, self.every_entries, self.every_seconds)
        signed: list[CheckpointRow] = []
        for tenant, _, _ in due:

            async def work(tx: TenantTx) -> CheckpointRow | None:
                return await create_checkpoint(tx, self.signer, self.cache)

            try:
                checkpoint = await UnitOfWork(self.engine, self.context.tenant(tenant)).run(work)
            except AuditIntegrityError as exc:
                log.error("audit log failed its check; not signing", extra={"fields": {"tenant": str(tenant)}})
                log.debug("integrity failure", exc_info=exc)
                continue
            if checkpoint is not None:
                signed.append(checkpoint)
        return signed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("audit checkpointer failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    entry: AuditEntry
    checkpoint: CheckpointRow
    path: list[bytes]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    first: CheckpointRow
    second: CheckpointRow
    path: list[bytes]


async def inclusion_proof(tx: TenantTx, seq: int, tree_size: int | None, cache: TreeCache) -> InclusionProof:
    """The audit path of entry ``seq`` in the checkpoint of ``tree_size`` (default: the latest)."""
    entry = await repo.get_entry(tx, seq)
    if entry is None:
        raise AuditNotFoundError("entry", f"no audit entry {seq}")
    if tree_size is None:
        checkpoint = await repo.latest_checkpoint(tx)
        if checkpoint is None:
            raise NotCheckpointedError(f"entry {seq} is not in a checkpoint yet")
    else:
        checkpoint = await repo.checkpoint_at(tx, tree_size)
        if checkpoint is None:
            raise AuditNotFoundError("checkpoint", f"no checkpoint of tree size {tree_size}")
    if seq >= checkpoint.tree_size:
        raise NotCheckpointedError(f"entry {seq} is not in the checkpoint of tree size {checkpoint.tree_size}")
    tree = await cache.tree(tx, checkpoint.tree_size)
    if tree.root(checkpoint.tree_size) != checkpoint.root_hash:
        raise AuditIntegrityError(f"stored entries do not hash to the root signed at size {checkpoint.tree_size}")
    return InclusionProof(entry, checkpoint, tree.inclusion_proof(seq, checkpoint.tree_size))


async def consistency_proof(tx: TenantTx, first: int, second: int, cache: TreeCache) -> ConsistencyProof:
    """The consistency proof between the checkpoints of sizes ``first`` and ``second``."""
    checkpoints = []
    for size in (first, second):
        checkpoint = await repo.checkpoint_at(tx, size)
        if checkpoint is None:
            raise AuditNotFoundError("checkpoint", f"no checkpoint of tree size {size}")
        checkpoints.append(checkpoint)
    tree = await cache.tree(tx, second)
    for checkpoint in checkpoints:
        if tree.root(checkpoint.tree_size) != checkpoint.root_hash:
            raise AuditIntegrityError(f"stored entries do not hash to the root signed at size {checkpoint.tree_size}")
    return ConsistencyProof(checkpoints[0], checkpoints[1], tree.consistency_proof(first, second))


EntryFilter = repo.EntryFilter


@dataclass
class AuditService:
    """The audit log as the rest of the platform reads it: entries, proofs, checkpoints and the
    region's signer (for its public key), with the process's Merkle tree cache.

    Writing is :func:`append`, in the writer's own transaction.
    """

    signer: AuditSigner
    cache: TreeCache

    @classmethod
    def create(cls, signer: AuditSigner, max_cached_leaves: int = 4_000_000) -> AuditService:
        return cls(signer, TreeCache(max_cached_leaves))

    async def entries(self, tx: TenantTx, where: EntryFilter, limit: int) -> list[AuditEntry]:
        """Entries in seq order matching ``where``, at most ``limit``."""
        return await repo.list_entries(tx, where, limit)

    async def latest(self, tx: TenantTx, kind: str | None, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``kind`` when given), newest first."""
        return await latest_entries(tx, kind, limit)

    async def checkpoints(self, tx: TenantTx, after_size: int, limit: int) -> list[CheckpointRow]:
        return await repo.list_checkpoints(tx, after_size, limit)

    async def inclusion_proof(self, tx: TenantTx, seq: int, tree_size: int | None) -> InclusionProof:
        return await inclusion_proof(tx, seq, tree_size, self.cache)

    async def consistency_proof(self, tx: TenantTx, first: int, second: int) -> ConsistencyProof:
        return await consistency_proof(tx, first, second, self.cache)


async def latest_entries(tx: TenantTx, kind: str | None, limit: int) -> list[AuditEntry]:
    """The newest ``limit`` entries (of ``kind`` when given), newest first: the admin UI's viewer."""
    return await repo.latest_entries(tx, kind, limit)


async def entries_about(tx: TenantTx, subject: str, limit: int) -> list[AuditEntry]:
    """Entries whose subject is ``subject`` (an end user's id, say), in seq order: for exports."""
    return await repo.list_entries(tx, EntryFilter(subject=subject), limit)
