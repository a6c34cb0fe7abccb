"""Per-tenant path models: learn from a tenant's own logged decisions, promote behind an off-policy gate.

``firstmile models train --tenant SLUG`` reads the tenant's logged path decisions (and only its own:
``onboarding.service.logged_decisions`` filters by tenant id), refuses when the data cannot support a
model (:class:`TrainingRefusedError`, naming the gap; nothing is registered and the current model keeps
serving), trains a per-path activation model in process (:mod:`firstmile_inference.tenant`), registers
it as ``tenant-<slug>.path_classifier`` with its off-policy report, and audits the run in the tenant's
log (kind ``model``). ``firstmile models promote --tenant SLUG VERSION --to canary|production`` checks
the stored report first: the candidate's DR lower bound must beat the logging policy's observed
activation rate (docs/models.md#per-tenant-models).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.audit import service as audit
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, OperatorContext
from firstmile.ml.planner import NUMERIC_FEATURES, TRAIT_FEATURES, FeatureReading, model_instance, tenant_model_name
from firstmile.onboarding import service as onboarding
from firstmile.onboarding.catalog import CatalogCache, PathCatalog
from firstmile.onboarding.planner import eligible_paths, plan
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion, Registry
    from firstmile_inference.tenant import LoggedData

MIN_DECISIONS: Final = 500
"""Logged decisions (old enough for the horizon) a tenant needs before its own model is trained."""
MIN_PER_PATH: Final = 50
"""Decisions each path must have been taken in, among the paths the logged users were eligible for."""
MIN_ACTIVATIONS: Final = 10
"""Activations within the horizon the logged decisions must hold: with fewer there is no outcome to learn or to
estimate (an evaluation set with none would let any positive estimate "beat" a logged rate of 0)."""
MIN_FEATURE_COVERAGE: Final = 0.5
"""The share of decisions that must carry each trait feature; below it the feature is missing from the logs."""
DEFAULT_HORIZON_DAYS: Final = 14.0
DEFAULT_WINDOW_DAYS: Final = 90.0
AUDIT_KIND: Final = "model"


class TrainingRefusedError(Exception):
    """The tenant's logged data cannot support a model; the message names the gap."""


@dataclass(frozen=True)
class TenantData:
    """A tenant's logged decisions and its current catalog (what training reads)."""

    tenant_id: uuid.UUID
    slug: str
    catalog: PathCatalog
    rows: Sequence[onboarding.LoggedDecision]
    horizon: timedelta
    window: timedelta


async def load_tenant_data(admin_url: str, slug: str, horizon: timedelta, window: timedelta) -> TenantData:
    """The tenant's logged decisions and current catalog, as the schema owner; :class:`TrainingRefusedError` for an
    unknown slug."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            found = await tenancy.find_tenant(conn, slug)
            if found is None:
                raise TrainingRefusedError(f"no tenant {slug!r} (firstmile tenants directory lists them)")
            rows = await onboarding.logged_decisions(conn, found.id, horizon, window)
        async with tenant_transaction(engine, OPERATOR_CLI.tenant(found.id)) as tx:
            catalog = await CatalogCache().reload(tx)
    finally:
        await engine.dispose()
    return TenantData(found.id, slug, catalog, rows, horizon, window)


def _features(row: onboarding.LoggedDecision) -> dict[str, Any]:
    """The nine features of a logged decision: what the model saw when one decided, else the plain traits (and
    unknown behaviour), exactly as the planner builds them (:func:`firstmile.ml.planner.model_instance`)."""
    reading = FeatureReading(row.features, "fresh") if row.features is not None else None
    return model_instance(row.traits, reading)


def logged_data(
    data: TenantData, *, min_decisions: int = MIN_DECISIONS, min_per_path: int = MIN_PER_PATH
) -> LoggedData:
    """The training set, or :class:`TrainingRefusedError` naming what is missing: too few decisions, decisions on path
    versions that are no longer current (a catalog change within the window), a feature the logs do not carry,
    too few decisions on a path."""
    import numpy as np

    from firstmile_inference.tenant import LoggedData

    n = len(data.rows)
    days = data.horizon.total_seconds() / 86_400
    window_days = data.window.total_seconds() / 86_400
    if n < min_decisions:
        raise TrainingRefusedError(
            f"tenant {data.slug} has {n} logged decisions at least {days:g} days old (the activation horizon) in the "
            f"last {window_days:g} days; at least {min_decisions} are needed. The current model keeps serving."
        )
    current = {p.key: p.version for p in data.catalog.current}
    stale = Counter((r.path_key, r.path_version) for r in data.rows if current.get(r.path_key) != r.path_version)
    if stale:
        named = ", ".join(
            f"{key}@{version} ({count} decisions; "
            + (f"current version {current[key]})" if key in current else "path retired)")
            for (key, version), count in sorted(stale.items())
        )
        raise TrainingRefusedError(
            f"the path catalog changed within the training window: decisions were logged on path versions that are "
            f"not current: {named}. Train again once those decisions are older than --window-days "
            f"({window_days:g}), or with a shorter --window-days. The current model keeps serving."
        )
    features = [_features(r) for r in data.rows]
    missing = []
    for feature in TRAIT_FEATURES.values():
        carried = sum(1 for f in features if f.get(feature) is not None)
        if carried < MIN_FEATURE_COVERAGE * n:
            missing.append(f"{feature} ({carried} of {n} decisions carry it)")
    if missing:
        raise TrainingRefusedError(
            f"a feature is missing from the logged decisions: {', '.join(missing)}; at least "
            f"{MIN_FEATURE_COVERAGE:.0%} of the decisions must carry each of {', '.join(TRAIT_FEATURES.values())}. "
            "Send the trait with each start. The current model keeps serving."
        )
    keys = tuple(p.key for p in data.catalog.current)
    index = {k: i for i, k in enumerate(keys)}
    eligible = np.zeros((n, len(keys)), dtype=np.bool_)
    for i, row in enumerate(data.rows):
        greedy = plan(data.catalog.current, data.catalog.default_key, row.traits).path_key
        for path in eligible_paths(data.catalog.current, data.catalog.default_key, row.traits, greedy):
            eligible[i, index[path.key]] = True
    taken = Counter(r.path_key for r in data.rows)
    short = [
        f"{keys[k]} (taken {taken[keys[k]]} times, eligible for {int(eligible[:, k].sum())} users)"
        for k in range(len(keys))
        if eligible[:, k].any() and taken[keys[k]] < min_per_path
    ]
    if short:
        raise TrainingRefusedError(
            f"too few decisions on a path: {', '.join(short)}; each path the logged users were eligible for needs "
            f"at least {min_per_path} (turn on exploration, planner.exploration.epsilon, so every eligible path "
            "is tried). The current model keeps serving."
        )
    activations = sum(1 for r in data.rows if r.activated)
    if activations < MIN_ACTIVATIONS:
        raise TrainingRefusedError(
            f"too few activations: {activations} of the {n} logged users activated within {days:g} days; at least "
            f"{MIN_ACTIVATIONS} are needed to learn and to evaluate a model. The current model keeps serving."
        )
    return LoggedData(
        features=features,
        actions=np.asarray([index[r.path_key] for r in data.rows], dtype=np.int64),
        rewards=np.asarray([1.0 if r.activated else 0.0 for r in data.rows], dtype=np.float64),
        propensities=np.asarray([r.propensity for r in data.rows], dtype=np.float64),
        eligible=eligible,
        paths=keys,
    )


def feature_coverage(data: LoggedData) -> dict[str, float]:
    """The share of decisions that carry each of the nine features (behaviour is unknown on rules decisions)."""
    n = max(1, data.n)
    names = (*TRAIT_FEATURES.values(), *NUMERIC_FEATURES)
    return {name: round(sum(1 for f in data.features if f.get(name) is not None) / n, 4) for name in names}


def register(
    registry: Registry, data: TenantData, logged: LoggedData, *, seed: int = 7, epochs: int | None = None
) -> ModelVersion:
    """Train on ``logged`` and register the candidate (no stage) under the tenant's model name."""
    import dataclasses

    from firstmile_inference.tenant import TENANT_HYPER, train_logged

    hyper = TENANT_HYPER if epochs is None else dataclasses.replace(TENANT_HYPER, epochs=epochs)
    trained = train_logged(logged, seed=seed, hyper=hyper)
    trained.config["tenant"] = {"id": str(data.tenant_id), "slug": data.slug}
    trained.config["catalog"] = {p.key: p.version for p in data.catalog.current}
    trained.config["training"] |= {
        "horizon_days": data.horizon.total_seconds() / 86_400,
        "window_days": data.window.total_seconds() / 86_400,
        "feature_coverage": feature_coverage(logged),
    }
    return registry.register(
        tenant_model_name(data.slug),
        weights=trained.state_dict,
        config=trained.config,
        metrics=trained.metrics,
        reference=trained.reference,
    )


def report_of(mv: ModelVersion) -> dict[str, Any]:
    """The off-policy report stored with a tenant model's version."""
    report = mv.metrics.get("ope")
    if not isinstance(report, dict):
        raise KeyError(f"{mv.name} {mv.version} has no off-policy report: it was not trained by models train --tenant")
    return report


def report_text(name: str, version: str, report: Mapping[str, Any]) -> str:
    """The report as an operator reads it: estimates, intervals, and the gate's verdict."""
    logged = report["logging_policy"]
    level = float(report["level"])
    lines = [
        f"{name} {version}: off-policy evaluation on {report['evaluation_decisions']} held-out logged decisions",
        f"  logging policy (observed)  {logged['value']:.3f}  [{logged['low']:.3f}, {logged['high']:.3f}]",
    ]
    for estimator in ("ips", "snips", "dr"):
        e = report["estimates"].get(estimator)
        if e is not None:
            lines.append(
                f"  candidate {estimator.upper():6}           {e['value']:.3f}  [{e['low']:.3f}, {e['high']:.3f}]  "
                f"{level:.0%} interval, effective sample {e['effective_sample_size']:.0f}"
            )
    dr_low = float(report["estimates"]["dr"]["low"])
    verdict = "passes" if report["gate_passed"] else "fails"
    lines.append(
        f"  gate: the candidate's DR lower bound {dr_low:.3f} must beat the current policy's {logged['value']:.3f}: "
        f"it {verdict}"
    )
    return "\n".join(lines)


async def audit_model_event(
    admin_url: str,
    tenant_id: uuid.UUID,
    subject: str,
    payload: Mapping[str, Any],
    *,
    operator: OperatorContext = OPERATOR_CLI,
) -> None:
    """Append a ``model`` entry to the tenant's audit log (``operator``: operator:cli, or the scheduler's worker)."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with tenant_transaction(engine, operator.tenant(tenant_id)) as tx:
            await audit.append(tx, AUDIT_KIND, operator.actor, subject, dict(payload))
    finally:
        await engine.dispose()


async def tenant_id_of(admin_url: str, slug: str) -> uuid.UUID | None:
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            found = await tenancy.find_tenant(conn, slug)
    finally:
        await engine.dispose()
    return None if found is None else found.id
