"""The nudge executor on the real stack: stuck → decision → send → the mail in Mailpit.

The chain as it runs in the platform, each part real: a user started through the API with a sealed
e-mail address, the stuck scan (time rule) writing ``onboarding.stuck`` to the outbox, the trigger
consumer deciding from that event (policy, bandit, template, audit), and the delivery worker
decrypting the address and sending through SMTP to Mailpit.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.events.envelope import Envelope
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.ml.nudge_prior import ModelResponsePrior
from firstmile.nudges import repository as repo
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.channels import Channel, OutboundMessage, Receipt
from firstmile.nudges.consumer import NudgeTriggers
from firstmile.nudges.email_smtp import SmtpChannel
from firstmile.nudges.links import CLICK, LinkSigner
from firstmile.nudges.personalise import Personaliser
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import DeliveryWorker, NudgeExecutor
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.onboarding.stuck import StuckScanner
from firstmile.security.datakeys import DataKeyService
from tests.conftest import PEPPER, Database, Mailpit, TenantFixture, make_settings, sequenced
from tests.support.nudges import started_envelope
from tests.support.openai_standin import ChatStandIn

pytestmark = pytest.mark.xdist_group("mailpit")

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("worker:test-nudges")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None)
WINDOW = timedelta(hours=72)


def _executor(channels: list[str], policy: NudgePolicy = ANYTIME) -> NudgeExecutor:
    return NudgeExecutor(OnboardingService(CatalogCache()), channels, policy, ThompsonSampler(random.Random(3)))


def _worker(app_engine: AsyncEngine, app: Litestar, channel: Channel) -> DeliveryWorker:
    keyring: DataKeyService = app.state.container.keyring
    return DeliveryWorker(app_engine, {channel.channel: channel}, keyring, rng=random.Random(5))


async def _stuck(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine, email: str | None
) -> tuple[str, Envelope]:
    """Start a user, leave them idle two hours, run the stuck scan; the onboarding.stuck event it wrote."""
    user_id = f"n-{uuid.uuid4().hex[:10]}"
    traits: dict[str, Any] = {"persona": "developer"} | ({"email": email} if email else {})
    r = await client.post("/v1/onboarding/start", json={"user_id": user_id, "traits": traits}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET updated_at = now() - interval '2 hours' WHERE tenant_id = :t AND user_id = :u"
            ),
            {"t": tenant.id, "u": user_id},
        )
    scanner = StuckScanner(
        app_engine, CatalogCache(), None, None, after=timedelta(hours=1), min_idle=timedelta(hours=1)
    )
    await scanner.run_once()
    [row] = await _rows(
        admin_engine,
        "SELECT event_id, occurred_at, payload FROM outbox WHERE tenant_id = :t"
        " AND event_type = 'onboarding.stuck' AND payload->>'user_id' = :u",
        t=tenant.id,
        u=user_id,
    )
    return user_id, Envelope(row[0], tenant.id, "onboarding.stuck", row[1], dict(row[2]))


def _sent_metric() -> float:
    """``firstmile_nudge_sends_total{channel="email", outcome="sent"}`` in this process."""
    return float(REGISTRY.get_sample_value("firstmile_nudge_sends_total", {"channel": "email", "outcome": "sent"}) or 0)


async def _rows(admin_engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with admin_engine.connect() as conn:
        return list(await conn.execute(text(sql), params))


async def _mail(mailpit: Mailpit, address: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        found = (await http.get("/api/v1/search", params={"query": f"to:{address}"})).raise_for_status().json()
        return [(await http.get(f"/api/v1/message/{m['ID']}")).raise_for_status().json() for m in found["messages"]]


async def _sends(app_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> list[repo.SendRow]:
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        return await repo.sends_for(tx, user_id)


async def test_a_stuck_user_is_nudged_by_email_and_the_mail_is_in_mailpit(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    address = f"ada-{uuid.uuid4().hex[:8]}@example.test"
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, address)
    triggers = NudgeTriggers(app_engine, _executor(["email"]), WINDOW)
    assert await triggers.handle([event]) == [] and triggers.decided == 1
    assert await triggers.handle([event]) == [] and triggers.decided == 1  # redelivered: nothing new
    [send] = await _sends(app_engine, tenant, user_id)
    assert (
        send.status == "scheduled"
        and send.channel == "email"
        and send.trigger_key == f"stuck:{event.payload['step_id']}"
    )
    assert address not in send.body and address not in str(send.decision)  # no personal data at rest in the send
    channel = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
    sends_before = _sent_metric()
    outcomes = await _worker(app_engine, app, channel).deliver_tenant(OPS.tenant(tenant.id))
    assert [o.status for o in outcomes] == ["sent"] and _sent_metric() == sends_before + 1
    [mail] = await _mail(mailpit, address)
    assert mail["MessageID"] == f"{send.send_id.hex}@firstmile.test" and mail["Subject"] == send.subject
    assert "Create an API key" in mail["Subject"] + mail["Text"]  # the step the user is stuck on
    [done] = await _sends(app_engine, tenant, user_id)
    assert done.status == "sent" and done.provider == "smtp" and done.attempts == 1
    assert await _worker(app_engine, app, channel).deliver_tenant(OPS.tenant(tenant.id)) == []  # nothing due now
    sent_events = [
        r[0]
        for r in await _rows(
            admin_engine,
            "SELECT payload FROM outbox WHERE tenant_id = :t AND event_type = 'nudge.sent'"
            " AND payload->>'user_id' = :u",
            t=tenant.id,
            u=user_id,
        )
    ]
    assert [e["send_id"] for e in sent_events] == [str(send.send_id)]
    await sequenced(app_engine, tenant.id)
    [(entry,)] = await _rows(
        admin_engine,
        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = :u AND actor = 'nudge_executor'",
        t=tenant.id,
        u=user_id,
    )
    assert entry["output"]["send_id"] == str(send.send_id) and entry["output"]["arm"] == send.arm
    assert entry["policy"]["email"]["allowed"] is True and entry["model_version"] == "thompson-beta-1"
    # an erasure takes the user's nudges with the rest of what is held about them
    erased = await app.state.container.privacy.erase(UnitOfWork(app_engine, OPS.tenant(tenant.id)), user_id, "test")
    assert erased is not None and erased.rows_deleted["nudge_sends"] == 1
    assert await _sends(app_engine, tenant, user_id) == []


async def test_the_daily_budget_defers_and_quiet_hours_and_consent_are_in_the_decision(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, None)
    executor = _executor(["email", "in_app"])
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        first = await executor.on_stuck(tx, user_id, event.payload["step_id"], datetime.now(UTC))
        # the same user stuck again (another trigger key) the same day: the one-a-day budget defers it
        await tx.execute(
            text("UPDATE nudge_sends SET trigger_key = 'stuck:earlier' WHERE tenant_id = :t AND user_id = :u"),
            {"t": tenant.id, "u": user_id},
        )
        second = await executor.on_stuck(tx, user_id, event.payload["step_id"], datetime.now(UTC))
    assert first.status == second.status == "scheduled"
    assert first.send_at is not None and second.send_at is not None
    assert second.send_at.date() > first.send_at.date()  # the next calendar day (UTC: the user has no time zone)
    [_, later] = await _sends(app_engine, tenant, user_id)
    assert "fatigue-cap" in later.decision["policy"][later.channel]["reasons"]

    withdrawn_user, withdrawn = await _stuck(client, tenant, admin_engine, app_engine, None)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        for channel in ("email", "in_app"):
            await repo.set_consent(tx, withdrawn_user, channel, "onboarding", False, "unsubscribe-link")
        denied = await executor.on_stuck(tx, withdrawn_user, withdrawn.payload["step_id"], datetime.now(UTC))
    assert denied.status == "denied"
    [row] = await _sends(app_engine, tenant, withdrawn_user)
    assert row.status == "denied" and row.decision["reasons"] == ["unsubscribed"]


async def test_a_policy_check_that_times_out_denies_and_the_transaction_goes_on(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, None)
    executor = NudgeExecutor(
        OnboardingService(CatalogCache()), ["email"], ANYTIME, ThompsonSampler(random.Random(3)), policy_timeout=0.2
    )
    async with admin_engine.connect() as blocker:  # a migration holding the consents table: the read waits
        await blocker.execute(text("LOCK TABLE nudge_consents IN ACCESS EXCLUSIVE MODE"))
        async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
            decided = await executor.on_stuck(tx, user_id, event.payload["step_id"], datetime.now(UTC))
        await blocker.rollback()
    assert decided.status == "denied"
    [row] = await _sends(app_engine, tenant, user_id)  # written after the timeout, in the same transaction
    assert row.status == "denied" and row.decision["reasons"] == ["policy-timeout"]
    assert row.decision["policy"]["email"]["checks"] == {"policy": "timeout"}
    await sequenced(app_engine, tenant.id)
    [(entry,)] = await _rows(
        admin_engine,
        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = :u AND actor = 'nudge_executor'",
        t=tenant.id,
        u=user_id,
    )
    assert entry["policy"]["email"]["reasons"] == ["policy-timeout"] and entry["output"]["arm"] is None
    # with nothing in the way, the same executor decides normally (the timeout setting did not stay behind)
    other_user, other = await _stuck(client, tenant, admin_engine, app_engine, None)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        assert (await executor.on_stuck(tx, other_user, other.payload["step_id"], datetime.now(UTC))).status == (
            "scheduled"
        )
        assert (await tx.execute(text("SELECT current_setting('statement_timeout')"))).scalar_one() != "200ms"


async def test_an_llm_rewrite_is_sent_in_place_of_the_template_and_recorded(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    address = f"lin-{uuid.uuid4().hex[:8]}@example.test"
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, address)
    links = app.state.container.link_signer
    executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email"], ANYTIME, ThompsonSampler(random.Random(3)),
                             links=links)  # fmt: skip
    await NudgeTriggers(app_engine, executor, WINDOW).handle([event])
    keyring: DataKeyService = app.state.container.keyring
    channel = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
    with ChatStandIn(api_key="sk-test") as llm:
        llm.reply_json(
            {"subject": "Create an API key: live in two minutes",
             "body": "Create an API key and you will see live data in the dashboard. Start here: {link}"}
        )  # fmt: skip
        personaliser = Personaliser(llm.base_url, "writer-1", timeout_s=2.0, api_key="sk-test")
        worker = DeliveryWorker(app_engine, {"email": channel}, keyring, links=links, personaliser=personaliser)
        try:
            assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["sent"]
        finally:
            await personaliser.aclose()
        prompts = llm.bodies()
    [send] = await _sends(app_engine, tenant, user_id)
    assert send.decision["personalisation"] == {"path": "llm", "reason": None, "model": "writer-1"}
    assert send.subject == "Create an API key: live in two minutes" and send.html is None  # what was sent
    [mail] = await _mail(mailpit, address)
    assert mail["Subject"] == send.subject and "you will see live data in the dashboard" in mail["Text"]
    token = links.token(tenant.id, send.send_id, CLICK)
    assert f"/v1/nudges/l/{token}" in mail["Text"]  # the signed link put back where the model kept its marker
    assert address not in prompts and token not in prompts  # neither the address nor the link left for the LLM


async def test_the_response_model_is_the_bandits_prior_and_without_it_the_prior_is_uniform(
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
        user_id, stuck = await _stuck(client, tenant, admin_engine, app_engine, None)
        await container.features.apply([await started_envelope(admin_engine, tenant, user_id)])
        prior = ModelResponsePrior(container.inference, container.feature_reader, timeout_s=5.0)
        now = datetime.now(UTC)
        predicted = await prior.predict(str(tenant.id), user_id, ["email", "in_app"], now)
        assert predicted.fallback is None and predicted.version is not None
        assert set(predicted.probabilities) == {"email", "in_app"}
        assert all(0.0 < p < 1.0 for p in predicted.probabilities.values())
        triggers = NudgeTriggers(app_engine, _executor(["email", "in_app"]), WINDOW, prior=prior)
        assert await triggers.handle([stuck]) == []
        [send] = await _sends(app_engine, tenant, user_id)
        recorded = send.decision["prior"]
        assert recorded["model"] == "nudge_response_predictor" and recorded["version"] == predicted.version
        assert recorded["fallback"] is None and set(recorded["probabilities"]) == {"email", "in_app"}
        # the arms' Beta priors come from the predictions: Beta(1 + 10p, 1 + 10(1 - p)), mean (1 + 10p) / 12
        chosen_channel = send.arm.split("|")[1]
        mean = send.decision["bandit"]["posterior_means"][send.arm]
        assert mean == pytest.approx((1 + 10 * recorded["probabilities"][chosen_channel]) / 12, abs=1e-5)
        # a user the feature store knows nothing of: no prior, uniform Beta(1, 1), and the decision is made
        stranger, stranger_stuck = await _stuck(client, tenant, admin_engine, app_engine, None)
        assert await triggers.handle([stranger_stuck]) == []
        [other] = await _sends(app_engine, tenant, stranger)
        assert other.status == "scheduled" and other.decision["prior"]["fallback"] == "no_features"
        assert other.decision["bandit"]["posterior_means"][other.arm] == pytest.approx(0.5)
    await sequenced(app_engine, tenant.id)  # the decision's audit entry names the prior it used
    [(entry,)] = await _rows(
        admin_engine,
        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = :u AND actor = 'nudge_executor'",
        t=tenant.id,
        u=user_id,
    )
    assert entry["prior"]["version"] == predicted.version


async def test_the_tenants_app_records_consent_and_the_policy_reads_it(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, None)
    base = f"/v1/users/{user_id}/consents"
    granted = await client.put(f"{base}/email/product", json={"granted": True, "source": "preference-centre"},
                               headers=tenant.headers)  # fmt: skip
    assert granted.status_code == 204, granted.text
    again = await client.put(f"{base}/email/product", json={"granted": True}, headers=tenant.headers)
    assert again.status_code == 204  # idempotent: no second audit entry
    declined = await client.put(f"{base}/email/onboarding", json={"granted": False}, headers=tenant.headers)
    assert declined.status_code == 204
    for coercible in ("true", 1, "1"):  # Litestar alone would read each of these as True
        refused = await client.put(f"{base}/email/onboarding", json={"granted": coercible}, headers=tenant.headers)
        assert refused.status_code == 400, (coercible, refused.text)
        got = "str" if isinstance(coercible, str) else "int"
        assert refused.json()["errors"] == [{"key": "granted", "message": f"Expected `bool`, got `{got}`",
                                             "source": "body"}]  # fmt: skip
    listed = (await client.get(base, headers=tenant.headers)).json()
    assert listed == {"user_id": user_id, "consents": [
        {"channel": "email", "category": "onboarding", "granted": False},
        {"channel": "email", "category": "product", "granted": True},
    ]}  # fmt: skip
    for bad in (f"{base}/fax/onboarding", f"{base}/email/Not%20A%20Category"):
        refused = await client.put(bad, json={"granted": True}, headers=tenant.headers)
        assert refused.status_code == 400 and refused.headers["content-type"].startswith("application/problem+json")
    assert (
        await client.put(f"{base}/email/onboarding", json={"granted": "yes"}, headers=tenant.headers)
    ).status_code == 400
    unknown = await client.put("/v1/users/never-started/consents/email/onboarding", json={"granted": True},
                               headers=tenant.headers)  # fmt: skip
    assert unknown.status_code == 404
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        decided = await _executor(["email"]).on_stuck(tx, user_id, event.payload["step_id"], datetime.now(UTC))
    assert decided.status == "denied"  # the user declined onboarding e-mail
    [row] = await _sends(app_engine, tenant, user_id)
    assert row.decision["reasons"] == ["unsubscribed"]
    await sequenced(app_engine, tenant.id)
    entries = await _rows(
        admin_engine,
        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = :u AND kind = 'consent' ORDER BY seq",
        t=tenant.id,
        u=user_id,
    )
    assert [(e[0]["category"], e[0]["granted"], e[0]["source"]) for e in entries] == [
        ("product", True, "preference-centre"), ("onboarding", False, "api")]  # fmt: skip


class _AcceptedThenCrash:
    """A channel whose provider accepts the message, after which the worker dies before recording it."""

    channel = "email"
    provider = "smtp"

    def __init__(self, inner: Channel) -> None:
        self.inner = inner

    async def send(self, message: OutboundMessage) -> Receipt:
        await self.inner.send(message)
        raise SystemExit("killed after the provider accepted")


async def test_a_worker_dying_mid_send_loses_nothing_and_duplicates_only_inside_the_window(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    smtp = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
    triggers = NudgeTriggers(app_engine, _executor(["email"]), WINDOW)
    scope = OPS.tenant(tenant.id)
    # 1. killed after the claim, before the provider saw anything: the lease runs out, the next pass sends once
    before = f"before-{uuid.uuid4().hex[:8]}@example.test"
    user, event = await _stuck(client, tenant, admin_engine, app_engine, before)
    await triggers.handle([event])
    now = datetime.now(UTC)
    async with tenant_transaction(app_engine, scope) as tx:
        [claimed] = [s for s in await repo.claim_due(tx, now, now + timedelta(minutes=2), 100) if s.user_id == user]
    worker = _worker(app_engine, app, smtp)
    assert [o for o in await worker.deliver_tenant(scope, now) if o.send_id == claimed.send_id] == []  # still leased
    outcomes = await worker.deliver_tenant(scope, now + timedelta(minutes=3))
    assert [o.status for o in outcomes if o.send_id == claimed.send_id] == ["sent"]
    assert len(await _mail(mailpit, before)) == 1
    # 2. killed after the provider accepted: sent again after the lease, with the same Message-ID (the window)
    after = f"after-{uuid.uuid4().hex[:8]}@example.test"
    user2, event2 = await _stuck(client, tenant, admin_engine, app_engine, after)
    await triggers.handle([event2])
    with pytest.raises(SystemExit):
        await _worker(app_engine, app, _AcceptedThenCrash(smtp)).deliver_tenant(scope)
    [send2] = await _sends(app_engine, tenant, user2)
    assert send2.status == "sending"
    outcomes = await worker.deliver_tenant(scope, datetime.now(UTC) + timedelta(minutes=3))
    assert [o.status for o in outcomes if o.send_id == send2.send_id] == ["sent"]
    copies = await _mail(mailpit, after)
    assert len(copies) == 2 and {m["MessageID"] for m in copies} == {f"{send2.send_id.hex}@firstmile.test"}
    [done] = await _sends(app_engine, tenant, user2)
    assert done.status == "sent" and done.attempts == 2


async def test_an_unreachable_server_retries_with_backoff_then_gives_up_and_a_refusal_suppresses(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    scope = OPS.tenant(tenant.id)
    triggers = NudgeTriggers(app_engine, _executor(["email"]), WINDOW)
    user, event = await _stuck(client, tenant, admin_engine, app_engine, f"r-{uuid.uuid4().hex[:8]}@example.test")
    await triggers.handle([event])
    down = SmtpChannel("127.0.0.1", 9, "nudges@firstmile.test", timeout_s=2)  # the discard port: nothing listens
    worker = _worker(app_engine, app, down)
    worker.max_attempts = 2
    at = datetime.now(UTC)
    first = [o for o in await worker.deliver_tenant(scope, at) if o.send_id]
    [retry] = await _sends(app_engine, tenant, user)
    assert [o.status for o in first] == ["retrying"] and retry.status == "scheduled" and retry.send_at > at
    assert retry.send_at <= datetime.now(UTC) + worker.backoff_base  # full jitter: at most base·2^0 away
    second = await worker.deliver_tenant(scope, retry.send_at + timedelta(seconds=1))
    assert [o.status for o in second] == ["dead"]
    [dead] = await _sends(app_engine, tenant, user)
    assert dead.status == "dead" and dead.attempts == 2 and dead.last_error

    refused, event2 = await _stuck(client, tenant, admin_engine, app_engine, f"x-{uuid.uuid4().hex[:8]}@example.test")
    await triggers.handle([event2])
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        (await http.put("/api/v1/chaos", json={"Recipient": {"ErrorCode": 550, "Probability": 100}})).raise_for_status()
        try:
            smtp = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
            outcomes = await _worker(app_engine, app, smtp).deliver_tenant(scope)
        finally:
            (
                await http.put("/api/v1/chaos", json={"Recipient": {"ErrorCode": 451, "Probability": 0}})
            ).raise_for_status()
    assert [o.status for o in outcomes] == ["rejected"]
    async with tenant_transaction(app_engine, scope, commit=False) as tx:
        assert await repo.suppressed_channels(tx, refused) == {"email"}


async def test_the_loop_closes_a_click_a_conversion_an_unsubscribe_and_the_bandit_counts_each_send_once(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    links: LinkSigner = app.state.container.link_signer
    executor = NudgeExecutor(
        OnboardingService(CatalogCache()), ["email"], ANYTIME, ThompsonSampler(random.Random(3)),
        links=links, public_url="https://firstmile.example",
    )  # fmt: skip
    triggers = NudgeTriggers(app_engine, executor, WINDOW)
    smtp = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
    worker = DeliveryWorker(
        app_engine, {"email": smtp}, app.state.container.keyring, links=links, public_url="https://firstmile.example"
    )
    scope = OPS.tenant(tenant.id)
    address = f"loop-{uuid.uuid4().hex[:8]}@example.test"
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, address)
    await triggers.handle([event])
    await worker.deliver_tenant(scope)
    [send] = await _sends(app_engine, tenant, user_id)
    [mail] = await _mail(mailpit, address)
    click_url = next(w for w in mail["Text"].split() if w.startswith("https://firstmile.example/v1/nudges/l/"))
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        headers = (await http.get(f"/api/v1/message/{mail['ID']}/headers")).raise_for_status().json()
    unsubscribe_url = headers["List-Unsubscribe"][0].strip("<>")
    assert headers["List-Unsubscribe-Post"] == ["List-Unsubscribe=One-Click"]

    # the tracked link: the first click counts (a nudge.clicked event, the bandit's success), the second does not
    path = click_url.removeprefix("https://firstmile.example")
    for _ in range(2):
        r = await client.get(path)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    forged = await client.get(path[:-4] + ("AAAA" if not path.endswith("AAAA") else "BBBB"))
    assert forged.status_code == 404 and forged.json()["type"].endswith("/link-not-found")
    async with tenant_transaction(app_engine, scope, commit=False) as tx:
        assert await repo.arm_stats(tx, send.segment) == {send.arm: (1, 0)}
    # completing the nudged step converts the nudge (once), and the send is not counted again
    step = event.payload["step_id"]
    r = await client.post(f"/v1/onboarding/{user_id}/steps/{step}/complete", headers=tenant.headers)
    assert r.status_code == 200, r.text
    completed = await _rows(
        admin_engine,
        "SELECT event_id, occurred_at, payload FROM outbox WHERE tenant_id = :t"
        " AND event_type = 'onboarding.step_completed' AND payload->>'user_id' = :u",
        t=tenant.id,
        u=user_id,
    )
    envelopes = [Envelope(r[0], tenant.id, "onboarding.step_completed", r[1], dict(r[2])) for r in completed]
    await triggers.handle(envelopes + envelopes)  # redelivered too
    assert triggers.converted == 1
    kinds = [
        r[0]
        for r in await _rows(
            admin_engine,
            "SELECT event_type FROM outbox WHERE tenant_id = :t AND payload->>'send_id' = :s ORDER BY id",
            t=tenant.id,
            s=str(send.send_id),
        )
    ]
    assert kinds == ["nudge.sent", "nudge.clicked", "nudge.converted"]
    async with tenant_transaction(app_engine, scope, commit=False) as tx:
        assert await repo.arm_stats(tx, send.segment) == {send.arm: (1, 0)}  # counted once
    # the one-click unsubscribe (RFC 8058): a GET only shows the page; the POST withdraws consent, audited
    path = unsubscribe_url.removeprefix("https://firstmile.example")
    page = await client.get(path)
    assert page.status_code == 200 and "<form" in page.text
    async with tenant_transaction(app_engine, scope, commit=False) as tx:
        assert await repo.consents(tx, user_id) == {}
    for _ in range(2):
        r = await client.post(path, content=b"List-Unsubscribe=One-Click",
                              headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert r.status_code == 200
    async with tenant_transaction(app_engine, scope, commit=False) as tx:
        assert await repo.consents(tx, user_id) == {("email", "onboarding"): False}
    assert (await client.post(path.replace("/u/", "/l/"))).status_code in (404, 405)  # a link has one purpose
    await sequenced(app_engine, tenant.id)
    [(consent,)] = await _rows(
        admin_engine,
        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = :u AND kind = 'consent'",
        t=tenant.id,
        u=user_id,
    )
    assert consent["granted"] is False and consent["send_id"] == str(send.send_id)


async def test_a_sent_nudge_without_an_outcome_in_its_window_is_counted_as_a_failure(
    client: Client,
    app: Litestar,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    mailpit: Mailpit,
) -> None:
    triggers = NudgeTriggers(app_engine, _executor(["email"]), WINDOW)
    smtp = SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "nudges@firstmile.test")
    user_id, event = await _stuck(client, tenant, admin_engine, app_engine, f"q-{uuid.uuid4().hex[:8]}@example.test")
    await triggers.handle([event])
    worker = _worker(app_engine, app, smtp)
    await worker.deliver_tenant(OPS.tenant(tenant.id))
    [send] = await _sends(app_engine, tenant, user_id)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        assert send.arm not in await repo.arm_stats(tx, send.segment)  # the window is still open
    await worker.deliver_tenant(OPS.tenant(tenant.id), datetime.now(UTC) + worker.outcome_window + timedelta(minutes=1))
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        assert (await repo.arm_stats(tx, send.segment))[send.arm][1] >= 1
