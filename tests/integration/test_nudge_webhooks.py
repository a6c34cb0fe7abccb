"""E-mail through SendGrid as the relay's backup, SMS through Twilio and Vonage as its backup, and the providers'
signed delivery reports.

The platform's own wiring (``adapters.nudge_channels``) with the SMTP relay down fails over to SendGrid's
v3 API (a local stand-in speaking it, through the official client); the Event Webhook, signed with a P-256
key as SendGrid signs it, then reports the mail delivered, opened and bounced: the send records it, the
address is suppressed, the events reach the outbox, and a replayed or forged request changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.nudges import repository as repo
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import DeliveryWorker, NudgeExecutor
from firstmile.nudges.webhooks import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.wiring import adapters
from tests.conftest import PEPPER, Database, TenantFixture, make_settings
from tests.support.nudges import sendgrid_headers, verification_key
from tests.support.saas_standins import SendGridStandIn, TwilioStandIn, VonageStandIn
from tests.support.tls import loopback_tls

OPS = OperatorContext("worker:test-nudge-webhooks")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None, daily_cap=5)
SG_KEY = "SG.test-key"


async def _rows(admin_engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with admin_engine.connect() as conn:
        return list(await conn.execute(text(sql), params))


async def test_the_relay_fails_over_to_sendgrid_and_its_webhook_reports_delivery_and_a_bounce(
    database: Database,
    analytics_store: ChdbStore,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    with SendGridStandIn(SG_KEY) as sendgrid:
        settings = make_settings(
            nudge_smtp_url="smtp://127.0.0.1:9",  # the discard port: the relay is down
            nudge_sendgrid_api_key=SG_KEY,
            nudge_sendgrid_base_url=sendgrid.url,
            nudge_sendgrid_webhook_key=verification_key(private),
            nudge_email_from="Acme <nudges@acme.test>",
            nudge_in_app="off",
            nudge_delivery_interval_seconds=0,
        )
        channels = adapters.nudge_channels(settings)
        assert channels["email"].provider == "smtp+sendgrid"
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app) as client:
            address = f"wh-{uuid.uuid4().hex[:8]}@example.test"
            user_id = f"wh-{uuid.uuid4().hex[:10]}"
            traits = {"persona": "developer", "email": address}
            r = await client.post(
                "/v1/onboarding/start", headers=tenant.headers, json={"user_id": user_id, "traits": traits}
            )
            assert r.status_code == 201, r.text
            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email"], ANYTIME,
                                     ThompsonSampler(random.Random(2)))  # fmt: skip
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                decided = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            assert decided.status == "scheduled" and decided.send_id is not None
            send_id = decided.send_id
            worker = DeliveryWorker(app_engine, channels, app.state.container.keyring)
            assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["sent"]
            [mail] = sendgrid.received(address)
            assert mail.body["custom_args"] == {
                "firstmile_send": decided.send_id.hex,
                "firstmile_tenant": str(tenant.id),
            }
            assert mail.body["from"] == {"email": "nudges@acme.test", "name": "Acme"}

            def event(kind: str, at: int, **extra: Any) -> dict[str, Any]:
                return {"email": address, "event": kind, "timestamp": at, "sg_event_id": uuid.uuid4().hex,
                        "sg_message_id": f"{mail.message_id}.filter", "firstmile_send": send_id.hex,
                        "firstmile_tenant": str(tenant.id)} | extra  # fmt: skip

            now = int(time.time())
            events = [
                event("processed", now - 3),
                event("delivered", now - 2),
                event("open", now - 1),
                event("bounce", now, reason="550 5.1.1 no such user", type="bounce"),
                {"email": "someone@else.test", "event": "delivered", "timestamp": now},  # not a nudge: ignored
            ]
            body = json.dumps(events).encode()
            headers = sendgrid_headers(private, body, now)
            answer = await client.post("/v1/nudges/webhooks/sendgrid", content=body, headers=headers)
            assert answer.status_code == 204, answer.text
            replayed = await client.post("/v1/nudges/webhooks/sendgrid", content=body, headers=headers)
            assert replayed.status_code == 409 and replayed.json()["type"].endswith("webhook-replayed")
            forged = body.replace(b'"bounce"', b'"delivered"')
            refused = await client.post("/v1/nudges/webhooks/sendgrid", content=forged, headers=headers)
            assert refused.status_code == 401 and refused.headers["content-type"].startswith("application/problem+json")
            stale = sendgrid_headers(private, b"[]", now - 3600)
            assert (await client.post("/v1/nudges/webhooks/sendgrid", content=b"[]", headers=stale)).status_code == 401
            garbage = b'{"not": "an array"}'
            malformed = await client.post("/v1/nudges/webhooks/sendgrid", content=garbage,
                                          headers=sendgrid_headers(private, garbage, now))  # fmt: skip
            assert malformed.status_code == 400
            # the bounce suppressed the address: the next nudge for the user is denied on e-mail
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                moved = text("UPDATE nudge_sends SET trigger_key = 'stuck:before' WHERE send_id = :s")
                await tx.execute(moved, {"s": send_id})
                again = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            assert again.status == "denied"
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        sends = {s.send_id: s for s in await repo.sends_for(tx, user_id)}
        assert await repo.suppressed_channels(tx, user_id) == {"email"}
    assert sends[send_id].provider == "sendgrid"
    delivery = "SELECT delivery_status, delivery_at FROM nudge_sends WHERE send_id = :s"
    [(status, at)] = await _rows(admin_engine, delivery, s=send_id)
    assert status == "bounced" and at == datetime.fromtimestamp(now, UTC)
    outbox = "SELECT event_type FROM outbox WHERE tenant_id = :t AND payload->>'send_id' = :s ORDER BY event_type"
    kinds = [r[0] for r in await _rows(admin_engine, outbox, t=tenant.id, s=str(send_id))]
    assert kinds == ["nudge.bounced", "nudge.delivered", "nudge.opened", "nudge.sent"]  # each once; not the forgery
    assert again.send_id is not None and sends[again.send_id].decision["policy"]["email"]["reasons"] == ["suppressed"]


@pytest.mark.parametrize("configured", [False])
async def test_without_a_verification_key_every_webhook_is_refused(
    client: AsyncTestClient[Litestar], configured: bool
) -> None:
    body = b"[]"
    headers = {SENDGRID_SIGNATURE: "AAAA", SENDGRID_TIMESTAMP: str(int(time.time()))}
    answer = await client.post("/v1/nudges/webhooks/sendgrid", content=body, headers=headers)
    assert answer.status_code == 401 and answer.json()["type"].endswith("webhook-refused")


def _twilio_signature(url: str, form: dict[str, str], token: str) -> str:
    """Twilio's X-Twilio-Signature, computed as its "Webhooks security" page describes (not with our helper)."""
    signed = url + "".join(name + form[name] for name in sorted(form))
    return base64.b64encode(hmac.new(token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


async def test_an_sms_nudge_goes_to_the_sealed_phone_and_a_signed_status_callback_suppresses_a_dead_number(
    database: Database,
    analytics_store: ChdbStore,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
) -> None:
    sid, token, phone = "AC" + "1" * 32, "tw-test-token", "+447911123456"
    with TwilioStandIn(sid, token) as twilio:
        settings = make_settings(
            public_url="http://testserver.local",
            nudge_twilio_account_sid=sid,
            nudge_twilio_auth_token=token,
            nudge_sms_from="+15005550006",
            nudge_twilio_base_url=twilio.url,
            nudge_in_app="off",
            nudge_delivery_interval_seconds=0,
        )
        channels = adapters.nudge_channels(settings)
        assert set(channels) == {"sms"}
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app, base_url="http://testserver.local") as client:
            user_id = f"sms-{uuid.uuid4().hex[:10]}"
            r = await client.post(
                "/v1/onboarding/start",
                headers=tenant.headers,
                json={"user_id": user_id, "traits": {"persona": "developer", "phone": phone}},
            )
            assert r.status_code == 201, r.text
            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["sms"], ANYTIME,
                                     ThompsonSampler(random.Random(2)))  # fmt: skip
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                decided = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            assert decided.status == "scheduled" and decided.send_id is not None
            send_id = decided.send_id
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                [stored] = await repo.sends_for(tx, user_id)
            assert phone not in stored.body and phone not in json.dumps(stored.decision)  # the number is sealed
            worker = DeliveryWorker(app_engine, channels, app.state.container.keyring)
            assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["sent"]
            [sms] = twilio.received(phone)
            assert sms.form["From"] == "+15005550006" and sms.form["Body"] == stored.body
            callback = sms.form["StatusCallback"]
            assert callback.startswith("http://testserver.local/v1/nudges/webhooks/twilio?")
            assert f"send={send_id.hex}" in callback and f"tenant={tenant.id}" in callback
            form = {"MessageSid": sms.sid, "MessageStatus": "undelivered", "ErrorCode": "30005", "To": phone}
            path = callback.removeprefix("http://testserver.local")
            headers = {"X-Twilio-Signature": _twilio_signature(callback, form, token)}
            answer = await client.post(path, data=form, headers=headers)
            assert answer.status_code == 204, answer.text
            replayed = await client.post(path, data=form, headers=headers)
            assert replayed.status_code == 409
            forged = await client.post(path, data=form | {"ErrorCode": "30003"}, headers=headers)
            assert forged.status_code == 401 and forged.json()["type"].endswith("webhook-refused")
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        assert await repo.suppressed_channels(tx, user_id) == {"sms"}
    [(status,)] = await _rows(admin_engine, "SELECT delivery_status FROM nudge_sends WHERE send_id = :s", s=send_id)
    assert status == "bounced"


async def test_a_provider_rate_limit_defers_the_send_to_its_window_without_counting_an_attempt(
    database: Database, analytics_store: ChdbStore, tenant: TenantFixture, app_engine: AsyncEngine
) -> None:
    with SendGridStandIn(SG_KEY) as sendgrid:
        settings = make_settings(nudge_sendgrid_api_key=SG_KEY, nudge_sendgrid_base_url=sendgrid.url,
                                 nudge_in_app="off", nudge_delivery_interval_seconds=0)  # fmt: skip
        channels = adapters.nudge_channels(settings)
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app) as client:
            address = f"rl-{uuid.uuid4().hex[:8]}@example.test"
            user_id = f"rl-{uuid.uuid4().hex[:10]}"
            traits = {"persona": "developer", "email": address}
            r = await client.post(
                "/v1/onboarding/start", headers=tenant.headers, json={"user_id": user_id, "traits": traits}
            )
            assert r.status_code == 201, r.text
            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email"], ANYTIME,
                                     ThompsonSampler(random.Random(2)))  # fmt: skip
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
            worker = DeliveryWorker(app_engine, channels, app.state.container.keyring)
            reset = {"X-RateLimit-Reset": str(int(time.time()) + 120)}  # SendGrid's window: when it resets
            sendgrid.respond(429, reset, {"errors": [{"message": "too many requests"}]})
            before = datetime.now(UTC)
            [outcome] = await worker.deliver_tenant(OPS.tenant(tenant.id))
            assert outcome.status == "deferred"
            async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                [send] = await repo.sends_for(tx, user_id)
            assert send.status == "scheduled" and send.attempts == 0  # the rate limit is not a failed attempt
            assert 110 <= (send.send_at - before).total_seconds() <= 130  # the provider's window, not a backoff
            assert await worker.deliver_tenant(OPS.tenant(tenant.id)) == []  # not due before then
            assert sendgrid.received(address) == []


def _vonage_sig(params: dict[str, str], secret: str) -> str:
    """Vonage's sig as its "Signed webhooks" page describes it (HMAC-SHA256 here; not with our helper)."""
    signed = "".join(f"&{k}={v.replace('&', '_').replace('=', '_')}" for k, v in sorted(params.items()))
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()


async def test_twilio_down_fails_over_to_vonage_whose_signed_receipts_report_delivery_and_a_dead_number(
    database: Database,
    analytics_store: ChdbStore,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
) -> None:
    sid, token, key, secret, signing = "AC" + "2" * 32, "tw-token", "ab12cd34", "vn-secret", "vn-signing-secret"
    tls = loopback_tls()
    with TwilioStandIn(sid, token) as twilio, VonageStandIn(tls.server_context, key, secret, signing) as vonage:
        settings = make_settings(
            public_url="http://testserver.local",
            nudge_twilio_account_sid=sid,
            nudge_twilio_auth_token=token,
            nudge_sms_from="+15005550006",
            nudge_twilio_base_url=twilio.url,
            nudge_vonage_api_key=key,
            nudge_vonage_api_secret=secret,
            nudge_vonage_signature_secret=signing,
            nudge_vonage_from="Firstmile",
            nudge_vonage_rest_host=vonage.host,
            nudge_vonage_ca_bundle=tls.ca_file,
            nudge_in_app="off",
            nudge_delivery_interval_seconds=0,
        )
        channels = adapters.nudge_channels(settings)
        assert channels["sms"].provider == "twilio+vonage"
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app, base_url="http://testserver.local") as client:
            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["sms"], ANYTIME,
                                     ThompsonSampler(random.Random(2)))  # fmt: skip
            worker = DeliveryWorker(app_engine, channels, app.state.container.keyring)
            sent: dict[str, tuple[str, uuid.UUID]] = {}
            for phone in ("+447911123457", "+447911123458"):
                user_id = f"vn-{uuid.uuid4().hex[:10]}"
                traits = {"persona": "developer", "phone": phone}
                r = await client.post("/v1/onboarding/start", headers=tenant.headers,
                                      json={"user_id": user_id, "traits": traits})  # fmt: skip
                assert r.status_code == 201, r.text
                async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
                    decided = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
                assert decided.send_id is not None
                twilio.respond(500, {}, {"code": 20500, "message": "Internal Server Error", "status": 500})
                assert [o.status for o in await worker.deliver_tenant(OPS.tenant(tenant.id))] == ["sent"]
                [sms] = vonage.received(phone)
                assert sms.form["from"] == "Firstmile" and "sig" in sms.form  # signed, not basic auth
                assert sms.form["callback"] == "http://testserver.local/v1/nudges/webhooks/vonage"
                assert sms.form["client-ref"] == f"{tenant.id}:{decided.send_id.hex}"
                sent[phone] = (sms.message_id, decided.send_id)
                async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
                    [stored] = await repo.sends_for(tx, user_id)
                assert stored.provider == "vonage" and stored.provider_message_id == sms.message_id
            assert twilio.accepted == []

            def receipt(phone: str, status: str, code: str) -> dict[str, str]:
                message_id, send_id = sent[phone]
                params = {"msisdn": phone[1:], "to": "Firstmile", "messageId": message_id, "status": status,
                          "err-code": code, "client-ref": f"{tenant.id}:{send_id.hex}", "api-key": key,
                          "message-timestamp": "2026-12-07 12:00:00", "timestamp": str(int(time.time())),
                          "nonce": uuid.uuid4().hex}  # fmt: skip
                return params | {"sig": _vonage_sig(params, signing)}

            # Vonage's three ways of sending a receipt: a GET query, a POST form, a POST JSON object
            first, second = "+447911123457", "+447911123458"
            delivered = receipt(first, "delivered", "0")
            assert (await client.get("/v1/nudges/webhooks/vonage", params=delivered)).status_code == 204
            assert (await client.get("/v1/nudges/webhooks/vonage", params=delivered)).status_code == 409  # replayed
            forged = delivered | {"nonce": "another", "status": "failed", "err-code": "9"}
            refused = await client.post("/v1/nudges/webhooks/vonage", data=forged)
            assert refused.status_code == 401 and refused.json()["type"].endswith("webhook-refused")
            dead = receipt(second, "failed", "9")  # illegal number
            answer = await client.post("/v1/nudges/webhooks/vonage", json=dead)
            assert answer.status_code == 204, answer.text
            foreign = receipt(second, "delivered", "0") | {"client-ref": "another-app-ref"}
            foreign["sig"] = _vonage_sig({k: v for k, v in foreign.items() if k != "sig"}, signing)
            assert (await client.post("/v1/nudges/webhooks/vonage", data=foreign)).status_code == 400
    statuses = dict(
        await _rows(
            admin_engine,
            "SELECT send_id, delivery_status FROM nudge_sends WHERE send_id = ANY(:s)",
            s=[send_id for _, send_id in sent.values()],
        )
    )
    assert statuses == {sent[first][1]: "delivered", sent[second][1]: "bounced"}
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        [(second_user,)] = await tx.execute(text("SELECT user_id FROM nudge_sends WHERE send_id = :s"),
                                            {"s": sent[second][1]})  # fmt: skip
        assert await repo.suppressed_channels(tx, second_user) == {"sms"}
