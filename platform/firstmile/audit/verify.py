"""``firstmile audit verify``: recompute a tenant's log and check it against its signed checkpoints.

What is checked, in one REPEATABLE READ snapshot:

1. the hash chain from seq 0: every seq present once and in order (gaps, inserted
   or renumbered rows), ``prev_hash`` links to the previous entry's hash, and
   ``entry_hash`` and ``leaf_hash`` match the canonical encoding recomputed from
   the content (modified rows, swapped rows);
2. the head row agrees with the last entry (a truncated or extended tail);
3. every checkpoint's Ed25519 signature, under a trusted public key;
4. every checkpoint's root, recomputed from the recomputed leaf hashes (a
   checkpoint larger than the log means its tail was truncated);
5. a consistency proof between each pair of consecutive checkpoints;
6. inclusion of every entry in the latest checkpoint: recomputing its root from
   every leaf establishes it for all entries at once, and audit paths are also
   verified for ``proof_samples`` entries (all with ``all_proofs``);
7. every queued (not yet sequenced) entry: its leaf hash recomputed from its content,
   and its id not already in the log.

The report names the first bad entry (lowest seq) and why.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import repository as repo
from firstmile.audit.canonical import (
    GENESIS,
    CanonicalError,
    canonical_entry,
    entry_hash,
    leaf_hash,
    parse_timestamp,
)
from firstmile.audit.merkle import MerkleTree, verify_consistency, verify_inclusion
from firstmile.audit.signing import checkpoint_body, key_id, verify_signature
from firstmile.kit.db import TenantTx, bind_tenant
from firstmile.kit.scope import TenantId

BATCH = 10_000
RECENT = 4096
"""Entry hashes remembered to recognise rows inserted into the chain."""
MAX_PROBLEMS = 100

Progress = Callable[[int, int], None]
"""Called with (entries checked, entries in the log) while the chain is recomputed."""


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int | None
    """The entry the problem shows at (None: it concerns a checkpoint only)."""
    reason: str
    detail: str
    checkpoint: int | None = None
    queued: uuid.UUID | None = None
    """A queued entry the problem concerns."""

    def __str__(self) -> str:
        if self.queued is not None:
            where = f"queued entry {self.queued}"
        else:
            where = f"entry {self.seq}" if self.seq is not None else f"checkpoint {self.checkpoint}"
        return f"{where}: {self.reason}: {self.detail}"


@dataclass
class VerifyReport:
    tenant_id: uuid.UUID
    entries: int = 0
    checkpoints: int = 0
    latest_checkpoint: int | None = None
    proofs_checked: int = 0
    queued: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    truncated_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> Problem | None:
        with_seq = [p for p in self.problems if p.seq is not None]
        if with_seq:
            return min(with_seq, key=lambda p: p.seq if p.seq is not None else 0)
        return self.problems[0] if self.problems else None

    @property
    def first_bad_seq(self) -> int | None:
        first = self.first_bad
        return None if first is None else first.seq

    @property
    def unsigned(self) -> int:
        return self.entries - (self.latest_checkpoint or 0)

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.truncated_problems += 1

    def summary(self) -> str:
        lines = [
            f"tenant {self.tenant_id}: {self.entries} entries, {self.checkpoints} checkpoints"
            f" (the latest verified covers {self.latest_checkpoint or 0} entries; {max(self.unsigned, 0)} not covered),"
            f" {self.proofs_checked} proofs verified, {self.queued} queued entries checked, {self.seconds:.2f}s"
        ]
        first = self.first_bad
        if first is None:
            lines.append("OK: chain, signatures, roots, consistency, inclusion and the queue verified")
        else:
            if first.seq is not None:
                lines.append(f"FAILED: first bad entry is seq {first.seq}: {first.reason}: {first.detail}")
            else:
                lines.append(f"FAILED: {first}")
            lines.extend(f"  {p}" for p in sorted(self.problems, key=_order))
            if self.truncated_problems:
                lines.append(f"  … and {self.truncated_problems} more")
        return "\n".join(lines)


def _order(p: Problem) -> tuple[int, int]:
    return (p.seq if p.seq is not None else 1 << 62, p.checkpoint or 0)


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


PLACEHOLDER = bytes(32)
"""The leaf put where an entry is missing, so that tree positions stay equal to seqs."""


async def _scan_chain(
    tx: TenantTx,
    report: VerifyReport,
    total: int,
    fill_up_to: int,
    progress: Progress | None,
) -> tuple[MerkleTree, repo.AuditEntry | None]:
    """Recompute the chain; returns the tree of recomputed leaves (position = seq) and the last entry."""
    tree = MerkleTree()
    expected, running, after = 0, GENESIS, None
    last: repo.AuditEntry | None = None
    leaves: list[bytes] = []
    recent: OrderedDict[bytes, int] = OrderedDict()
    rows, next_progress = 0, 0
    while True:
        batch = await repo.scan_entries(tx, after, BATCH)
        if not batch:
            break
        for entry in batch:
            rows += 1
            if entry.seq < expected:  # only a negative seq sorts before 0: a row outside the log
                report.add(Problem(entry.seq, "unexpected-seq", f"seq {entry.seq} where {expected} was expected"))
                after = entry.seq
                continue
            if entry.seq > expected:
                missing = (
                    f"entry {expected} is" if entry.seq == expected + 1 else f"entries {expected}..{entry.seq - 1} are"
                )
                report.add(Problem(expected, "missing", f"{missing} absent (the next stored is {entry.seq})"))
                gap = max(0, min(entry.seq, fill_up_to) - (tree.size + len(leaves)))
                leaves.extend([PLACEHOLDER] * gap)
            try:
                canonical = entry.canonical()
            except (CanonicalError, ValueError) as exc:
                report.add(Problem(entry.seq, "not-canonical", f"content has no canonical form ({exc})"))
                canonical = b""
            if entry.prev_hash != running:
                _explain_link(entry, recent, report)
                report.add(
                    Problem(entry.seq, "broken-link", "prev_hash is not the hash of the entry before it in the log")
                )
            if entry_hash(entry.prev_hash, canonical) != entry.entry_hash:
                report.add(Problem(entry.seq, "content-mismatch", "entry_hash does not match the recomputed content"))
            leaf = leaf_hash(canonical)
            if entry.leaf_hash != leaf:
                report.add(Problem(entry.seq, "leaf-mismatch", "stored leaf hash does not match the content"))
            if entry.seq < fill_up_to or tree.size + len(leaves) == entry.seq:
                leaves.append(leaf)
            # continue from what is stored, so later independent breaks are reported too
            running, expected, after, last = entry.entry_hash, entry.seq + 1, entry.seq, entry
            recent[entry.entry_hash] = entry.seq
            if len(recent) > RECENT:
                recent.popitem(last=False)
        tree.extend(leaves)
        leaves.clear()
        report.entries = rows
        if progress is not None and (rows >= next_progress or len(batch) < BATCH):
            progress(rows, total)
            next_progress = rows + 100_000
    return tree, last


def _explain_link(entry: repo.AuditEntry, recent: Mapping[bytes, int], report: VerifyReport) -> None:
    """A row that links to an earlier entry and hashes correctly at the seq right after it is that
    original entry, moved: the rows between it and its predecessor were inserted or moved there."""
    linked = recent.get(entry.prev_hash)
    if linked is None or linked >= entry.seq - 1:
        return
    original = linked + 1
    try:
        canonical = canonical_entry(
            entry.tenant_id, original, entry.kind, entry.actor, entry.subject, entry.payload, entry.created_at,
            entry.entry_id,
        )  # fmt: skip
    except (CanonicalError, ValueError):
        return
    if entry_hash(entry.prev_hash, canonical) == entry.entry_hash:
        report.add(
            Problem(
                original,
                "moved",
                f"entry {entry.seq} is the original entry {original} (it hashes at that seq and links to entry"
                f" {linked}): entries {original}..{entry.seq - 1} were inserted or moved",
            )
        )


async def verify_tenant_in(
    tx: TenantTx,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    progress: Progress | None = None,
    proof_samples: int = 256,
    all_proofs: bool = False,
    seed: int | None = None,
    known_checkpoints: Sequence[repo.CheckpointRow] = (),
) -> VerifyReport:
    """Verify in ``tx`` (the tenant's transaction, as the application role or the operator).

    ``known_checkpoints`` are checkpoints kept outside the database (by an auditor, a witness or an
    export): each is verified like a stored one, and one that the database lacks or holds
    differently is a problem in itself.
    """
    began = time.perf_counter()
    tenant = tx.tenant
    report = VerifyReport(tenant)
    total = int(
        (await tx.execute(text("SELECT count(*) FROM audit_entries WHERE tenant_id = :t"), {"t": tenant})).scalar_one()
    )
    checkpoints = await repo.list_checkpoints(tx)
    report.checkpoints = len(checkpoints)
    stored = {cp.tree_size: cp for cp in checkpoints}
    for known in known_checkpoints:
        held = stored.get(known.tree_size)
        if held == known:
            continue
        reason, detail = (
            ("checkpoint-missing", "a checkpoint held outside the database is not stored in it")
            if held is None
            else ("checkpoint-differs", "the stored checkpoint differs from the one held outside the database")
        )
        report.add(Problem(None, reason, detail, known.tree_size))
        checkpoints.append(known)
    checkpoints.sort(key=lambda cp: cp.tree_size)
    largest = max((cp.tree_size for cp in checkpoints), default=0)
    tree, last = await _scan_chain(tx, report, total, largest, progress)
    size = tree.size

    head = await repo.head(tx)
    if head is None and last is not None:
        report.add(Problem(0, "head-missing", "entries exist but the tenant has no head row"))
    elif head is not None and (last is None or head.seq != last.seq or head.entry_hash != last.entry_hash):
        if last is None or head.seq > last.seq:
            first_missing = 0 if last is None else last.seq + 1
            report.add(Problem(first_missing, "truncated", f"the head records seq {head.seq}; the log ends before it"))
        elif head.seq < last.seq:
            report.add(Problem(head.seq + 1, "unrecorded", f"entries after the head's seq {head.seq} were added"))
        else:
            report.add(Problem(last.seq, "head-mismatch", "the head's hash differs from the last entry's"))

    chain_bad = {p.seq for p in report.problems if p.seq is not None}
    good: list[repo.CheckpointRow] = []
    matched, mismatched = 0, False
    for cp in checkpoints:
        key = public_keys.get(cp.key_id)
        body = checkpoint_body(tenant, cp.tree_size, cp.root_hash, cp.signed_at)
        if key is None:
            report.add(Problem(None, "unknown-key", f"signed by key {cp.key_id}, not a trusted key", cp.tree_size))
            continue
        if not verify_signature(key, cp.signature, body):
            report.add(Problem(None, "bad-signature", "the signature does not verify", cp.tree_size))
            continue
        if cp.tree_size > size:
            report.add(
                Problem(
                    size,
                    "truncated",
                    f"signed checkpoint {cp.tree_size} covers entries {size}..{cp.tree_size - 1}, which are absent",
                    cp.tree_size,
                )
            )
            continue
        if tree.root(cp.tree_size) != cp.root_hash:
            # the first mismatching root places the change after the last matching one; it is
            # explained by a chain problem there, or else (a consistent rewrite) known only by range
            explained = mismatched or any(matched <= seq < cp.tree_size for seq in chain_bad)
            report.add(
                Problem(
                    None if explained else matched,
                    "root-mismatch",
                    f"the root signed at size {cp.tree_size} does not match the log"
                    + ("" if mismatched else f"; the change is in entries {matched}..{cp.tree_size - 1}"),
                    cp.tree_size,
                )
            )
            mismatched = True
            continue
        matched = cp.tree_size
        good.append(cp)
    report.latest_checkpoint = good[-1].tree_size if good else None

    for a, b in itertools.pairwise(good):
        proof = tree.consistency_proof(a.tree_size, b.tree_size)
        report.proofs_checked += 1
        if not verify_consistency(a.tree_size, b.tree_size, proof, a.root_hash, b.root_hash):
            report.add(Problem(a.tree_size, "inconsistent", f"checkpoint {b.tree_size} does not extend {a.tree_size}"))

    if good:
        latest = good[-1]
        indexes: Iterable[int]
        if all_proofs or latest.tree_size <= proof_samples:
            indexes = range(latest.tree_size)
        else:
            rng = random.Random(seed)
            picks = {0, latest.tree_size - 1, *rng.sample(range(latest.tree_size), proof_samples - 2)}
            indexes = sorted(picks)
        for index in indexes:
            path = tree.inclusion_proof(index, latest.tree_size)
            report.proofs_checked += 1
            if not verify_inclusion(tree.leaf(index), index, latest.tree_size, path, latest.root_hash):
                report.add(Problem(index, "not-included", f"not included in checkpoint {latest.tree_size}"))
    await _check_queue(tx, report)
    report.seconds = time.perf_counter() - began
    return report


_QUEUED_IN_LOG = text(
    "SELECT q.entry_id FROM audit_queue q JOIN audit_entries e ON e.tenant_id = q.tenant_id "
    "AND e.entry_id = q.entry_id WHERE q.tenant_id = :t"
)


async def _check_queue(tx: TenantTx, report: VerifyReport) -> None:
    """Queued entries must hash to their leaf hash, and none may be in the log already."""
    while True:
        batch = await repo.next_queued(tx, BATCH, report.queued)
        for q in batch:
            try:
                canonical = q.checked_canonical()
            except (CanonicalError, ValueError) as exc:
                report.add(Problem(None, "not-canonical", f"content has no canonical form ({exc})", queued=q.entry_id))
                continue
            if canonical is None:
                report.add(
                    Problem(None, "queued-mismatch", "its content does not match its leaf hash", queued=q.entry_id)
                )
        report.queued += len(batch)
        if len(batch) < BATCH:
            break
    for (entry_id,) in await tx.execute(_QUEUED_IN_LOG, {"t": tx.tenant}):
        report.add(Problem(None, "queued-twice", "it is queued and also in the log", queued=entry_id))


async def verify_tenant(
    engine: AsyncEngine,
    tenant_id: TenantId,
    public_keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey],
    *,
    progress: Progress | None = None,
    proof_samples: int = 256,
    all_proofs: bool = False,
    known_checkpoints: Sequence[repo.CheckpointRow] = (),
) -> VerifyReport:
    """Verify a tenant's log in one read-only REPEATABLE READ snapshot (operator engine)."""
    keys = public_keys if isinstance(public_keys, Mapping) else trusted_keys(public_keys)
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            tx = await bind_tenant(conn, tenant_id)
            return await verify_tenant_in(
                tx,
                keys,
                progress=progress,
                proof_samples=proof_samples,
                all_proofs=all_proofs,
                known_checkpoints=known_checkpoints,
            )


def parse_checkpoint(tenant_id: uuid.UUID, doc: Mapping[str, Any]) -> repo.CheckpointRow:
    """A checkpoint in the API's JSON form (``GET /v1/audit/checkpoints``), as kept by an auditor."""
    try:
        return repo.CheckpointRow(
            uuid.UUID(str(tenant_id)),
            int(doc["tree_size"]),
            bytes.fromhex(doc["root_hash"]),
            parse_timestamp(doc["signed_at"]),
            bytes.fromhex(doc["signature"]),
            str(doc["key_id"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a checkpoint: {exc}") from exc


def load_checkpoints(tenant_id: uuid.UUID, document: Any) -> list[repo.CheckpointRow]:
    """Checkpoints from one JSON document: a checkpoint, a list of them, or a ``/checkpoints`` page."""
    if isinstance(document, Mapping) and "checkpoints" in document:
        document = document["checkpoints"]
    items = document if isinstance(document, list) else [document]
    return [parse_checkpoint(tenant_id, item) for item in items]
