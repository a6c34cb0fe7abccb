"""Metrics (rank AUC, threshold for a precision) and the evaluation report."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from firstmile_inference.evaluate import EvaluationReport, evaluate, margin_summary
from firstmile_inference.metrics import precision_recall, roc_auc, threshold_for_precision
from firstmile_inference.schema import DEMO_PATHS
from firstmile_inference.simulate import generate
from firstmile_inference.train import Hyper, train_all


def _pairwise_auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_rank_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 300).astype(float).tolist()  # many ties
    labels = (rng.random(300) < 0.4).tolist()
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert roc_auc([0.1, 0.2, 0.3], [False, False, True]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [False, False, True]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [True, True]))
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([0.1], [True, False])


def test_threshold_for_precision_takes_the_lowest_qualifying_threshold() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    labels = [True, True, True, False, True, False, False]
    op = threshold_for_precision(scores, labels, 0.8)
    assert (op.threshold, op.precision, op.recall, op.met) == (0.5, 0.8, 1.0, True)
    strict = threshold_for_precision(scores, labels, 0.9)
    assert (strict.threshold, strict.precision, strict.met) == (0.7, 1.0, True)
    impossible = threshold_for_precision([0.9, 0.8], [False, True], 0.99)
    assert not impossible.met
    assert precision_recall([True, True, False], [True, False, True]) == (0.5, 0.5)


def test_margin_summary() -> None:
    expected = np.array([[0.5, 0.495, 0.1], [0.9, 0.1, 0.2], [0.3, 0.3, 0.0]])
    m = margin_summary(expected)
    assert m.share_below_002 == pytest.approx(2 / 3) and m.share_below_001 == pytest.approx(2 / 3)
    assert m.median == pytest.approx(0.005)


def test_evaluation_report() -> None:
    train, heldout = generate(2000, seed=31), generate(800, seed=32)
    quick: dict[str, Hyper] = {name: Hyper(epochs=3, batch_size=256) for name in ("path_classifier", "stuck_detector",
                                                                               "nudge_response_predictor")}  # fmt: skip
    predictors = {name: model.predictor() for name, model in train_all(train, seed=31, hyper=quick).items()}
    report = evaluate(
        heldout,
        predictors,
        policies={"always-generic": lambda traits: "generic"},
        commands=["python -m firstmile_inference.evaluate --registry R --sessions 800 --seed 32"],
    )
    assert isinstance(report, EvaluationReport)
    names = [p.name for p in report.policies]
    assert names == ["ml", "rules", "always-generic", "random", "oracle"]
    oracle = report.policy("oracle")
    assert oracle.accuracy == 1.0 and oracle.activation_rate == pytest.approx(heldout.expected.max(axis=1).mean())
    assert report.policy("random").accuracy == pytest.approx(1 / len(DEMO_PATHS))
    generic = report.policy("always-generic")
    assert generic.accuracy == pytest.approx(np.mean(heldout.oracle == DEMO_PATHS.index("generic")))
    assert all(p.activation_rate <= oracle.activation_rate + 1e-12 for p in report.policies)
    assert report.policy("ml").activation_rate > report.policy("random").activation_rate
    assert report.stuck[1].name.startswith("No activity")
    assert 0.5 < report.nudge_auc <= 1.0 and report.nudge_ceiling_auc > 0.5
    assert [g.target for g in report.goals] == [0.89, 0.92, 0.76]
    text = report.to_markdown()
    for needle in ("### Goals", "| Policy | Accuracy vs oracle", "### Stuck detection", "No activity ≥ 24 h",
                   "### Nudge response", "Margin between the best", "--seed 32"):  # fmt: skip
        assert needle in text
    assert report.to_json()["goals"][0]["target"] == 0.89
    with pytest.raises(ValueError, match="missing predictors"):
        evaluate(heldout, {"path_classifier": predictors["path_classifier"]})
