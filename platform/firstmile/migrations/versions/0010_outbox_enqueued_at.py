"""When each outbox row was written, for the event-freshness gauge.

``outbox.occurred_at`` is the event's own time (for an ingested Segment message, the
client's timestamp, which may be hours old), so it cannot say how long an event has
waited for the relay. ``enqueued_at`` is the time of the transaction that wrote the row
(``now()``); the relay reports the age of the oldest unpublished row as
``firstmile_relay_lag_seconds``, the measure of the design's freshness SLO (1 minute).
``now()`` is stable, so adding the column rewrites no row.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox",
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_column("outbox", "enqueued_at")
