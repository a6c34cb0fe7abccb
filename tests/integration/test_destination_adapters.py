"""The destination port's contract (``firstmile.destinations.port``), run against every adapter over real HTTP.

Each adapter drives its vendor's official client against a local stand-in that speaks the vendor's documented
API (``tests/support/analytics_standins.py``); no database is needed. The contract, for every adapter:

- a batch of identify and track events is delivered with exactly the requests the vendor documents (bodies
  asserted whole: the idempotency key where the vendor deduplicates, timestamps, names, properties, traits);
- a redelivery of the same events carries the same idempotency keys, and the vendor counts each event once;
- a ``429`` is :class:`Retry` for every event, after the vendor's wait; a ``503`` is :class:`Retry` for every
  event; a client timeout is :class:`Retry`;
- an event the vendor's validation refuses is :class:`Rejected`, alone: the others are delivered once;
- an erasure is the vendor's documented deletion request.

A new adapter joins the suite as one more :class:`AdapterCase` in :data:`CASES`. Vendor-specific behaviour
(limits, routes, what the library refuses itself) is tested after the contract.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from firstmile.destinations.amplitude import THROTTLE_PAUSE_S, AmplitudeDestination
from firstmile.destinations.intercom import INTERCOM_API_VERSION, IntercomDestination
from firstmile.destinations.mixpanel import MIXPANEL_MAX_BATCH, MIXPANEL_MAX_BYTES, MixpanelDestination
from firstmile.destinations.port import (
    Delivered,
    Destination,
    ErasureOutcome,
    OutboundEvent,
    Outcome,
    Rejected,
    Retry,
)
from firstmile.destinations.segment import SegmentDestination
from tests.support.analytics_standins import (
    AmplitudeStandIn,
    IntercomStandIn,
    MixpanelStandIn,
    SegmentStandIn,
    VendorStandIn,
)
from tests.support.tls import LoopbackTls, loopback_tls

TENANT = uuid.UUID("5d1e4a7c-0000-4000-8000-00000000f1e5")
T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=250000)
"""Two hours ago: inside Mixpanel's 5-day ``/track`` window."""


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


IDENTIFY_ADA = OutboundEvent(
    uuid.UUID(int=0xA1), TENANT, "u-ada", "identify", "identify", at(0),
    properties={"onboarding_path": "developer", "onboarding_step": "connect"},
    traits={"plan": "pro", "email": "ada@example.com"},
)  # fmt: skip
STARTED_ADA = OutboundEvent(
    uuid.UUID(int=0xA2), TENANT, "u-ada", "track", "Onboarding Started", at(1),
    properties={"path": "developer", "version": 3},
)  # fmt: skip
STEP_ADA = OutboundEvent(
    uuid.UUID(int=0xA3), TENANT, "u-ada", "track", "Onboarding Step Completed", at(2),
    properties={"path": "developer", "step": "connect", "channel": "in_app",
                "experiment": {"name": "nudge-copy", "variant": "b"}},
)  # fmt: skip
STUCK_BOB = OutboundEvent(
    uuid.UUID(int=0xB1), TENANT, "u-bob", "track", "Onboarding Stuck", at(3), properties={"step": "invite"}
)
EVENTS = [IDENTIFY_ADA, STARTED_ADA, STEP_ADA, STUCK_BOB]
REFUSED_USER = "u-refused"
REFUSED = OutboundEvent(
    uuid.UUID(int=0xC1), TENANT, REFUSED_USER, "track", "Onboarding Started", at(4), properties={"path": "developer"}
)
TRACKS = [e for e in EVENTS if e.kind == "track"]


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


@dataclass(frozen=True)
class AdapterCase:
    """One adapter and its vendor, as the contract needs them."""

    name: str
    vendor: Callable[[], AbstractContextManager[Any]]
    """Starts the vendor's stand-in (a context manager yielding it)."""
    adapter: Callable[[Any, float], Destination]
    """The adapter pointed at the stand-in, with a client timeout in seconds."""
    requests: Callable[[Any], list[tuple[str, str, Any]]]
    """What the vendor received, as ``(method, path, payload)`` (each request's headers checked on the way)."""
    expected: list[tuple[str, str, Any]]
    """What a first delivery of :data:`EVENTS` to a fresh vendor must send, exactly."""
    keys: Callable[[Any], list[str]]
    """The idempotency keys of the events the vendor took, in the order it took them."""
    counted: Callable[[Any], int]
    """How many distinct events the vendor counts."""
    rate_limit: Callable[[Any, int], float]
    """Scripts the vendor's ``429`` asking for a pause of N seconds; answers the ``after_s`` the adapter owes."""
    erased: Callable[[Any, str, ErasureOutcome], None]
    """Checks the vendor's deletion request for a user, and the adapter's outcome."""


def _accepted(standin: VendorStandIn, method: str, path: str) -> list[Any]:
    return [
        d.payload for d in standin.decoded if (d.request.method, d.request.path) == (method, path) and d.status < 300
    ]


# --- Segment: HTTP Tracking API (/v1/batch), Public API (/regulations) ---------------------------------------

SEGMENT_KEY = "seg-write-key"
SEGMENT_TOKEN = "seg-public-token"
SEGMENT_CONTEXT = {"library": {"name": "analytics-python", "version": "2.4.0"}}


def _segment_adapter(standin: SegmentStandIn, timeout_s: float) -> Destination:
    return SegmentDestination(
        SEGMENT_KEY, host=standin.url, timeout_s=timeout_s, public_api_token=SEGMENT_TOKEN, public_api_url=standin.url
    )


def _segment_requests(standin: SegmentStandIn) -> list[tuple[str, str, Any]]:
    seen = []
    for d in standin.decoded:
        if d.request.path == "/v1/batch":
            assert d.request.basic_auth() == (SEGMENT_KEY, "")
            assert d.request.headers["content-type"] == "application/json"
            body = dict(d.payload)
            sent_at = datetime.fromisoformat(body.pop("sentAt"))
            assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 60
            seen.append((d.request.method, d.request.path, body))
        else:
            seen.append((d.request.method, d.request.path, d.payload))
    return seen


SEGMENT_EXPECTED = [("POST", "/v1/batch", {"writeKey": SEGMENT_KEY, "batch": [
    {"type": "identify", "userId": "u-ada", "anonymousId": None, "messageId": IDENTIFY_ADA.idempotency_key,
     "timestamp": at(0).isoformat(timespec="milliseconds"), "context": SEGMENT_CONTEXT, "integrations": {},
     "traits": {"onboarding_path": "developer", "onboarding_step": "connect", "plan": "pro",
                "email": "ada@example.com"}},
    {"type": "track", "userId": "u-ada", "anonymousId": None, "messageId": STARTED_ADA.idempotency_key,
     "timestamp": at(1).isoformat(timespec="milliseconds"), "context": SEGMENT_CONTEXT, "integrations": {},
     "event": "Onboarding Started", "properties": {"path": "developer", "version": 3}},
    {"type": "track", "userId": "u-ada", "anonymousId": None, "messageId": STEP_ADA.idempotency_key,
     "timestamp": at(2).isoformat(timespec="milliseconds"), "context": SEGMENT_CONTEXT, "integrations": {},
     "event": "Onboarding Step Completed", "properties": {"path": "developer", "step": "connect",
                                                          "channel": "in_app",
                                                          "experiment": {"name": "nudge-copy", "variant": "b"}}},
    {"type": "track", "userId": "u-bob", "anonymousId": None, "messageId": STUCK_BOB.idempotency_key,
     "timestamp": at(3).isoformat(timespec="milliseconds"), "context": SEGMENT_CONTEXT, "integrations": {},
     "event": "Onboarding Stuck", "properties": {"step": "invite"}},
]})]  # fmt: skip


def _segment_keys(standin: SegmentStandIn) -> list[str]:
    return [m["messageId"] for body in _accepted(standin, "POST", "/v1/batch") for m in body["batch"]]


def _segment_rate_limit(standin: SegmentStandIn, seconds: int) -> float:
    standin.respond(429, {"Retry-After": str(seconds)}, {"code": "rate_limited", "message": "Too Many Requests"})
    return float(seconds)


def _segment_erased(standin: SegmentStandIn, user_id: str, outcome: ErasureOutcome) -> None:
    assert outcome.supported and outcome.done, outcome
    [request] = [d.request for d in standin.decoded if d.request.path == "/regulations"]
    assert request.headers["authorization"] == f"Bearer {SEGMENT_TOKEN}"
    assert request.json() == {
        "regulationType": "SUPPRESS_WITH_DELETE",
        "subjectType": "USER_ID",
        "subjectIds": [user_id],
    }
    [regulation] = standin.regulations
    assert regulation["regulateId"] in outcome.detail


SEGMENT = AdapterCase(
    "segment", SegmentStandIn, _segment_adapter, _segment_requests, SEGMENT_EXPECTED, _segment_keys,
    lambda s: len(s.messages), _segment_rate_limit, _segment_erased,
)  # fmt: skip


# --- Mixpanel: Ingestion API (/track, /engage), over HTTPS ---------------------------------------------------

MIXPANEL_TOKEN = "mp-token"
MIXPANEL_SECRET = "mp-secret"
_TLS: list[LoopbackTls] = []


def _tls() -> LoopbackTls:
    if not _TLS:
        _TLS.append(loopback_tls())
    return _TLS[0]


def _mixpanel_vendor() -> MixpanelStandIn:
    return MixpanelStandIn(_tls().server_context, token=MIXPANEL_TOKEN, api_secret=MIXPANEL_SECRET)


def _mixpanel_adapter(standin: MixpanelStandIn, timeout_s: float) -> Destination:
    return MixpanelDestination(
        MIXPANEL_TOKEN, api_host=standin.host, api_secret=MIXPANEL_SECRET, timeout_s=timeout_s, ca_bundle=_tls().ca_file
    )


def _mixpanel_requests(standin: MixpanelStandIn) -> list[tuple[str, str, Any]]:
    seen = []
    for d in standin.decoded:
        form = {k: v[-1] for k, v in parse_qs(d.request.body.decode()).items()}
        assert d.request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert (form["verbose"], form["ip"]) == ("1", "0")
        seen.append((d.request.method, d.request.path, d.payload))
    return seen


def _mixpanel_track(event: OutboundEvent) -> dict[str, Any]:
    return {"event": event.name, "properties": {
        "token": MIXPANEL_TOKEN, "distinct_id": event.user_id, "time": ms(event.occurred_at),
        "$insert_id": event.idempotency_key, "mp_lib": "python", "$lib_version": "5.4.1",
        **event.properties}}  # fmt: skip


MIXPANEL_EXPECTED = [
    ("POST", "/engage", [{"$token": MIXPANEL_TOKEN, "$distinct_id": "u-ada", "$time": round(at(0).timestamp(), 3),
                          "$set": {"onboarding_path": "developer", "onboarding_step": "connect", "plan": "pro",
                                   "$email": "ada@example.com"}}]),
    ("POST", "/track", [_mixpanel_track(e) for e in TRACKS]),
]  # fmt: skip


def _mixpanel_keys(standin: MixpanelStandIn) -> list[str]:
    return [e["properties"]["$insert_id"] for batch in _accepted(standin, "POST", "/track") for e in batch]


def _mixpanel_rate_limit(standin: MixpanelStandIn, seconds: int) -> float:
    standin.respond(429, {"Retry-After": str(seconds)}, {
        "code": 429, "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
        "status": "Too Many Requests"})  # fmt: skip
    return float(seconds)


def _mixpanel_erased(standin: MixpanelStandIn, user_id: str, outcome: ErasureOutcome) -> None:
    assert outcome.supported and outcome.done, outcome
    [update] = standin.payloads("POST", "/engage")[-1]
    assert update == {"$token": MIXPANEL_TOKEN, "$distinct_id": user_id, "$delete": "", "$time": update["$time"]}
    assert user_id not in standin.profiles and standin.deleted_profiles == [user_id]


MIXPANEL = AdapterCase(
    "mixpanel", _mixpanel_vendor, _mixpanel_adapter, _mixpanel_requests, MIXPANEL_EXPECTED, _mixpanel_keys,
    lambda s: len(s.events), _mixpanel_rate_limit, _mixpanel_erased,
)  # fmt: skip


# --- Amplitude: HTTP V2 API (/2/httpapi), User Privacy API (/api/2/deletions/users) --------------------------

AMPLITUDE_KEY = "amp-key"
AMPLITUDE_SECRET = "amp-secret"
AMPLITUDE_LIBRARY = "amplitude-python/1.3.0"


def _amplitude_adapter(standin: AmplitudeStandIn, timeout_s: float) -> Destination:
    return AmplitudeDestination(
        AMPLITUDE_KEY, secret_key=AMPLITUDE_SECRET, server_url=f"{standin.url}/2/httpapi", timeout_s=timeout_s,
        deletion_url=f"{standin.url}/api/2/deletions/users",
    )  # fmt: skip


def _amplitude_requests(standin: AmplitudeStandIn) -> list[tuple[str, str, Any]]:
    for d in standin.decoded:
        assert d.request.headers["content-type"].startswith("application/json")
    return [(d.request.method, d.request.path, d.payload) for d in standin.decoded]


def _amplitude_track(event: OutboundEvent) -> dict[str, Any]:
    return {"event_type": event.name, "user_id": event.user_id, "time": ms(event.occurred_at),
            "insert_id": event.idempotency_key, "library": AMPLITUDE_LIBRARY,
            "event_properties": dict(event.properties)}  # fmt: skip


AMPLITUDE_EXPECTED = [("POST", "/2/httpapi", {"api_key": AMPLITUDE_KEY, "options": {"min_id_length": 1}, "events": [
    {"event_type": "$identify", "user_id": "u-ada", "time": ms(at(0)), "insert_id": IDENTIFY_ADA.idempotency_key,
     "library": AMPLITUDE_LIBRARY, "user_properties": {"$set": {
         "onboarding_path": "developer", "onboarding_step": "connect", "plan": "pro", "email": "ada@example.com"}}},
    *[_amplitude_track(e) for e in TRACKS],
]})]  # fmt: skip


def _amplitude_keys(standin: AmplitudeStandIn) -> list[str]:
    return [e["insert_id"] for body in _accepted(standin, "POST", "/2/httpapi") for e in body["events"]]


def _amplitude_rate_limit(standin: AmplitudeStandIn, seconds: int) -> float:
    standin.respond(429, {"Retry-After": str(seconds)}, {
        "code": 429, "error": "Too many requests for some devices and users", "eps_threshold": 30,
        "throttled_devices": {}, "throttled_users": {"u-ada": 31, "u-bob": 31}, "throttled_events": [0, 1, 2, 3],
        "exceeded_daily_quota_devices": {}, "exceeded_daily_quota_users": {}})  # fmt: skip
    return THROTTLE_PAUSE_S  # the SDK gives no headers: Amplitude's documented 30 s pause


def _amplitude_erased(standin: AmplitudeStandIn, user_id: str, outcome: ErasureOutcome) -> None:
    assert outcome.supported and outcome.done, outcome
    [request] = [d.request for d in standin.decoded if d.request.path == "/api/2/deletions/users"]
    assert request.basic_auth() == (AMPLITUDE_KEY, AMPLITUDE_SECRET)
    assert standin.deletions == [{"user_ids": [user_id], "requester": "firstmile", "ignore_invalid_id": "True"}]
    assert '"status": "staging"' in outcome.detail


AMPLITUDE = AdapterCase(
    "amplitude", AmplitudeStandIn, _amplitude_adapter, _amplitude_requests, AMPLITUDE_EXPECTED, _amplitude_keys,
    lambda s: len(s.events), _amplitude_rate_limit, _amplitude_erased,
)  # fmt: skip


# --- Intercom: REST API (contacts, data events) ---------------------------------------------------------------

INTERCOM_TOKEN = "ic-token"
INTERCOM_ATTRIBUTES = frozenset({"onboarding_path", "onboarding_step", "plan"})


def _intercom_vendor() -> IntercomStandIn:
    return IntercomStandIn(INTERCOM_TOKEN, data_attributes=INTERCOM_ATTRIBUTES)


def _intercom_adapter(standin: IntercomStandIn, timeout_s: float) -> Destination:
    return IntercomDestination(INTERCOM_TOKEN, base_url=standin.url, timeout_s=timeout_s)


def _intercom_requests(standin: IntercomStandIn) -> list[tuple[str, str, Any]]:
    for d in standin.decoded:
        assert d.request.headers["authorization"] == f"Bearer {INTERCOM_TOKEN}"
        assert d.request.headers["intercom-version"] == INTERCOM_API_VERSION
    return [(d.request.method, d.request.path, d.payload) for d in standin.decoded]


def _intercom_event(event: OutboundEvent, metadata: dict[str, str]) -> tuple[str, str, Any]:
    body = {"user_id": event.user_id, "event_name": event.name, "created_at": int(event.occurred_at.timestamp()),
            "metadata": {"firstmile_event_id": event.idempotency_key, **metadata}}  # fmt: skip
    return ("POST", "/events", body)


INTERCOM_EXPECTED = [
    ("GET", "/contacts/find_by_external_id/u-ada", None),  # 404: a new contact
    ("POST", "/contacts", {"role": "user", "external_id": "u-ada", "email": "ada@example.com", "custom_attributes": {
        "onboarding_path": "developer", "onboarding_step": "connect", "plan": "pro"}}),
    _intercom_event(STARTED_ADA, {"path": "developer", "version": "3"}),
    _intercom_event(STEP_ADA, {"path": "developer", "step": "connect", "channel": "in_app",
                               "experiment": '{"name":"nudge-copy","variant":"b"}'}),
    _intercom_event(STUCK_BOB, {"step": "invite"}),  # 404 "User Not Found": the contact is made, and it is sent again
    ("POST", "/contacts", {"role": "user", "external_id": "u-bob"}),
    _intercom_event(STUCK_BOB, {"step": "invite"}),
]  # fmt: skip


def _intercom_keys(standin: IntercomStandIn) -> list[str]:
    return [body["metadata"]["firstmile_event_id"] for body in _accepted(standin, "POST", "/events")]


def _intercom_rate_limit(standin: IntercomStandIn, seconds: int) -> float:
    reset = int(time.time()) + seconds
    standin.respond(
        429,
        {"X-RateLimit-Limit": "10000", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)},
        {"type": "error.list", "errors": [{"code": "rate_limit_exceeded", "message": "Exceeded rate limit"}]},
    )
    return reset - time.time()


def _intercom_erased(standin: IntercomStandIn, user_id: str, outcome: ErasureOutcome) -> None:
    assert outcome.supported and outcome.done, outcome
    assert standin.contact(user_id) is None and len(standin.deleted) == 1
    assert [(d.request.method, d.request.path) for d in standin.decoded[-2:]] == [
        ("GET", f"/contacts/find_by_external_id/{user_id}"), ("DELETE", f"/contacts/{standin.deleted[0]}")]  # fmt: skip


INTERCOM = AdapterCase(
    "intercom", _intercom_vendor, _intercom_adapter, _intercom_requests, INTERCOM_EXPECTED, _intercom_keys,
    lambda s: len(s.events), _intercom_rate_limit, _intercom_erased,
)  # fmt: skip


CASES = [SEGMENT, MIXPANEL, AMPLITUDE, INTERCOM]
"""Every adapter the contract runs against: a new destination is one more entry."""


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest) -> AdapterCase:
    chosen: AdapterCase = request.param
    return chosen


@pytest.fixture
def vendor(case: AdapterCase) -> Iterator[Any]:
    with case.vendor() as standin:
        yield standin


@pytest.fixture
async def destination(case: AdapterCase, vendor: Any) -> AsyncIterator[Destination]:
    adapter = case.adapter(vendor, 5.0)
    yield adapter
    await adapter.close()


# --- the contract ---------------------------------------------------------------------------------------------


async def test_a_batch_is_delivered_with_the_documented_requests(
    case: AdapterCase, vendor: Any, destination: Destination
) -> None:
    assert destination.max_batch >= 1
    assert await destination.deliver(EVENTS) == [Delivered()] * len(EVENTS)
    assert case.requests(vendor) == case.expected
    assert set(case.keys(vendor)) >= {e.idempotency_key for e in TRACKS}


async def test_a_redelivery_carries_the_same_keys_and_is_counted_once(
    case: AdapterCase, vendor: Any, destination: Destination
) -> None:
    assert await destination.deliver(EVENTS) == [Delivered()] * len(EVENTS)
    first, counted = case.keys(vendor), case.counted(vendor)
    assert await destination.deliver(EVENTS) == [Delivered()] * len(EVENTS)
    assert case.keys(vendor) == first + first
    assert case.counted(vendor) == counted >= len(TRACKS)


async def test_a_429_is_a_retry_after_the_vendors_pause(
    case: AdapterCase, vendor: Any, destination: Destination
) -> None:
    expected = case.rate_limit(vendor, 7)
    outcomes = await destination.deliver(EVENTS)
    assert all(isinstance(o, Retry) for o in outcomes), outcomes
    assert [o.after_s for o in outcomes if isinstance(o, Retry)] == [pytest.approx(expected, abs=1.5)] * len(EVENTS)
    assert "429" in outcomes[0].reason  # type: ignore[union-attr]
    assert case.counted(vendor) == 0


async def test_a_503_is_a_retry_of_every_event(case: AdapterCase, vendor: Any, destination: Destination) -> None:
    for _ in range(3):
        vendor.respond(503, {"Content-Type": "text/html"}, "<html><body>Service Unavailable</body></html>")
    outcomes = await destination.deliver(EVENTS)
    assert all(isinstance(o, Retry) and o.after_s is None for o in outcomes), outcomes
    assert case.counted(vendor) == 0
    assert len(vendor.requests) == 1  # the outage is not hammered: nothing more is sent in this call


async def test_a_timeout_is_a_retry(case: AdapterCase, vendor: Any) -> None:
    vendor.hang()
    adapter = case.adapter(vendor, 0.5)
    try:
        outcomes = await adapter.deliver(EVENTS)
    finally:
        await adapter.close()
    assert all(isinstance(o, Retry) for o in outcomes), outcomes


async def test_an_event_the_vendor_refuses_is_rejected_alone(
    case: AdapterCase, vendor: Any, destination: Destination
) -> None:
    vendor.refuse(REFUSED_USER)
    batch = [IDENTIFY_ADA, STARTED_ADA, REFUSED, STEP_ADA, STUCK_BOB]
    outcomes = await destination.deliver(batch)
    assert [type(o) for o in outcomes] == [Delivered, Delivered, Rejected, Delivered, Delivered], outcomes
    assert outcomes[2].reason  # type: ignore[union-attr]
    keys = case.keys(vendor)
    assert REFUSED.idempotency_key not in keys
    assert all(keys.count(e.idempotency_key) == 1 for e in TRACKS)


async def test_an_erasure_is_the_documented_deletion(case: AdapterCase, vendor: Any, destination: Destination) -> None:
    assert await destination.deliver(EVENTS) == [Delivered()] * len(EVENTS)
    outcome = await destination.erase("u-ada")
    case.erased(vendor, "u-ada", outcome)


# --- Segment ---------------------------------------------------------------------------------------------------


async def test_segment_refuses_a_message_over_32_kb_before_sending_it() -> None:
    big = replace(STARTED_ADA, event_id=uuid.UUID(int=0xD1), properties={"blob": "x" * 33_000})
    with SegmentStandIn() as standin:
        adapter = _segment_adapter(standin, 5.0)
        outcomes = await adapter.deliver([STARTED_ADA, big, STUCK_BOB])
    assert [type(o) for o in outcomes] == [Delivered, Rejected, Delivered]
    assert "32 KB" in outcomes[1].reason  # type: ignore[union-attr]
    assert _segment_keys(standin) == [STARTED_ADA.idempotency_key, STUCK_BOB.idempotency_key]
    assert len(standin.requests) == 1


async def test_segment_resends_a_batch_refused_as_a_whole_one_message_at_a_time() -> None:
    with SegmentStandIn() as standin:
        standin.respond(400, None, {"code": "invalid_request", "message": "Bad Request"})  # the batch
        standin.respond(200, None, {"success": True})  # its first message alone
        standin.respond(400, None, {"code": "invalid_request", "message": "Bad Request"})  # the second alone
        adapter = _segment_adapter(standin, 5.0)
        outcomes = await adapter.deliver(TRACKS)
    assert [type(o) for o in outcomes] == [Delivered, Rejected, Delivered]
    sizes = [len(r.json()["batch"]) for r in standin.requests]
    assert sizes == [3, 1, 1, 1]
    assert [r.json()["batch"][0]["messageId"] for r in standin.requests[1:]] == [e.idempotency_key for e in TRACKS]


async def test_segment_without_a_public_api_token_cannot_erase() -> None:
    with SegmentStandIn() as standin:
        outcome = await SegmentDestination(SEGMENT_KEY, host=standin.url).erase("u-ada")
    assert not outcome.supported and not outcome.done and "public_api_token" in outcome.detail
    assert standin.requests == []


# --- Mixpanel ----------------------------------------------------------------------------------------------------


async def test_mixpanel_sends_events_older_than_five_days_to_import_with_the_secret() -> None:
    old = replace(STARTED_ADA, event_id=uuid.UUID(int=0xD2), occurred_at=datetime.now(UTC) - timedelta(days=9))
    with _mixpanel_vendor() as standin:
        adapter = _mixpanel_adapter(standin, 5.0)
        try:
            assert await adapter.deliver([old, STUCK_BOB]) == [Delivered(), Delivered()]
        finally:
            await adapter.close()
    [imported] = [r for r in standin.requests if r.path == "/import"]
    assert imported.basic_auth() == (MIXPANEL_SECRET, "")
    assert standin.payloads("POST", "/import") == [[_mixpanel_track(old)]]
    assert list(standin.imported) == [old.idempotency_key]
    assert list(standin.events) == [STUCK_BOB.idempotency_key]


async def test_mixpanel_without_a_secret_rejects_what_track_would_drop() -> None:
    old = replace(STARTED_ADA, event_id=uuid.UUID(int=0xD3), occurred_at=datetime.now(UTC) - timedelta(days=6))
    with _mixpanel_vendor() as standin:
        adapter = MixpanelDestination(MIXPANEL_TOKEN, api_host=standin.host, ca_bundle=_tls().ca_file)
        try:
            outcomes = await adapter.deliver([old, STUCK_BOB])
        finally:
            await adapter.close()
    assert [type(o) for o in outcomes] == [Rejected, Delivered]
    assert "api_secret" in outcomes[0].reason  # type: ignore[union-attr]
    assert [r.path for r in standin.requests] == ["/track"]


async def test_mixpanel_rejects_an_event_with_too_many_properties_alone() -> None:
    wide = replace(STARTED_ADA, event_id=uuid.UUID(int=0xD4), properties={f"p{i}": i for i in range(300)})
    with _mixpanel_vendor() as standin:
        adapter = _mixpanel_adapter(standin, 5.0)
        try:
            outcomes = await adapter.deliver([STARTED_ADA, wide, STUCK_BOB])
        finally:
            await adapter.close()
    assert [type(o) for o in outcomes] == [Delivered, Rejected, Delivered]
    assert "255 properties" in outcomes[1].reason  # type: ignore[union-attr]
    assert [len(b) for b in standin.payloads("POST", "/track")] == [3, 1, 1, 1]
    assert sorted(standin.events) == sorted([STARTED_ADA.idempotency_key, STUCK_BOB.idempotency_key])


async def test_mixpanel_sends_up_to_2000_events_and_2_mb_in_one_request() -> None:
    """Mixpanel's documented limits per request ("Track Events": 2,000 events, 2 MB of uncompressed JSON), not the
    library's ``BufferedConsumer`` 50: 2,000 small events are one request; events of 30 KB go 66 to a request."""
    small = [replace(STUCK_BOB, event_id=uuid.UUID(int=0xE000 + i), user_id=f"u-{i % 300}") for i in range(2000)]
    wide = [replace(STUCK_BOB, event_id=uuid.UUID(int=0xF000 + i), properties={"blob": "x" * 30_000})
            for i in range(70)]  # fmt: skip
    assert MIXPANEL_MAX_BATCH == 2000 and MIXPANEL_MAX_BYTES == 2_000_000
    with _mixpanel_vendor() as standin:
        adapter = _mixpanel_adapter(standin, 10.0)
        try:
            assert await adapter.deliver(small) == [Delivered()] * len(small)
            assert [len(b) for b in standin.payloads("POST", "/track")] == [2000]
            assert await adapter.deliver(wide) == [Delivered()] * len(wide)
        finally:
            await adapter.close()
    batches = standin.payloads("POST", "/track")[1:]
    assert [len(b) for b in batches] == [66, 4]
    assert all(len(json.dumps(b, separators=(",", ":"))) <= MIXPANEL_MAX_BYTES for b in batches)
    assert [e["properties"]["$insert_id"] for b in batches for e in b] == [e.idempotency_key for e in wide]
    assert len(standin.events) == len(small) + len(wide)


async def test_mixpanel_reads_a_base64_data_form_too() -> None:
    """The stand-in takes ``data`` as Mixpanel documents it (base64 of JSON), not only as the library sends it."""
    with _mixpanel_vendor() as standin:
        data = base64.b64encode(b'{"event": "e", "properties": {"token": "mp-token", "$insert_id": "k1"}}').decode()
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=_tls().ca_file)) as client:
            answer = await client.post(f"{standin.url}/track", data={"data": data, "verbose": "1"})
    assert answer.json() == {"error": None, "status": 1}
    assert list(standin.events) == ["k1"]


# --- Amplitude ------------------------------------------------------------------------------------------------


async def test_amplitude_rejects_the_events_a_400_names_and_resends_the_rest_once() -> None:
    with AmplitudeStandIn() as standin:
        standin.respond(400, None, {"code": 400, "error": "Invalid field values on some events",
                                    "events_with_invalid_fields": {"time": [1]}})  # fmt: skip
        adapter = _amplitude_adapter(standin, 5.0)
        try:
            outcomes = await adapter.deliver(TRACKS)
        finally:
            await adapter.close()
    assert [type(o) for o in outcomes] == [Delivered, Rejected, Delivered]
    assert "Invalid field values" in outcomes[1].reason  # type: ignore[union-attr]
    second = standin.payloads("POST", "/2/httpapi")
    assert [e["insert_id"] for e in second[0]["events"]] == [TRACKS[0].idempotency_key, TRACKS[2].idempotency_key]
    assert sorted(standin.events) == sorted([TRACKS[0].idempotency_key, TRACKS[2].idempotency_key])


async def test_amplitude_sends_a_call_of_500_events_as_one_request() -> None:
    """A call is one flush of one request (``flush_queue_size`` 500; Amplitude takes up to 2,000 events), every
    event's result read from the SDK's callback."""
    batch = [replace(STUCK_BOB, event_id=uuid.UUID(int=0xE800 + i), user_id=f"u-{i % 50:03d}") for i in range(500)]
    with AmplitudeStandIn() as standin:
        adapter = _amplitude_adapter(standin, 10.0)
        try:
            assert adapter.max_batch == 500
            assert await adapter.deliver(batch) == [Delivered()] * len(batch)
        finally:
            await adapter.close()
    [request] = standin.payloads("POST", "/2/httpapi")
    assert [e["insert_id"] for e in request["events"]] == [e.idempotency_key for e in batch]
    assert len(standin.events) == len(batch)


async def test_amplitude_takes_short_user_ids() -> None:
    short = replace(STUCK_BOB, user_id="42")
    with AmplitudeStandIn() as standin:
        adapter = _amplitude_adapter(standin, 5.0)
        try:
            assert await adapter.deliver([short]) == [Delivered()]
        finally:
            await adapter.close()
    assert standin.events[short.idempotency_key]["user_id"] == "42"


async def test_amplitude_answers_at_once_when_the_connection_drops() -> None:
    with AmplitudeStandIn() as standin:
        standin.drop()
        adapter = _amplitude_adapter(standin, 30.0)
        try:
            started = time.monotonic()
            outcomes = await adapter.deliver(TRACKS)
            waited = time.monotonic() - started
        finally:
            await adapter.close()
    assert all(isinstance(o, Retry) for o in outcomes), outcomes
    assert waited < 30.0  # the SDK's request ended without results: no waiting for the timeout


async def test_amplitude_without_a_secret_key_cannot_erase() -> None:
    with AmplitudeStandIn() as standin:
        adapter = AmplitudeDestination(AMPLITUDE_KEY, server_url=f"{standin.url}/2/httpapi")
        try:
            outcome = await adapter.erase("u-ada")
        finally:
            await adapter.close()
    assert not outcome.supported and "secret_key" in outcome.detail
    assert standin.requests == []


# --- Intercom -------------------------------------------------------------------------------------------------


async def test_intercom_updates_a_known_contact() -> None:
    with _intercom_vendor() as standin:
        adapter = _intercom_adapter(standin, 5.0)
        try:
            assert await adapter.deliver([IDENTIFY_ADA]) == [Delivered()]
            changed = replace(IDENTIFY_ADA, event_id=uuid.UUID(int=0xD5), traits={"plan": "team"})
            assert await adapter.deliver([changed]) == [Delivered()]
        finally:
            await adapter.close()
    contact = standin.contact("u-ada")
    assert contact is not None
    assert contact["custom_attributes"] == {
        "onboarding_path": "developer",
        "onboarding_step": "connect",
        "plan": "team",
    }
    assert _intercom_requests(standin)[-1] == ("PUT", f"/contacts/{contact['id']}", {"custom_attributes": {
        "onboarding_path": "developer", "onboarding_step": "connect", "plan": "team"}})  # fmt: skip


async def test_intercom_rejects_an_attribute_the_workspace_does_not_have() -> None:
    unknown = replace(IDENTIFY_ADA, traits={"favourite_colour": "teal"})
    with _intercom_vendor() as standin:
        adapter = _intercom_adapter(standin, 5.0)
        try:
            outcomes = await adapter.deliver([unknown, STARTED_ADA])
        finally:
            await adapter.close()
    assert [type(o) for o in outcomes] == [Rejected, Delivered]
    assert "Custom attribute 'favourite_colour' does not exist" in outcomes[0].reason  # type: ignore[union-attr]


async def test_intercom_waits_on_a_refused_token_instead_of_dead_lettering() -> None:
    with _intercom_vendor() as standin:
        adapter = IntercomDestination("not-the-token", base_url=standin.url, timeout_s=5.0)
        try:
            outcomes: list[Outcome] = await adapter.deliver(EVENTS)
        finally:
            await adapter.close()
    assert all(isinstance(o, Retry) and "credential" in o.reason for o in outcomes), outcomes
    assert len(standin.requests) == 1


async def test_an_erasure_of_a_user_intercom_does_not_know_is_done() -> None:
    with _intercom_vendor() as standin:
        adapter = _intercom_adapter(standin, 5.0)
        try:
            outcome = await adapter.erase("u-nobody")
        finally:
            await adapter.close()
    assert outcome.supported and outcome.done and "no contact" in outcome.detail
