"""The embed slice's service: the checklist of one user, their messages, and the live stream of both."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from firstmile.embed.schemas import Checklist, ChecklistPath, ChecklistProgress, ChecklistStep, StepStatus
from firstmile.kit.db import TenantTx
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.inapp import InAppInbox, Watched
from firstmile.nudges.schemas import InAppMessage, InAppMessageList
from firstmile.onboarding.schemas import OnboardingState
from firstmile.onboarding.service import OnboardingService


def checklist_of(state: OnboardingState) -> Checklist:
    """The checklist view of an onboarding state (pure): each step completed, available or locked."""
    done = {s.id for s in state.steps if s.completed}
    steps = []
    for step in state.steps:
        status: StepStatus = (
            "completed"
            if step.completed
            else "pending_review"
            if step.pending_review
            else "available"
            if step.available
            else "locked"
        )
        waiting = [p for p in step.prerequisites if p not in done]
        steps.append(
            ChecklistStep(step.id, step.title, step.description, step.optional, status, step.completed_at, waiting)
        )
    progress = ChecklistProgress(state.progress.completed_required, state.progress.required, state.progress.percent)
    path = ChecklistPath(state.path.id, state.path.name, state.path.version)
    return Checklist(state.user_id, path, state.status, state.activated, state.current_step, progress, steps)


class EmbedService:
    """What the embed API does for the one user a publishable key's identity token names."""

    def __init__(self, onboarding: OnboardingService, inbox: InAppInbox) -> None:
        self.onboarding = onboarding
        self.inbox = inbox

    @property
    def retry_ms(self) -> int:
        return self.inbox.retry_ms

    async def checklist(self, tx: TenantTx, user_id: str) -> Checklist:
        """The user's checklist; 404 ``user-not-found`` before they started onboarding."""
        return checklist_of(await self.onboarding.get(tx, user_id))

    async def messages(self, tx: TenantTx, user_id: str, limit: int) -> InAppMessageList:
        return await self.inbox.messages(tx, user_id, limit)

    async def seen(self, uow: UnitOfWork, user_id: str, send_id: uuid.UUID) -> bool:
        return await self.inbox.seen(uow, user_id, send_id)

    async def dismiss(self, uow: UnitOfWork, user_id: str, send_id: uuid.UUID) -> bool:
        return await self.inbox.dismiss(uow, user_id, send_id)

    async def stream(self, uow: UnitOfWork, user_id: str) -> AsyncIterator[Checklist | InAppMessage | str]:
        """The checklist (first, then at each change) and the user's new in-app messages, with comments.

        The caller checks first that the user started (:meth:`checklist`): once a stream has begun, a 404
        can no longer be answered.
        """

        async def watch(tx: TenantTx) -> object:
            return await self.checklist(tx, user_id)

        async for item in self.inbox.stream(uow, user_id, watch):
            if isinstance(item, Watched):
                value = item.value
                assert isinstance(value, Checklist)
                yield value
            else:
                yield item


__all__ = ["EmbedService", "checklist_of"]
