"""The verdict rules of the drift check of a tenant's own model (firstmile.ml.drift.assess_tenant), without a
database: PSI on enough recent decisions, the calibration gap against the held-out one, too few data → no verdict,
one flag per version; and the held-out figures training stores (firstmile_inference.tenant)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firstmile.ml.drift import (
    CALIBRATION_MIN_SHIFT,
    MIN_OUTCOMES,
    MIN_RECENT,
    TenantDriftInputs,
    _settle,
    assess_tenant,
    calibration_check,
    calibration_figures,
    last_report,
)
from firstmile_inference.drift import build_reference
from firstmile_inference.registry import Registry
from firstmile_inference.tenant import LoggedData, calibration_report, unknown_fill

NAME = "tenant-acme.path_classifier"
SOURCES = ("organic", "referral", "paid_search")
NOW = datetime(2026, 11, 26, tzinfo=UTC)


def _reference(engagement: list[float] | None = None) -> dict[str, Any]:
    # training: developers from three sources in equal shares, engagement unknown (0) unless given
    return build_reference(
        {"user_persona": ["developer"] * 300, "signup_source": [SOURCES[i % 3] for i in range(300)],
         "engagement_score": engagement or [0.0] * 300},
        numeric=["engagement_score"],
        categorical={"user_persona": ("developer", "analyst"), "signup_source": SOURCES},
    )  # fmt: skip


HELD_OUT = {  # what training stores: the model predicted 0.8 on its own choices, 0.8 of them activated
    "chosen": {"decisions": 40, "mean_predicted": 0.8, "observed_rate": 0.8, "gap": 0.0, "residual_sd": 0.4},
    "all": {"decisions": 90, "mean_predicted": 0.5, "observed_rate": 0.45, "gap": -0.05, "residual_sd": 0.5},
}


def _metrics(**extra: Any) -> dict[str, Any]:
    return {"calibration": HELD_OUT, "reference_unknown_fill": {"engagement_score": 0.0}} | extra


def _recent(n: int, persona: str = "developer") -> list[dict[str, Any]]:
    return [{"user_persona": persona, "signup_source": SOURCES[i % 3], "engagement_score": None} for i in range(n)]


def _outcomes(n: int, activated_share: float, predicted: float = 0.8) -> list[tuple[float, bool]]:
    yes = round(n * activated_share)
    return [(predicted, i < yes) for i in range(n)]


def _assess(recent: list[dict[str, Any]], outcomes: list[tuple[float, bool]], **metrics: Any) -> Any:
    inputs = TenantDriftInputs(recent, outcomes, timedelta(days=7), timedelta(days=14))
    return assess_tenant(NAME, "1.0.0", "acme", _reference(), _metrics(**metrics), inputs, now=NOW)


def test_the_same_population_and_outcomes_are_stable() -> None:
    result = _assess(_recent(MIN_RECENT), _outcomes(100, 0.8))
    assert result.verdict == "stable" and not result.retrain and result.reasons == []
    assert {f["level"] for f in result.features} == {"stable"}
    calibration = result.calibration
    assert calibration["basis"] == "chosen" and calibration["shift"] == 0.0 and not calibration["drift"]
    assert calibration["live"]["decisions"] == 100 and calibration["live"]["observed_rate"] == 0.8
    assert "verdict: stable" in result.to_text()


def test_a_significant_feature_shift_on_enough_decisions_is_drift() -> None:
    result = _assess(_recent(MIN_RECENT, persona="analyst"), _outcomes(100, 0.8))
    assert result.verdict == "drift" and result.retrain
    psi = {f["name"]: f for f in result.features}
    assert psi["user_persona"]["level"] == "significant" and psi["signup_source"]["level"] == "stable"
    assert result.reasons == [f"feature shift (PSI > 0.25): user_persona {psi['user_persona']['psi']:.3f}"]
    assert "DRIFT - feature shift" in result.to_text()


def test_too_few_recent_decisions_report_psi_without_a_feature_verdict() -> None:
    result = _assess(_recent(MIN_RECENT - 1, persona="analyst"), [])
    assert result.features and result.verdict == "insufficient" and not result.retrain
    assert any("no feature verdict" in n for n in result.notes)
    assert any("no calibration verdict" in n for n in result.notes)


def test_unknown_numerics_are_binned_where_training_put_them() -> None:
    # training knew the engagement of half the users (20 to 94.5) and filled the other half with their mean
    known = [20.0 + i / 2 for i in range(150)]
    mean = sum(known) / len(known)
    reference = _reference(known + [mean] * 150)
    # live: the same mix, the unknowns recorded as None
    recent = [r | {"engagement_score": known[i // 2] if i % 2 else None} for i, r in enumerate(_recent(300))]
    inputs = TenantDriftInputs(recent, [], timedelta(days=7), timedelta(days=14))
    fill = {"engagement_score": mean}
    filled = assess_tenant(NAME, "1.0.0", "acme", reference, _metrics(reference_unknown_fill=fill), inputs)
    assert {f["name"]: f["level"] for f in filled.features}["engagement_score"] == "stable"
    # binned as 0 instead (below every training value), half the live sample looks shifted
    unfilled = assess_tenant(NAME, "1.0.0", "acme", reference, {}, inputs)
    assert {f["name"]: f["level"] for f in unfilled.features}["engagement_score"] == "significant"


def test_outcomes_that_contradict_the_model_are_drift() -> None:
    # the model predicts 0.8 for its choices; none of them activated
    result = _assess(_recent(10), _outcomes(MIN_OUTCOMES, 0.0))
    assert result.verdict == "drift"
    calibration = result.calibration
    assert calibration["shift"] == -0.8 and calibration["drift"]
    assert result.reasons[0].startswith("calibration moved -0.800")
    assert "observed 0.000 against 0.800 predicted on 50 decisions" in result.reasons[0]


def test_a_small_or_noisy_calibration_move_is_not_drift() -> None:
    small = calibration_check(_outcomes(400, 0.78), HELD_OUT)  # 2 points: below the 5-point minimum
    assert small.shift == -0.02 and not small.drift
    # 9 points on 55 decisions, against 40 held out: beyond 5 points, within 1.96 standard errors of the two gaps
    noisy = calibration_check(_outcomes(55, 0.71), HELD_OUT)
    assert (
        noisy.shift is not None
        and noisy.shift < -CALIBRATION_MIN_SHIFT
        and noisy.tolerance is not None
        and noisy.tolerance > 0.15
        and not noisy.drift
    )
    # the same 8 points on 2,000 decisions against 4,000 held out: the 5-point minimum decides, drift
    precise = HELD_OUT | {"chosen": HELD_OUT["chosen"] | {"decisions": 4000}}
    sure = calibration_check(_outcomes(2000, 0.72), precise)
    assert sure.tolerance == CALIBRATION_MIN_SHIFT and sure.drift


def test_too_few_outcomes_or_no_stored_figure_give_no_calibration_verdict() -> None:
    few = calibration_check(_outcomes(MIN_OUTCOMES - 1, 0.0), HELD_OUT)
    assert not few.drift and few.shift is None and "no calibration verdict" in str(few.note)
    old = calibration_check(_outcomes(100, 0.0), None)
    assert not old.drift and "metrics.calibration" in str(old.note)
    # too few held-out decisions on the model's own choice: all held-out decisions are the reference
    thin = calibration_check(_outcomes(100, 0.45, predicted=0.5), HELD_OUT | {"chosen": {"decisions": 3}})
    assert thin.basis == "all" and thin.shift == 0.0 and not thin.drift
    assert calibration_figures([]) == {"decisions": 0}


def test_a_drifted_version_is_flagged_once_and_its_report_kept(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register(NAME, weights=b"", config={}, metrics=_metrics())
    drifted = _assess(_recent(MIN_RECENT, persona="analyst"), [])
    first = _settle(registry, drifted, flag=True)
    assert first.flagged
    assert [(f["version"], f["reason"].startswith("drift: feature shift")) for f in registry.flags(NAME)] == [
        ("1.0.0", True)
    ]
    again = _settle(registry, drifted, flag=True)
    assert not again.flagged and any("already flagged" in n for n in again.notes)
    assert len(registry.flags(NAME)) == 1  # one flag per version: the scheduled training reads it once
    report = last_report(registry, NAME)
    assert report is not None and report["verdict"] == "drift" and report["checked_at"] == NOW.isoformat()
    assert json.loads(json.dumps(report))["features"] == drifted.features
    stable = _settle(registry, _assess(_recent(MIN_RECENT), []), flag=True)
    assert not stable.flagged and len(registry.flags(NAME)) == 1
    assert last_report(registry, NAME) == stable.to_json()
    assert last_report(registry, "tenant-other.path_classifier") is None
    entry = stable.audit_payload(scheduled=True)
    assert entry["action"] == "models.drift" and entry["scheduled"] is True and entry["verdict"] == "stable"
    assert entry["features"] == stable.features and "calibration" in entry


def test_training_stores_the_held_out_calibration_and_the_unknown_fill() -> None:
    # two paths, both eligible; the model (q) prefers path 1 on every row
    q = np.asarray([[0.2, 0.9]] * 4, dtype=np.float64)
    data = LoggedData(
        features=[{"engagement_score": 10.0}, {"engagement_score": None}, {"engagement_score": 30.0}, {}],
        actions=np.asarray([1, 1, 0, 0], dtype=np.int64),
        rewards=np.asarray([1.0, 0.0, 0.0, 0.0], dtype=np.float64),
        propensities=np.full(4, 0.5),
        eligible=np.ones((4, 2), dtype=np.bool_),
        paths=("a", "b"),
    )
    report = calibration_report(data, np.arange(4, dtype=np.int64), q)
    chosen = report["chosen"]  # the rows logged on path 1, the model's own choice
    assert chosen["decisions"] == 2 and chosen["mean_predicted"] == pytest.approx(0.9)
    assert chosen["observed_rate"] == 0.5 and chosen["gap"] == pytest.approx(-0.4)
    assert chosen["brier"] == pytest.approx((0.1**2 + 0.9**2) / 2)
    assert report["all"]["decisions"] == 4 and report["all"]["mean_predicted"] == pytest.approx(0.55)
    fill = unknown_fill(data.features)
    assert fill["engagement_score"] == 20.0 and fill["session_count"] == 0.0
    # the live figures are computed the same way
    live = calibration_figures([(0.9, True), (0.9, False)])
    assert live["gap"] == pytest.approx(chosen["gap"]) and live["residual_sd"] == pytest.approx(chosen["residual_sd"])
