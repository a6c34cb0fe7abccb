"""Nudge triggers declared on paths in the manifest, on the real stack: step_idle and event_missing fired by the
scan, event_missing satisfied by the tracked event, activated fired by the consumer, each once per user."""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.events.envelope import Envelope
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.ml.nudge_prior import ModelResponsePrior
from firstmile.nudges import repository as repo
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.consumer import NudgeTriggers
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import NudgeExecutor, withdraw
from firstmile.nudges.triggers import TriggerScanner
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings
from tests.factories import demo_document, manifest_for
from tests.support.nudges import started_envelope

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("worker:test-nudge-triggers")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None, daily_cap=5)


def _executor() -> NudgeExecutor:
    return NudgeExecutor(
        OnboardingService(CatalogCache()), ["email", "in_app"], ANYTIME, ThompsonSampler(random.Random(1))
    )


async def _start(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, *, days_ago: float) -> str:
    user_id = f"tr-{uuid.uuid4().hex[:10]}"
    r = await client.post(
        "/v1/onboarding/start", json={"user_id": user_id, "traits": {"persona": "developer"}}, headers=tenant.headers
    )
    assert r.status_code == 201 and r.json()["path"]["id"] == "developer-quickstart", r.text
    async with admin_engine.begin() as conn:  # the user started (and last moved) that long ago
        await conn.execute(
            text(
                "UPDATE user_progress SET started_at = now() - make_interval(secs => :s),"
                " updated_at = now() - make_interval(secs => :s) WHERE tenant_id = :t AND user_id = :u"
            ),
            {"s": days_ago * 86_400, "t": tenant.id, "u": user_id},
        )
    return user_id


async def _complete(client: Client, tenant: TenantFixture, user_id: str, step: str) -> None:
    r = await client.post(f"/v1/onboarding/{user_id}/steps/{step}/complete", headers=tenant.headers)
    assert r.status_code == 200, r.text


async def _sends(app_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> list[repo.SendRow]:
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        return await repo.sends_for(tx, user_id)


async def test_step_idle_fires_once_for_users_idle_on_the_step_with_the_manifest_wording(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    idle = await _start(client, tenant, admin_engine, days_ago=0)
    await _complete(client, tenant, idle, "create-api-key")  # now on install-sdk
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET updated_at = now() - interval '25 hours'"
                " WHERE tenant_id = :t AND user_id = :u"
            ),
            {"t": tenant.id, "u": idle},
        )
    fresh = await _start(client, tenant, admin_engine, days_ago=0)
    await _complete(client, tenant, fresh, "create-api-key")  # on install-sdk, but only just
    elsewhere = await _start(client, tenant, admin_engine, days_ago=2)  # idle, but on create-api-key
    scanner = TriggerScanner(app_engine, _executor())
    assert OPS.tenant(tenant.id) in {OPS.tenant(t) for t in await _tenant_ids(scanner)}
    fired = await scanner.scan_tenant(OPS.tenant(tenant.id), datetime.now(UTC))
    mine = [f for f in fired if f.trigger == "sdk-idle"]
    assert [(f.user_id, f.decided.status) for f in mine] == [(idle, "scheduled")]
    [send] = await _sends(app_engine, tenant, idle)
    assert send.trigger_key == "sdk-idle:install-sdk" and send.decision["trigger"] == "manifest:sdk-idle"
    assert send.decision["content"]["source"] == "manifest" and send.decision["content"]["variant"] == "direct"
    assert "Install the SDK" in (send.subject or "") + send.body
    assert await _sends(app_engine, tenant, fresh) == [] and await _sends(app_engine, tenant, elsewhere) == []
    again = await scanner.scan_tenant(OPS.tenant(tenant.id), datetime.now(UTC))
    assert [f for f in again if f.trigger == "sdk-idle"] == []  # once per user and step


async def _tenant_ids(scanner: TriggerScanner) -> list[uuid.UUID]:
    return [uuid.UUID(str(t)) for t in await scanner.tenants()]


async def test_event_missing_fires_after_the_window_unless_the_event_came(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    silent = await _start(client, tenant, admin_engine, days_ago=4)
    sender = await _start(client, tenant, admin_engine, days_ago=4)
    recent = await _start(client, tenant, admin_engine, days_ago=1)
    executor = _executor()
    consumer = NudgeTriggers(app_engine, executor, timedelta(hours=72))
    track = Envelope(
        uuid.uuid4(), tenant.id, "track", datetime.now(UTC),
        {"userId": sender, "event": "Event Received", "properties": {"environment": "staging"}},
    )  # fmt: skip
    other = Envelope(uuid.uuid4(), tenant.id, "track", datetime.now(UTC), {"userId": silent, "event": "Page Viewed"})
    assert await consumer.handle([track, other]) == [] and consumer.satisfied == 1
    fired = await TriggerScanner(app_engine, executor).scan_tenant(OPS.tenant(tenant.id), datetime.now(UTC))
    missing = {f.user_id: f.decided.status for f in fired if f.trigger == "no-first-event"}
    assert missing == {silent: "scheduled"}  # not the sender (satisfied), not the recent one (window open)
    [send] = [s for s in await _sends(app_engine, tenant, silent) if s.trigger_key == "no-first-event:-"]
    # the trigger's own wording where it has one (e-mail), the manifest's stuck wording elsewhere (in-app)
    assert send.decision["content"]["variant"] == {"email": "docs", "in_app": "direct"}[send.channel]
    assert send.channel != "email" or "Your first event in" in (send.subject or "")
    [satisfied] = await _sends(app_engine, tenant, sender)
    assert satisfied.status == "satisfied" and satisfied.decision["satisfied_by"] == "Event Received"
    assert await _sends(app_engine, tenant, recent) == []
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        assert await repo.budget_times(tx, sender, datetime(2000, 1, 1, tzinfo=UTC)) == []  # not a nudge


async def _tenant_with(admin_engine: AsyncEngine, change: Callable[[dict[str, Any]], None]) -> TenantFixture:
    """A tenant whose manifest is the demo's with ``change`` made to its ``nudges:`` section."""
    doc: dict[str, Any] = demo_document()
    change(doc["nudges"])
    slug = f"t-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, doc)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


@pytest.fixture
async def activated_tenant(admin_engine: AsyncEngine) -> TenantFixture:
    """A tenant whose manifest adds an ``activated`` trigger (with its own wording) to the demo's."""

    def welcome(nudges: dict[str, Any]) -> None:
        nudges["triggers"].append({"id": "welcome", "path": "developer-quickstart", "when": "activated"})
        nudges["templates"].append(
            {"trigger": "welcome", "variant": "next", "channel": "in_app", "subject": "You're live",
             "body": "{{ step.title }} done: see what {{ tenant.name }} can do next."}
        )  # fmt: skip

    return await _tenant_with(admin_engine, welcome)


async def test_a_trigger_of_another_category_needs_a_grant_and_an_unsubscribe_withdraws_that_category(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    def product(nudges: dict[str, Any]) -> None:
        [idle] = [t for t in nudges["triggers"] if t["id"] == "sdk-idle"]
        idle["category"] = "product"

    tenant = await _tenant_with(admin_engine, product)
    users = []
    for _ in range(2):  # both sit on install-sdk for a day
        user_id = await _start(client, tenant, admin_engine, days_ago=0)
        await _complete(client, tenant, user_id, "create-api-key")
        async with admin_engine.begin() as conn:
            await conn.execute(
                text("UPDATE user_progress SET updated_at = now() - interval '25 hours' WHERE tenant_id = :t"
                     " AND user_id = :u"), {"t": tenant.id, "u": user_id},
            )  # fmt: skip
        users.append(user_id)
    never_asked, agreed = users
    granted = await client.put(f"/v1/users/{agreed}/consents/email/product", json={"granted": True},
                               headers=tenant.headers)  # fmt: skip
    assert granted.status_code == 204, granted.text
    fired = await TriggerScanner(app_engine, _executor()).scan_tenant(OPS.tenant(tenant.id), datetime.now(UTC))
    assert {f.user_id: f.decided.status for f in fired if f.trigger == "sdk-idle"} == {
        never_asked: "denied", agreed: "scheduled"}  # fmt: skip
    [denied] = await _sends(app_engine, tenant, never_asked)
    assert denied.decision["category"] == "product" and denied.decision["reasons"] == ["no-consent"]
    [send] = await _sends(app_engine, tenant, agreed)
    assert send.channel == "email" and send.decision["category"] == "product"  # in-app was never granted
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        assert await withdraw(tx, send, "link", "one-click unsubscribe")
    listed = (await client.get(f"/v1/users/{agreed}/consents", headers=tenant.headers)).json()["consents"]
    assert listed == [{"channel": "email", "category": "product", "granted": False}]  # onboarding untouched


async def test_activated_fires_once_on_the_activation_event(
    client: Client, activated_tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = activated_tenant
    user_id = await _start(client, tenant, admin_engine, days_ago=0)
    for step in ("create-api-key", "install-sdk", "send-first-event"):
        await _complete(client, tenant, user_id, step)
    async with admin_engine.connect() as conn:
        [(event_id, occurred_at, payload)] = (
            await conn.execute(
                text(
                    "SELECT event_id, occurred_at, payload FROM outbox WHERE tenant_id = :t"
                    " AND event_type = 'onboarding.activated' AND payload->>'user_id' = :u"
                ),
                {"t": tenant.id, "u": user_id},
            )
        ).all()
    activated = Envelope(event_id, tenant.id, "onboarding.activated", occurred_at, dict(payload))
    consumer = NudgeTriggers(app_engine, _executor(), timedelta(hours=72))
    assert await consumer.handle([activated]) == [] and consumer.decided == 1
    assert await consumer.handle([activated]) == [] and consumer.decided == 1  # redelivered: fires once
    [send] = [s for s in await _sends(app_engine, tenant, user_id) if s.trigger_key == "welcome:-"]
    assert send.channel == "in_app" and send.body.startswith("Send your first event done")


async def test_the_scan_asks_the_response_model_about_each_user_due_and_a_stranger_still_gets_nudged(
    database: Database,
    analytics_store: ChdbStore,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    tiny_registry: Path,
) -> None:
    app = create_app(make_settings(model_registry_uri=str(tiny_registry)), database.app_url, PEPPER,
                     analytics=analytics_store)  # fmt: skip
    async with AsyncTestClient(app=app) as client:
        container = app.state.container
        known = await _start(client, tenant, admin_engine, days_ago=4)
        stranger = await _start(client, tenant, admin_engine, days_ago=4)
        await container.features.apply([await started_envelope(admin_engine, tenant, known)])
        prior = ModelResponsePrior(container.inference, container.feature_reader, timeout_s=5.0)
        scanner = TriggerScanner(app_engine, _executor(), prior=prior)
        fired = await scanner.scan_tenant(OPS.tenant(tenant.id), datetime.now(UTC))
    missing = {f.user_id: f.decided.status for f in fired if f.trigger == "no-first-event"}
    assert missing[known] == "scheduled" and missing[stranger] == "scheduled"
    [send] = await _sends(app_engine, tenant, known)
    recorded = send.decision["prior"]
    assert recorded["fallback"] is None and recorded["version"] is not None
    assert set(recorded["probabilities"]) == {"email", "in_app"}
    # the chosen arm's Beta prior came from the prediction: mean (1 + 10p) / 12 before any reward
    mean = send.decision["bandit"]["posterior_means"][send.arm]
    assert mean == pytest.approx((1 + 10 * recorded["probabilities"][send.channel]) / 12, abs=1e-5)
    [other] = await _sends(app_engine, tenant, stranger)  # no features: a uniform prior, and still a decision
    assert other.decision["prior"]["fallback"] == "no_features"
    assert other.decision["bandit"]["posterior_means"][other.arm] == pytest.approx(0.5)
