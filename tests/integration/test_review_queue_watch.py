"""The review queue's scheduled check end to end (docs/review.md), on PostgreSQL, Mailpit and a loopback webhook:
the gauges hold every tenant's pending reviews and the oldest one's age; a tenant's queue passing its threshold
notifies its reviewers once (e-mail and signed webhook), not again while it stays past it, not after a restart, and
again after it dropped back and passed it anew; a failed delivery is retried; a tenant with no targets is only
recorded; a check that cannot read the queues fails the supervised task, which readiness names."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.analytics.alerts import verify_webhook, webhook_secret_bytes
from firstmile.analytics.review_watch import NOTICE_TYPE, WORKER, ReviewQueueWatch
from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.kit.supervisor import Supervisor
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.email_smtp import SmtpChannel
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy import service as tenancy
from firstmile.wiring.adapters import ChannelMailer
from tests.conftest import Mailpit, new_tenant
from tests.integration import test_dropoff_alerts as dropoff
from tests.integration.test_dropoff_alerts import (  # the drop-off alerts' receivers: the same delivery code
    SECRET,
    SECRET_ENV,
    Hook,
    alerting_tenant,
    mail_to,
)

pytestmark = pytest.mark.xdist_group("mailpit")
receiver = dropoff.hook  # the fixture of a loopback webhook receiver, under this name here

UNREACHABLE = "postgresql+asyncpg://nobody@127.0.0.1:9/nothing"  # the discard port: nothing listens
THRESHOLD = 3


def watch(engine: AsyncEngine, mailpit: Mailpit, threshold: int = THRESHOLD) -> ReviewQueueWatch:
    mailer = ChannelMailer(SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "alerts@firstmile.test"))
    return ReviewQueueWatch(engine, threshold=threshold, mailer=mailer, public_url="https://firstmile.test",
                            environ={SECRET_ENV: SECRET})  # fmt: skip


async def queue_reviews(engine: AsyncEngine, tenant_id: uuid.UUID, count: int) -> list[int]:
    """Start ``count`` new users and queue a partial match of their first step for review; the reviews' ids."""
    service = OnboardingService(CatalogCache())
    uow = UnitOfWork(engine, OPERATOR_CLI.tenant(tenant_id))
    revision = await uow.run(tenancy.revision)
    ids = []
    for _ in range(count):
        user = f"u-{uuid.uuid4().hex[:10]}"
        await service.start(uow, revision, user, {"persona": "developer"})

        async def queue(tx: TenantTx, user: str = user) -> int:
            row = await service.review_completion(
                tx, user, "create-api-key", reason="partial_match", source="segment", occurred_at=datetime.now(UTC),
                details={"met": 1, "of": 2},
            )  # fmt: skip
            assert row is not None
            return row.id

        ids.append(await uow.run(queue))
    return ids


async def reject(engine: AsyncEngine, tenant_id: uuid.UUID, review_ids: list[int]) -> None:
    service = OnboardingService(CatalogCache())
    uow = UnitOfWork(engine, OPERATOR_CLI.tenant(tenant_id))
    for review_id in review_ids:

        async def decide(tx: TenantTx, review_id: int = review_id) -> None:
            await service.decide_review(tx, review_id, "reject", reviewer="editor@acme.example", note="not yet")

        await uow.run(decide)


async def crossings(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    async with admin_engine.connect() as conn:
        found = await conn.execute(
            text("SELECT * FROM review_queue_alerts WHERE tenant_id = :t ORDER BY crossed_at"), {"t": tenant_id}
        )
        return [dict(r._mapping) for r in found]


async def audited(admin_engine: AsyncEngine, tenant_id: uuid.UUID, subject: str) -> list[tuple[str, dict[str, Any]]]:
    async with admin_engine.connect() as conn:
        found = await conn.execute(
            text("SELECT actor, payload FROM audit_queue WHERE tenant_id = :t AND kind = 'review' AND subject = :s"
                 " UNION ALL SELECT actor, payload::text FROM audit_entries WHERE tenant_id = :t AND kind = 'review'"
                 " AND subject = :s"),
            {"t": tenant_id, "s": subject},
        )  # fmt: skip
        return sorted(((r[0], json.loads(r[1])) for r in found), key=lambda e: str(e[1]["review_queue"]))


async def pending_now(admin_engine: AsyncEngine) -> dict[str, tuple[int, datetime]]:
    """Every tenant's pending reviews by kind, as the platform admin reads them."""
    async with admin_engine.connect() as conn:
        pending = "SELECT kind, count(*), min(created_at) FROM onboarding_reviews WHERE status = 'pending'"
        found = await conn.execute(text(pending + " GROUP BY kind"))
        return {r[0]: (int(r[1]), r[2]) for r in found}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def of(checks: list[Any], tenant_id: uuid.UUID) -> Any:
    found = [c for c in checks if c.tenant == WORKER.tenant(tenant_id)]
    return found[0] if found else None


async def test_a_queue_past_its_threshold_notifies_once_per_crossing(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, mailpit: Mailpit, receiver: Hook
) -> None:
    tenant = await alerting_tenant(admin_engine, receiver.url)
    created_before = metric("firstmile_reviews_created_total", kind="ambiguous", reason="partial_match")
    decided_before = metric("firstmile_reviews_decided_total", kind="ambiguous", status="rejected")
    checker = watch(app_engine, mailpit)
    first = await queue_reviews(app_engine, tenant.id, THRESHOLD)

    # at the threshold: measured, not notified
    now = datetime.now(UTC)
    assert of(await checker.run_once(now), tenant.id) is None
    pending = await pending_now(admin_engine)
    for kind in ("step", "ambiguous", "decision"):
        count, oldest = pending.get(kind, (0, now))
        assert metric("firstmile_review_queue_length", kind=kind) == count
        assert metric("firstmile_review_queue_oldest_seconds", kind=kind) == (now - oldest).total_seconds()
    assert pending["ambiguous"][0] >= THRESHOLD
    assert await crossings(admin_engine, tenant.id) == [] and receiver.received == []

    # one more: past it, the reviewers are notified by e-mail and webhook
    more = await queue_reviews(app_engine, tenant.id, 1)
    check = of(await checker.run_once(), tenant.id)
    assert (check.action, check.pending, check.delivered, check.failed_deliveries) == ("crossed", 4, 2, 0)
    [stored] = await crossings(admin_engine, tenant.id)
    assert (stored["pending"], stored["threshold"], stored["by_kind"]) == (4, THRESHOLD, {"ambiguous": 4})
    assert stored["delivered_at"] is not None and stored["cleared_at"] is None
    assert {k: v["status"] for k, v in stored["delivery"].items()} == {
        f"email:{tenant.email}": "delivered", f"webhook:{receiver.url}": "delivered"}  # fmt: skip
    [mail] = await mail_to(mailpit, tenant.email)
    assert mail["Subject"] == f"[Firstmile] Tenant {tenant.slug}: 4 reviews waiting (threshold 3)"
    assert mail["MessageID"] == f"review-queue-{stored['id'].hex}@firstmile.test"
    body = mail["Text"].replace("\r\n", "\n")
    assert "4 reviews are waiting in the review queue, more than the threshold of 3.\nBy kind: ambiguous 4.\n" in body
    assert "Review queue: https://firstmile.test/admin/reviews\n" in body
    [(headers, raw)] = receiver.received
    assert headers["webhook-id"] == str(stored["id"])
    assert verify_webhook(webhook_secret_bytes(SECRET), headers, raw, now=int(time.time()))
    payload = json.loads(raw)
    assert payload["type"] == NOTICE_TYPE == "review_queue.threshold_crossed"
    assert payload["data"] | {"oldest_at": None} == {
        "id": str(stored["id"]), "tenant": tenant.slug, "pending": 4, "threshold": 3, "by_kind": {"ambiguous": 4},
        "oldest_at": None, "review_queue": "https://firstmile.test/admin/reviews"}  # fmt: skip
    assert datetime.fromisoformat(payload["data"]["oldest_at"]) == stored["oldest_at"]

    # still past it, and after a restart (a new watch): not again
    assert of(await checker.run_once(), tenant.id).action == "over"
    assert of(await watch(app_engine, mailpit).run_once(), tenant.id).action == "over"
    assert len(receiver.received) == 1 and len(await mail_to(mailpit, tenant.email)) == 1

    # back at the threshold: cleared (re-armed), audited
    await reject(app_engine, tenant.id, first[:2])
    check = of(await checker.run_once(), tenant.id)
    assert (check.action, check.pending) == ("cleared", 2)
    [cleared] = await crossings(admin_engine, tenant.id)
    assert cleared["cleared_at"] is not None
    assert [(actor, entry["review_queue"], entry["pending"]) for actor, entry in
            await audited(admin_engine, tenant.id, f"review-queue:{stored['id']}")] == [
        ("worker:review-queue", "cleared", 2), ("worker:review-queue", "over_threshold", 4)]  # fmt: skip
    assert of(await checker.run_once(), tenant.id) is None  # below and armed: nothing to do

    # past it anew: a second notification
    await queue_reviews(app_engine, tenant.id, 2)
    check = of(await checker.run_once(), tenant.id)
    assert (check.action, check.pending, check.delivered) == ("crossed", 4, 2)
    first_crossing, second = await crossings(admin_engine, tenant.id)
    assert first_crossing["id"] == stored["id"] and second["id"] != stored["id"] and second["cleared_at"] is None
    assert len(receiver.received) == 2 and len(await mail_to(mailpit, tenant.email)) == 2
    assert json.loads(receiver.received[1][1])["data"]["id"] == str(second["id"])

    assert len(first + more) == 4
    created = metric("firstmile_reviews_created_total", kind="ambiguous", reason="partial_match") - created_before
    assert created == 6
    assert metric("firstmile_reviews_decided_total", kind="ambiguous", status="rejected") - decided_before == 2


async def test_a_failed_delivery_is_retried_while_the_queue_stays_past_it(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, mailpit: Mailpit, receiver: Hook
) -> None:
    tenant = await alerting_tenant(admin_engine, receiver.url)
    await queue_reviews(app_engine, tenant.id, 2)
    receiver.statuses = [503]
    checker = watch(app_engine, mailpit, threshold=1)

    check = of(await checker.run_once(), tenant.id)
    assert (check.action, check.delivered, check.failed_deliveries) == ("crossed", 1, 1)
    [stored] = await crossings(admin_engine, tenant.id)
    assert stored["delivered_at"] is None
    assert stored["delivery"][f"webhook:{receiver.url}"] | {"at": None} == {
        "status": "failed", "attempts": 1, "at": None, "error": "the webhook answered 503"}  # fmt: skip

    check = of(await checker.run_once(), tenant.id)
    assert (check.action, check.delivered, check.failed_deliveries) == ("over", 1, 0)  # the webhook only
    [stored] = await crossings(admin_engine, tenant.id)
    assert stored["delivered_at"] is not None
    assert stored["delivery"][f"webhook:{receiver.url}"]["attempts"] == 2
    assert stored["delivery"][f"email:{tenant.email}"]["attempts"] == 1
    assert len(await mail_to(mailpit, tenant.email)) == 1
    assert [h["webhook-id"] for h, _ in receiver.received] == [str(stored["id"])] * 2  # the same id: deduplicable

    assert of(await checker.run_once(), tenant.id).delivered == 0  # delivered: nothing more


async def test_a_tenant_without_alert_targets_is_only_recorded(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, mailpit: Mailpit
) -> None:
    tenant = await new_tenant(admin_engine)  # its manifest has no alerts: section
    await queue_reviews(app_engine, tenant.id, 2)
    check = of(await watch(app_engine, mailpit, threshold=1).run_once(), tenant.id)
    assert (check.action, check.delivered, check.failed_deliveries) == ("crossed", 0, 0)
    [stored] = await crossings(admin_engine, tenant.id)
    assert stored["delivered_at"] == stored["crossed_at"] and stored["delivery"] == {}


async def test_a_check_that_cannot_read_the_queues_fails_its_task_for_readiness() -> None:
    engine = create_async_engine(UNREACHABLE, connect_args={"timeout": 2})
    supervisor = Supervisor(failing_after=2, base_backoff_s=0.05, max_backoff_s=0.1)
    supervisor.every("review-queue", 0.05, ReviewQueueWatch(engine, threshold=THRESHOLD).run_once)
    supervisor.start()
    try:
        for _ in range(600):  # bounded: 30 s
            if "review-queue" in supervisor.failing():
                break
            await asyncio.sleep(0.05)
        failing = supervisor.failing()
        assert "review-queue" in failing, supervisor.states()
        assert failing["review-queue"].summary().startswith("failing: ")
    finally:
        await supervisor.stop()
        await engine.dispose()
