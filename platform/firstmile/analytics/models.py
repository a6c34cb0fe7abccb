"""Tables of the analytics slice in PostgreSQL (migrations ``0022`` and ``0025``); the events themselves are in the
analytics store. ``tenant_id`` leads every key and index."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Float,
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

analytics_alerts = Table(
    "analytics_alerts",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("id", UUID(as_uuid=True), nullable=False),
    Column("path_key", Text, nullable=False),
    Column("path_version", Integer, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("step_title", Text, nullable=False),
    Column("direction", Text, nullable=False),
    Column("baseline_start", DateTime(timezone=True), nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("baseline_users", Integer, nullable=False),
    Column("baseline_dropped", Integer, nullable=False),
    Column("recent_users", Integer, nullable=False),
    Column("recent_dropped", Integer, nullable=False),
    Column("z", Float, nullable=False),
    Column("p_value", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivery", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("acknowledged_at", DateTime(timezone=True), nullable=True),
    Column("acknowledged_by", Text, nullable=True),
    PrimaryKeyConstraint("tenant_id", "id"),
    UniqueConstraint("tenant_id", "path_key", "path_version", "step_id", "window_end", name="uq_analytics_alerts_once"),
    Index(
        "ix_analytics_alerts_tenant_id_open",
        "tenant_id",
        "created_at",
        postgresql_where=text("acknowledged_at IS NULL"),
    ),
)
"""One drop-off alert (docs/alerts.md): the step, both windows' counts, the test's z and p. Unique per path version,
step and recent window (``window_end``): a check run twice in one window, or by two schedulers, raises it once.
``delivery`` holds each target's outcome (``{"email:ops@acme.example": {"status": "delivered", "attempts": 1, …}}``);
``delivered_at`` is set once every target has it (NULL: the next check retries). Acknowledged by an analyst in
the admin UI (``acknowledged_at``, ``acknowledged_by``)."""

review_queue_alerts = Table(
    "review_queue_alerts",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("id", UUID(as_uuid=True), nullable=False),
    Column("pending", Integer, nullable=False),
    Column("threshold", Integer, nullable=False),
    Column("by_kind", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("oldest_at", DateTime(timezone=True), nullable=True),
    Column("crossed_at", DateTime(timezone=True), nullable=False),
    Column("delivery", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("cleared_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("tenant_id", "id"),
    Index("uq_review_queue_alerts_open", "tenant_id", unique=True, postgresql_where=text("cleared_at IS NULL")),
)
"""One crossing of a tenant's review queue past ``FIRSTMILE_REVIEW_QUEUE_ALERT_THRESHOLD`` (docs/review.md): the
pending reviews when it crossed (``pending``, per kind in ``by_kind``), the notification's ``delivery`` record as in
``analytics_alerts``. At most one is open (``cleared_at`` NULL) per tenant: while it is, the reviewers are not
notified again; the check clears it when the queue drops back to the threshold, which re-arms the notification."""
