"""Off-policy estimators: exact on hand-computed cases, strict about their input, and right on the simulator.

The simulator knows every user's true activation probability on every path, so a target policy's true
value is known: ``firstmile_inference.ope_study`` logs decisions with the platform's epsilon-greedy
exploration and checks the estimators' intervals against it (docs/models.md#off-policy-evaluation).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import yaml

from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import eligible_paths
from firstmile_inference import ope
from firstmile_inference.ope_study import SCENARIOS, StudyReport, study
from firstmile_inference.schema import COMPANY_SIZES, DEMO_PATHS, PERSONAS, ROLES, USE_CASES
from firstmile_inference.simulate import Dataset, demo_eligible, demo_rules_policy, generate
from tests.factories import ROOT

POPULATION, MODEL_SESSIONS, SEED = 8_000, 6_000, 11

# ---------------------------------------------------------------- hand-computed cases

# three decisions over two actions; the logging policy chose a with propensity p, reward r
ACTIONS = np.array([0, 1, 0])
REWARDS = np.array([1.0, 0.0, 1.0])
PROPENSITIES = np.array([0.5, 0.25, 0.8])
TARGET = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
PREDICTIONS = np.array([[0.6, 0.3], [0.5, 0.2], [0.7, 0.4]])


def test_ips_snips_and_dr_follow_their_formulas() -> None:
    w = np.array([1.0 / 0.5, 0.5 / 0.25, 0.0 / 0.8])  # pi(a_i|x_i) / p_i
    est = ope.ips(ACTIONS, REWARDS, PROPENSITIES, TARGET)
    assert est.value == pytest.approx(np.mean(w * REWARDS)) and est.estimator == "ips"
    assert est.standard_error == pytest.approx(np.std(w * REWARDS, ddof=1) / np.sqrt(3))
    assert est.effective_sample_size == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert est.max_weight == 2.0 and est.n == 3
    assert ope.snips(ACTIONS, REWARDS, PROPENSITIES, TARGET).value == pytest.approx(2.0 / 4.0)
    direct = (TARGET * PREDICTIONS).sum(axis=1)  # 0.6, 0.35, 0.4
    correction = w * (REWARDS - PREDICTIONS[[0, 1, 2], ACTIONS])  # 2 * 0.4, 2 * -0.2, 0
    dr = ope.doubly_robust(ACTIONS, REWARDS, PROPENSITIES, TARGET, PREDICTIONS)
    assert dr.value == pytest.approx(np.mean(direct + correction))
    assert dr.standard_error == pytest.approx(np.std(direct + correction, ddof=1) / np.sqrt(3))


def test_normal_interval_is_the_estimate_plus_minus_z_standard_errors() -> None:
    est = ope.ips(ACTIONS, REWARDS, PROPENSITIES, TARGET, level=0.9)
    assert (est.interval, est.level) == ("normal", 0.9)
    assert est.high - est.value == pytest.approx(est.value - est.low)
    assert est.high - est.value == pytest.approx(1.6448536 * est.standard_error, rel=1e-6)
    assert est.covers(est.value) and not est.covers(est.high + 1e-9)
    assert ope.ips(ACTIONS, REWARDS, PROPENSITIES, TARGET).high - est.high > 0  # 95% is wider than 90%


def test_on_policy_data_gives_the_plain_mean() -> None:
    rng = np.random.default_rng(3)
    n, k = 500, 4
    logging = ope.policy_probabilities(rng.random((n, k)), epsilon=0.4)
    actions = np.array([rng.choice(k, p=row) for row in logging])
    rewards = rng.random(n)
    propensities = logging[np.arange(n), actions]
    assert ope.ips(actions, rewards, propensities, logging).value == pytest.approx(rewards.mean())
    snips = ope.snips(actions, rewards, propensities, logging)
    assert snips.value == pytest.approx(rewards.mean())
    assert snips.effective_sample_size == pytest.approx(n)  # every weight is 1


def test_dr_with_the_true_reward_model_and_no_noise_is_exact() -> None:
    rng = np.random.default_rng(4)
    n, k = 300, 3
    truth = rng.random((n, k))
    logging = ope.policy_probabilities(rng.random((n, k)), epsilon=0.5)
    actions = np.array([rng.choice(k, p=row) for row in logging])
    target = ope.policy_probabilities(truth)  # the oracle
    est = ope.doubly_robust(actions, truth[np.arange(n), actions], logging[np.arange(n), actions], target, truth)
    assert est.value == pytest.approx(truth.max(axis=1).mean())
    assert est.standard_error == pytest.approx(truth.max(axis=1).std(ddof=1) / np.sqrt(n))


def test_bootstrap_is_reproducible_and_agrees_with_the_normal_interval_on_a_large_sample() -> None:
    rng = np.random.default_rng(5)
    n, k = 4000, 3
    logging = ope.policy_probabilities(rng.random((n, k)), epsilon=0.3)
    actions = np.array([rng.choice(k, p=row) for row in logging])
    rewards = (rng.random(n) < 0.4 + 0.1 * actions).astype(float)
    propensities = logging[np.arange(n), actions]
    target = ope.policy_probabilities(np.tile([0.0, 0.0, 1.0], (n, 1)))
    normal = ope.ips(actions, rewards, propensities, target)
    for estimator in (ope.ips, ope.snips):
        a = estimator(actions, rewards, propensities, target, bootstrap=300, seed=9)
        b = estimator(actions, rewards, propensities, target, bootstrap=300, seed=9)
        assert a == b and a.interval == "bootstrap"
        assert a.low < a.value < a.high
    booted = ope.ips(actions, rewards, propensities, target, bootstrap=300, seed=9)
    assert booted.value == normal.value
    assert booted.standard_error == pytest.approx(normal.standard_error, rel=0.2)
    assert booted.low == pytest.approx(normal.low, abs=0.5 * normal.standard_error)
    dr = ope.doubly_robust(actions, rewards, propensities, target, np.full((n, k), 0.5), bootstrap=300, seed=9)
    assert dr.interval == "bootstrap" and dr.low < dr.value < dr.high


def test_effective_sample_size() -> None:
    assert ope.effective_sample_size([1.0, 1.0, 1.0, 1.0]) == 4.0
    assert ope.effective_sample_size([0.0, 5.0, 0.0]) == 1.0
    assert ope.effective_sample_size([0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="negative"):
        ope.effective_sample_size([1.0, -1.0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"propensities": [0.5, 0.0, 0.8]}, r"propensities must be in \(0, 1\]: propensities\[1\] = 0.0"),
        ({"propensities": [0.5, 1.2, 0.8]}, r"propensities\[1\] = 1.2"),
        ({"propensities": [0.5, np.nan, 0.8]}, r"propensities must be finite numbers: propensities\[1\] = nan"),
        ({"rewards": [1.0, np.nan, 0.0]}, r"rewards must be finite numbers: rewards\[1\] = nan"),
        ({"rewards": [1.0, 0.0]}, "lengths differ: 3 actions, 2 rewards, 3 propensities"),
        ({"actions": [0, 2, 0]}, r"actions must index the target's 2 columns: actions\[1\] = 2"),
        ({"actions": [0.0, 1.0, 0.0]}, "actions must be integer indices"),
        ({"actions": [[0, 1, 0]]}, "actions must be one-dimensional"),
        ({"target": [[1.0, 0.0], [0.5, 0.4], [0.0, 1.0]]}, "each row of target must sum to 1: row 1 sums to 0.9"),
        ({"target": [[1.5, -0.5], [0.5, 0.5], [0.0, 1.0]]}, r"target probabilities must be in \[0, 1\]"),
        ({"target": [[1.0, 0.0], [0.5, 0.5]]}, r"target must have shape \(decisions, actions\) = \(3, K\)"),
        ({"target": [[1.0, 0.0], [np.nan, 0.5], [0.0, 1.0]]}, r"target must be finite numbers: target\[1, 0\]"),
        ({"level": 1.0}, r"level must be in \(0, 1\)"),
        ({"bootstrap": -1}, "bootstrap must be 0"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_names_it(change: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"actions": ACTIONS, "rewards": REWARDS, "propensities": PROPENSITIES, "target": TARGET}
    args |= change
    for estimator in (ope.ips, ope.snips):
        with pytest.raises(ValueError, match=message):
            estimator(**args)
    with pytest.raises(ValueError, match=message):
        ope.doubly_robust(**args, predictions=PREDICTIONS)


def test_more_refusals() -> None:
    with pytest.raises(ValueError, match="at least 2 logged decisions"):
        ope.ips([0], [1.0], [0.5], [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"predictions must have shape \(decisions, actions\) = \(3, K\)"):
        ope.doubly_robust(ACTIONS, REWARDS, PROPENSITIES, TARGET, PREDICTIONS[:2])
    with pytest.raises(ValueError, match=r"predictions and target differ in shape: \(3, 3\) vs \(3, 2\)"):
        ope.doubly_robust(ACTIONS, REWARDS, PROPENSITIES, TARGET, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"predictions must be finite numbers: predictions\[0, 1\] = inf"):
        ope.doubly_robust(ACTIONS, REWARDS, PROPENSITIES, TARGET, [[0.1, np.inf], [0.1, 0.1], [0.1, 0.1]])
    never = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # the target never takes a logged action
    assert ope.ips(ACTIONS, REWARDS, PROPENSITIES, never).value == 0.0
    with pytest.raises(ValueError, match="no overlap"):
        ope.snips(ACTIONS, REWARDS, PROPENSITIES, never)


def test_policy_probabilities_is_greedy_over_the_eligible_paths() -> None:
    scores = np.array([[0.2, 0.9, 0.5], [0.7, 0.7, 0.1], [np.nan, 0.1, 0.3]])
    eligible = np.array([[True, False, True], [True, True, True], [False, True, True]])
    greedy = ope.policy_probabilities(scores, eligible)
    assert greedy.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # ties: the first
    explore = ope.policy_probabilities(scores, eligible, epsilon=0.3)
    # the planner's propensities: 1 - e + e/K for the greedy path, e/K for the other eligible ones, 0 outside
    assert explore[0].tolist() == pytest.approx([0.15, 0.0, 0.85])
    assert explore[1].tolist() == pytest.approx([0.8, 0.1, 0.1])
    assert explore.sum(axis=1) == pytest.approx(np.ones(3))
    assert ope.policy_probabilities([[0.0, 1.0]]).tolist() == [[0.0, 1.0]]  # all eligible by default


def test_policy_probabilities_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="row 1 has none"):
        ope.policy_probabilities([[0.1, 0.2], [0.3, 0.4]], [[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"scores of eligible actions must be finite: scores\[0, 0\] = nan"):
        ope.policy_probabilities([[np.nan, 0.2]])
    with pytest.raises(ValueError, match="epsilon must be in"):
        ope.policy_probabilities([[0.1, 0.2]], epsilon=1.5)
    with pytest.raises(ValueError, match="eligible must be booleans"):
        ope.policy_probabilities([[0.1, 0.2]], [[1, 0]])
    with pytest.raises(ValueError, match="differ in shape"):
        ope.policy_probabilities([[0.1, 0.2]], [[True, False, True]])
    with pytest.raises(ValueError, match=r"shape \(users, actions\)"):
        ope.policy_probabilities([0.1, 0.2])


# ---------------------------------------------------------------- the simulator's eligible paths


def test_demo_eligible_mirrors_the_planners_eligible_paths_over_demo_yaml() -> None:
    manifest = yaml.safe_load((ROOT / "tenants" / "demo.yaml").read_text())
    paths = [PathDef.from_definition(p["id"], 1, p) for p in manifest["paths"]]
    for persona, role, size, use_case in itertools.product(PERSONAS, ROLES, COMPANY_SIZES, USE_CASES):
        traits = {"persona": persona, "role": role, "company_size": size, "use_case": use_case}
        greedy = demo_rules_policy(traits)
        platform = [p.key for p in eligible_paths(paths, manifest["default_path"], traits, greedy)]
        assert list(demo_eligible(traits)) == platform, traits
        assert greedy in platform and "generic" in platform


# ---------------------------------------------------------------- validation on the simulator


@pytest.fixture(scope="module")
def population() -> Dataset:
    return generate(POPULATION + MODEL_SESSIONS, seed=SEED)


@pytest.fixture(scope="module")
def report(population: Dataset) -> StudyReport:
    return study(
        population=POPULATION, model_sessions=MODEL_SESSIONS, sample=1_000, replicates=200, seed=SEED, data=population
    )


def test_the_scenarios_evaluate_a_policy_other_than_the_logging_one(report: StudyReport) -> None:
    assert report.reward_model_rmse < 0.12  # a decent reward model (the true probabilities' SD is about 0.22)
    assert [r.scenario.name for r in report.results] == [s.name for s in SCENARIOS]
    for result in report.results:
        assert result.truth > result.logging_value + 0.03, result.scenario.name  # a different, better policy
        assert 50 < result.mean_ess < 1_000


def test_intervals_cover_the_truth_at_about_their_nominal_rate(report: StudyReport) -> None:
    coverage = {(r.scenario.name, e.estimator): e.coverage for r in report.results for e in r.estimators}
    assert all(0.88 <= c <= 0.99 for c in coverage.values()), coverage
    for estimator in ("ips", "snips", "dr"):  # pooled over the scenarios: 600 intervals each
        pooled = np.mean([c for (_, name), c in coverage.items() if name == estimator])
        assert 0.91 <= pooled <= 0.98, (estimator, pooled)


def test_ips_and_dr_are_unbiased_within_their_standard_error(report: StudyReport) -> None:
    for result in report.results:
        for name in ("ips", "dr"):
            e = result.summary(name)
            assert abs(e.bias) <= 3 * e.bias_se, (result.scenario.name, e)
            # the standard error an estimate reports is the spread the estimates really have
            assert 0.8 < e.mean_se / e.sd < 1.25, (result.scenario.name, e)


def test_dr_has_lower_variance_than_ips_with_a_decent_reward_model(report: StudyReport) -> None:
    for result in report.results:
        ips, dr = result.summary("ips"), result.summary("dr")
        assert dr.sd < 0.85 * ips.sd, result.scenario.name
        assert dr.mean_width < ips.mean_width, result.scenario.name


def test_bootstrap_intervals_cover_the_truth_too(population: Dataset) -> None:
    booted = study(
        population=POPULATION,
        model_sessions=MODEL_SESSIONS,
        sample=1_000,
        replicates=100,
        seed=SEED,
        bootstrap=200,
        scenarios=SCENARIOS[:1],
        data=population,
    )
    [result] = booted.results
    assert all(e.coverage >= 0.88 for e in result.estimators), result


def test_the_study_is_deterministic_and_refuses_a_mismatched_population(population: Dataset) -> None:
    small = {"population": 300, "model_sessions": 200, "sample": 100, "replicates": 5, "scenarios": SCENARIOS[:1]}
    assert study(**small).results == study(**small).results  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not population"):
        study(population=100, model_sessions=100, data=population)
    assert population.path_keys == DEMO_PATHS
