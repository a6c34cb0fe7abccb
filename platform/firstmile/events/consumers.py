"""The consumers of the event stream: analytics sink, progress auto-completion, online features.

Each is idempotent by event id: the analytics store skips event ids it holds,
a step completes at most once per user, and the feature hook receives each
event id once per process. Consumers run as Kafka consumer groups
(``firstmile consume``) or, in embedded mode, behind the in-process dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.analytics.rows import AnalyticsEvent
from firstmile.events.bus import DeadLetter
from firstmile.events.envelope import Envelope
from firstmile.kit.db import TenantId, authorise_tenant, is_transient, run_in_tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding import repository as onboarding_repo
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.rules import matches
from firstmile.onboarding.service import OnboardingService
from firstmile.privacy.service import ERASED

log = logging.getLogger("firstmile.consumers")
_json = msgspec.json.Encoder()


class UnprocessableEventError(ValueError):
    """The event can never be processed (it goes to the dead-letter topic with this reason)."""


# ---- analytics sink ----


def _ts(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise UnprocessableEventError(f"{field} is missing or not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UnprocessableEventError(f"{field} {value[:40]!r} is not ISO-8601") from None
    if parsed.tzinfo is None:
        raise UnprocessableEventError(f"{field} has no time zone")
    return parsed.astimezone(UTC)


def to_analytics(event: Envelope) -> AnalyticsEvent:
    """The analytics row of one event; :class:`UnprocessableEventError` when its payload lacks what it needs."""
    p = event.payload
    received = event.occurred_at.astimezone(UTC)
    kind = event.event_type
    base: dict[str, Any] = {"tenant_id": event.tenant_id, "event_id": event.event_id, "event_type": kind}
    if kind in ("track", "page", "identify"):
        user_id = p.get("userId") or ""
        anonymous_id = p.get("anonymousId") or ""
        if not user_id and not anonymous_id:
            raise UnprocessableEventError(f"{kind} without userId or anonymousId")
        props = p.get("traits") if kind == "identify" else p.get("properties")
        return AnalyticsEvent(
            **base,
            event_name=str(p.get("event") if kind == "track" else p.get("name") or "") if kind != "identify" else "",
            user_id=str(user_id),
            anonymous_id=str(anonymous_id),
            occurred_at=_ts(p.get("timestamp"), "timestamp"),
            received_at=_ts(p.get("receivedAt"), "receivedAt") if "receivedAt" in p else received,
            properties=_json.encode(props or {}).decode(),
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
    raise UnprocessableEventError(f"unknown event type {kind!r}")


class AnalyticsStoreLike(Protocol):
    def insert(self, rows: Sequence[AnalyticsEvent]) -> int: ...

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None: ...


class AnalyticsSink:
    """Batched inserts into the analytics store; the store skips event ids it already holds."""

    name = "analytics"

    def __init__(self, store: AnalyticsStoreLike) -> None:
        self.store = store
        self.inserted = 0

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        rows: list[AnalyticsEvent] = []
        dead: list[DeadLetter] = []
        erased: list[tuple[uuid.UUID, str]] = []
        for event in events:
            if event.event_type == ERASED:
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


# ---- progress auto-completion ----


def _completing_steps(path_steps: Sequence[Any], event_name: str, properties: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    for step in path_steps:
        criteria = step.completion
        if criteria.get("event") != event_name:
            continue
        where = criteria.get("where") or ()
        if all(matches(w["field"], w.get("op", "eq"), w.get("value"), properties) for w in where):
            found.append(step.id)
    return found


class AutoCompletion:
    """A tracked event that meets a step's completion criteria completes the step.

    Only ``track`` events with a ``userId`` of a user who started onboarding count;
    steps whose prerequisites are not met yet are left for a later event. A
    completion is idempotent, so a redelivered event changes nothing.
    """

    name = "progress"

    def __init__(self, engine: AsyncEngine, service: OnboardingService, names_ttl: float = 30.0) -> None:
        self.engine = engine
        self.service = service
        self.catalogs: CatalogCache = service.catalogs
        self.names_ttl = names_ttl
        self._names: OrderedDict[TenantId, tuple[float, frozenset[str]]] = OrderedDict()
        self.completed = 0

    async def _event_names(self, tenant_id: TenantId) -> frozenset[str]:
        """The event names any current step completes on (cached; refreshed every ``names_ttl``)."""
        cached = self._names.get(tenant_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.names_ttl:
            return cached[1]

        async def load(conn: AsyncConnection) -> frozenset[str]:
            catalog = await self.catalogs.reload(conn, tenant_id)
            return frozenset(str(s.completion.get("event")) for p in catalog.current for s in p.steps)

        names = await run_in_tenant_transaction(self.engine, tenant_id, load)
        self._names[tenant_id] = (now, names)
        if len(self._names) > 10_000:
            self._names.popitem(last=False)
        return names

    async def _complete_for(self, tenant_id: TenantId, event: Envelope) -> int:
        p = event.payload
        user_id = str(p["userId"])
        name = str(p["event"])
        properties = p.get("properties") or {}
        occurred_at = _ts(p.get("timestamp"), "timestamp")

        async def work(conn: AsyncConnection) -> int:
            progress = await onboarding_repo.get_progress(conn, tenant_id, user_id)
            if progress is None:
                return 0
            path = await self.catalogs.version(conn, tenant_id, progress.path_key, progress.path_version)
            done = 0
            for step_id in _completing_steps(path.steps, name, properties):
                if step_id in progress.completions:
                    continue
                try:
                    await self.service.complete(
                        conn, tenant_id, user_id, step_id, occurred_at=occurred_at, source=f"event:{event.event_id}"
                    )
                except ProblemError as exc:
                    if exc.status == 409:  # prerequisites not met yet: a later event may complete it
                        continue
                    raise
                progress = await onboarding_repo.get_progress(conn, tenant_id, user_id) or progress
                done += 1
            return done

        return await run_in_tenant_transaction(self.engine, tenant_id, work)

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        for event in events:
            p = event.payload
            if event.event_type != "track" or not p.get("userId") or not isinstance(p.get("event"), str):
                continue
            tenant_id = authorise_tenant(event.tenant_id)
            if p["event"] not in await self._event_names(tenant_id):
                continue  # most product events complete nothing: no database round trip for them
            if not isinstance(p.get("properties") or {}, dict):
                dead.append(DeadLetter(event, b"", "progress: properties is not an object"))
                continue
            try:
                self.completed += await self._complete_for(tenant_id, event)
            except Exception as exc:
                if is_transient(exc) or not isinstance(exc, (ProblemError, UnprocessableEventError, ValueError)):
                    raise  # the batch is retried
                dead.append(DeadLetter(event, b"", f"progress: {exc}"))
        return dead


# ---- online features ----


class FeatureSink(Protocol):
    """Receives events for online features (the ML slice implements it)."""

    async def update(self, events: Sequence[Envelope]) -> None: ...


class FeatureHook:
    """Feeds events to the online feature store, once per event id (per process)."""

    name = "features"

    def __init__(self, sink: FeatureSink | None = None, remember: int = 100_000) -> None:
        self.sink = sink
        self.remember = remember
        self._seen: OrderedDict[Any, None] = OrderedDict()

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        fresh = [e for e in events if e.event_id not in self._seen]
        if fresh and self.sink is not None:
            await self.sink.update(fresh)  # a failure retries the batch: remember nothing of it yet
        for e in fresh:
            self._seen[e.event_id] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return []
