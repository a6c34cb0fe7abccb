"""The vendor adapters' pure parts: answers to outcomes, batching, ``Retry-After``, values, and how each adapter
shapes an event before its vendor's client sends it (no network: the contract over HTTP is
``tests/integration/test_destination_adapters.py``)."""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime

import pytest

from firstmile.destinations.amplitude import AmplitudeDestination
from firstmile.destinations.intercom import EVENT_ID_KEY, IntercomDestination, contact_fields, metadata
from firstmile.destinations.mixpanel import MixpanelDestination
from firstmile.destinations.port import Delivered, Destination, OutboundEvent, Rejected, Retry
from firstmile.destinations.segment import SegmentDestination
from firstmile.destinations.vendor import (
    MAX_RETRY_AFTER_S,
    Answer,
    Refused,
    Sent,
    Transient,
    classify_status,
    deliver_groups,
    epoch_ms,
    epoch_s,
    flat,
    groups_by,
    jsonable,
    profile_of,
    retry_after_seconds,
)

TENANT = uuid.UUID(int=7)
WHEN = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)


def event(n: int, kind: str = "track", user: str = "u1", **fields: object) -> OutboundEvent:
    return OutboundEvent(uuid.UUID(int=n), TENANT, user, kind, "identify" if kind == "identify" else f"E{n}", WHEN,  # type: ignore[arg-type]
                         **fields)  # type: ignore[arg-type]  # fmt: skip


class Vendor:
    """A scripted vendor: answers per request, by the indices the request holds."""

    def __init__(self, answer: dict[tuple[int, ...], Answer] | None = None, default: Answer | None = None) -> None:
        self.answer = answer or {}
        self.default = default or Sent()
        self.sent: list[tuple[int, ...]] = []

    async def __call__(self, indices: Sequence[int]) -> Answer:
        key = tuple(indices)
        self.sent.append(key)
        return self.answer.get(key, self.default)


async def test_a_group_the_vendor_takes_is_delivered() -> None:
    vendor = Vendor()
    assert await deliver_groups(3, [[0, 1], [2]], vendor) == [Delivered()] * 3
    assert vendor.sent == [(0, 1), (2,)]


async def test_a_group_refused_as_a_whole_is_resent_one_event_at_a_time() -> None:
    vendor = Vendor({(0, 1, 2): Refused("bad batch"), (1,): Refused("bad event")})
    outcomes = await deliver_groups(3, [[0, 1, 2]], vendor)
    assert outcomes == [Delivered(), Rejected("bad event"), Delivered()]
    assert vendor.sent == [(0, 1, 2), (0,), (1,), (2,)]


async def test_a_transient_answer_stops_the_sending_and_retries_the_rest() -> None:
    vendor = Vendor({(2, 3): Transient("HTTP 429", 7.0)})
    outcomes = await deliver_groups(6, [[0, 1], [2, 3], [4, 5]], vendor)
    assert outcomes == [Delivered()] * 2 + [Retry("HTTP 429", 7.0)] * 4
    assert vendor.sent == [(0, 1), (2, 3)]


async def test_a_transient_answer_while_resending_one_by_one_stops_there() -> None:
    vendor = Vendor({(0, 1, 2): Refused("bad batch"), (1,): Transient("HTTP 503")})
    outcomes = await deliver_groups(4, [[0, 1, 2], [3]], vendor)
    assert outcomes == [Delivered(), Retry("HTTP 503"), Retry("HTTP 503"), Retry("HTTP 503")]
    assert vendor.sent == [(0, 1, 2), (0,), (1,)]


async def test_outcomes_decided_before_sending_are_kept() -> None:
    vendor = Vendor()
    outcomes = await deliver_groups(3, [[0, 2]], vendor, outcomes=[None, Rejected("too big"), None])
    assert outcomes == [Delivered(), Rejected("too big"), Delivered()]


async def test_an_event_in_no_group_is_a_bug() -> None:
    with pytest.raises(AssertionError, match=r"\[1\]"):
        await deliver_groups(2, [[0]], Vendor())


def test_groups_keep_each_endpoint_in_order_within_the_limits() -> None:
    keys = ["track", "engage", "track", None, "track", "engage"]
    assert groups_by(keys, 2) == [[0, 2], [1, 5], [4]]
    assert groups_by(["b"] * 4, 10, size=[40, 40, 40, 40], max_bytes=100) == [[0, 1], [2, 3]]
    assert groups_by([], 5) == []


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Sent()),
        (202, Sent()),
        (400, Refused("HTTP 400: x")),
        (413, Refused("HTTP 413: x")),
        (429, Transient("HTTP 429: x", 3.0)),
        (503, Transient("HTTP 503: x", 3.0)),
        (408, Transient("HTTP 408: x", 3.0)),
    ],
)
def test_statuses_are_answers(status: int, expected: Answer) -> None:
    assert classify_status(status, "x", 3.0) == expected


def test_a_refused_credential_waits_instead_of_rejecting() -> None:
    answer = classify_status(401, "Access Token Invalid")
    assert isinstance(answer, Transient) and "credential" in answer.reason
    assert isinstance(classify_status(403, "forbidden"), Transient)
    assert isinstance(classify_status(302, "moved"), Transient)


def test_retry_after_is_read_in_seconds_or_as_a_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert retry_after_seconds("999999") == MAX_RETRY_AFTER_S
    for unreadable in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(unreadable) is None


def test_times_are_utc_and_naive_ones_are_taken_as_utc() -> None:
    assert epoch_ms(WHEN) == 1772600767890
    assert epoch_ms(WHEN.replace(tzinfo=None)) == 1772600767890
    assert epoch_ms(WHEN.astimezone(timezone(timedelta(hours=5)))) == 1772600767890
    assert epoch_s(WHEN) == 1772600767


class Colour(enum.Enum):
    TEAL = "teal"


@dataclass
class Step:
    name: str


def test_values_become_plain_json() -> None:
    value = {"at": WHEN, "id": uuid.UUID(int=1), "n": Decimal("1.5"), "tags": {"a"}, "c": Colour.TEAL,
             "step": Step("x"), "bad": math.nan, "day": WHEN.date(), 3: object}  # fmt: skip
    plain = jsonable(value)
    assert plain == {"at": "2026-03-04T05:06:07.890000+00:00", "id": str(uuid.UUID(int=1)), "n": 1.5, "tags": ["a"],
                     "c": "teal", "step": {"name": "x"}, "bad": None, "day": "2026-03-04",
                     "3": "<class 'object'>"}  # fmt: skip
    assert flat({"b": 1, "a": [2]}) == '{"a":[2],"b":1}'
    assert flat(3) == 3 and flat(None) is None


def test_an_identify_sets_its_fields_and_traits_the_trait_winning() -> None:
    identify = event(1, "identify", properties={"plan": "free", "path": "dev"}, traits={"plan": "pro"})
    assert profile_of(identify) == {"plan": "pro", "path": "dev"}


def test_intercom_metadata_carries_the_key_first_and_ten_keys_at_most() -> None:
    data = metadata(event(2, properties={f"p{i:02}": i for i in range(15)} | {"nested": {"a": 1}, "none": None}))
    assert next(iter(data)) == EVENT_ID_KEY and data[EVENT_ID_KEY] == uuid.UUID(int=2).hex
    assert len(data) == 10 and all(isinstance(v, str) for v in data.values())
    assert data["p00"] == "0"


def test_intercom_contact_fields_are_its_own_the_rest_custom_attributes() -> None:
    fields, custom = contact_fields(
        event(3, "identify", properties={"step": "a"}, traits={"email": "a@x.test", "name": 5, "tags": ["x"]})
    )
    assert fields == {"email": "a@x.test"}
    assert custom == {"step": "a", "name": 5, "tags": '["x"]'}


def test_mixpanel_routes_by_age_and_uses_reserved_profile_properties() -> None:
    now = WHEN + timedelta(hours=1)
    plain = MixpanelDestination("tok")
    with_secret = MixpanelDestination("tok", api_secret="sec")
    recent = event(4, properties={"token": "evil", "distinct_id": "evil", "path": "dev"})
    old = OutboundEvent(uuid.UUID(int=5), TENANT, "u1", "track", "E5", now - timedelta(days=5), {})
    assert plain.message(recent, now) is not None
    endpoint, message = plain.message(recent, now)  # type: ignore[misc]
    assert endpoint == "events"
    assert '"token":"tok"' in message and '"distinct_id":"u1"' in message and "evil" not in message
    assert plain.message(old, now) is None
    assert with_secret.message(old, now)[0] == "imports"  # type: ignore[index]
    endpoint, message = plain.message(event(6, "identify", traits={"email": "a@x.test", "plan": "pro"}), now)  # type: ignore[misc]
    assert endpoint == "people"
    assert '"$set":{"$email":"a@x.test","plan":"pro"}' in message


def test_segment_shapes_messages_with_its_library() -> None:
    destination = SegmentDestination("key")
    message = destination.message(event(7, properties={"path": "dev"}))
    assert message["type"] == "track" and message["messageId"] == uuid.UUID(int=7).hex
    assert message["timestamp"] == "2026-03-04T05:06:07.890+00:00"
    with pytest.raises(RuntimeError, match="exceeds"):
        destination.message(event(8, properties={"blob": "x" * 40_000}))


async def test_amplitude_sends_values_its_sdk_would_drop_as_text() -> None:
    destination = AmplitudeDestination("key")
    try:
        built = destination.event(event(12, properties={"grid": [[1, 2]], "gaps": [1, None], "ok": [1, "a"]}))
        assert built is not None
        assert built.get_event_body()["event_properties"] == {"grid": "[[1,2]]", "gaps": "[1,null]", "ok": [1, "a"]}
    finally:
        await destination.close()


async def test_amplitude_skips_an_identify_with_nothing_to_set() -> None:
    destination = AmplitudeDestination("key")
    try:
        assert destination.event(event(9, "identify", traits={"gone": None})) is None
        assert await destination.deliver([event(9, "identify")]) == [Delivered()]
        built = destination.event(event(10, "identify", traits={"plan": "pro", "gone": None}))
        assert built is not None and built.get_event_body()["user_properties"] == {"$set": {"plan": "pro"}}
        assert await destination.deliver([OutboundEvent(uuid.UUID(int=11), TENANT, "", "track", "E", WHEN)]) == [
            Rejected("Amplitude needs a user id and an event name")
        ]
    finally:
        await destination.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SegmentDestination(""),
        lambda: SegmentDestination("k", timeout_s=0),
        lambda: MixpanelDestination(""),
        lambda: AmplitudeDestination("", timeout_s=1),
        lambda: AmplitudeDestination("k", timeout_s=-1),
        lambda: IntercomDestination(""),
    ],
)
def test_missing_credentials_and_bad_timeouts_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


async def test_each_adapter_names_its_kind_and_batch() -> None:
    adapters: list[Destination] = [
        SegmentDestination("k"),
        MixpanelDestination("t"),
        AmplitudeDestination("a"),
        IntercomDestination("i"),
    ]
    try:
        assert [(a.kind, a.max_batch) for a in adapters] == [
            ("segment", 1000), ("mixpanel", 500), ("amplitude", 500), ("intercom", 25)]  # fmt: skip
    finally:
        for adapter in adapters:
            await adapter.close()
