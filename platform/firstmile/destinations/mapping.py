"""From the platform's lifecycle events to what destinations receive (pure: no I/O).

Each lifecycle event becomes one ``track`` :class:`~firstmile.destinations.port.OutboundEvent` with a readable
name (``onboarding.step_completed`` is "Onboarding Step Completed") and a fixed set of properties (path, version,
step, channel, …) copied from the event's payload: never a trait, never personal data. ``onboarding.started`` also
gives an ``identify`` first, carrying the user's traits that the destination's allow-list lets through (by
default every trait the start stored in clear, which holds no personal data; personal traits only when listed).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from firstmile.destinations.port import OutboundEvent
from firstmile.security.personal_data import BUILTIN_PII_TRAITS, canonical_name
from firstmile.tenancy.manifest import LIFECYCLE_EVENTS, DestinationSpec

TRACK_NAMES: dict[str, str] = {
    "onboarding.started": "Onboarding Started",
    "onboarding.step_completed": "Onboarding Step Completed",
    "onboarding.activated": "Onboarding Activated",
    "onboarding.completed": "Onboarding Completed",
    "onboarding.stuck": "Onboarding Stuck",
    "nudge.sent": "Nudge Sent",
    "nudge.opened": "Nudge Opened",
    "nudge.clicked": "Nudge Clicked",
    "nudge.converted": "Nudge Converted",
    "nudge.unsubscribed": "Nudge Unsubscribed",
    "experiment.exposed": "Experiment Exposed",
    "onboarding.review_created": "Onboarding Review Created",
    "onboarding.review_decided": "Onboarding Review Decided",
    "onboarding.path_changed": "Onboarding Path Changed",
}
"""The ``track`` name each lifecycle event has at a destination."""
assert set(TRACK_NAMES) == set(LIFECYCLE_EVENTS)
EVENT_TYPES: dict[str, str] = {name: kind for kind, name in TRACK_NAMES.items()}
"""The lifecycle event type of a ``track`` name (the webhook's ``type``)."""
IDENTIFY = "identify"
IDENTIFY_TYPE = "user.identified"
"""The webhook ``type`` of an ``identify``."""
TEST_EVENT = "Destination Test"
"""The ``track`` name of the event ``firstmile destinations test`` sends."""

_NUDGE = ("send_id", "channel", "arm", "trigger")
_REVIEW = ("review_id", "kind", "reason", "status", "path_id", "path_version", "step_id")
PROPERTIES: dict[str, tuple[str, ...]] = {
    "onboarding.started": ("path_id", "path_version", "current_step"),
    "onboarding.step_completed": ("path_id", "path_version", "step_id", "current_step", "source"),
    "onboarding.activated": ("path_id", "path_version", "step_id"),
    "onboarding.completed": ("path_id", "path_version"),
    "onboarding.stuck": ("path_id", "step_id", "detected_by", "hours_since_last_activity"),
    "nudge.sent": (*_NUDGE, "provider"),
    "nudge.opened": _NUDGE,
    "nudge.clicked": _NUDGE,
    "nudge.converted": (*_NUDGE, "step_id"),
    "nudge.unsubscribed": (*_NUDGE, "category"),
    "experiment.exposed": ("experiment_id", "variant", "kind"),
    "onboarding.review_created": _REVIEW,
    "onboarding.review_decided": (*_REVIEW, "better_path"),
    "onboarding.path_changed": ("path_id", "path_version", "current_step"),
}
"""The payload fields each event's ``track`` carries as properties (none holds personal data). A review's
``note`` and ``decided_by`` never leave, not even to a webhook: the note is a reviewer's free text and the reviewer
a person's account, either may name someone; the tenant reads both with ``GET /v1/reviews/{review_id}``."""
OWN_TIME = frozenset({"onboarding.review_created", "onboarding.review_decided"})
"""Events whose payload ``occurred_at`` is another moment's (the reviewed completion's): their time is the event's."""
assert set(PROPERTIES) == set(LIFECYCLE_EVENTS)


def webhook_type(event: OutboundEvent) -> str:
    """The Standard Webhooks ``type`` of an event: its lifecycle event type, ``user.identified`` for an identify."""
    if event.kind == "identify":
        return IDENTIFY_TYPE
    return EVENT_TYPES.get(event.name, "destination.test" if event.name == TEST_EVENT else "onboarding.event")


def properties_of(event_type: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The properties of a lifecycle event's ``track``: the listed fields the payload has, scalars only."""
    found: dict[str, Any] = {}
    for name in PROPERTIES.get(event_type, ()):
        value = payload.get(name)
        if isinstance(value, str | int | float | bool):
            found[name] = value
    if event_type in ("onboarding.started", "onboarding.path_changed"):
        decision = payload.get("decision")
        if isinstance(decision, Mapping) and isinstance(decision.get("selected_by"), str):
            found["selected_by"] = decision["selected_by"]
    previous = payload.get("previous")
    if event_type == "onboarding.path_changed" and isinstance(previous, Mapping):
        for name in ("path_id", "path_version"):
            if isinstance(previous.get(name), str | int):
                found[f"previous_{name}"] = previous[name]
    return found


def occurred_at(payload: Mapping[str, Any], fallback: datetime) -> datetime:
    """The event's own time (``occurred_at`` in the payload, as a completion carries it), else ``fallback``."""
    value = payload.get("occurred_at")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return fallback
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    return fallback


def is_personal(trait: str, pii_traits: Iterable[str]) -> bool:
    """Whether a trait is personal data (the built-in ones, or one of the manifest's ``pii_traits``)."""
    name = canonical_name(trait)
    return name in BUILTIN_PII_TRAITS or name in {canonical_name(t) for t in pii_traits}


def allowed_traits(spec: DestinationSpec, plain: Mapping[str, Any], pii_traits: Iterable[str]) -> dict[str, Any]:
    """The traits stored in clear that ``spec`` lets through: its allow-list, or (none given) all of them; never one
    that is personal data here (personal traits an allow-list names are read from the sealed profile, and queued
    sealed: :mod:`firstmile.destinations.consumer`)."""
    pii = tuple(pii_traits)
    wanted = set(spec.traits) if spec.traits is not None else None
    return {k: v for k, v in plain.items() if (wanted is None or k in wanted) and not is_personal(k, pii)}


def personal_wanted(spec: DestinationSpec, pii_traits: Iterable[str]) -> tuple[str, ...]:
    """The personal traits ``spec``'s allow-list names explicitly (none when it has no allow-list)."""
    pii = tuple(pii_traits)
    return tuple(t for t in spec.traits or () if is_personal(t, pii))


def identify_id(event_id: uuid.UUID) -> uuid.UUID:
    """The id of the ``identify`` made from a start event: stable, so a redelivered start queues it once."""
    return uuid.uuid5(event_id, IDENTIFY)


def outbound(
    spec: DestinationSpec,
    tenant_id: uuid.UUID,
    event_id: uuid.UUID,
    event_type: str,
    payload: Mapping[str, Any],
    at: datetime,
    *,
    pii_traits: Iterable[str] = (),
) -> list[OutboundEvent]:
    """What ``spec`` receives for one lifecycle event (empty when it does not take that event): the ``identify``
    first for a start, then the ``track``."""
    if event_type not in TRACK_NAMES or not spec.receives(event_type):
        return []
    user_id = payload.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        return []
    when = at if event_type in OWN_TIME else occurred_at(payload, at)
    found: list[OutboundEvent] = []
    if event_type == "onboarding.started":
        plain = payload.get("traits")
        traits = allowed_traits(spec, plain if isinstance(plain, Mapping) else {}, pii_traits)
        found.append(OutboundEvent(identify_id(event_id), tenant_id, user_id, "identify", IDENTIFY, when, {}, traits))
    found.append(
        OutboundEvent(
            event_id, tenant_id, user_id, "track", TRACK_NAMES[event_type], when, properties_of(event_type, payload)
        )
    )
    return found


def probe_event(tenant_id: uuid.UUID, now: datetime) -> OutboundEvent:
    """The one event ``firstmile destinations test`` sends (a made-up user, no personal data)."""
    return OutboundEvent(
        uuid.uuid4(), tenant_id, "firstmile-destination-test", "track", TEST_EVENT, now, {"test": True}
    )


__all__ = [
    "EVENT_TYPES",
    "IDENTIFY",
    "OWN_TIME",
    "PROPERTIES",
    "TEST_EVENT",
    "TRACK_NAMES",
    "allowed_traits",
    "identify_id",
    "is_personal",
    "outbound",
    "personal_wanted",
    "probe_event",
    "properties_of",
    "webhook_type",
]
