"""The ML slice end to end: simulate → train all three → register → load_predictor → predict."""

from __future__ import annotations

from pathlib import Path

import pytest

from firstmile_inference.models import load_predictor
from firstmile_inference.predictor import Predictor
from firstmile_inference.registry import Registry
from firstmile_inference.schema import DEMO_PATHS, MODEL_NAMES
from firstmile_inference.simulate import generate
from firstmile_inference.train import Hyper, register_all, train_all


def test_generate_train_register_load_predict(tmp_path: Path) -> None:
    data = generate(1500, seed=3)
    lines: list[str] = []
    quick: dict[str, Hyper] = {name: Hyper(epochs=2) for name in MODEL_NAMES}
    trained = train_all(data, seed=3, progress=lines.append, hyper=quick)
    assert set(trained) == set(MODEL_NAMES)
    assert any(line.startswith("path_classifier epoch 2/2 loss ") and "val_auc" in line for line in lines)

    registry = Registry(f"file://{tmp_path}")
    versions = register_all(registry, trained, promote_to="production")
    for name in MODEL_NAMES:
        mv = registry.resolve(name, "production")
        assert mv is not None
        assert mv.version == versions[name].version == "1.0.0"
        predictor: Predictor = load_predictor(mv)
        assert (predictor.name, predictor.version, predictor.device) == (name, "1.0.0", "cpu")

    path = load_predictor(registry.get("path_classifier", "1.0.0"))
    out = path.predict([data.user_features(0), {**data.user_features(1), "candidates": ["generic", "x"]}])
    assert set(out[0]["scores"]) == set(DEMO_PATHS)
    assert out[0]["path"] == max(out[0]["scores"], key=out[0]["scores"].__getitem__)
    assert set(out[1]["scores"]) == {"generic"} and out[1]["path"] == "generic"

    stuck = load_predictor(registry.get("stuck_detector", "1.0.0")).predict(data.stuck_rows()[:5])
    assert all(set(p) == {"stuck_probability", "stuck"} for p in stuck)
    nudge = load_predictor(registry.get("nudge_response_predictor", "1.0.0")).predict(data.nudge_rows()[:5])
    assert all(0.0 <= p["response_probability"] <= 1.0 for p in nudge)


def test_command_line_entry_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firstmile_inference import evaluate, train

    assert (
        train.main(["--registry", str(tmp_path), "--sessions", "1200", "--seed", "4", "--promote", "production"]) == 0
    )
    out = capsys.readouterr().out
    epochs = train.DEFAULT_HYPER["path_classifier"].epochs
    assert f"path_classifier epoch {epochs}/{epochs} loss" in out and "registered stuck_detector 1.0.0" in out
    assert Registry(tmp_path).stages("nudge_response_predictor").production == "1.0.0"
    report = tmp_path / "report.md"
    assert (
        evaluate.main(["--registry", str(tmp_path), "--sessions", "500", "--seed", "5", "--markdown", str(report)]) == 0
    )
    text = capsys.readouterr().out
    assert text == report.read_text()
    assert "--sessions 1200 --seed 4" in text and "--sessions 500 --seed 5" in text
