"""Reviewed decisions as labels (firstmile.ml.labels) and their count in the drift report (firstmile.ml.drift), without
a database: a right verdict labels the chosen path, a wrong one with a better path names the corrected target."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from firstmile.ml.drift import DriftInputs, assess
from firstmile.ml.labels import labels_of, review_summary
from firstmile_inference.registry import ModelVersion

AT = datetime(2026, 12, 8, 9, 30, tzinfo=UTC)
FEATURES = {"user_persona": "executive", "company_size": "1001+"}


def _row(verdict: str, better: str | None = None, path: str = "generic", **extra: Any) -> dict[str, Any]:
    return {"user_id": "u-1", "path_id": path, "path_version": 2, "verdict": verdict, "better_path": better,
            "features": FEATURES, "confidence": 0.41, "decided_at": AT} | extra  # fmt: skip


def test_each_verdict_gives_its_target() -> None:
    right, corrected, wrong = labels_of([_row("right"), _row("wrong", "enterprise-rollout"), _row("wrong")])
    assert right.training_row() == (FEATURES, "generic", True, "generic")
    assert corrected.training_row() == (FEATURES, "generic", False, "enterprise-rollout")
    assert wrong.training_row() == (FEATURES, "generic", False, None)  # known wrong, no target named
    assert corrected.to_json() == {
        "features": FEATURES, "chosen_path": "generic", "path_version": 2, "confidence": 0.41, "verdict": "wrong",
        "better_path": "enterprise-rollout", "target": "enterprise-rollout", "decided_at": AT.isoformat(),
    }  # fmt: skip
    assert "user_id" not in corrected.to_json()  # a label is about the decision, not the person


def test_rows_that_are_not_verdicts_are_left_out_and_missing_features_kept_as_none() -> None:
    labels = labels_of([_row("pending"), _row("approved"), _row("right", features=None, confidence=None)])
    assert [(label.verdict, label.features, label.confidence) for label in labels] == [("right", None, None)]


def test_the_summary_counts_right_wrong_and_the_better_paths_named() -> None:
    rows = [_row("right")] * 3 + [_row("wrong", "enterprise-rollout")] * 2 + [_row("wrong", "analyst-reports")]
    rows.append(_row("wrong"))
    assert review_summary(labels_of(rows)) == {
        "reviewed": 7, "right": 3, "wrong": 4, "reviewer_accuracy": 0.4286,
        "better_paths": {"analyst-reports": 1, "enterprise-rollout": 2},
    }  # fmt: skip
    assert review_summary([]) == {"reviewed": 0, "right": 0, "wrong": 0, "reviewer_accuracy": None,
                                  "better_paths": {}}  # fmt: skip


def _model(tmp_path: Path) -> ModelVersion:
    return ModelVersion("path_classifier", "1.2.0", tmp_path, {}, {"activation_accuracy": 0.8}, "2026-11-26T00:00:00Z")


def test_the_drift_report_counts_the_reviews_and_says_when_there_are_none(tmp_path: Path) -> None:
    labels = labels_of([_row("right"), _row("wrong", "enterprise-rollout"), _row("wrong", "enterprise-rollout")])
    result = assess(_model(tmp_path), DriftInputs([], [], timedelta(days=7), timedelta(days=14), labels))
    assert result.reviews == {"reviewed": 3, "right": 1, "wrong": 2, "reviewer_accuracy": 0.3333,
                              "better_paths": {"enterprise-rollout": 2}}  # fmt: skip
    assert result.to_json()["reviews"] == result.reviews
    assert not result.retrain  # reviews are a sample of the least sure decisions: reported, never a verdict alone
    assert (
        "  reviews: 3 reviewed, 1 right, 2 wrong (reviewer accuracy 0.333); better paths named: enterprise-rollout 2"
        in result.to_text().splitlines()
    )
    unreviewed = assess(_model(tmp_path), DriftInputs([], [], timedelta(days=7), timedelta(days=14)))
    assert unreviewed.reviews["reviewed"] == 0 and unreviewed.reviews["reviewer_accuracy"] is None
    assert "no reviewed decisions in the last 7 days, 0:00:00" in unreviewed.notes
    assert "reviews:" not in unreviewed.to_text()
