"""Data-subject requests: erasure, export and lookup of one end user, for the API and the admin UI.

What Firstmile holds about a user is spread over slices, so this slice asks each through its
public service: the onboarding rows (profile with sealed personal data, progress,
completions), the user's key (security), the analytics rows (analytics) and the audit
entries about them (audit). The API (``/v1/users``) and the admin UI (``/admin/api/users``)
call the same :class:`PrivacyService`, so both export the same document.

No network call happens inside a transaction: the analytics store is asked first (its
timeout applies; a failed export writes nothing and is not audited), the tenant's key
provider next when personal data must be decrypted, then one transaction reads, decrypts
and audits.

Erasure destroys the user's key first (every ciphertext under it, in PostgreSQL, in outbox
and Kafka payloads, becomes unreadable at once), deletes their rows, writes a
``user.erased`` event so downstream consumers (analytics, features) forget them, and
appends an audit entry, all in one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from firstmile.analytics.service import AnalyticsService
from firstmile.audit import service as audit
from firstmile.experiments import service as experiments
from firstmile.kit.db import TenantTx
from firstmile.kit.outbox import USER_ERASED, OutboxEvent, enqueue
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges import service as nudges
from firstmile.onboarding import service as onboarding
from firstmile.security.crypto import DecryptionError, FieldContext
from firstmile.security.datakeys import DataKeyService, TenantKeys, destroy_user_key, has_user_key

ERASED = USER_ERASED
MAX_AUDIT_ENTRIES = 1000


@dataclass(frozen=True, slots=True)
class Erasure:
    user_id: str
    key_destroyed: bool
    rows_deleted: dict[str, int]
    event_id: uuid.UUID
    audit_entry_id: uuid.UUID


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class PrivacyService:
    """Erase, export and look up end users of the unit of work's tenant."""

    def __init__(self, keyring: DataKeyService, analytics: AnalyticsService) -> None:
        self.keyring = keyring
        self.analytics = analytics

    async def erase(self, uow: UnitOfWork, user_id: str, actor: str) -> Erasure | None:
        """Erase one user; None when Firstmile holds nothing about them."""
        in_analytics = await self.analytics.holds_user(uow.tenant, user_id)

        async def work(tx: TenantTx) -> Erasure | None:
            key_destroyed = await destroy_user_key(tx, user_id)
            deleted = (
                await onboarding.delete_user(tx, user_id)
                | await nudges.delete_user(tx, user_id)
                | await experiments.delete_user(tx, user_id)
            )
            if not key_destroyed and not any(deleted.values()) and not in_analytics:
                return None
            now = datetime.now(UTC)
            event = OutboxEvent.new(ERASED, {"user_id": user_id, "erased_at": now.isoformat()})
            await enqueue(tx, [event], user_id=user_id, now=now)
            entry = await audit.append(
                tx,
                "erasure",
                actor,
                user_id,
                {"key_destroyed": key_destroyed, "rows_deleted": deleted, "event_id": str(event.event_id)},
            )
            return Erasure(user_id, key_destroyed, deleted, event.event_id, entry.entry_id)

        return await uow.run(work)

    async def export(self, uow: UnitOfWork, user_id: str, actor: str) -> dict[str, Any] | None:
        """Everything held about the user, personal data decrypted; None when nothing is held."""
        events = await self.analytics.user_events(uow.tenant, user_id)  # 503 here writes nothing

        async def look(tx: TenantTx) -> tuple[onboarding.HeldUser, bool]:
            return await onboarding.held_user(tx, user_id), await has_user_key(tx, user_id)

        held, keyed = await uow.run(look)
        if held.profile is None and held.progress is None and not keyed and not events:
            return None

        async def work(tx: TenantTx, keys: TenantKeys | None) -> dict[str, Any] | None:
            return await self._document(tx, keys, user_id, actor, events)

        if held.profile is not None and held.profile[1] is not None:  # sealed personal data to decrypt
            return await self.keyring.run_with_keys(uow, work)
        return await uow.run(lambda tx: work(tx, None))

    async def _document(
        self, tx: TenantTx, keys: TenantKeys | None, user_id: str, actor: str, events: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        held = await onboarding.held_user(tx, user_id)
        keyed = await has_user_key(tx, user_id)
        if held.profile is None and held.progress is None and not keyed and not events:
            return None  # erased between the look and now
        row, progress = held.profile, held.progress
        personal: dict[str, Any] = {}
        if row is not None and row[1] is not None:
            if keys is None:
                raise RuntimeError("personal data to decrypt, but no keys were fetched")
            key = await keys.user_key(tx, user_id)
            try:
                personal = msgspec.json.decode(
                    key.decrypt(row[1], FieldContext(tx.tenant, "end_users", "pii", user_id))
                )
            except DecryptionError as exc:  # a tampered row: say so rather than export half a record
                raise RuntimeError(f"the stored personal data of {user_id!r} does not decrypt: {exc}") from exc
        entries = await audit.entries_about(tx, user_id, MAX_AUDIT_ENTRIES)
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
                    for c in held.completions
                ],
                "reviews": [
                    {
                        "id": r.id,
                        "kind": r.kind,
                        "reason": r.reason,
                        "status": r.status,
                        "path_id": r.path_key,
                        "path_version": r.path_version,
                        "step_id": r.step_id,
                        "source": r.source,
                        "occurred_at": _iso(r.occurred_at),
                        "details": r.details,
                        "note": r.note,
                        "better_path": r.better_path,
                        "decided_by": r.decided_by,
                        "decided_at": _iso(r.decided_at),
                        "created_at": _iso(r.created_at),
                    }
                    for r in held.reviews
                ],
                "overrides": [
                    {
                        "id": o.id,
                        "path_id": o.path_key,
                        "forced": o.forced,
                        "reason": o.reason,
                        "created_by": o.created_by,
                        "created_at": _iso(o.created_at),
                        "revoked_at": _iso(o.revoked_at),
                    }
                    for o in held.overrides
                ],
            },
            "personal_data_key": keyed,
            "decisions": [
                {"seq": e.seq, "kind": e.kind, "actor": e.actor, "payload": e.payload, "at": _iso(e.created_at)}
                for e in entries
            ],
            "events": events,
        }
        await audit.append(tx, "admin", actor, user_id, {"action": "users.export"})
        return document

    async def overview(self, uow: UnitOfWork, user_id: str, actor: str) -> dict[str, Any] | None:
        """What the admin UI's users page shows of one user, without their personal data (nothing is decrypted:
        the traits the manifest does not call personal, and the names of the sealed ones): the path and progress,
        the planner's decision and its reasons, the nudges and what became of them, the experiment exposures.
        Audited as a view (``users.view``); None when nothing is held."""

        async def work(tx: TenantTx) -> dict[str, Any] | None:
            held = await onboarding.held_user(tx, user_id)
            sends = await nudges.nudge_log(tx, user_id)
            exposed = await experiments.user_exposures(tx, user_id)
            if held.profile is None and held.progress is None and not sends and not exposed:
                return None
            await audit.append(tx, "admin", actor, user_id, {"action": "users.view"})
            progress = held.progress
            return {
                "user_id": user_id,
                "traits": dict(held.profile[0] or {}) if held.profile is not None else None,
                "personal_data": held.profile is not None and held.profile[1] is not None,
                "created_at": _iso(held.profile[2]) if held.profile is not None else None,
                "onboarding": None if progress is None else {
                    "path_id": progress[0], "path_version": progress[1], "status": progress[2],
                    "current_step": progress[3], "decision": progress[4], "started_at": _iso(progress[5]),
                    "activated_at": _iso(progress[6]), "completed_at": _iso(progress[7]),
                    "completions": [{"step_id": c[0], "completed_at": _iso(c[3]), "source": c[5]}
                                    for c in held.completions],
                },
                "nudges": sends,
                "exposures": [{"experiment": e, "variant": v, "exposed_at": _iso(at)} for e, v, at in exposed],
            }  # fmt: skip

        return await uow.run(work)

    async def lookup_by_email(self, uow: UnitOfWork, email: str) -> list[str]:
        """The users whose email is ``email`` (blind index: the email is never stored in clear)."""
        keys = await self.keyring.keys(uow)
        index = keys.blind_index("email", email)
        return await uow.run(lambda tx: onboarding.users_by_email_index(tx, index))
