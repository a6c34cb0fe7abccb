"""The transactional outbox: domain events written in the same transaction as the change they announce.

The outbox is the platform's messaging infrastructure, shared by every slice that emits
events (onboarding, ingestion, privacy, the stuck scan), so it lives here rather than in a
slice: a slice writes its events with :func:`enqueue` (or, on a hot path that must stay one
round trip, composes :data:`INSERT_FROM_EVENTS` into its own data-modifying CTE). The events
slice's relay publishes the rows to Kafka (or to the in-process consumers) and deletes them;
consumers are idempotent by ``event_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import TenantTx, metadata

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("event_type", Text, nullable=False),
    Column("partition_key", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True), nullable=True),
    # when the row was written (occurred_at is the event's own time): the relay's freshness gauge
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("tenant_id", "event_id"),
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    Index("ix_outbox_tenant_id_occurred_at", "tenant_id", "occurred_at"),
)

USER_ERASED = "user.erased"
"""The event type an erasure emits; every store downstream (analytics, features) forgets the user."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One domain event on its way to the outbox."""

    event_type: str
    payload: Mapping[str, Any]
    event_id: uuid.UUID

    @classmethod
    def new(cls, event_type: str, payload: Mapping[str, Any]) -> OutboxEvent:
        return cls(event_type=event_type, payload=payload, event_id=uuid.uuid4())

    def as_json(self) -> dict[str, Any]:
        return {"event_id": str(self.event_id), "event_type": self.event_type, "payload": dict(self.payload)}


PROGRESS_NOTIFY_CHANNEL = "firstmile_progress"
"""The relay announces on it, after each published batch, the partition keys (``tenant:user``) of the batch's
events whose type starts with :data:`PROGRESS_EVENT_PREFIX`: a JSON list of keys per notification. Live views
(the embed SDK's checklist) listen and re-read those users' state, off the request path."""
PROGRESS_EVENT_PREFIX = "onboarding."


def partition_key(tenant_id: uuid.UUID, user_id: str) -> str:
    """The Kafka key of a user's events: one tenant's user stays on one partition, in order."""
    return f"{tenant_id}:{user_id}"


INSERT_FROM_EVENTS = (
    "INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at) "
    "SELECT e.event_id, :tid, e.event_type, :pkey, e.payload, :now "
    "FROM jsonb_to_recordset(:events) AS e(event_id uuid, event_type text, payload jsonb)"
)
"""An INSERT for a slice's own data-modifying CTE, so a state change and its events stay one round trip.

It binds ``:tid`` (the tenant), ``:pkey`` (:func:`partition_key`), ``:now`` and ``:events``
(a JSONB array of :meth:`OutboxEvent.as_json`; bind it with ``type_=JSONB``).
"""

_ENQUEUE = text(INSERT_FROM_EVENTS).bindparams(bindparam("events", type_=JSONB))


async def enqueue(tx: TenantTx, events: Sequence[OutboxEvent], *, user_id: str, now: datetime) -> None:
    """Write ``events`` about one user to the outbox in ``tx`` (they leave only if it commits)."""
    if not events:
        return
    await tx.execute(
        _ENQUEUE,
        {
            "tid": tx.tenant,
            "pkey": partition_key(tx.tenant, user_id),
            "now": now,
            "events": [e.as_json() for e in events],
        },
    )


__all__ = [
    "INSERT_FROM_EVENTS",
    "PROGRESS_EVENT_PREFIX",
    "PROGRESS_NOTIFY_CHANNEL",
    "USER_ERASED",
    "OutboxEvent",
    "enqueue",
    "outbox",
    "partition_key",
]
