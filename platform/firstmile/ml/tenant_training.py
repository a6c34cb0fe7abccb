"""Scheduled training of the tenants' own path models: the ``tenant-model-training`` task.

Every ``FIRSTMILE_TENANT_TRAINING_SECONDS`` the scheduler looks at the tenants whose manifest opts in
(``planner.training: {schedule_days: N}``) and, for each one that is *due* (:func:`due`), runs what
``firstmile models train --tenant SLUG`` runs: read its logged decisions, refuse what cannot support a model,
train in a worker thread (so the scheduler's loop keeps serving its other tasks), register the candidate
``tenant-<slug>.path_classifier`` with its off-policy report. It never promotes: promotion stays manual and
behind the off-policy gate (``firstmile models promote --tenant``). Each run is audited in the tenant's log
(kind ``model``, ``"action": "models.train"``, ``"trigger"``), a refusal too (``"refused": true`` and the
reason; the current model keeps serving). One tenant's failure is logged and the others go on; a tenant is
never trained twice at once by one process. Training runs in process (Ray is not wired for it).

It reads as the schema owner (as the CLI does), so it needs the owner's URL: docs/models.md#scheduled-training.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.kit.scope import OperatorContext
from firstmile.ml import tenant_models as tm
from firstmile.ml.planner import tenant_model_name
from firstmile.tenancy import service as tenancy

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


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """What one pass did for one tenant."""

    slug: str
    trigger: str | None  # first | drift | schedule; None: not due
    outcome: str  # not_due | registered | refused | failed | running
    version: str | None = None
    reason: str | None = None


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
        found.append(
            OptedIn(tenant_id, str(slug), timedelta(days=float(days)), model if isinstance(model, str) else None)
        )
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
    ) -> None:
        self.admin_url = admin_url
        self.registry = registry
        self.horizon = horizon
        self.window = window
        self.min_decisions = min_decisions
        self.min_per_path = min_per_path
        self.seed = seed
        self.epochs = epochs
        self.worker = worker
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
        """One pass over the opted-in tenants; each due one is trained (or refused), audited, never promoted."""
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
        trigger = self.trigger(tenant, now)
        if trigger is None:
            return TrainingRun(tenant.slug, None, "not_due")
        self._attempted[tenant.slug] = now
        return await self._train(tenant, trigger)

    async def _train(self, tenant: OptedIn, trigger: str) -> TrainingRun:
        base: dict[str, Any] = {
            "action": "models.train", "trigger": trigger, "scheduled": True, "model": tenant_model_name(tenant.slug),
            "horizon_days": self.horizon.total_seconds() / 86_400, "window_days": self.window.total_seconds() / 86_400,
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
            "gate_passed": report["gate_passed"], "dr_low": report["estimates"]["dr"]["low"],
            "logged_rate": report["logging_policy"]["value"],
        })  # fmt: skip
        log.info(
            "tenant model registered",
            extra={"fields": {"tenant": tenant.slug, "version": mv.version, "trigger": trigger}},
        )
        return TrainingRun(tenant.slug, trigger, "registered", version=mv.version)

    def _fit(self, data: tm.TenantData) -> tuple[Any, int]:
        logged = tm.logged_data(data, min_decisions=self.min_decisions, min_per_path=self.min_per_path)
        return tm.register(self.registry, data, logged, seed=self.seed, epochs=self.epochs), logged.n

    async def _audit(self, tenant: OptedIn, subject: str, payload: Mapping[str, Any]) -> None:
        await tm.audit_model_event(self.admin_url, tenant.tenant_id, subject, payload, operator=self.worker)
