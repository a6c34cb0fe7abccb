"""Resolve a tenant by slug before the tenant is known, for access tokens of its Keycloak realm.

An access token names its tenant only through its issuer (the realm ``firstmile-<slug>``). The
application role sees no ``tenants`` row outside a tenant context, so, like API keys (0002), the
slug is resolved through a SECURITY DEFINER function owned by ``firstmile_key_resolver``, which may
only read ``tenants``. It returns the id, slug, home region and revision: nothing else of the row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESOLVER = "firstmile_key_resolver"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.execute(
        """
        CREATE FUNCTION firstmile_resolve_tenant(p_slug text)
        RETURNS TABLE (tenant_id uuid, tenant_slug text, home_region text, tenant_revision integer)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT t.id, t.slug, t.home_region, t.revision
          FROM public.tenants t
          WHERE t.slug = p_slug
          LIMIT 1
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {RESOLVER}")
    op.execute(f"ALTER FUNCTION firstmile_resolve_tenant(text) OWNER TO {RESOLVER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {RESOLVER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_resolve_tenant(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_resolve_tenant(text) TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_resolve_tenant(text)")
