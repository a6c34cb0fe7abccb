"""Web push nudges on the real stack: a browser's subscription through the API, sealed under the user's key, the
nudge decided and delivered to the push service (a local stand-in speaking RFC 8030), where the browser's key
decrypts it; a gone subscription is suppressed; erasure takes the subscription."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges import repository as repo
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.push_webpush import WebPushChannel
from firstmile.nudges.service import DeliveryWorker, NudgeExecutor, PushSubscriptions
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.wiring import adapters
from tests.conftest import PEPPER, Database, TenantFixture, make_settings
from tests.support.push_standin import PushServiceStandIn
from tests.unit.test_nudge_webpush import Browser

OPS = OperatorContext("worker:test-nudge-push")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None, daily_cap=5)


async def test_a_push_nudge_reaches_the_browser_that_subscribed_and_a_gone_subscription_is_suppressed(
    database: Database,
    analytics_store: ChdbStore,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    vapid = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "vapid.pem"
    key_file.write_bytes(
        vapid.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    settings = make_settings(nudge_vapid_private_key_file=str(key_file), nudge_in_app="off")
    assert isinstance(adapters.nudge_channels(settings)["push"], WebPushChannel)  # the wiring reads the key
    browser = Browser.subscribe()
    with PushServiceStandIn() as service:
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app) as client:
            container = app.state.container
            # the stand-in listens on plain http on loopback: the same channel, allowed to reach it
            channel = WebPushChannel(vapid, settings.nudges.vapid_subject, allow_insecure_loopback=True)
            container.push_subscriptions = PushSubscriptions(container.keyring, channel)
            user_id = f"push-{uuid.uuid4().hex[:10]}"
            r = await client.post("/v1/onboarding/start", headers=tenant.headers,
                                  json={"user_id": user_id, "traits": {"persona": "developer"}})  # fmt: skip
            assert r.status_code == 201, r.text
            subscription = json.loads(browser.subscription(service.endpoint()))
            path = f"/v1/users/{user_id}/push-subscriptions"
            added = await client.post(path, json=subscription, headers=tenant.headers)
            assert added.status_code == 201, added.text
            subscription_id = added.json()["subscription_id"]
            assert subscription_id == hashlib.sha256(subscription["endpoint"].encode()).hexdigest()
            bad = subscription | {"keys": {"p256dh": "AAAA", "auth": subscription["keys"]["auth"]}}
            refused = await client.post(path, json=bad, headers=tenant.headers)
            assert refused.status_code == 400 and refused.json()["type"].endswith("invalid-subscription")
            coerced = await client.post(path, json=subscription | {"expirationTime": "5"}, headers=tenant.headers)
            assert coerced.status_code == 400 and coerced.json()["errors"][0]["key"] == "expirationTime", coerced.text
            unknown = await client.post("/v1/users/nobody-at-all/push-subscriptions", json=subscription,
                                        headers=tenant.headers)  # fmt: skip
            assert unknown.status_code == 404
            [(sealed,)] = await _rows(admin_engine, tenant, user_id)
            assert subscription["endpoint"] not in sealed and subscription["keys"]["auth"] not in sealed  # sealed

            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["push"], ANYTIME,
                                     ThompsonSampler(random.Random(2)))  # fmt: skip
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                decided = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            assert decided.status == "scheduled" and decided.send_id is not None
            worker = DeliveryWorker(app_engine, {"push": channel}, container.keyring)
            assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["sent"]
            [request] = service.requests
            shown = json.loads(browser.decrypt(request.body))
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                [send] = await repo.sends_for(tx, user_id)
            assert shown == {"title": send.subject or "", "body": send.body, "tag": send.send_id.hex,
                             "id": send.send_id.hex}  # fmt: skip

            # the browser's subscription expired: the push service answers 410, the channel is suppressed
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                moved = "UPDATE nudge_sends SET trigger_key = 'stuck:before', sent_at = now() - interval '2 days'"
                await tx.execute(text(moved + " WHERE send_id = :s"), {"s": send.send_id})  # yesterday's budget
                await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            service.respond(410)
            assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["rejected"]
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                assert await repo.suppressed_channels(tx, user_id) == {"push"}
            # a new subscription is a new address: the suppression is lifted
            fresh = json.loads(Browser.subscribe().subscription(service.endpoint()))
            again = await client.post(path, json=fresh, headers=tenant.headers)
            assert again.status_code == 201
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                assert await repo.suppressed_channels(tx, user_id) == set()
            # the browser unsubscribed the first: forgotten (idempotent); erasure takes the rest
            gone = await client.delete(f"{path}/{subscription_id}", headers=tenant.headers)
            assert gone.status_code == 204
            assert (await client.delete(f"{path}/{subscription_id}", headers=tenant.headers)).status_code == 204
            assert len(await _rows(admin_engine, tenant, user_id)) == 1
            erased = await container.privacy.erase(UnitOfWork(app_engine, OPS.tenant(tenant.id)), user_id, "test")
            assert erased is not None and erased.rows_deleted["nudge_push_subscriptions"] == 1
            assert await _rows(admin_engine, tenant, user_id) == []


async def _rows(admin_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> list[tuple[str]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT sealed FROM nudge_push_subscriptions WHERE tenant_id = :t AND user_id = :u"),
            {"t": tenant.id, "u": user_id},
        )
        return [(str(r[0]),) for r in rows]


async def test_without_a_vapid_key_a_subscription_is_refused(
    client: AsyncTestClient[Litestar], tenant: TenantFixture
) -> None:
    browser = Browser.subscribe()
    r = await client.post("/v1/onboarding/start", headers=tenant.headers, json={"user_id": "no-push", "traits": {}})
    assert r.status_code == 201, r.text
    subscription = json.loads(browser.subscription("https://push.example.test/p/1"))
    refused = await client.post("/v1/users/no-push/push-subscriptions", json=subscription, headers=tenant.headers)
    assert refused.status_code == 409 and refused.json()["type"].endswith("push-not-configured")
