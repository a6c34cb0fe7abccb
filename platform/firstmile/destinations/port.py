"""The port every destination adapter implements, and what it is given and answers (pure).

An adapter wraps one vendor's official client (or the webhook sender). The delivery worker hands it a
batch of :class:`OutboundEvent` of one tenant and one destination, at most :attr:`Destination.max_batch`,
oldest first (so in order per user), and gets back one :class:`Outcome` per event, in the same order:

* :class:`Delivered`: the vendor took it;
* :class:`Retry`: a transient failure (a 5xx, a timeout, a ``429``): the event and every later event of
  the same user wait until ``after_s`` (the vendor's ``Retry-After`` when it gave one; else the worker's
  backoff), so each user's events arrive in order;
* :class:`Rejected`: the vendor refused this event for good (a ``4xx`` about it): it goes to the
  destination's dead letters with ``reason``, and the user's later events go on.

An adapter never raises for a vendor's answer; an exception is treated as :class:`Retry` of the whole
batch. Redelivery is expected (at least once): every event carries :attr:`OutboundEvent.idempotency_key`,
which the adapter puts where the vendor deduplicates (Segment ``messageId``, Mixpanel ``$insert_id``,
Amplitude ``insert_id``, webhook ``webhook-id``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

EventKind = Literal["track", "identify"]


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    """One lifecycle event as destinations see it: no personal data beyond the traits the destination allows."""

    event_id: uuid.UUID
    """The platform event's id (the envelope's), unique per tenant."""
    tenant_id: uuid.UUID
    user_id: str
    kind: EventKind
    """``track`` (a lifecycle event) or ``identify`` (the user's onboarding traits)."""
    name: str
    """The event's name as destinations show it (``Onboarding Step Completed``); ``identify`` for identify."""
    occurred_at: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)
    """The event's properties (path, version, step, channel, …): never personal data."""
    traits: Mapping[str, Any] = field(default_factory=dict)
    """The user's traits the destination's ``traits`` allow-list lets through (``identify``; empty by default)."""

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of this event to any destination: the event id, hex."""
        return self.event_id.hex


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str
    after_s: float | None = None
    """The vendor's ``Retry-After`` in seconds, when it gave one."""


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


Outcome = Delivered | Retry | Rejected


@dataclass(frozen=True, slots=True)
class ErasureOutcome:
    """What a destination answered to a user's erasure: ``supported`` False when it has no deletion API."""

    supported: bool
    done: bool
    detail: str = ""


class Destination(Protocol):
    """One configured destination of one tenant (an adapter around a vendor's official client)."""

    @property
    def kind(self) -> str:
        """``segment``, ``mixpanel``, ``amplitude``, ``intercom`` or ``webhook``."""
        ...

    @property
    def max_batch(self) -> int:
        """The most events one :meth:`deliver` call takes (the vendor's batch limit, or 1)."""
        ...

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        """Send ``events`` (oldest first); one outcome per event, in the same order. Never raises for an answer."""
        ...

    async def erase(self, user_id: str) -> ErasureOutcome:
        """Ask the vendor to delete the user (``DELETE /v1/users/{id}`` forwarded); never raises for an answer."""
        ...

    async def close(self) -> None: ...


def check_outcomes(events: Sequence[OutboundEvent], outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The adapter's outcomes, or a :class:`Retry` of every event when it broke the contract (a wrong count)."""
    if len(outcomes) != len(events):
        return [Retry(f"the adapter answered {len(outcomes)} outcomes for {len(events)} events")] * len(events)
    return list(outcomes)


__all__ = [
    "Delivered",
    "Destination",
    "ErasureOutcome",
    "EventKind",
    "OutboundEvent",
    "Outcome",
    "Rejected",
    "Retry",
    "check_outcomes",
]
