"""Drop-off alerts: the alerts the analytics agent's scheduled check raises, and a tenant finder for it.

``analytics_alerts``: one row per alert (a path version's step whose drop-off shifted against its baseline),
unique per path version, step and recent window, with each delivery target's outcome and the analyst's
acknowledgement (docs/alerts.md). Tenant-owned with forced row-level security, like every table.

The check runs as the application role, which sees one tenant at a time; it finds the tenants to check through
the SECURITY DEFINER function ``firstmile_dropoff_alert_tenants``, owned by ``firstmile_progress_scheduler``
(migration 0007), which may read only the ``id`` and ``manifest`` columns of ``tenants`` (granted in 0016): every
tenant whose manifest does not turn the check off (``alerts.enabled: false``).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLE = "analytics_alerts"


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
        sa.Column("path_key", sa.Text(), nullable=False),
        sa.Column("path_version", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Text(), nullable=False),
        sa.Column("step_title", sa.Text(), nullable=False),
        sa.Column("direction", sa.Text(), nullable=False),
        sa.Column("baseline_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("baseline_users", sa.Integer(), nullable=False),
        sa.Column("baseline_dropped", sa.Integer(), nullable=False),
        sa.Column("recent_users", sa.Integer(), nullable=False),
        sa.Column("recent_dropped", sa.Integer(), nullable=False),
        sa.Column("z", sa.Float(), nullable=False),
        sa.Column("p_value", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("delivery", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{TABLE}_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f(f"pk_{TABLE}")),
        sa.UniqueConstraint(
            "tenant_id",
            "path_key",
            "path_version",
            "step_id",
            "window_end",
            name=op.f(f"uq_{TABLE}_once"),
        ),
    )
    op.create_index(
        "ix_analytics_alerts_tenant_id_open",
        TABLE,
        ["tenant_id", "created_at"],
        postgresql_where=sa.text("acknowledged_at IS NULL"),
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
        CREATE FUNCTION firstmile_dropoff_alert_tenants()
        RETURNS TABLE (tenant_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT t.id FROM public.tenants t
          WHERE coalesce(t.manifest -> 'alerts' ->> 'enabled', 'true') <> 'false'
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_dropoff_alert_tenants() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_dropoff_alert_tenants() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_dropoff_alert_tenants() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_dropoff_alert_tenants()")
    op.drop_index(
        "ix_analytics_alerts_tenant_id_open", table_name=TABLE, postgresql_where=sa.text("acknowledged_at IS NULL")
    )
    op.drop_table(TABLE)
