"""Human in the loop: the review queue and manual path overrides (docs/review.md).

``onboarding_reviews``: one row per item a person decides: a completion of a ``validation: review`` step, a
completion the progress evaluator could not decide (its ``reason``), or a sampled low-confidence path decision.
A completion has at most one pending review per user and step (``uq_onboarding_reviews_pending``). The row
goes with its user (foreign key to ``end_users``, cascading), so an erasure removes it.

``onboarding_overrides``: a person's choice of path, for one user (applied at once) or for a segment of users
(predicates over traits, applied to the users who start while it is in force, until ``expires_at``).

Both tenant-owned with forced row-level security. The review queue's scheduled check (queue length, the age of
the oldest item, the notification to reviewers) finds the tenants with pending items through the SECURITY
DEFINER function ``firstmile_review_queues``, owned by ``firstmile_progress_scheduler``.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
REVIEWS = "onboarding_reviews"
OVERRIDES = "onboarding_overrides"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def _tenant_owned(table: str, app: str) -> None:
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {app}")
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {table} "
        f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
    )
    op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        REVIEWS,
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("path_key", sa.Text(), nullable=False),
        sa.Column("path_version", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("better_path", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.Text(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('step', 'ambiguous', 'decision')", name=op.f(f"ck_{REVIEWS}_kind")),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'rejected', 'right', 'wrong')", name=op.f(f"ck_{REVIEWS}_status")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["end_users.tenant_id", "end_users.user_id"],
            name=op.f(f"fk_{REVIEWS}_tenant_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f(f"pk_{REVIEWS}")),
    )
    op.create_index(
        "uq_onboarding_reviews_pending",
        REVIEWS,
        ["tenant_id", "user_id", "step_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending' AND step_id IS NOT NULL"),
    )
    op.create_index(
        "ix_onboarding_reviews_tenant_id_pending",
        REVIEWS,
        ["tenant_id", "created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_onboarding_reviews_tenant_id_user_id", REVIEWS, ["tenant_id", "user_id"])
    _tenant_owned(REVIEWS, app)

    op.create_table(
        OVERRIDES,
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("segment", postgresql.JSONB(), nullable=True),
        sa.Column("path_key", sa.Text(), nullable=False),
        sa.Column("forced", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.Text(), nullable=True),
        sa.CheckConstraint("(user_id IS NULL) <> (segment IS NULL)", name=op.f(f"ck_{OVERRIDES}_one_target")),
        sa.CheckConstraint("NOT forced OR reason IS NOT NULL", name=op.f(f"ck_{OVERRIDES}_forced_reason")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{OVERRIDES}_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f(f"pk_{OVERRIDES}")),
    )
    op.create_index(
        "ix_onboarding_overrides_tenant_id_active",
        OVERRIDES,
        ["tenant_id", "created_at"],
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    _tenant_owned(OVERRIDES, app)

    op.execute(
        """
        CREATE FUNCTION firstmile_review_queues()
        RETURNS TABLE (tenant_id uuid, kind text, pending bigint, oldest timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT r.tenant_id, r.kind, count(*), min(r.created_at)
          FROM public.onboarding_reviews r
          WHERE r.status = 'pending'
          GROUP BY r.tenant_id, r.kind
        $$
        """
    )
    op.execute(f"GRANT SELECT (tenant_id, kind, status, created_at) ON {REVIEWS} TO {SCHEDULER}")
    op.execute(f"CREATE POLICY reviews_scheduler ON {REVIEWS} FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_review_queues() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_review_queues() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_review_queues() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_review_queues()")
    op.drop_table(OVERRIDES)
    op.drop_table(REVIEWS)
