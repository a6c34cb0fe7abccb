"""Scheduled training of the tenants' own path models: the ``tenant-model-training`` task.

Every ``FIRSTMILE_TENANT_TRAINING_SECONDS`` the scheduler looks at the tenants whose manifest opts in
(``planner.training: {schedule_days: N}``) and, for each one that is *due* (:func:`due`), runs what
``firstmile models train --tenant SLUG`` runs: read its logged decisions, refuse what cannot support a model,
train in a worker thread (so the scheduler's loop keeps serving its other tasks), register the candidate
``tenant-<slug>.path_classifier`` with its off-policy report. It promotes only a tenant that asks for it
(``planner.training.auto_promote: true``), and only a candidate that passed the off-policy gate, straight to
production (audited ``models.promote`` with ``"auto": true``); otherwise promotion stays manual and behind the
same gate (``firstmile models promote --tenant``). Each run is audited in the tenant's log
(kind ``model``, ``"action": "models.train"``, ``"trigger"``), a refusal too (``"refused": true`` and the
reason; the current model keeps serving). One tenant's failure is logged and the others go on; a tenant is
never trained twice at once by one process. Training runs in process, or as a Ray task on the cluster at
``FIRSTMILE_TRAINING_RAY_ADDRESS`` (``ray``: :class:`~firstmile.ml.tenant_models.RayTraining`); a cluster that
cannot be reached or a task that fails is a refusal naming the address (audited; no fallback to in process).

Before deciding who is due, a pass checks the drift of each opted-in tenant's own model that its planner serves
and that has a production version (:meth:`TenantTrainer.check_drift`, one query per tenant, audited
``models.drift``): a verdict of drift flags the version, so the tenant is due now (``trigger: drift``); a failing
check is logged and skipped, and the tenant keeps its schedule.

It reads as the schema owner (as the CLI does), so it needs the owner's URL: docs/models.md#scheduled-training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.kit.scope import OperatorContext
from firstmile.ml import drift
from firstmile.ml import tenant_models as tm
from firstmile.ml.planner import tenant_model_name
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import OWN_MODEL

if TYPE_CHECKING:
    from firstmile_inference.registry import Registry

log = logging.getLogger("firstmile.ml.training")

TRAINER: Final = OperatorContext("worker:tenant-model-training")


@dataclass(frozen=True, slots=True)
class OptedIn:
    """A tenant whose manifest asks for scheduled training."""

    tenant_id: uuid.UUID
    slug: str
    schedule: timedelta
    serving_model: str | None  # planner.model: the model its drift flags are read from, besides its own
    auto_promote: bool = False  # planner.training.auto_promote: a candidate that passes the gate goes to production


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """What one pass did for one tenant."""

    slug: str
    trigger: str | None  # first | drift | schedule; None: not due
    outcome: str  # not_due | registered | refused | failed | running
    version: str | None = None
    reason: str | None = None
    promoted: bool = False  # auto_promote: the candidate passed the off-policy gate and went to production
    drift: str | None = None  # the drift check of its own production model: drift | stable | insufficient | failed


def _parse(stamp: object) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def due(
    now: datetime,
    schedule: timedelta,
    last_model_at: datetime | None,
    last_attempt_at: datetime | None,
    flagged_at: Iterable[datetime],
) -> str | None:
    """Why the tenant should be trained now, or None.

    The reference is the later of its last registered model and its last attempt (a refusal counts: a tenant
    below the minimums is tried once per schedule, not on every pass). ``first``: neither exists; ``drift``: a
    retraining flag was raised after the reference; ``schedule``: the reference is at least ``schedule`` old.
    """
    known = [t for t in (last_model_at, last_attempt_at) if t is not None]
    if not known:
        return "first"
    reference = max(known)
    if any(flag > reference for flag in flagged_at):
        return "drift"
    if now - reference >= schedule:
        return "schedule"
    return None


def flag_times(registry: Registry, names: Iterable[str]) -> list[datetime]:
    """When ``models drift`` flagged any of ``names`` for retraining (``<registry>/<name>/flags.jsonl``)."""
    times: list[datetime] = []
    for name in dict.fromkeys(names):
        for record in registry.flags(name):
            parsed = _parse(record.get("time"))
            if parsed is not None:
                times.append(parsed)
    return times


async def opted_in(admin_url: str) -> list[OptedIn]:
    """The tenants whose manifest holds ``planner.training`` (read as the schema owner)."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            rows = await tenancy.training_tenants(conn)
    finally:
        await engine.dispose()
    found = []
    for tenant_id, slug, planner in rows:
        training = planner.get("training") or {}
        days = training.get("schedule_days", 7.0)
        model = planner.get("model", "path_classifier")
        if model == OWN_MODEL:
            model = tenant_model_name(str(slug))
        found.append(
            OptedIn(
                tenant_id, str(slug), timedelta(days=float(days)), model if isinstance(model, str) else None,
                auto_promote=training.get("auto_promote") is True,
            )
        )  # fmt: skip
    return found


class TenantTrainer:
    """The ``tenant-model-training`` task (see the module docstring)."""

    def __init__(
        self,
        admin_url: str,
        registry: Registry,
        *,
        horizon: timedelta = timedelta(days=tm.DEFAULT_HORIZON_DAYS),
        window: timedelta = timedelta(days=tm.DEFAULT_WINDOW_DAYS),
        min_decisions: int = tm.MIN_DECISIONS,
        min_per_path: int = tm.MIN_PER_PATH,
        seed: int = 7,
        epochs: int | None = None,
        worker: OperatorContext = TRAINER,
        ray: tm.RayTraining | None = None,
        drift_window: timedelta = drift.DEFAULT_WINDOW,
    ) -> None:
        self.admin_url = admin_url
        self.drift_window = drift_window  # the recent window of the drift check of a tenant's own model
        self.registry = registry
        self.horizon = horizon
        self.window = window
        self.min_decisions = min_decisions
        self.min_per_path = min_per_path
        self.seed = seed
        self.epochs = epochs
        self.worker = worker
        self.ray = ray  # None: in process
        self._attempted: dict[str, datetime] = {}
        self._threads: dict[str, asyncio.Future[tuple[Any, int]]] = {}  # each tenant's last training thread

    def trigger(self, tenant: OptedIn, now: datetime) -> str | None:
        """Why ``tenant`` is due now (:func:`due` over the registry and this process's last attempt), or None."""
        own = tenant_model_name(tenant.slug)
        latest = self.registry.latest(own)
        names = [own] + ([tenant.serving_model] if tenant.serving_model else [])
        return due(
            now,
            tenant.schedule,
            _parse(latest.created_at) if latest is not None else None,
            self._attempted.get(tenant.slug),
            flag_times(self.registry, names),
        )

    async def run_once(self, now: datetime | None = None) -> list[TrainingRun]:
        """One pass over the opted-in tenants; each due one is trained (or refused) and audited, and promoted only
        with ``auto_promote`` and a passed gate."""
        runs: list[TrainingRun] = []
        for tenant in await opted_in(self.admin_url):
            at = now or datetime.now(UTC)
            try:
                runs.append(await self.run_tenant(tenant, at))
            except Exception as exc:  # one tenant's failure never stops the others
                log.exception("tenant model training failed", extra={"fields": {"tenant": tenant.slug}})
                runs.append(TrainingRun(tenant.slug, None, "failed", reason=f"{type(exc).__name__}: {exc}"))
        return runs

    async def run_tenant(self, tenant: OptedIn, now: datetime) -> TrainingRun:
        pending = self._threads.get(tenant.slug)
        if pending is not None and not pending.done():  # still training (its pass was cancelled): never twice at once
            return TrainingRun(tenant.slug, None, "running")
        verdict = await self.check_drift(tenant)  # before deciding: a drift flag makes it due now
        trigger = self.trigger(tenant, now)
        if trigger is None:
            return TrainingRun(tenant.slug, None, "not_due", drift=verdict)
        self._attempted[tenant.slug] = now
        return dataclasses.replace(await self._train(tenant, trigger), drift=verdict)

    async def check_drift(self, tenant: OptedIn) -> str | None:
        """The drift check of the tenant's own model when its planner serves it and it has a production version
        (:func:`firstmile.ml.drift.check_tenant_model`: one query, flagged on drift, audited); its verdict, None when
        not checked. A failing check is logged and skipped: the tenant keeps its schedule."""
        own = tenant_model_name(tenant.slug)
        if tenant.serving_model != own:
            return None
        try:
            result = await drift.check_tenant_model(
                self.admin_url, self.registry, tenant.tenant_id, tenant.slug, window=self.drift_window,
                operator=self.worker, scheduled=True,
            )  # fmt: skip
        except Exception:
            log.exception("tenant model drift check failed", extra={"fields": {"tenant": tenant.slug}})
            return "failed"
        if result is None:
            return None
        if result.retrain:
            log.warning(
                "tenant model drift", extra={"fields": {"tenant": tenant.slug, "version": result.version,
                                                        "reason": result.reason, "flagged": result.flagged}},
            )  # fmt: skip
        return result.verdict

    async def _train(self, tenant: OptedIn, trigger: str) -> TrainingRun:
        base: dict[str, Any] = {
            "action": "models.train", "trigger": trigger, "scheduled": True, "model": tenant_model_name(tenant.slug),
            "horizon_days": self.horizon.total_seconds() / 86_400, "window_days": self.window.total_seconds() / 86_400,
            **tm.where_trained(self.ray),
        }  # fmt: skip
        try:
            data = await tm.load_tenant_data(self.admin_url, tenant.slug, self.horizon, self.window)
            # the CPU-heavy part (the eligibility of every decision, training, the report, the registry's write)
            # in a worker thread: the scheduler's other tasks keep running meanwhile
            # (shielded: a cancelled pass leaves the thread to finish, and the next pass sees it running)
            thread = asyncio.ensure_future(asyncio.to_thread(self._fit, data))
            self._threads[tenant.slug] = thread
            mv, logged_n = await asyncio.shield(thread)
        except tm.TrainingRefusedError as exc:
            log.warning("tenant model training refused", extra={"fields": {"tenant": tenant.slug, "reason": str(exc)}})
            await self._audit(tenant, f"model:{tenant_model_name(tenant.slug)}", base | {
                "refused": True, "reason": str(exc),
            })  # fmt: skip
            return TrainingRun(tenant.slug, trigger, "refused", reason=str(exc))
        report = tm.report_of(mv)
        await self._audit(tenant, f"model:{mv.name}@{mv.version}", base | {
            "refused": False, "version": mv.version, "decisions": logged_n, "catalog": mv.config["catalog"],
            **tm.gate_figures(report), "warm_start": mv.config.get("warm_start"),
        })  # fmt: skip
        log.info(
            "tenant model registered",
            extra={"fields": {"tenant": tenant.slug, "version": mv.version, "trigger": trigger}},
        )
        promoted = tenant.auto_promote and await self._auto_promote(tenant, mv.name, mv.version, report)
        return TrainingRun(tenant.slug, trigger, "registered", version=mv.version, promoted=promoted)

    async def _auto_promote(self, tenant: OptedIn, name: str, version: str, report: Mapping[str, Any]) -> bool:
        """``planner.training.auto_promote``: the candidate just registered goes straight to production when it
        passed the off-policy gate, and only then; either way a ``models.promote`` entry with ``auto: true``. A
        refusal leaves the stages as they were: the current model keeps serving."""
        payload: dict[str, Any] = {
            "action": "models.promote", "model": name, "version": version, "stage": "production", "auto": True,
            "scheduled": True, **tm.gate_figures(report),
        }  # fmt: skip
        subject = f"model:{name}@{version}"
        if not report["gate_passed"]:
            await self._audit(tenant, subject, payload | {"refused": True})
            log.info("tenant model not promoted: the off-policy gate failed", extra={"fields": {
                "tenant": tenant.slug, "version": version}})  # fmt: skip
            return False
        previous = self.registry.stages(name).production
        # forced: the stage order (shadow → canary) is what the gate stands for here; the history says who and when
        await asyncio.to_thread(self.registry.promote, name, version, "production", actor=self.worker.actor, force=True)
        await self._audit(tenant, subject, payload | {"refused": False, "previous": previous})
        log.info("tenant model promoted", extra={"fields": {"tenant": tenant.slug, "version": version}})
        return True

    def _fit(self, data: tm.TenantData) -> tuple[Any, int]:
        logged = tm.logged_data(data, min_decisions=self.min_decisions, min_per_path=self.min_per_path)
        return tm.register(self.registry, data, logged, seed=self.seed, epochs=self.epochs, ray=self.ray), logged.n

    async def _audit(self, tenant: OptedIn, subject: str, payload: Mapping[str, Any]) -> None:
        await tm.audit_model_event(self.admin_url, tenant.tenant_id, subject, payload, operator=self.worker)
