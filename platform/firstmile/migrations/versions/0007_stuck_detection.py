"""Stuck detection: the step a user was last flagged stuck on, and a tenant finder for the scan.

``user_progress.stuck_step``/``stuck_at`` record the last stuck flag, so a user is
flagged once per step (a later step can be flagged again). The scan runs as the
application role, which sees one tenant at a time; it finds the tenants with
idle in-progress users through the SECURITY DEFINER function
``firstmile_stuck_tenants`` owned by ``firstmile_progress_scheduler``, which may
only read the ``tenant_id, status, current_step, stuck_step, updated_at`` columns
of ``user_progress``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEDULER = "firstmile_progress_scheduler"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.add_column("user_progress", sa.Column("stuck_step", sa.Text(), nullable=True))
    op.add_column("user_progress", sa.Column("stuck_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_user_progress_tenant_id_idle",
        "user_progress",
        ["tenant_id", "updated_at"],
        postgresql_where=sa.text("status = 'in_progress'"),
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SCHEDULER}') THEN
            CREATE ROLE {SCHEDULER} NOLOGIN NOBYPASSRLS;
          END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        """
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'GRANT {SCHEDULER} TO ' || quote_ident(current_user);
          END IF;
        END $$;
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {SCHEDULER}")
    op.execute(
        f"GRANT SELECT (tenant_id, status, current_step, stuck_step, updated_at) ON user_progress TO {SCHEDULER}"
    )
    op.execute(f"CREATE POLICY progress_scheduler ON user_progress FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_stuck_tenants(p_idle_seconds double precision)
        RETURNS TABLE (tenant_id uuid, candidates bigint)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT p.tenant_id, count(*)
          FROM public.user_progress p
          WHERE p.status = 'in_progress'
            AND p.updated_at <= now() - make_interval(secs => p_idle_seconds)
            AND p.stuck_step IS DISTINCT FROM p.current_step
          GROUP BY p.tenant_id
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_stuck_tenants(double precision) OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_stuck_tenants(double precision) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_stuck_tenants(double precision) TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_stuck_tenants(double precision)")
    op.execute("DROP POLICY IF EXISTS progress_scheduler ON user_progress")
    op.execute(f"REVOKE ALL ON user_progress FROM {SCHEDULER}")
    op.execute(f"REVOKE ALL ON SCHEMA public FROM {SCHEDULER}")
    op.drop_index("ix_user_progress_tenant_id_idle", table_name="user_progress")
    op.drop_column("user_progress", "stuck_at")
    op.drop_column("user_progress", "stuck_step")
