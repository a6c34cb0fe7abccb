"""The analytics sink: the event-stream consumer that fills the analytics store.

Idempotent by event id without a lookup: a redelivered event is written again, the
table (``ReplacingMergeTree``) folds the copies at its next merge, and every query
counts an event once meanwhile. The store's ``insert`` also folds exposures and outcomes
into ``experiment_users`` (:mod:`firstmile.analytics.experiment_users`), idempotently, and
relies on the order the stream keeps per user (an exposure before that user's later
outcomes). A ``user.erased`` event removes the user's rows, from both tables.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC
from typing import Any, Protocol

import msgspec

from firstmile.analytics.rows import EXPOSED, NUDGE_PROPERTIES, AnalyticsEvent
from firstmile.events.bus import DeadLetter, UnprocessableEventError, parse_timestamp
from firstmile.events.envelope import Envelope
from firstmile.kit.outbox import USER_ERASED

_json = msgspec.json.Encoder()
_ts = parse_timestamp


SEGMENT_TYPES = ("track", "page", "screen", "identify", "group", "alias")
"""The Segment Spec's calls ingestion stores (docs/events.md)."""


def _segment_name(kind: str, p: dict[str, Any]) -> str:
    """``event`` of a track, ``name`` of a page or screen; the other calls have none."""
    if kind == "track":
        return str(p.get("event") or "")
    return str(p.get("name") or "") if kind in ("page", "screen") else ""


def _segment_properties(kind: str, p: dict[str, Any]) -> dict[str, Any]:
    """What the analytics row keeps as properties: an identify's traits, a group's traits and ``groupId``, an
    alias's ``previousId``, the properties of the others."""
    if kind == "identify":
        return dict(p.get("traits") or {})
    if kind == "group":
        return {**(p.get("traits") or {}), "groupId": p.get("groupId")}
    if kind == "alias":
        return {"previousId": p.get("previousId")}
    return dict(p.get("properties") or {})


def to_analytics(event: Envelope) -> AnalyticsEvent:
    """The analytics row of one event; :class:`UnprocessableEventError` when its payload lacks what it needs."""
    p = event.payload
    received = event.occurred_at.astimezone(UTC)
    kind = event.event_type
    base: dict[str, Any] = {"tenant_id": event.tenant_id, "event_id": event.event_id, "event_type": kind}
    if kind in SEGMENT_TYPES:
        user_id = p.get("userId") or ""
        anonymous_id = p.get("anonymousId") or ""
        if not user_id and not anonymous_id:
            raise UnprocessableEventError(f"{kind} without userId or anonymousId")
        return AnalyticsEvent(
            **base,
            event_name=_segment_name(kind, p),
            user_id=str(user_id),
            anonymous_id=str(anonymous_id),
            occurred_at=_ts(p.get("timestamp"), "timestamp"),
            received_at=_ts(p.get("receivedAt"), "receivedAt") if "receivedAt" in p else received,
            properties=_json.encode(_segment_properties(kind, p)).decode(),
        )
    if kind.startswith("onboarding."):
        user_id = p.get("user_id")
        path_key = p.get("path_id")
        version = p.get("path_version")
        if not isinstance(user_id, str) or not isinstance(path_key, str) or not isinstance(version, int):
            raise UnprocessableEventError(f"{kind} needs user_id, path_id and path_version")
        traits = p.get("traits") or {}
        decision = p.get("decision") or {}
        occurred = _ts(p["occurred_at"], "occurred_at") if "occurred_at" in p else received
        return AnalyticsEvent(
            **base,
            event_name="",
            user_id=user_id,
            anonymous_id="",
            occurred_at=occurred,
            received_at=received,
            path_key=path_key,
            path_version=version,
            step_id=str(p.get("step_id") or ""),
            variant=str(decision.get("variant") or p.get("variant") or ""),
            persona=str(traits.get("persona") or ""),
            properties=_json.encode(
                {"selected_by": decision["selected_by"]} if "selected_by" in decision else {}
            ).decode(),
        )
    if kind.startswith("nudge."):  # the nudge executor's outcomes: nudge.sent, .opened, .clicked, .converted, …
        user_id = p.get("user_id")
        if not isinstance(user_id, str) or not isinstance(p.get("send_id"), str):
            raise UnprocessableEventError(f"{kind} needs user_id and send_id")
        step = str(p.get("trigger") or "").partition(":")[2]
        return AnalyticsEvent(
            **base,
            event_name="",
            user_id=user_id,
            anonymous_id="",
            occurred_at=received,
            received_at=received,
            step_id="" if step == "-" else step,
            variant=str(p.get("arm") or ""),
            properties=_json.encode({k: p[k] for k in NUDGE_PROPERTIES if k in p}).decode(),
        )
    if kind == EXPOSED:
        user_id, experiment, variant = p.get("user_id"), p.get("experiment_id"), p.get("variant")
        if not isinstance(user_id, str) or not isinstance(experiment, str) or not isinstance(variant, str):
            raise UnprocessableEventError(f"{kind} needs user_id, experiment_id and variant")
        return AnalyticsEvent(
            **base,
            event_name=experiment,
            user_id=user_id,
            anonymous_id="",
            occurred_at=received,
            received_at=received,
            path_key=str(p.get("path_id") or ""),
            variant=variant,
            properties="{}",
        )
    raise UnprocessableEventError(f"unknown event type {kind!r}")


class AnalyticsStoreLike(Protocol):
    def insert(self, rows: Sequence[AnalyticsEvent]) -> int: ...

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None: ...


class AnalyticsSink:
    """Batched inserts into the analytics store (idempotent by event id: see the module docstring)."""

    name = "analytics"

    def __init__(self, store: AnalyticsStoreLike) -> None:
        self.store = store
        self.inserted = 0

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        rows: list[AnalyticsEvent] = []
        dead: list[DeadLetter] = []
        erased: list[tuple[uuid.UUID, str]] = []
        for event in events:
            if event.event_type == USER_ERASED:
                erased.append((event.tenant_id, str(event.payload.get("user_id", ""))))
                continue
            try:
                rows.append(to_analytics(event))
            except (UnprocessableEventError, KeyError, TypeError, ValueError) as exc:
                dead.append(DeadLetter(event, b"", f"analytics: {exc}"))
        if rows:
            self.inserted += await asyncio.to_thread(self.store.insert, rows)
        for tenant_id, user_id in erased:  # after the batch's inserts: nothing of theirs stays behind
            if user_id:
                await asyncio.to_thread(self.store.erase_user, tenant_id, user_id)
        return dead
