"""The audit log on the real PostgreSQL: the queue and the sequencer, transactions, concurrency, privileges,
checkpoints."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.audit import repository as repo
from firstmile.audit.canonical import GENESIS, CanonicalError, entry_hash, leaf_hash
from firstmile.audit.service import (
    AuditError,
    Checkpointer,
    Sequencer,
    TreeCache,
    append,
    create_checkpoint,
    maybe_checkpoint,
)
from firstmile.audit.signing import AuditSigner, checkpoint_body, verify_signature
from firstmile.audit.verify import verify_tenant
from firstmile.kit.db import TenantTx, tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.conftest import Database, sequenced, unaudited_tenant
from tests.unit.test_audit_rfc9162 import rfc_mth

SIGNER = AuditSigner(Ed25519PrivateKey.generate())


async def _tenant(admin_engine: AsyncEngine) -> TenantId:
    return OPERATOR_CLI.tenant((await unaudited_tenant(admin_engine)).id)


async def _entries(admin_engine: AsyncEngine, tenant: TenantId) -> list[repo.AuditEntry]:
    async with tenant_transaction(admin_engine, tenant, commit=False) as tx:
        return await repo.scan_entries(tx, None, 100_000)


async def test_append_chains_and_recomputes(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    payloads = [
        {"model": "planner-v3", "confidence": 0.87, "inputs": {"persona": "dev"}, "fallback": None},
        {"n": 1e21, "small": 1.5e-7, "big": 2.437432259388968e18, "text": '\u20ac\n"q" \U0001f600', "list": []},
        [],
    ]
    async with tenant_transaction(app_engine, tenant) as tx:
        made = [await append(tx, "decision", "agent:planner", f"user:{i}", p) for i, p in enumerate(payloads)]
    assert all(m.seq is None for m in made)  # queued: a leaf hash, no place yet
    assert await _entries(admin_engine, tenant) == []
    assert await sequenced(app_engine, tenant) == 3
    stored = await _entries(admin_engine, tenant)
    assert [e.seq for e in stored] == [0, 1, 2]
    prev = GENESIS
    for entry, returned in zip(stored, made, strict=True):  # in the order written
        canonical = entry.canonical()
        assert entry.entry_id == returned.entry_id
        assert entry.prev_hash == prev
        assert entry.entry_hash == entry_hash(prev, canonical)
        assert entry.leaf_hash == leaf_hash(canonical) == returned.leaf_hash  # known when queued
        assert entry.created_at == returned.created_at
        assert entry.sequenced_at is not None and entry.sequenced_at >= entry.created_at
        prev = entry.entry_hash
    assert stored[1].payload["big"] == 2.437432259388968e18  # jsonb keeps 2437432259388968000; read back as the double
    report = await verify_tenant(admin_engine, tenant, [SIGNER.public_key])
    assert report.ok, report.summary()


async def test_append_rolls_back_with_the_change(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "kept", {})
    with pytest.raises(RuntimeError, match="the change failed"):
        async with tenant_transaction(app_engine, tenant) as tx:
            await tx.execute(text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'ghost')"), {"t": tenant})
            await append(tx, "admin", "op", "ghost", {})
            raise RuntimeError("the change failed")
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "next", {})
        users = (await tx.execute(text("SELECT count(*) FROM end_users WHERE user_id = 'ghost'"))).scalar_one()
    assert users == 0
    assert await sequenced(app_engine, tenant) == 2  # the rolled-back entry was never queued: no hole
    assert [(e.seq, e.subject) for e in await _entries(admin_engine, tenant)] == [(0, "kept"), (1, "next")]


async def test_invalid_input_is_refused_before_writing(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        for kind, actor, payload in (
            ("Bad Kind", "a", {}),
            ("admin", "a\x00", {}),
            ("admin", "a", {"x": float("nan")}),
        ):
            with pytest.raises(ValueError):
                await append(tx, kind, actor, "s", payload)
        for number in (2**53, -(2**60)):  # outside I-JSON, even where a double holds it exactly
            with pytest.raises(CanonicalError):
                await append(tx, "admin", "a", "s", {"too big": number})
    assert await sequenced(app_engine, tenant) == 0
    assert await _entries(admin_engine, tenant) == []


async def test_concurrent_appends_stay_one_chain(database: Database, admin_engine: AsyncEngine) -> None:
    """Writers take no shared lock (each holds its transaction open across a scheduling point) and
    two sequencers race on the tenant: one chain, every entry exactly once."""
    tenant = await _tenant(admin_engine)  # fresh: the first sequencers also race to create the head row
    engine = create_async_engine(database.app_url, pool_size=12, max_overflow=0)
    try:

        async def one(i: int) -> uuid.UUID:
            async with tenant_transaction(engine, tenant) as tx:
                entry = await append(tx, "auth", f"worker:{i % 7}", f"login:{i}", {"i": i})
                await asyncio.sleep(0)
                return entry.entry_id

        async def sequencer(stop: asyncio.Event) -> int:
            placed = 0
            worker = Sequencer(engine, batch_size=7)
            while not stop.is_set():
                placed += await worker.sequence_tenant(uuid.UUID(str(tenant)))
                await asyncio.sleep(0)
            return placed

        stop = asyncio.Event()
        racers = [asyncio.create_task(sequencer(stop)) for _ in range(2)]
        ids = await asyncio.gather(*(one(i) for i in range(60)))
        await asyncio.sleep(0.05)
        stop.set()
        placed = sum(await asyncio.gather(*racers)) + await sequenced(engine, tenant)
    finally:
        await engine.dispose()
    assert placed == 60
    stored = await _entries(admin_engine, tenant)
    assert [e.seq for e in stored] == list(range(60))
    assert sorted(e.entry_id for e in stored if e.entry_id) == sorted(ids)
    assert {e.payload["i"] for e in stored} == set(range(60))
    report = await verify_tenant(admin_engine, tenant, [SIGNER.public_key])
    assert report.ok, report.summary()


async def test_tenants_have_separate_chains(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    one, two = await _tenant(admin_engine), await _tenant(admin_engine)
    for tenant in (one, two, one):
        async with tenant_transaction(app_engine, tenant) as tx:
            await append(tx, "admin", "op", "x", {})
    await sequenced(app_engine)
    assert [e.seq for e in await _entries(admin_engine, one)] == [0, 1]
    assert [e.seq for e in await _entries(admin_engine, two)] == [0]
    async with tenant_transaction(app_engine, one) as tx:  # RLS: the other tenant's rows are invisible
        for table in ("audit_entries", "audit_queue"):
            seen = (await tx.execute(text(f"SELECT DISTINCT tenant_id FROM {table}"))).scalars().all()
            assert set(seen) <= {one}
    # (the queue insert goes on the driver connection, so the error is asyncpg's own)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with tenant_transaction(app_engine, one) as tx:  # bound to one, writing as two: only RLS stops it
            await append(TenantTx(tx.conn, two), "admin", "op", "x", {})


@pytest.mark.parametrize("table", ["audit_entries", "audit_checkpoints", "audit_queue"])
async def test_app_role_may_only_select_and_insert(
    table: str, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "x", {})
    await sequenced(app_engine, tenant)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "still queued", {})
    async with tenant_transaction(app_engine, tenant) as tx:
        assert await create_checkpoint(tx, SIGNER) is not None
    for statement in (f"UPDATE {table} SET tenant_id = tenant_id", f"DELETE FROM {table}", f"TRUNCATE {table}"):
        with pytest.raises(DBAPIError, match="permission denied"):
            async with tenant_transaction(app_engine, tenant) as tx:
                await tx.execute(text(statement))


@pytest.mark.parametrize(
    ("table", "refusal"),
    [
        ("audit_entries", "append-only"),
        ("audit_checkpoints", "append-only"),
        ("audit_queue", "refused"),  # an entry leaves the queue only by being sequenced
    ],
)
async def test_trigger_refuses_changes_by_the_owner_and_superuser(
    table: str, refusal: str, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "x", {})
    await sequenced(app_engine, tenant)
    async with tenant_transaction(app_engine, tenant) as tx:
        await create_checkpoint(tx, SIGNER)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "queued", {})
    async with admin_engine.connect() as conn:
        superuser = (await conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))).scalar()
        owner = (
            await conn.execute(text("SELECT tableowner FROM pg_tables WHERE tablename = :t"), {"t": table})
        ).scalar()
        assert superuser or owner == (await conn.execute(text("SELECT current_user"))).scalar()
    for statement in (
        f"UPDATE {table} SET tenant_id = tenant_id WHERE tenant_id = :t",
        f"DELETE FROM {table} WHERE tenant_id = :t",
        f"TRUNCATE {table}",
    ):
        with pytest.raises(DBAPIError, match="append-only" if statement.startswith("TRUNCATE") else refusal):
            async with admin_engine.begin() as conn:
                await conn.execute(text(statement), {"t": tenant})
    assert len(await _entries(admin_engine, tenant)) == 1
    async with tenant_transaction(admin_engine, tenant, commit=False) as tx:
        assert [q.subject for q in await repo.next_queued(tx, 10)] == ["queued"]


async def test_the_queue_holds_the_hashed_text_and_still_takes_rows_in_jsonb_form(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    """The queue keeps the exact JCS text its writer hashed (migration 0012), so the sequencer checks a leaf
    without parsing; a row in ``jsonb``'s text form (queued before 0012, or by an older writer during a rolling
    upgrade) is canonicalised from its parsed payload, sequenced and verified all the same."""
    tenant = await _tenant(admin_engine)
    payload = {"b": [1, 2.5], "a": {"z": None, "y": "\u20ac"}}
    async with tenant_transaction(app_engine, tenant) as tx:
        current = await append(tx, "admin", "op", "current", payload)
        legacy = await append(tx, "admin", "op", "legacy", payload)
    async with tenant_transaction(admin_engine, tenant) as tx:
        rows: dict[str, str] = dict(
            (
                await tx.execute(text("SELECT subject, payload FROM audit_queue WHERE tenant_id = :t"), {"t": tenant})
            ).all()
        )
        assert rows["current"] == '{"a":{"y":"\u20ac","z":null},"b":[1,2.5]}'  # JCS, as hashed
        # the older writer's form: what ``CAST(:payload AS jsonb)`` stored before 0012 (trigger off to set it up)
        await tx.execute(text("ALTER TABLE audit_queue DISABLE TRIGGER audit_queue_guard"))
        await tx.execute(
            text(
                "UPDATE audit_queue SET payload = CAST(CAST(payload AS jsonb) AS text) "
                "WHERE tenant_id = :t AND subject = 'legacy'"
            ),
            {"t": tenant},
        )
        await tx.execute(text("ALTER TABLE audit_queue ENABLE TRIGGER audit_queue_guard"))
        stored = (
            await tx.execute(
                text("SELECT payload FROM audit_queue WHERE tenant_id = :t AND subject = 'legacy'"), {"t": tenant}
            )
        ).scalar_one()
    assert stored == '{"a": {"y": "\u20ac", "z": null}, "b": [1, 2.5]}'  # not JCS: spaces, jsonb's own form
    async with tenant_transaction(admin_engine, tenant, commit=False) as tx:
        queued = {q.subject: q for q in await repo.next_queued(tx, 10)}
    assert queued["current"].checked_canonical() == queued["current"].canonical_stored()
    assert leaf_hash(queued["legacy"].canonical_stored()) != legacy.leaf_hash  # its text alone no longer matches
    assert queued["legacy"].checked_canonical() is not None  # from the parsed payload
    assert queued["legacy"].payload == payload
    assert await sequenced(app_engine, tenant) == 2
    logged = {e.subject: e for e in await _entries(admin_engine, tenant)}
    assert logged["legacy"].payload == logged["current"].payload == payload
    assert logged["legacy"].leaf_hash == legacy.leaf_hash and logged["current"].leaf_hash == current.leaf_hash
    report = await verify_tenant(admin_engine, tenant, [SIGNER.public_key])
    assert report.ok, report.summary()


async def test_the_dequeue_removes_only_what_its_own_transaction_sequenced(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    """``firstmile_audit_dequeue`` (the sequencer role's only way to delete) refuses queued entries that are
    not in the log, and entries that an earlier transaction placed there."""
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        queued = await append(tx, "admin", "op", "x", {})
    params = {"tenant": tenant, "created": [queued.created_at], "ids": [queued.entry_id]}
    with pytest.raises(DBAPIError, match="only by being sequenced"):
        async with tenant_transaction(app_engine, tenant) as tx:
            await tx.execute(repo._DEQUEUE, params)
    async with tenant_transaction(app_engine, tenant) as tx:  # placed, but the dequeue is left out
        placed = repo.Placed(queued, 0, GENESIS, entry_hash(GENESIS, queued.canonical()))
        await tx.execute(
            repo._SEQUENCE,
            {
                "tenant": tenant,
                "created": [queued.created_at],
                "ids": [queued.entry_id],
                "seqs": [0],
                "prevs": [placed.prev_hash],
                "hashes": [placed.entry_hash],
            },
        )
    with pytest.raises(DBAPIError, match="only by being sequenced"):
        async with tenant_transaction(app_engine, tenant) as tx:
            await tx.execute(repo._DEQUEUE, params)
    report = await verify_tenant(admin_engine, tenant, [SIGNER.public_key])  # the verifier sees it too
    assert any(p.reason == "queued-twice" for p in report.problems), report.summary()


async def test_checkpoints_sign_the_rfc9162_root(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    cache = TreeCache()
    async with tenant_transaction(app_engine, tenant) as tx:
        assert await create_checkpoint(tx, SIGNER, cache) is None  # empty log
        for i in range(5):
            await append(tx, "key", "kms", f"key:{i}", {"version": i})
    await sequenced(app_engine, tenant)
    async with tenant_transaction(app_engine, tenant) as tx:
        first = await create_checkpoint(tx, SIGNER, cache)
    async with tenant_transaction(app_engine, tenant) as tx:
        assert await create_checkpoint(tx, SIGNER, cache) is None  # nothing new
        for i in range(6):
            await append(tx, "key", "kms", f"key:{i}", {"version": i})
    async with tenant_transaction(app_engine, tenant) as tx:
        assert await create_checkpoint(tx, SIGNER, cache) is None  # queued entries are not in the tree yet
    await sequenced(app_engine, tenant)
    async with tenant_transaction(app_engine, tenant) as tx:
        second = await create_checkpoint(tx, SIGNER, cache)
    assert first is not None and second is not None
    assert (first.tree_size, second.tree_size) == (5, 11)
    leaves = [leaf_hash(e.canonical()) for e in await _entries(admin_engine, tenant)]
    assert first.root_hash == rfc_mth(leaves[:5])
    assert second.root_hash == rfc_mth(leaves)
    async with tenant_transaction(admin_engine, tenant, commit=False) as tx:
        stored = await repo.list_checkpoints(tx)
    assert [c.tree_size for c in stored] == [5, 11]
    for cp in stored:
        body = checkpoint_body(tenant, cp.tree_size, cp.root_hash, cp.signed_at)
        assert verify_signature(SIGNER.public_key, cp.signature, body)
        assert cp.key_id == SIGNER.key_id


async def test_checkpoint_refuses_a_transaction_that_wrote(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    with pytest.raises(AuditError, match="has not written"):
        async with tenant_transaction(app_engine, tenant) as tx:
            await append(tx, "admin", "op", "x", {})
            await create_checkpoint(tx, SIGNER)


async def test_maybe_checkpoint_every_n_entries_or_t_seconds(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)

    async def add(count: int) -> None:
        async with tenant_transaction(app_engine, tenant) as tx:
            for _ in range(count):
                await append(tx, "admin", "op", "x", {})
        await sequenced(app_engine, tenant)

    async def maybe(every_entries: int, every_seconds: float) -> int | None:
        async with tenant_transaction(app_engine, tenant) as tx:
            cp = await maybe_checkpoint(tx, SIGNER, every_entries=every_entries, every_seconds=every_seconds)
        return None if cp is None else cp.tree_size

    await add(2)
    assert await maybe(10, 3600) is None  # 2 < 10 entries, none an hour old
    assert await maybe(10, 0) == 2  # the oldest unsigned entry is old enough (T = 0 s)
    await add(3)
    assert await maybe(10, 3600) is None
    await add(7)
    assert await maybe(10, 3600) == 12  # 10 unsigned entries
    await add(1)
    assert await maybe(10, 0) == 13
    assert await maybe(1, 0) is None  # nothing unsigned


async def test_checkpointer_loop_signs_due_tenants(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        for i in range(3):
            await append(tx, "auth", "sso", f"login:{i}", {})
    await sequenced(app_engine, tenant)
    checkpointer = Checkpointer(app_engine, SIGNER, every_entries=1000, every_seconds=0, poll_seconds=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(checkpointer.run(stop))
    try:
        for _ in range(500):
            async with tenant_transaction(admin_engine, tenant, commit=False) as tx:
                latest = await repo.latest_checkpoint(tx)
            if latest is not None:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert latest is not None and latest.tree_size == 3
    assert all(c.tenant_id != tenant for c in await checkpointer.run_once())  # nothing new to sign


async def test_pending_function_reveals_only_counts(app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, tenant) as tx:
        await append(tx, "admin", "op", "x", {"secret": "s3cr3t"})
    async with app_engine.connect() as conn:  # no tenant context
        queued = {t: (n, at) for t, n, at in await repo.queued_tenants(conn)}
        assert queued[uuid.UUID(str(tenant))][0] == 1
        assert (await conn.execute(text("SELECT count(*) FROM audit_queue"))).scalar_one() == 0
    await sequenced(app_engine, tenant)
    async with app_engine.connect() as conn:  # no tenant context
        rows = await repo.pending_tenants(conn, 1, 0)
        assert (uuid.UUID(str(tenant)), 1, 0) in rows
        assert (uuid.UUID(str(tenant)), 1, 0) not in await repo.pending_tenants(conn, 2, 3600)  # not due yet
        assert (await conn.execute(text("SELECT count(*) FROM audit_entries"))).scalar_one() == 0


async def test_one_tenant_that_cannot_be_sequenced_holds_up_no_other(
    app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    broken, healthy = await _tenant(admin_engine), await _tenant(admin_engine)
    async with tenant_transaction(app_engine, broken) as tx:
        queued = await append(tx, "admin", "op", "x", {})
    async with tenant_transaction(app_engine, broken) as tx:  # an entry placed by hand at seq 0, head not moved
        await tx.execute(
            repo._SEQUENCE,
            {
                "tenant": broken,
                "created": [queued.created_at],
                "ids": [queued.entry_id],
                "seqs": [0],
                "prevs": [GENESIS],
                "hashes": [entry_hash(GENESIS, queued.canonical())],
            },
        )
        await append(tx, "admin", "op", "next", {})
    async with tenant_transaction(app_engine, healthy) as tx:
        await append(tx, "admin", "op", "y", {})
    sequencer = Sequencer(app_engine)
    for _ in range(3):
        await sequencer.run_once()
    assert uuid.UUID(str(broken)) in sequencer.failing
    assert uuid.UUID(str(healthy)) not in sequencer.failing
    assert [e.subject for e in await _entries(admin_engine, healthy)] == ["y"]
