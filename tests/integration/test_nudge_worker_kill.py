"""The nudge delivery worker as Kubernetes runs it (`firstmile scheduler`), killed with SIGKILL mid-batch.

Six stuck users get an e-mail nudge each. The scheduler sends them through a relay in front of Mailpit
(``tests/support/smtp_relay.py``) that stops at a chosen message, where the test kills the process:

1. after Mailpit accepted the third message and before the worker heard ``250`` (the window between
   the provider's acceptance and our record of it, the only place a duplicate may come from);
2. after the lease ran out, a second scheduler is killed before the next message reached Mailpit;
3. after the lease ran out again, a third scheduler finishes the batch.

Every user gets the nudge; only the one killed in window 1 gets it twice, with one ``Message-ID``.
The test has a database of its own, so the scheduler's delivery worker sees no other test's sends.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.kit.db import create_engine
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import NudgeExecutor
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from tests.conftest import _TAG, PEPPER, Database, Mailpit, make_settings, migrated_database, new_tenant
from tests.support.smtp_relay import SmtpRelay
from tests.support.workers import Worker

pytestmark = pytest.mark.xdist_group("mailpit")

OPS = OperatorContext("worker:test-nudge-kill")
USERS = 6


@pytest.fixture(scope="module")
def kill_database(worker_id: str) -> Database:
    return migrated_database(f"firstmile_test_{_TAG}nudge_kill_{worker_id}")


async def _statuses(url: str) -> dict[str, str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT user_id, status FROM nudge_sends"))
            return {r[0]: r[1] for r in rows}
    finally:
        await engine.dispose()


async def _expire_leases(url: str) -> None:
    """What two minutes do to a dead worker's claims (the lease), without waiting two minutes."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE nudge_sends SET claimed_until = now() - interval '1 second' WHERE status = 'sending'")
            )
    finally:
        await engine.dispose()


async def _mails(mailpit: Mailpit, address: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        found = (await http.get("/api/v1/search", params={"query": f"to:{address}"})).raise_for_status().json()
        return [(await http.get(f"/api/v1/message/{m['ID']}")).raise_for_status().json() for m in found["messages"]]


async def _killed_at_hold(worker: Worker, relay: SmtpRelay) -> str:
    await asyncio.wait_for(relay.holding.wait(), timeout=60)
    worker.process.kill()  # SIGKILL: no handler runs, nothing is recorded
    worker.process.wait()
    worker.handle.close()
    assert relay.held is not None
    return relay.held


async def test_a_scheduler_killed_mid_batch_loses_no_nudge_and_duplicates_only_inside_the_window(
    kill_database: Database, start_worker: Any, mailpit: Mailpit, analytics_store: ChdbStore, tmp_path: Path
) -> None:
    db = kill_database
    data_dir = tmp_path / "data"
    admin = create_async_engine(db.admin_url)
    try:
        tenant = await new_tenant(admin)
    finally:
        await admin.dispose()
    domain = f"kill-{uuid.uuid4().hex[:8]}.test"
    users = [f"k{i}-{uuid.uuid4().hex[:6]}" for i in range(USERS)]
    # the worker's chdb store: chdb allows one data path per process
    app = create_app(make_settings(data_dir=data_dir), db.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app) as client:
        for user in users:
            traits = {"persona": "developer", "email": f"{user}@{domain}"}
            r = await client.post("/v1/onboarding/start", json={"user_id": user, "traits": traits},
                                  headers=tenant.headers)  # fmt: skip
            assert r.status_code == 201, r.text
    engine = create_engine(db.app_url, pool_size=2, max_overflow=0, application_name="test-nudge-kill")
    executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email"], NudgePolicy(quiet_start=None,
                             quiet_end=None), ThompsonSampler(random.Random(4)))  # fmt: skip
    try:
        for user in users:
            decide = partial(executor.on_stuck, user_id=user, step_id="create-api-key", now=datetime.now(UTC))
            await UnitOfWork(engine, OPS.tenant(tenant.id)).run(decide)
    finally:
        await engine.dispose()
    assert set((await _statuses(db.admin_url)).values()) == {"scheduled"}

    relay = SmtpRelay(mailpit.smtp_host, mailpit.smtp_port, domain)
    port = await relay.start()
    env = {
        "FIRSTMILE_NUDGE_SMTP_URL": f"smtp://127.0.0.1:{port}",
        "FIRSTMILE_NUDGE_EMAIL_FROM": "nudges@firstmile.test",
        "FIRSTMILE_NUDGE_IN_APP": "off",
        "FIRSTMILE_NUDGE_DELIVERY_INTERVAL_SECONDS": "0.2",
        "FIRSTMILE_NUDGE_TRIGGER_SCAN_SECONDS": "0",
        "FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS": "0",
        "FIRSTMILE_DATA_DIR": str(data_dir),
        "FIRSTMILE_KEK_FILE": str(data_dir / "secrets" / "kek"),  # the key the users' e-mails were sealed under
    }
    try:
        # 1. killed after Mailpit accepted a message, before the worker could record it
        relay.hold("after", skip=2)  # the third message
        first = start_worker(["scheduler"], db, **env)
        duplicated = await _killed_at_hold(first, relay)
        after_first = await _statuses(db.admin_url)
        assert after_first[duplicated.split("@")[0]] == "sending"  # accepted by the provider, not recorded
        # 2. the lease runs out; the next worker is killed before its first message reached Mailpit
        await _expire_leases(db.admin_url)
        relay.hold("before", spare=duplicated)  # the copy of the first window's message goes through
        second = start_worker(["scheduler"], db, **env)
        lost_in_flight = await _killed_at_hold(second, relay)
        assert lost_in_flight != duplicated
        # 3. the lease runs out again; a third worker finishes the batch
        await _expire_leases(db.admin_url)
        relay.release()
        third = start_worker(["scheduler"], db, **env)
        deadline = time.monotonic() + 60
        while set((await _statuses(db.admin_url)).values()) != {"sent"}:
            assert time.monotonic() < deadline, await _statuses(db.admin_url)
            await asyncio.sleep(0.2)
        code, output = third.stop()
        assert code == 0, output[-3000:]
    finally:
        await relay.close()

    received = {user: await _mails(mailpit, f"{user}@{domain}") for user in users}
    counts = {user: len(mails) for user, mails in received.items()}
    duplicated_user = duplicated.split("@")[0]
    assert counts == {user: 2 if user == duplicated_user else 1 for user in users}, counts  # nothing lost
    twice = received[duplicated_user]
    assert twice[0]["MessageID"] == twice[1]["MessageID"]  # one Message-ID: the receiver can drop the copy
