"""Metrics (rank AUC, threshold for a precision) and the evaluation report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

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


# ---------------------------------------------------------------- seed-robust evaluation (issue 19)
def test_a_heldout_seed_used_for_training_or_tuning_is_refused() -> None:
    from firstmile_inference.seed_study import SeedError, check_heldout_seeds, refused_heldout_seeds

    train = (7, 8, 9, 10, 11)
    check_heldout_seeds((1007, 1008, 1009), train)  # the defaults pass
    for bad, reason in ((8, "a training seed"), (555, "tuning"), (556, "tuning"), (9 + 50_000, "check set"),
                        (10 + 1_000_003, "validation split")):  # fmt: skip
        with pytest.raises(SeedError, match=f"{bad} .*{reason}"):
            check_heldout_seeds((1007, bad, 1009), train)
    refused = refused_heldout_seeds((12, 13, 14, 15, 16))
    assert 7 in refused and "tuning" in refused[7]  # the simulator's tuning seed, even when not trained on
    with pytest.raises(SeedError, match="at least 5 distinct training seeds"):
        check_heldout_seeds((1007, 1008, 1009), (7, 8, 9, 10))
    with pytest.raises(SeedError, match="at least 3 distinct held-out seeds"):
        check_heldout_seeds((1007, 1007, 1009), train)


def test_the_cli_refuses_a_used_seed_before_writing_anything(tmp_path: Path) -> None:
    from firstmile.ml.cli import models

    doc = tmp_path / "models.md"
    result = CliRunner().invoke(
        models, ["evaluate", "--train-seeds", "7,8,9,10,11", "--heldout-seeds", "1007,7,1009", "--train-sessions",
                 "1000", "--sessions", "500", "--write-docs", str(doc), "--json"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "7 (a training seed (7), and the simulator's tuning training seed)" in result.stderr
    assert result.stdout == "" and not doc.exists()
    tuning = CliRunner().invoke(models, ["evaluate", "--heldout-seeds", "1007,555,1009", "--sessions", "500"])
    assert tuning.exit_code == 2 and "555 (a simulator tuning evaluation seed)" in tuning.stderr
    mixed = CliRunner().invoke(models, ["evaluate", "--seed-robust", "--seed", "1007"])
    assert mixed.exit_code == 2 and "--heldout-seeds" in mixed.stderr


def test_spread_is_the_mean_and_sample_sd() -> None:
    from firstmile_inference.seed_study import Spread

    s = Spread.of([0.9, 0.92, 0.94])
    assert s.mean == pytest.approx(0.92) and (s.min, s.max, s.n) == (0.9, 0.94, 3)
    assert s.sd == pytest.approx(0.02)  # n - 1
    assert Spread.of([0.5]).sd == 0.0


def test_seed_study_aggregates_five_training_by_three_heldout_seeds(tmp_path: Path) -> None:
    from firstmile_inference.seed_study import METRICS, seed_study

    quick = {name: Hyper(epochs=2, batch_size=256) for name in ("path_classifier", "stuck_detector",
                                                                "nudge_response_predictor")}  # fmt: skip
    lines: list[str] = []
    study = seed_study(
        train_seeds=(21, 22, 23, 24, 25), heldout_seeds=(1101, 1102, 1103), train_sessions=1000, sessions=500,
        hyper=quick, progress=lines.append, registry_dir=tmp_path / "reg",
    )  # fmt: skip
    assert len(study.runs) == 15
    assert {(r.train_seed, r.heldout_seed) for r in study.runs} == {
        (s, h) for s in (21, 22, 23, 24, 25) for h in (1101, 1102, 1103)
    }
    # every training seed was trained into (and loaded back from) its own registry
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == [f"train-seed-{s}" for s in (21, 22, 23, 24, 25)]
    acc = [r.metrics["path_accuracy"] for r in study.runs]
    spread = study.spread("path_accuracy")
    assert (
        spread.n == 15
        and spread.mean == pytest.approx(np.mean(acc))
        and spread.sd == pytest.approx(np.std(acc, ddof=1))
    )
    per_seed = study.by_train_seed("path_accuracy")
    assert per_seed[21] == pytest.approx(
        np.mean([r.metrics["path_accuracy"] for r in study.runs if r.train_seed == 21])
    )
    assert study.train_seed_spread("path_accuracy").sd == pytest.approx(np.std(list(per_seed.values()), ddof=1))
    # the oracle's activation rate depends on the held-out set only: no spread across training seeds
    assert study.train_seed_spread("oracle_activation_rate").sd == pytest.approx(0.0, abs=1e-12)
    assert study.spread("oracle_activation_rate").sd > 0
    out = study.to_json()
    assert set(out["metrics"]) == set(METRICS) and len(out["runs"]) == 15
    assert out["goals"][0]["name"] == "Path accuracy (mean)"
    text = study.to_markdown()
    assert "| Path accuracy, ML planner vs oracle |" in text and "5 training seeds" in text and "= 15 runs" in text
    assert any("training seed 25" in line for line in lines)


def test_evaluate_json_prints_only_json_on_stdout() -> None:
    from firstmile.ml.cli import models

    result = CliRunner().invoke(
        models, ["evaluate", "--train-seeds", "31,32,33,34,35", "--heldout-seeds", "1201,1202,1203",
                 "--train-sessions", "1000", "--sessions", "500", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)  # nothing but JSON
    assert found["train_seeds"] == [31, 32, 33, 34, 35] and len(found["runs"]) == 15
    assert 0.0 <= found["metrics"]["path_accuracy"]["mean"] <= 1.0
    assert "training seed 31" in result.stderr  # the progress went to stderr


def test_single_run_mode_refuses_the_staged_models_training_seed_and_keeps_stdout_json(tmp_path: Path) -> None:
    from firstmile.ml.cli import models
    from firstmile_inference.registry import Registry
    from firstmile_inference.train import register_all

    quick = {name: Hyper(epochs=1, batch_size=256) for name in ("path_classifier", "stuck_detector",
                                                                "nudge_response_predictor")}  # fmt: skip
    register_all(Registry(tmp_path / "reg"), train_all(generate(1000, seed=41), seed=41, hyper=quick),
                 promote_to="production")  # fmt: skip
    base = ["evaluate", "--registry", str(tmp_path / "reg"), "--sessions", "500"]
    refused = CliRunner().invoke(models, [*base, "--seed", "41", "--json"])
    assert refused.exit_code == 2 and "41 was used for training or tuning" in refused.stderr
    assert refused.stdout == ""
    assert CliRunner().invoke(models, [*base, "--seed", "556"]).exit_code == 2  # a simulator tuning seed
    from firstmile_inference.evaluate import evaluate_registry
    from firstmile_inference.seed_study import SeedError

    with pytest.raises(SeedError, match="41 was used for training or tuning"):
        evaluate_registry(Registry(tmp_path / "reg"), sessions=500, seed=41)
    result = CliRunner().invoke(models, [*base, "--seed", "1301", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["seed"] == 1301 and report["versions"]["path_classifier"] == "1.0.0"
    assert "simulating 500 held-out sessions (seed 1301)" in result.stderr


def test_full_information_ceiling_refuses_used_seeds_and_beats_the_rules() -> None:
    from firstmile_inference.ceiling import ceiling_study
    from firstmile_inference.seed_study import SeedError

    with pytest.raises(SeedError, match="555"):
        ceiling_study(train_seeds=(51,), heldout_seeds=(555,), train_sessions=1000, sessions=500)
    found = ceiling_study(train_seeds=(51,), heldout_seeds=(1401,), train_sessions=4000, sessions=1000)
    assert found["path_accuracy"]["n"] == 1 and 0.65 < found["path_accuracy"]["mean"] <= 1.0
    assert 0.9 < found["activation_vs_oracle"]["mean"] <= 1.0


def test_the_ensemble_study_averages_members_on_unused_seeds_only() -> None:
    from firstmile_inference.ceiling import ensemble_study
    from firstmile_inference.seed_study import SeedError

    with pytest.raises(ValueError, match="at least 2 members"):
        ensemble_study(1, train_seeds=(52,), heldout_seeds=(1402,))
    with pytest.raises(SeedError, match="555"):
        ensemble_study(2, train_seeds=(52,), heldout_seeds=(555,), train_sessions=1000, sessions=500)
    found = ensemble_study(2, train_seeds=(52, 53), heldout_seeds=(1402,), train_sessions=20_000, sessions=800)
    assert [(r["train_seed"], r["heldout_seed"]) for r in found["runs"]] == [(52, 1402), (53, 1402)]
    for run in found["runs"]:
        assert 0.5 < run["single_path_accuracy"] <= 1.0 and 0.5 < run["path_accuracy"] <= 1.0
    assert found["members"] == 2 and found["path_accuracy"]["n"] == 2 and found["training_seed_sd"] >= 0
