"""Drift of the production path models, from the decisions the platform recorded.

Every model decision stores the nine features it was made on
(``user_progress.decision.features``) and its confidence, the predicted
activation probability of the chosen path. ``firstmile models drift`` reads:

- **recent traffic**: the model's decisions of the last ``--days``, binned against
  the training reference stored with the model version → PSI per feature;
- **outcomes**: decisions at least ``--outcome-days`` old, whose activation is
  known (activated within that window or not) → live accuracy of the predicted
  activation (confidence ≥ 0.5) against what happened, compared with the
  version's ``activation_accuracy`` measured on unseen simulated sessions at
  training time. A relative drop above 5% flags the version for retraining;
- **reviews**: the model's low-confidence decisions that reviewers judged in the last
  ``--days`` (docs/review.md): how many were right, wrong, the share right
  (``reviewer_accuracy``) and the better paths named (:mod:`firstmile.ml.labels`).
  Reported, never a retraining verdict on their own: they are a sample of the
  decisions the model was least sure of.

Runs as the schema owner (``FIRSTMILE_DATABASE_ADMIN_URL``), across tenants or one.

**A tenant's own model** (``tenant-<slug>.path_classifier``, docs/models.md#drift-and-retraining): when the
tenant's latest start decided by a model was decided by it, ``models drift --tenant`` checks its production version
instead (:func:`tenant_drift`), and the scheduler's ``tenant-model-training`` pass checks it for every opted-in
tenant that serves it (:func:`check_tenant_model`), with one query per tenant:

- **PSI per feature** of the model's decisions of the last ``--days`` against the version's training reference
  (unknown numerics binned where training put them, ``metrics.reference_unknown_fill``); a significant shift
  (PSI > 0.25) on at least :data:`MIN_RECENT` decisions is drift;
- **calibration**: on the version's own decisions at least the horizon old (its training horizon), the gap
  between the observed activation rate and the mean predicted activation of the chosen path, against the gap the
  version measured on its held-out logged decisions (``metrics.calibration``: those whose logged path is the one
  it chooses). A gap that moved by more than :data:`CALIBRATION_MIN_SHIFT` and more than
  :data:`CALIBRATION_Z` standard errors is drift; fewer than :data:`MIN_OUTCOMES` outcomes: no verdict.

A verdict of drift flags the version for retraining in ``<registry>/<model>/flags.jsonl`` (once per version), which
the scheduled training reads (``trigger: drift``). Every check is audited in the tenant's log (kind ``model``,
``"action": "models.drift"``) and its report kept as ``<registry>/<model>/drift.json`` for the admin models page.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.kit.scope import OPERATOR_CLI, OperatorContext
from firstmile.ml import tenant_models as tm
from firstmile.ml.labels import Label, labels_of, review_summary
from firstmile.ml.planner import NUMERIC_FEATURES, tenant_model_name
from firstmile.onboarding import service as onboarding
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion, Registry

MIN_OUTCOMES = 50  # fewer labelled decisions than this: no accuracy verdict


@dataclass(frozen=True)
class DriftInputs:
    recent: list[dict[str, Any]]  # feature instances of recent model decisions
    outcomes: list[tuple[float, bool]]  # (predicted activation probability, activated)
    window: timedelta
    outcome_window: timedelta
    labels: list[Label] = field(default_factory=list)  # reviewed decisions of the recent window


async def load_inputs(
    admin_url: str, tenant_slug: str | None, window: timedelta, outcome_window: timedelta
) -> DriftInputs:
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            tenant_id = None
            if tenant_slug is not None:
                found = await tenancy.find_tenant(conn, tenant_slug)
                if found is None:
                    return DriftInputs([], [], window, outcome_window)
                tenant_id = found.id
            recent = await onboarding.recent_model_features(conn, "path_classifier", window, tenant_id)
            outcomes = await onboarding.model_outcomes(conn, "path_classifier", outcome_window, tenant_id)
            labels = labels_of(await onboarding.decision_labels(conn, "path_classifier", window, tenant_id))
    finally:
        await engine.dispose()
    return DriftInputs(recent, outcomes, window, outcome_window, labels)


@dataclass(frozen=True)
class DriftResult:
    model: str
    version: str
    sample: int
    features: list[dict[str, Any]]  # name, psi, level
    reference_accuracy: float | None
    live_accuracy: float | None
    outcomes: int
    relative_drop: float | None
    retrain: bool
    reason: str
    notes: list[str] = field(default_factory=list)
    reviews: dict[str, Any] = field(default_factory=lambda: review_summary(()))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def to_text(self) -> str:
        lines = [f"{self.model} {self.version}: {self.sample} recent decisions"]
        lines.extend(f"  {f['name']:22} PSI {f['psi']:.3f}  {f['level']}" for f in self.features)
        if self.live_accuracy is not None and self.reference_accuracy is not None:
            lines.append(
                f"  live accuracy {self.live_accuracy:.3f} on {self.outcomes} outcomes vs reference "
                f"{self.reference_accuracy:.3f} (relative drop {100 * (self.relative_drop or 0):.1f}%)"
            )
        reviews = self.reviews
        if reviews.get("reviewed"):
            better = ", ".join(f"{path} {n}" for path, n in reviews["better_paths"].items()) or "none"
            lines.append(
                f"  reviews: {reviews['reviewed']} reviewed, {reviews['right']} right, {reviews['wrong']} wrong "
                f"(reviewer accuracy {reviews['reviewer_accuracy']:.3f}); better paths named: {better}"
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  retrain: {'YES - ' + self.reason if self.retrain else 'no'}")
        return "\n".join(lines)


def assess(model: ModelVersion, inputs: DriftInputs) -> DriftResult:
    """PSI per feature and the accuracy-drop rule for ``model`` over ``inputs``."""
    from firstmile_inference.drift import accuracy_drop, drift_report, needs_retraining

    notes: list[str] = []
    features: list[dict[str, Any]] = []
    reference = model.reference()
    if reference is None:
        notes.append("this version has no stored reference distribution: no PSI")
    elif not inputs.recent:
        notes.append(f"no model decisions in the last {inputs.window}: no PSI")
    else:
        report = drift_report(reference, inputs.recent)
        features = [{"name": f.feature, "psi": round(f.psi, 4), "level": f.level} for f in report.features]
    ref_acc = model.metrics.get("activation_accuracy")
    live: float | None = None
    drop: float | None = None
    retrain = False
    reason = ""
    if len(inputs.outcomes) >= MIN_OUTCOMES:
        live = sum((p >= 0.5) == activated for p, activated in inputs.outcomes) / len(inputs.outcomes)
        if isinstance(ref_acc, int | float) and ref_acc > 0:
            drop = accuracy_drop(float(ref_acc), live)
            if needs_retraining(float(ref_acc), live):
                retrain = True
                reason = f"live accuracy {live:.3f} is {100 * drop:.1f}% below the reference {float(ref_acc):.3f}"
        else:
            notes.append("this version records no activation_accuracy: no accuracy verdict")
    else:
        notes.append(f"{len(inputs.outcomes)} decisions with known outcomes (< {MIN_OUTCOMES}): no accuracy verdict")
    if not inputs.labels:
        notes.append(f"no reviewed decisions in the last {inputs.window}")
    significant = [f["name"] for f in features if f["level"] == "significant"]
    if significant:
        notes.append(f"significant feature shift (PSI > 0.25): {', '.join(significant)}")
    return DriftResult(
        model=model.name,
        version=model.version,
        sample=len(inputs.recent),
        features=features,
        reference_accuracy=float(ref_acc) if isinstance(ref_acc, int | float) else None,
        live_accuracy=round(live, 4) if live is not None else None,
        outcomes=len(inputs.outcomes),
        relative_drop=round(drop, 4) if drop is not None else None,
        retrain=retrain,
        reason=reason,
        notes=notes,
        reviews=review_summary(inputs.labels),
    )


# ---- a tenant's own model (see the module docstring)

MIN_RECENT: Final = 200
"""Recent decisions a feature verdict needs: below it PSI is reported but decides nothing (an unshifted sample of n
decisions over ten bins has an expected PSI of about 9 / n, and an empty bin adds a large term)."""
MIN_REFERENCE_CHOSEN: Final = 10
"""Held-out decisions on the model's own choice the calibration reference needs; below it, all held-out decisions."""
CALIBRATION_MIN_SHIFT: Final = 0.05
"""The smallest move of the calibration gap (observed - predicted activation) that is drift: 5 points."""
CALIBRATION_Z: Final = 1.96
"""And the move must exceed this many standard errors of the difference of the two gaps (95%, two-sided)."""
DEFAULT_WINDOW: Final = timedelta(days=7)
"""The recent window of the scheduled check (``models drift --days`` for the command)."""
LAST_REPORT: Final = "drift.json"
"""The last check's report, in the model's folder of the registry (the admin models page shows it)."""

Verdict = Literal["drift", "stable", "insufficient"]


class NoProductionVersionError(Exception):
    """The tenant's starts are decided by its own model, which has no production version to check."""


@dataclass(frozen=True)
class TenantDriftInputs:
    """A tenant model's recent decisions (their features) and one version's matured decisions (predicted, activated)."""

    recent: list[dict[str, Any]]
    outcomes: list[tuple[float, bool]]
    window: timedelta
    horizon: timedelta


async def load_tenant_inputs(
    admin_url: str, tenant_id: uuid.UUID, model: str, version: str, window: timedelta, horizon: timedelta
) -> TenantDriftInputs:
    """One query, as the schema owner: the tenant's decisions by ``model``."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            recent, outcomes = await onboarding.tenant_model_decisions(conn, tenant_id, model, version, window, horizon)
    finally:
        await engine.dispose()
    return TenantDriftInputs(recent, outcomes, window, horizon)


def calibration_figures(outcomes: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """Decisions, mean predicted activation, observed activation rate, their gap (observed - predicted), the
    residuals' standard deviation, the Brier score and the accuracy at 0.5: as ``metrics.calibration`` stores them."""
    n = len(outcomes)
    if n == 0:
        return {"decisions": 0}
    residuals = [(1.0 if activated else 0.0) - p for p, activated in outcomes]
    gap = sum(residuals) / n
    return {
        "decisions": n,
        "mean_predicted": sum(p for p, _ in outcomes) / n,
        "observed_rate": sum(1 for _, activated in outcomes if activated) / n,
        "gap": gap,
        "residual_sd": math.sqrt(sum((r - gap) ** 2 for r in residuals) / (n - 1)) if n > 1 else 0.0,
        "brier": sum(r * r for r in residuals) / n,
        "accuracy": sum(1 for p, activated in outcomes if (p >= 0.5) == activated) / n,
    }


@dataclass(frozen=True)
class CalibrationCheck:
    """The live calibration of a version against its held-out one, and whether the gap moved (drift)."""

    live: dict[str, Any]
    reference: dict[str, Any] | None
    basis: str | None  # "chosen" (held-out decisions on the model's own choice) | "all"
    shift: float | None  # live gap - reference gap
    tolerance: float | None
    drift: bool
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rounded(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def calibration_check(
    outcomes: Sequence[tuple[float, bool]], stored: Mapping[str, Any] | None, *, min_outcomes: int = MIN_OUTCOMES
) -> CalibrationCheck:
    """Drift when the live gap moved from the held-out gap by more than :data:`CALIBRATION_MIN_SHIFT` and more than
    :data:`CALIBRATION_Z` standard errors; no verdict with fewer than ``min_outcomes`` outcomes or no stored figure."""
    live = calibration_figures(outcomes)
    reference: Mapping[str, Any] | None = None
    basis: str | None = None
    if isinstance(stored, Mapping):
        for name, at_least in (("chosen", MIN_REFERENCE_CHOSEN), ("all", 2)):
            figures = stored.get(name)
            if isinstance(figures, Mapping) and int(figures.get("decisions", 0)) >= at_least:
                reference, basis = figures, name
                break
    kept = _rounded(reference) if reference is not None else None
    if len(outcomes) < min_outcomes:
        note = (
            f"{len(outcomes)} decisions of this version with a known outcome (< {min_outcomes}): no calibration verdict"
        )
        return CalibrationCheck(_rounded(live), kept, basis, None, None, False, note)
    if reference is None:
        note = "this version stores no held-out calibration (metrics.calibration): no calibration verdict"
        return CalibrationCheck(_rounded(live), None, None, None, None, False, note)
    shift = float(live["gap"]) - float(reference["gap"])
    se = math.sqrt(
        float(live["residual_sd"]) ** 2 / int(live["decisions"])
        + float(reference["residual_sd"]) ** 2 / int(reference["decisions"])
    )
    tolerance = max(CALIBRATION_MIN_SHIFT, CALIBRATION_Z * se)
    return CalibrationCheck(
        _rounded(live), kept, basis, round(shift, 4), round(tolerance, 4), abs(shift) > tolerance, None
    )


def _with_fill(instance: Mapping[str, Any], fill: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded instance with each unknown numeric where training put it (``metrics.reference_unknown_fill``)."""
    out = dict(instance)
    for name in NUMERIC_FEATURES:
        value = fill.get(name)
        if out.get(name) is None and isinstance(value, int | float):
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class TenantDriftResult:
    """One drift check of a tenant's own model's production version: figures, verdict, reasons."""

    model: str
    version: str
    tenant: str
    checked_at: str
    window_days: float
    horizon_days: float
    sample: int  # recent decisions
    features: list[dict[str, Any]]  # name, psi, level
    calibration: dict[str, Any]
    verdict: Verdict
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    flagged: bool = False  # a flag was written by this check

    @property
    def retrain(self) -> bool:
        return self.verdict == "drift"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"retrain": self.retrain, "reason": self.reason}

    def audit_payload(self, *, scheduled: bool) -> dict[str, Any]:
        """What the tenant's audit entry holds (``"action": "models.drift"``)."""
        return {"action": "models.drift", "scheduled": scheduled} | {
            k: v for k, v in self.to_json().items() if k not in ("tenant", "reason")
        }

    def to_text(self) -> str:
        lines = [
            f"{self.model} {self.version} (tenant {self.tenant}): {self.sample} decisions in the last "
            f"{self.window_days:g} days"
        ]
        lines.extend(f"  {f['name']:22} PSI {f['psi']:.3f}  {f['level']}" for f in self.features)
        live, ref = self.calibration.get("live") or {}, self.calibration.get("reference")
        if live.get("decisions"):
            line = (
                f"  calibration on {live['decisions']} decisions at least {self.horizon_days:g} days old: predicted "
                f"{live['mean_predicted']:.3f}, observed {live['observed_rate']:.3f} (gap {live['gap']:+.3f})"
            )
            if ref is not None:
                line += (
                    f"; held out at training ({self.calibration['basis']}, {ref['decisions']}): gap {ref['gap']:+.3f}"
                )
            if self.calibration.get("shift") is not None:
                line += f"; moved {self.calibration['shift']:+.3f} (tolerance {self.calibration['tolerance']:.3f})"
            lines.append(line)
        lines.extend(f"  note: {n}" for n in self.notes)
        verdict = {"drift": "DRIFT - " + self.reason, "stable": "stable", "insufficient": "no verdict (too few data)"}
        lines.append(f"  verdict: {verdict[self.verdict]}" + ("; flagged for retraining" if self.flagged else ""))
        return "\n".join(lines)


def assess_tenant(
    model: str,
    version: str,
    tenant: str,
    reference: Mapping[str, Any] | None,
    metrics: Mapping[str, Any],
    inputs: TenantDriftInputs,
    *,
    now: datetime | None = None,
    min_recent: int = MIN_RECENT,
    min_outcomes: int = MIN_OUTCOMES,
) -> TenantDriftResult:
    """The verdict for a tenant model's ``version`` (its training ``reference`` and stored ``metrics``) over
    ``inputs``: drift when a feature shifted significantly on enough decisions or the calibration gap moved;
    stable when a rule could judge and none fired; insufficient when neither could judge."""
    from firstmile_inference.drift import SIGNIFICANT_ABOVE, drift_report

    notes: list[str] = []
    reasons: list[str] = []
    features: list[dict[str, Any]] = []
    judged = False
    if reference is None:
        notes.append("this version has no stored reference distribution: no PSI")
    elif not inputs.recent:
        notes.append(f"no decisions by this model in the last {inputs.window}: no PSI")
    else:
        fill = metrics.get("reference_unknown_fill")
        instances = [_with_fill(i, fill if isinstance(fill, Mapping) else {}) for i in inputs.recent]
        report = drift_report(reference, instances)
        features = [{"name": f.feature, "psi": round(f.psi, 4), "level": f.level} for f in report.features]
        if len(inputs.recent) < min_recent:
            notes.append(f"{len(inputs.recent)} recent decisions (< {min_recent}): PSI reported, no feature verdict")
        else:
            judged = True
            shifted = [f for f in features if f["level"] == "significant"]
            if shifted:
                named = ", ".join(f"{f['name']} {f['psi']:.3f}" for f in shifted)
                reasons.append(f"feature shift (PSI > {SIGNIFICANT_ABOVE}): {named}")
    calibration = calibration_check(inputs.outcomes, metrics.get("calibration"), min_outcomes=min_outcomes)
    if calibration.note is not None:
        notes.append(calibration.note)
    else:
        judged = True
        if calibration.drift:
            assert calibration.reference is not None and calibration.shift is not None
            reasons.append(
                f"calibration moved {calibration.shift:+.3f} (tolerance {calibration.tolerance:.3f}): observed "
                f"{calibration.live['observed_rate']:.3f} against {calibration.live['mean_predicted']:.3f} predicted "
                f"on {calibration.live['decisions']} decisions, gap {calibration.reference['gap']:+.3f} held out at "
                "training"
            )
    verdict: Verdict = "drift" if reasons else "stable" if judged else "insufficient"
    return TenantDriftResult(
        model=model,
        version=version,
        tenant=tenant,
        checked_at=(now or datetime.now(UTC)).isoformat(),
        window_days=inputs.window.total_seconds() / 86_400,
        horizon_days=inputs.horizon.total_seconds() / 86_400,
        sample=len(inputs.recent),
        features=features,
        calibration=calibration.to_json(),
        verdict=verdict,
        reasons=reasons,
        notes=notes,
    )


def _horizon(mv: ModelVersion) -> timedelta:
    days = mv.config.get("training", {}).get("horizon_days")
    return timedelta(days=float(days) if isinstance(days, int | float) else tm.DEFAULT_HORIZON_DAYS)


def _write_report(registry: Registry, result: TenantDriftResult) -> None:
    """The last report, replaced atomically (temporary file, ``os.replace``)."""
    folder = registry.root / result.model
    tmp = folder / f".{LAST_REPORT}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(json.dumps(result.to_json(), sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / LAST_REPORT)
    finally:
        tmp.unlink(missing_ok=True)


def last_report(registry: Registry, model: str) -> dict[str, Any] | None:
    """The last drift check's report of ``model`` (None when it was never checked or the file is unreadable)."""
    try:
        found = json.loads((registry.root / model / LAST_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _settle(registry: Registry, result: TenantDriftResult, flag: bool) -> TenantDriftResult:
    """Flag a drifted version (once: a version already flagged keeps its flag) and keep the report (blocking)."""
    import dataclasses

    if result.retrain and flag:
        earlier = [f for f in registry.flags(result.model) if f.get("version") == result.version]
        if earlier:
            note = f"already flagged for retraining at {earlier[-1].get('time')}: one flag per version"
            result = dataclasses.replace(result, notes=[*result.notes, note])
        else:
            registry.flag(result.model, result.version, f"drift: {result.reason}")
            result = dataclasses.replace(result, flagged=True)
    _write_report(registry, result)
    return result


async def check_tenant_model(
    admin_url: str,
    registry: Registry,
    tenant_id: uuid.UUID,
    slug: str,
    *,
    window: timedelta = DEFAULT_WINDOW,
    horizon: timedelta | None = None,
    flag: bool = True,
    operator: OperatorContext = OPERATOR_CLI,
    scheduled: bool = False,
) -> TenantDriftResult | None:
    """Check the production version of the tenant's own model (None: it has none): one query, the verdict (off the
    event loop), the flag on drift, the report kept in the registry, and the check audited in the tenant's log."""
    import asyncio

    name = tenant_model_name(slug)
    production = await asyncio.to_thread(registry.resolve, name, "production")
    if production is None:
        return None
    inputs = await load_tenant_inputs(
        admin_url, tenant_id, name, production.version, window, _horizon(production) if horizon is None else horizon
    )

    def judge() -> TenantDriftResult:
        result = assess_tenant(name, production.version, slug, production.reference(), production.metrics, inputs)
        return _settle(registry, result, flag)

    result = await asyncio.to_thread(judge)
    await tm.audit_model_event(
        admin_url, tenant_id, f"model:{name}@{production.version}", result.audit_payload(scheduled=scheduled),
        operator=operator,
    )  # fmt: skip
    return result


async def tenant_drift(
    admin_url: str,
    registry: Registry,
    slug: str,
    *,
    window: timedelta,
    horizon: timedelta | None = None,
    flag: bool = True,
) -> TenantDriftResult | None:
    """``models drift --tenant``: the check of the tenant's own model when its latest start decided by a model within
    ``window`` was decided by it; None otherwise (an unknown tenant too: the shared model's check applies).
    :class:`NoProductionVersionError` when its own model decides but has no production version."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            found = await tenancy.find_tenant(conn, slug)
            decider = None if found is None else await onboarding.latest_model(conn, found.id, window)
    finally:
        await engine.dispose()
    name = tenant_model_name(slug)
    if found is None or decider != name:
        return None
    result = await check_tenant_model(admin_url, registry, found.id, slug, window=window, horizon=horizon, flag=flag)
    if result is None:
        raise NoProductionVersionError(
            f"tenant {slug}'s recent starts were decided by its own model {name}, which has no production version "
            "to check (firstmile models list)"
        )
    return result
