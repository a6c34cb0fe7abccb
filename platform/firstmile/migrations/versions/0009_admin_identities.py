"""Admin identities and the Keycloak event cursor.

``admin_identities`` remembers, per tenant, each admin who logged in to the admin
UI (the realm's subject, never the email) with the roles of their last login, so a
login with other roles is audited as a role change. ``sso_event_cursors`` is how far
the copy of a tenant realm's Keycloak events into the audit log has got (the time of
the newest copied event and the ids copied at that time, as Keycloak's event times
are milliseconds and not unique). Both are tenant rows under row-level security.

The admin UI's path editor runs as the application role: it may now add a path
version (INSERT), retire the current one (UPDATE of ``is_current`` only) and bump
its tenant's ``revision`` (UPDATE of ``revision, updated_at`` only), always within
the row-level security of the tenant the request is bound to.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("admin_identities", "sso_event_cursors")


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        "admin_identities",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("roles", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("first_login_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("origin IN ('sso', 'bootstrap')", name=op.f("ck_admin_identities_origin")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_admin_identities_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "subject", name=op.f("pk_admin_identities")),
    )
    op.create_table(
        "sso_event_cursors",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("realm", sa.Text(), nullable=False),
        sa.Column("last_event_time", sa.BigInteger(), nullable=False),
        sa.Column("last_event_ids", postgresql.ARRAY(sa.Text()), nullable=False, server_default="{}"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_sso_event_cursors_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "realm", name=op.f("pk_sso_event_cursors")),
    )
    for table in TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE ON {table} TO {app}")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")
    op.execute(f"GRANT INSERT, UPDATE (is_current) ON onboarding_paths TO {app}")
    op.execute(f"GRANT UPDATE (revision, updated_at) ON tenants TO {app}")


def downgrade() -> None:
    app = _app_role()
    op.execute(f"REVOKE UPDATE (revision, updated_at) ON tenants FROM {app}")
    op.execute(f"REVOKE INSERT, UPDATE (is_current) ON onboarding_paths FROM {app}")
    op.drop_table("sso_event_cursors")
    op.drop_table("admin_identities")
