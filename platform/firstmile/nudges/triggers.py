"""Nudge triggers declared on paths in the manifest (``nudges.triggers``), and the scan that fires them.

* ``step_idle`` (path, step, after): the user has been on ``step`` with no progress for ``after``.
* ``event_missing`` (path, event, after): ``after`` since the start, the user has not sent ``event``. The
  trigger consumer records an arrival of the event before the window closes as the trigger's outcome
  (a ``satisfied`` row under the trigger's key), so the trigger then never fires for that user.
* ``activated`` (path): the user reached the path's activation step; fired by the consumer on
  ``onboarding.activated``.

:class:`TriggerScanner` runs on a schedule under ``worker:nudge-triggers``: per tenant whose
manifest declares scanned triggers (``firstmile_nudge_trigger_tenants``, migration 0016), a read-only
transaction reads the tenant's nudge setup and pages through each trigger's candidates (users by id,
:data:`PAGE` at a time, at most :data:`PAGES` pages a pass), dropping those the trigger already fired
for. The response model is then asked about each user due, outside any transaction (a network call;
:data:`PRIOR_CONCURRENCY` at a time), as the consumer asks it for ``onboarding.stuck``; a failure is
no prior, never a missed nudge. Last, one transaction decides each of them with
:meth:`NudgeExecutor.on_trigger`. The unique trigger key per user makes a trigger fire once even when
two scans overlap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.ml.nudge_prior import ModelResponsePrior, ResponsePrior
from firstmile.nudges import repository as repo
from firstmile.nudges.config import TenantNudges
from firstmile.nudges.service import Decided, NudgeExecutor
from firstmile.onboarding import service as onboarding
from firstmile.tenancy.manifest import NudgeTriggerSpec, duration_seconds

log = logging.getLogger("firstmile.nudges.triggers")

SCANNER = OperatorContext("worker:nudge-triggers")
PAGE = 500
"""Candidates read at a time."""
PAGES = 20
"""Pages of one trigger per pass (10,000 candidates); the rest wait for the next pass."""
PRIOR_CONCURRENCY = 16
"""Questions to the response model in flight at once during a scan."""


def trigger_key(trigger: NudgeTriggerSpec) -> str:
    """The key under which ``trigger`` fires once per user (``<id>:<step>``, ``<id>:-`` when it has no step)."""
    return f"{trigger.id}:{trigger.step or '-'}"


@dataclass(frozen=True, slots=True)
class Fired:
    trigger: str
    user_id: str
    decided: Decided


class TriggerScanner:
    """Fires the scanned triggers (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        executor: NudgeExecutor,
        worker: OperatorContext | None = None,
        *,
        prior: ModelResponsePrior | None = None,
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.worker = worker or SCANNER
        self.prior = prior

    async def tenants(self) -> list[TenantId]:
        return [self.worker.tenant(t) for t in await across_tenants(self.engine, repo.trigger_tenants)]

    async def run_once(self, now: datetime | None = None) -> list[Fired]:
        fired: list[Fired] = []
        for tenant in await self.tenants():
            try:
                fired += await self.scan_tenant(tenant, now or datetime.now(UTC))
            except Exception:
                log.exception("nudge trigger scan failed", extra={"fields": {"tenant": str(tenant)}})
        if fired:
            log.info("nudge triggers fired", extra={"fields": {"count": len(fired)}})
        return fired

    async def scan_tenant(self, tenant: TenantId, now: datetime) -> list[Fired]:
        uow = UnitOfWork(self.engine, tenant)

        async def find(tx: TenantTx) -> tuple[TenantNudges, list[tuple[NudgeTriggerSpec, str]]]:
            setup = await self.executor.tenant_setup(tx)
            if not setup.enabled or not setup.channels:
                return setup, []
            return setup, [
                (trigger, user_id)
                for trigger in setup.triggers
                if trigger.when in ("step_idle", "event_missing")
                for user_id in await self._due(tx, trigger, now)
            ]

        setup, due = await uow.run(find)
        if not due:
            return []
        priors = await self._priors(str(tenant), sorted({user_id for _, user_id in due}), now)

        async def decide(tx: TenantTx) -> list[Fired]:
            fired: list[Fired] = []
            for trigger, user_id in due:
                decided = await self.executor.on_trigger(
                    tx, user_id, trigger.id, trigger.step, now, setup, prior=priors.get(user_id)
                )
                fired.append(Fired(trigger.id, user_id, decided))
            return fired

        return await uow.run(decide)

    async def _priors(self, tenant_id: str, user_ids: Sequence[str], now: datetime) -> dict[str, ResponsePrior]:
        """The response model's prior for each user (a failure is a prior with its reason, as the consumer's)."""
        prior = self.prior
        if prior is None:
            return {}
        gate = asyncio.Semaphore(PRIOR_CONCURRENCY)
        channels = self.executor.channels

        async def one(user_id: str) -> ResponsePrior:
            async with gate:
                try:
                    return await prior.predict(tenant_id, user_id, channels, now)
                except Exception as exc:  # the prior is an aid: a failure never stops the decision
                    return ResponsePrior(fallback=f"error: {type(exc).__name__}")

        return dict(zip(user_ids, await asyncio.gather(*(one(u) for u in user_ids)), strict=True))

    async def _due(self, tx: TenantTx, trigger: NudgeTriggerSpec, now: datetime) -> list[str]:
        """The users ``trigger`` is due for and has not fired for yet."""
        assert trigger.after is not None  # the manifest requires it for the scanned kinds
        before = now - timedelta(seconds=duration_seconds(trigger.after))
        due: list[str] = []
        after = ""
        for _ in range(PAGES):
            page: Sequence[str]
            if trigger.when == "step_idle":
                assert trigger.step is not None
                page = await onboarding.users_on_step_since(tx, trigger.path, trigger.step, before, after, PAGE)
            else:
                page = await onboarding.users_started_before(tx, trigger.path, before, after, PAGE)
            if not page:
                break
            fired = await repo.fired_users(tx, trigger_key(trigger), page)
            due += [u for u in page if u not in fired]
            after = page[-1]
            if len(page) < PAGE:
                break
        return due
