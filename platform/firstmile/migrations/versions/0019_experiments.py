"""Experiments and their exposures (the experiments slice, docs/experiments.md).

``experiments``: one row per experiment the tenant's manifest declares, with its lifecycle (``draft`` →
``approved`` → ``running`` → ``stopped`` → ``concluded``), who approved and started it, its planned end and
extensions, and the verdict. ``definition`` is the manifest's entry as last applied; a manifest may change
it only while the experiment is a draft.

``experiment_exposures``: the first (and only) exposure of a user to an experiment, with the variant and the
hash inputs that gave it. The primary key makes the exposure happen once; it is written in the start's
transaction. No foreign key to ``experiments``: an experiment is never deleted while it has exposures, and
the start's insert stays one index probe.

Tenant-owned with forced row-level security, like every table. The scheduled review finds the tenants
with running experiments through the SECURITY DEFINER function ``firstmile_running_experiment_tenants``,
owned by ``firstmile_progress_scheduler`` (migration 0007), which may read only the ``tenant_id`` and
``status`` columns of ``experiments``.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("experiments", "experiment_exposures")


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        "experiments",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("definition", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'draft'")),
        sa.Column("approved_by", sa.Text(), nullable=True),
        sa.Column("started_by", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("planned_end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("extensions", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("concluded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verdict", postgresql.JSONB(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('draft', 'approved', 'running', 'stopped', 'concluded')", name=op.f("ck_experiments_status")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_experiments_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_experiments")),
    )
    op.create_table(
        "experiment_exposures",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("experiment_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("variant", sa.Text(), nullable=False),
        sa.Column("exposed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("inputs", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_experiment_exposures_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "experiment_id", "user_id", name=op.f("pk_experiment_exposures")),
    )
    op.create_index("ix_experiment_exposures_user", "experiment_exposures", ["tenant_id", "user_id"])
    for table in TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {app}")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")
    op.execute(f"GRANT SELECT (tenant_id, status) ON experiments TO {SCHEDULER}")
    op.execute(f"CREATE POLICY experiment_review_scheduler ON experiments FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_running_experiment_tenants()
        RETURNS TABLE (tenant_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT DISTINCT e.tenant_id FROM public.experiments e WHERE e.status = 'running'
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_running_experiment_tenants() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_running_experiment_tenants() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_running_experiment_tenants() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_running_experiment_tenants()")
    op.drop_table("experiment_exposures")
    op.drop_table("experiments")
