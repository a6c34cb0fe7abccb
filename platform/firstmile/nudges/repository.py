"""All SQL of the nudges slice (functions take a :class:`~firstmile.kit.db.TenantTx`)."""

from __future__ import annotations

import json
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


_POLICY_INPUTS = text(
    "SELECT"
    " (SELECT coalesce(jsonb_agg(jsonb_build_array(channel, category, granted)), '[]'::jsonb) FROM nudge_consents"
    "  WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT coalesce(array_agg(channel), '{}') FROM nudge_suppressions WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT coalesce(array_agg(coalesce(sent_at, send_at)), '{}') FROM nudge_sends WHERE tenant_id = :t"
    "  AND user_id = :u AND status IN ('scheduled', 'sending', 'sent') AND coalesce(sent_at, send_at) >= :since)"
)


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    consents: dict[tuple[str, str], bool]
    suppressed: set[str]
    sent: list[datetime]


async def policy_inputs(tx: TenantTx, user_id: str, since: datetime) -> PolicyInputs:
    """What the policy reads about the user, in one statement: consents, suppressed channels, and when the
    nudges since ``since`` went or will go (:func:`consents`, :func:`suppressed_channels`, :func:`budget_times`)."""
    row = (await tx.execute(_POLICY_INPUTS, {"t": tx.tenant, "u": user_id, "since": since})).one()
    return PolicyInputs({(c[0], c[1]): bool(c[2]) for c in row[0]}, set(row[1]), list(row[2]))


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
    " send_at = coalesce(:send_at, send_at), claimed_until = NULL, updated_at = now(),"
    " attempts = attempts - CASE WHEN :refund THEN 1 ELSE 0 END"
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
    refund: bool = False,
) -> bool:
    """Record the outcome of a claimed send (sent, scheduled again for a retry, dead, rejected); False when the
    send was not claimed any more (another worker took it after the claim ran out). ``refund``: the claim's
    attempt does not count (a provider's rate limit is not a failure of the send)."""
    params = {
        "t": tx.tenant, "send_id": send_id, "status": status, "provider": provider, "message_id": message_id,
        "error": error, "send_at": send_at, "refund": refund,
    }  # fmt: skip
    return (await tx.execute(_FINISH, params)).first() is not None


_GET = text(f"SELECT {_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND send_id = :s")
_FOR_USER = text(f"SELECT {_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND user_id = :u ORDER BY created_at")


async def get_send(tx: TenantTx, send_id: uuid.UUID) -> SendRow | None:
    row = (await tx.execute(_GET, {"t": tx.tenant, "s": send_id})).first()
    return None if row is None else _row(row)


@dataclass(frozen=True, slots=True)
class LogRow:
    """A send as the admin's nudge log shows it: the send, and what became of it."""

    send: SendRow
    created_at: datetime
    clicked_at: datetime | None
    converted_at: datetime | None
    delivery_status: str | None


_LOG = text(
    f"SELECT {_COLUMNS}, created_at, clicked_at, converted_at, delivery_status FROM nudge_sends"
    f" WHERE tenant_id = :t AND user_id = :u ORDER BY created_at DESC, send_id LIMIT :limit"
)


async def log_for(tx: TenantTx, user_id: str, limit: int) -> list[LogRow]:
    """The user's nudges, newest first."""
    n = len(_COLUMNS.split(","))
    return [LogRow(_row(r[:n]), *r[n:]) for r in await tx.execute(_LOG, {"t": tx.tenant, "u": user_id,
                                                                         "limit": limit})]  # fmt: skip


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


_DELIVERY = text(
    "UPDATE nudge_sends SET delivery_status = :status, delivery_at = :at, updated_at = now()"
    " WHERE tenant_id = :t AND send_id = :s AND status = 'sent'"
    " AND (delivery_at IS NULL OR delivery_at <= :at) AND delivery_status IS DISTINCT FROM :status RETURNING 1"
)


async def set_delivery(tx: TenantTx, send_id: uuid.UUID, status: str, at: datetime) -> bool:
    """Record what the provider reported about a sent nudge; False when it changes nothing (the same status again,
    or an older event than the one recorded)."""
    return (await tx.execute(_DELIVERY, {"t": tx.tenant, "s": send_id, "status": status, "at": at})).first() is not None


_FIRED = text("SELECT user_id FROM nudge_sends WHERE tenant_id = :t AND trigger_key = :k AND user_id = ANY(:users)")
_TRIGGER_TENANTS = text("SELECT tenant_id FROM firstmile_nudge_trigger_tenants()")
_CONTENT = text(
    "UPDATE nudge_sends SET decision = decision || jsonb_build_object('personalisation', CAST(:record AS jsonb)),"
    " updated_at = now() WHERE tenant_id = :t AND send_id = :s"
)
_CONTENT_REWRITTEN = text(
    "UPDATE nudge_sends SET decision = decision || jsonb_build_object('personalisation', CAST(:record AS jsonb)),"
    " subject = :subject, body = :body, html = NULL, updated_at = now() WHERE tenant_id = :t AND send_id = :s"
)


async def fired_users(tx: TenantTx, trigger_key: str, user_ids: Sequence[str]) -> set[str]:
    """Which of ``user_ids`` the trigger ``trigger_key`` has fired for (decided, denied or satisfied)."""
    if not user_ids:
        return set()
    return {r[0] for r in await tx.execute(_FIRED, {"t": tx.tenant, "k": trigger_key, "users": list(user_ids)})}


async def trigger_tenants(conn: AsyncConnection) -> list[uuid.UUID]:
    """Tenants whose manifest declares scanned nudge triggers (through the SECURITY DEFINER function of 0016)."""
    return [r[0] for r in await conn.execute(_TRIGGER_TENANTS)]


async def record_content(
    tx: TenantTx, send_id: uuid.UUID, record: Mapping[str, Any], rewritten: tuple[str | None, str] | None
) -> None:
    """Keep how the sent content was made (``decision.personalisation``) and, for an LLM rewrite, the text sent."""
    params: dict[str, Any] = {"t": tx.tenant, "s": send_id, "record": json.dumps(dict(record))}
    if rewritten is None:
        await tx.execute(_CONTENT, params)
    else:
        await tx.execute(_CONTENT_REWRITTEN, params | {"subject": rewritten[0], "body": rewritten[1]})


_DUE_TENANTS = text("SELECT tenant_id, due FROM firstmile_nudges_due()")


async def due_tenants(conn: AsyncConnection) -> list[tuple[uuid.UUID, int]]:
    """Tenants with sends due now (any tenant: through the SECURITY DEFINER function of migration 0013)."""
    return [(r[0], int(r[1])) for r in await conn.execute(_DUE_TENANTS)]


_DELETE_USER = {
    "nudge_sends": text("DELETE FROM nudge_sends WHERE tenant_id = :t AND user_id = :u"),
    "nudge_consents": text("DELETE FROM nudge_consents WHERE tenant_id = :t AND user_id = :u"),
    "nudge_suppressions": text("DELETE FROM nudge_suppressions WHERE tenant_id = :t AND user_id = :u"),
    "nudge_push_subscriptions": text("DELETE FROM nudge_push_subscriptions WHERE tenant_id = :t AND user_id = :u"),
}


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    return {
        table: int((await tx.execute(sql, {"t": tx.tenant, "u": user_id})).rowcount)
        for table, sql in _DELETE_USER.items()
    }


# ---- in-app messages: the in-app send is the stored message (migration 0015) ----

IN_APP_NOTIFY_CHANNEL = "firstmile_inapp"
"""The PostgreSQL ``NOTIFY`` channel of delivered in-app messages; the payload is
``{"tenant": <uuid>, "user": <user id>, "send": <uuid>}`` (no personal data, well under the 8000-byte limit)."""


@dataclass(frozen=True, slots=True)
class InAppRow:
    send_id: uuid.UUID
    user_id: str
    arm: str
    trigger_key: str
    subject: str | None
    body: str
    sent_at: datetime
    seen_at: datetime | None
    dismissed_at: datetime | None


_IN_APP_COLUMNS = "send_id, user_id, arm, trigger_key, subject, body, sent_at, seen_at, dismissed_at"
_IN_APP_SHOWN = "channel = 'in_app' AND status = 'sent' AND dismissed_at IS NULL"
_IN_APP_LIST = text(
    f"SELECT {_IN_APP_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND user_id = :u AND {_IN_APP_SHOWN}"
    f" AND (NOT :unseen OR seen_at IS NULL) ORDER BY sent_at DESC, send_id LIMIT :limit"
)
_IN_APP_BY_IDS = text(
    f"SELECT {_IN_APP_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND user_id = :u AND {_IN_APP_SHOWN}"
    f" AND seen_at IS NULL AND send_id = ANY(:ids) ORDER BY sent_at, send_id"
)
_IN_APP_GET = text(
    f"SELECT {_IN_APP_COLUMNS} FROM nudge_sends WHERE tenant_id = :t AND user_id = :u AND send_id = :s"
    f" AND channel = 'in_app' AND status = 'sent'"
)
_IN_APP_SEEN = text(
    f"UPDATE nudge_sends SET seen_at = now(), updated_at = now() WHERE tenant_id = :t AND user_id = :u"
    f" AND send_id = :s AND channel = 'in_app' AND status = 'sent' AND seen_at IS NULL RETURNING {_IN_APP_COLUMNS}"
)
_IN_APP_DISMISS = text(
    "UPDATE nudge_sends SET dismissed_at = now(), updated_at = now() WHERE tenant_id = :t AND user_id = :u"
    " AND send_id = :s AND channel = 'in_app' AND status = 'sent' AND dismissed_at IS NULL RETURNING 1"
)
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


def _in_app(r: Sequence[Any]) -> InAppRow:
    return InAppRow(*r)


async def in_app_messages(tx: TenantTx, user_id: str, limit: int, *, unseen: bool = False) -> list[InAppRow]:
    """The user's delivered in-app messages not dismissed (``unseen``: not seen either), newest first."""
    params = {"t": tx.tenant, "u": user_id, "limit": limit, "unseen": unseen}
    return [_in_app(r) for r in await tx.execute(_IN_APP_LIST, params)]


async def in_app_by_ids(tx: TenantTx, user_id: str, send_ids: Sequence[uuid.UUID]) -> list[InAppRow]:
    """Those of ``send_ids`` that are the user's delivered in-app messages, neither seen nor dismissed, oldest first."""
    params = {"t": tx.tenant, "u": user_id, "ids": list(send_ids)}
    return [_in_app(r) for r in await tx.execute(_IN_APP_BY_IDS, params)]


async def get_in_app(tx: TenantTx, user_id: str, send_id: uuid.UUID) -> InAppRow | None:
    """The user's delivered in-app message ``send_id`` (dismissed or not)."""
    row = (await tx.execute(_IN_APP_GET, {"t": tx.tenant, "u": user_id, "s": send_id})).first()
    return None if row is None else _in_app(row)


async def mark_seen(tx: TenantTx, user_id: str, send_id: uuid.UUID) -> InAppRow | None:
    """The message at the first time it is seen (None: not the user's delivered in-app message, or seen before)."""
    row = (await tx.execute(_IN_APP_SEEN, {"t": tx.tenant, "u": user_id, "s": send_id})).first()
    return None if row is None else _in_app(row)


async def mark_dismissed(tx: TenantTx, user_id: str, send_id: uuid.UUID) -> bool:
    """True the first time the message is dismissed."""
    return (await tx.execute(_IN_APP_DISMISS, {"t": tx.tenant, "u": user_id, "s": send_id})).first() is not None


async def notify_in_app(tx: TenantTx, user_id: str, send_id: uuid.UUID) -> None:
    """Tell the live listeners (:class:`~firstmile.nudges.inapp.InAppHub`) of a delivered in-app message; PostgreSQL
    delivers the notification when ``tx`` commits, and never if it rolls back."""
    payload = json.dumps({"tenant": str(tx.tenant), "user": user_id, "send": str(send_id)}, separators=(",", ":"))
    await tx.execute(_NOTIFY, {"channel": IN_APP_NOTIFY_CHANNEL, "payload": payload})


# ---- web push subscriptions (sealed under the user's key; migration 0018) ----

_ADD_PUSH = text(
    "INSERT INTO nudge_push_subscriptions (tenant_id, user_id, endpoint_hash, sealed) VALUES (:t, :u, :h, :sealed)"
    " ON CONFLICT (tenant_id, user_id, endpoint_hash) DO UPDATE SET sealed = excluded.sealed, created_at = now()"
)
_PUSH = text(
    "SELECT sealed FROM nudge_push_subscriptions WHERE tenant_id = :t AND user_id = :u"
    " ORDER BY created_at DESC, endpoint_hash LIMIT 1"
)
_DROP_PUSH = text(
    "DELETE FROM nudge_push_subscriptions WHERE tenant_id = :t AND user_id = :u AND endpoint_hash = :h RETURNING 1"
)
_UNSUPPRESS = text("DELETE FROM nudge_suppressions WHERE tenant_id = :t AND user_id = :u AND channel = :channel")


async def add_push_subscription(tx: TenantTx, user_id: str, endpoint_hash: str, sealed: str) -> None:
    """Keep a subscription (the same endpoint again replaces it, and becomes the newest); lifts a push suppression
    (a new subscription is a new address)."""
    await tx.execute(_ADD_PUSH, {"t": tx.tenant, "u": user_id, "h": endpoint_hash, "sealed": sealed})
    await tx.execute(_UNSUPPRESS, {"t": tx.tenant, "u": user_id, "channel": "push"})


async def newest_push_subscription(tx: TenantTx, user_id: str) -> str | None:
    """The sealed newest subscription of the user, or None."""
    row = (await tx.execute(_PUSH, {"t": tx.tenant, "u": user_id})).first()
    return None if row is None else str(row[0])


async def drop_push_subscription(tx: TenantTx, user_id: str, endpoint_hash: str) -> bool:
    return (await tx.execute(_DROP_PUSH, {"t": tx.tenant, "u": user_id, "h": endpoint_hash})).first() is not None
