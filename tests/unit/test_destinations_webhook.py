"""The webhook destination against a real endpoint on 127.0.0.1 that verifies with ``standardwebhooks``' own
``Webhook.verify``: signatures, rotation (two secrets), outcomes, per-user order, erasure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from firstmile.destinations.policy import new_webhook_secret
from firstmile.destinations.port import Delivered, OutboundEvent, Rejected, Retry
from firstmile.destinations.webhook import WebhookDestination, retry_after
from tests.support.webhook_receiver import WebhookReceiver

TENANT = uuid.uuid4()
AT = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)


def event(user: str = "u-1", name: str = "Onboarding Step Completed", **properties: object) -> OutboundEvent:
    return OutboundEvent(uuid.uuid4(), TENANT, user, "track", name, AT, {"path_id": "dev", **properties})


async def test_a_delivered_event_verifies_with_the_standard_library_and_names_its_idempotency_key() -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        hook = WebhookDestination(receiver.url + "/hooks", [secret])
        sent = event(step_id="create-api-key")
        identify = OutboundEvent(uuid.uuid4(), TENANT, "u-1", "identify", "identify", AT, {}, {"persona": "dev"})
        try:
            assert await hook.deliver([identify, sent]) == [Delivered(), Delivered()]
        finally:
            await hook.close()
    assert receiver.ids == [identify.idempotency_key, sent.idempotency_key]
    first, second = receiver.deliveries
    assert first.payload == {
        "type": "user.identified",
        "timestamp": AT.isoformat(),
        "data": {"event_id": str(identify.event_id), "event": "identify", "kind": "identify",
                 "tenant_id": str(TENANT), "user_id": "u-1", "properties": {}, "traits": {"persona": "dev"}},
    }  # fmt: skip
    assert second.payload["type"] == "onboarding.step_completed"
    assert second.payload["data"]["properties"] == {"path_id": "dev", "step_id": "create-api-key"}
    request = receiver.requests[1]
    assert request.path == "/hooks" and request.headers["content-type"] == "application/json"
    assert request.headers["webhook-signature"].startswith("v1,") and " " not in request.headers["webhook-signature"]
    # the signature is over the exact body: one byte changed and the library refuses it
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body.replace(b"dev", b"deV"), request.headers)


async def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    old, new, stranger = new_webhook_secret(), new_webhook_secret(), new_webhook_secret()
    with WebhookReceiver(old, new, stranger) as receiver:
        hook = WebhookDestination(receiver.url, [new, old])
        try:
            assert await hook.deliver([event()]) == [Delivered()]
        finally:
            await hook.close()
    [delivery] = receiver.deliveries
    assert delivery.verified_by == (0, 1)  # the old and the new secret; not the stranger's
    assert len(delivery.signature.split(" ")) == 2
    # a receiver that knows only the old secret (not updated yet), or only the new one, verifies
    request = receiver.requests[0]
    Webhook(old).verify(request.body, request.headers)
    Webhook(new).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(request.body, request.headers)


async def test_answers_become_outcomes_and_a_users_later_events_wait_behind_a_failure() -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        hook = WebhookDestination(receiver.url, [secret], concurrency=1)
        try:
            receiver.respond(503, {"Retry-After": "30"}, "down for maintenance")
            first, later, other = event("u-1"), event("u-1"), event("u-2")
            outcomes = await hook.deliver([first, later, other])
            assert outcomes[0] == Retry("the endpoint answered 503: down for maintenance", 30.0)
            assert isinstance(outcomes[1], Retry) and "an earlier event of the user waits" in outcomes[1].reason
            assert outcomes[2] == Delivered()
            assert receiver.ids == [other.idempotency_key]  # u-1's second event was not sent at all
            receiver.respond(410, body="gone")
            receiver.respond(429)
            receiver.respond(400, body="bad payload")
            gone, limited, bad = await hook.deliver([event("a"), event("b"), event("c")])
            assert gone == Rejected("the endpoint answered 410: gone")
            assert limited == Retry("the endpoint answered 429", None)
            assert bad == Rejected("the endpoint answered 400: bad payload")
            receiver.respond(302, {"Location": "https://elsewhere.example/"})
            [moved] = await hook.deliver([event()])
            assert isinstance(moved, Rejected) and "302" in moved.reason  # redirects are not followed
        finally:
            await hook.close()


async def test_an_unreachable_or_silent_endpoint_is_retried() -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        url = receiver.url
        hook = WebhookDestination(url, [secret], timeout_s=0.5)
        try:
            receiver.hang()
            [silent] = await hook.deliver([event()])
            assert isinstance(silent, Retry) and "did not answer in time" in silent.reason
        finally:
            await hook.close()
    hook = WebhookDestination(url, [secret], timeout_s=0.5)  # the receiver has stopped: nothing listens
    try:
        [refused] = await hook.deliver([event()])
        assert isinstance(refused, Retry) and "could not be reached" in refused.reason
    finally:
        await hook.close()


async def test_an_erasure_is_a_signed_user_erased_message_with_a_stable_id() -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        hook = WebhookDestination(receiver.url, [secret])
        try:
            done = await hook.erase("u-9")
            receiver.respond(500)
            failed = await hook.erase("u-9")
            again = await hook.erase("u-9")
        finally:
            await hook.close()
    assert done.supported and done.done and again.done
    assert failed.supported and not failed.done and "500" in failed.detail
    first, second = receiver.deliveries
    assert first.payload["type"] == "user.erased" and first.payload["data"] == {"user_id": "u-9"}
    assert first.webhook_id == second.webhook_id  # a retried erasure is the same message


def test_secrets_are_standard_webhooks_secrets() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        WebhookDestination("https://example.com/h", ["not-a-secret"])
    with pytest.raises(ValueError, match="24 to 64 bytes"):
        WebhookDestination("https://example.com/h", ["whsec_c2hvcnQ="])
    with pytest.raises(ValueError, match="needs its signing secret"):
        WebhookDestination("https://example.com/h", [])


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
    assert retry_after("120", now) == 120.0
    assert retry_after("Tue, 08 Dec 2026 10:01:30 GMT", now) == 90.0
    assert retry_after("Tue, 08 Dec 2026 09:00:00 GMT", now) == 0.0
    assert retry_after("soon", now) is None and retry_after(None, now) is None
