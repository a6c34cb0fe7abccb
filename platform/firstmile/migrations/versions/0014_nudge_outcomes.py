"""Nudge outcomes: when a sent nudge was clicked, when its step was completed, when the bandit counted it.

``clicked_at`` (the tracked link, first click), ``converted_at`` (the nudged step completed within
the outcome window after the send) and ``rewarded_at`` (the bandit has counted the send: a success
at the first click or conversion, a failure once the window passed without either; exactly once).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("clicked_at", "converted_at", "rewarded_at")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("nudge_sends", sa.Column(column, sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_nudge_sends_tenant_id_unrewarded",
        "nudge_sends",
        ["tenant_id", "sent_at"],
        postgresql_where=sa.text("status = 'sent' AND rewarded_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_nudge_sends_tenant_id_unrewarded", table_name="nudge_sends")
    for column in reversed(COLUMNS):
        op.drop_column("nudge_sends", column)
