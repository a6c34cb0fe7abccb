"""The automatic switch to a tenant's own model (docs/models.md#the-automatic-switch), without services: the manifest's
``planner.model: own`` and ``planner.training.auto_promote`` (valid values, the content hash of existing manifests
unchanged), the planner's rule (``no_own_model`` until a production version, ``catalog_changed`` for a version of
another catalog), the stage reader's catalog fingerprints, and the off-policy gate against the current model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from firstmile.ml.inference import StageInfo, StageReader
from firstmile.ml.planner import AdaptivePlanner
from firstmile.ml.tenant_models import current_model, gate_figures, logged_data, register, report_text
from firstmile.onboarding.catalog import PathCatalog, catalog_fingerprint
from firstmile.onboarding.planner import Decision
from firstmile.tenancy.manifest import TenantManifest, TrainingSpec
from firstmile_inference.registry import Registry
from firstmile_inference.tenant import CurrentModel, LoggedData, off_policy_report
from tests.factories import demo_document
from tests.unit.test_planner_fallbacks import CATALOG, NOW, FakeClient, planner
from tests.unit.test_tenant_models import _data, _rows
from tests.unit.test_tenant_training_rule import plain_exclusions

OWN = "tenant-acme.path_classifier"


def _manifest(planner: dict[str, Any], slug: str = "acme") -> TenantManifest:
    doc = demo_document()
    doc["tenant"]["slug"] = slug
    doc["planner"] = planner
    return TenantManifest.model_validate(doc)


# ---------------------------------------------------------------- the manifest


def test_planner_model_own_and_auto_promote_are_valid_and_the_old_values_stay_valid() -> None:
    own = _manifest({"model": "own", "training": {"auto_promote": True}})
    assert own.planner is not None and own.planner.model == "own"
    assert own.planner.training is not None and own.planner.training.auto_promote is True
    for model in ("path_classifier", OWN, None):
        kept = _manifest({"model": model, "training": {"schedule_days": 3}})
        assert kept.planner is not None and kept.planner.model == model
        assert kept.planner.training is not None and kept.planner.training.auto_promote is False  # the default
    with pytest.raises(ValidationError, match="only its own model"):
        _manifest({"model": "tenant-other.path_classifier"})
    with pytest.raises(ValidationError, match="should match pattern"):
        _manifest({"model": "owner"})
    with pytest.raises(ValidationError, match="valid boolean"):
        _manifest({"model": "own", "training": {"auto_promote": "sometimes"}})


def test_auto_promote_unset_or_false_leaves_the_hash_of_existing_manifests_alone() -> None:
    plain = _manifest({"model": "path_classifier", "training": {"schedule_days": 3}})
    # the hash as it was before auto_promote (and the other fields added to training since) existed
    later = {name: True for name in ("auto_promote", "warm_start") if name in TrainingSpec.model_fields}
    excluded = plain_exclusions(plain) | {"planner": {"exploration": True, "training": later}}
    canonical = plain.model_dump(mode="json", exclude=excluded)
    assert set(canonical["planner"]["training"]) == {"schedule_days"}
    assert plain.content_hash() == hashlib.sha256(json.dumps(canonical, sort_keys=True,
                                                             separators=(",", ":")).encode()).hexdigest()  # fmt: skip
    explicit = _manifest({"model": "path_classifier", "training": {"schedule_days": 3, "auto_promote": False}})
    assert explicit.content_hash() == plain.content_hash()
    opted = _manifest({"model": "path_classifier", "training": {"schedule_days": 3, "auto_promote": True}})
    assert opted.content_hash() != plain.content_hash()
    assert _manifest({"model": "own"}).content_hash() != _manifest({"model": "path_classifier"}).content_hash()


# ---------------------------------------------------------------- the planner's rule


async def _plan(p: AdaptivePlanner, catalog: PathCatalog) -> Decision:
    return await p.plan("t", "u1", catalog, {"persona": "developer"}, NOW)


def _own(catalog: PathCatalog = CATALOG, *, own: bool = True) -> PathCatalog:
    return replace(catalog, planner_model=OWN, own_model=own)


async def test_own_without_a_production_version_is_decided_by_the_rules_and_says_why() -> None:
    client = FakeClient("analyst-reports")
    decision = await _plan(planner(client, stages=StageInfo(None, None, 0.0, None)), _own())
    assert (decision.selected_by, decision.path_key, decision.fallback_reason) == (
        "rules",
        "developer-quickstart",
        "no_own_model",
    )
    assert decision.model == OWN and client.calls == []  # the model is not asked
    # stages not read yet (the first start of a process): not_deployed, the model not asked either
    unread = await _plan(planner(client, stages=None), _own())
    assert unread.fallback_reason == "not_deployed" and client.calls == []
    # a production version trained on the tenant's current catalog: asked, decides
    info = StageInfo("1.0.0", None, 0.0, None, {"1.0.0": CATALOG.fingerprint})
    decided = await _plan(planner(client, stages=info), _own())
    assert (decided.selected_by, decided.model, decided.model_version) == ("model", OWN, "1.0.0")
    assert decided.fallback_reason is None and len(client.calls) == 1


async def test_a_version_of_another_catalog_is_not_asked() -> None:
    client = FakeClient("analyst-reports")
    moved = replace(CATALOG, current=tuple(replace(p, version=2) if p.key == "generic" else p for p in CATALOG.current))
    assert moved.fingerprint != CATALOG.fingerprint  # a path at another version: another catalog
    info = StageInfo("1.0.0", None, 0.0, "1.1.0", {"1.0.0": CATALOG.fingerprint, "1.1.0": CATALOG.fingerprint})
    for own in (True, False):  # planner.model: own, or the tenant's model named in full
        decision = await _plan(planner(client, stages=info), _own(moved, own=own))
        assert (decision.selected_by, decision.fallback_reason) == ("rules", "catalog_changed")
        record = decision.as_record()
        assert record["catalog"] == {"model_version": "1.0.0", "trained_on": CATALOG.fingerprint,
                                     "current": moved.fingerprint}  # fmt: skip
    assert client.calls == []  # neither production nor the shadow was asked
    # the platform's own model records no catalog: the rule is for tenant models only
    shared = await _plan(planner(client, stages=info), moved)
    assert shared.selected_by == "model" and shared.fallback_reason is None


async def test_a_shadow_of_another_catalog_is_not_asked_while_production_serves() -> None:
    client = FakeClient("analyst-reports")
    info = StageInfo("1.0.0", None, 0.0, "2.0.0", {"1.0.0": CATALOG.fingerprint, "2.0.0": "0123456789ab"})
    decision = await _plan(planner(client, stages=info), _own())
    assert decision.selected_by == "model" and [stage for _, stage, _ in client.calls] == ["production"]
    assert "shadow" not in decision.as_record()


def test_the_catalog_fingerprint_is_stable_and_changes_with_any_path_or_version() -> None:
    base = {"a": 1, "b": 2}
    assert catalog_fingerprint(base) == catalog_fingerprint({"b": 2, "a": 1}) and len(catalog_fingerprint(base)) == 12
    for other in ({"a": 1}, {"a": 1, "b": 3}, {"a": 1, "b": 2, "c": 1}):
        assert catalog_fingerprint(other) != catalog_fingerprint(base)
    assert CATALOG.fingerprint == catalog_fingerprint({p.key: p.version for p in CATALOG.current})


def test_the_stage_reader_reads_each_staged_versions_catalog_once(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    catalog = {"generic": 1, "analyst-reports": 2}
    registry.register(OWN, weights=b"", config={"catalog": catalog}, metrics={})
    registry.register(OWN, weights=b"", config={"catalog": catalog | {"generic": 2}}, metrics={})
    registry.register("path_classifier", weights=b"", config={}, metrics={})
    registry.promote(OWN, "1.0.0", "production", force=True)
    registry.promote(OWN, "1.1.0", "shadow")
    registry.promote("path_classifier", "1.0.0", "production", force=True)
    reader = StageReader(str(tmp_path))
    info = reader.read(OWN)
    assert info is not None and info.catalogs == {
        "1.0.0": catalog_fingerprint(catalog), "1.1.0": catalog_fingerprint(catalog | {"generic": 2}),
    }  # fmt: skip
    shared = reader.read("path_classifier")
    assert shared is not None and shared.catalogs == {}  # no catalog recorded
    (tmp_path / OWN / "1.0.0" / "config.json").unlink()  # versions are immutable: not read again
    again = reader.read(OWN)
    assert again is not None and again.catalogs == info.catalogs


# ---------------------------------------------------------------- the gate against the current model


def _two_paths(n: int = 400) -> tuple[LoggedData, np.ndarray]:
    """Two eligible paths logged half and half; ``b`` activates 60% of users, ``a`` 10%. Candidate predictions
    ``q`` know it."""
    rng = np.random.default_rng(3)
    actions = rng.integers(0, 2, n)
    rewards = np.where(actions == 1, rng.random(n) < 0.6, rng.random(n) < 0.1).astype(np.float64)
    data = LoggedData(
        features=[{} for _ in range(n)], actions=actions.astype(np.int64), rewards=rewards,
        propensities=np.full(n, 0.5), eligible=np.ones((n, 2), dtype=np.bool_), paths=("a", "b"),
    )  # fmt: skip
    q = np.tile(np.array([0.1, 0.6]), (n, 1))
    return data, q


def test_without_a_current_model_the_gate_is_the_logged_rate() -> None:
    data, q = _two_paths()
    report = off_policy_report(data, np.arange(data.n), q)
    assert report["current_model"] is None and report["gate_against"] == "logging_policy"
    assert report["gate_threshold"] == report["logging_policy"]["value"] and report["gate_passed"]
    assert report["gate"] == "dr.low > logging_policy.value"


def test_a_current_model_worse_than_the_logging_policy_leaves_the_logged_rate_as_the_bar() -> None:
    data, q = _two_paths()
    worse = CurrentModel("1.0.0", np.tile(np.array([0.9, 0.2]), (data.n, 1)))  # it takes a: about 0.1
    report = off_policy_report(data, np.arange(data.n), q, worse)
    current = report["current_model"]
    assert current["version"] == "1.0.0" and current["paths"] == {"a": data.n, "b": 0}
    assert current["dr"]["value"] < 0.2 < report["logging_policy"]["value"]
    assert report["gate_against"] == "logging_policy" and report["gate_passed"]
    assert report["gate"] == "dr.low > max(logging_policy.value, current_model.dr.value)"
    text = report_text(OWN, "1.1.0", report)
    assert "current model 1.0.0" in text and "larger than the current model's" in text and "it passes" in text


def test_a_candidate_no_better_than_the_current_model_fails_though_it_beats_the_logged_rate() -> None:
    data, q = _two_paths()
    same = CurrentModel("1.0.0", q.copy())  # the model serving already takes b
    report = off_policy_report(data, np.arange(data.n), q, same)
    dr = report["estimates"]["dr"]
    assert dr["low"] > report["logging_policy"]["value"]  # the old gate would have passed it
    assert (
        report["gate_against"] == "current_model" and report["gate_threshold"] == report["current_model"]["dr"]["value"]
    )
    assert not report["gate_passed"]
    figures = gate_figures(report)
    assert figures == {
        "gate_passed": False, "dr_low": dr["low"], "logged_rate": report["logging_policy"]["value"],
        "gate_against": "current_model", "gate_threshold": report["gate_threshold"], "current_version": "1.0.0",
    }  # fmt: skip
    assert "the current model's (1.0.0, DR)" in report_text(OWN, "1.1.0", report)


def test_the_current_model_is_the_tenants_production_version_of_its_current_catalog(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    data = _data(_rows(300, "generic"))
    logged = logged_data(data, min_decisions=100, min_per_path=10)
    assert current_model(registry, data, logged) is None  # nothing in production
    first = register(registry, data, logged, epochs=2)
    assert first.metrics["ope"]["current_model"] is None
    registry.promote(first.name, first.version, "production", force=True)
    found = current_model(registry, data, logged)
    assert found is not None and found.version == "1.0.0" and found.scores.shape == (300, len(logged.paths))
    second = register(registry, data, logged, epochs=2)
    assert second.metrics["ope"]["current_model"]["version"] == "1.0.0"
    assert second.metrics["ope"]["gate_against"] in ("logging_policy", "current_model")
    # a production version of another catalog does not serve (catalog_changed): the logged rate is the bar
    moved = replace(data, catalog=replace(data.catalog, current=tuple(
        replace(p, version=2) if p.key == "generic" else p for p in data.catalog.current)))  # fmt: skip
    assert current_model(registry, moved, logged) is None
