"""Drift of the production path model, from the decisions the platform recorded.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.ml.labels import Label, labels_of, review_summary
from firstmile.onboarding import service as onboarding
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion

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
