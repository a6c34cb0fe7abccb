"""The event envelope: one outbox row as it travels on Kafka and through the consumers.

Wire format (Kafka value, JSON): ``{"event_id", "tenant_id", "event_type",
"occurred_at", "payload"}``; the Kafka key is the outbox ``partition_key``
(``<tenant_id>:<user_id>``), so each user's events stay in one partition, in
order. Headers repeat ``event_type`` and ``tenant_id`` for routing without a parse.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec


class Envelope(msgspec.Struct, frozen=True):
    event_id: uuid.UUID
    tenant_id: uuid.UUID
    event_type: str
    occurred_at: datetime
    payload: dict[str, Any]
    partition_key: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(raw: bytes) -> Envelope:
    """Parse a Kafka value; raises :class:`msgspec.DecodeError` or ``ValidationError`` when it is not an envelope."""
    return _decoder.decode(raw)


def user_of(envelope: Envelope) -> str:
    """The user an event is about: onboarding ``user_id`` or Segment ``userId``/``anonymousId``."""
    p = envelope.payload
    return str(p.get("user_id") or p.get("userId") or p.get("anonymousId") or "")
