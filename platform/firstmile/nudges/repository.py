"""All SQL of the nudges slice (functions take a :class:`~firstmile.kit.db.TenantTx`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import TenantTx


@dataclass(frozen=True, slots=True)
class SendRow:
    send_id: uuid.UUID
    user_id: str
    trigger_key: str
    channel: str
    arm: str
    segment: str
    status: str
    send_at: datetime
    attempts: int
    subject: str | None
    body: str
    html: str | None
    decision: dict[str, Any]
    provider: str | None
    provider_message_id: str | None
    last_error: str | None
    sent_at: datetime | None


_COLUMNS = (
    "send_id, user_id, trigger_key, channel, arm, segment, status, send_at, attempts, subject, body, html, "
    "decision, provider, provider_message_id, last_error, sent_at"
)


def _row(r: Sequence[Any]) -> SendRow:
    return SendRow(*r)


_INSERT = text(
    "INSERT INTO nudge_sends (tenant_id, send_id, user_id, trigger_key, channel, arm, segment, status, send_at,"
    " subject, body, html, decision)"
    " VALUES (:t, :send_id, :user_id, :trigger_key, :channel, :arm, :segment, :status, :send_at,"
    " :subject, :body, :html, :decision)"
    " ON CONFLICT (tenant_id, user_id, trigger_key) DO NOTHING RETURNING send_id"
).bindparams(bindparam("decision", type_=JSONB))


async def insert_send(
    tx: TenantTx,
    send_id: uuid.UUID,
    user_id: str,
    trigger_key: str,
    channel: str,
    arm: str,
    segment: str,
    status: str,
    send_at: datetime,
    subject: str | None,
    body: str,
    html: str | None,
    decision: Mapping[str, Any],
) -> bool:
    """Record a decision and its send; False when this trigger already fired for the user."""
    row = (
        await tx.execute(
            _INSERT,
            {
                "t": tx.tenant, "send_id": send_id, "user_id": user_id, "trigger_key": trigger_key,
                "channel": channel, "arm": arm, "segment": segment, "status": status, "send_at": send_at,
                "subject": subject, "body": body, "html": html, "decision": dict(decision),
            },
        )
    ).first()  # fmt: skip
    return row is not None


_SENT_TIMES = text(
    "SELECT coalesce(sent_at, send_at) FROM nudge_sends WHERE tenant_id = :t AND user_id = :u"
    " AND status IN ('scheduled', 'sending', 'sent') AND coalesce(sent_at, send_at) >= :since"
)


async def budget_times(tx: TenantTx, user_id: str, since: datetime) -> list[datetime]:
    """When the user's nudges since ``since`` went or will go (sent, or still scheduled): the budget's input."""
    return [r[0] for r in await tx.execute(_SENT_TIMES, {"t": tx.tenant, "u": user_id, "since": since})]


_CONSENTS = text("SELECT channel, category, granted FROM nudge_consents WHERE tenant_id = :t AND user_id = :u")
_SUPPRESSED = text("SELECT channel FROM nudge_suppressions WHERE tenant_id = :t AND user_id = :u")


async def consents(tx: TenantTx, user_id: str) -> dict[tuple[str, str], bool]:
    return {(r[0], r[1]): bool(r[2]) for r in await tx.execute(_CONSENTS, {"t": tx.tenant, "u": user_id})}


async def suppressed_channels(tx: TenantTx, user_id: str) -> set[str]:
    return {str(r[0]) for r in await tx.execute(_SUPPRESSED, {"t": tx.tenant, "u": user_id})}


_SET_CONSENT = text(
    "INSERT INTO nudge_consents (tenant_id, user_id, channel, category, granted, source, updated_at)"
    " VALUES (:t, :u, :channel, :category, :granted, :source, now())"
    " ON CONFLICT (tenant_id, user_id, channel, category) DO UPDATE SET granted = excluded.granted,"
    " source = excluded.source, updated_at = excluded.updated_at"
    " WHERE nudge_consents.granted IS DISTINCT FROM excluded.granted RETURNING 1"
)


async def set_consent(tx: TenantTx, user_id: str, channel: str, category: str, granted: bool, source: str) -> bool:
    """Record consent; True when it changed."""
    params = {"t": tx.tenant, "u": user_id, "channel": channel, "category": category, "granted": granted}
    return (await tx.execute(_SET_CONSENT, params | {"source": source})).first() is not None


_SUPPRESS = text(
    "INSERT INTO nudge_suppressions (tenant_id, user_id, channel, reason) VALUES (:t, :u, :channel, :reason)"
    " ON CONFLICT (tenant_id, user_id, channel) DO NOTHING RETURNING 1"
)


async def suppress(tx: TenantTx, user_id: str, channel: str, reason: str) -> bool:
    params = {"t": tx.tenant, "u": user_id, "channel": channel, "reason": reason}
    return (await tx.execute(_SUPPRESS, params)).first() is not None


_ARMS = text("SELECT arm, successes, failures FROM nudge_arm_stats WHERE tenant_id = :t AND segment = :segment")


async def arm_stats(tx: TenantTx, segment: str) -> dict[str, tuple[int, int]]:
    return {str(r[0]): (int(r[1]), int(r[2])) for r in await tx.execute(_ARMS, {"t": tx.tenant, "segment": segment})}


_REWARD = text(
    "INSERT INTO nudge_arm_stats AS s (tenant_id, segment, arm, successes, failures)"
    " VALUES (:t, :segment, :arm, :success, :failure)"
    " ON CONFLICT (tenant_id, segment, arm) DO UPDATE SET successes = s.successes + excluded.successes,"
    " failures = s.failures + excluded.failures"
)


async def reward(tx: TenantTx, segment: str, arm: str, success: bool) -> None:
    params = {"t": tx.tenant, "segment": segment, "arm": arm, "success": int(success), "failure": int(not success)}
    await tx.execute(_REWARD, params)


_CLAIM = text(
    f"UPDATE nudge_sends SET status = 'sending', attempts = attempts + 1, claimed_until = :until, updated_at = now()"
    f" WHERE tenant_id = :t AND send_id IN ("
    f"  SELECT send_id FROM nudge_sends WHERE tenant_id = :t"
    f"  AND ((status = 'scheduled' AND send_at <= :now) OR (status = 'sending' AND claimed_until <= :now))"
    f"  ORDER BY send_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
    f" RETURNING {_COLUMNS}"
)


async def claim_due(tx: TenantTx, now: datetime, until: datetime, limit: int) -> list[SendRow]:
    """Take up to ``limit`` due sends (or sends whose earlier claim ran out: a worker died) until ``until``."""
    rows = await tx.execute(_CLAIM, {"t": tx.tenant, "now": now, "until": until, "limit": limit})
    return [_row(r) for r in rows]


_FINISH = text(
    "UPDATE nudge_sends SET status = :status, provider = :provider, provider_message_id = :message_id,"
    " sent_at = CASE WHEN :status = 'sent' THEN now() ELSE sent_at END, last_error = :error,"
    " send_at = coalesce(:send_at, send_at), claimed_until = NULL, updated_at = now()"
    " WHERE tenant_id = :t AND send_id = :send_id AND status = 'sending' RETURNING 1"
)


async def finish(
    tx: TenantTx,
    send_id: uuid.UUID,
    status: str,
    *,
    provider: str | None = None,
    message_id: str | None = None,
    error: str | None = None,
    send_at: datetime | None = None,
) -> bool:
    """Record the outcome of a claimed send (sent, scheduled again for a retry, dead, rejected); False when the
    send was not claimed any more (another worker took it after the claim ran out)."""
    params = {
        "t": tx.tenant, "send_id": send_id, "status": status, "provider": provider, "message_id": message_id,
        "error": error, "send_at": send_at,
    }  # fmt: skip
    return (await tx.execute(_FINISH, params)).first() is not None


_GET = text(f"SELECT {_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND send_id = :s")
_FOR_USER = text(f"SELECT {_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND user_id = :u ORDER BY created_at")


async def get_send(tx: TenantTx, send_id: uuid.UUID) -> SendRow | None:
    row = (await tx.execute(_GET, {"t": tx.tenant, "s": send_id})).first()
    return None if row is None else _row(row)


async def sends_for(tx: TenantTx, user_id: str) -> list[SendRow]:
    return [_row(r) for r in await tx.execute(_FOR_USER, {"t": tx.tenant, "u": user_id})]


_CLICK = text(
    f"UPDATE nudge_sends SET clicked_at = now(), updated_at = now()"
    f" WHERE tenant_id = :t AND send_id = :s AND status = 'sent' AND clicked_at IS NULL RETURNING {_COLUMNS}"
)
_CONVERT = text(
    f"UPDATE nudge_sends SET converted_at = now(), updated_at = now()"
    f" WHERE tenant_id = :t AND user_id = :u AND split_part(trigger_key, ':', 2) = :step AND status = 'sent'"
    f" AND converted_at IS NULL"
    f" AND sent_at >= :since RETURNING {_COLUMNS}"
)
_REWARDED = text(
    "UPDATE nudge_sends SET rewarded_at = now() WHERE tenant_id = :t AND send_id = :s AND rewarded_at IS NULL"
    " RETURNING 1"
)
_UNREWARDED = text(
    f"SELECT {_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND status = 'sent' AND rewarded_at IS NULL"
    f" AND sent_at < :before ORDER BY sent_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)


async def record_click(tx: TenantTx, send_id: uuid.UUID) -> SendRow | None:
    """The send at its first click (None: not a sent nudge, or clicked before)."""
    row = (await tx.execute(_CLICK, {"t": tx.tenant, "s": send_id})).first()
    return None if row is None else _row(row)


async def record_conversion(tx: TenantTx, user_id: str, step_id: str, since: datetime) -> list[SendRow]:
    """The nudges about ``step_id`` (trigger key ``<trigger>:<step>``) sent since ``since``, now converted (once)."""
    return [_row(r) for r in await tx.execute(_CONVERT, {"t": tx.tenant, "u": user_id, "step": step_id,
                                                          "since": since})]  # fmt: skip


async def mark_rewarded(tx: TenantTx, send_id: uuid.UUID) -> bool:
    """True the first time only: the bandit counts a send once."""
    return (await tx.execute(_REWARDED, {"t": tx.tenant, "s": send_id})).first() is not None


async def unrewarded_before(tx: TenantTx, before: datetime, limit: int) -> list[SendRow]:
    """Sent nudges not counted yet whose outcome window closed (sent before ``before``)."""
    return [_row(r) for r in await tx.execute(_UNREWARDED, {"t": tx.tenant, "before": before, "limit": limit})]


_DUE_TENANTS = text("SELECT tenant_id, due FROM firstmile_nudges_due()")


async def due_tenants(conn: AsyncConnection) -> list[tuple[uuid.UUID, int]]:
    """Tenants with sends due now (any tenant: through the SECURITY DEFINER function of migration 0013)."""
    return [(r[0], int(r[1])) for r in await conn.execute(_DUE_TENANTS)]


_DELETE_USER = {
    "nudge_sends": text("DELETE FROM nudge_sends WHERE tenant_id = :t AND user_id = :u"),
    "nudge_consents": text("DELETE FROM nudge_consents WHERE tenant_id = :t AND user_id = :u"),
    "nudge_suppressions": text("DELETE FROM nudge_suppressions WHERE tenant_id = :t AND user_id = :u"),
}


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    return {
        table: int((await tx.execute(sql, {"t": tx.tenant, "u": user_id})).rowcount)
        for table, sql in _DELETE_USER.items()
    }
