"""Application role, grants, row-level security and the API key resolver.

The application role owns nothing and has no BYPASSRLS: every tenant-owned
table has RLS enabled *and forced* with a policy on the transaction-local
``firstmile.tenant_id`` setting. An unset setting yields NULL, so a transaction
without tenant context sees no rows, never all rows.

API keys are resolved before the tenant is known, through one SECURITY DEFINER
function owned by ``firstmile_key_resolver``, a NOLOGIN role that may only read
``api_keys`` and ``tenants``; the application role can execute the function but
cannot select from ``api_keys`` outside its tenant. The operator CLI (manifests,
keys) runs as the schema owner, a member of ``firstmile_admin``, whose policies
let it work across tenants.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESOLVER = "firstmile_key_resolver"
ADMIN = "firstmile_admin"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TENANT_TABLES = ("api_keys", "onboarding_paths", "end_users", "user_progress", "step_completions", "outbox")


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def _ensure_role(name: str) -> None:
    # Roles are cluster-wide: migrations of two databases at once may race to create one.
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
            CREATE ROLE {name} NOLOGIN NOBYPASSRLS;
          END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        """
    )


def upgrade() -> None:
    app = _app_role()
    _ensure_role(app)
    _ensure_role(RESOLVER)
    _ensure_role(ADMIN)
    # The migrating role hands the resolver function to RESOLVER and acts across
    # tenants (manifests, keys) through the ADMIN policies: it needs both roles.
    for role in (RESOLVER, ADMIN):
        op.execute(
            f"""
            DO $$ BEGIN
              IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE 'GRANT {role} TO ' || quote_ident(current_user);
              END IF;
            END $$;
            """
        )

    op.execute(f"GRANT USAGE ON SCHEMA public TO {app}")
    op.execute(f"GRANT SELECT ON tenants, onboarding_paths TO {app}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON end_users, user_progress, step_completions TO {app}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO {app}")
    op.execute(f"GRANT SELECT ON api_keys TO {app}")

    op.execute("ALTER TABLE tenants ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE tenants FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON tenants USING (id = {TENANT_EXPR}) WITH CHECK (id = {TENANT_EXPR})")
    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )

    for table in ("tenants", *TENANT_TABLES):
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")

    op.execute(f"GRANT SELECT ON api_keys, tenants TO {RESOLVER}")
    op.execute(f"CREATE POLICY key_resolver ON api_keys FOR SELECT TO {RESOLVER} USING (true)")
    op.execute(f"CREATE POLICY key_resolver ON tenants FOR SELECT TO {RESOLVER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_resolve_api_key(p_hash bytea)
        RETURNS TABLE (key_id uuid, tenant_id uuid, tenant_slug text, home_region text,
                       tenant_revision integer, scopes text[], key_region text, revoked boolean)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT k.id, k.tenant_id, t.slug, t.home_region, t.revision, k.scopes, k.region,
                 k.revoked_at IS NOT NULL
          FROM public.api_keys k JOIN public.tenants t ON t.id = k.tenant_id
          WHERE k.key_hash = p_hash
          LIMIT 1
        $$
        """
    )
    # A new owner needs CREATE on the schema (PostgreSQL 15+ no longer grants it on public);
    # it keeps it only for the hand-over.
    op.execute(f"GRANT CREATE ON SCHEMA public TO {RESOLVER}")
    op.execute(f"ALTER FUNCTION firstmile_resolve_api_key(bytea) OWNER TO {RESOLVER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {RESOLVER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_resolve_api_key(bytea) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_resolve_api_key(bytea) TO {app}")


def downgrade() -> None:
    app = _app_role()
    op.execute("DROP FUNCTION IF EXISTS firstmile_resolve_api_key(bytea)")
    op.execute("DROP POLICY IF EXISTS key_resolver ON api_keys")
    op.execute("DROP POLICY IF EXISTS key_resolver ON tenants")
    for table in ("tenants", *TENANT_TABLES):
        op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
        op.execute(f"DROP POLICY IF EXISTS platform_admin ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {app}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {RESOLVER}")
