"""Appending to the audit log, sequencing it, signed checkpoints and proofs.

:func:`append` runs inside the caller's tenant transaction (a
:class:`~firstmile.kit.db.TenantTx`), so an entry commits or rolls back with the change it
describes. It never commits and takes no shared lock: it queues the entry with its leaf
hash, and the :class:`Sequencer` (its own process in production, a task of ``serve`` in
embedded mode) gives queued entries their place in the tenant's chain and Merkle tree in
batches, within the maximum merge delay (docs/audit.md). Other slices write entries only
through :func:`append` and read them through :class:`AuditService`; the audit tables and
repository are this slice's own.
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
    canonical_v2,
    entry_hash,
    format_timestamp,
    jcs,
    leaf_hash,
)
from firstmile.audit.merkle import MerkleTree
from firstmile.audit.repository import AuditEntry, CheckpointRow, Placed, QueuedEntry
from firstmile.audit.signing import AuditSigner, checkpoint_body
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext
from firstmile.kit.telemetry import AUDIT_MERGE_DELAY, AUDIT_QUEUE_OLDEST, AUDIT_SEQUENCED, AUDIT_SEQUENCER_FAILURES
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


class PendingError(AuditError):
    """The entry is queued: it has its leaf hash but no place in the log (and so no proof) yet."""

    def __init__(self, entry: QueuedEntry) -> None:
        super().__init__(f"entry {entry.entry_id} is queued and not yet sequenced")
        self.entry = entry


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
        raise ValueError(f"audit {name} must be a string of at most {MAX_TEXT} characters without NUL")


class _StrictClock:
    """UTC now, strictly increasing within the process (by a microsecond when the clock has not moved
    or went back), so the entries one transaction queues keep their order in the log."""

    def __init__(self) -> None:
        self._last = datetime.min.replace(tzinfo=UTC)

    def now(self) -> datetime:
        moment = datetime.now(UTC)
        if moment <= self._last:
            moment = self._last + timedelta(microseconds=1)
        self._last = moment
        return moment


_clock = _StrictClock()


async def append(tx: TenantTx, kind: str, actor: str, subject: str, payload: Any) -> QueuedEntry:
    """Queue one entry in the caller's transaction (one round trip, no shared lock).

    The entry gets its id, time and leaf hash here; the sequencer gives it its ``seq``
    after the caller commits. Raises :class:`ValueError` for an invalid kind, text or payload.
    """
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise ValueError(f"audit kind {kind!r} must match {KIND_PATTERN.pattern}")
    _check_text("actor", actor)
    _check_text("subject", subject)
    payload_jcs = jcs(payload, strict=True)
    if len(payload_jcs.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"audit payload exceeds {MAX_PAYLOAD_BYTES} bytes in canonical form")
    tenant = uuid.UUID(str(tx.tenant))
    entry_id = uuid.uuid4()
    created_at = _clock.now()
    leaf = leaf_hash(canonical_v2(tenant, entry_id, kind, actor, subject, payload_jcs, format_timestamp(created_at)))
    await repo.queue_entry(tx, entry_id, created_at, kind, actor, subject, payload_jcs, leaf)
    return QueuedEntry(tenant, entry_id, kind, actor, subject, payload_jcs, created_at, leaf)


async def sequence_next(tx: TenantTx, batch_size: int) -> list[Placed] | None:
    """Give the tenant's oldest ``batch_size`` queued entries their place in the log, in ``tx``.

    Returns the placed entries (empty when nothing is queued), or None when another sequencer
    holds the tenant. Each entry's leaf hash is recomputed from the queued content first: a
    queued row that no longer matches its hash stops the tenant's log there
    (:class:`AuditIntegrityError`), since it can neither be placed nor removed.
    """
    if not await repo.try_sequence_lock(tx):
        return None
    head = await repo.lock_head(tx)
    queued = await repo.next_queued(tx, batch_size)
    if not queued:
        return []
    seq, prev = (head[0] + 1, head[1]) if head is not None else (0, GENESIS)
    placed: list[Placed] = []
    for q in queued:
        canonical = q.checked_canonical()
        if canonical is None:
            raise AuditIntegrityError(f"queued entry {q.entry_id}: its content no longer matches its leaf hash")
        digest = entry_hash(prev, canonical)
        placed.append(Placed(q, seq, prev, digest))
        seq, prev = seq + 1, digest
    await repo.sequence_batch(tx, placed)
    return placed


class Sequencer:
    """Moves queued entries into their tenants' logs, in batches (run it as a background loop).

    It runs as the application role: ``firstmile_audit_queued`` names the tenants with
    queued entries, and each tenant is sequenced in transactions of its own, under the
    worker's operator context, ``batch_size`` entries at a time until its queue is empty.
    Several sequencers may run (replicas, or one per process in embedded mode): a per-tenant
    advisory lock and the head row lock give each tenant one sequencer at a time, so the
    tenant is the shard. A sequencer killed mid-batch loses its transaction and nothing else:
    the entries stay queued until the next one takes them.
    """

    context = OperatorContext("worker:audit-sequencer")

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = 1000,
        poll_seconds: float = 0.1,
        concurrency: int = 4,
    ) -> None:
        if batch_size < 1 or poll_seconds <= 0 or concurrency < 1:
            raise ValueError("batch_size >= 1, poll_seconds > 0 and concurrency >= 1")
        self.engine = engine
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.sequenced = 0
        """Entries this sequencer has placed since it started."""
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.failing: set[uuid.UUID] = set()
        """Tenants whose last batch failed (an integrity check, or an error): logged once, retried each poll."""

    async def sequence_tenant(self, tenant: uuid.UUID) -> int:
        """Sequence everything queued for ``tenant`` now; the count (0 when another sequencer has it)."""
        uow = UnitOfWork(self.engine, self.context.tenant(tenant))
        total = 0
        while True:

            async def work(tx: TenantTx) -> list[Placed] | None:
                return await sequence_next(tx, self.batch_size)

            try:
                placed = await uow.run(work)
            except AuditIntegrityError as exc:
                AUDIT_SEQUENCER_FAILURES.inc()
                if tenant not in self.failing:
                    log.error(
                        "audit queue failed its check; the tenant's log is not extended",
                        extra={"fields": {"tenant": str(tenant), "error": str(exc)}},
                    )
                self.failing.add(tenant)
                return total
            self.failing.discard(tenant)
            if not placed:
                return total
            now = datetime.now(UTC)
            for p in placed:
                AUDIT_MERGE_DELAY.observe(max(0.0, (now - p.entry.created_at).total_seconds()))
            AUDIT_SEQUENCED.inc(len(placed))
            self.sequenced += len(placed)
            total += len(placed)
            if len(placed) < self.batch_size:
                return total

    async def run_once(self) -> int:
        """One pass over every tenant with queued entries; the number of entries sequenced."""
        queued = await across_tenants(self.engine, repo.queued_tenants)
        now = datetime.now(UTC)
        oldest = min((at for _, _, at in queued), default=None)
        AUDIT_QUEUE_OLDEST.set(0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()))
        if not queued:
            return 0
        gate = asyncio.Semaphore(self.concurrency)

        async def one(tenant: uuid.UUID) -> int:
            async with gate:
                try:
                    return await self.sequence_tenant(tenant)
                except Exception:  # one tenant's failure (its database answer, its data) holds up no other
                    if tenant not in self.failing:
                        log.exception("audit sequencer failed for a tenant", extra={"fields": {"tenant": str(tenant)}})
                    self.failing.add(tenant)
                    return 0

        return sum(await asyncio.gather(*(one(tenant) for tenant, _, _ in queued)))

    def health(self) -> tuple[int, str | None]:
        """How many passes in a row failed (the database unreachable), and the last error: the supervisor
        reads it, so that readiness reports a sequencer that keeps failing (a tenant whose queue fails its
        check is not this: the others go on, and the integrity counter says it)."""
        return self.consecutive_failures, self.last_error

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``poll_seconds`` until ``stop``; failures are logged and retried."""
        while not stop.is_set():
            try:
                await self.run_once()
                self.consecutive_failures, self.last_error = 0, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                if self.consecutive_failures == 1:
                    log.exception("audit sequencer failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_seconds)


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
        due = await across_tenants(
            self.engine, lambda conn: repo.pending_tenants(conn, self.every_entries, self.every_seconds)
        )
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


async def inclusion_proof(
    tx: TenantTx, ref: int | uuid.UUID, tree_size: int | None, cache: TreeCache
) -> InclusionProof:
    """The audit path of an entry (by ``seq``, or by id) in the checkpoint of ``tree_size`` (default:
    the latest). An entry still queued raises :class:`PendingError`, which carries its leaf hash."""
    if isinstance(ref, uuid.UUID):
        entry = await repo.get_entry_by_id(tx, ref)
        if entry is None:
            queued = await repo.get_queued(tx, ref)
            if queued is not None:
                raise PendingError(queued)
            raise AuditNotFoundError("entry", f"no audit entry {ref}")
    else:
        entry = await repo.get_entry(tx, ref)
        if entry is None:
            raise AuditNotFoundError("entry", f"no audit entry {ref}")
    seq = entry.seq
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

    async def latest(
        self, tx: TenantTx, kind: str | None, limit: int, subject: str | None = None
    ) -> list[AuditEntry | QueuedEntry]:
        """The newest ``limit`` entries (of ``kind``, about ``subject``, when given), newest first, queued ones
        first."""
        return await latest_entries(tx, kind, limit, subject)

    async def checkpoints(self, tx: TenantTx, after_size: int, limit: int) -> list[CheckpointRow]:
        return await repo.list_checkpoints(tx, after_size, limit)

    async def inclusion_proof(self, tx: TenantTx, ref: int | uuid.UUID, tree_size: int | None) -> InclusionProof:
        return await inclusion_proof(tx, ref, tree_size, self.cache)

    async def consistency_proof(self, tx: TenantTx, first: int, second: int) -> ConsistencyProof:
        return await consistency_proof(tx, first, second, self.cache)


async def latest_entries(
    tx: TenantTx, kind: str | None, limit: int, subject: str | None = None
) -> list[AuditEntry | QueuedEntry]:
    """The newest ``limit`` entries (of ``kind``, about ``subject``, when given), newest first, the queued
    (``seq`` None) before the sequenced: the admin UI's viewer."""
    queued: list[AuditEntry | QueuedEntry] = list(await repo.latest_queued(tx, kind, limit, subject))
    return (queued + list(await repo.latest_entries(tx, kind, limit, subject)))[:limit]


async def entries_about(tx: TenantTx, subject: str, limit: int) -> list[AuditEntry | QueuedEntry]:
    """Entries whose subject is ``subject`` (an end user's id, say), in seq order, then the queued
    ones (``seq`` None): for exports."""
    entries: list[AuditEntry | QueuedEntry] = list(await repo.list_entries(tx, EntryFilter(subject=subject), limit))
    return (entries + list(await repo.queued_about(tx, subject, limit)))[:limit]
