"""Ports of the event path: what the relay publishes to and what consumers implement.

The relay hands :class:`Record` batches to a :class:`Publisher` (Kafka, or the
in-process dispatcher in embedded mode) and deletes a row from the outbox only
once the publisher acknowledged it. With Kafka, ingestion can skip the outbox and
hand its events to a :class:`DirectPublisher` (acknowledged before the API answers).
Consumers implement :class:`Consumer`: they are idempotent by event id, so
at-least-once delivery never double-counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from firstmile.events.envelope import Envelope


def topic_for(prefix: str, region: str) -> str:
    """The region's event topic, e.g. ``firstmile.eu-west-1.events``."""
    return f"{prefix}.{region}.events"


def dead_letter_topic_for(prefix: str, region: str) -> str:
    return f"{prefix}.{region}.events.dlq"


@dataclass(frozen=True, slots=True)
class Record:
    """One outbox row, ready for the wire."""

    outbox_id: int
    event_id: uuid.UUID
    tenant_id: uuid.UUID
    event_type: str
    key: str
    value: bytes


class Publisher(Protocol):
    async def publish(self, records: Sequence[Record]) -> int:
        """Deliver ``records`` in order; return how many, from the first, were acknowledged."""
        ...

    async def close(self) -> None: ...


class DeliveryError(RuntimeError):
    """The bus did not acknowledge every record of a direct delivery (some may still arrive: at least once)."""


class DirectPublisher(Protocol):
    """Direct ingestion's port: the API hands accepted events to the bus itself, without the outbox."""

    async def deliver(self, records: Sequence[Record]) -> None:
        """Return once every record is acknowledged (Kafka: ``acks=all``); :class:`DeliveryError` otherwise."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a consumer cannot process, and why."""

    envelope: Envelope | None
    raw: bytes
    reason: str


class UnprocessableEventError(ValueError):
    """The event can never be processed (it goes to the dead-letter topic with this reason)."""


def parse_timestamp(value: Any, field: str) -> datetime:
    """An ISO-8601 time with a zone from an event payload, in UTC; :class:`UnprocessableEventError` otherwise."""
    if not isinstance(value, str):
        raise UnprocessableEventError(f"{field} is missing or not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UnprocessableEventError(f"{field} {value[:40]!r} is not ISO-8601") from None
    if parsed.tzinfo is None:
        raise UnprocessableEventError(f"{field} has no time zone")
    return parsed.astimezone(UTC)


class Consumer(Protocol):
    """Handles batches of events, in order, idempotently by event id.

    Returns the events it cannot process (they go to the dead-letter topic with
    the reason); raises for a transient failure (the batch is retried and its
    offsets are not committed).
    """

    name: str

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]: ...


async def wait_for_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
