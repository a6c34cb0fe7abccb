"""The nudge executor's triggers and outcomes: the event-stream consumer of ``onboarding.stuck`` and
``onboarding.step_completed`` (a nudged step completed within the window: ``nudge.converted``).

Each event is decided in its own transaction, under the ``worker:nudges`` operator context on
the event's tenant (:meth:`~firstmile.nudges.service.NudgeExecutor.on_stuck`). Deciding is
idempotent (one send per user, step and trigger), so a redelivered event changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events.bus import DeadLetter
from firstmile.events.envelope import Envelope
from firstmile.kit.db import is_transient
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.service import DECIDER, NudgeExecutor, record_conversion


class NudgeTriggers:
    """Decides a nudge for every ``onboarding.stuck`` event."""

    name = "nudges"

    def __init__(self, engine: AsyncEngine, executor: NudgeExecutor, outcome_window: timedelta) -> None:
        self.engine = engine
        self.executor = executor
        self.outcome_window = outcome_window
        self.decided = 0
        self.converted = 0

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        for event in events:
            if event.event_type == "onboarding.step_completed":
                await self._completed(event)
                continue
            if event.event_type != "onboarding.stuck":
                continue
            user_id, step_id = event.payload.get("user_id"), event.payload.get("step_id")
            if not isinstance(user_id, str) or not isinstance(step_id, str):
                dead.append(DeadLetter(event, b"", "nudges: onboarding.stuck without user_id and step_id"))
                continue
            uow = UnitOfWork(self.engine, DECIDER.tenant(event.tenant_id))
            try:
                decided = await uow.run(partial(self.executor.on_stuck, user_id=user_id, step_id=step_id,
                                                now=datetime.now(UTC)))  # fmt: skip
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
