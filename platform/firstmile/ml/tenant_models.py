"""Per-tenant path models: learn from a tenant's own logged decisions, promote behind an off-policy gate.

``firstmile models train --tenant SLUG`` reads the tenant's logged path decisions (and only its own:
``onboarding.service.logged_decisions`` filters by tenant id), refuses when the data cannot support a
model (:class:`TrainingRefusedError`, naming the gap; nothing is registered and the current model keeps
serving), trains a per-path activation model (:mod:`firstmile_inference.tenant`) in process, or as a Ray task
on the cluster at ``FIRSTMILE_TRAINING_RAY_ADDRESS`` (:class:`RayTraining`), registers
it as ``tenant-<slug>.path_classifier`` with its off-policy report, and audits the run in the tenant's
log (kind ``model``). ``firstmile models promote --tenant SLUG VERSION --to canary|production`` checks
the stored report first: the candidate's DR lower bound must beat the logging policy's observed
activation rate and, when the tenant has a production model of the same catalog, that model's DR estimate on the
same held-out decisions (docs/models.md#per-tenant-models).
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
from firstmile.onboarding.catalog import CatalogCache, PathCatalog, catalog_fingerprint
from firstmile.onboarding.planner import eligible_paths, plan
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion, Registry
    from firstmile_inference.tenant import CurrentModel, LoggedData
    from firstmile_inference.train import TrainedModel
    from firstmile_inference.warm_start import WarmStart

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
DEFAULT_RAY_TIMEOUT_S: Final = 3600.0
"""How long a training task on Ray may take, a wait for a free CPU included (FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS)."""
AUDIT_KIND: Final = "model"
SHARED_MODEL: Final = "shared.path_warmstart"
"""The shared warm-start model (:mod:`firstmile.ml.shared_model`) an opted-in tenant's model starts from."""


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
    warm_start: bool = False  # the manifest opts in to the shared warm-start model (planner.training.warm_start)


def opts_in_to_warm_start(planner: Mapping[str, Any] | None) -> bool:
    """Whether a manifest's ``planner`` section opts in to the shared warm-start model (``training.warm_start``:
    ``shared`` or true)."""
    training = planner.get("training") if isinstance(planner, Mapping) else None
    return isinstance(training, Mapping) and training.get("warm_start") in ("shared", True)


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
    warm = opts_in_to_warm_start(found.manifest.get("planner"))
    return TenantData(found.id, slug, catalog, rows, horizon, window, warm_start=warm)


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
    registry: Registry, data: TenantData, logged: LoggedData, *, seed: int = 7, epochs: int | None = None,
    ray: RayTraining | None = None,
) -> ModelVersion:  # fmt: skip
    """Train on ``logged`` (in process, or as a Ray task with ``ray``) and register the candidate (no stage) under
    the tenant's model name. On Ray, a cluster that cannot be reached or a task that fails is a
    :class:`TrainingRefusedError` naming the address: nothing is registered, no fallback to in process."""
    import dataclasses

    from firstmile_inference.tenant import TENANT_HYPER, NoOverlapError, train_logged

    hyper = TENANT_HYPER if epochs is None else dataclasses.replace(TENANT_HYPER, epochs=epochs)
    kwargs: dict[str, Any] = {"seed": seed, "hyper": hyper, "current": current_model(registry, data, logged)}
    kwargs["warm_start"] = shared_warm_start(registry) if data.warm_start else None
    try:
        trained = train_logged(logged, **kwargs) if ray is None else ray.train(logged, **kwargs)
    except NoOverlapError as exc:
        raise TrainingRefusedError(str(exc)) from exc
    trained.config["training"] |= where_trained(ray)
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


def shared_warm_start(registry: Registry) -> WarmStart | None:
    """The shared warm-start model an opted-in tenant's model starts from: its production version, else its latest;
    None when none is registered (the tenant's model trains cold; its config says ``warm_start: null``)."""
    from firstmile_inference.warm_start import WarmStart

    mv = registry.resolve(SHARED_MODEL, "production") or registry.latest(SHARED_MODEL)
    return None if mv is None else WarmStart.load(mv)


@dataclass(frozen=True)
class RayTraining:
    """Train on the Ray cluster at ``address`` (``FIRSTMILE_TRAINING_RAY_ADDRESS``, ``models train --ray``):
    :func:`firstmile_inference.ray_train.train_on_ray`, the task bounded by ``timeout_s``."""

    address: str
    timeout_s: float = DEFAULT_RAY_TIMEOUT_S

    def train(self, logged: LoggedData, **kwargs: Any) -> TrainedModel:
        from firstmile_inference.ray_train import RayTrainingError, train_on_ray

        try:
            return train_on_ray(self.address, logged, timeout_s=self.timeout_s, **kwargs)
        except RayTrainingError as exc:
            raise TrainingRefusedError(f"{exc}. The current model keeps serving.") from exc


def where_trained(ray: RayTraining | None) -> dict[str, Any]:
    """What the version's config and the audit entry record of where it trained (the address has no credentials:
    :func:`firstmile_inference.ray_train.check_address` admits none)."""
    if ray is None:
        return {"trained_on": "in_process", "ray_address": None}
    return {"trained_on": "ray", "ray_address": ray.address}


def current_model(registry: Registry, data: TenantData, logged: LoggedData) -> CurrentModel | None:
    """The tenant's production model as the off-policy gate compares a candidate with it: its predictions on every
    logged decision. None when it has none, or when its version was trained on another catalog (it does not serve:
    the planner's rules decide, ``catalog_changed``, so the logging policy is the current one)."""
    import numpy as np

    from firstmile_inference.models import load_predictor
    from firstmile_inference.tenant import CurrentModel

    mv = registry.resolve(tenant_model_name(data.slug), "production")
    recorded = mv.config.get("catalog") if mv is not None else None
    if mv is None or not isinstance(recorded, dict) or catalog_fingerprint(recorded) != data.catalog.fingerprint:
        return None
    predictions = load_predictor(mv, device="cpu").predict([dict(f) for f in logged.features])
    scores = np.asarray(
        [[float(p["scores"].get(key, -1.0)) for key in logged.paths] for p in predictions], dtype=np.float64
    )
    return CurrentModel(mv.version, scores)


def report_of(mv: ModelVersion) -> dict[str, Any]:
    """The off-policy report stored with a tenant model's version."""
    report = mv.metrics.get("ope")
    if not isinstance(report, dict):
        raise KeyError(f"{mv.name} {mv.version} has no off-policy report: it was not trained by models train --tenant")
    return report


def gate_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """The gate's figures as an audit entry records them: its verdict, the candidate's DR lower bound, the logged
    rate, what it had to beat (``logging_policy`` or ``current_model``) and that bar, the current model's version."""
    current = report.get("current_model")
    return {
        "gate_passed": bool(report["gate_passed"]),
        "dr_low": report["estimates"]["dr"]["low"],
        "logged_rate": report["logging_policy"]["value"],
        "gate_against": report.get("gate_against", "logging_policy"),
        "gate_threshold": report.get("gate_threshold", report["logging_policy"]["value"]),
        "current_version": current["version"] if current else None,
    }


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
    current = report.get("current_model")
    if current is not None:
        e = current["dr"]
        lines.append(
            f"  current model {current['version']:8} DR  {e['value']:.3f}  [{e['low']:.3f}, {e['high']:.3f}]  "
            "the production model on the same decisions"
        )
    dr_low = float(report["estimates"]["dr"]["low"])
    verdict = "passes" if report["gate_passed"] else "fails"
    if report.get("gate_against") == "current_model" and current is not None:
        bar = (
            f"the current model's ({current['version']}, DR) {float(report['gate_threshold']):.3f}, the larger of "
            f"it and the logging policy's {logged['value']:.3f}"
        )
    else:
        bar = f"the current policy's {logged['value']:.3f}" + (
            f" (the logging policy's: larger than the current model's {current['dr']['value']:.3f})" if current else ""
        )
    lines.append(f"  gate: the candidate's DR lower bound {dr_low:.3f} must beat {bar}: it {verdict}")
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
