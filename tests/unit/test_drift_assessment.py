"""The drift verdict over recorded decisions (firstmile.ml.drift.assess), without a database."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from firstmile.ml.drift import DriftInputs, assess
from firstmile_inference.drift import build_reference
from firstmile_inference.registry import ModelVersion

PERSONAS = ("developer", "analyst")


def _model(tmp_path: Path, accuracy: float | None) -> ModelVersion:
    reference = build_reference(
        {"user_persona": ["developer"] * 50 + ["analyst"] * 50, "engagement_score": [float(i) for i in range(100)]},
        numeric=["engagement_score"],
        categorical={"user_persona": PERSONAS},
    )
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    metrics = {} if accuracy is None else {"activation_accuracy": accuracy}
    return ModelVersion("path_classifier", "1.2.0", tmp_path, {}, metrics, "2026-11-26T00:00:00Z")


def _inputs(recent: list[dict[str, object]], outcomes: list[tuple[float, bool]]) -> DriftInputs:
    return DriftInputs(recent, outcomes, timedelta(days=7), timedelta(days=14))


def test_same_population_and_accuracy_is_no_drift(tmp_path: Path) -> None:
    recent = [
        {"user_persona": p, "engagement_score": float(i)} for i in range(100) for p in PERSONAS[i % 2 : i % 2 + 1]
    ]
    outcomes = [(0.8, True)] * 40 + [(0.2, False)] * 40 + [(0.8, False)] * 20  # 80% right
    result = assess(_model(tmp_path, 0.8), _inputs(recent, outcomes))
    assert all(f["level"] == "stable" for f in result.features)
    assert result.live_accuracy == 0.8
    assert result.relative_drop == 0.0
    assert not result.retrain


def test_accuracy_drop_over_five_percent_flags_and_shift_is_named(tmp_path: Path) -> None:
    recent = [{"user_persona": "developer", "engagement_score": 99.0}] * 100
    outcomes = [(0.9, True)] * 70 + [(0.9, False)] * 30  # 70% right against 80%: 12.5% relative drop
    result = assess(_model(tmp_path, 0.8), _inputs(recent, outcomes))
    assert {f["name"]: f["level"] for f in result.features} == {
        "user_persona": "significant",
        "engagement_score": "significant",
    }
    assert result.retrain
    assert result.relative_drop == 0.125
    assert "12.5% below the reference 0.800" in result.reason
    assert "RETRAIN" not in result.to_text() and "retrain: YES" in result.to_text()


def test_a_small_drop_or_too_few_outcomes_gives_no_flag(tmp_path: Path) -> None:
    small = [(0.9, True)] * 77 + [(0.9, False)] * 23  # 77% vs 80%: 3.75%
    assert not assess(_model(tmp_path, 0.8), _inputs([], small)).retrain
    few = assess(_model(tmp_path, 0.8), _inputs([], [(0.9, False)] * 49))
    assert few.live_accuracy is None and not few.retrain
    assert any("no accuracy verdict" in n for n in few.notes)
    assert any("no PSI" in n for n in few.notes)
    unknown = assess(_model(tmp_path, None), _inputs([], [(0.9, False)] * 60))
    assert not unknown.retrain and any("activation_accuracy" in n for n in unknown.notes)
