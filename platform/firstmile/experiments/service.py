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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from firstmile.audit import service as audit
from firstmile.experiments import repository as repo
from firstmile.experiments.allocation import Experiment, Rule, Variant, allocate_all
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, statement_deadline
from firstmile.kit.outbox import OutboxEvent, enqueue
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.assignment import NudgeAssignment, NudgeVariant
from firstmile.nudges.content import variant_names
from firstmile.onboarding import paths
from firstmile.onboarding.assignment import Assignment
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import ExperimentSpec, ExperimentsSpec, NudgesSpec

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


# ---- lifecycle -----------------------------------------------------------------------------------------------


def _definition(spec: ExperimentSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def check_definition(spec: ExperimentSpec, known_paths: Collection[str] | None, nudges: NudgesSpec | None) -> None:
    """Refuse (400) variants that name a path or a nudge template variant the tenant does not have
    (``known_paths`` None: the paths were checked already, as the manifest's validation does)."""
    unknown = sorted({v.path for v in spec.variants if v.path is not None} - set(known_paths or ()))
    if known_paths is not None and unknown:
        raise ExperimentError(400, "validation-error", f"variants name unknown paths {unknown} (at variants)")
    templates = variant_names(nudges.templates if nudges is not None else ())
    unknown = sorted({v.template for v in spec.variants if v.template is not None} - templates)
    if unknown:
        raise ExperimentError(400, "validation-error", f"experiment {spec.id}: variants name unknown nudge "
                              f"templates {unknown} (at variants); known: {sorted(templates)}")  # fmt: skip


def _stored(row: repo.ExperimentRow) -> dict[str, Any]:
    """A stored definition as the current model writes it (fields added since then at their defaults)."""
    return _definition(ExperimentSpec.model_validate(row.definition))


async def sync_manifest(
    tx: TenantTx, spec: ExperimentsSpec | None, actor: str, nudges: NudgesSpec | None = None
) -> list[str]:
    """Create a draft for each experiment the manifest declares, update drafts; what changed, one line each.

    An experiment that left draft keeps its seed, control, variants, layer and metric: a manifest that
    changes them is refused (:class:`ExperimentError`, 409), and nothing of the manifest is applied. Its
    traffic, targeting, thresholds and plan may change (raising the traffic moves no one). ``nudges``: the
    manifest's nudges section, whose templates a nudge experiment's variants may name (400 otherwise).
    """
    changes: list[str] = []
    for entry in spec.experiments if spec is not None else ():
        check_definition(entry, None, nudges)
        definition = _definition(entry)
        existing = await repo.get(tx, entry.id, for_update=True)
        if existing is None:
            await repo.insert_draft(tx, entry.id, definition)
            await audit.append(tx, "experiment", actor, entry.id, {"action": "draft", "definition": definition})
            changes.append(f"experiment {entry.id}: draft")
            continue
        stored = _stored(existing)
        if stored == definition:
            continue
        if existing.status != "draft":
            fixed = [k for k in _FIXED if stored.get(k) != definition.get(k)]
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
    """An experiment drafted in the admin UI (an editor), or a draft redrafted; 409 once it left draft, 400 when
    a variant names a path or a nudge template the tenant does not have."""
    check_definition(spec, {key for key, _, _ in await paths.current_paths(tx)}, await tenancy.nudges_spec(tx))
    if spec.trigger is not None and spec.trigger != "stuck":
        nudges = await tenancy.nudges_spec(tx)
        if spec.trigger not in {t.id for t in (nudges.triggers if nudges is not None else ())}:
            raise ExperimentError(400, "validation-error", f"trigger {spec.trigger} is not `stuck` nor one of the "
                                  "manifest's nudges.triggers (at trigger)")  # fmt: skip
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
    if spec.kind != "path":
        raise ExperimentError(409, "experiment-kind", f"experiment {experiment_id} is a nudge experiment: promotion "
                              "makes a path; apply its winner by editing the manifest's nudge templates")  # fmt: skip
    control = next(v for v in spec.variants if v.name == spec.control)
    winner = next(v for v in spec.variants if v.name == verdict["variant"])
    assert control.path is not None and winner.path is not None
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
    "check_definition",
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
