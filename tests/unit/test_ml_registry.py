"""The local-directory model registry: versions, immutability, stages, history, flags, atomic writes, URIs."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from firstmile_inference.registry import (
    PromotionError,
    Registry,
    Stages,
    VersionExistsError,
    parse_version,
    root_from_uri,
)

WEIGHTS = {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "layer.bias": torch.zeros(2)}


def _register(registry: Registry, version: str | None = None, name: str = "stuck_detector") -> str:
    mv = registry.register(name, weights=WEIGHTS, config={"threshold": 0.5}, metrics={"auc": 0.9}, version=version)
    return mv.version


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def test_versions_bump_the_minor_and_sort_semantically(registry: Registry) -> None:
    assert registry.versions("stuck_detector") == []
    assert _register(registry) == "1.0.0"
    assert _register(registry) == "1.1.0"
    assert _register(registry, "1.10.0") == "1.10.0"
    assert _register(registry, "1.9.0") == "1.9.0"
    assert _register(registry) == "1.11.0"
    assert _register(registry, "2.0.0") == "2.0.0"
    assert _register(registry) == "2.1.0"
    listed = [v.version for v in registry.versions("stuck_detector")]
    assert listed == ["1.0.0", "1.1.0", "1.9.0", "1.10.0", "1.11.0", "2.0.0", "2.1.0"]
    assert registry.names() == ["stuck_detector"]
    latest = registry.latest("stuck_detector")
    assert latest is not None and latest.version == "2.1.0"


def test_versions_are_immutable(registry: Registry) -> None:
    _register(registry, "1.0.0")
    with pytest.raises(VersionExistsError, match="immutable"):
        _register(registry, "1.0.0")
    mv = registry.get("stuck_detector", "1.0.0")
    assert mv.config == {"threshold": 0.5} and mv.metrics == {"auc": 0.9}
    assert mv.created_at.endswith("+00:00")


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "01.0.0", "1.0.0-rc1", "", "1.0.0.0"])
def test_semantic_versions_are_validated(registry: Registry, bad: str) -> None:
    with pytest.raises(ValueError, match="semantic version"):
        parse_version(bad)
    with pytest.raises(ValueError, match="semantic version"):
        _register(registry, bad)


def test_unknown_versions_and_names(registry: Registry) -> None:
    _register(registry)
    with pytest.raises(KeyError, match=r"'stuck_detector' has no version '9.9.9'.*registered: 1.0.0"):
        registry.get("stuck_detector", "9.9.9")
    with pytest.raises(ValueError, match="invalid model name"):
        registry.versions("../etc")


def test_weights_round_trip_from_a_mapping_or_bytes(registry: Registry) -> None:
    mv = registry.register("path_classifier", weights=WEIGHTS, config={}, metrics={})
    loaded = torch.load(mv.weights_path, weights_only=True)
    assert all(torch.equal(loaded[k], WEIGHTS[k]) for k in WEIGHTS)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer)
    raw = registry.register("path_classifier", weights=buffer.getvalue(), config={}, metrics={}, reference={"n": 1})
    assert torch.equal(torch.load(raw.weights_path, weights_only=True)["w"], torch.ones(3))
    assert raw.reference() == {"n": 1} and mv.reference() is None
    assert sorted(p.name for p in raw.path.iterdir()) == [
        "config.json", "meta.json", "metrics.json", "reference.json", "weights.pt",
    ]  # fmt: skip


def test_a_failed_register_leaves_nothing_behind(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="config must be JSON-serialisable"):
        registry.register("nudge_response_predictor", weights=WEIGHTS, config={"x": object()}, metrics={})
    assert registry.versions("nudge_response_predictor") == []

    def crash(src: Any, dst: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        _register(registry, name="nudge_response_predictor")
    monkeypatch.undo()
    assert registry.versions("nudge_response_predictor") == []
    assert [p.name for p in (registry.root / "nudge_response_predictor").iterdir()] == [".lock"]
    assert _register(registry, name="nudge_response_predictor") == "1.0.0"


def test_promotion_goes_shadow_canary_production(registry: Registry) -> None:
    v1, v2 = _register(registry), _register(registry)
    assert registry.stages("stuck_detector") == Stages()
    with pytest.raises(PromotionError, match="not in shadow"):
        registry.promote("stuck_detector", v1, "canary")
    with pytest.raises(PromotionError, match="not in canary"):
        registry.promote("stuck_detector", v1, "production")
    assert registry.promote("stuck_detector", v1, "shadow").shadow == v1
    stages = registry.promote("stuck_detector", v1, "canary")
    assert (stages.canary, stages.canary_weight, stages.shadow) == (v1, 0.1, None)
    stages = registry.promote("stuck_detector", v1, "canary", weight=0.5)  # ramp up
    assert stages.canary_weight == 0.5
    stages = registry.promote("stuck_detector", v1, "production", actor="alice")
    assert stages == Stages(production=v1, canary=None, canary_weight=0.0, shadow=None)
    resolved = registry.resolve("stuck_detector", "production")
    assert resolved is not None and resolved.version == v1
    assert registry.resolve("stuck_detector", "canary") is None

    registry.promote("stuck_detector", v2, "shadow")
    registry.promote("stuck_detector", v2, "canary", weight=0.25)
    registry.promote("stuck_detector", v2, "production")
    # rollback: skipping stages needs force
    with pytest.raises(PromotionError):
        registry.promote("stuck_detector", v1, "production")
    assert registry.promote("stuck_detector", v1, "production", force=True, actor="oncall").production == v1

    history = registry.history("stuck_detector")
    assert [(h["stage"], h["from"], h["to"]) for h in history] == [
        ("shadow", None, v1), ("canary", None, v1), ("canary", v1, v1), ("production", None, v1),
        ("shadow", None, v2), ("canary", None, v2), ("production", v1, v2), ("production", v2, v1),
    ]  # fmt: skip
    assert history[3]["actor"] == "alice" and history[-1]["forced"] is True and history[-1]["actor"] == "oncall"
    assert all(h["time"] for h in history)


def test_promotion_arguments_are_validated(registry: Registry) -> None:
    v1 = _register(registry)
    registry.promote("stuck_detector", v1, "shadow")
    for weight in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="canary weight"):
            registry.promote("stuck_detector", v1, "canary", weight=weight)
    with pytest.raises(ValueError, match="canary stage only"):
        registry.promote("stuck_detector", v1, "production", weight=0.5, force=True)
    with pytest.raises(ValueError, match="unknown stage"):
        registry.promote("stuck_detector", v1, "staging")
    with pytest.raises(ValueError, match="unknown stage"):
        registry.resolve("stuck_detector", "live")
    with pytest.raises(KeyError):
        registry.promote("stuck_detector", "3.0.0", "shadow")
    assert registry.clear("stuck_detector", "shadow").shadow is None


def test_stage_writes_are_atomic(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = _register(registry), _register(registry)
    registry.promote("stuck_detector", v1, "production", force=True)
    before = (registry.root / "stuck_detector" / "stages.json").read_text()

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.promote("stuck_detector", v2, "production", force=True)
    monkeypatch.undo()
    directory = registry.root / "stuck_detector"
    assert (directory / "stages.json").read_text() == before
    assert json.loads(before)["production"] == v1
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert len(registry.history("stuck_detector")) == 1  # the failed change was not recorded


def test_concurrent_registrations_get_distinct_versions(registry: Registry) -> None:
    versions: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        v = _register(registry)
        with lock:
            versions.append(v)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions, key=parse_version) == [f"1.{i}.0" for i in range(6)]


def test_flags(registry: Registry) -> None:
    v1 = _register(registry)
    registry.flag("stuck_detector", v1, "accuracy dropped 7% relative")
    flags = registry.flags("stuck_detector")
    assert [(f["version"], f["reason"]) for f in flags] == [(v1, "accuracy dropped 7% relative")]
    with pytest.raises(KeyError):
        registry.flag("stuck_detector", "8.0.0", "nope")


def test_uris(tmp_path: Path) -> None:
    assert root_from_uri(f"file://{tmp_path}/reg") == tmp_path / "reg"
    assert root_from_uri("file://localhost/srv/models") == Path("/srv/models")
    assert root_from_uri(str(tmp_path)) == tmp_path
    assert root_from_uri("relative/dir") == Path("relative/dir")
    assert Registry(tmp_path).root == tmp_path
    for bad in ("s3://bucket/models", "gs://b/m", "https://example.com/models"):
        with pytest.raises(ValueError, match=r"unsupported registry URI scheme .*supported are file://"):
            Registry(bad)
    with pytest.raises(ValueError, match="local path"):
        Registry("file://otherhost/models")


_WITHOUT_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, NoTorch())
from firstmile_inference.registry import Registry
registry = Registry(sys.argv[1])
print(registry.stages("stuck_detector").production, registry.resolve("stuck_detector", "production").version)
"""


def test_the_stages_are_readable_where_torch_is_not_installed(registry: Registry) -> None:
    """The API image has no torch (it calls Ray Serve); it still reads which versions are staged."""
    import subprocess
    import sys

    version = _register(registry)
    registry.promote("stuck_detector", version, "shadow")
    registry.promote("stuck_detector", version, "canary")
    registry.promote("stuck_detector", version, "production")
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(registry.root)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [version, version]
