"""The experiment orchestrator: allocation at a start and at a nudge decision, and exposures.

**Allocation** (:class:`ExperimentOrchestrator`, the onboarding slice's
:class:`~firstmile.onboarding.assignment.ExperimentAssigner`): a start asks it first. It holds the tenant's
running experiments per tenant revision (one short read when the revision moves; every lifecycle change
bumps it) and allocates with :mod:`firstmile.experiments.allocation`, a pure function of the seeds and the
user's id. Whatever goes wrong (the read fails or exceeds ``timeout_s``, a definition does not parse) the
answer is None: the user gets the planner's path, which is the control experience (the design's rule), and
``firstmile_experiment_allocation_fallbacks_total`` counts it. A user is in at most one path experiment (the
first by id); its variants name the path each arm starts on. A nudge decision asks it too
(:meth:`ExperimentOrchestrator.assign_nudge`, the nudges slice's
:class:`~firstmile.nudges.assignment.NudgeExperimentAssigner`), inside the decision's transaction.

**Exposure** (:meth:`ExperimentOrchestrator.record`, :meth:`ExperimentOrchestrator.record_nudge`, in the start's
or the decision's transaction): one row per user and experiment (``ON CONFLICT DO NOTHING``: once), an
``experiment.exposed`` event for the analytics stream, and the decision's own audit entry carries the
experiment, the variant and the hash inputs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from firstmile.experiments import repository as repo
from firstmile.experiments.allocation import Experiment, Rule, Variant, allocate_all
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, statement_deadline
from firstmile.kit.outbox import OutboxEvent, enqueue
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.assignment import NudgeAssignment, NudgeVariant
from firstmile.onboarding.assignment import Assignment
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import ExperimentSpec

log = logging.getLogger("firstmile.experiments")


@dataclass(frozen=True, slots=True)
class Running:
    """The tenant's running experiments, ready to allocate with: path experiments, and nudge experiments."""

    experiments: tuple[tuple[ExperimentSpec, Experiment], ...]
    holdout_percent: float
    tenant_seed: str
    nudges: tuple[tuple[ExperimentSpec, Experiment], ...] = ()


def nudge_variants(spec: ExperimentSpec) -> tuple[NudgeVariant, ...]:
    """The variants of a nudge experiment as the nudge executor applies them."""
    return tuple(NudgeVariant(v.name, v.template, v.channel) for v in spec.variants)


def to_allocation(spec: ExperimentSpec) -> Experiment:
    """The allocation view of a manifest entry."""
    return Experiment(
        id=spec.id,
        seed=spec.allocation_seed,
        variants=tuple(Variant(v.name, v.weight) for v in spec.variants),
        traffic_percent=spec.traffic_percent,
        layer=spec.layer.name if spec.layer is not None else None,
        layer_range=spec.layer.range if spec.layer is not None else (0.0, 100.0),
        targeting=tuple(Rule(p.field, p.op, p.value) for p in spec.targeting),
    )


class ExperimentOrchestrator:
    """Allocates starting users to running path experiments and records their exposures (module docstring)."""

    def __init__(self, *, timeout_s: float = 0.05, cache_size: int = 10_000, nudge_timeout_s: float = 0.5) -> None:
        self.timeout_s = timeout_s
        self.nudge_timeout_s = nudge_timeout_s
        """A nudge decision's reads (in its transaction, under a statement timeout): decisions run in the
        background, so they may wait longer than a start."""
        self.cache_size = cache_size
        self._running: OrderedDict[TenantId, tuple[int, Running]] = OrderedDict()
        self._loading: dict[tuple[TenantId, int], asyncio.Future[Running]] = {}

    async def running(self, uow: UnitOfWork, revision: int) -> Running:
        """The tenant's running experiments at ``revision``: this process's copy, else one short read.

        Concurrent starts of a tenant share one read, and a read that outlasts the caller's timeout goes on
        in the background and fills the cache, so the starts after it are allocated."""
        cached = self._running.get(uow.tenant)
        if cached is not None and cached[0] == revision:
            return cached[1]
        key = (uow.tenant, revision)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(uow, revision))
            self._loading[key] = task
            task.add_done_callback(partial(self._loaded, key))
        return await asyncio.shield(task)

    def _loaded(self, key: tuple[TenantId, int], task: asyncio.Future[Running]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved here: the caller may be gone
            log.warning("reading the running experiments failed: %s", task.exception())

    async def _load(self, uow: UnitOfWork, revision: int) -> Running:
        return self._keep(uow.tenant, revision, await uow.run(load_running))

    def _keep(self, tenant: TenantId, revision: int, found: Running) -> Running:
        self._running[tenant] = (revision, found)
        self._running.move_to_end(tenant)
        while len(self._running) > self.cache_size:
            self._running.popitem(last=False)
        return found

    async def assign(
        self, uow: UnitOfWork, revision: int, user_id: str, traits: Mapping[str, Any]
    ) -> Assignment | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                running = await self.running(uow, revision)
            if not running.experiments:
                return None
            specs = {spec.id: spec for spec, _ in running.experiments}
            found = allocate_all([e for _, e in running.experiments], user_id, traits,
                                 tenant_seed=running.tenant_seed, holdout_percent=running.holdout_percent)  # fmt: skip
        except Exception as exc:  # allocation must never fail a start: control (the planner's path) instead
            log.warning("experiment allocation failed, control: %s", exc, extra={"fields": {"tenant": str(uow.tenant)}})
            telemetry.EXPERIMENT_ALLOCATION_FALLBACKS.labels(type(exc).__name__).inc()
            return None
        if not found:
            return None
        allocation = found[0]  # path experiments: the first by id (layers keep experiments apart)
        variant = next(v for v in specs[allocation.experiment].variants if v.name == allocation.variant)
        assert variant.path is not None  # the manifest requires a path of every path experiment's variant
        return Assignment(allocation.experiment, allocation.variant, variant.path, variant.version, allocation.inputs)

    async def record(self, tx: TenantTx, user_id: str, assignment: Assignment, now: datetime) -> None:
        await _expose(tx, user_id, assignment.experiment, assignment.variant, now, assignment.inputs,
                      {"kind": "path", "path_id": assignment.path_key})  # fmt: skip

    async def assign_nudge(
        self, tx: TenantTx, user_id: str, traits: Mapping[str, Any], trigger: str
    ) -> NudgeAssignment | None:
        """The user's variant of a running nudge experiment covering ``trigger``: the recorded one when the user
        was exposed before (a later traffic change moves no one), else a fresh allocation; None when none admits
        the user, and on any failure (the decision is then the bandit's alone: the control experience)."""
        try:
            async with statement_deadline(tx, self.nudge_timeout_s):
                revision = await tenancy.revision(tx)
                cached = self._running.get(tx.tenant)
                running = cached[1] if cached is not None and cached[0] == revision else self._keep(
                    tx.tenant, revision, await load_running(tx))  # fmt: skip
                covering = [(s, e) for s, e in running.nudges if s.trigger in (None, trigger)]
                if not covering:
                    return None
                recorded = await repo.user_exposures(tx, user_id, [s.id for s, _ in covering])
            found = allocate_all([e for _, e in covering], user_id, traits, tenant_seed=running.tenant_seed,
                                 holdout_percent=running.holdout_percent)  # fmt: skip
        except Exception as exc:  # allocation must never fail a decision: the bandit's choice instead
            log.warning("nudge experiment allocation failed, control: %s", exc,
                        extra={"fields": {"tenant": str(tx.tenant)}})  # fmt: skip
            telemetry.EXPERIMENT_ALLOCATION_FALLBACKS.labels(type(exc).__name__).inc()
            return None
        allocated = {a.experiment: a for a in found}
        for spec, _ in covering:
            variant = recorded.get(spec.id)
            if variant is None:
                continue
            again = allocated.get(spec.id)
            if again is not None:  # the consistency metric: does this process allocate as the first one did?
                telemetry.EXPERIMENT_ALLOCATION_CONSISTENCY.labels("agree" if again.variant == variant else
                                                                   "disagree").inc()  # fmt: skip
            variants = nudge_variants(spec)
            mine = next((v for v in variants if v.name == variant), None)
            if mine is not None:
                return NudgeAssignment(spec.id, mine, variants, exposed=True)
        if not found:
            return None
        first = found[0]  # at most one per layer; of several layers, the first by id
        spec = next(s for s, _ in covering if s.id == first.experiment)
        variants = nudge_variants(spec)
        mine = next(v for v in variants if v.name == first.variant)
        return NudgeAssignment(spec.id, mine, variants, exposed=False, inputs=first.inputs)

    async def record_nudge(
        self, tx: TenantTx, user_id: str, assignment: NudgeAssignment, now: datetime, send_id: str
    ) -> None:
        await _expose(tx, user_id, assignment.experiment, assignment.variant.name, now, assignment.inputs,
                      {"kind": "nudge", "send_id": send_id})  # fmt: skip

    async def recheck(self, tx: TenantTx, user_id: str, assignment: Assignment) -> None:
        recorded = await repo.exposure(tx, assignment.experiment, user_id)
        if recorded is not None:
            outcome = "agree" if recorded == assignment.variant else "disagree"
            telemetry.EXPERIMENT_ALLOCATION_CONSISTENCY.labels(outcome).inc()


async def _expose(
    tx: TenantTx, user_id: str, experiment: str, variant: str, now: datetime, inputs: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> None:  # fmt: skip
    """One exposure row per user and experiment (a repeat writes nothing) and its ``experiment.exposed`` event."""
    if not await repo.insert_exposure(tx, experiment, user_id, variant, now, inputs):
        return
    payload = {"user_id": user_id, "experiment_id": experiment, "variant": variant, "inputs": dict(inputs)} | dict(
        extra
    )
    await enqueue(tx, [OutboxEvent.new("experiment.exposed", payload)], user_id=user_id, now=now)
    telemetry.EXPERIMENT_EXPOSURES.labels(variant).inc()


async def load_running(tx: TenantTx) -> Running:
    """The tenant's running experiments with the manifest's holdout (a short read of two rows' worth)."""
    spec = await tenancy.experiments_spec(tx)
    rows = await repo.running(tx)
    paths_: list[tuple[ExperimentSpec, Experiment]] = []
    nudges: list[tuple[ExperimentSpec, Experiment]] = []
    for row in rows:
        entry = ExperimentSpec.model_validate(row.definition)
        (paths_ if entry.kind == "path" else nudges).append((entry, to_allocation(entry)))
    holdout = spec.holdout_percent if spec is not None else 0.0
    return Running(tuple(paths_), holdout, str(tx.tenant), tuple(nudges))


__all__ = ["ExperimentOrchestrator", "Running", "load_running", "nudge_variants", "to_allocation"]
