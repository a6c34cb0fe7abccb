"""Tables of the destinations slice (migration ``0023``). ``tenant_id`` leads every key and index."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

destination_queue = Table(
    "destination_queue",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("destination", Text, nullable=False),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("sealed", Text, nullable=True),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("claim_id", UUID(as_uuid=True), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("outcome", JSONB, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("tenant_id", "id"),
    UniqueConstraint("tenant_id", "destination", "event_id", "kind", name="uq_destination_queue_once"),
    Index(
        "ix_destination_queue_pending",
        "tenant_id",
        "destination",
        "id",
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "ix_destination_queue_pending_user",
        "tenant_id",
        "destination",
        "user_id",
        "id",
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "ix_destination_queue_finished",
        "tenant_id",
        "finished_at",
        postgresql_where=text("status <> 'pending'"),
    ),
    Index("ix_destination_queue_tenant_id_user_id", "tenant_id", "user_id"),
)
"""What each destination of a tenant has to receive, oldest first (``id``): lifecycle events (``kind`` ``track`` or
``identify``) and erasures (``erase``). Unique per destination, event and kind, so a redelivered event is queued
once. ``payload`` holds the event's properties and the traits stored in clear; ``sealed`` the personal traits the
destination's allow-list names, encrypted under the user's key (an erasure makes them unreadable). ``status``:
``pending`` (due at ``next_attempt_at``; claimed by a worker while ``claimed_until`` is ahead, under ``claim_id``),
``done`` (``outcome``: an erasure's answer) or ``dead`` (``last_error`` says why; ``firstmile destinations replay``
makes it pending again). Finished rows are kept ``FIRSTMILE_DESTINATION_RETENTION_DAYS``."""

destination_credentials = Table(
    "destination_credentials",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("destination", Text, nullable=False),
    Column("sealed", Text, nullable=False),
    Column("previous", Text, nullable=True),
    Column("previous_until", DateTime(timezone=True), nullable=True),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_by", Text, nullable=False),
    PrimaryKeyConstraint("tenant_id", "destination"),
)
"""A destination's credentials (``{"write_key": …}``, ``{"secret": …}``), a JSON object encrypted under the tenant's
data key (``sealed``); during a webhook secret's rotation the one before (``previous``) until ``previous_until``."""

destination_state = Table(
    "destination_state",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("destination", Text, nullable=False),
    Column("disabled_at", DateTime(timezone=True), nullable=True),
    Column("disabled_reason", Text, nullable=True),
    Column("failing_since", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_error_at", DateTime(timezone=True), nullable=True),
    Column("last_success_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("tenant_id", "destination"),
)
"""How a destination fares: since when every attempt failed (``failing_since``), its last error and success, and
whether it was disabled (automatically after sustained failure, or by an operator; ``firstmile destinations
enable`` turns it back on)."""
