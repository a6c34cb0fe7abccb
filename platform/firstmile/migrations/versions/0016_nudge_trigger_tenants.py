"""Nudge triggers declared in manifests: a tenant finder for the trigger scan.

The scan runs as the application role, which sees one tenant at a time; it finds the
tenants whose manifest declares ``step_idle`` or ``event_missing`` nudge triggers through
the SECURITY DEFINER function ``firstmile_nudge_trigger_tenants``, owned by
``firstmile_progress_scheduler`` (migration 0007), which may read only the ``id`` and
``manifest`` columns of ``tenants``.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEDULER = "firstmile_progress_scheduler"
ADMIN = "firstmile_admin"


def _app_role() -> str:
    return str(context.config.attributes.get("app_role", "firstmile_app"))


def upgrade() -> None:
    app = _app_role()
    op.execute(f"GRANT SELECT (id, manifest) ON tenants TO {SCHEDULER}")
    op.execute(f"CREATE POLICY nudge_trigger_scheduler ON tenants FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_nudge_trigger_tenants()
        RETURNS TABLE (tenant_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT t.id FROM public.tenants t
          WHERE coalesce(t.manifest -> 'nudges' ->> 'enabled', 'true') <> 'false'
            AND jsonb_path_exists(
              t.manifest, '$.nudges.triggers[*] ? (@.when == "step_idle" || @.when == "event_missing")')
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_nudge_trigger_tenants() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_nudge_trigger_tenants() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_nudge_trigger_tenants() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_nudge_trigger_tenants()")
    op.execute("DROP POLICY IF EXISTS nudge_trigger_scheduler ON tenants")
    op.execute(f"REVOKE SELECT (id, manifest) ON tenants FROM {SCHEDULER}")
