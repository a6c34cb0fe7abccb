"""The lifecycle of an experiment (the orchestrator that allocates is :mod:`firstmile.experiments.orchestrator`).

**Lifecycle** (draft → approved → running → stopped → concluded): :func:`sync_manifest` creates a draft for
each experiment the manifest declares and updates a draft's definition; a definition that changes once the
experiment left draft is refused (its seed and variants decide who sees what). :func:`approve`,
:func:`start`, :func:`stop` and :func:`conclude` move it on, each audited with who did it, and bump the
tenant's revision so every process sees the change at its next start.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from firstmile.audit import service as audit
from firstmile.experiments import repository as repo
from firstmile.kit.db import TenantTx
from firstmile.nudges.content import variant_names
from firstmile.onboarding import paths
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


async def experiment(tx: TenantTx, experiment_id: str) -> repo.ExperimentRow | None:
    """One experiment of the tenant, or None."""
    return await repo.get(tx, experiment_id)


async def experiments(tx: TenantTx) -> list[repo.ExperimentRow]:
    """Every experiment of the tenant with its status."""
    return await repo.all_experiments(tx)


async def user_exposures(tx: TenantTx, user_id: str) -> list[tuple[str, str, datetime]]:
    """The experiments the user was exposed to, oldest first: (experiment, variant, exposed at)."""
    return await repo.exposures_of(tx, user_id)


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
    "ExperimentRow",
    "approve",
    "check_definition",
    "conclude",
    "declare",
    "delete_user",
    "draft",
    "experiment",
    "experiments",
    "exposure_counts",
    "history",
    "promote",
    "start",
    "stop",
    "sync_manifest",
    "user_exposures",
]
