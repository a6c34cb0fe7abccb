"""Simulated experiments judged by the decision rule of ``firstmile.experiments.stats`` (docs/experiments.md).

* A/A experiments looked at every day: the rule's false-winner rate stays below alpha, while the naive rule
  (a chance to beat of 95% at any look) does not: the sequential test is what makes peeking safe.
* A real uplift between two paths of the onboarding simulator is found, for the right variant.
* An allocation that loses 6% of one arm's users is caught by the SRM check, even when it makes a variant
  look better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray

from firstmile.experiments.stats import (
    BinaryAnalysis,
    BinaryArm,
    DecisionConfig,
    SequentialTest,
    SrmCheck,
    Verdict,
    VerdictKind,
    analyse_binary,
    decide,
    msprt,
    sample_ratio_mismatch,
)
from firstmile_inference.simulate import DEMO_CATALOG, generate

ALPHA = 0.05
DAYS = 30
DRAWS = 1_000  # per posterior and look (the default is 100,000): a chance to beat near 0.95 within 0.007 (1 s.e.)
IntArray = NDArray[np.int64]


@dataclass
class _Running:
    """One experiment's state across its daily looks."""

    arms: tuple[str, ...]
    shares: tuple[float, ...]
    sequential: dict[str, SequentialTest]

    def look(self, exposures: IntArray, conversions: IntArray, seed: int) -> Look:
        """The analyses of one look at the cumulative counts (the sequential tests carry over)."""
        arms = [BinaryArm(name, int(n), int(k)) for name, n, k in zip(self.arms, exposures, conversions, strict=True)]
        for variant in arms[1:]:
            self.sequential[variant.name] = msprt(arms[0], variant, previous=self.sequential.get(variant.name))
        primary = analyse_binary(arms, draws=DRAWS, seed=seed)
        srm = sample_ratio_mismatch([a.exposures for a in arms], self.shares)
        return Look(primary, tuple(self.sequential.values()), srm)


@dataclass(frozen=True)
class Look:
    primary: BinaryAnalysis
    sequential: tuple[SequentialTest, ...]
    srm: SrmCheck

    def verdict(self, config: DecisionConfig | None = None) -> Verdict:
        return decide(self.primary, self.sequential, self.srm, config=config or DecisionConfig(alpha=ALPHA))

    @property
    def best_chance_to_beat(self) -> float:
        """The naive rule's figure: the largest chance to beat the control."""
        return max(c.chance_to_beat_control for c in self.primary.comparisons)


def _running(arms: tuple[str, ...]) -> _Running:
    return _Running(arms, tuple(1.0 for _ in arms), {})


def _aa_traffic(
    rng: np.random.Generator, experiments: int, rate: float, users_per_day: float
) -> tuple[IntArray, IntArray]:
    """Cumulative exposures and conversions, ``(experiments, DAYS, 2)``: 50/50 Bernoulli traffic, one true rate."""
    users = rng.poisson(users_per_day, size=(experiments, DAYS))
    control = rng.binomial(users, 0.5)
    exposures = np.stack([control, users - control], axis=2)
    conversions = rng.binomial(exposures, rate)
    return np.cumsum(exposures, axis=1), np.cumsum(conversions, axis=1)


def test_aa_experiments_peeked_at_daily_declare_few_false_winners_the_naive_rule_many() -> None:
    """400 A/A experiments (both arms activate at 0.4, ~300 users per arm per day), judged every day for 30 days.

    The decision rule (Bayesian thresholds and the always-valid sequential test) must declare a winner in at
    most alpha of them; the same rule without the sequential guard (alpha = 1) and the naive rule (a chance
    to beat of at least 95% at any look) declare one in far more: that is why the guard is there.
    """
    experiments = 400
    exposures, conversions = _aa_traffic(np.random.default_rng(20260516), experiments, 0.4, 600.0)
    guarded, unguarded = DecisionConfig(alpha=ALPHA), DecisionConfig(alpha=1.0)
    false_winners = unguarded_winners = naive_winners = sequential_rejections = 0
    for e in range(experiments):
        run = _running(("control", "variant"))
        found = {"guarded": False, "unguarded": False, "naive": False}
        for day in range(DAYS):
            look = run.look(exposures[e, day], conversions[e, day], seed=e * DAYS + day)
            found["guarded"] = found["guarded"] or look.verdict(guarded).kind is VerdictKind.WINNER
            found["unguarded"] = found["unguarded"] or look.verdict(unguarded).kind is VerdictKind.WINNER
            found["naive"] = found["naive"] or look.best_chance_to_beat >= 0.95
            if all(found.values()):
                break
        # the sequential test alone, either direction (the loop ends early only after a guarded winner, p <= alpha)
        sequential_rejections += run.sequential["variant"].p_value <= ALPHA
        false_winners += found["guarded"]
        unguarded_winners += found["unguarded"]
        naive_winners += found["naive"]
    rate, rate_unguarded, rate_naive, rate_sequential = (
        false_winners / experiments,
        unguarded_winners / experiments,
        naive_winners / experiments,
        sequential_rejections / experiments,
    )
    print(
        f"A/A, {experiments} experiments x {DAYS} daily looks: false winners {rate:.4f} with the rule, "
        f"{rate_unguarded:.4f} without its sequential guard, {rate_naive:.4f} with chance to beat >= 0.95 alone; "
        f"the sequential test alone rejected (either direction) in {rate_sequential:.4f}"
    )
    assert rate <= ALPHA
    assert rate_sequential <= ALPHA
    assert rate_unguarded > ALPHA
    assert rate_naive > 2 * ALPHA


# ---------------------------------------------------------------- the onboarding simulator's paths

BETTER, CONTROL, WORSE = "analyst-reports", "generic", "enterprise-rollout"


@pytest.fixture(scope="module")
def population() -> dict[str, NDArray[np.float64]]:
    """Each simulated user's exact activation probability on each demo path (the same 4,000 users)."""
    data = generate(4_000, seed=2026)
    return {key: data.expected[:, DEMO_CATALOG.index(key)] for key in (BETTER, CONTROL, WORSE)}


def _path_experiment(
    population: dict[str, NDArray[np.float64]], arms: tuple[str, ...], seed: int, users_per_day: int = 600
) -> list[Verdict]:
    """Users drawn from the population, split evenly at random over ``arms`` (paths), looked at daily."""
    rng = np.random.default_rng(seed)
    run = _running(arms)
    size = len(population[arms[0]])
    exposures = np.zeros(len(arms), dtype=np.int64)
    conversions = np.zeros(len(arms), dtype=np.int64)
    verdicts = []
    for day in range(DAYS):
        users = rng.integers(0, size, users_per_day)
        arm = rng.integers(0, len(arms), users_per_day)
        probability = np.choose(arm, [population[key][users] for key in arms])
        activated = rng.random(users_per_day) < probability
        exposures += np.bincount(arm, minlength=len(arms))
        conversions += np.bincount(arm, weights=activated, minlength=len(arms)).astype(np.int64)
        verdicts.append(run.look(exposures, conversions, seed * DAYS + day).verdict())
    return verdicts


def test_the_simulator_paths_differ_by_a_few_points(population: dict[str, NDArray[np.float64]]) -> None:
    means = {key: float(p.mean()) for key, p in population.items()}
    assert 0.03 < means[BETTER] - means[CONTROL] < 0.08, means
    assert 0.03 < means[CONTROL] - means[WORSE] < 0.12, means


def test_a_real_uplift_between_two_paths_is_declared_for_the_better_path(
    population: dict[str, NDArray[np.float64]],
) -> None:
    verdicts = _path_experiment(population, (CONTROL, BETTER), seed=1)
    winners = [v.variant for v in verdicts if v.kind is VerdictKind.WINNER]
    assert winners, [v.reasons for v in verdicts[-3:]]
    assert set(winners) == {BETTER}
    first = next(day for day, v in enumerate(verdicts, start=1) if v.kind is VerdictKind.WINNER)
    print(f"{BETTER} declared the winner over {CONTROL} on day {first} of {DAYS}")


def test_a_worse_path_never_wins(population: dict[str, NDArray[np.float64]]) -> None:
    verdicts = _path_experiment(population, (BETTER, CONTROL), seed=2)
    assert all(v.kind is VerdictKind.NO_WINNER_YET for v in verdicts)


def test_with_three_paths_the_better_one_wins_and_the_worse_one_never(
    population: dict[str, NDArray[np.float64]],
) -> None:
    verdicts = _path_experiment(population, (CONTROL, WORSE, BETTER), seed=3, users_per_day=900)
    winners = {v.variant for v in verdicts if v.kind is VerdictKind.WINNER}
    assert winners == {BETTER}
    assert all(v.kind in (VerdictKind.WINNER, VerdictKind.NO_WINNER_YET) for v in verdicts)


# ---------------------------------------------------------------- sample ratio mismatch


def test_an_allocation_losing_6_percent_of_one_arm_is_caught_and_blocks_the_verdict() -> None:
    """A/A traffic at 0.4 where the variant's exposure logging loses 6% of its users, all non-activated (a
    redirect that loses the users who bounce): the variant looks 2.5 points better, and only the SRM check
    stands between that and a false winner."""
    rng = np.random.default_rng(6)
    per_arm = 15_000
    control_activated = int(rng.binomial(per_arm, 0.4))
    variant_activated = int(rng.binomial(per_arm, 0.4))
    lost = round(0.06 * per_arm)
    control = BinaryArm("control", per_arm, control_activated)
    variant = BinaryArm("variant", per_arm - lost, variant_activated)

    primary = analyse_binary([control, variant], seed=6)
    srm = sample_ratio_mismatch([control.exposures, variant.exposures], [0.5, 0.5])
    sequential = [msprt(control, variant)]
    assert primary.comparison("variant").chance_to_beat_control > 0.95  # the variant looks better
    assert srm.mismatch
    assert srm.p_value < 0.001
    verdict = decide(primary, sequential, srm)
    assert verdict.kind is VerdictKind.SRM
    assert verdict.variant is None
    assert "sample ratio mismatch" in verdict.reasons[0]
    # without the SRM check, the rule would have shipped it
    unchecked = decide(primary, sequential, srm, config=DecisionConfig(srm_threshold=0.0))
    assert unchecked.kind is VerdictKind.WINNER
    assert unchecked.variant == "variant"
