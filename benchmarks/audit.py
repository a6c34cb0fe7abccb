"""``python -m benchmarks audit``: append rate, and proofs at a million entries, each with a baseline.

What one run does, on the server of ``admin_url`` (a PostgreSQL superuser URL):

1. Recreates the database ``firstmile_bench_audit``, migrates it, lets
   ``firstmile_app`` log in and creates tenants directly (no manifests needed).
2. Append rate as the application role through :func:`append`, in transactions
   of 1 and of 100 and from 4 concurrent connections to one tenant; the
   baseline is a plain ``INSERT`` of the same row shape (same indexes, no head
   row, no hashing, no RLS) through the same engine in the same transactions.
3. Hashing: SHA-256 of the canonical bytes alone against the whole per-entry
   encoding (JCS + entry hash + leaf hash).
4. A million entries for one tenant, generated in memory with real hashes and
   bulk-loaded with COPY in chunks; then: the Merkle tree built from the stored
   leaves, a signed checkpoint, inclusion and consistency proofs generated and
   verified (time and size; baseline: one SHA-256), proofs served through the
   API's code path with a warm cache, and a full ``verify_tenant``.

Returns a markdown report; progress goes to stderr. Nothing here runs in the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.common import APP_ROLE, bench_tenant
from benchmarks.database import BenchDatabase, fresh_bench_database

BENCH_DB = "firstmile_bench_audit"
PAYLOAD = {"model": "planner-v3", "confidence": 0.87, "fallback": None, "inputs": {"persona": "developer"}}


def _log(message: str) -> None:
    sys.stderr.write(f"[bench audit] {message}\n")
    sys.stderr.flush()


@dataclass
class Rate:
    label: str
    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Timing:
    label: str
    samples_us: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_us)

    def pct(self, p: float) -> float:
        ordered = sorted(self.samples_us)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@dataclass
class Facts:
    entries: int
    server: dict[str, str] = field(default_factory=dict)
    appends: list[tuple[Rate, Rate]] = field(default_factory=list)
    hashing: list[Rate] = field(default_factory=list)
    load: Rate | None = None
    generate: Rate | None = None
    tree_db_s: float = 0.0
    tree_memory_s: float = 0.0
    checkpoint_s: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    sizes: list[tuple[str, int, int, float]] = field(default_factory=list)
    verify: Rate | None = None
    verify_ok: bool = False
    seconds: float = 0.0


async def _plain_table(admin: AsyncEngine) -> None:
    """The baseline's table: the row shape of ``audit_entries`` (same keys and indexes), no RLS policy."""
    async with admin.begin() as conn:
        await conn.execute(
            text(
                "CREATE TABLE bench_plain_entries (LIKE audit_entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                " INCLUDING INDEXES)"
            )
        )
        await conn.execute(text(f"GRANT SELECT, INSERT ON bench_plain_entries TO {APP_ROLE}"))


async def _new_tenant(admin: AsyncEngine, label: str) -> uuid.UUID:
    tenant = uuid.uuid4()
    async with admin.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tenants (id, slug, name, home_region, manifest_hash) "
                "VALUES (:id, :slug, :slug, 'bench', 'bench')"
            ),
            {"id": tenant, "slug": f"bench-{label}-{tenant.hex[:8]}"},
        )
    return tenant


_PLAIN = text(
    "INSERT INTO bench_plain_entries (tenant_id, seq, kind, actor, subject, payload, created_at, prev_hash,"
    " entry_hash, leaf_hash) VALUES (:t, :seq, 'decision', 'agent:planner', :subject, CAST(:payload AS jsonb),"
    " statement_timestamp(), :h, :h, :h)"
)


async def _append_rate(
    app: AsyncEngine, admin: AsyncEngine, count: int, per_txn: int, workers: int
) -> tuple[Rate, Rate]:
    from firstmile.audit.canonical import jcs
    from firstmile.audit.service import append
    from firstmile.kit.db import tenant_transaction

    tenant = bench_tenant(await _new_tenant(admin, "append"))
    plain_tenant = bench_tenant(await _new_tenant(admin, "plain"))
    payload_text = jcs(PAYLOAD)
    counter = iter(range(10**9))
    dummy = bytes(32)
    per_worker = count // workers // per_txn

    async def audited() -> None:
        for _ in range(per_worker):
            async with tenant_transaction(app, tenant) as tx:
                for _ in range(per_txn):
                    await append(tx, "decision", "agent:planner", f"user:{next(counter)}", PAYLOAD)

    async def plain() -> None:
        for _ in range(per_worker):
            async with tenant_transaction(app, plain_tenant) as tx:
                for _ in range(per_txn):
                    seq = next(counter)
                    params = {
                        "t": plain_tenant,
                        "seq": seq,
                        "subject": f"user:{seq}",
                        "payload": payload_text,
                        "h": dummy,
                    }
                    await tx.execute(_PLAIN, params)

    total = per_worker * per_txn * workers
    results = []
    for label, work in (("audit append", audited), ("plain INSERT", plain)):
        began = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(workers)))
        results.append(
            Rate(f"{label}, transactions of {per_txn}, {workers} connection(s)", total, time.perf_counter() - began)
        )
    return results[0], results[1]


def _hash_rates(samples: int) -> list[Rate]:
    from firstmile.audit.canonical import canonical_entry, entry_hash, leaf_hash

    tenant = uuid.uuid4()
    at = datetime.now(UTC)
    canonical = canonical_entry(tenant, 123_456, "decision", "agent:planner", "user:1", PAYLOAD, at)
    began = time.perf_counter()
    for _ in range(samples):
        hashlib.sha256(canonical).digest()
    sha = Rate(f"SHA-256 of one canonical entry ({len(canonical)} bytes)", samples, time.perf_counter() - began)
    prev = bytes(32)
    began = time.perf_counter()
    for i in range(samples):
        c = canonical_entry(tenant, i, "decision", "agent:planner", "user:1", PAYLOAD, at)
        prev = entry_hash(prev, c)
        leaf_hash(c)
    full = Rate("canonical encoding (JCS) + entry hash + leaf hash", samples, time.perf_counter() - began)
    return [sha, full]


def _generate(tenant: uuid.UUID, count: int, chunk: int) -> Iterator[tuple[list[tuple[object, ...]], bytes]]:
    """Chunks of COPY records with a real hash chain, and the chunk's leaf hashes back to back."""
    from firstmile.audit.canonical import GENESIS, canonical_parts, format_timestamp, jcs

    base = datetime(2026, 1, 1, tzinfo=UTC)
    prev = GENESIS
    kinds = ("decision", "admin", "auth", "key", "erasure")
    for start in range(0, count, chunk):
        records: list[tuple[object, ...]] = []
        leaves = bytearray()
        for seq in range(start, min(count, start + chunk)):
            kind, subject = kinds[seq % 5], f"user:{seq % 50_000}"
            payload = {**PAYLOAD, "n": seq}
            payload_text = jcs(payload)
            head, middle, tail = canonical_parts(tenant, kind, "agent:planner", subject, payload_text)
            at = base + timedelta(microseconds=seq * 37)
            canonical = (head + format_timestamp(at) + middle + str(seq) + tail).encode()
            this = hashlib.sha256(prev + canonical).digest()
            leaf = hashlib.sha256(b"\x00" + canonical).digest()
            records.append((tenant, seq, kind, "agent:planner", subject, payload_text, at, prev, this, leaf))
            leaves += leaf
            prev = this
        yield records, bytes(leaves)


_COLUMNS = (
    "tenant_id", "seq", "kind", "actor", "subject", "payload", "created_at", "prev_hash", "entry_hash", "leaf_hash",
)  # fmt: skip


async def _bulk_load(admin_dsn: str, tenant: uuid.UUID, count: int, facts: Facts) -> bytes:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    leaves = bytearray()
    generating = loading = 0.0
    try:
        chunks = _generate(tenant, count, 50_000)
        while True:
            began = time.perf_counter()
            item = next(chunks, None)
            generating += time.perf_counter() - began
            if item is None:
                break
            records, packed = item
            began = time.perf_counter()
            await conn.copy_records_to_table("audit_entries", records=records, columns=list(_COLUMNS))
            loading += time.perf_counter() - began
            leaves += packed
            last = records[-1]
            if len(leaves) // 32 % 200_000 == 0 or len(leaves) // 32 == count:
                _log(f"loaded {len(leaves) // 32}/{count} entries")
        await conn.execute(
            "INSERT INTO audit_heads (tenant_id, seq, entry_hash, prev_hash, updated_at)"
            " VALUES ($1, $2, $3, $4, now())",
            tenant,
            last[1],
            last[8],
            last[7],
        )
        await conn.execute("ANALYZE audit_entries")
    finally:
        await conn.close()
    facts.generate = Rate("generate entries in memory (JCS + hash chain + leaf hashes)", count, generating)
    facts.load = Rate("bulk load with COPY (PK and 2 indexes)", count, loading)
    return bytes(leaves)


def _timed(label: str, runs: Sequence[Callable[[], object]]) -> Timing:
    samples = []
    for run in runs:
        began = time.perf_counter()
        run()
        samples.append((time.perf_counter() - began) * 1e6)
    return Timing(label, samples)


async def _async_timed(label: str, runs: Sequence[Callable[[], Awaitable[object]]]) -> Timing:
    samples = []
    for run in runs:
        began = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - began) * 1e6)
    return Timing(label, samples)


async def _million(admin_dsn: str, admin: AsyncEngine, app: AsyncEngine, count: int, facts: Facts) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firstmile.audit.merkle import MerkleTree, verify_consistency, verify_inclusion
    from firstmile.audit.service import TreeCache, create_checkpoint, inclusion_proof
    from firstmile.audit.signing import AuditSigner
    from firstmile.audit.verify import verify_tenant
    from firstmile.kit.db import tenant_transaction

    tenant = bench_tenant(await _new_tenant(admin, "million"))
    _log(f"generating and loading {count} entries")
    leaves = await _bulk_load(admin_dsn, tenant, count, facts)

    began = time.perf_counter()
    memory_tree = MerkleTree()
    memory_tree.extend_packed(leaves)
    facts.tree_memory_s = time.perf_counter() - began

    signer = AuditSigner(Ed25519PrivateKey.generate())
    cache = TreeCache(max_leaves=2 * count)
    _log("building the tree from the stored leaves and signing a checkpoint")
    async with tenant_transaction(app, tenant) as tx:
        began = time.perf_counter()
        tree = await cache.tree(tx, count)
        facts.tree_db_s = time.perf_counter() - began
    assert tree.root() == memory_tree.root()
    async with tenant_transaction(app, tenant) as tx:
        began = time.perf_counter()
        checkpoint = await create_checkpoint(tx, signer, cache, check_entries=False)
        facts.checkpoint_s = time.perf_counter() - began
    assert checkpoint is not None and checkpoint.tree_size == count

    rng = random.Random(2026)
    size, root = count, tree.root()
    indexes = [rng.randrange(size) for _ in range(2000)]
    proofs: dict[int, list[bytes]] = {}

    def make(i: int) -> Callable[[], object]:
        return lambda: proofs.__setitem__(i, tree.inclusion_proof(i, size))

    facts.timings.append(_timed(f"inclusion proof, generate (tree of {size})", [make(i) for i in indexes]))
    facts.timings.append(
        _timed(
            "inclusion proof, verify (RFC 9162 §2.1.3.2)",
            [lambda i=i: verify_inclusion(tree.leaf(i), i, size, proofs[i], root) for i in indexes],  # type: ignore[misc]
        )
    )
    assert all(verify_inclusion(tree.leaf(i), i, size, proofs[i], root) for i in indexes)
    firsts = [rng.randrange(1, size) for _ in range(500)]
    consistency: dict[int, list[bytes]] = {}
    facts.timings.append(
        _timed(
            "consistency proof, generate",
            [lambda m=m: consistency.__setitem__(m, tree.consistency_proof(m, size)) for m in firsts],  # type: ignore[misc]
        )
    )
    first_roots = {m: tree.root(m) for m in firsts}
    facts.timings.append(
        _timed(
            "consistency proof, verify (RFC 9162 §2.1.4.2)",
            [lambda m=m: verify_consistency(m, size, consistency[m], first_roots[m], root) for m in firsts],  # type: ignore[misc]
        )
    )
    sample = bytes(200)
    facts.timings.append(
        _timed("baseline: one SHA-256 of 65 bytes", [lambda: hashlib.sha256(sample[:65]).digest()] * 2000)
    )

    inclusion_lengths = [len(p) for p in proofs.values()]
    consistency_lengths = [len(p) for p in consistency.values()]
    for label, lengths in (("inclusion", inclusion_lengths), ("consistency", consistency_lengths)):
        facts.sizes.append((label, min(lengths), max(lengths), statistics.fmean(lengths)))

    async def served(i: int) -> None:
        async with tenant_transaction(app, tenant) as tx:
            await inclusion_proof(tx, i, None, cache)

    facts.timings.append(
        await _async_timed(
            "inclusion proof through the API code path (tenant transaction, entry + checkpoint read, warm cache)",
            [lambda i=i: served(i) for i in indexes[:300]],  # type: ignore[misc]
        )
    )
    cold = TreeCache(max_leaves=2 * count)
    facts.timings.append(
        await _async_timed(
            "first proof after a restart (cold cache: leaves loaded and tree built)",
            [lambda: _cold(app, tenant, cold, indexes[0])],
        )
    )

    _log("full verify_tenant (chain recomputed from seq 0, every root, 256 sampled proofs)")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            _log(f"verified {done}/{total}")
            last[0] = now

    began = time.perf_counter()
    report = await verify_tenant(admin, tenant, [signer.public_key], progress=progress)
    facts.verify = Rate("verify_tenant (the auditor's full check)", report.entries, time.perf_counter() - began)
    facts.verify_ok = report.ok


async def _cold(app: AsyncEngine, tenant: uuid.UUID, cache: object, index: int) -> None:
    from firstmile.audit.service import TreeCache, inclusion_proof
    from firstmile.kit.db import tenant_transaction

    assert isinstance(cache, TreeCache)
    async with tenant_transaction(app, bench_tenant(tenant)) as tx:
        await inclusion_proof(tx, index, None, cache)


async def _run(db: BenchDatabase, entries: int, appends: int) -> Facts:
    from firstmile.kit.db import create_engine

    facts = Facts(entries)
    settings = db.server.settings
    facts.server = {"version": settings["server_version"]} | {
        name: settings[name] for name in ("fsync", "synchronous_commit", "shared_buffers")
    }
    admin = create_engine(db.admin_url, pool_size=2, max_overflow=0, application_name="firstmile-bench")
    app = create_engine(db.app_url, pool_size=4, max_overflow=0, application_name="firstmile-bench")
    try:
        await _plain_table(admin)
        for per_txn, workers in ((1, 1), (100, 1), (1, 4)):
            _log(f"append rate: transactions of {per_txn}, {workers} connection(s)")
            facts.appends.append(await _append_rate(app, admin, appends, per_txn, workers))
        facts.hashing = _hash_rates(20_000)
        await _million(db.admin_dsn, admin, app, entries, facts)
    finally:
        await app.dispose()
        await admin.dispose()
    return facts


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start"


def _report(facts: Facts, machine: str) -> str:
    lines = [
        f"## Audit log benchmark ({facts.entries:,} entries)",
        "",
        f"- Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {facts.seconds:.0f} s in all; machine: {machine}.",
        f"- PostgreSQL {facts.server.get('version', '?')} (fsync={facts.server.get('fsync')},"
        f" synchronous_commit={facts.server.get('synchronous_commit')},"
        f" shared_buffers={facts.server.get('shared_buffers')}); the client runs on the same machine.",
        "",
        "### Append rate (as `firstmile_app`, through RLS)",
        "",
        "| transactions | audit `append` entries/s | plain INSERT rows/s (baseline) | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for audit, plain in facts.appends:
        shape = audit.label.split(", ", 1)[1]
        lines.append(
            f"| {shape} | {audit.per_second:,.0f} | {plain.per_second:,.0f}"
            f" | {audit.per_second / plain.per_second:.2f} |"
        )
    lines += [
        "",
        "The baseline inserts the same row shape (same primary key and indexes) with no hashing, no head row"
        " and no RLS policy, through the same engine and transaction pattern.",
        "",
        "### Hashing in the client",
        "",
        "| operation | per second |",
        "| --- | ---: |",
    ]
    lines += [f"| {r.label} | {r.per_second:,.0f} |" for r in facts.hashing]
    lines += ["", f"### {facts.entries:,} entries for one tenant", "", "| step | result |", "| --- | ---: |"]
    for rate in (facts.generate, facts.load):
        if rate is not None:
            lines.append(f"| {rate.label} | {rate.seconds:.1f} s ({rate.per_second:,.0f}/s) |")
    lines += [
        f"| Merkle tree from the stored leaf hashes (read + build) | {facts.tree_db_s:.2f} s |",
        f"| Merkle tree from leaf hashes in memory (build only) | {facts.tree_memory_s:.2f} s |",
        f"| sign a checkpoint over all entries (cached tree) | {facts.checkpoint_s * 1000:.1f} ms |",
    ]
    if facts.verify is not None:
        verdict = "OK" if facts.verify_ok else "FAILED"
        lines.append(
            f"| {facts.verify.label} | {facts.verify.seconds:.1f} s"
            f" ({facts.verify.per_second:,.0f} entries/s), {verdict} |"
        )
    lines += ["", "| proof operation | mean µs | p50 µs | p99 µs | runs |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {t.label} | {t.mean:,.1f} | {t.pct(50):,.1f} | {t.pct(99):,.1f} | {len(t.samples_us)} |"
        for t in facts.timings
    ]
    lines += [
        "",
        "| proof | hashes (min / max / mean) | bytes raw (max) | bytes as JSON hex (max) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, low, high, mean in facts.sizes:
        lines.append(f"| {label} | {low} / {high} / {mean:.1f} | {high * 32} | {high * 67 + 2} |")
    return "\n".join(lines) + "\n"


def run_audit_benchmark(admin_url: str, *, entries: int = 1_000_000, appends: int = 2000) -> str:
    """Run the audit benchmark on the server of ``admin_url`` (superuser); return the markdown report."""
    if entries < 2 or appends < 100:
        raise ValueError("entries must be at least 2 and appends at least 100")
    machine = _machine()
    began = time.perf_counter()
    db = fresh_bench_database(admin_url, BENCH_DB)
    facts = asyncio.run(_run(db, entries, appends))
    facts.seconds = time.perf_counter() - began
    return _report(facts, machine)


__all__ = ["run_audit_benchmark"]
