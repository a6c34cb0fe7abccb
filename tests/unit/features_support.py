"""Event builders for the online feature tests: envelopes as the relay delivers them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from firstmile.events.envelope import Envelope

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def segment(tenant: uuid.UUID, user: str, kind: str, minutes: float, **fields: Any) -> Envelope:
    """A Segment ``track``/``page``/``identify`` event at ``T0 + minutes``."""
    when = at(minutes)
    payload: dict[str, Any] = {
        "type": kind,
        "messageId": uuid.uuid4().hex,
        "userId": user,
        "anonymousId": None,
        "timestamp": when.isoformat(),
        "receivedAt": when.isoformat(),
        "context": {},
    }
    if kind == "track":
        payload |= {"event": fields.pop("event", "Clicked"), "properties": fields.pop("properties", {})}
    elif kind == "page":
        payload |= {"name": fields.pop("name", "Home"), "properties": {}}
    else:
        payload |= {"traits": fields.pop("traits", {})}
    payload |= fields
    return Envelope(uuid.uuid4(), tenant, kind, when, payload, f"{tenant}:{user}")


def track(tenant: uuid.UUID, user: str, minutes: float, **fields: Any) -> Envelope:
    return segment(tenant, user, "track", minutes, **fields)


def onboarding(
    tenant: uuid.UUID, user: str, kind: str, minutes: float, *, written: float | None = None, **payload: Any
) -> Envelope:
    """An ``onboarding.*`` event that happened at ``minutes`` and was written to the outbox at ``written``."""
    body: dict[str, Any] = {"user_id": user, "path_id": "generic", "path_version": 1} | payload
    if kind != "onboarding.started":
        body.setdefault("occurred_at", at(minutes).isoformat())
    return Envelope(uuid.uuid4(), tenant, kind, at(minutes if written is None else written), body, f"{tenant}:{user}")


def step(tenant: uuid.UUID, user: str, step_id: str, minutes: float, *, source: str = "api") -> Envelope:
    return onboarding(tenant, user, "onboarding.step_completed", minutes, step_id=step_id, source=source)


def erased(tenant: uuid.UUID, user: str, minutes: float) -> Envelope:
    when = at(minutes)
    payload = {"user_id": user, "erased_at": when.isoformat()}
    return Envelope(uuid.uuid4(), tenant, "user.erased", when, payload, f"{tenant}:{user}")
