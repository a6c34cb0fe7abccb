"""All SQL of the analytics slice in PostgreSQL (its tables: ``analytics_alerts``, ``review_queue_alerts``)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import literal, select, text, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.analytics.alerts import Alert
from firstmile.analytics.models import analytics_alerts as t
from firstmile.analytics.models import review_queue_alerts as rq
from firstmile.kit.db import TenantTx

_COLUMNS = (
    t.c.id,
    t.c.path_key,
    t.c.path_version,
    t.c.step_id,
    t.c.step_title,
    t.c.direction,
    t.c.baseline_start,
    t.c.window_start,
    t.c.window_end,
    t.c.baseline_users,
    t.c.baseline_dropped,
    t.c.recent_users,
    t.c.recent_dropped,
    t.c.z,
    t.c.p_value,
    t.c.created_at,
    t.c.acknowledged_at,
    t.c.acknowledged_by,
)


def _alert(row: Any) -> Alert:
    return Alert(*row)


async def alert_tenants(conn: AsyncConnection) -> list[uuid.UUID]:
    """Tenants whose drop-off the check watches (the SECURITY DEFINER function of migration 0022)."""
    return [r[0] for r in await conn.execute(text("SELECT tenant_id FROM firstmile_dropoff_alert_tenants()"))]


async def raise_alert(tx: TenantTx, alert: Alert, *, quiet_since: datetime, delivered: bool) -> bool:
    """Store ``alert`` unless the same path version and step alerted in this window already (the unique key), or
    in a window that ended after ``quiet_since`` (one alert per step while its recent windows overlap). True when
    stored. ``delivered``: nowhere to send it (``delivered_at`` set at once)."""
    earlier = await tx.execute(
        select(t.c.id)
        .where(
            t.c.tenant_id == tx.tenant,
            t.c.path_key == alert.path_key,
            t.c.path_version == alert.path_version,
            t.c.step_id == alert.step_id,
            t.c.window_end > quiet_since,
        )
        .limit(1)
    )
    if earlier.first() is not None:
        return False
    values = {c.name: getattr(alert, c.name) for c in _COLUMNS if c.name not in ("acknowledged_at", "acknowledged_by")}
    stored = await tx.execute(
        insert(t)
        .values(tenant_id=tx.tenant, delivered_at=alert.created_at if delivered else None, **values)
        .on_conflict_do_nothing()
        .returning(t.c.id)
    )
    return stored.first() is not None


async def open_alerts(tx: TenantTx, limit: int) -> list[Alert]:
    """Alerts nobody acknowledged, newest first."""
    rows = await tx.execute(
        select(*_COLUMNS)
        .where(t.c.tenant_id == tx.tenant, t.c.acknowledged_at.is_(None))
        .order_by(t.c.created_at.desc(), t.c.id)
        .limit(limit)
    )
    return [_alert(r) for r in rows]


async def get_alert(tx: TenantTx, alert_id: uuid.UUID) -> Alert | None:
    row = (await tx.execute(select(*_COLUMNS).where(t.c.tenant_id == tx.tenant, t.c.id == alert_id))).first()
    return _alert(row) if row is not None else None


async def undelivered(tx: TenantTx, limit: int) -> list[tuple[Alert, dict[str, Any]]]:
    """Alerts not yet delivered to every target and not acknowledged, oldest first, with their delivery record."""
    rows = await tx.execute(
        select(*_COLUMNS, t.c.delivery)
        .where(t.c.tenant_id == tx.tenant, t.c.delivered_at.is_(None), t.c.acknowledged_at.is_(None))
        .order_by(t.c.created_at, t.c.id)
        .limit(limit)
    )
    return [(_alert(r[:-1]), dict(r[-1])) for r in rows]


async def record_delivery(
    tx: TenantTx, alert_id: uuid.UUID, outcomes: Mapping[str, Mapping[str, Any]], *, complete: bool, at: datetime
) -> None:
    """Merge the targets' ``outcomes`` into the alert's delivery record; ``complete``: every target has it."""
    await tx.execute(
        update(t)
        .where(t.c.tenant_id == tx.tenant, t.c.id == alert_id)
        .values(
            delivery=t.c.delivery.op("||")(literal(dict(outcomes), type_=JSONB)),
            delivered_at=at if complete else None,
        )
    )


async def acknowledge(tx: TenantTx, alert_id: uuid.UUID, actor: str, at: datetime) -> bool:
    """Mark the alert acknowledged; False when there is no such open alert."""
    result = await tx.execute(
        update(t)
        .where(t.c.tenant_id == tx.tenant, t.c.id == alert_id, t.c.acknowledged_at.is_(None))
        .values(acknowledged_at=at, acknowledged_by=actor)
        .returning(t.c.id)
    )
    return result.first() is not None


# ---------------------------------------------------------------------- the review queue's notifications


@dataclass(frozen=True, slots=True)
class QueueCrossing:
    """A crossing of the tenant's review queue past its threshold (``review_queue_alerts``)."""

    id: uuid.UUID
    pending: int
    threshold: int
    by_kind: dict[str, int]
    oldest_at: datetime | None
    crossed_at: datetime
    delivery: dict[str, Any]
    delivered_at: datetime | None
    cleared_at: datetime | None


_CROSSING = (
    rq.c.id,
    rq.c.pending,
    rq.c.threshold,
    rq.c.by_kind,
    rq.c.oldest_at,
    rq.c.crossed_at,
    rq.c.delivery,
    rq.c.delivered_at,
    rq.c.cleared_at,
)


def _crossing(row: Any) -> QueueCrossing:
    values = list(row)
    values[3], values[6] = dict(values[3]), dict(values[6])
    return QueueCrossing(*values)


async def review_alerted_tenants(conn: AsyncConnection) -> list[uuid.UUID]:
    """Tenants with an open crossing (the SECURITY DEFINER function of migration 0025)."""
    return [r[0] for r in await conn.execute(text("SELECT tenant_id FROM firstmile_review_queue_alerted()"))]


async def open_crossing(tx: TenantTx, *, for_update: bool = False) -> QueueCrossing | None:
    """The tenant's open crossing, or None (the notification is armed)."""
    query = select(*_CROSSING).where(rq.c.tenant_id == tx.tenant, rq.c.cleared_at.is_(None))
    row = (await tx.execute(query.with_for_update() if for_update else query)).first()
    return None if row is None else _crossing(row)


async def open_new_crossing(
    tx: TenantTx,
    crossing_id: uuid.UUID,
    *,
    pending: int,
    threshold: int,
    by_kind: Mapping[str, int],
    oldest_at: datetime | None,
    at: datetime,
    delivered: bool,
) -> QueueCrossing | None:
    """Store a crossing unless one is open already (the partial unique index); None then. ``delivered``: nowhere to
    send it (``delivered_at`` set at once)."""
    stored = await tx.execute(
        insert(rq)
        .values(
            tenant_id=tx.tenant,
            id=crossing_id,
            pending=pending,
            threshold=threshold,
            by_kind=dict(by_kind),
            oldest_at=oldest_at,
            crossed_at=at,
            delivered_at=at if delivered else None,
        )
        .on_conflict_do_nothing()
        .returning(*_CROSSING)
    )
    row = stored.first()
    return None if row is None else _crossing(row)


async def clear_crossing(tx: TenantTx, at: datetime) -> QueueCrossing | None:
    """Close the tenant's open crossing (the queue is back at or below its threshold); None when none was open."""
    row = (
        await tx.execute(
            update(rq)
            .where(rq.c.tenant_id == tx.tenant, rq.c.cleared_at.is_(None))
            .values(cleared_at=at)
            .returning(*_CROSSING)
        )
    ).first()
    return None if row is None else _crossing(row)


async def record_crossing_delivery(
    tx: TenantTx, crossing_id: uuid.UUID, outcomes: Mapping[str, Mapping[str, Any]], *, complete: bool, at: datetime
) -> None:
    """Merge the targets' ``outcomes`` into the crossing's delivery record; ``complete``: every target has it."""
    await tx.execute(
        update(rq)
        .where(rq.c.tenant_id == tx.tenant, rq.c.id == crossing_id)
        .values(
            delivery=rq.c.delivery.op("||")(literal(dict(outcomes), type_=JSONB)),
            delivered_at=at if complete else None,
        )
    )
