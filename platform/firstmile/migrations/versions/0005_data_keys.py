"""Key management: wrapped tenant data keys and per-user keys.

``tenant_data_keys`` holds each tenant's data key versions wrapped by its key
provider (Vault Transit or the local KEK; ``purpose='data'``, one current) and
its blind-index key wrapped by a data key (``purpose='index'``). ``user_keys``
holds one key per end user wrapped by a data key; deleting the row is the
user's crypto-shredding. The application role may read and insert both, and
delete user keys; it cannot change a stored key. Rotation rewraps keys as the
schema owner (``firstmile keys rotate``) through the platform_admin policy.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("tenant_data_keys", "user_keys")


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        "tenant_data_keys",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("wrapped_key", sa.Text(), nullable=False),
        sa.Column("provider_key_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("purpose IN ('data', 'index')", name=op.f("ck_tenant_data_keys_purpose")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_tenant_data_keys_version")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_data_keys_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "purpose", "version", name=op.f("pk_tenant_data_keys")),
    )
    op.create_index(
        "uq_tenant_data_keys_current",
        "tenant_data_keys",
        ["tenant_id", "purpose"],
        unique=True,
        postgresql_where=sa.text("retired_at IS NULL"),
    )
    op.create_table(
        "user_keys",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("tdk_version", sa.Integer(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_user_keys_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", name=op.f("pk_user_keys")),
    )
    op.execute(f"GRANT SELECT, INSERT ON tenant_data_keys TO {app}")
    op.execute(f"GRANT SELECT, INSERT, DELETE ON user_keys TO {app}")
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")


def downgrade() -> None:
    op.drop_table("user_keys")
    op.drop_index(
        "uq_tenant_data_keys_current", table_name="tenant_data_keys", postgresql_where=sa.text("retired_at IS NULL")
    )
    op.drop_table("tenant_data_keys")
