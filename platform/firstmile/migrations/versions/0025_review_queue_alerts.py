"""The review queue's notifications: one row per crossing of a tenant's queue past its threshold.

``review_queue_alerts``: the scheduler's review-queue check (docs/review.md) stores a row when a tenant's pending
reviews pass ``FIRSTMILE_REVIEW_QUEUE_ALERT_THRESHOLD`` and notifies the tenant's ``alerts:`` targets from it (each
target's outcome in ``delivery``, as ``analytics_alerts`` does); it clears the row (``cleared_at``) when the queue
drops back, which re-arms the notification. At most one open row per tenant (``uq_review_queue_alerts_open``), so a
restarted or second scheduler does not notify twice for one crossing. Tenant-owned with forced row-level security.

The check finds the tenants with an open crossing (those whose queue may have emptied since) through the SECURITY
DEFINER function ``firstmile_review_queue_alerted``, owned by ``firstmile_progress_scheduler``, which may read only
the ``tenant_id`` and ``cleared_at`` columns.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLE = "review_queue_alerts"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        TABLE,
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("by_kind", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("oldest_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("crossed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivery", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{TABLE}_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f(f"pk_{TABLE}")),
    )
    op.create_index(
        "uq_review_queue_alerts_open",
        TABLE,
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("cleared_at IS NULL"),
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {app}")
    op.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {TABLE} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {TABLE} "
        f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
    )
    op.execute(f"CREATE POLICY platform_admin ON {TABLE} TO {ADMIN} USING (true) WITH CHECK (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_review_queue_alerted()
        RETURNS TABLE (tenant_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT a.tenant_id FROM public.review_queue_alerts a WHERE a.cleared_at IS NULL
        $$
        """
    )
    op.execute(f"GRANT SELECT (tenant_id, cleared_at) ON {TABLE} TO {SCHEDULER}")
    op.execute(f"CREATE POLICY review_alerts_scheduler ON {TABLE} FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_review_queue_alerted() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_review_queue_alerted() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_review_queue_alerted() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_review_queue_alerted()")
    op.drop_index("uq_review_queue_alerts_open", table_name=TABLE, postgresql_where=sa.text("cleared_at IS NULL"))
    op.drop_table(TABLE)
