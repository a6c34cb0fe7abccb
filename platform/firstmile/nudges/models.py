"""Tables of the nudges slice (migrations ``0013`` to ``0018``). ``tenant_id`` leads every key and index."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
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

nudge_sends = Table(
    "nudge_sends",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("send_id", UUID(as_uuid=True), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("trigger_key", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("arm", Text, nullable=False),
    Column("segment", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("send_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("subject", Text, nullable=True),
    Column("body", Text, nullable=False),
    Column("html", Text, nullable=True),
    Column("decision", JSONB, nullable=False),
    Column("provider", Text, nullable=True),
    Column("provider_message_id", Text, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("clicked_at", DateTime(timezone=True), nullable=True),
    Column("converted_at", DateTime(timezone=True), nullable=True),
    Column("rewarded_at", DateTime(timezone=True), nullable=True),
    Column("delivery_status", Text, nullable=True),
    Column("delivery_at", DateTime(timezone=True), nullable=True),
    Column("seen_at", DateTime(timezone=True), nullable=True),
    Column("dismissed_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("tenant_id", "send_id"),
    UniqueConstraint("tenant_id", "user_id", "trigger_key"),
    Index(
        "ix_nudge_sends_tenant_id_due",
        "tenant_id",
        "send_at",
        postgresql_where=text("status IN ('scheduled', 'sending')"),
    ),
    Index("ix_nudge_sends_tenant_id_user_id_sent_at", "tenant_id", "user_id", "sent_at"),
    Index(
        "ix_nudge_sends_tenant_id_unrewarded",
        "tenant_id",
        "sent_at",
        postgresql_where=text("status = 'sent' AND rewarded_at IS NULL"),
    ),
)
"""One nudge: the decision (arm, policy verdict) and its send. ``trigger_key`` (``stuck:<step>``) is unique
per user, so a trigger fires once. ``status``: scheduled, sending (claimed until ``claimed_until``), sent,
retrying (back to scheduled with a later ``send_at``), dead (gave up), rejected. The body holds no
personal data: the address is read (and decrypted) at send time. An in-app nudge's row is the stored
message itself: ``seen_at`` and ``dismissed_at`` (migration ``0015``) are what the app reported;
``delivery_status`` and ``delivery_at`` (``0017``) what the provider's webhook last reported."""

nudge_arm_stats = Table(
    "nudge_arm_stats",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("segment", Text, nullable=False),
    Column("arm", Text, nullable=False),
    Column("successes", Integer, nullable=False, server_default=text("0")),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("tenant_id", "segment", "arm"),
)
"""The bandit's counts per (segment, arm)."""

nudge_consents = Table(
    "nudge_consents",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "user_id", "channel", "category"),
)
"""A user's consent per channel and category (granted, or withdrawn by an unsubscribe); audited on change."""

nudge_suppressions = Table(
    "nudge_suppressions",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "user_id", "channel"),
)
"""A user's address on a channel that bounced hard or complained: never sent to again."""

nudge_push_subscriptions = Table(
    "nudge_push_subscriptions",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("endpoint_hash", Text, nullable=False),
    Column("sealed", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "user_id", "endpoint_hash"),
)
"""A user's browser push subscriptions (migration ``0018``): sealed under the user's key, keyed by the endpoint's
SHA-256; the newest is where a push nudge goes."""
