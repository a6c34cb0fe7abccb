"""Nudge delivery status from the providers' webhooks: the last status a provider reported, and when.

``delivery_status`` is one of ``delivered``, ``opened``, ``clicked``, ``bounced``, ``complained``,
``failed``, ``unsubscribed`` (``nudges.webhooks.STATUSES``), set by the SendGrid Event Webhook;
``delivery_at`` is the provider's time of that event.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("nudge_sends", sa.Column("delivery_status", sa.Text(), nullable=True))
    op.add_column("nudge_sends", sa.Column("delivery_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("nudge_sends", "delivery_at")
    op.drop_column("nudge_sends", "delivery_status")
