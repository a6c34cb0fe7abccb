"""Tables of the experiments slice (migrations ``0019`` and ``0020``). ``tenant_id`` leads every key and index."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

experiments = Table(
    "experiments",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("id", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'draft'")),
    Column("approved_by", Text, nullable=True),
    Column("started_by", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("planned_end_at", DateTime(timezone=True), nullable=True),
    Column("extensions", Integer, nullable=False, server_default=text("0")),
    Column("stopped_at", DateTime(timezone=True), nullable=True),
    Column("concluded_at", DateTime(timezone=True), nullable=True),
    Column("verdict", JSONB, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("status IN ('draft', 'approved', 'running', 'stopped', 'concluded')", name="status"),
    PrimaryKeyConstraint("tenant_id", "id"),
)
"""Each experiment of the manifest with its lifecycle and verdict."""

experiment_exposures = Table(
    "experiment_exposures",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("experiment_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("variant", Text, nullable=False),
    Column("exposed_at", DateTime(timezone=True), nullable=False),
    Column("inputs", JSONB, nullable=False),
    PrimaryKeyConstraint("tenant_id", "experiment_id", "user_id"),
    Index("ix_experiment_exposures_user", "tenant_id", "user_id"),
)
"""A user's one exposure to an experiment: the variant and the hash inputs that gave it."""

experiment_looks = Table(
    "experiment_looks",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("experiment_id", Text, nullable=False),
    Column("day", Integer, nullable=False),
    Column("looked_at", DateTime(timezone=True), nullable=False),
    Column("look", JSONB, nullable=False),
    PrimaryKeyConstraint("tenant_id", "experiment_id", "day"),
)
"""The scheduled review's look at an experiment, one per day: the result page's history."""
