"""The daily looks at running experiments: what the scheduled review saw, for the result page's history.

``experiment_looks``: one row per experiment and day (the first look of a day wins), with each variant's
exposed users, conversions, chance to beat the control and expected loss, the verdict of that look and the
review's action. The result page reads them to show the chance to beat control over time without
analysing the history again. Tenant-owned with forced row-level security, like every table.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLE = "experiment_looks"


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
        sa.Column("experiment_id", sa.Text(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("looked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("look", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{TABLE}_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "experiment_id", "day", name=op.f(f"pk_{TABLE}")),
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {app}")
    op.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {TABLE} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {TABLE} "
        f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
    )
    op.execute(f"CREATE POLICY platform_admin ON {TABLE} TO {ADMIN} USING (true) WITH CHECK (true)")


def downgrade() -> None:
    op.drop_table(TABLE)
