"""The onboarding simulator: reproducibility, exact probabilities, logging policy, episodes, persistence."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import plan
from firstmile_inference.schema import (
    COMPANY_SIZES,
    DEMO_PATHS,
    PERSONAS,
    ROLES,
    USE_CASES,
    NudgeFeatures,
    StuckFeatures,
)
from firstmile_inference.simulate import (
    DEMO_CATALOG,
    STUCK_HORIZON_H,
    Dataset,
    demo_rules_policy,
    expected_activation,
    generate,
    step_logits,
)
from tests.factories import ROOT


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(4000, seed=21)


def _arrays(d: Dataset) -> dict[str, Any]:
    return {name: getattr(d, name) for name in Dataset._ARRAYS}


def test_same_seed_gives_identical_data() -> None:
    a, b = generate(600, seed=5), generate(600, seed=5)
    for name, value in _arrays(a).items():
        assert np.array_equal(value, getattr(b, name)), name


def test_more_snapshots_add_rows_and_change_nothing_else() -> None:
    base, more = generate(600, seed=5), generate(600, seed=5, snapshots_per_session=8)
    m = len(base.stuck_label)
    assert 4 * m - 50 <= len(more.stuck_label) <= 4 * m  # a session whose path is done by 15 min has none
    for name, value in _arrays(base).items():
        other = getattr(more, name)
        if name.startswith("stuck_"):
            assert np.array_equal(value, other[:m]), name  # the first two per session are the default draw
        else:
            assert np.array_equal(value, other), name
    assert np.bincount(more.stuck_session[m:]).max() <= 6  # six more per session at most
    # the extra snapshots follow the same label model: the stuck share is close to the default draw's
    assert abs(more.stuck_label[m:].mean() - base.stuck_label.mean()) < 0.05
    with pytest.raises(ValueError, match="at least 2"):
        generate(10, seed=5, snapshots_per_session=1)


def test_different_seeds_differ() -> None:
    a, b = generate(600, seed=5), generate(600, seed=6)
    assert not np.array_equal(a.numeric, b.numeric)
    assert not np.array_equal(a.persona, b.persona)


def test_probabilities_are_probabilities(data: Dataset) -> None:
    assert data.expected.shape == (data.n, len(DEMO_PATHS))
    assert np.all((data.expected >= 0) & (data.expected <= 1))
    assert np.all((data.nudge_probability >= 0) & (data.nudge_probability <= 1))
    assert np.all((data.motivation > 0) & (data.motivation < 1))


def test_oracle_is_the_argmax_of_the_exact_expected_activation(data: Dataset) -> None:
    logits = step_logits(
        DEMO_CATALOG, data.persona, data.use_case, data.company_size, data.signup_source, data.numeric, data.skill
    )
    probs = [1 / (1 + np.exp(-z)) for z in logits]
    recomputed = expected_activation(DEMO_CATALOG, probs, data.motivation)
    assert np.allclose(recomputed, data.expected)
    assert np.array_equal(data.oracle, np.argmax(recomputed, axis=1))
    # motivation is common to all paths: the argmax does not depend on it
    assert np.array_equal(data.oracle, np.argmax(recomputed / data.motivation[:, None], axis=1))
    # not a function of one feature: every persona has users whose best path differs
    for persona in ("developer", "analyst", "executive"):
        assert len(set(data.oracle[data.persona == persona].tolist())) >= 2


def test_activation_outcomes_match_the_expected_probabilities(data: Dataset) -> None:
    p = data.expected[np.arange(data.n), data.assigned]
    se = np.sqrt(np.sum(p * (1 - p))) / data.n
    assert abs(data.activated.mean() - p.mean()) < 4 * se
    for k in range(len(DEMO_PATHS)):
        mask = data.assigned == k
        pk = p[mask]
        assert abs(data.activated[mask].mean() - pk.mean()) < 4 * np.sqrt(np.sum(pk * (1 - pk))) / mask.sum() + 1e-9


def test_logging_policy_mixes_rules_and_uniform_exploration(data: Dataset) -> None:
    assert abs(data.explored.mean() - 0.4) < 0.03
    rules = np.array([DEMO_PATHS.index(demo_rules_policy(data.traits(i))) for i in range(data.n)])
    assert np.array_equal(data.assigned[~data.explored], rules[~data.explored])
    explored_counts = np.bincount(data.assigned[data.explored], minlength=len(DEMO_PATHS))
    assert explored_counts.min() > 0.7 * explored_counts.mean()


def test_custom_rules_policy_and_validation() -> None:
    only_generic = generate(200, seed=1, exploration=0.0, rules_policy=lambda traits: "generic")
    assert set(only_generic.assigned.tolist()) == {DEMO_PATHS.index("generic")}
    with pytest.raises(ValueError, match="not a catalog path"):
        generate(50, seed=1, exploration=0.0, rules_policy=lambda traits: "nowhere")
    with pytest.raises(ValueError, match="n_sessions"):
        generate(0, seed=1)
    with pytest.raises(ValueError, match="exploration"):
        generate(10, seed=1, exploration=1.5)


def test_population_correlations(data: Dataset) -> None:
    it_admin = data.role == "it_admin"
    assert np.isin(data.company_size[it_admin], ["201-1000", "1001+"]).mean() > 0.5
    assert (data.persona[it_admin] == "admin").mean() > 0.6
    assert (data.use_case[data.persona == "marketer"] == "marketing").mean() > 0.7
    assert data.numeric[:, 0].min() >= 0 and data.numeric[:, 0].max() <= 100
    assert (data.numeric[:, 1] < 1).mean() > 0.3  # many start within the first hour
    assert (data.numeric[:, 1] > 48).mean() > 0.05  # some days later
    assert np.all(data.numeric[:, 2] == np.round(data.numeric[:, 2]))  # steps completed: counts


def _demo_paths() -> list[PathDef]:
    manifest = yaml.safe_load((ROOT / "tenants" / "demo.yaml").read_text())
    return [PathDef.from_definition(p["id"], 1, p) for p in manifest["paths"]]


def test_rules_policy_mirrors_demo_yaml_targeting() -> None:
    paths = _demo_paths()
    assert tuple(p.key for p in paths) == DEMO_PATHS
    for persona, role, size, use_case in itertools.product(PERSONAS, ROLES, COMPANY_SIZES, USE_CASES):
        traits = {"persona": persona, "role": role, "company_size": size, "use_case": use_case}
        assert demo_rules_policy(traits) == plan(paths, "generic", traits).path_key, traits


def test_stuck_labels_follow_the_episode_model(data: Dataset) -> None:
    kind, label = data.stuck_episode, data.stuck_label
    assert label[np.isin(kind, ["struggle", "silent"])].all()  # they never progress again
    assert not label[kind == "smooth"].any()  # they progress within hours
    assert label[kind == "pause"].mean() < 0.15  # pausers come back
    assert 0.05 < label[kind == "recover"].mean() < 0.95  # stuck until close to their recovery
    # pausers are why a pure time rule has false positives
    silent_pausers = (kind == "pause") & (data.stuck_numeric[:, 2] >= 24)
    assert silent_pausers.sum() > 0 and not label[silent_pausers].all()
    # strugglers keep visiting: active in the last 24 h yet stuck
    assert (label & (data.stuck_numeric[:, 4] > 0) & (data.stuck_numeric[:, 2] < 24)).sum() > 0
    steps, total = data.stuck_numeric[:, 0], data.stuck_numeric[:, 1]
    assert np.all(steps < total)
    assert np.all(data.stuck_numeric[:, 2] <= data.stuck_numeric[:, 3] + 1e-9)
    assert STUCK_HORIZON_H == 48.0


def test_nudges_respond_to_channel_timing_and_fatigue(data: Dataset) -> None:
    p = data.nudge_probability
    hour, sent = data.nudge_numeric[:, 0], data.nudge_numeric[:, 1]
    email = data.nudge_channel == "email"
    business = (hour >= 8) & (hour < 18)
    assert p[email & business].mean() > p[email & ~business].mean()
    push = data.nudge_channel == "push"
    evening = (hour >= 18) & (hour < 23)
    assert p[push & evening].mean() > p[push & ~evening].mean()
    assert p[sent == 0].mean() > p[sent == 2].mean()
    assert abs(data.nudge_label.mean() - p.mean()) < 0.03
    assert set(np.unique(data.nudge_channel).tolist()) == {"email", "sms", "in_app", "push"}


def test_rows_follow_the_schema(data: Dataset) -> None:
    stuck = data.stuck_rows()[0]
    assert set(stuck) == set(StuckFeatures.__annotations__)
    nudge = data.nudge_rows()[0]
    assert set(nudge) == set(NudgeFeatures.__annotations__)
    traits = data.traits(0)
    assert traits["persona"] == traits["user_persona"] and traits["role"] in ROLES


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    original = generate(300, seed=9)
    loaded = Dataset.load(original.save(tmp_path / "sim.npz"))
    assert loaded.seed == 9 and loaded.exploration == original.exploration
    assert loaded.catalog == original.catalog
    for name, value in _arrays(original).items():
        assert np.array_equal(value, getattr(loaded, name)), name
