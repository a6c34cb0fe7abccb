"""All SQL of the onboarding slice.

The hot paths are single data-modifying CTEs so a start or a completion costs
one round trip after the tenant is set: the user, their progress and the outbox
events are written together or not at all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, Text, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import TenantId
from firstmile.onboarding.models import onboarding_paths


@dataclass(frozen=True, slots=True)
class ProgressRow:
    path_key: str
    path_version: int
    status: str
    current_step: str | None
    decision: dict[str, Any]
    started_at: datetime
    activated_at: datetime | None
    completed_at: datetime | None
    completions: dict[str, datetime]


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    event_type: str
    payload: dict[str, Any]
    event_id: uuid.UUID

    def as_json(self) -> dict[str, Any]:
        return {"event_id": str(self.event_id), "event_type": self.event_type, "payload": self.payload}


_OUTBOX_FROM = (
    "INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at) "
    "SELECT e.event_id, :tid, e.event_type, :pkey, e.payload, :now "
    "FROM jsonb_to_recordset(:events) AS e(event_id uuid, event_type text, payload jsonb)"
)

_START = text(
    "WITH u AS ("
    " INSERT INTO end_users (tenant_id, user_id, traits, pii, email_index, created_at, updated_at)"
    " VALUES (:tid, :uid, :traits, :pii, :email_index, :now, :now)"
    " ON CONFLICT (tenant_id, user_id) DO NOTHING RETURNING 1"
    "), p AS ("
    " INSERT INTO user_progress (tenant_id, user_id, path_key, path_version, status, current_step,"
    "  decision, started_at, updated_at)"
    " VALUES (:tid, :uid, :path_key, :path_version, 'in_progress', :current_step, :decision, :now, :now)"
    " ON CONFLICT (tenant_id, user_id) DO NOTHING RETURNING 1"
    "), o AS (" + _OUTBOX_FROM + " WHERE EXISTS (SELECT 1 FROM p) RETURNING 1"
    ") SELECT (SELECT count(*) FROM p), (SELECT count(*) FROM u)"
).bindparams(
    bindparam("traits", type_=JSONB),
    bindparam("decision", type_=JSONB),
    bindparam("events", type_=JSONB),
    bindparam("pii", type_=Text),
    bindparam("email_index", type_=LargeBinary),
)

_GET = text(
    "SELECT p.path_key, p.path_version, p.status, p.current_step, p.decision, p.started_at,"
    " p.activated_at, p.completed_at,"
    " coalesce((SELECT jsonb_object_agg(c.step_id, c.completed_at) FROM step_completions c"
    "   WHERE c.tenant_id = p.tenant_id AND c.user_id = p.user_id), '{}'::jsonb)"
    " FROM user_progress p WHERE p.tenant_id = :tid AND p.user_id = :uid"
)
_GET_FOR_UPDATE = text(_GET.text + " FOR UPDATE OF p")

_COMPLETE = text(
    "WITH c AS ("
    " INSERT INTO step_completions (tenant_id, user_id, step_id, path_key, path_version,"
    "  completed_at, occurred_at, source)"
    " VALUES (:tid, :uid, :step_id, :path_key, :path_version, :now, :occurred_at, :source)"
    " ON CONFLICT (tenant_id, user_id, step_id) DO NOTHING RETURNING 1"
    "), u AS ("
    " UPDATE user_progress SET current_step = :current_step, status = :status,"
    "  activated_at = coalesce(activated_at, :activated_at), completed_at = :completed_at, updated_at = :now"
    " WHERE tenant_id = :tid AND user_id = :uid AND EXISTS (SELECT 1 FROM c) RETURNING 1"
    "), o AS (" + _OUTBOX_FROM + " WHERE EXISTS (SELECT 1 FROM c) RETURNING 1"
    ") SELECT count(*) FROM c"
).bindparams(bindparam("events", type_=JSONB))


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def insert_start(
    conn: AsyncConnection,
    tenant_id: TenantId,
    user_id: str,
    traits: dict[str, Any],
    path_key: str,
    path_version: int,
    current_step: str | None,
    decision: dict[str, Any],
    now: datetime,
    events: list[OutboxEvent],
    pii: str | None = None,
    email_index: bytes | None = None,
) -> bool:
    """Create the user, their progress and the outbox events; False when the user already had a path.

    ``traits`` must hold no personal data: that goes encrypted in ``pii``.
    """
    row = (
        await conn.execute(
            _START,
            {
                "tid": tenant_id,
                "uid": user_id,
                "traits": traits,
                "pii": pii,
                "email_index": email_index,
                "path_key": path_key,
                "path_version": path_version,
                "current_step": current_step,
                "decision": decision,
                "now": now,
                "pkey": f"{tenant_id}:{user_id}",
                "events": [e.as_json() for e in events],
            },
        )
    ).one()
    return bool(row[0])


async def get_progress(
    conn: AsyncConnection, tenant_id: TenantId, user_id: str, *, for_update: bool = False
) -> ProgressRow | None:
    row = (await conn.execute(_GET_FOR_UPDATE if for_update else _GET, {"tid": tenant_id, "uid": user_id})).first()
    if row is None:
        return None
    completions = {k: _parse_ts(v) for k, v in row[8].items()}
    return ProgressRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], completions)


async def insert_completion(
    conn: AsyncConnection,
    tenant_id: TenantId,
    user_id: str,
    step_id: str,
    path_key: str,
    path_version: int,
    now: datetime,
    occurred_at: datetime,
    source: str,
    current_step: str | None,
    status: str,
    activated_at: datetime | None,
    completed_at: datetime | None,
    events: list[OutboxEvent],
) -> bool:
    """Record one completion, update progress, write events; False if it was already recorded."""
    row = (
        await conn.execute(
            _COMPLETE,
            {
                "tid": tenant_id,
                "uid": user_id,
                "step_id": step_id,
                "path_key": path_key,
                "path_version": path_version,
                "now": now,
                "occurred_at": occurred_at,
                "source": source,
                "current_step": current_step,
                "status": status,
                "activated_at": activated_at,
                "completed_at": completed_at,
                "pkey": f"{tenant_id}:{user_id}",
                "events": [e.as_json() for e in events],
            },
        )
    ).one()
    return bool(row[0])


# ---- path versions (written by `tenants apply` through firstmile.onboarding.paths) ----


async def current_path_hashes(conn: AsyncConnection, tenant_id: TenantId) -> dict[str, tuple[int, str]]:
    """``{path_key: (version, content_hash)}`` of the tenant's current paths."""
    rows = await conn.execute(
        select(onboarding_paths.c.path_key, onboarding_paths.c.version, onboarding_paths.c.content_hash).where(
            onboarding_paths.c.tenant_id == tenant_id, onboarding_paths.c.is_current
        )
    )
    return {r[0]: (r[1], r[2]) for r in rows}


async def latest_versions(conn: AsyncConnection, tenant_id: TenantId) -> dict[str, int]:
    rows = await conn.execute(
        select(onboarding_paths.c.path_key, func.max(onboarding_paths.c.version))
        .where(onboarding_paths.c.tenant_id == tenant_id)
        .group_by(onboarding_paths.c.path_key)
    )
    return {r[0]: r[1] for r in rows}


async def insert_path_version(
    conn: AsyncConnection, tenant_id: TenantId, key: str, version: int, definition: dict[str, Any], content_hash: str
) -> None:
    await conn.execute(
        insert(onboarding_paths).values(
            tenant_id=tenant_id,
            path_key=key,
            version=version,
            definition=definition,
            content_hash=content_hash,
            is_current=True,
        )
    )


async def retire_path(conn: AsyncConnection, tenant_id: TenantId, key: str) -> None:
    await conn.execute(
        update(onboarding_paths)
        .where(
            onboarding_paths.c.tenant_id == tenant_id, onboarding_paths.c.path_key == key, onboarding_paths.c.is_current
        )
        .values(is_current=False)
    )


async def current_path_definitions(conn: AsyncConnection, tenant_id: TenantId) -> list[tuple[str, int, dict[str, Any]]]:
    """``(path_key, version, definition)`` of the tenant's current paths."""
    rows = await conn.execute(
        select(onboarding_paths.c.path_key, onboarding_paths.c.version, onboarding_paths.c.definition).where(
            onboarding_paths.c.tenant_id == tenant_id, onboarding_paths.c.is_current
        )
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def path_definition(conn: AsyncConnection, tenant_id: TenantId, key: str, version: int) -> dict[str, Any]:
    """One stored path version's definition (versions are immutable)."""
    row = (
        await conn.execute(
            select(onboarding_paths.c.definition).where(
                onboarding_paths.c.tenant_id == tenant_id,
                onboarding_paths.c.path_key == key,
                onboarding_paths.c.version == version,
            )
        )
    ).one()
    definition: dict[str, Any] = row[0]
    return definition
