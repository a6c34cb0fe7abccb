"""Progress auto-completion: the event-stream consumer that completes steps from tracked events.

A tracked event that meets a step's completion criteria completes the step; one that has the step's event
name and meets only some of its property criteria goes to a person's review (docs/review.md). Only
``track`` events with a ``userId`` of a user who started onboarding count; steps whose
prerequisites are not met yet are left for a later event. A completion is idempotent,
so a redelivered event changes nothing. The consumer acts on rows that already carry
their tenant, under the ``worker:progress`` operator context.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events.bus import DeadLetter, UnprocessableEventError, parse_timestamp
from firstmile.events.envelope import Envelope
from firstmile.kit.db import TenantTx, is_transient
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.review import criteria_met
from firstmile.onboarding.service import OnboardingService

WORKER = OperatorContext("worker:progress")


def _completing_steps(
    path_steps: Sequence[Any], event_name: str, properties: Mapping[str, Any]
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The steps the event completes, and those it matches only partly: the event's name, and some but not all
    of the property criteria (step id: criteria met, criteria in all), which go to a person's review."""
    found: list[str] = []
    partial: dict[str, tuple[int, int]] = {}
    for step in path_steps:
        criteria = step.completion
        if criteria.get("event") != event_name:
            continue
        met, total = criteria_met(criteria, properties)
        if met == total:
            found.append(step.id)
        elif met > 0:
            partial[step.id] = (met, total)
    return found, partial


class AutoCompletion:
    """Completes steps whose criteria a tracked event meets (see the module docstring)."""

    name = "progress"

    def __init__(self, engine: AsyncEngine, service: OnboardingService, names_ttl: float = 30.0) -> None:
        self.engine = engine
        self.service = service
        self.names_ttl = names_ttl
        self._names: OrderedDict[TenantId, tuple[float, frozenset[str]]] = OrderedDict()
        self.completed = 0

    async def _event_names(self, uow: UnitOfWork) -> frozenset[str]:
        """The event names any current step completes on (cached; refreshed every ``names_ttl``)."""
        cached = self._names.get(uow.tenant)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.names_ttl:
            return cached[1]

        async def load(tx: TenantTx) -> frozenset[str]:
            catalog = await self.service.catalogs.reload(tx)
            return frozenset(str(s.completion.get("event")) for p in catalog.current for s in p.steps)

        names = await uow.run(load)
        self._names[uow.tenant] = (now, names)
        if len(self._names) > 10_000:
            self._names.popitem(last=False)
        return names

    async def _complete_for(self, uow: UnitOfWork, event: Envelope) -> int:
        p = event.payload
        user_id = str(p["userId"])
        name = str(p["event"])
        properties = p.get("properties") or {}
        occurred_at = parse_timestamp(p.get("timestamp"), "timestamp")

        async def work(tx: TenantTx) -> int:
            progress = await self.service.progress(tx, user_id)
            if progress is None:
                return 0
            path = await self.service.catalogs.version(tx, progress.path_key, progress.path_version)
            done = 0
            completing, partial = _completing_steps(path.steps, name, properties)
            for step_id, (met, total) in partial.items():
                if step_id not in progress.completions:
                    details = {"event": name, "criteria_met": met, "criteria": total, "properties": properties}
                    await self.service.review_completion(
                        tx, user_id, step_id, reason="partial_match", source=f"event:{event.event_id}",
                        occurred_at=occurred_at or datetime.now(UTC), details=details,
                    )  # fmt: skip
            for step_id in completing:
                if step_id in progress.completions:
                    continue
                try:
                    await self.service.complete(
                        tx, user_id, step_id, occurred_at=occurred_at, source=f"event:{event.event_id}"
                    )
                except ProblemError as exc:
                    if exc.status == 409:  # prerequisites not met yet: a later event may complete it
                        continue
                    raise
                progress = await self.service.progress(tx, user_id) or progress
                done += 1
            return done

        return await uow.run(work)

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        for event in events:
            p = event.payload
            if event.event_type != "track" or not p.get("userId") or not isinstance(p.get("event"), str):
                continue
            uow = UnitOfWork(self.engine, WORKER.tenant(event.tenant_id))
            if p["event"] not in await self._event_names(uow):
                continue  # most product events complete nothing: no database round trip for them
            if not isinstance(p.get("properties") or {}, dict):
                dead.append(DeadLetter(event, b"", "progress: properties is not an object"))
                continue
            try:
                self.completed += await self._complete_for(uow, event)
            except Exception as exc:
                if is_transient(exc) or not isinstance(exc, (ProblemError, UnprocessableEventError, ValueError)):
                    raise  # the batch is retried
                dead.append(DeadLetter(event, b"", f"progress: {exc}"))
        return dead
