"""Tables of the onboarding slice. ``tenant_id`` leads every key and index."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

onboarding_paths = Table(
    "onboarding_paths",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("path_key", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("is_current", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "path_key", "version"),
    Index("ix_onboarding_paths_tenant_id_is_current", "tenant_id", "is_current"),
)

end_users = Table(
    "end_users",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("traits", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("pii", Text, nullable=True),  # fm1 ciphertext of the personal traits, under the user's key
    Column("email_index", LargeBinary, nullable=True),  # keyed blind index of the email
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "user_id"),
    Index(
        "ix_end_users_tenant_id_email_index",
        "tenant_id",
        "email_index",
        postgresql_where=text("email_index IS NOT NULL"),
    ),
)

user_progress = Table(
    "user_progress",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("path_key", Text, nullable=False),
    Column("path_version", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("current_step", Text, nullable=True),
    Column("decision", JSONB, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("activated_at", DateTime(timezone=True), nullable=True),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("stuck_step", Text, nullable=True),  # the step the user was last flagged stuck on
    Column("stuck_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("tenant_id", "user_id"),
    ForeignKeyConstraint(["tenant_id", "user_id"], ["end_users.tenant_id", "end_users.user_id"], ondelete="CASCADE"),
    ForeignKeyConstraint(
        ["tenant_id", "path_key", "path_version"],
        ["onboarding_paths.tenant_id", "onboarding_paths.path_key", "onboarding_paths.version"],
    ),
    Index("ix_user_progress_tenant_id_path_key_path_version", "tenant_id", "path_key", "path_version"),
    Index(
        "ix_user_progress_tenant_id_idle", "tenant_id", "updated_at", postgresql_where=text("status = 'in_progress'")
    ),
)

step_completions = Table(
    "step_completions",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("path_key", Text, nullable=False),
    Column("path_version", Integer, nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("source", Text, nullable=False),
    PrimaryKeyConstraint("tenant_id", "user_id", "step_id"),
    ForeignKeyConstraint(
        ["tenant_id", "user_id"], ["user_progress.tenant_id", "user_progress.user_id"], ondelete="CASCADE"
    ),
)

onboarding_reviews = Table(
    "onboarding_reviews",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("kind", Text, nullable=False),  # step | ambiguous | decision
    Column("reason", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("path_key", Text, nullable=False),
    Column("path_version", Integer, nullable=False),
    Column("step_id", Text, nullable=True),
    Column("source", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("better_path", Text, nullable=True),
    Column("note", Text, nullable=True),
    Column("decided_by", Text, nullable=True),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('step', 'ambiguous', 'decision')", name="kind"),
    CheckConstraint("status IN ('pending', 'approved', 'rejected', 'right', 'wrong')", name="status"),
    PrimaryKeyConstraint("tenant_id", "id"),
    ForeignKeyConstraint(
        ["tenant_id", "user_id"],
        ["end_users.tenant_id", "end_users.user_id"],
        name="fk_onboarding_reviews_tenant_id_end_users",
        ondelete="CASCADE",
    ),
    Index(
        "uq_onboarding_reviews_pending",
        "tenant_id",
        "user_id",
        "step_id",
        unique=True,
        postgresql_where=text("status = 'pending' AND step_id IS NOT NULL"),
    ),
    Index(
        "ix_onboarding_reviews_tenant_id_pending",
        "tenant_id",
        "created_at",
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_onboarding_reviews_tenant_id_user_id", "tenant_id", "user_id"),
)

onboarding_overrides = Table(
    "onboarding_overrides",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("user_id", Text, nullable=True),
    Column("segment", JSONB, nullable=True),
    Column("path_key", Text, nullable=False),
    Column("forced", Boolean, nullable=False, server_default=text("false")),
    Column("reason", Text, nullable=True),
    Column("created_by", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoked_by", Text, nullable=True),
    CheckConstraint("(user_id IS NULL) <> (segment IS NULL)", name="one_target"),
    CheckConstraint("NOT forced OR reason IS NOT NULL", name="forced_reason"),
    PrimaryKeyConstraint("tenant_id", "id"),
    Index(
        "ix_onboarding_overrides_tenant_id_active",
        "tenant_id",
        "created_at",
        postgresql_where=text("revoked_at IS NULL"),
    ),
)
