"""Keycloak login events of the tenant realms, carried into the audit log.

Keycloak refuses bad SAML responses and failed logins itself, before Firstmile sees
anything; the realm records them as events (provisioning turns events on with
:data:`REALM_EVENT_TYPES`), and this module copies the failures into the tenant's
audit log.

:class:`KeycloakEventSync` walks every managed tenant realm (marked ``firstmile.managed``
by :mod:`firstmile.sso.provisioning`), resolves its tenant with
``firstmile_resolve_tenant`` (the app role sees no other tenant's row), reads the
events newer than the tenant's cursor in ``sso_event_cursors`` and, in one tenant
transaction, appends one ``sso.login_failed`` audit entry per failure event (a type
ending in ``_ERROR``) and moves the cursor on. Keycloak's event times are milliseconds
and not unique, so the cursor keeps the newest time *and* the ids already copied at
that time; the next round asks Keycloak from that millisecond on (``dateFrom`` is
inclusive) and skips those ids. Copying twice therefore writes nothing twice.

What goes into the audit entry is chosen, not copied: the event type, Keycloak's
error and reason, the identity provider alias, the client, the user id, the event
id and time. Never the IP address or the details' username/email: the audit log is
immutable and must not become a store of personal data the erasure flow cannot reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import Text

from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from keycloak import KeycloakAdmin

log = logging.getLogger(__name__)

REALM_EVENT_TYPES: tuple[str, ...] = (
    "LOGIN",
    "LOGIN_ERROR",
    "LOGOUT",
    "LOGOUT_ERROR",
    "CODE_TO_TOKEN",
    "CODE_TO_TOKEN_ERROR",
    "IDENTITY_PROVIDER_LOGIN",
    "IDENTITY_PROVIDER_LOGIN_ERROR",
    "IDENTITY_PROVIDER_FIRST_LOGIN",
    "IDENTITY_PROVIDER_FIRST_LOGIN_ERROR",
    "IDENTITY_PROVIDER_POST_LOGIN",
    "IDENTITY_PROVIDER_POST_LOGIN_ERROR",
    "IDENTITY_PROVIDER_RESPONSE",
    "IDENTITY_PROVIDER_RESPONSE_ERROR",
    "IDENTITY_PROVIDER_LINK_ACCOUNT_ERROR",
)
"""The event types a tenant realm saves (Keycloak keeps them ``REALM_EVENTS_EXPIRATION`` seconds)."""

REALM_EVENTS_EXPIRATION = 7 * 24 * 3600

LOGIN_FAILED = "sso.login_failed"
"""Audit kind of a copied failure event."""

PAGE_SIZE = 200

_ENSURE_CURSOR = text(
    "INSERT INTO sso_event_cursors (tenant_id, realm, last_event_time) VALUES (:tid, :realm, 0)"
    " ON CONFLICT (tenant_id, realm) DO NOTHING"
)
# the row lock serialises two processes syncing the same realm: the second sees the first's cursor
_LOCK_CURSOR = text(
    "SELECT last_event_time, last_event_ids FROM sso_event_cursors WHERE tenant_id = :tid AND realm = :realm FOR UPDATE"
)
_READ_CURSOR = text("SELECT last_event_time FROM sso_event_cursors WHERE tenant_id = :tid AND realm = :realm")
_MOVE_CURSOR = text(
    "UPDATE sso_event_cursors SET last_event_time = :time, last_event_ids = :ids, updated_at = now()"
    " WHERE tenant_id = :tid AND realm = :realm"
).bindparams(bindparam("ids", type_=ARRAY(Text)))


class EventSyncError(RuntimeError):
    """Keycloak could not be asked which realms exist (the whole round is skipped)."""


def is_failure(event: dict[str, Any]) -> bool:
    """A failed login, broker response, code exchange… (Keycloak's ``*_ERROR`` types)."""
    return str(event.get("type", "")).endswith("_ERROR")


def audit_payload(event: dict[str, Any]) -> dict[str, Any]:
    """The audit payload of a failure event: the chosen fields only (no IP address, username or email)."""
    details = event.get("details") or {}
    millis = int(event.get("time") or 0)
    return {
        "keycloak_event_type": str(event.get("type", "")),
        "keycloak_event_id": str(event.get("id", "")),
        "error": event.get("error"),
        "reason": details.get("reason"),
        "identity_provider": details.get("identity_provider"),
        "client_id": event.get("clientId"),
        "user_id": event.get("userId"),
        "time": datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds"),
    }


def audit_subject(event: dict[str, Any], realm: str) -> str:
    """Who the failure was about: the identity provider if Keycloak named it, else the user, else the realm.

    Keycloak does not name the provider on ``IDENTITY_PROVIDER_RESPONSE_ERROR`` (a refused SAML
    response): those entries fall back to the user (none yet) and then the realm.
    """
    details = event.get("details") or {}
    if details.get("identity_provider"):
        return f"idp:{details['identity_provider']}"
    if event.get("userId"):
        return f"user:{event['userId']}"
    return f"realm:{realm}"


@dataclass(frozen=True, slots=True)
class EventCursor:
    """How far a realm's events were copied: the newest event time (ms) and the ids copied at that time."""

    time: int
    ids: frozenset[str]

    def is_new(self, event: dict[str, Any]) -> bool:
        at = int(event.get("time") or 0)
        return at > self.time or (at == self.time and str(event.get("id")) not in self.ids)

    def after(self, events: Sequence[dict[str, Any]]) -> EventCursor:
        """The cursor once ``events`` (new ones, any order) are copied."""
        if not events:
            return self
        newest = max(int(e.get("time") or 0) for e in events)
        at_newest = {str(e.get("id")) for e in events if int(e.get("time") or 0) == newest}
        return EventCursor(newest, (self.ids | at_newest) if newest == self.time else frozenset(at_newest))


class KeycloakEventSync:
    """Copies the failure events of every managed tenant realm into that tenant's audit log.

    Run :meth:`run` as a background task (every ``FIRSTMILE_SSO_EVENT_SYNC_SECONDS``) or
    :meth:`run_once` from ``firstmile sso sync-events``. python-keycloak is blocking: its
    calls run in a worker thread. A realm whose events cannot be read is skipped for the
    round and retried at the next one; nothing is lost while Keycloak keeps its events.
    """

    def __init__(
        self,
        admin: KeycloakAdmin,
        engine: AsyncEngine,
        *,
        realm_prefix: str = "firstmile-",
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.admin = admin
        self.engine = engine
        self.realm_prefix = realm_prefix
        self.page_size = page_size

    def _managed_realms(self) -> dict[str, str]:
        from firstmile.sso.provisioning import MANAGED_ATTRIBUTE, TENANT_ATTRIBUTE

        found: dict[str, str] = {}
        for realm in self.admin.get_realms():
            name = str(realm.get("realm", ""))
            attributes = realm.get("attributes") or {}
            if name.startswith(self.realm_prefix) and attributes.get(MANAGED_ATTRIBUTE) == "true":
                found[name] = str(attributes.get(TENANT_ATTRIBUTE) or name[len(self.realm_prefix) :])
        return found

    def _events_since(self, realm: str, since: int) -> list[dict[str, Any]]:
        """The realm's events from ``since`` (ms, inclusive) on, oldest first, all pages."""
        events: list[dict[str, Any]] = []
        while True:
            response = self.admin.connection.raw_get(
                f"admin/realms/{realm}/events",
                dateFrom=str(since),
                direction="asc",
                first=str(len(events)),
                max=str(self.page_size),
            )
            if response.status_code != 200:
                raise EventSyncError(f"{realm}: keycloak answered HTTP {response.status_code} for its events")
            page = response.json()
            if not isinstance(page, list):
                raise EventSyncError(f"{realm}: keycloak's events are not a list")
            events.extend(page)
            if len(page) < self.page_size:
                return events

    # -- the sync ----------------------------------------------------------------------------

    async def run_once(self) -> int:
        """One round over every managed realm; returns how many audit entries were written."""
        try:
            realms = await asyncio.to_thread(self._managed_realms)
        except Exception as exc:  # KeycloakError, connection errors: the caller retries next round
            raise EventSyncError(f"keycloak: cannot list the realms: {exc}") from exc
        written = 0
        for realm, slug in sorted(realms.items()):
            try:
                written += await self.sync_realm(realm, slug)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sso event sync failed", extra={"fields": {"realm": realm}})
        return written

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Sync every ``interval_s`` until ``stop`` is set; failures are logged, never raised."""
        while not stop.is_set():
            try:
                written = await self.run_once()
                if written:
                    log.info("sso failures audited", extra={"fields": {"count": written}})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sso event sync skipped: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    context = OperatorContext("worker:sso-event-sync")

    async def _tenant(self, slug: str) -> TenantId | None:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            found = await tenancy.resolve_tenant(conn, slug)
        return self.context.tenant(found.tenant_id) if found is not None else None

    async def sync_realm(self, realm: str, slug: str) -> int:
        """Copy one realm's new failure events into its tenant's audit log; entries written."""
        tenant_id = await self._tenant(slug)
        if tenant_id is None:
            log.debug("realm without a tenant here", extra={"fields": {"realm": realm}})
            return 0

        uow = UnitOfWork(self.engine, tenant_id)

        async def since(tx: TenantTx) -> int:
            row = (await tx.execute(_READ_CURSOR, {"tid": tenant_id, "realm": realm})).first()
            return int(row[0]) if row is not None else 0

        start = await uow.run(since)
        events = await asyncio.to_thread(self._events_since, realm, start)
        if not events:
            return 0

        async def copy(tx: TenantTx) -> int:
            await tx.execute(_ENSURE_CURSOR, {"tid": tenant_id, "realm": realm})
            row = (await tx.execute(_LOCK_CURSOR, {"tid": tenant_id, "realm": realm})).one()
            cursor = EventCursor(int(row[0]), frozenset(row[1] or ()))
            new = [e for e in events if cursor.is_new(e)]
            new.sort(key=lambda e: (int(e.get("time") or 0), str(e.get("id"))))
            count = 0
            for event in new:
                if is_failure(event):
                    await audit.append(
                        tx,
                        LOGIN_FAILED,
                        f"keycloak:{realm}",
                        audit_subject(event, realm),
                        audit_payload(event),
                    )
                    count += 1
            moved = cursor.after(new)
            if moved != cursor:
                await tx.execute(
                    _MOVE_CURSOR, {"tid": tenant_id, "realm": realm, "time": moved.time, "ids": sorted(moved.ids)}
                )
            return count

        return await uow.run(copy)
