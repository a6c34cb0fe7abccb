"""In-app nudges: when the user saw a message in the app, and when they dismissed it.

The ``nudge_sends`` row of an in-app nudge is the stored message: the pull endpoint and the
stream read it (``status = 'sent'``, not dismissed). ``seen_at`` is set by the app's first
``…/seen`` (a ``nudge.opened`` event), ``dismissed_at`` by ``…/dismiss`` (the message leaves the
list). The pull query is served by ``ix_nudge_sends_tenant_id_user_id_sent_at`` (migration 0013,
read backwards for newest first): a user has a handful of sends, so no index of its own.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("seen_at", "dismissed_at")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("nudge_sends", sa.Column(column, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("nudge_sends", column)
