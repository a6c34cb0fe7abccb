"""The experiment orchestrator: allocation at a start, exposures, and the lifecycle of an experiment.

**Allocation** (:class:`ExperimentOrchestrator`, the onboarding slice's
:class:`~firstmile.onboarding.assignment.ExperimentAssigner`): a start asks it first. It holds the tenant's
running experiments per tenant revision (one short read when the revision moves; every lifecycle change
bumps it) and allocates with :mod:`firstmile.experiments.allocation`, a pure function of the seeds and the
user's id. Whatever goes wrong (the read fails or exceeds ``timeout_s``, a definition does not parse) the
answer is None: the user gets the planner's path, which is the control experience (the design's rule), and
``firstmile_experiment_allocation_fallbacks_total`` counts it. Path experiments only: a user is in at most
one of them (the first by id); an experiment's variants name the path each arm starts on.

**Exposure** (:meth:`ExperimentOrchestrator.record`, in the start's transaction): one row per user and
experiment (``ON CONFLICT DO NOTHING``: once), an ``experiment.exposed`` event for the analytics stream, and
the start's own audit entry (the path decision) carries the experiment, the variant and the hash inputs.

**Lifecycle** (draft → approved → running → stopped → concluded): :func:`sync_manifest` creates a draft for
each experiment the manifest declares and updates a draft's definition; a definition that changes once the
experiment left draft is refused (its seed and variants decide who sees what). :func:`approve`,
:func:`start`, :func:`stop` and :func:`conclude` move it on, each audited with who did it, and bump the
tenant's revision so every process sees the change at its next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from firstmile.audit import service as audit
from firstmile.experiments import repository as repo
from firstmile.experiments.allocation import Experiment, Rule, Variant, allocate_all
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx
from firstmile.kit.outbox import OutboxEvent, enqueue
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import paths
from firstmile.onboarding.assignment import Assignment
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import ExperimentSpec, ExperimentsSpec

log = logging.getLogger("firstmile.experiments")
ExperimentRow = repo.ExperimentRow
"""An experiment as stored: its definition, status, who approved and started it, its verdict."""

STATUSES = ("draft", "approved", "running", "stopped", "concluded")
_FIXED = ("seed", "control", "variants", "layer", "metric")
"""What may not change once an experiment left draft: it decides who sees what, and what is measured."""


class ExperimentError(Exception):
    """A lifecycle change that is not allowed; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Running:
    """The tenant's running path experiments, ready to allocate with."""

    experiments: tuple[tuple[ExperimentSpec, Experiment], ...]
    holdout_percent: float
    tenant_seed: str


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

    def __init__(self, *, timeout_s: float = 0.05, cache_size: int = 10_000) -> None:
        self.timeout_s = timeout_s
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
        found = await uow.run(load_running)
        self._running[uow.tenant] = (revision, found)
        self._running.move_to_end(uow.tenant)
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
        return Assignment(allocation.experiment, allocation.variant, variant.path, variant.version, allocation.inputs)

    async def record(self, tx: TenantTx, user_id: str, assignment: Assignment, now: datetime) -> None:
        if not await repo.insert_exposure(tx, assignment.experiment, user_id, assignment.variant, now,
                                          assignment.inputs):  # fmt: skip
            return
        payload = {"user_id": user_id, "experiment_id": assignment.experiment, "variant": assignment.variant,
                   "path_id": assignment.path_key, "inputs": dict(assignment.inputs)}  # fmt: skip
        await enqueue(tx, [OutboxEvent.new("experiment.exposed", payload)], user_id=user_id, now=now)
        telemetry.EXPERIMENT_EXPOSURES.labels(assignment.variant).inc()

    async def recheck(self, tx: TenantTx, user_id: str, assignment: Assignment) -> None:
        recorded = await repo.exposure(tx, assignment.experiment, user_id)
        if recorded is not None:
            outcome = "agree" if recorded == assignment.variant else "disagree"
            telemetry.EXPERIMENT_ALLOCATION_CONSISTENCY.labels(outcome).inc()


async def load_running(tx: TenantTx) -> Running:
    """The tenant's running experiments with the manifest's holdout (a short read of two rows' worth)."""
    spec = await tenancy.experiments_spec(tx)
    rows = await repo.running(tx)
    experiments = []
    for row in rows:
        entry = ExperimentSpec.model_validate(row.definition)
        experiments.append((entry, to_allocation(entry)))
    holdout = spec.holdout_percent if spec is not None else 0.0
    return Running(tuple(experiments), holdout, str(tx.tenant))


# ---- lifecycle -----------------------------------------------------------------------------------------------


def _definition(spec: ExperimentSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


async def sync_manifest(tx: TenantTx, spec: ExperimentsSpec | None, actor: str) -> list[str]:
    """Create a draft for each experiment the manifest declares, update drafts; what changed, one line each.

    An experiment that left draft keeps its seed, control, variants, layer and metric: a manifest that
    changes them is refused (:class:`ExperimentError`, 409), and nothing of the manifest is applied. Its
    traffic, targeting, thresholds and plan may change (raising the traffic moves no one).
    """
    changes: list[str] = []
    for entry in spec.experiments if spec is not None else ():
        definition = _definition(entry)
        existing = await repo.get(tx, entry.id, for_update=True)
        if existing is None:
            await repo.insert_draft(tx, entry.id, definition)
            await audit.append(tx, "experiment", actor, entry.id, {"action": "draft", "definition": definition})
            changes.append(f"experiment {entry.id}: draft")
            continue
        if dict(existing.definition) == definition:
            continue
        if existing.status != "draft":
            fixed = [k for k in _FIXED if existing.definition.get(k) != definition.get(k)]
            if fixed:
                raise ExperimentError(
                    409, "experiment-fixed",
                    f"experiment {entry.id} is {existing.status}: its {', '.join(fixed)} can no longer change "
                    "(they decide who sees what); declare a new experiment instead",
                )  # fmt: skip
        await repo.set_definition(tx, entry.id, definition)
        await audit.append(tx, "experiment", actor, entry.id, {"action": "redefine", "definition": definition})
        changes.append(f"experiment {entry.id}: definition updated ({existing.status})")
    if changes:
        await tenancy.bump_revision(tx)
    return changes


async def draft(tx: TenantTx, spec: ExperimentSpec, actor: str) -> repo.ExperimentRow:
    """An experiment drafted in the admin UI (an editor), or a draft redrafted; 409 once it left draft."""
    definition = _definition(spec)
    existing = await repo.get(tx, spec.id, for_update=True)
    if existing is not None and existing.status != "draft":
        raise ExperimentError(409, "experiment-state", f"experiment {spec.id} is {existing.status}, not a draft")
    if existing is None:
        await repo.insert_draft(tx, spec.id, definition)
    else:
        await repo.set_definition(tx, spec.id, definition)
    await audit.append(tx, "experiment", actor, spec.id, {"action": "draft", "definition": definition})
    row = await repo.get(tx, spec.id)
    assert row is not None
    return row


async def _transition(
    tx: TenantTx, experiment_id: str, allowed: Sequence[str], to: str, actor: str, **values: Any
) -> repo.ExperimentRow:
    row = await repo.get(tx, experiment_id, for_update=True)
    if row is None:
        raise ExperimentError(404, "experiment-not-found", f"no experiment {experiment_id!r}")
    if row.status not in allowed:
        raise ExperimentError(
            409, "experiment-state",
            f"experiment {experiment_id} is {row.status}: it can be {to} only when {' or '.join(allowed)}",
        )  # fmt: skip
    await repo.transition(tx, experiment_id, allowed, to, **values)
    await audit.append(tx, "experiment", actor, experiment_id, {"action": to, "from": row.status} | {
        k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in values.items()})  # fmt: skip
    await tenancy.bump_revision(tx)
    updated = await repo.get(tx, experiment_id)
    assert updated is not None
    return updated


async def approve(tx: TenantTx, experiment_id: str, actor: str) -> repo.ExperimentRow:
    """An owner approves a draft (the API checks the role; the audit entry names who)."""
    return await _transition(tx, experiment_id, ("draft",), "approved", actor, approved_by=actor)


async def start(tx: TenantTx, experiment_id: str, actor: str, now: datetime) -> repo.ExperimentRow:
    """Start an approved experiment: starting users are allocated from now on."""
    row = await repo.get(tx, experiment_id)
    days = int(row.definition.get("planned_days", 14)) if row is not None else 14
    return await _transition(tx, experiment_id, ("approved",), "running", actor, started_by=actor, started_at=now,
                             planned_end_at=now + timedelta(days=days))  # fmt: skip


async def stop(tx: TenantTx, experiment_id: str, actor: str, now: datetime) -> repo.ExperimentRow:
    """Stop allocating (users already exposed keep their path)."""
    return await _transition(tx, experiment_id, ("running",), "stopped", actor, stopped_at=now)


async def conclude(
    tx: TenantTx, experiment_id: str, actor: str, now: datetime, verdict: Mapping[str, Any]
) -> repo.ExperimentRow:
    """Conclude with its verdict (a winner, or inconclusive); a running experiment stops at the same time."""
    return await _transition(tx, experiment_id, ("running", "stopped"), "concluded", actor, concluded_at=now,
                             verdict=dict(verdict))  # fmt: skip


async def declare(
    tx: TenantTx, experiment_id: str, actor: str, now: datetime, verdict: Mapping[str, Any]
) -> repo.ExperimentRow:
    """Conclude the experiment with a winner ``verdict`` (the current analysis's); 409 without one."""
    if verdict.get("kind") != "winner" or not verdict.get("variant"):
        raise ExperimentError(409, "no-verdict",
                              f"experiment {experiment_id} has no winner to declare (the analysis says "
                              f"{verdict.get('kind')}: {'; '.join(verdict.get('reasons') or [])})")  # fmt: skip
    return await conclude(tx, experiment_id, actor, now, verdict)


async def promote(tx: TenantTx, experiment_id: str, actor: str) -> repo.ExperimentRow:
    """Make the declared winner the path of the control's audience, in one audited action: a new version of the
    control's path with the winner's steps (users already on a version stay there). 409 without a winner."""
    row = await repo.get(tx, experiment_id, for_update=True)
    if row is None:
        raise ExperimentError(404, "experiment-not-found", f"no experiment {experiment_id!r}")
    verdict = dict(row.verdict or {})
    if row.status != "concluded" or verdict.get("kind") != "winner":
        raise ExperimentError(409, "no-verdict", f"experiment {experiment_id} is {row.status} without a declared "
                                                 "winner: declare one first")  # fmt: skip
    if verdict.get("promoted"):
        raise ExperimentError(409, "experiment-state", f"experiment {experiment_id} was promoted already")
    spec = ExperimentSpec.model_validate(row.definition)
    control = next(v for v in spec.variants if v.name == spec.control)
    winner = next(v for v in spec.variants if v.name == verdict["variant"])
    if winner.path == control.path:
        raise ExperimentError(409, "experiment-state", "the winner starts users on the control's path already")
    edit = await paths.adopt_path(tx, control.path, winner.path)
    promoted = {"path": control.path, "from_version": edit.from_version, "to_version": edit.to_version,
                "steps_of": winner.path, "by": actor}  # fmt: skip
    await repo.set_verdict(tx, experiment_id, verdict | {"promoted": promoted})
    await audit.append(tx, "experiment", actor, experiment_id, {"action": "promoted"} | promoted)
    await tenancy.bump_revision(tx)
    updated = await repo.get(tx, experiment_id)
    assert updated is not None
    return updated


async def experiments(tx: TenantTx) -> list[repo.ExperimentRow]:
    """Every experiment of the tenant with its status."""
    return await repo.all_experiments(tx)


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    """Delete the user's exposures (an erasure); how many rows."""
    return await repo.delete_user(tx, user_id)


async def history(tx: TenantTx, experiment_id: str) -> list[tuple[int, Mapping[str, Any]]]:
    """The scheduled review's daily looks at the experiment, oldest first (day, look)."""
    return await repo.looks(tx, experiment_id)


async def exposure_counts(tx: TenantTx, experiment_id: str) -> dict[str, int]:
    """Exposures per variant."""
    return await repo.exposure_counts(tx, experiment_id)


__all__ = [
    "STATUSES",
    "ExperimentError",
    "ExperimentOrchestrator",
    "ExperimentRow",
    "Running",
    "approve",
    "conclude",
    "declare",
    "delete_user",
    "draft",
    "experiments",
    "exposure_counts",
    "history",
    "load_running",
    "promote",
    "start",
    "stop",
    "sync_manifest",
    "to_allocation",
]
