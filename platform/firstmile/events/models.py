"""Tables of event ingestion: Segment messageId receipts and inbound webhook secrets.

The outbox itself is platform infrastructure: :mod:`firstmile.kit.outbox`.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import UUID

from firstmile.kit.db import metadata

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
