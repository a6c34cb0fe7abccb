"""Segment-spec messages (``track``, ``identify``, ``page``, ``screen``, ``group``, ``alias``): parsing and validation.

A batch is validated message by message: a bad message is rejected with the
field and the reason, the rest are accepted (Segment's own semantics). A message
is at most 32 KB (Segment's limit); the batch's limit is the ingestion setting
``FIRSTMILE_INGEST_MAX_BATCH_BYTES``, checked on the body before it is parsed
(:mod:`firstmile.events.api`).

Two things are normalised here, as Segment and RudderStack do:

- **Clock skew.** With a ``sentAt`` (the message's, else the batch's), the client's
  clock is corrected: ``timestamp = receivedAt - (sentAt - originalTimestamp)``, where
  ``originalTimestamp`` is the time the client gave (``timestamp``, else
  ``originalTimestamp``). Without one, the client's time is taken as it is.
- **Traits.** ``identify`` reads its traits at the top level and in ``context.traits``
  (where RudderStack's libraries put them), merged with the top level winning.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from firstmile.kit.ids import USER_ID_MAX_LENGTH, USER_ID_PATTERN

MAX_MESSAGE_BYTES = 32 * 1024
DEFAULT_MAX_BATCH_BYTES = 5 * 1024 * 1024
"""The default of ``FIRSTMILE_INGEST_MAX_BATCH_BYTES``: RudderStack's Python library fills a batch until its
messages reach 4 MiB (and 100 messages), so a batch is up to 4 MiB, one message more and its envelope;
Segment's libraries send at most 500 KB, RudderStack's Node.js library 450 KB."""
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID = 128
MAX_EVENT_NAME = 200
MAX_CLOCK_SKEW = timedelta(minutes=5)
TYPES = ("track", "identify", "page", "screen", "group", "alias")
_USER_ID = re.compile(USER_ID_PATTERN)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    message_id: str | None
    field: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "messageId": self.message_id, "field": self.field, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Message:
    """A valid message, normalised: ids as strings, timestamp tz-aware UTC."""

    index: int
    type: str
    message_id: str
    event_id: uuid.UUID
    user_id: str | None
    anonymous_id: str | None
    event: str | None
    timestamp: datetime
    payload: dict[str, Any]

    @property
    def subject(self) -> str:
        return self.user_id or self.anonymous_id or ""


class _InvalidError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


_UUID5_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID5_SET = (0x5000 << 64) | (0x8000 << 48)  # version 5, RFC 4122 variant


def _uuid5(namespace: bytes, name: str) -> uuid.UUID:
    """``uuid.uuid5`` for a namespace given as its 16 bytes: the same id at half the cost, which counts on
    ingestion's path (once per message)."""
    digest = int.from_bytes(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    return uuid.UUID(int=(digest & _UUID5_CLEAR) | _UUID5_SET)


def event_id_for(tenant_id: uuid.UUID, message_id: str) -> uuid.UUID:
    """The event id of a Segment message: stable per tenant and messageId, so redelivery dedupes everywhere.

    ``uuid5(tenant_id, messageId)``, RFC 4122's name-based SHA-1 UUID with the tenant as namespace.
    """
    return _uuid5(tenant_id.bytes, message_id)


def _id(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _InvalidError(key, f"{key} must be a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > USER_ID_MAX_LENGTH or not _USER_ID.fullmatch(text):
        raise _InvalidError(key, f"{key} must be 1-{USER_ID_MAX_LENGTH} characters of letters, digits and ._:@+-")
    return text


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _InvalidError(key, f"{key} must be an object, got {type(value).__name__}")
    return value


def parse_time(value: Any, field: str) -> datetime:
    """An ISO-8601 time with a zone, in UTC; :class:`ValueError` saying what is wrong with it."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{field} {value[:40]!r} is not ISO-8601") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{field} needs a time zone")
    return parsed.astimezone(UTC)


def _time(raw: dict[str, Any], field: str) -> datetime | None:
    value = raw.get(field)
    if value is None:
        return None
    try:
        return parse_time(value, field)
    except ValueError as bad:
        raise _InvalidError(field, str(bad)) from None


def _timestamp(
    raw: dict[str, Any], now: datetime, batch_sent_at: datetime | None
) -> tuple[datetime, datetime | None, datetime | None]:
    """``(timestamp, originalTimestamp, sentAt)``: the client's time corrected for its clock's skew when it said
    when it sent the message (Segment's rule), else the client's time, else the receive time."""
    original = _time(raw, "timestamp")
    if original is None:
        original = _time(raw, "originalTimestamp")
    sent_at = _time(raw, "sentAt") or batch_sent_at
    if original is None:
        return now, None, sent_at
    timestamp = original if sent_at is None else now - (sent_at - original)
    if timestamp > now + MAX_CLOCK_SKEW:
        raise _InvalidError(
            "timestamp",
            "timestamp is more than 5 minutes in the future"
            if sent_at is None
            else "timestamp is more than 5 minutes after the message's sentAt",
        )
    return timestamp, original, sent_at


def _name(raw: dict[str, Any]) -> str | None:
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise _InvalidError("name", f"name must be a string, got {type(name).__name__}")
    return name


def _identify_traits(raw: dict[str, Any], context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An identify's traits from the top level and ``context.traits`` (RudderStack's libraries put them there; the
    top level wins), and the context without them (they are kept once, in ``traits``)."""
    traits = _object(raw, "traits")
    nested = context.get("traits")
    if nested is None:
        return traits, context
    if not isinstance(nested, dict):
        raise _InvalidError("context.traits", f"context.traits must be an object, got {type(nested).__name__}")
    return nested | traits, {k: v for k, v in context.items() if k != "traits"}


def _message(
    namespace: bytes, index: int, raw: Any, now: datetime, received: str, batch_sent_at: datetime | None
) -> Message:
    if not isinstance(raw, dict):
        raise _InvalidError("", f"a message must be an object, got {type(raw).__name__}")
    size = len(_encoder.encode(raw))
    if size > MAX_MESSAGE_BYTES:
        raise _InvalidError("", f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES} (32 KB)")
    kind = raw.get("type")
    if kind not in TYPES:
        raise _InvalidError("type", f"type must be one of {', '.join(TYPES)}, got {kind!r}")
    message_id = raw.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise _InvalidError("messageId", "messageId is required: a non-empty string")
    if len(message_id) > MAX_MESSAGE_ID:
        raise _InvalidError("messageId", f"messageId is longer than {MAX_MESSAGE_ID} characters")
    user_id = _id(raw, "userId")
    anonymous_id = _id(raw, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise _InvalidError("userId", "userId or anonymousId is required")
    event: str | None = None
    if kind == "track":
        event = raw.get("event")
        if not isinstance(event, str) or not event.strip():
            raise _InvalidError("event", "track needs an event name: a non-empty string")
        if len(event) > MAX_EVENT_NAME:
            raise _InvalidError("event", f"event name is longer than {MAX_EVENT_NAME} characters")
    context = _object(raw, "context")
    timestamp, original, sent_at = _timestamp(raw, now, batch_sent_at)
    payload: dict[str, Any] = {
        "type": kind,
        "messageId": message_id,
        "userId": user_id,
        "anonymousId": anonymous_id,
        "timestamp": timestamp.isoformat(),
        "receivedAt": received,
        "context": context,
    }
    if sent_at is not None and original is not None:  # what the client said, beside the corrected time
        payload |= {"originalTimestamp": original.isoformat(), "sentAt": sent_at.isoformat()}
    if kind == "track":
        payload |= {"event": event, "properties": _object(raw, "properties")}
    elif kind in ("page", "screen"):
        name = _name(raw)
        event = name or ""
        payload |= {"name": name, "properties": _object(raw, "properties")}
    elif kind == "identify":
        traits, payload["context"] = _identify_traits(raw, context)
        payload["traits"] = traits
    elif kind == "group":
        group_id = _id(raw, "groupId")
        if group_id is None:
            raise _InvalidError("groupId", "group needs a groupId")
        payload |= {"groupId": group_id, "traits": _object(raw, "traits")}
    else:  # alias: previousId is now userId
        previous_id = _id(raw, "previousId")
        if previous_id is None:
            raise _InvalidError("previousId", "alias needs a previousId")
        payload["previousId"] = previous_id
    return Message(
        index=index,
        type=kind,
        message_id=message_id,
        event_id=_uuid5(namespace, message_id),
        user_id=user_id,
        anonymous_id=anonymous_id,
        event=event,
        timestamp=timestamp,
        payload=payload,
    )


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    messages: list[Message]
    rejected: list[Rejection]
    duplicates_in_batch: int


def parse_batch(
    tenant_id: uuid.UUID, messages: list[Any], now: datetime, sent_at: datetime | None = None
) -> ParsedBatch:
    """Validate each message; the same messageId twice in a batch is kept once.

    ``sent_at``: the batch's ``sentAt`` (the client's clock when it sent the batch), for the messages without
    their own.
    """
    accepted: list[Message] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    duplicates = 0
    namespace, received = tenant_id.bytes, now.isoformat()  # once per batch
    for index, raw in enumerate(messages):
        try:
            message = _message(namespace, index, raw, now, received, sent_at)
        except _InvalidError as bad:
            mid = raw.get("messageId") if isinstance(raw, dict) else None
            rejected.append(Rejection(index, mid if isinstance(mid, str) else None, bad.field, bad.reason))
            continue
        if message.message_id in seen:
            duplicates += 1
            continue
        seen.add(message.message_id)
        accepted.append(message)
    return ParsedBatch(accepted, rejected, duplicates)
