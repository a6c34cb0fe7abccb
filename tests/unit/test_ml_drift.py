"""Drift: PSI per feature against the training reference, thresholds, and the accuracy-drop rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from firstmile_inference import drift
from firstmile_inference.schema import PERSONAS
from firstmile_inference.simulate import generate
from firstmile_inference.train import Hyper, train_path_classifier


def test_identical_distributions_have_near_zero_psi() -> None:
    rng = np.random.default_rng(0)
    reference = drift.numeric_reference(rng.normal(0, 1, 20_000).tolist())
    assert len(reference["edges"]) == 9 and sum(reference["proportions"]) == pytest.approx(1.0)
    live = drift.distribution(reference, rng.normal(0, 1, 5_000).tolist())
    assert drift.psi(reference["proportions"], live) < 0.01
    assert drift.psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0


def test_a_shifted_distribution_is_significant() -> None:
    rng = np.random.default_rng(1)
    reference = drift.numeric_reference(rng.normal(0, 1, 20_000).tolist())
    shifted = drift.distribution(reference, rng.normal(1.0, 1, 5_000).tolist())
    value = drift.psi(reference["proportions"], shifted)
    assert value > 0.25 and drift.level(value) == "significant"
    slightly = drift.distribution(reference, rng.normal(0.25, 1, 5_000).tolist())
    assert drift.level(drift.psi(reference["proportions"], slightly)) in ("stable", "moderate")


def test_levels_follow_the_documented_thresholds() -> None:
    assert drift.level(0.05) == "stable"
    assert drift.level(0.1) == "moderate" and drift.level(0.25) == "moderate"
    assert drift.level(0.26) == "significant"


def test_categoricals_bin_unknowns_and_empty_bins_stay_finite() -> None:
    reference = drift.categorical_reference(["developer"] * 50 + ["analyst"] * 50, PERSONAS)
    assert reference["categories"][-1] == drift.UNKNOWN
    live = drift.distribution(reference, ["astronaut", None, "developer", 3])
    assert live[-1] == pytest.approx(0.75)
    value = drift.psi(reference["proportions"], live)
    assert math.isfinite(value) and value > 0.25
    with pytest.raises(ValueError, match="differ in bins"):
        drift.psi([0.5, 0.5], [1.0])


def test_discrete_features_merge_duplicate_deciles() -> None:
    reference = drift.numeric_reference([0] * 70 + [1] * 20 + [5] * 10)
    assert reference["edges"] == sorted(set(reference["edges"]))
    assert len(reference["proportions"]) == len(reference["edges"]) + 1
    with pytest.raises(ValueError, match="at least one value"):
        drift.numeric_reference([])


def test_report_against_a_trained_models_reference() -> None:
    train = generate(1500, seed=3)
    model = train_path_classifier(train, seed=3, hyper=Hyper(epochs=1))
    reference = model.reference
    assert set(reference["features"]) == {
        "user_persona", "signup_source", "company_size", "use_case", "engagement_score", "time_since_signup",
        "steps_completed", "session_count", "avg_session_duration",
    }  # fmt: skip
    same = drift.drift_report(reference, generate(1500, seed=4).user_rows())
    assert same.level == "stable" and same.drifted == () and same.sample_size == 1500
    shifted_rows = []
    for row in generate(1500, seed=5).user_rows():
        row["engagement_score"] = min(100.0, row.get("engagement_score", 0.0) + 30.0)
        row["user_persona"] = "developer"
        shifted_rows.append(row)
    shifted = drift.drift_report(reference, shifted_rows)
    assert set(shifted.drifted) == {"engagement_score", "user_persona"}
    assert shifted.to_json()["features"]["engagement_score"]["level"] == "significant"


def test_accuracy_drop_rule() -> None:
    assert drift.accuracy_drop(0.90, 0.855) == pytest.approx(0.05)
    assert drift.accuracy_drop(0.90, 0.95) < 0
    assert drift.needs_retraining(0.90, 0.85)  # 5.6% relative
    assert not drift.needs_retraining(0.90, 0.86)  # 4.4% relative
    assert not drift.needs_retraining(0.90, 0.855 + 1e-9)
    with pytest.raises(ValueError, match="positive"):
        drift.accuracy_drop(0.0, 0.5)
