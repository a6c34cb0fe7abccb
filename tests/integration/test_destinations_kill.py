"""The destinations' delivery worker as Kubernetes runs it (`firstmile scheduler`), killed with SIGKILL mid-batch.

Forty lifecycle events of five users are queued for a webhook destination whose batches are twenty events. The
endpoint (on 127.0.0.1, verifying every request with ``standardwebhooks``) records the first requests, then holds
the next ones unanswered; the test kills the scheduler while it waits, so the batch was received in part and none
of it was recorded. After the claim's lease runs out a second scheduler sends everything: the endpoint got every
idempotency key, the copies only of what the first one had sent, and counted by ``webhook-id`` each event once.
The test has a database of its own, so the scheduler's worker sees no other test's queue.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.controlplane.service import apply_manifest
from firstmile.destinations import service
from firstmile.destinations.consumer import DestinationFeed
from firstmile.destinations.policy import new_webhook_secret
from firstmile.events.envelope import Envelope
from firstmile.kit.db import create_engine
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.security.keys import LocalKekProvider
from tests.conftest import _TAG, REGION, Database, migrated_database
from tests.factories import demo_document, manifest_for, provisioned_kek
from tests.support.webhook_receiver import WebhookReceiver
from tests.support.workers import Worker

OPS = OperatorContext("worker:test-destination-kill")
USERS, EACH = 5, 8


@pytest.fixture(scope="module")
def kill_database(worker_id: str) -> Database:
    return migrated_database(f"firstmile_test_{_TAG}dest_kill_{worker_id}")


async def _statuses(url: str) -> list[tuple[str, str, bool]]:
    """Every queued row: its event id (hex), status, and whether a claim holds it."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT event_id, status, claimed_until IS NOT NULL FROM destination_queue ORDER BY id")
            )
            return [(r[0].hex, str(r[1]), bool(r[2])) for r in rows]
    finally:
        await engine.dispose()


async def _expire_leases(url: str) -> None:
    """What the lease's end does to a dead worker's claims, without waiting for it."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE destination_queue SET claimed_until = now() - interval '1 second'"
                     " WHERE claimed_until IS NOT NULL")
            )  # fmt: skip
    finally:
        await engine.dispose()


def _events(tenant_id: uuid.UUID) -> list[Envelope]:
    """Five users' step completions, as the relay hands them to the consumer."""
    now = datetime.now(UTC)
    found = []
    for step in range(EACH):
        for user in range(USERS):
            payload: dict[str, Any] = {"user_id": f"k{user}", "path_id": "developer-quickstart", "path_version": 1,
                                       "step_id": f"step-{step}", "occurred_at": now.isoformat()}  # fmt: skip
            found.append(Envelope(uuid.uuid4(), tenant_id, "onboarding.step_completed", now, payload, f"k{user}"))
    return found


async def test_a_worker_killed_mid_batch_loses_nothing_and_the_receiver_counts_each_event_once(
    kill_database: Database, start_worker: Any, tmp_path: Path
) -> None:
    db = kill_database
    kek = provisioned_kek(tmp_path / "keys" / "kek")
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        admin = create_async_engine(db.admin_url)
        try:
            slug = f"t-{secrets.token_hex(5)}"
            doc = demo_document() | {"destinations": [{"name": "hooks", "kind": "webhook", "url": receiver.url,
                                                       "max_batch": 20}]}  # fmt: skip
            tenant_id = (await apply_manifest(admin, manifest_for(slug, REGION, doc))).tenant_id
        finally:
            await admin.dispose()
        engine = create_engine(db.app_url, pool_size=2, max_overflow=0, application_name="test-destination-kill")
        keyring = DataKeyService(engine, LocalKekProvider(kek, create=False))
        try:
            uow = UnitOfWork(engine, OPS.tenant(tenant_id))

            async def store(tx: Any, keys: TenantKeys) -> service.CredentialsSet:
                return await service.set_credentials(tx, keys, "hooks", {"secret": secret}, actor="operator:test")

            await keyring.run_with_keys(uow, store)
            await DestinationFeed(engine, keyring).handle(_events(tenant_id))
        finally:
            await engine.dispose()
        queued = await _statuses(db.admin_url)
        assert len(queued) == USERS * EACH and {s for _, s, _ in queued} == {"pending"}

        env = {
            "FIRSTMILE_KEK_FILE": str(kek),  # the key the tenant's data key (and so the webhook secret) is under
            "FIRSTMILE_DESTINATION_POLL_SECONDS": "0.2",
            # generous, so that a slow machine neither lets the lease run out nor times out a held request (either
            # releases a claim: a row received, then pending and unclaimed at the kill) before the kill
            "FIRSTMILE_DESTINATION_LEASE_SECONDS": "120",
            "FIRSTMILE_DESTINATION_TIMEOUT_SECONDS": "90",
            "FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS": "0",
            "FIRSTMILE_EXPERIMENT_REVIEW_SECONDS": "0",
            "FIRSTMILE_DROPOFF_ALERT_SECONDS": "0",
        }
        # 1. killed while the endpoint holds the first batch's later requests: six were received and answered
        receiver.hold(after=6)
        first: Worker = start_worker(["scheduler"], db, **env)
        deadline = time.monotonic() + 90
        while not receiver.held.is_set():
            assert first.process.poll() is None, first.log.read_text()[-3000:]
            assert time.monotonic() < deadline, first.log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        first.process.kill()  # SIGKILL: nothing is recorded
        first.process.wait()
        first.handle.close()
        received_first = set(receiver.ids)
        assert len(received_first) > 6
        after_kill = await _statuses(db.admin_url)
        assert {s for _, s, _ in after_kill} == {"pending"}  # received in part, recorded not at all
        claimed = {event for event, _, held in after_kill if held}
        # the whole first batch waits for its lease, and the second, claimed while the first was sent
        why = (after_kill, received_first, first.log.read_text()[-3000:])
        assert received_first <= claimed and len(claimed) == 40, why

        # 2. the lease runs out; a second scheduler sends everything
        await _expire_leases(db.admin_url)
        receiver.recover()
        second: Worker = start_worker(["scheduler"], db, **env)
        deadline = time.monotonic() + 90
        while {s for _, s, _ in await _statuses(db.admin_url)} != {"done"}:
            assert second.process.poll() is None, second.log.read_text()[-3000:]
            assert time.monotonic() < deadline, (await _statuses(db.admin_url), second.log.read_text()[-3000:])
            await asyncio.sleep(0.2)
        code, output = second.stop()
        assert code == 0, output[-3000:]

    every = {event for event, _, _ in queued}
    assert set(receiver.unique()) == every  # nothing lost
    assert len(receiver.unique()) == USERS * EACH  # counted by idempotency key: each event exactly once
    copies = {i for i in receiver.ids if receiver.ids.count(i) > 1}
    assert copies and copies <= received_first  # only what the killed worker had sent came twice
    assert all(receiver.ids.count(i) <= 2 for i in every)
    assert receiver.refused == []
    for user in range(USERS):  # and each user's events arrived in order
        steps = [p["data"]["properties"]["step_id"] for p in receiver.unique().values()
                 if p["data"]["user_id"] == f"k{user}"]  # fmt: skip
        assert steps == [f"step-{i}" for i in range(EACH)]
