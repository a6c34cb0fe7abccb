"""Erasure, export and lookup of one end user, inside the caller's tenant transaction.

Erasure destroys the user's key first (every ciphertext under it, in PostgreSQL,
in outbox and Kafka payloads, becomes unreadable at once), deletes their rows,
writes a ``user.erased`` event so downstream consumers (analytics, features)
forget them, and appends an audit entry, all in one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.audit import service as audit
from firstmile.audit.repository import EntryFilter, list_entries
from firstmile.kit.db import TenantId
from firstmile.security.crypto import DecryptionError, FieldContext
from firstmile.security.datakeys import DataKeyService

ERASED = "user.erased"

_USER = text("SELECT traits, pii, created_at, updated_at FROM end_users WHERE tenant_id = :t AND user_id = :u")
_PROGRESS = text(
    "SELECT path_key, path_version, status, current_step, decision, started_at, activated_at, completed_at"
    " FROM user_progress WHERE tenant_id = :t AND user_id = :u"
)
_COMPLETIONS = text(
    "SELECT step_id, path_key, path_version, completed_at, occurred_at, source FROM step_completions"
    " WHERE tenant_id = :t AND user_id = :u ORDER BY completed_at"
)
_COUNT = text(
    "SELECT (SELECT count(*) FROM end_users WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM user_progress WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM step_completions WHERE tenant_id = :t AND user_id = :u)"
)
_DELETE = text("DELETE FROM end_users WHERE tenant_id = :t AND user_id = :u")  # progress and completions cascade
_EVENT = text(
    "INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at)"
    " VALUES (:e, :t, :type, :k, :p, :now)"
).bindparams(bindparam("p", type_=JSONB))
_BY_EMAIL = text("SELECT user_id FROM end_users WHERE tenant_id = :t AND email_index = :i ORDER BY user_id")


@dataclass(frozen=True, slots=True)
class Erasure:
    user_id: str
    key_destroyed: bool
    rows_deleted: dict[str, int]
    event_id: uuid.UUID
    audit_seq: int


async def erase(
    conn: AsyncConnection, keyring: DataKeyService, tenant_id: TenantId, user_id: str, actor: str
) -> Erasure | None:
    """Erase one user; None when Firstmile holds nothing about them."""
    counts = (await conn.execute(_COUNT, {"t": tenant_id, "u": user_id})).one()
    key_destroyed = await keyring.destroy_user_key(conn, tenant_id, user_id)
    if not key_destroyed and not any(counts):
        return None
    await conn.execute(_DELETE, {"t": tenant_id, "u": user_id})
    now = datetime.now(UTC)
    event_id = uuid.uuid4()
    await conn.execute(
        _EVENT,
        {
            "e": event_id,
            "t": tenant_id,
            "type": ERASED,
            "k": f"{tenant_id}:{user_id}",
            "p": {"user_id": user_id, "erased_at": now.isoformat()},
            "now": now,
        },
    )
    deleted = {"end_users": int(counts[0]), "user_progress": int(counts[1]), "step_completions": int(counts[2])}
    entry = await audit.append(
        conn,
        tenant_id,
        "erasure",
        actor,
        user_id,
        {"key_destroyed": key_destroyed, "rows_deleted": deleted, "event_id": str(event_id)},
    )
    return Erasure(user_id, key_destroyed, deleted, event_id, entry.seq)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def export(
    conn: AsyncConnection, keyring: DataKeyService, tenant_id: TenantId, user_id: str, actor: str
) -> dict[str, Any] | None:
    """Everything PostgreSQL holds about the user, personal data decrypted; None when nothing."""
    row = (await conn.execute(_USER, {"t": tenant_id, "u": user_id})).first()
    progress = (await conn.execute(_PROGRESS, {"t": tenant_id, "u": user_id})).first()
    completions = (await conn.execute(_COMPLETIONS, {"t": tenant_id, "u": user_id})).all()
    if row is None and progress is None:
        return None
    personal: dict[str, Any] = {}
    if row is not None and row[1] is not None:
        key = await keyring.user_key(conn, tenant_id, user_id)
        try:
            personal = msgspec.json.decode(key.decrypt(row[1], FieldContext(tenant_id, "end_users", "pii", user_id)))
        except DecryptionError as exc:  # a tampered row: say so rather than export half a record
            raise RuntimeError(f"the stored personal data of {user_id!r} does not decrypt: {exc}") from exc
    entries = await list_entries(conn, tenant_id, EntryFilter(subject=user_id), 1000)
    document: dict[str, Any] = {
        "user_id": user_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "profile": None
        if row is None
        else {"traits": row[0], "personal": personal, "created_at": _iso(row[2]), "updated_at": _iso(row[3])},
        "onboarding": None
        if progress is None
        else {
            "path_id": progress[0],
            "path_version": progress[1],
            "status": progress[2],
            "current_step": progress[3],
            "decision": progress[4],
            "started_at": _iso(progress[5]),
            "activated_at": _iso(progress[6]),
            "completed_at": _iso(progress[7]),
            "completions": [
                {
                    "step_id": c[0],
                    "path_id": c[1],
                    "path_version": c[2],
                    "completed_at": _iso(c[3]),
                    "occurred_at": _iso(c[4]),
                    "source": c[5],
                }
                for c in completions
            ],
        },
        "decisions": [
            {"seq": e.seq, "kind": e.kind, "actor": e.actor, "payload": e.payload, "at": _iso(e.created_at)}
            for e in entries
        ],
    }
    await audit.append(conn, tenant_id, "admin", actor, user_id, {"action": "users.export"})
    return document


async def lookup_by_email(conn: AsyncConnection, keyring: DataKeyService, tenant_id: TenantId, email: str) -> list[str]:
    index = await keyring.blind_index(conn, tenant_id, "email", email)
    return [r[0] for r in await conn.execute(_BY_EMAIL, {"t": tenant_id, "i": index})]
