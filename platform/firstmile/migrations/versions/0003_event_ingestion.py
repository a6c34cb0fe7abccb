"""Event ingestion: messageId receipts, webhook secrets, the relay role.

``event_receipts`` deduplicates Segment messages per tenant for the dedupe
window. ``webhook_secrets`` holds the shared secret a tenant's Segment webhook
signs with; it is read before the tenant is known, through the SECURITY
DEFINER function ``firstmile_resolve_webhook`` owned by the key resolver role.
The outbox relay works across tenants as ``firstmile_relay`` (NOLOGIN; grant it
to the relay's login role): it may read and delete outbox rows and prune
receipts, nothing else.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESOLVER = "firstmile_key_resolver"
ADMIN = "firstmile_admin"
RELAY = "firstmile_relay"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        "event_receipts",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_event_receipts_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "message_id", name=op.f("pk_event_receipts")),
    )
    op.create_index(op.f("ix_event_receipts_received_at"), "event_receipts", ["received_at"])
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_secrets_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "source", name=op.f("pk_webhook_secrets")),
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{RELAY}') THEN
            CREATE ROLE {RELAY} NOLOGIN NOBYPASSRLS;
          END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        """
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'GRANT {RELAY} TO ' || quote_ident(current_user);
          END IF;
        END $$;
        """
    )
    op.execute(f"GRANT SELECT, INSERT ON event_receipts TO {app}")
    op.execute(f"GRANT SELECT ON webhook_secrets TO {app}")
    for table in ("event_receipts", "webhook_secrets"):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {RELAY}")
    op.execute(f"GRANT SELECT, DELETE ON outbox TO {RELAY}")
    op.execute(f"GRANT SELECT, DELETE ON event_receipts TO {RELAY}")
    op.execute(f"CREATE POLICY relay ON outbox FOR ALL TO {RELAY} USING (true)")
    op.execute(f"CREATE POLICY relay ON event_receipts FOR ALL TO {RELAY} USING (true)")
    op.execute(f"GRANT SELECT ON webhook_secrets TO {RESOLVER}")
    op.execute(f"CREATE POLICY key_resolver ON webhook_secrets FOR SELECT TO {RESOLVER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_resolve_webhook(p_slug text, p_source text)
        RETURNS TABLE (tenant_id uuid, home_region text, tenant_revision integer, secret text)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT t.id, t.home_region, t.revision, w.secret
          FROM public.tenants t JOIN public.webhook_secrets w ON w.tenant_id = t.id AND w.source = p_source
          WHERE t.slug = p_slug
          LIMIT 1
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {RESOLVER}")
    op.execute(f"ALTER FUNCTION firstmile_resolve_webhook(text, text) OWNER TO {RESOLVER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {RESOLVER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_resolve_webhook(text, text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_resolve_webhook(text, text) TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_resolve_webhook(text, text)")
    op.execute("DROP POLICY IF EXISTS relay ON outbox")
    op.execute(f"REVOKE ALL ON outbox FROM {RELAY}")
    op.drop_table("webhook_secrets")
    op.drop_index(op.f("ix_event_receipts_received_at"), table_name="event_receipts")
    op.drop_table("event_receipts")
