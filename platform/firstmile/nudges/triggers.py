"""Nudge triggers declared on paths in the manifest (``nudges.triggers``), and the scan that fires them.

* ``step_idle`` (path, step, after): the user has been on ``step`` with no progress for ``after``.
* ``event_missing`` (path, event, after): ``after`` since the start, the user has not sent ``event``. The
  trigger consumer records an arrival of the event before the window closes as the trigger's outcome
  (a ``satisfied`` row under the trigger's key), so the trigger then never fires for that user.
* ``activated`` (path): the user reached the path's activation step; fired by the consumer on
  ``onboarding.activated``.

:class:`TriggerScanner` runs on a schedule under ``worker:nudge-triggers``: per tenant whose
manifest declares scanned triggers (``firstmile_nudge_trigger_tenants``, migration 0016), one
transaction reads the tenant's nudge setup, pages through each trigger's candidates (users by id,
:data:`PAGE` at a time, at most :data:`PAGES` pages a pass), drops those the trigger already fired
for, and decides each of the others with :meth:`NudgeExecutor.on_trigger`. The unique trigger key
per user makes a trigger fire once even when two scans overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges import repository as repo
from firstmile.nudges.service import Decided, NudgeExecutor
from firstmile.onboarding import service as onboarding
from firstmile.tenancy.manifest import NudgeTriggerSpec, duration_seconds

log = logging.getLogger("firstmile.nudges.triggers")

SCANNER = OperatorContext("worker:nudge-triggers")
PAGE = 500
"""Candidates read at a time."""
PAGES = 20
"""Pages of one trigger per pass (10,000 candidates); the rest wait for the next pass."""


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

    def __init__(self, engine: AsyncEngine, executor: NudgeExecutor, worker: OperatorContext | None = None) -> None:
        self.engine = engine
        self.executor = executor
        self.worker = worker or SCANNER

    async def tenants(self) -> list[TenantId]:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return [self.worker.tenant(t) for t in await repo.trigger_tenants(conn)]

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
        async def work(tx: TenantTx) -> list[Fired]:
            setup = await self.executor.tenant_setup(tx)
            if not setup.enabled or not setup.channels:
                return []
            fired: list[Fired] = []
            for trigger in setup.triggers:
                if trigger.when in ("step_idle", "event_missing"):
                    for user_id in await self._due(tx, trigger, now):
                        decided = await self.executor.on_trigger(tx, user_id, trigger.id, trigger.step, now, setup)
                        fired.append(Fired(trigger.id, user_id, decided))
            return fired

        return await UnitOfWork(self.engine, tenant).run(work)

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
