"""Ingestion: Segment messages into the outbox, deduplicated per tenant by ``messageId``, or onto the bus.

Outbox: one statement per batch: receipts are inserted with ``ON CONFLICT DO NOTHING``
and only the messages whose receipt is new reach the outbox, in the same
transaction. A retried batch therefore adds nothing twice, and a message seen
within the dedupe window (``FIRSTMILE_EVENT_DEDUPE_DAYS``) is reported as a
duplicate. Direct ingestion (:func:`records`) publishes the same envelopes without
either table; downstream consumers dedupe by event id (``uuid5(tenant, messageId)``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.events import envelope
from firstmile.events.bus import Record
from firstmile.events.segment import Message
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx
from firstmile.kit.outbox import partition_key

_INGEST = text(
    "WITH e AS ("
    " SELECT * FROM jsonb_to_recordset(:events) AS x(message_id text, event_id uuid, event_type text,"
    "  partition_key text, payload jsonb, occurred_at timestamptz, ord int)"
    "), r AS ("
    " INSERT INTO event_receipts (tenant_id, message_id, event_id, received_at)"
    " SELECT :tid, e.message_id, e.event_id, :now FROM e ORDER BY e.ord"
    " ON CONFLICT (tenant_id, message_id) DO NOTHING RETURNING message_id"
    "), o AS ("
    " INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at)"
    " SELECT e.event_id, :tid, e.event_type, e.partition_key, e.payload, e.occurred_at"
    " FROM e JOIN r USING (message_id) ORDER BY e.ord RETURNING 1"
    ") SELECT count(*) FROM o"
).bindparams(bindparam("events", type_=JSONB))


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int


async def ingest(tx: TenantTx, messages: Sequence[Message], now: datetime) -> IngestResult:
    """Write new messages to the outbox; the caller owns the (tenant-bound) transaction."""
    if not messages:
        return IngestResult(0, 0)
    rows: list[dict[str, Any]] = [
        {
            "message_id": m.message_id,
            "event_id": str(m.event_id),
            "event_type": m.type,
            "partition_key": partition_key(tx.tenant, m.subject),
            "payload": m.payload,
            "occurred_at": m.timestamp.isoformat(),
            "ord": m.index,
        }
        for m in messages
    ]
    inserted = (await tx.execute(_INGEST, {"tid": tx.tenant, "now": now, "events": rows})).scalar_one()
    telemetry.EVENTS_INGESTED.labels("accepted").inc(inserted)
    telemetry.EVENTS_INGESTED.labels("duplicate").inc(len(messages) - inserted)
    return IngestResult(accepted=int(inserted), duplicates=len(messages) - int(inserted))


def records(tenant_id: uuid.UUID, messages: Sequence[Message]) -> list[Record]:
    """The messages as the relay would publish their outbox rows: the same envelope, key and headers.

    Direct ingestion hands these to the bus itself; ``outbox_id`` is 0 (there is no row).
    """
    out: list[Record] = []
    for m in messages:
        key = partition_key(tenant_id, m.subject)
        value = envelope.encode(
            envelope.Envelope(
                event_id=m.event_id,
                tenant_id=tenant_id,
                event_type=m.type,
                occurred_at=m.timestamp,
                payload=m.payload,
                partition_key=key,
            )
        )
        out.append(Record(0, m.event_id, tenant_id, m.type, key, value))
    return out


_RESOLVE_WEBHOOK = text("SELECT tenant_id, home_region, tenant_revision, secret FROM firstmile_resolve_webhook(:s, :k)")


@dataclass(frozen=True, slots=True)
class WebhookTenant:
    tenant_id: uuid.UUID
    home_region: str
    revision: int
    secret: str


async def resolve_webhook(conn: AsyncConnection, slug: str, source: str) -> WebhookTenant | None:
    """The tenant and shared secret of an inbound webhook (SECURITY DEFINER resolver; no tenant context)."""
    row = (await conn.execute(_RESOLVE_WEBHOOK, {"s": slug, "k": source})).first()
    return None if row is None else WebhookTenant(row[0], row[1], int(row[2]), row[3])
