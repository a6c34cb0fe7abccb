"""The three models: they learn (beat trivial baselines on fresh data), round-trip through the registry,
train deterministically, and answer the wire shapes of the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from firstmile_inference.metrics import precision_recall, roc_auc
from firstmile_inference.models import load_predictor
from firstmile_inference.models.base import TorchPredictor
from firstmile_inference.registry import Registry
from firstmile_inference.schema import DEMO_PATHS, MODEL_NAMES
from firstmile_inference.simulate import Dataset, generate
from firstmile_inference.train import Hyper, TrainedModel, register_all, train_all, train_path_classifier

SMALL: dict[str, Hyper] = {
    "path_classifier": Hyper(epochs=6, batch_size=128, hidden=(32, 32), weight_decay=5e-4),
    "stuck_detector": Hyper(epochs=6, batch_size=256, val_fraction=0.2),
    "nudge_response_predictor": Hyper(epochs=6, batch_size=256),
}


@pytest.fixture(scope="module")
def trained() -> dict[str, TrainedModel]:
    return train_all(generate(3000, seed=11), seed=11, hyper=SMALL)


@pytest.fixture(scope="module")
def fresh() -> Dataset:
    return generate(2000, seed=12)


def test_path_classifier_beats_trivial_policies(trained: dict[str, TrainedModel], fresh: Dataset) -> None:
    out = trained["path_classifier"].predictor().predict(fresh.user_rows())
    chosen = np.array([DEMO_PATHS.index(p["path"]) for p in out])
    accuracy = float(np.mean(chosen == fresh.oracle))
    most_common = np.bincount(fresh.oracle, minlength=len(DEMO_PATHS)).max() / fresh.n
    assert accuracy > most_common + 0.25
    activation = fresh.expected[np.arange(fresh.n), chosen].mean()
    assert activation > fresh.expected.mean() + 0.2  # uniform random choice
    logged = [p["scores"][DEMO_PATHS[a]] for p, a in zip(out, fresh.assigned, strict=True)]
    assert roc_auc(logged, fresh.activated) > 0.68


def test_stuck_detector_beats_the_base_rate(trained: dict[str, TrainedModel], fresh: Dataset) -> None:
    model = trained["stuck_detector"]
    out = model.predictor().predict(fresh.stuck_rows())
    assert roc_auc([p["stuck_probability"] for p in out], fresh.stuck_label) > 0.85
    precision, recall = precision_recall([p["stuck"] for p in out], fresh.stuck_label)
    assert precision > fresh.stuck_label.mean() + 0.15 and recall > 0.5
    assert 0.0 < model.config["threshold"] < 1.0
    assert model.config["threshold"] == model.metrics["threshold"]
    assert all(p["stuck"] == (p["stuck_probability"] >= model.config["threshold"]) for p in out)


def test_nudge_predictor_ranks_responses(trained: dict[str, TrainedModel], fresh: Dataset) -> None:
    out = trained["nudge_response_predictor"].predictor().predict(fresh.nudge_rows())
    assert roc_auc([p["response_probability"] for p in out], fresh.nudge_label) > 0.68


def test_registry_round_trip_gives_identical_predictions(
    trained: dict[str, TrainedModel], fresh: Dataset, tmp_path: Path
) -> None:
    registry = Registry(tmp_path)
    versions = register_all(registry, trained)
    inputs: dict[str, list[Any]] = {
        "path_classifier": list(fresh.user_rows()[:300]),
        "stuck_detector": list(fresh.stuck_rows()[:300]),
        "nudge_response_predictor": list(fresh.nudge_rows()[:300]),
    }
    for name in MODEL_NAMES:
        loaded = load_predictor(versions[name])
        assert isinstance(loaded, TorchPredictor) and not loaded.network.training
        assert (loaded.name, loaded.version, loaded.device) == (name, "1.0.0", "cpu")
        assert loaded.predict(inputs[name]) == trained[name].predictor().predict(inputs[name])
        assert versions[name].reference() == trained[name].reference


def test_training_is_deterministic_under_its_seed() -> None:
    data = generate(600, seed=2)
    quick = Hyper(epochs=2, batch_size=128, hidden=(16,))
    a = train_path_classifier(data, seed=5, hyper=quick)
    b = train_path_classifier(data, seed=5, hyper=quick)
    c = train_path_classifier(data, seed=6, hyper=quick)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    assert a.metrics == b.metrics


def test_path_candidates(trained: dict[str, TrainedModel], fresh: Dataset) -> None:
    predictor = trained["path_classifier"].predictor()
    user = dict(fresh.user_features(0))
    full = predictor.predict([user])[0]
    assert set(full["scores"]) == set(DEMO_PATHS)
    assert full["confidence"] == full["scores"][full["path"]] == max(full["scores"].values())
    some = predictor.predict([{**user, "candidates": ["generic", "analyst-reports", "tenant-custom-path"]}])[0]
    assert set(some["scores"]) == {"generic", "analyst-reports"}
    assert some["scores"]["generic"] == pytest.approx(full["scores"]["generic"], abs=1e-6)
    assert some["path"] == max(some["scores"], key=some["scores"].__getitem__)
    with pytest.raises(ValueError, match="instance 1: none of the candidates"):
        predictor.predict([user, {**user, "candidates": ["tenant-custom-path"]}])
    with pytest.raises(ValueError, match="instance 0: none of the candidates"):
        predictor.predict([{**user, "candidates": []}])
    with pytest.raises(ValueError, match="instance 0: field 'candidates' must be a list"):
        predictor.predict([{**user, "candidates": "generic"}])


def test_bad_instances_name_their_index(trained: dict[str, TrainedModel], fresh: Dataset) -> None:
    rows: list[dict[str, Any]] = [dict(r) for r in fresh.stuck_rows()[:3]]
    rows[2] = {**rows[2], "hours_since_last_activity": "yesterday"}
    with pytest.raises(ValueError, match="instance 2: field 'hours_since_last_activity'"):
        trained["stuck_detector"].predictor().predict(rows)
    assert trained["nudge_response_predictor"].predictor().predict([]) == []
