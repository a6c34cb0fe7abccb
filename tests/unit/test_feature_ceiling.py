"""The feature-only ceilings of issue 19's stuck and nudge goals (firstmile_inference.feature_ceiling)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firstmile_inference.feature_ceiling import feature_ceiling_study, main, stuck_probability
from firstmile_inference.metrics import roc_auc
from firstmile_inference.seed_study import SeedError
from firstmile_inference.simulate import Dataset, generate


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(3000, seed=23, keep_timeline=True)


@pytest.fixture(scope="module")
def target(data: Dataset) -> np.ndarray[Any, np.dtype[np.float64]]:
    return stuck_probability(data, samples=32)


def test_stuck_probability_is_calibrated_against_the_drawn_labels(
    data: Dataset, target: np.ndarray[Any, np.dtype[np.float64]]
) -> None:
    labels = data.stuck_label
    assert target.shape == labels.shape
    assert np.all((target >= 0.0) & (target <= 1.0))
    # E[target] = E[label]: within three standard errors of the labels' mean
    assert abs(target.mean() - labels.mean()) < 3.0 * labels.std() / np.sqrt(labels.size)
    # and E[label | target] = target: the stuck rate of each band of the target lies near the band's mean target
    for lo, hi in ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01)):
        band = (target >= lo) & (target < hi)
        assert band.sum() >= 150, (lo, hi)
        assert abs(labels[band].mean() - target[band].mean()) < 0.06, (lo, hi)
    # it knows the latent state: far better than any feature-only score
    assert roc_auc(target, labels) > 0.95


def test_stuck_probability_is_one_where_the_user_gives_up_at_this_step(
    data: Dataset, target: np.ndarray[Any, np.dtype[np.float64]]
) -> None:
    assert data.timeline is not None
    step = data.stuck_numeric[:, 0].astype(int)
    gives_up = data.timeline.fail_at[data.stuck_session] == step
    assert gives_up.sum() > 50
    assert np.all(data.stuck_label[gives_up])
    np.testing.assert_allclose(target[gives_up], 1.0)
    # a smooth episode's users are not stuck and their target is mostly low
    smooth = data.stuck_episode == "smooth"
    assert target[smooth].mean() < 0.2


def test_stuck_probability_needs_the_generated_timeline(data: Dataset, tmp_path: Path) -> None:
    loaded = Dataset.load(data.save(tmp_path / "d.npz"))
    assert loaded.timeline is None
    with pytest.raises(ValueError, match="no timeline"):
        stuck_probability(loaded)
    with pytest.raises(ValueError, match="no timeline"):  # not kept unless asked for
        stuck_probability(generate(200, seed=23))
    with pytest.raises(ValueError, match="samples must be positive"):
        stuck_probability(data, samples=0)


def test_study_reports_both_ceilings_beside_the_production_recipe() -> None:
    found = feature_ceiling_study(
        train_seeds=(23,), heldout_seeds=(1007,), train_sessions=3000, sessions=1500, samples=8
    )
    json.dumps(found)  # plain JSON
    assert found["train_seeds"] == [23] and found["heldout_seeds"] == [1007]
    assert len(found["runs"]) == 1
    run = found["runs"][0]
    for name in ("stuck_full", "stuck_label"):
        for metric in ("auc", "recall_at_95", "precision", "recall", "precision_95_rule", "recall_95_rule"):
            assert 0.0 <= run[f"{name}_{metric}"] <= 1.0, (name, metric)
    for key, spread in found["metrics"].items():
        assert set(spread) == {"mean", "sd", "min", "max", "n"}, key
        assert spread["n"] == 1
    assert set(found["goals"]) == {"nudge_auc", "stuck_recall_at_95_precision"}
    nudge = found["goals"]["nudge_auc"]
    assert nudge["goal"] == 0.80 and nudge["reachable"] == (nudge["feature_only_ceiling"] >= 0.80)
    # trained on the true probabilities, the nudge model is no worse than the one trained on the outcomes,
    # and both stay under the true probabilities, which see the latent motivation and responsiveness
    assert run["nudge_full_auc"] > 0.5
    assert run["nudge_full_auc"] >= run["nudge_label_auc"] - 0.01
    assert run["nudge_full_auc"] < run["nudge_true_probability_auc"]
    assert run["stuck_full_auc"] > 0.8
    assert run["stuck_full_auc"] >= run["stuck_label_auc"] - 0.02
    assert run["stuck_full_auc"] < run["stuck_latent_auc"]


def test_refuses_heldout_seeds_used_for_training_or_tuning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SeedError, match="a training seed"):
        feature_ceiling_study(train_seeds=(23,), heldout_seeds=(23,), train_sessions=100, sessions=100)
    with pytest.raises(SystemExit) as exit_info:
        main(["--train-seeds", "7,8", "--heldout-seeds", "1007,555"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "555" in err and "tuning" in err
    with pytest.raises(SystemExit):
        main(["--train-seeds", "7", "--heldout-seeds", "1007", "--samples", "0"])
    assert "must be positive" in capsys.readouterr().err
