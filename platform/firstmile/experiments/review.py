"""The scheduled review of running experiments: the design's "low confidence → extend" and the SRM alert.

:class:`ExperimentReviewer` runs on a schedule under ``worker:experiment-review`` (the scheduler process).
It finds the tenants with a running experiment (``firstmile_running_experiment_tenants``, migration 0019),
analyses each running experiment (:func:`~firstmile.experiments.analysis.analyse`) and acts on the look:

* ``deferred`` (the analytics store or the statistics unavailable): nothing; the next pass tries again.
* ``srm``: an alert: an ``experiment`` audit entry ``srm_alert`` (one per experiment and day from one
  scheduler process), a log line at error level and ``firstmile_experiment_reviews_total{action="srm_alert"}``.
  The experiment keeps running (a mismatch is usually a bug to fix, not a result) and no verdict can be
  declared.
* past the planned end with ``no_winner_yet``: extended by ``extension_days`` (``extend``, audited) while
  fewer than the experiment's ``max_extensions`` were granted; then concluded ``inconclusive`` (audited),
  which ends the allocation.
* a ``winner`` waits for an editor to declare it (the result page shows it); ``vetoed`` likewise.

Every look that is not deferred is kept, the first of each day (``experiment_looks``, migration 0020): the
result page's history of the chance to beat control.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.service import AnalyticsService
from firstmile.audit import service as audit
from firstmile.experiments import repository as repo
from firstmile.experiments.analysis import analyse
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import ExperimentSpec

log = logging.getLogger("firstmile.experiments")

REVIEWER = OperatorContext("worker:experiment-review")
_LOOK_FIELDS = ("variant", "users", "converted", "rate", "chance_to_beat_control", "expected_loss")


@dataclass(frozen=True, slots=True)
class Reviewed:
    tenant: TenantId
    experiment_id: str
    action: str
    """``continue``, ``deferred``, ``srm_alert``, ``extend``, ``conclude``."""
    verdict: str


class ExperimentReviewer:
    """Reviews the running experiments of every tenant (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        analytics: AnalyticsService,
        *,
        worker: OperatorContext | None = None,
        extension_days: int = 7,
    ) -> None:
        self.engine = engine
        self.analytics = analytics
        self.worker = worker or REVIEWER
        self.extension_days = extension_days
        self._alerted: set[tuple[TenantId, str, str]] = set()

    async def tenants(self) -> list[TenantId]:
        return [self.worker.tenant(t) for t in await across_tenants(self.engine, repo.running_tenants)]

    async def run_once(self, now: datetime | None = None) -> list[Reviewed]:
        reviewed: list[Reviewed] = []
        for tenant in await self.tenants():
            try:
                reviewed += await self.review_tenant(tenant, now or datetime.now(UTC))
            except Exception:
                log.exception("experiment review failed", extra={"fields": {"tenant": str(tenant)}})
        return reviewed

    async def review_tenant(self, tenant: TenantId, now: datetime) -> list[Reviewed]:
        uow = UnitOfWork(self.engine, tenant)
        out: list[Reviewed] = []
        for row in await uow.run(repo.running):
            result = await analyse(self.analytics, tenant, row, now)
            kind = str(result.verdict["kind"])
            action = "continue"
            if kind == "deferred":
                action = "deferred"
            elif kind == "srm":
                action = "srm_alert"
                log.error("sample ratio mismatch in experiment %s: no verdict stands", row.id,
                          extra={"fields": {"tenant": str(tenant), "srm": result.srm}})  # fmt: skip
                key = (tenant, row.id, now.date().isoformat())
                if key not in self._alerted:  # one alert entry per experiment and day (per scheduler process)
                    await uow.run(partial(self._alert, experiment_id=row.id, day=key[2], srm=result.srm))
                    self._alerted.add(key)
            elif kind == "no_winner_yet" and row.planned_end_at is not None and now >= row.planned_end_at:
                spec = ExperimentSpec.model_validate(row.definition)
                if row.extensions < spec.max_extensions:
                    action = "extend"
                    until = row.planned_end_at + timedelta(days=self.extension_days)
                    await uow.run(partial(self._extend, row=row, until=until))
                else:
                    action = "conclude"
                    verdict = result.verdict | {"kind": "inconclusive", "reasons": [
                        *result.verdict.get("reasons", []),
                        f"no winner by the planned end after {row.extensions} extension(s)"]}  # fmt: skip
                    await uow.run(partial(self._conclude, experiment_id=row.id, now=now, verdict=verdict))
            if kind != "deferred":  # the day's look, for the result page's history
                look = {"arms": [{k: a.get(k) for k in _LOOK_FIELDS} for a in result.arms], "verdict": kind,
                        "action": action}  # fmt: skip
                await uow.run(partial(repo.record_look, experiment_id=row.id, day=result.day, at=now, look=look))
            telemetry.EXPERIMENT_REVIEWS.labels(action).inc()
            out.append(Reviewed(tenant, row.id, action, kind))
        return out

    async def _alert(self, tx: TenantTx, *, experiment_id: str, day: str, srm: object) -> None:
        await audit.append(tx, "experiment", self.worker.actor, experiment_id,
                           {"action": "srm_alert", "day": day, "srm": srm})  # fmt: skip

    async def _extend(self, tx: TenantTx, *, row: repo.ExperimentRow, until: datetime) -> None:
        if await repo.extend(tx, row.id, row.extensions, until):
            entry = {"action": "extend", "extensions": row.extensions + 1, "planned_end_at": until.isoformat()}
            await audit.append(tx, "experiment", self.worker.actor, row.id, entry)

    async def _conclude(self, tx: TenantTx, *, experiment_id: str, now: datetime, verdict: dict[str, object]) -> None:
        if await repo.transition(tx, experiment_id, ("running",), "concluded", concluded_at=now, verdict=verdict):
            await audit.append(tx, "experiment", self.worker.actor, experiment_id,
                               {"action": "concluded", "verdict": verdict})  # fmt: skip
            await tenancy.bump_revision(tx)
