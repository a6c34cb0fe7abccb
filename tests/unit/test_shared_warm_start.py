"""The shared warm-start model (docs/models.md#shared-warm-start-model) without a database: what reaches its inputs
(nothing a tenant defined), the refusals (one tenant is never a shared model), the balance between tenants, the
artifact (no tenant or path name), the warm start of a tenant model, and the manifest's opt-in."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from firstmile.ml import shared_model as sm
from firstmile.ml import tenant_models as tm
from firstmile.onboarding.service import LoggedDecision
from firstmile.tenancy.manifest import ManifestError, TenantManifest, load_manifest
from firstmile_inference import warm_start as ws
from firstmile_inference.registry import Registry
from firstmile_inference.schema import PERSONAS, SIGNUP_SOURCES, USER_FEATURES
from firstmile_inference.tenant import LoggedData, train_logged
from firstmile_inference.train import Hyper
from tests.factories import demo_document
from tests.unit.test_tenant_training_rule import plain_exclusions

TENANT_VALUES = ("acme-power-user", "acme-partner-portal", "t-0b1c", "acme-onboarding-v2", "secret project")
FAST = Hyper(epochs=2, batch_size=128, hidden=(32, 32), weight_decay=5e-4, val_fraction=0.2)


def _features(rng: random.Random, persona: str | None = None, source: str | None = None) -> dict[str, Any]:
    return {
        "user_persona": persona or rng.choice(PERSONAS),
        "signup_source": source or rng.choice(SIGNUP_SOURCES),
        "company_size": rng.choice(("1-10", "11-50", "201-1000")),
        "use_case": rng.choice(("marketing", "reporting")),
        "engagement_score": rng.uniform(0, 100),
        "time_since_signup": rng.uniform(0, 200),
        "steps_completed": float(rng.randint(0, 5)),
        "session_count": float(rng.randint(1, 6)),
        "avg_session_duration": rng.uniform(30, 900),
    }


def _share(n: int, seed: int, *, custom: bool = False, paths: int = 3) -> ws.TenantShare:
    """``n`` decisions; with ``custom`` every fourth carries the tenant's own persona and signup source and keys that
    are no feature (a path, a tenant id, a free-text note)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = _features(rng)
        if custom and i % 4 == 0:
            row |= {"user_persona": TENANT_VALUES[0], "signup_source": TENANT_VALUES[1], "tenant_id": TENANT_VALUES[2],
                    "path": TENANT_VALUES[3], "note": TENANT_VALUES[4]}  # fmt: skip
        rows.append(row)
    rewards = np.asarray([float(rng.random() < 0.3 + 0.004 * r["engagement_score"]) for r in rows])
    return ws.TenantShare(rows, rewards, np.asarray([i % paths for i in range(n)], dtype=np.int64), paths)


def test_only_the_platforms_vocabularies_and_ranged_numbers_reach_the_shared_inputs() -> None:
    given = {
        "user_persona": "acme-power-user", "signup_source": "organic", "company_size": "11-50", "use_case": 3,
        "engagement_score": 140.0, "time_since_signup": -2.0, "steps_completed": True, "session_count": float("nan"),
        "avg_session_duration": 310.5, "path": "acme-onboarding-v2", "tenant_id": "t-0b1c", "role": "it_admin",
    }  # fmt: skip
    reduced = ws.shared_instance(given)
    assert set(reduced) == set(USER_FEATURES)
    assert reduced == {
        "user_persona": None, "signup_source": "organic", "company_size": "11-50", "use_case": None,
        "engagement_score": None, "time_since_signup": None, "steps_completed": None, "session_count": None,
        "avg_session_duration": 310.5,
    }  # fmt: skip


def test_no_tenant_specific_value_reaches_the_model_or_its_artifact() -> None:
    shares = [_share(600, 1, custom=True), _share(400, 2, custom=True), _share(300, 3)]
    pooled = ws.pool(shares, seed=7)
    for row in pooled.features:
        assert set(row) == set(USER_FEATURES)
        assert not set(map(str, row.values())) & set(TENANT_VALUES)
    trained = ws.train_shared(shares, seed=7, hyper=FAST)
    artifact = json.dumps([trained.config, trained.metrics, trained.reference])
    for value in (*TENANT_VALUES, "acme"):
        assert value not in artifact
    assert trained.config["contributors"]["tenants"] == 3 and trained.config["network"]["outputs"] == 1
    # the tenant's own values are unknown: changing them changes nothing the model learns
    renamed = []
    for share in shares:
        features = [{k: ("beta-" + v if v in TENANT_VALUES else v) for k, v in row.items()} for row in share.features]
        renamed.append(ws.TenantShare(features, share.rewards, share.actions, share.paths))
    again = ws.train_shared(renamed, seed=7, hyper=FAST)
    assert again.state_dict.keys() == trained.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], trained.state_dict[k]) for k in trained.state_dict)
    # no per-tenant head is kept: one output row
    assert trained.state_dict["mlp.4.weight"].shape == (1, 32)


def _decision(rng: random.Random, activated: bool) -> LoggedDecision:
    traits = {"persona": rng.choice(("developer", "acme-power-user")), "signup_source": "organic",
              "company_size": "11-50", "use_case": "marketing", "plan": "acme enterprise"}  # fmt: skip
    return LoggedDecision(rng.choice(("acme-a", "acme-b")), 1, None, 0.5, traits, activated)


def _contributor(slug: str, n: int, seed: int = 1) -> sm.Contributor:
    rng = random.Random(seed)
    return sm.Contributor(uuid.uuid4(), slug, [_decision(rng, rng.random() < 0.4) for _ in range(n)])


def _data(*contributors: sm.Contributor) -> sm.SharedData:
    return sm.SharedData(contributors, timedelta(days=14), timedelta(days=90))


def test_one_tenant_is_refused_naming_the_gap() -> None:
    with pytest.raises(tm.TrainingRefusedError) as refused:
        sm.shares(_data(_contributor("acme", 900)))
    message = str(refused.value)
    assert "at least 3 contributing tenants" in message and "1 opted in" in message and "acme (900)" in message
    assert "never a shared model" in message
    # two tenants opted in, one with too few decisions: still one contributor, refused even at --min-tenants 2
    with pytest.raises(tm.TrainingRefusedError, match=r"acme \(900\), beta \(40\); 1 can contribute"):
        sm.shares(_data(_contributor("acme", 900), _contributor("beta", 40)), min_tenants=2)
    # the floor holds whatever the caller asks: the model side refuses a single share too
    with pytest.raises(tm.TrainingRefusedError, match="at least 2 contributing tenants"):
        sm.shares(_data(_contributor("acme", 900)), min_tenants=1)
    with pytest.raises(ValueError, match="never a shared model"):
        ws.pool([_share(500, 1)])


def test_too_few_activations_are_refused() -> None:
    quiet = [sm.Contributor(uuid.uuid4(), s, [_decision(random.Random(i), False) for i in range(250)])
             for s in ("a", "b", "c")]  # fmt: skip
    with pytest.raises(tm.TrainingRefusedError, match="0 of the 750 decisions"):
        sm.shares(_data(*quiet))


def test_shares_carry_no_path_key_and_no_trait_beyond_the_four() -> None:
    pairs = sm.shares(_data(_contributor("a", 250, 1), _contributor("b", 220, 2), _contributor("c", 210, 3)))
    assert [c.slug for c, _ in pairs] == ["a", "b", "c"]
    for contributor, share in pairs:
        assert share.paths == 2 and set(share.actions.tolist()) == {0, 1}  # anonymous columns, no key
        assert share.rewards.sum() == sum(r.activated for r in contributor.rows)
        for row in share.features:
            assert set(row) == set(USER_FEATURES) and row["user_persona"] in ("developer", None)
            assert "acme enterprise" not in row.values()


def test_one_big_tenant_is_capped_at_twice_the_second() -> None:
    assert ws.cap_of([12_000, 3_000, 2_000]) == 6_000
    assert ws.cap_of([100_000, 90_000]) == ws.MAX_PER_TENANT
    pooled = ws.pool([_share(1_200, 1), _share(300, 2), _share(200, 3)], seed=3)
    assert pooled.contributed == [600, 300, 200] and pooled.offered == 1_700 and pooled.cap == 600
    assert len(pooled.features) == 1_100 and pooled.columns == 1 + 3 * 3
    assert sorted(set(pooled.heads.tolist())) == list(range(1, 10))


def _logged(n: int, seed: int) -> LoggedData:
    rng = random.Random(seed)
    features = [_features(rng) for _ in range(n)]
    actions = np.asarray([i % 3 for i in range(n)], dtype=np.int64)
    rewards = np.asarray([float(rng.random() < (0.6 if a == 2 else 0.2)) for a in actions])
    return LoggedData(features, actions, rewards, np.full(n, 1 / 3), np.ones((n, 3), dtype=np.bool_),
                      ("own-a", "own-b", "own-c"))  # fmt: skip


def test_a_tenant_model_starts_from_the_shared_trunk_and_records_it(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert tm.shared_warm_start(registry) is None  # none registered: cold
    trained = ws.train_shared([_share(500, 1), _share(400, 2), _share(300, 3)], seed=7, hyper=FAST)
    registry.register(ws.SHARED_MODEL, weights=trained.state_dict, config=trained.config, metrics=trained.metrics)
    registry.register(ws.SHARED_MODEL, weights=trained.state_dict, config=trained.config, metrics=trained.metrics)
    assert tm.SHARED_MODEL == sm.SHARED_MODEL == ws.SHARED_MODEL
    latest = tm.shared_warm_start(registry)
    assert latest is not None and latest.record() == {"model": ws.SHARED_MODEL, "version": "1.1.0"}
    registry.promote(ws.SHARED_MODEL, "1.0.0", "production", force=True)
    warm = tm.shared_warm_start(registry)
    assert warm is not None and warm.version == "1.0.0"  # production before latest

    net, cfg = warm.network(3, seed=7)
    assert cfg["outputs"] == 3
    state = net.state_dict()
    for name, value in warm.state_dict.items():
        if not name.startswith("mlp.4."):
            assert torch.equal(state[name], value), name
    assert state["mlp.4.weight"].shape == (3, 32)

    data = _logged(300, 5)
    started = train_logged(data, seed=7, hyper=Hyper(epochs=2, batch_size=64, hidden=(32, 32), val_fraction=0.3),
                           warm_start=warm)  # fmt: skip
    assert started.config["warm_start"] == {"model": ws.SHARED_MODEL, "version": "1.0.0"}
    assert started.config["encoder"] == trained.config["encoder"]  # encodes as the trunk was trained
    cold = train_logged(data, seed=7, hyper=Hyper(epochs=2, batch_size=64, hidden=(32, 32), val_fraction=0.3))
    assert cold.config["warm_start"] is None
    assert not torch.equal(cold.state_dict["mlp.0.weight"], started.state_dict["mlp.0.weight"])


def test_a_model_that_is_not_a_shared_one_is_refused_as_a_warm_start() -> None:
    trained = ws.train_shared([_share(300, 1), _share(300, 2)], seed=7, hyper=FAST)
    with pytest.raises(ValueError, match="not a shared warm-start model"):
        ws.WarmStart("path_classifier", "1.0.0", trained.config | {"model": "path_classifier"}, trained.state_dict)


def test_the_manifest_opt_in_leaves_existing_hashes_alone(tmp_path: Path) -> None:
    doc = demo_document()
    doc["planner"] = {"model": "path_classifier", "exploration": {"epsilon": 0.1}, "training": {"schedule_days": 3}}
    plain = TenantManifest.model_validate(doc)
    assert plain.planner is not None and plain.planner.training is not None
    assert plain.planner.training.warm_start is None and not plain.planner.training.shares_warm_start
    # the hash as it was before warm_start existed: the training section without it
    excluded = plain_exclusions(plain)
    excluded["planner"] = {"training": {"warm_start": True, "auto_promote": True}}
    canonical = plain.model_dump(mode="json", exclude=excluded)
    assert canonical["planner"]["training"] == {"schedule_days": 3.0}
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert plain.content_hash() == hashlib.sha256(encoded).hexdigest()
    hashes = {plain.content_hash()}
    for value in ("shared", True, False):
        doc["planner"]["training"]["warm_start"] = value
        opted = TenantManifest.model_validate(doc)
        assert opted.planner is not None and opted.planner.training is not None
        assert opted.planner.training.shares_warm_start is (value is not False)
        assert tm.opts_in_to_warm_start(opted.model_dump(mode="json")["planner"]) is (value is not False)
        hashes.add(opted.content_hash())
    assert len(hashes) == 4
    doc["planner"]["training"]["warm_start"] = "cold"
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"planner\.training\.warm_start"):
        load_manifest(path)
    assert not tm.opts_in_to_warm_start({"training": {"schedule_days": 7}})
    assert not tm.opts_in_to_warm_start(None)
