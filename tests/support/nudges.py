"""Helpers the nudge tests share."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events.envelope import Envelope
from tests.conftest import TenantFixture


async def started_envelope(admin_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> Envelope:
    """The ``onboarding.started`` event of ``user_id`` as the outbox holds it (to feed the feature store)."""
    async with admin_engine.connect() as conn:
        [row] = list(
            await conn.execute(
                text(
                    "SELECT event_id, occurred_at, payload FROM outbox WHERE tenant_id = :t"
                    " AND event_type = 'onboarding.started' AND payload->>'user_id' = :u"
                ),
                {"t": tenant.id, "u": user_id},
            )
        )
    return Envelope(row[0], tenant.id, "onboarding.started", row[1], dict(row[2]))
