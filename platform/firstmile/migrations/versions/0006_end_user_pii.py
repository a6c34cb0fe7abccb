"""End users' personal data, encrypted: the ``pii`` ciphertext and the email blind index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("end_users", sa.Column("pii", sa.Text(), nullable=True))
    op.add_column("end_users", sa.Column("email_index", sa.LargeBinary(), nullable=True))
    op.create_index(
        "ix_end_users_tenant_id_email_index",
        "end_users",
        ["tenant_id", "email_index"],
        postgresql_where=sa.text("email_index IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_end_users_tenant_id_email_index", table_name="end_users")
    op.drop_column("end_users", "email_index")
    op.drop_column("end_users", "pii")
