"""Segment's and RudderStack's messages as ingestion reads them: the six types, traits, clock skew, gzip bounds."""

from __future__ import annotations

import gzip
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from firstmile.events.api import inflate
from firstmile.events.segment import DEFAULT_MAX_BATCH_BYTES, parse_batch
from firstmile.kit.errors import ProblemError
from tests.factories import ROOT

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def one(message: dict[str, Any], sent_at: datetime | None = None) -> dict[str, Any]:
    parsed = parse_batch(TENANT, [message], NOW, sent_at)
    assert parsed.rejected == [], parsed.rejected
    [accepted] = parsed.messages
    return accepted.payload


def rejected(message: dict[str, Any], sent_at: datetime | None = None) -> tuple[str, str]:
    parsed = parse_batch(TENANT, [message], NOW, sent_at)
    assert parsed.messages == []
    [refusal] = parsed.rejected
    return refusal.field, refusal.reason


def test_screen_group_and_alias_are_accepted_with_what_makes_them() -> None:
    screen = one({"type": "screen", "messageId": "s", "userId": "u", "name": "Home", "properties": {"tab": 1}})
    assert (screen["name"], screen["properties"]) == ("Home", {"tab": 1})
    group = one({"type": "group", "messageId": "g", "userId": "u", "groupId": 42, "traits": {"plan": "team"}})
    assert (group["groupId"], group["traits"]) == ("42", {"plan": "team"})
    alias = one({"type": "alias", "messageId": "a", "userId": "u", "previousId": "anon-1"})
    assert alias["previousId"] == "anon-1"
    assert rejected({"type": "group", "messageId": "g", "userId": "u"}) == ("groupId", "group needs a groupId")
    assert rejected({"type": "alias", "messageId": "a", "userId": "u"}) == ("previousId", "alias needs a previousId")
    assert rejected({"type": "screen", "messageId": "s", "userId": "u", "name": 5})[0] == "name"
    assert rejected({"type": "alias", "messageId": "a", "userId": "u", "previousId": "bad id"})[0] == "previousId"
    assert rejected({"type": "ping", "messageId": "p", "userId": "u"})[0] == "type"


def test_identify_reads_traits_from_the_top_level_and_the_context_the_top_level_winning() -> None:
    payload = one(
        {
            "type": "identify",
            "messageId": "i",
            "userId": "u",
            "traits": {"plan": "pro"},
            "context": {"traits": {"plan": "free", "persona": "analyst"}, "locale": "fr-FR"},
        }
    )
    assert payload["traits"] == {"plan": "pro", "persona": "analyst"}
    assert payload["context"] == {"locale": "fr-FR"}  # kept once, in traits
    only_context = one({"type": "identify", "messageId": "j", "userId": "u", "context": {"traits": {"a": 1}}})
    assert only_context["traits"] == {"a": 1}
    # a track's context.traits are the user's at the time: left where they are
    track = one({"type": "track", "messageId": "t", "userId": "u", "event": "E", "context": {"traits": {"a": 1}}})
    assert track["context"] == {"traits": {"a": 1}}
    bad = {"type": "identify", "messageId": "k", "userId": "u", "context": {"traits": ["a"]}}
    assert rejected(bad)[0] == "context.traits"


def test_the_clock_skew_is_corrected_from_sent_at_as_segment_does() -> None:
    behind = timedelta(hours=-3)
    happened = NOW + behind - timedelta(minutes=10)  # on the client's clock
    message = {"type": "track", "messageId": "m", "userId": "u", "event": "E", "timestamp": happened.isoformat()}
    # receivedAt - (sentAt - originalTimestamp), with the batch's sentAt
    payload = one(message, sent_at=NOW + behind)
    assert payload["timestamp"] == (NOW - timedelta(minutes=10)).isoformat()
    assert payload["originalTimestamp"] == happened.isoformat()
    assert payload["sentAt"] == (NOW + behind).isoformat()
    # the message's own sentAt wins over the batch's; RudderStack's originalTimestamp is the client's time
    rudder = {
        "type": "track",
        "messageId": "r",
        "userId": "u",
        "event": "E",
        "originalTimestamp": "2030-01-01T00:00:00Z",
        "sentAt": "2030-01-01T00:00:05Z",
    }
    assert one(rudder, sent_at=NOW + behind)["timestamp"] == (NOW - timedelta(seconds=5)).isoformat()
    # a timestamp the caller set (a historical import) is moved by the skew only
    both = rudder | {"timestamp": "2029-12-01T00:00:00Z"}
    assert one(both)["timestamp"] == (NOW - timedelta(days=31, seconds=5)).isoformat()
    # without sentAt the client's time stands, and the future is refused as before
    assert one(message)["timestamp"] == happened.isoformat()
    assert "originalTimestamp" not in one(message)
    ahead = message | {"timestamp": (NOW + timedelta(hours=2)).isoformat()}
    assert rejected(ahead) == ("timestamp", "timestamp is more than 5 minutes in the future")
    # two hours ahead, said so by sentAt: corrected, accepted
    assert one(ahead, sent_at=NOW + timedelta(hours=2))["timestamp"] == NOW.isoformat()
    after_sent = message | {"timestamp": (NOW + timedelta(hours=1)).isoformat()}
    assert rejected(after_sent, sent_at=NOW)[0] == "timestamp"
    assert rejected(message | {"sentAt": "2026-11-26T12:00:00"}) == ("sentAt", "sentAt needs a time zone")
    assert rejected(message | {"sentAt": 17})[0] == "sentAt"
    no_time = one({"type": "track", "messageId": "n", "userId": "u", "event": "E"}, sent_at=NOW)
    assert no_time["timestamp"] == NOW.isoformat() and "sentAt" not in no_time


def test_a_gzip_body_is_inflated_only_up_to_the_limit() -> None:
    assert inflate(gzip.compress(b"x" * 1000), 1000, "the batch") == b"x" * 1000
    with pytest.raises(ProblemError) as over:
        inflate(gzip.compress(b"x" * 1001), 1000, "the batch")
    assert (over.value.status, over.value.slug, over.value.extensions["limit"]) == (413, "payload-too-large", 1000)
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join([deflater.compress(bytes(1 << 20)) for _ in range(64)] + [deflater.flush()])
    with pytest.raises(ProblemError) as exploded:  # 64 MiB of zeros: refused after 1 KB of output
        inflate(bomb, 1024, "the batch")
    assert exploded.value.status == 413
    whole = gzip.compress(b'{"batch": []}')
    for broken, reason in ((whole[:-8], "truncated"), (whole + b"junk", "after"), (b"not gzip", "cannot")):
        with pytest.raises(ProblemError) as malformed:
            inflate(broken, 1000, "the batch")
        assert (malformed.value.status, malformed.value.slug) == (400, "malformed-body")
        assert reason in malformed.value.detail


def test_the_documented_batch_limit_is_the_enforced_one() -> None:
    """One number: the setting's default (which the handler enforces), events.md's and configuration.md's."""
    from firstmile.settings import EventsSettings

    assert EventsSettings().ingest_max_batch_bytes == DEFAULT_MAX_BATCH_BYTES == 5 * 1024 * 1024
    events = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    configuration = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert f"default **5 MiB ({DEFAULT_MAX_BATCH_BYTES:,} bytes)**" in events
    row = next(line for line in configuration.splitlines() if line.startswith("| `FIRSTMILE_INGEST_MAX_BATCH_BYTES`"))
    assert f"| `{DEFAULT_MAX_BATCH_BYTES}` (5 MiB) |" in row
