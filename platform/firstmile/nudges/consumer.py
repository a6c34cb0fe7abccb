"""The nudge executor's triggers and outcomes: the event-stream consumer of ``onboarding.stuck``,
``onboarding.step_completed`` (a nudged step completed within the window: ``nudge.converted``),
``onboarding.activated`` (the manifest's ``activated`` triggers) and tracked events (the event an
``event_missing`` trigger waits for: the trigger is satisfied and never fires).

Each event is decided in its own transaction, under the ``worker:nudges`` operator context on
the event's tenant (:meth:`~firstmile.nudges.service.NudgeExecutor.on_stuck`). Deciding is
idempotent (one send per user, step and trigger), so a redelivered event changes nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events.bus import DeadLetter
from firstmile.events.envelope import Envelope
from firstmile.kit.db import TenantTx, is_transient
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.ml.nudge_prior import ModelResponsePrior, ResponsePrior
from firstmile.nudges.service import DECIDER, NudgeExecutor, record_conversion, satisfy
from firstmile.nudges.triggers import trigger_key
from firstmile.tenancy.manifest import NudgeTriggerSpec


class NudgeTriggers:
    """Decides a nudge for every ``onboarding.stuck`` event."""

    name = "nudges"

    def __init__(
        self,
        engine: AsyncEngine,
        executor: NudgeExecutor,
        outcome_window: timedelta,
        setup_ttl: float = 30.0,
        prior: ModelResponsePrior | None = None,
    ) -> None:
        self.prior = prior
        self.engine = engine
        self.executor = executor
        self.outcome_window = outcome_window
        self.decided = 0
        self.converted = 0
        self.satisfied = 0
        self.setup_ttl = setup_ttl
        self._setups: OrderedDict[TenantId, tuple[float, tuple[NudgeTriggerSpec, ...]]] = OrderedDict()

    async def _prior(self, event: Envelope, user_id: str, now: datetime) -> ResponsePrior | None:
        """The response model's predictions for the user on each channel; None without a model, a fallback on
        any failure (the decision then starts every arm from a uniform prior)."""
        if self.prior is None:
            return None
        try:
            return await self.prior.predict(str(event.tenant_id), user_id, self.executor.channels, now)
        except Exception as exc:  # the prior is an aid: a failure never stops the decision
            return ResponsePrior(fallback=f"error: {type(exc).__name__}")

    async def _triggers(self, uow: UnitOfWork) -> tuple[NudgeTriggerSpec, ...]:
        """The tenant's declared triggers (cached for ``setup_ttl`` seconds: most events match none)."""
        cached = self._setups.get(uow.tenant)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.setup_ttl:
            return cached[1]
        setup = await uow.run(self.executor.tenant_setup)
        triggers = setup.triggers if setup.enabled else ()
        self._setups[uow.tenant] = (now, triggers)
        if len(self._setups) > 10_000:
            self._setups.popitem(last=False)
        return triggers

    async def _tracked(self, event: Envelope) -> None:
        """A tracked event: an ``event_missing`` trigger waiting for it is satisfied for the user."""
        user_id, name = event.payload.get("userId"), event.payload.get("event")
        if not isinstance(user_id, str) or not user_id or not isinstance(name, str):
            return
        uow = UnitOfWork(self.engine, DECIDER.tenant(event.tenant_id))
        waiting = [t for t in await self._triggers(uow) if t.when == "event_missing" and t.event == name]
        if not waiting:
            return

        async def work(tx: TenantTx) -> None:
            progress = await self.executor.onboarding.progress(tx, user_id)
            for trigger in waiting:
                if progress is not None and progress.path_key == trigger.path:
                    self.satisfied += await satisfy(tx, user_id, trigger_key(trigger), name, trigger.path)

        await uow.run(work)

    async def _activated(self, event: Envelope) -> None:
        """The user activated: the ``activated`` triggers of their path fire."""
        user_id = event.payload.get("user_id")
        if not isinstance(user_id, str):
            return
        uow = UnitOfWork(self.engine, DECIDER.tenant(event.tenant_id))
        if not any(t.when == "activated" for t in await self._triggers(uow)):
            return

        async def work(tx: TenantTx) -> int:
            setup = await self.executor.tenant_setup(tx)
            fired = 0
            for trigger in (t for t in setup.triggers if t.when == "activated"):
                decided = await self.executor.on_trigger(tx, user_id, trigger.id, None, datetime.now(UTC), setup)
                fired += decided.send_id is not None
            return fired

        self.decided += await uow.run(work)

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        for event in events:
            if event.event_type == "onboarding.step_completed":
                await self._completed(event)
                continue
            if event.event_type == "track":
                await self._tracked(event)
                continue
            if event.event_type == "onboarding.activated":
                await self._activated(event)
                continue
            if event.event_type != "onboarding.stuck":
                continue
            user_id, step_id = event.payload.get("user_id"), event.payload.get("step_id")
            if not isinstance(user_id, str) or not isinstance(step_id, str):
                dead.append(DeadLetter(event, b"", "nudges: onboarding.stuck without user_id and step_id"))
                continue
            uow = UnitOfWork(self.engine, DECIDER.tenant(event.tenant_id))
            now = datetime.now(UTC)
            prior = await self._prior(event, user_id, now)  # a network call: before the transaction
            try:
                decided = await uow.run(partial(self.executor.on_stuck, user_id=user_id, step_id=step_id, now=now,
                                                prior=prior))  # fmt: skip
            except Exception as exc:
                if is_transient(exc) or not isinstance(exc, ValueError):
                    raise  # the batch is retried
                dead.append(DeadLetter(event, b"", f"nudges: {exc}"))
                continue
            self.decided += decided.send_id is not None
        return dead

    async def _completed(self, event: Envelope) -> None:
        """A step completed: a nudge sent for it within the window converted."""
        user_id, step_id = event.payload.get("user_id"), event.payload.get("step_id")
        if not isinstance(user_id, str) or not isinstance(step_id, str):
            return
        uow = UnitOfWork(self.engine, DECIDER.tenant(event.tenant_id))
        converted = await uow.run(
            partial(record_conversion, user_id=user_id, step_id=step_id, now=datetime.now(UTC),
                    window=self.outcome_window)
        )  # fmt: skip
        self.converted += converted
