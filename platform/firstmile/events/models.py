"""The transactional outbox: domain events written in the state change's transaction."""

from __future__ import annotations

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
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

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
    UniqueConstraint("tenant_id", "event_id"),
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    Index("ix_outbox_tenant_id_occurred_at", "tenant_id", "occurred_at"),
)

event_receipts = Table(
    "event_receipts",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("message_id", Text, primary_key=True),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_event_receipts_received_at", "received_at"),
)
"""Ingested Segment ``messageId`` per tenant, kept for the dedupe window (``FIRSTMILE_EVENT_DEDUPE_DAYS``)."""

webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("source", Text, primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
"""Shared secrets that sign inbound webhooks (``source='segment'``), set by ``firstmile webhooks secret``."""
