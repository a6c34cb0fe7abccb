"""Randomised tampering as the database superuser: ``audit verify`` detects it and names the first bad entry.

The superuser disables the append-only trigger inside its own transaction (and
enables it again before committing), then edits rows the way an insider with
database access could: modify, delete, insert, reorder, truncate the tail, or
rewrite a whole consistent chain. Each case runs on a fresh tenant with a log of
random length and two signed checkpoints; the seed is in the test id.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.audit import repository as repo
from firstmile.audit.canonical import canonical_entry, entry_hash, jcs, leaf_hash
from firstmile.audit.schemas import checkpoint_out
from firstmile.audit.service import append, create_checkpoint
from firstmile.audit.signing import AuditSigner
from firstmile.audit.verify import VerifyReport, load_checkpoints, verify_tenant
from firstmile.kit.db import bind_tenant, tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.conftest import sequenced, unaudited_tenant

SIGNER = AuditSigner(Ed25519PrivateKey.generate())
SEEDS = range(3)


@dataclass
class Log:
    tenant: TenantId
    size: int
    checkpoints: tuple[int, int]
    rng: random.Random


async def _build(app_engine: AsyncEngine, admin_engine: AsyncEngine, seed: int) -> Log:
    rng = random.Random(seed)
    tenant = OPERATOR_CLI.tenant((await unaudited_tenant(admin_engine)).id)
    size = rng.randint(24, 48)
    first = rng.randint(4, size // 2)
    second = size - rng.randint(0, 4)  # a few entries may stay unsigned
    kinds = ("decision", "admin", "auth", "key", "erasure")
    written = 0
    for stop in (first, second, size):
        async with tenant_transaction(app_engine, tenant) as tx:
            while written < stop:
                payload = {"n": written, "score": rng.random(), "note": rng.choice(["a", "ü", "\n", ""])}
                await append(tx, rng.choice(kinds), f"actor:{rng.randint(1, 5)}", f"s:{written}", payload)
                written += 1
        await sequenced(app_engine, tenant)
        if stop < size or stop == second:
            async with tenant_transaction(app_engine, tenant) as tx:
                await create_checkpoint(tx, SIGNER)
    report = await _verify(admin_engine, tenant)
    assert report.ok, report.summary()
    assert report.latest_checkpoint == second
    return Log(tenant, size, (first, second), random.Random(seed * 7919 + 1))  # the tampering's own stream


async def _verify(admin_engine: AsyncEngine, tenant: TenantId) -> VerifyReport:
    return await verify_tenant(admin_engine, tenant, [SIGNER.public_key], all_proofs=True)


async def _as_superuser(admin_engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[None]]) -> None:
    async with admin_engine.begin() as conn:
        assert (await conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))).scalar()
        await conn.execute(text("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_immutable"))
        await conn.execute(text("ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_immutable"))
        await work(conn)
        await conn.execute(text("ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_immutable"))
        await conn.execute(text("ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_immutable"))


async def _row(conn: AsyncConnection, tenant: TenantId, seq: int) -> repo.AuditEntry:
    entry = await repo.get_entry(await bind_tenant(conn, tenant), seq)
    assert entry is not None
    return entry


async def _insert(conn: AsyncConnection, e: repo.AuditEntry) -> None:
    await conn.execute(
        text(
            "INSERT INTO audit_entries (tenant_id, seq, kind, actor, subject, payload, created_at, prev_hash,"
            " entry_hash, leaf_hash, entry_id) VALUES (:t, :seq, :kind, :actor, :subject, CAST(:payload AS jsonb),"
            " :at, :prev, :hash, :leaf, :id)"
        ),
        {
            "t": e.tenant_id,
            "seq": e.seq,
            "kind": e.kind,
            "actor": e.actor,
            "subject": e.subject,
            "payload": jcs(e.payload),
            "at": e.created_at,
            "prev": e.prev_hash,
            "hash": e.entry_hash,
            "leaf": e.leaf_hash,
            "id": e.entry_id,
        },
    )


def _forge(tenant: uuid.UUID, seq: int, prev: bytes, like: repo.AuditEntry, payload: Any) -> repo.AuditEntry:
    """A self-consistent entry with an id of its own: its hashes are right for its content and its predecessor."""
    entry_id = uuid.uuid4()
    canonical = canonical_entry(tenant, seq, like.kind, like.actor, like.subject, payload, like.created_at, entry_id)
    return repo.AuditEntry(
        tenant, seq, like.kind, like.actor, like.subject, payload, like.created_at, prev,
        entry_hash(prev, canonical), leaf_hash(canonical), entry_id,
    )  # fmt: skip


async def _move_head(conn: AsyncConnection, tenant: uuid.UUID, seq: int, hash_: bytes) -> None:
    await conn.execute(
        text("UPDATE audit_heads SET seq = :s, entry_hash = :h WHERE tenant_id = :t"),
        {"s": seq, "h": hash_, "t": tenant},
    )


# Each scenario tampers and returns (expected first bad seq, acceptable reasons).
Scenario = Callable[[AsyncConnection, Log], Awaitable[tuple[int, set[str]]]]


async def modify(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    k = log.rng.randrange(log.size)
    t = log.tenant
    change = log.rng.choice(["payload", "kind", "actor", "subject", "created_at"])
    assignments = {
        "payload": "payload = jsonb_set(payload, '{n}', '-1')",
        "kind": "kind = 'admin-x'",
        "actor": "actor = actor || '!'",
        "subject": "subject = 'someone else'",
        "created_at": "created_at = created_at + interval '1 microsecond'",
    }
    await conn.execute(
        text(f"UPDATE audit_entries SET {assignments[change]} WHERE tenant_id = :t AND seq = :k"), {"t": t, "k": k}
    )
    return k, {"content-mismatch"}


async def delete(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    k = log.rng.randrange(log.size - 1)
    await conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq = :k"), {"t": log.tenant, "k": k})
    return k, {"missing"}


async def delete_last(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    k = log.size - 1
    await conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq = :k"), {"t": log.tenant, "k": k})
    return k, {"truncated"}


async def insert_middle(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    """Renumber entries k.. one up and put a forged, correctly chained entry at k."""
    k = log.rng.randrange(1, log.size)
    t = log.tenant
    before = await _row(conn, t, k - 1)
    await conn.execute(
        text("UPDATE audit_entries SET seq = -seq - 1 WHERE tenant_id = :t AND seq >= :k"), {"t": t, "k": k}
    )
    await conn.execute(text("UPDATE audit_entries SET seq = -seq WHERE tenant_id = :t AND seq < 0"), {"t": t})
    await _insert(conn, _forge(t, k, before.entry_hash, before, {"forged": True}))
    return k, {"moved"}


async def insert_end(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    """A forged, correctly chained entry after the last one (the head row left as it was)."""
    last = await _row(conn, log.tenant, log.size - 1)
    await _insert(conn, _forge(log.tenant, log.size, last.entry_hash, last, {"forged": True}))
    return log.size, {"unrecorded"}


async def insert_garbage(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    """A row with made-up hashes at a free seq past the end."""
    seq = log.size + log.rng.randint(0, 3)
    last = await _row(conn, log.tenant, log.size - 1)
    forged = _forge(log.tenant, seq, bytes(32), last, {"x": 1})
    await _insert(conn, repo.AuditEntry(**{**_fields(forged), "entry_hash": b"\x01" * 32}))
    return log.size, {"missing", "unrecorded"} if seq > log.size else {"unrecorded", "broken-link"}


def _fields(e: repo.AuditEntry) -> dict[str, Any]:
    return {name: getattr(e, name) for name in repo.AuditEntry.__slots__}


async def reorder(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    i, j = sorted(log.rng.sample(range(log.size), 2))
    t = log.tenant
    for old, new in ((i, -1), (j, i), (-1, j)):
        await conn.execute(
            text("UPDATE audit_entries SET seq = :new WHERE tenant_id = :t AND seq = :old"),
            {"t": t, "old": old, "new": new},
        )
    return i, {"broken-link", "content-mismatch", "moved"}


async def truncate_tail(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    """Delete entries k.. where k is covered by the latest checkpoint, and move the head back to hide it."""
    k = log.rng.randrange(log.checkpoints[0], log.checkpoints[1])
    t = log.tenant
    last_kept = await _row(conn, t, k - 1)
    await conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq >= :k"), {"t": t, "k": k})
    await _move_head(conn, t, k - 1, last_kept.entry_hash)
    return k, {"truncated"}


async def rewrite(conn: AsyncConnection, log: Log) -> tuple[int, set[str]]:
    """Change entry k and recompute every hash after it and the head: only the signed roots catch it.

    The chain is then self-consistent, so the blame is the range of the first checkpoint whose
    root no longer matches: it starts at the previous checkpoint's size (expected seq below).
    """
    first, second = log.checkpoints
    k = log.rng.randrange(second)
    t = log.tenant
    prev = (await _row(conn, t, k - 1)).entry_hash if k else bytes(32)
    rows = await repo.scan_entries(await bind_tenant(conn, t), k - 1, 10_000)
    await conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq >= :k"), {"t": t, "k": k})
    for row in rows:
        payload = {**row.payload, "n": -1} if row.seq == k else row.payload
        forged = _forge(t, row.seq, prev, row, payload)
        await _insert(conn, forged)
        prev = forged.entry_hash
    await _move_head(conn, t, rows[-1].seq, prev)
    return (0 if k < first else first), {"root-mismatch"}


SCENARIOS: dict[str, Scenario] = {
    "modify": modify,
    "delete": delete,
    "delete-last": delete_last,
    "insert-middle": insert_middle,
    "insert-end": insert_end,
    "insert-garbage": insert_garbage,
    "reorder": reorder,
    "truncate-tail": truncate_tail,
    "rewrite": rewrite,
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_verify_detects_tampering_and_names_the_first_bad_entry(
    name: str, seed: int, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    log = await _build(app_engine, admin_engine, seed * 1000 + list(SCENARIOS).index(name))
    expected: tuple[int, set[str]] = (-1, set())

    async def tamper(conn: AsyncConnection) -> None:
        nonlocal expected
        expected = await SCENARIOS[name](conn, log)

    await _as_superuser(admin_engine, tamper)
    report = await _verify(admin_engine, log.tenant)
    first = report.first_bad
    assert not report.ok
    assert first is not None, report.summary()
    assert (first.seq, first.reason in expected[1]) == (expected[0], True), report.summary()


async def test_forged_checkpoints_and_unknown_keys_are_reported(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    log = await _build(app_engine, admin_engine, 77)
    t = log.tenant

    async def tamper(conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                "UPDATE audit_checkpoints SET signed_at = signed_at + interval '1 second'"
                " WHERE tenant_id = :t AND tree_size = :s"
            ),
            {"t": t, "s": log.checkpoints[0]},
        )

    await _as_superuser(admin_engine, tamper)
    report = await _verify(admin_engine, t)
    assert [(p.reason, p.checkpoint) for p in report.problems] == [("bad-signature", log.checkpoints[0])]
    stranger = AuditSigner(Ed25519PrivateKey.generate())
    other = await verify_tenant(admin_engine, t, [stranger.public_key])
    assert {p.reason for p in other.problems} == {"unknown-key"}


async def test_superuser_limits_are_what_the_docs_say(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    """Entries after the latest checkpoint are only as safe as the head row: a superuser who forges
    one *and* moves the head is not caught until an external copy of a later checkpoint exists.
    The forged entry is reported as not yet signed."""
    log = await _build(app_engine, admin_engine, 99)

    async def tamper(conn: AsyncConnection) -> None:
        last = await _row(conn, log.tenant, log.size - 1)
        forged = _forge(log.tenant, log.size, last.entry_hash, last, {"forged": True})
        await _insert(conn, forged)
        await _move_head(conn, log.tenant, log.size, forged.entry_hash)

    await _as_superuser(admin_engine, tamper)
    report = await _verify(admin_engine, log.tenant)
    assert report.ok
    assert report.unsigned == log.size + 1 - log.checkpoints[1]


async def test_checkpoints_kept_outside_catch_a_rewrite_that_deleted_them(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    """A superuser who truncates the log *and* deletes its checkpoints and moves the head leaves a
    log that verifies on its own; an auditor's copy of an earlier checkpoint still catches it."""
    log = await _build(app_engine, admin_engine, 123)
    async with tenant_transaction(admin_engine, log.tenant, commit=False) as tx:
        kept = [checkpoint_out(cp) for cp in await repo.list_checkpoints(tx)]
    saved = json.loads(json.dumps({"checkpoints": [msgspec.to_builtins(c) for c in kept]}))  # as fetched from the API
    k = log.checkpoints[0] - 1

    async def tamper(conn: AsyncConnection) -> None:
        last_kept = await _row(conn, log.tenant, k - 1)
        await conn.execute(
            text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq >= :k"), {"t": log.tenant, "k": k}
        )
        await conn.execute(text("DELETE FROM audit_checkpoints WHERE tenant_id = :t"), {"t": log.tenant})
        await _move_head(conn, log.tenant, k - 1, last_kept.entry_hash)

    await _as_superuser(admin_engine, tamper)
    assert (await _verify(admin_engine, log.tenant)).ok  # the database alone no longer shows it
    report = await verify_tenant(
        admin_engine, log.tenant, [SIGNER.public_key], known_checkpoints=load_checkpoints(log.tenant, saved)
    )
    assert report.first_bad_seq == k and report.first_bad is not None and report.first_bad.reason == "truncated"
    assert {p.reason for p in report.problems} >= {"truncated", "checkpoint-missing"}


async def test_a_tampered_queued_entry_is_refused_by_the_sequencer_and_reported_by_verify(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    """A superuser who edits an entry while it waits in the queue: the sequencer recomputes its leaf hash,
    refuses to place it (the tenant's log stops before it, nothing after it is placed either), and
    ``audit verify`` names it."""
    from firstmile.audit.service import Sequencer

    log = await _build(app_engine, admin_engine, 2024)
    async with tenant_transaction(app_engine, log.tenant) as tx:
        for i in range(3):
            await append(tx, "decision", "agent:planner", f"late:{i}", {"i": i})

    async def tamper(conn: AsyncConnection) -> None:
        await conn.execute(text("ALTER TABLE audit_queue DISABLE TRIGGER audit_queue_guard"))
        await conn.execute(
            text("UPDATE audit_queue SET payload = '{\"i\": 99}' WHERE tenant_id = :t AND subject = 'late:1'"),
            {"t": log.tenant},
        )
        await conn.execute(text("ALTER TABLE audit_queue ENABLE TRIGGER audit_queue_guard"))

    await _as_superuser(admin_engine, tamper)
    report = await _verify(admin_engine, log.tenant)
    assert [p.reason for p in report.problems] == ["queued-mismatch"], report.summary()
    assert report.queued == 3
    sequencer = Sequencer(app_engine, batch_size=1)
    assert await sequencer.sequence_tenant(uuid.UUID(str(log.tenant))) == 1  # late:0, then it stops at late:1
    assert sequencer.failing == {uuid.UUID(str(log.tenant))}
    async with tenant_transaction(admin_engine, log.tenant, commit=False) as tx:
        assert [q.subject for q in await repo.next_queued(tx, 10)] == ["late:1", "late:2"]
    assert (await _verify(admin_engine, log.tenant)).first_bad is not None
