"""Events to analytics rows, and Segment message parsing details."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from firstmile.analytics.sink import to_analytics
from firstmile.events.bus import UnprocessableEventError
from firstmile.events.envelope import Envelope, decode, encode
from firstmile.events.segment import event_id_for, parse_batch

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def envelope(event_type: str, payload: dict[str, object]) -> Envelope:
    return Envelope(uuid.uuid4(), TENANT, event_type, NOW, payload, f"{TENANT}:u")


def test_a_track_event_keeps_name_time_and_properties() -> None:
    row = to_analytics(
        envelope(
            "track",
            {
                "userId": "u",
                "event": "Report Created",
                "timestamp": "2026-11-20T10:00:00+01:00",
                "receivedAt": NOW.isoformat(),
                "properties": {"kind": "bar"},
            },
        )
    )
    assert (row.event_type, row.event_name, row.user_id) == ("track", "Report Created", "u")
    assert row.occurred_at == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    assert row.properties == '{"kind":"bar"}'


@pytest.mark.parametrize(
    ("kind", "payload", "name", "properties"),
    [
        ("screen", {"name": "Home", "properties": {"tab": "a"}}, "Home", '{"tab":"a"}'),
        ("group", {"groupId": "g1", "traits": {"plan": "pro"}}, "", '{"plan":"pro","groupId":"g1"}'),
        ("alias", {"previousId": "anon-1"}, "", '{"previousId":"anon-1"}'),
        ("identify", {"traits": {"plan": "pro"}}, "", '{"plan":"pro"}'),
    ],
)
def test_the_other_segment_calls_are_rows_too(
    kind: str, payload: dict[str, object], name: str, properties: str
) -> None:
    row = to_analytics(envelope(kind, {"userId": "u", "timestamp": NOW.isoformat(), **payload}))
    assert (row.event_type, row.event_name, row.user_id, row.properties) == (kind, name, "u", properties)


def test_onboarding_facts_carry_the_path_persona_and_variant() -> None:
    row = to_analytics(
        envelope(
            "onboarding.started",
            {
                "user_id": "u",
                "path_id": "p",
                "path_version": 2,
                "traits": {"persona": "developer"},
                "decision": {"selected_by": "rules", "variant": "B"},
            },
        )
    )
    assert (row.path_key, row.path_version, row.persona, row.variant) == ("p", 2, "developer", "B")
    assert row.occurred_at == NOW
    completed = to_analytics(
        envelope(
            "onboarding.step_completed",
            {
                "user_id": "u",
                "path_id": "p",
                "path_version": 2,
                "step_id": "s1",
                "occurred_at": "2026-11-25T00:00:00+00:00",
            },
        )
    )
    assert completed.step_id == "s1"
    assert completed.occurred_at == datetime(2026, 11, 25, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event_type", "payload", "reason"),
    [
        ("onboarding.started", {"user_id": "u"}, "needs user_id, path_id and path_version"),
        ("track", {"event": "E", "timestamp": NOW.isoformat()}, "without userId or anonymousId"),
        ("track", {"userId": "u", "event": "E", "timestamp": "soon"}, "is not ISO-8601"),
        ("mystery", {}, "unknown event type"),
    ],
)
def test_events_that_cannot_be_mapped_say_why(event_type: str, payload: dict[str, object], reason: str) -> None:
    with pytest.raises(UnprocessableEventError, match=reason):
        to_analytics(envelope(event_type, payload))


def test_the_envelope_round_trips() -> None:
    original = envelope("track", {"userId": "u", "nested": {"a": [1, 2]}})
    assert decode(encode(original)) == original


def test_event_ids_are_stable_per_tenant_and_message() -> None:
    other = uuid.UUID("00000000-0000-4000-8000-000000000002")
    assert event_id_for(TENANT, "m1") == event_id_for(TENANT, "m1")
    assert event_id_for(TENANT, "m1") != event_id_for(other, "m1")


@pytest.mark.parametrize("message_id", ["m1", "", "ünïcødé-✓", "x" * 128, "a:b@c.d+e-f_g", "\u0000\n\t"])
def test_event_ids_are_rfc_4122_name_based_ids(message_id: str) -> None:
    """uuid5(tenant, messageId): ids stored before ingestion computed them itself stay the same."""
    for tenant in (TENANT, uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4()):
        assert event_id_for(tenant, message_id) == uuid.uuid5(tenant, message_id)
        assert event_id_for(tenant, message_id).version == 5
    [message] = parse_batch(
        TENANT, [{"type": "track", "messageId": message_id or "m", "userId": "u", "event": "E"}], NOW
    ).messages
    assert message.event_id == uuid.uuid5(TENANT, message_id or "m")
    assert message.payload["receivedAt"] == NOW.isoformat()


def test_a_repeated_message_id_in_one_batch_is_kept_once() -> None:
    msg = {"type": "track", "messageId": "m", "userId": "u", "event": "E"}
    parsed = parse_batch(TENANT, [msg, dict(msg), {**msg, "messageId": "n"}], NOW)
    assert [m.message_id for m in parsed.messages] == ["m", "n"]
    assert parsed.duplicates_in_batch == 1
    assert parsed.rejected == []
