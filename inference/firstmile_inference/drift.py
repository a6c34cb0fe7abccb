"""Feature drift (population stability index) and the accuracy-drop retraining rule. Pure: no I/O.

A *reference* is computed from the training data when a model is trained and
stored with it (``reference.json``): a numeric feature is binned by the
training deciles (nine cut points, duplicates merged, so at most ten bins), a
categorical one by category, with one bucket for unknown values. A live
sample of instances is binned the same way and compared with::

    PSI = sum_i (live_i - ref_i) * ln(live_i / ref_i)

over the bins' proportions, where empty bins get ``EPSILON`` (1e-4) before
renormalising so the logarithm stays finite.

Thresholds (the usual reading of PSI):

* PSI < 0.1: **stable**, no action;
* 0.1 <= PSI <= 0.25: **moderate** shift, watch it;
* PSI > 0.25: **significant** shift, investigate and consider retraining.

Independently of features, a model whose live accuracy fell by more than 5%
relative to its reference accuracy is flagged for retraining
(:func:`needs_retraining`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

EPSILON: Final = 1e-4
STABLE_BELOW: Final = 0.1
SIGNIFICANT_ABOVE: Final = 0.25
RETRAIN_RELATIVE_DROP: Final = 0.05
UNKNOWN: Final = "__unknown__"

Level = Literal["stable", "moderate", "significant"]


def level(psi: float) -> Level:
    """The documented reading of a PSI value."""
    if psi < STABLE_BELOW:
        return "stable"
    if psi <= SIGNIFICANT_ABOVE:
        return "moderate"
    return "significant"


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def _number(value: Any) -> float | None:
    if value is None:
        return 0.0  # the schema's default for an absent numeric
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def numeric_reference(values: Iterable[float]) -> dict[str, Any]:
    """Decile cut points of the training values and the share of values in each bin."""
    data = sorted(v for v in (_number(x) for x in values) if v is not None)
    if not data:
        raise ValueError("a numeric reference needs at least one value")
    edges = sorted({_quantile(data, q / 10.0) for q in range(1, 10)})
    return {"type": "numeric", "edges": edges, "proportions": _numeric_proportions(edges, data)}


def categorical_reference(values: Iterable[Any], vocabulary: Sequence[str]) -> dict[str, Any]:
    """The share of each vocabulary category plus unknown (absent or outside the vocabulary)."""
    categories = [*vocabulary, UNKNOWN]
    return {
        "type": "categorical",
        "categories": categories,
        "proportions": _categorical_proportions(categories, values),
    }


def build_reference(
    columns: Mapping[str, Sequence[Any]],
    *,
    numeric: Sequence[str],
    categorical: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The reference of every feature from training columns (what ``reference.json`` holds)."""
    features: dict[str, Any] = {}
    for name, vocab in categorical.items():
        features[name] = categorical_reference(columns[name], vocab)
    for name in numeric:
        features[name] = numeric_reference(columns[name])
    sizes = {len(columns[name]) for name in features}
    return {"features": features, "n": max(sizes) if sizes else 0, "epsilon": EPSILON}


def _numeric_proportions(edges: Sequence[float], values: Iterable[float]) -> list[float]:
    counts = [0] * (len(edges) + 1)
    total = 0
    for value in values:
        counts[bisect_left(edges, value)] += 1
        total += 1
    return [c / total if total else 0.0 for c in counts]


def _categorical_proportions(categories: Sequence[str], values: Iterable[Any]) -> list[float]:
    index = {c: i for i, c in enumerate(categories)}
    unknown = len(categories) - 1
    counts = [0] * len(categories)
    total = 0
    for value in values:
        counts[index.get(value, unknown) if isinstance(value, str) else unknown] += 1
        total += 1
    return [c / total if total else 0.0 for c in counts]


def distribution(feature_reference: Mapping[str, Any], values: Iterable[Any]) -> list[float]:
    """Bin live ``values`` like the reference feature (numerics: non-numbers are skipped)."""
    if feature_reference["type"] == "numeric":
        numbers = (v for v in (_number(x) for x in values) if v is not None)
        return _numeric_proportions(feature_reference["edges"], numbers)
    return _categorical_proportions(feature_reference["categories"], values)


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population stability index between two distributions over the same bins."""
    if len(expected) != len(actual):
        raise ValueError(f"distributions differ in bins ({len(expected)} vs {len(actual)})")

    def smooth(p: Sequence[float]) -> list[float]:
        q = [max(float(x), epsilon) for x in p]
        total = sum(q)
        return [x / total for x in q]

    e, a = smooth(expected), smooth(actual)
    return float(sum((ai - ei) * math.log(ai / ei) for ei, ai in zip(e, a, strict=True)))


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    level: Level


@dataclass(frozen=True)
class DriftReport:
    features: tuple[FeatureDrift, ...]
    sample_size: int

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)

    @property
    def level(self) -> Level:
        return level(self.max_psi)

    @property
    def drifted(self) -> tuple[str, ...]:
        """Features with a significant shift."""
        return tuple(f.feature for f in self.features if f.level == "significant")

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "max_psi": self.max_psi,
            "level": self.level,
            "features": {f.feature: {"psi": f.psi, "level": f.level} for f in self.features},
        }


def drift_report(reference: Mapping[str, Any], instances: Sequence[Mapping[str, Any]]) -> DriftReport:
    """PSI of every reference feature between the reference and a sample of recent instances."""
    out: list[FeatureDrift] = []
    for name, feature_reference in reference["features"].items():
        live = distribution(feature_reference, (instance.get(name) for instance in instances))
        value = psi(feature_reference["proportions"], live, float(reference.get("epsilon", EPSILON)))
        out.append(FeatureDrift(name, value, level(value)))
    return DriftReport(tuple(out), len(instances))


def accuracy_drop(reference_accuracy: float, live_accuracy: float) -> float:
    """The relative drop ``(reference - live) / reference`` (negative when live accuracy is higher)."""
    if reference_accuracy <= 0:
        raise ValueError("reference_accuracy must be positive")
    return (reference_accuracy - live_accuracy) / reference_accuracy


def needs_retraining(
    reference_accuracy: float, live_accuracy: float, max_relative_drop: float = RETRAIN_RELATIVE_DROP
) -> bool:
    """Flag for retraining when the relative accuracy drop exceeds ``max_relative_drop`` (5%)."""
    return accuracy_drop(reference_accuracy, live_accuracy) > max_relative_drop
