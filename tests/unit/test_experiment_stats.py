"""The statistics engine of the experiments slice (``firstmile.experiments.stats``, docs/experiments.md#statistics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, stats

from firstmile.experiments.stats import (
    DEFAULT_TAU2,
    Action,
    BetaPosterior,
    BetaPrior,
    BinaryAnalysis,
    BinaryArm,
    ContinuousArm,
    DecisionConfig,
    ExtensionPolicy,
    GuardrailAnalysis,
    Review,
    SequentialTest,
    SrmCheck,
    Verdict,
    VerdictKind,
    analyse_binary,
    analyse_continuous,
    analyse_guardrail,
    binary_exact,
    binary_normal_approximation,
    decide,
    msprt,
    msprt_half_width,
    msprt_log_likelihood_ratio,
    msprt_looks,
    review,
    sample_ratio_mismatch,
)
from tests.factories import ROOT

# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("exposures", "conversions", "message"),
    [
        (100, 101, "exceed exposures"),
        (-1, 0, "must not be negative"),
        (100, -3, "must not be negative"),
        (100.0, 3, "must be an integer"),
        (100, 2.5, "must be an integer"),
        (True, 0, "must be an integer"),
        ("100", 3, "must be an integer"),
    ],
)
def test_a_binary_arm_refuses_impossible_counts(exposures: object, conversions: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinaryArm("control", exposures, conversions)  # type: ignore[arg-type]


def test_a_binary_arm_accepts_numpy_integers_as_ints() -> None:
    arm = BinaryArm("control", np.int64(10), np.int32(4))  # type: ignore[arg-type]
    assert type(arm.exposures) is int
    assert type(arm.conversions) is int
    assert arm.rate == 0.4
    assert BinaryArm("empty", 0, 0).rate == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        BinaryArm("", 1, 0)


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 1.0), (1.0, -1.0), (math.inf, 1.0), (math.nan, 1.0)])
def test_a_beta_prior_needs_positive_finite_parameters(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError, match="positive finite"):
        BetaPrior(alpha, beta)


def test_an_analysis_needs_distinct_arms_and_a_known_control() -> None:
    a, b = BinaryArm("a", 10, 1), BinaryArm("b", 10, 2)
    with pytest.raises(ValueError, match="at least one variant"):
        analyse_binary([a])
    with pytest.raises(ValueError, match="unique"):
        analyse_binary([a, BinaryArm("a", 5, 1)])
    with pytest.raises(ValueError, match="not one of the arms"):
        analyse_binary([a, b], control="c")
    with pytest.raises(ValueError, match="draws must be at least 100"):
        analyse_binary([a, b], draws=10)
    with pytest.raises(ValueError, match="credibility"):
        analyse_binary([a, b], credibility=1.0)


# ---------------------------------------------------------------- binary metrics


def test_the_posterior_is_the_prior_updated_by_the_counts() -> None:
    arm = BinaryArm("control", 1000, 420)
    assert BetaPosterior.of(arm) == BetaPosterior(421.0, 581.0)
    assert BetaPosterior.of(arm, BetaPrior(10.0, 30.0)) == BetaPosterior(430.0, 610.0)
    posterior = BetaPosterior(421.0, 581.0)
    assert posterior.mean == pytest.approx(stats.beta(421, 581).mean())
    assert posterior.variance == pytest.approx(stats.beta(421, 581).var())
    analysis = analyse_binary([arm, BinaryArm("variant", 1000, 470)], prior=BetaPrior(10.0, 30.0), draws=1_000)
    assert analysis.comparison("variant").control_mean == pytest.approx(430 / 1040)


def test_an_analysis_is_deterministic_given_its_seed() -> None:
    arms = [BinaryArm("control", 500, 100), BinaryArm("variant", 500, 112)]
    assert analyse_binary(arms, seed=7) == analyse_binary(arms, seed=7)
    assert analyse_binary(arms, seed=7) != analyse_binary(arms, seed=8)


@pytest.mark.parametrize(
    ("control", "variant"),
    [((10_000, 4_000), (10_000, 4_080)), ((20_000, 2_000), (20_000, 2_050)), ((5_000, 2_500), (5_000, 2_450))],
)
def test_monte_carlo_matches_the_exact_and_the_normal_approximation_for_large_n(
    control: tuple[int, int], variant: tuple[int, int]
) -> None:
    c, v = BinaryArm("control", *control), BinaryArm("variant", *variant)
    mc = analyse_binary([c, v]).comparison("variant")
    exact = binary_exact(BetaPosterior.of(c), BetaPosterior.of(v))
    normal = binary_normal_approximation(BetaPosterior.of(c), BetaPosterior.of(v))
    assert mc.chance_to_beat_control == pytest.approx(exact.chance_to_beat_control, abs=0.005)
    assert mc.chance_to_beat_control == pytest.approx(normal.chance_to_beat_control, abs=0.01)
    for check in (exact, normal):
        assert mc.expected_loss == pytest.approx(check.expected_loss, rel=0.05, abs=2e-5)
        assert mc.expected_loss_control == pytest.approx(check.expected_loss_control, rel=0.05, abs=2e-5)


def test_monte_carlo_matches_the_exact_figures_for_small_counts_too() -> None:
    """Where the normal approximation is poor (a handful of conversions), the quadrature still holds."""
    c, v = BinaryArm("control", 20, 2), BinaryArm("variant", 20, 6)
    mc = analyse_binary([c, v]).comparison("variant")
    exact = binary_exact(BetaPosterior.of(c), BetaPosterior.of(v))
    assert mc.chance_to_beat_control == pytest.approx(exact.chance_to_beat_control, abs=0.005)
    assert mc.expected_loss == pytest.approx(exact.expected_loss, abs=5e-4)
    assert mc.expected_loss_control == pytest.approx(exact.expected_loss_control, abs=5e-4)


def test_a_vs_a_is_a_coin_flip() -> None:
    analysis = analyse_binary([BinaryArm("a", 5_000, 1_000), BinaryArm("b", 5_000, 1_000)])
    comparison = analysis.comparison("b")
    assert comparison.chance_to_beat_control == pytest.approx(0.5, abs=0.01)
    assert comparison.expected_loss == pytest.approx(comparison.expected_loss_control, rel=0.03)
    assert comparison.uplift_interval[0] < 0.0 < comparison.uplift_interval[1]
    assert [a.chance_to_be_best for a in analysis.arms] == pytest.approx([0.5, 0.5], abs=0.01)
    exact = binary_exact(BetaPosterior(1001, 4001), BetaPosterior(1001, 4001))
    assert exact.chance_to_beat_control == pytest.approx(0.5, abs=1e-6)


def test_the_uplift_interval_contains_the_true_uplift() -> None:
    """Counts at their expectation (30% and 33%: a 10% uplift), then 200 simulated experiments: coverage ~95%."""
    comparison = analyse_binary([BinaryArm("c", 20_000, 6_000), BinaryArm("v", 20_000, 6_600)]).comparison("v")
    low, high = comparison.uplift_interval
    assert low < 0.10 < high
    assert comparison.uplift_mean == pytest.approx(0.10, abs=0.002)

    rng = np.random.default_rng(95)
    covered = 0
    for i in range(200):
        c, v = rng.binomial(4_000, 0.30), rng.binomial(4_000, 0.33)
        interval = (
            analyse_binary([BinaryArm("c", 4_000, c), BinaryArm("v", 4_000, v)], draws=4_000, seed=i)
            .comparison("v")
            .uplift_interval
        )
        covered += interval[0] < 0.10 < interval[1]
    assert 0.90 <= covered / 200 <= 0.99


def test_several_variants_each_against_the_control_and_the_chance_to_be_best() -> None:
    arms = [
        BinaryArm("control", 4_000, 1_600),
        BinaryArm("worse", 4_000, 1_450),
        BinaryArm("better", 4_000, 1_760),
        BinaryArm("same", 4_000, 1_605),
    ]
    analysis = analyse_binary(arms)
    assert analysis.control == "control"
    assert analysis.variants == ("worse", "better", "same")
    assert analysis.comparison("better").chance_to_beat_control > 0.99
    assert analysis.comparison("worse").chance_to_beat_control < 0.01
    assert 0.3 < analysis.comparison("same").chance_to_beat_control < 0.8
    best = {a.name: a.chance_to_be_best for a in analysis.arms}
    assert sum(best.values()) == pytest.approx(1.0)
    assert max(best, key=lambda k: best[k]) == "better"
    assert analysis.arm("better").posterior == BetaPosterior(1761.0, 2241.0)
    with pytest.raises(KeyError):
        analysis.comparison("control")


def test_the_control_can_be_any_arm() -> None:
    analysis = analyse_binary([BinaryArm("b", 1_000, 500), BinaryArm("a", 1_000, 400)], control="a")
    assert analysis.control == "a"
    assert analysis.variants == ("b",)
    assert analysis.comparison("b").chance_to_beat_control > 0.99


# ---------------------------------------------------------------- continuous metrics


def test_a_continuous_arm_from_values_and_its_validation() -> None:
    arm = ContinuousArm.from_values("control", [1.0, 2.0, 4.0, 7.0])
    assert (arm.n, arm.mean) == (4, 3.5)
    assert arm.variance == pytest.approx(np.var([1, 2, 4, 7], ddof=1))
    with pytest.raises(ValueError, match="at least 2"):
        ContinuousArm.from_values("control", [1.0])
    with pytest.raises(ValueError, match="finite"):
        ContinuousArm.from_values("control", [1.0, math.nan])
    with pytest.raises(ValueError, match="variance"):
        ContinuousArm("control", 10, 1.0, -1.0)
    with pytest.raises(ValueError, match="mean"):
        ContinuousArm("control", 10, math.inf, 1.0)
    with pytest.raises(ValueError, match="integer"):
        ContinuousArm("control", 10.5, 1.0, 1.0)  # type: ignore[arg-type]


def test_welch_interval_and_p_value_match_scipy() -> None:
    rng = np.random.default_rng(3)
    control_values, variant_values = rng.normal(10.0, 3.0, 80), rng.normal(11.0, 5.0, 120)
    analysis = analyse_continuous(
        [ContinuousArm.from_values("control", control_values), ContinuousArm.from_values("variant", variant_values)]
    )
    comparison = analysis.comparison("variant")
    reference = stats.ttest_ind(variant_values, control_values, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert comparison.difference == pytest.approx(variant_values.mean() - control_values.mean())
    assert comparison.difference_interval == pytest.approx((interval.low, interval.high))
    assert comparison.degrees_of_freedom == pytest.approx(reference.df)
    assert comparison.p_value == pytest.approx(reference.pvalue)


def test_the_delta_method_interval_of_the_relative_difference() -> None:
    control, variant = ContinuousArm("control", 400, 20.0, 36.0), ContinuousArm("variant", 500, 22.0, 49.0)
    comparison = analyse_continuous([control, variant]).comparison("variant")
    assert comparison.relative_difference == pytest.approx(0.10)
    se = math.sqrt((49.0 / 500) / 20.0**2 + 22.0**2 * (36.0 / 400) / 20.0**4)
    assert comparison.relative_interval == pytest.approx((0.10 - 1.959964 * se, 0.10 + 1.959964 * se))
    # and it covers: the relative difference of 400 simulated pairs of arms around a true +10%
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(400):
        c = ContinuousArm.from_values("c", rng.normal(20.0, 6.0, 400))
        v = ContinuousArm.from_values("v", rng.normal(22.0, 7.0, 500))
        relative = analyse_continuous([c, v]).comparison("v").relative_interval
        assert relative is not None
        covered += relative[0] < 0.10 < relative[1]
    assert 0.92 <= covered / 400 <= 0.98


def test_the_direction_of_a_continuous_metric() -> None:
    """Time to activation: lower is better, so a faster variant beats the control."""
    control, faster = ContinuousArm("control", 1_000, 30.0, 100.0), ContinuousArm("faster", 1_000, 28.0, 100.0)
    lower = analyse_continuous([control, faster], higher_is_better=False).comparison("faster")
    higher = analyse_continuous([control, faster]).comparison("faster")
    se = math.sqrt(100.0 / 1_000 * 2)
    assert lower.chance_to_beat_control == pytest.approx(stats.norm.cdf(2.0 / se))
    assert higher.chance_to_beat_control == pytest.approx(1.0 - lower.chance_to_beat_control)
    assert lower.difference == higher.difference == pytest.approx(-2.0)


def test_degenerate_continuous_arms() -> None:
    zero = analyse_continuous([ContinuousArm("c", 10, 0.0, 1.0), ContinuousArm("v", 10, 1.0, 1.0)]).comparison("v")
    assert zero.relative_difference is None
    assert zero.relative_interval is None
    constant = analyse_continuous([ContinuousArm("c", 10, 2.0, 0.0), ContinuousArm("v", 10, 3.0, 0.0)])
    assert constant.comparison("v").difference_interval == (1.0, 1.0)
    assert constant.comparison("v").chance_to_beat_control == 1.0


# ---------------------------------------------------------------- sample ratio mismatch


def test_srm_passes_a_balanced_50_50_experiment() -> None:
    check = sample_ratio_mismatch([5_000, 5_050], [0.5, 0.5])
    assert check.statistic == pytest.approx(2 * 25**2 / 5_025)
    assert check.degrees_of_freedom == 1
    assert check.p_value == pytest.approx(0.618, abs=0.001)
    assert not check.mismatch


def test_srm_of_5000_vs_5300() -> None:
    """5,000 vs 5,300 on a 50/50 split: chi-square 8.74, p = 0.0031. Flagged at 0.01, not at the default 0.001."""
    check = sample_ratio_mismatch([5_000, 5_300], [0.5, 0.5])
    assert check.statistic == pytest.approx(8.7379, abs=1e-4)
    assert check.p_value == pytest.approx(0.00312, abs=1e-5)
    assert not check.mismatch
    assert sample_ratio_mismatch([5_000, 5_300], [0.5, 0.5], threshold=0.01).mismatch


def test_srm_catches_a_larger_imbalance_at_the_default_threshold() -> None:
    check = sample_ratio_mismatch([5_000, 5_400], [0.5, 0.5])
    assert check.p_value < 0.001
    assert check.mismatch


def test_srm_with_unequal_shares_matches_scipy() -> None:
    check = sample_ratio_mismatch([5_000, 2_600, 2_400], [2.0, 1.0, 1.0])
    reference = stats.chisquare([5_000, 2_600, 2_400], [5_000, 2_500, 2_500])
    assert check.expected == (5_000.0, 2_500.0, 2_500.0)
    assert check.degrees_of_freedom == 2
    assert check.statistic == pytest.approx(reference.statistic)
    assert check.p_value == pytest.approx(reference.pvalue)


def test_srm_validation_and_no_traffic() -> None:
    with pytest.raises(ValueError, match="one share per arm"):
        sample_ratio_mismatch([1, 2], [1.0])
    with pytest.raises(ValueError, match="positive"):
        sample_ratio_mismatch([1, 2], [1.0, 0.0])
    with pytest.raises(ValueError, match="negative"):
        sample_ratio_mismatch([1, -2], [1.0, 1.0])
    with pytest.raises(ValueError, match="threshold"):
        sample_ratio_mismatch([1, 2], [1.0, 1.0], threshold=0.0)
    empty = sample_ratio_mismatch([0, 0], [1.0, 1.0])
    assert (empty.p_value, empty.mismatch) == (1.0, False)


# ---------------------------------------------------------------- the mSPRT


def test_the_mixture_likelihood_ratio_formula() -> None:
    """Λ = sqrt(V / (V + τ²)) exp(τ² Δ² / (2 V (V + τ²))), the Gaussian mixture of the likelihood ratio."""
    difference, variance, tau2 = 0.05, 0.0004927, 0.0009
    expected = math.sqrt(variance / (variance + tau2)) * math.exp(
        tau2 * difference**2 / (2 * variance * (variance + tau2))
    )
    assert math.exp(msprt_log_likelihood_ratio(difference, variance, tau2)) == pytest.approx(expected)
    # the mixture integral itself: ∫ N(Δ̂; θ, V) N(θ; 0, τ²) dθ / N(Δ̂; 0, V)
    mixture, _ = integrate.quad(
        lambda theta: (
            stats.norm.pdf(difference, theta, math.sqrt(variance)) * stats.norm.pdf(theta, 0, math.sqrt(tau2))
        ),
        -0.5,
        0.5,
        points=[0.0, difference],
    )
    assert mixture / stats.norm.pdf(difference, 0, math.sqrt(variance)) == pytest.approx(expected, rel=1e-6)
    assert msprt_log_likelihood_ratio(0.1, 0.0, tau2) == 0.0
    with pytest.raises(ValueError, match="tau2"):
        msprt_log_likelihood_ratio(0.1, 0.01, 0.0)


def test_the_confidence_interval_of_a_look_is_where_the_likelihood_ratio_stays_below_one_over_alpha() -> None:
    difference, variance = 0.03, 0.0002
    half = msprt_half_width(variance, DEFAULT_TAU2, 0.05)
    for theta in (difference - half, difference + half):
        assert msprt_log_likelihood_ratio(difference, variance, DEFAULT_TAU2, theta) == pytest.approx(math.log(20))
    result = msprt(BinaryArm("c", 2_000, 800), BinaryArm("v", 2_000, 880))
    low, high = result.confidence_sequence
    assert low < result.difference < high
    assert (result.p_value <= 0.05) == (low > 0.0 or high < 0.0)


def _daily_looks(uplift: float, days: int = 40, seed: int = 11) -> list[tuple[BinaryArm, BinaryArm]]:
    """Cumulative counts of 40 daily looks at 300 users per arm and day: the control activates at 0.40, the
    variant at ``0.40 + uplift`` for the first ``days`` days and at 0.40 after (a novelty effect that fades)."""
    rng = np.random.default_rng(seed)
    looks = []
    n_c = k_c = n_v = k_v = 0
    for day in range(40):
        rate_v = 0.40 + uplift if day < days else 0.40
        n_c, n_v = n_c + 300, n_v + 300
        k_c += int(rng.binomial(300, 0.40))
        k_v += int(rng.binomial(300, rate_v))
        looks.append((BinaryArm("control", n_c, k_c), BinaryArm("variant", n_v, k_v)))
    return looks


def test_the_always_valid_p_value_never_increases_and_the_confidence_sequence_never_widens() -> None:
    results = msprt_looks(_daily_looks(0.02))
    p_values = [r.p_value for r in results]
    assert all(later <= earlier for earlier, later in itertools.pairwise(p_values))
    # it is the running minimum of 1 / Λ_n, and 1 / Λ_n itself did go back up
    inverse = [min(1.0, math.exp(-r.log_likelihood_ratio)) for r in results]
    assert p_values == pytest.approx(list(np.minimum.accumulate(inverse)))
    assert any(later > earlier for earlier, later in itertools.pairwise(inverse))
    for earlier, later in itertools.pairwise(results):
        assert earlier.confidence_sequence[0] <= later.confidence_sequence[0]
        assert later.confidence_sequence[1] <= earlier.confidence_sequence[1]
    assert [r.looks for r in results] == list(range(1, 41))


def test_an_effect_that_changes_can_empty_the_running_intersection() -> None:
    """The guarantee assumes one constant difference; a fading novelty effect breaks it: once no difference is
    consistent with every look, the look's own interval is reported (the p-value stays the running minimum)."""
    results = msprt_looks(_daily_looks(0.06, days=10))
    assert results[9].confidence_sequence[0] > 0.0
    assert results[9].p_value < 0.05
    emptied = []
    for earlier, later in itertools.pairwise(results):
        half = msprt_half_width(later.variance, later.tau2, later.alpha)
        own = (later.difference - half, later.difference + half)
        if own[1] < earlier.confidence_sequence[0] or own[0] > earlier.confidence_sequence[1]:
            emptied.append(later.looks)
            assert later.confidence_sequence == pytest.approx(own)
    assert emptied
    assert [r.p_value for r in results] == sorted((r.p_value for r in results), reverse=True)


def test_a_look_must_follow_the_previous_one() -> None:
    first = msprt(BinaryArm("c", 100, 40), BinaryArm("v", 100, 45))
    with pytest.raises(ValueError, match="cannot decrease"):
        msprt(BinaryArm("c", 90, 40), BinaryArm("v", 120, 50), previous=first)
    with pytest.raises(ValueError, match="previous look"):
        msprt(BinaryArm("c", 200, 80), BinaryArm("w", 200, 90), previous=first)
    with pytest.raises(ValueError, match="must not change"):
        msprt(BinaryArm("c", 200, 80), BinaryArm("v", 200, 90), previous=first, tau2=0.01)
    with pytest.raises(ValueError, match="different arms"):
        msprt(BinaryArm("c", 200, 80), BinaryArm("c", 200, 90))
    with pytest.raises(ValueError, match="alpha"):
        msprt(BinaryArm("c", 200, 80), BinaryArm("v", 200, 90), alpha=0.0)


def test_no_evidence_without_variance() -> None:
    nothing = msprt(BinaryArm("c", 0, 0), BinaryArm("v", 0, 0))
    assert (nothing.p_value, nothing.confidence_sequence) == (1.0, (-1.0, 1.0))
    all_zero = msprt(BinaryArm("c", 50, 0), BinaryArm("v", 50, 0), previous=nothing)
    assert all_zero.p_value == 1.0


def test_the_guarantee_holds_under_h0_with_continuous_peeking() -> None:
    """2,000 A/A experiments looked at after every 50 users per arm, 60 looks: P(p_t <= 0.05 at some look) <= 0.05."""
    rng = np.random.default_rng(2017)
    experiments, looks, batch = 2_000, 60, 50
    control = np.cumsum(rng.binomial(batch, 0.3, size=(experiments, looks)), axis=1)
    variant = np.cumsum(rng.binomial(batch, 0.3, size=(experiments, looks)), axis=1)
    rejected = 0
    for e in range(experiments):
        result: SequentialTest | None = None
        for t in range(looks):
            n = batch * (t + 1)
            result = msprt(
                BinaryArm("c", n, int(control[e, t])), BinaryArm("v", n, int(variant[e, t])), previous=result
            )
        assert result is not None
        rejected += result.p_value <= 0.05
    assert rejected / experiments <= 0.05


# ---------------------------------------------------------------- guardrails


def test_a_guardrail_that_a_variant_clearly_worsens_vetoes_it() -> None:
    stuck = analyse_guardrail(
        "stuck_rate",
        [BinaryArm("control", 10_000, 1_500), BinaryArm("variant", 10_000, 1_900), BinaryArm("same", 10_000, 1_510)],
        tolerance=0.01,
    )
    assert stuck.comparison("variant").probability_worse > 0.99
    assert stuck.vetoes("variant", 0.9)
    assert stuck.comparison("same").probability_worse < 0.1
    assert not stuck.vetoes("same", 0.9)
    assert stuck.comparison("variant").control_rate == pytest.approx(1_501 / 10_002)


def test_the_guardrail_tolerance() -> None:
    arms = [BinaryArm("control", 10_000, 1_000), BinaryArm("variant", 10_000, 1_100)]  # one point worse
    assert analyse_guardrail("unsubscribes", arms, tolerance=0.0).comparison("variant").probability_worse > 0.98
    assert analyse_guardrail("unsubscribes", arms, tolerance=0.01).comparison("variant").probability_worse == (
        pytest.approx(0.5, abs=0.03)
    )
    assert analyse_guardrail("unsubscribes", arms, tolerance=0.03).comparison("variant").probability_worse < 0.01
    with pytest.raises(ValueError, match="tolerance"):
        analyse_guardrail("unsubscribes", arms, tolerance=-0.01)
    with pytest.raises(ValueError, match="name"):
        analyse_guardrail("", arms, tolerance=0.01)


# ---------------------------------------------------------------- the decision rule

CLEAR = [BinaryArm("control", 10_000, 4_000), BinaryArm("variant", 10_000, 4_300)]


def _look(
    arms: list[BinaryArm], shares: tuple[float, ...] | None = None
) -> tuple[BinaryAnalysis, list[SequentialTest], SrmCheck]:
    primary = analyse_binary(arms)
    sequential = [msprt(arms[0], arm) for arm in arms[1:]]
    srm = sample_ratio_mismatch([a.exposures for a in arms], shares or tuple(1.0 for _ in arms))
    return primary, sequential, srm


def test_a_clear_winner_with_every_check_passed() -> None:
    verdict = decide(*_look(CLEAR))
    assert verdict.kind is VerdictKind.WINNER
    assert verdict.variant == "variant"
    assert "sequential p" in verdict.reasons[-1]


def test_srm_blocks_even_a_clear_winner() -> None:
    arms = [BinaryArm("control", 10_000, 4_000), BinaryArm("variant", 10_600, 4_600)]
    primary, sequential, srm = _look(arms)
    assert primary.comparison("variant").chance_to_beat_control > 0.99
    assert sequential[0].p_value < 0.05
    verdict = decide(primary, sequential, srm)
    assert verdict == Verdict(VerdictKind.SRM, reasons=verdict.reasons)
    assert "sample ratio mismatch" in verdict.reasons[0]
    assert decide(primary, sequential, srm, config=DecisionConfig(srm_threshold=0.0)).kind is VerdictKind.WINNER


def test_a_winner_needs_the_sequential_test_too() -> None:
    """The worked example's first look: a 98.8% chance to beat, a tiny expected loss, but the always-valid
    p-value is 0.33: no winner yet."""
    arms = [BinaryArm("control", 1_000, 420), BinaryArm("variant", 1_000, 470)]
    primary, sequential, srm = _look(arms)
    comparison = primary.comparison("variant")
    assert comparison.chance_to_beat_control >= 0.95
    assert comparison.expected_loss <= 0.001
    verdict = decide(primary, sequential, srm)
    assert verdict.kind is VerdictKind.NO_WINNER_YET
    assert verdict.variant is None
    assert verdict.reasons == (f"variant: sequential p {sequential[0].p_value:.4f} > 0.05",)


def test_a_winner_needs_a_small_expected_loss_and_a_high_chance_to_beat() -> None:
    primary, sequential, srm = _look([BinaryArm("control", 3_000, 1_200), BinaryArm("variant", 3_000, 1_330)])
    assert decide(primary, sequential, srm).kind is VerdictKind.WINNER
    strict_loss = decide(primary, sequential, srm, config=DecisionConfig(expected_loss=1e-7))
    assert strict_loss.kind is VerdictKind.NO_WINNER_YET
    assert "expected loss" in strict_loss.reasons[0]
    worse = [BinaryArm("control", 10_000, 4_300), BinaryArm("variant", 10_000, 4_000)]
    verdict = decide(*_look(worse))
    assert verdict.kind is VerdictKind.NO_WINNER_YET
    assert "chance to beat" in verdict.reasons[0]
    assert "not positive" in verdict.reasons[0]


def test_with_several_variants_each_sequential_test_gets_alpha_over_m() -> None:
    """Bonferroni: two variants each need p <= 0.025, so a p of 0.03 wins alone but not beside another variant."""
    alone = [BinaryArm("control", 3_000, 1_200), BinaryArm("variant", 3_000, 1_320)]
    primary, sequential, srm = _look(alone)
    assert 0.025 < sequential[0].p_value <= 0.05
    assert decide(primary, sequential, srm).kind is VerdictKind.WINNER
    two = [*alone, BinaryArm("other", 3_000, 1_190)]
    verdict = decide(*_look(two))
    assert verdict.kind is VerdictKind.NO_WINNER_YET
    assert any("> 0.025" in reason for reason in verdict.reasons)


def test_the_best_of_several_eligible_variants_wins() -> None:
    arms = [BinaryArm("control", 10_000, 4_000), BinaryArm("good", 10_000, 4_300), BinaryArm("best", 10_000, 4_500)]
    verdict = decide(*_look(arms))
    assert (verdict.kind, verdict.variant) == (VerdictKind.WINNER, "best")


def _guardrail(name: str, counts: dict[str, int], tolerance: float = 0.005) -> GuardrailAnalysis:
    arms = [BinaryArm(arm, 10_000, k) for arm, k in counts.items()]
    return analyse_guardrail(name, arms, tolerance=tolerance)


def test_a_guardrail_vetoes_a_winner() -> None:
    stuck = _guardrail("stuck_rate", {"control": 1_500, "variant": 1_800})
    unsubscribes = _guardrail("nudge_unsubscribes", {"control": 100, "variant": 102})
    verdict = decide(*_look(CLEAR), guardrails=[stuck, unsubscribes])
    assert verdict.kind is VerdictKind.VETOED
    assert verdict.variant == "variant"
    assert verdict.guardrails == ("stuck_rate",)
    assert any("guardrail stuck_rate" in reason for reason in verdict.reasons)
    assert decide(*_look(CLEAR), guardrails=[unsubscribes]).kind is VerdictKind.WINNER
    tolerant = _guardrail("stuck_rate", {"control": 1_500, "variant": 1_800}, tolerance=0.05)
    assert decide(*_look(CLEAR), guardrails=[tolerant]).kind is VerdictKind.WINNER


def test_a_vetoed_variant_leaves_the_win_to_another_eligible_one() -> None:
    arms = [BinaryArm("control", 10_000, 4_000), BinaryArm("good", 10_000, 4_300), BinaryArm("best", 10_000, 4_500)]
    stuck = _guardrail("stuck_rate", {"control": 1_500, "good": 1_500, "best": 1_800})
    verdict = decide(*_look(arms), guardrails=[stuck])
    assert (verdict.kind, verdict.variant) == (VerdictKind.WINNER, "good")
    assert any(reason.startswith("best: guardrail stuck_rate") for reason in verdict.reasons)


def test_decide_refuses_inconsistent_inputs() -> None:
    primary, sequential, srm = _look(CLEAR)
    with pytest.raises(ValueError, match="no sequential test"):
        decide(primary, [], srm)
    other_control = msprt(BinaryArm("other", 10, 4), BinaryArm("variant", 10, 5))
    with pytest.raises(ValueError, match="is against"):
        decide(primary, [other_control], srm)
    with pytest.raises(ValueError, match="does not compare variant"):
        decide(primary, sequential, srm, guardrails=[_guardrail("stuck_rate", {"control": 1, "other": 2})])
    with pytest.raises(ValueError, match="has control"):
        decide(primary, sequential, srm, guardrails=[_guardrail("stuck_rate", {"variant": 1, "control": 2})])
    for bad in ({"chance_to_beat": 0.0}, {"alpha": 0.0}, {"expected_loss": -1.0}, {"guardrail_veto": 1.5}):
        with pytest.raises(ValueError):
            DecisionConfig(**bad)


# ---------------------------------------------------------------- the extension rule

WAIT = Verdict(VerdictKind.NO_WINNER_YET, reasons=("variant: sequential p 0.2 > 0.05",))


def test_low_confidence_at_the_planned_end_extends_then_concludes_inconclusive() -> None:
    policy = ExtensionPolicy(planned_days=14, extension_days=7, max_extensions=2)
    assert review(WAIT, day=10, extensions=0, policy=policy) == Review(Action.CONTINUE, WAIT, 14, 0)
    first = review(WAIT, day=14, extensions=0, policy=policy)
    assert (first.action, first.end_day, first.extensions) == (Action.EXTEND, 21, 1)
    assert review(WAIT, day=18, extensions=1, policy=policy).action is Action.CONTINUE
    second = review(WAIT, day=21, extensions=1, policy=policy)
    assert (second.action, second.end_day, second.extensions) == (Action.EXTEND, 28, 2)
    last = review(WAIT, day=28, extensions=2, policy=policy)
    assert last.action is Action.STOP
    assert last.verdict.kind is VerdictKind.INCONCLUSIVE
    assert last.verdict.reasons[0] == WAIT.reasons[0]
    assert "no winner after 28 days and 2 extension(s)" in last.verdict.reasons[-1]


@pytest.mark.parametrize("kind", [VerdictKind.WINNER, VerdictKind.SRM, VerdictKind.VETOED, VerdictKind.INCONCLUSIVE])
def test_a_decisive_verdict_stops_the_experiment(kind: VerdictKind) -> None:
    verdict = Verdict(kind, "variant" if kind is VerdictKind.WINNER else None)
    result = review(verdict, day=3, extensions=0, policy=ExtensionPolicy(planned_days=14))
    assert (result.action, result.verdict) == (Action.STOP, verdict)


def test_the_extension_policy_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        ExtensionPolicy(planned_days=0)
    with pytest.raises(ValueError, match="exceed"):
        review(WAIT, day=30, extensions=3, policy=ExtensionPolicy(planned_days=14, max_extensions=2))
    no_extension = review(WAIT, day=14, extensions=0, policy=ExtensionPolicy(planned_days=14, max_extensions=0))
    assert no_extension.verdict.kind is VerdictKind.INCONCLUSIVE


# ---------------------------------------------------------------- the worked example of docs/experiments.md

WORKED_EXAMPLE_DOC = ROOT / "docs" / "experiments.md"


def _percent(p: float) -> str:
    return "> 99.9%" if p > 0.999 else f"{p:.1%}"


def _uplift(comparison_mean: float, interval: tuple[float, float]) -> str:
    return f"{comparison_mean:+.1%} [{interval[0]:+.1%}, {interval[1]:+.1%}]"


def worked_example() -> str:
    """The worked example's figures, as docs/experiments.md prints them (seed 0, 100,000 draws, the defaults)."""
    lines: list[str] = []
    looks = [
        ((1_000, 420), (1_000, 470), None),
        ((3_000, 1_275), (3_050, 1_437), ((3_000, 540), (3_050, 560))),
    ]
    previous: SequentialTest | None = None
    for number, (control_counts, variant_counts, stuck_counts) in enumerate(looks, start=1):
        control, variant = BinaryArm("control", *control_counts), BinaryArm("variant", *variant_counts)
        primary = analyse_binary([control, variant])
        c = primary.comparison("variant")
        exact = binary_exact(BetaPosterior.of(control), BetaPosterior.of(variant))
        normal = binary_normal_approximation(BetaPosterior.of(control), BetaPosterior.of(variant))
        srm = sample_ratio_mismatch([control.exposures, variant.exposures], [0.5, 0.5])
        previous = msprt(control, variant, previous=previous)
        guardrails = []
        lines.append(
            f"look {number}: control {control.exposures:,} exposed / {control.conversions:,} activated, "
            f"variant {variant.exposures:,} / {variant.conversions:,}"
        )
        lines.append(f"  posterior means          control {c.control_mean:.4f}, variant {c.variant_mean:.4f}")
        lines.append(
            f"  chance to beat control   {_percent(c.chance_to_beat_control)} "
            f"(exact {_percent(exact.chance_to_beat_control)}, normal approximation "
            f"{_percent(normal.chance_to_beat_control)})"
        )
        lines.append(
            f"  expected loss            choosing the variant {c.expected_loss:.4f}, "
            f"keeping the control {c.expected_loss_control:.4f}"
        )
        lines.append(f"  relative uplift          {_uplift(c.uplift_mean, c.uplift_interval)} (95% credible interval)")
        lines.append(
            f"  SRM (50/50)              chi-square {srm.statistic:.2f} on {srm.degrees_of_freedom} df, "
            f"p = {srm.p_value:.3f}"
        )
        low, high = previous.confidence_sequence
        lines.append(
            f"  mSPRT (tau2 = {previous.tau2:g})    difference {previous.difference:+.4f}, "
            f"Λ = {math.exp(previous.log_likelihood_ratio):.2f}, always-valid p = {previous.p_value:.3f}"
        )
        lines.append(f"                           95% confidence sequence [{low:+.3f}, {high:+.3f}]")
        if stuck_counts is not None:
            stuck = analyse_guardrail(
                "stuck_rate",
                [BinaryArm("control", *stuck_counts[0]), BinaryArm("variant", *stuck_counts[1])],
                tolerance=0.01,
            )
            guardrails.append(stuck)
            g = stuck.comparison("variant")
            lines.append(
                f"  guardrail stuck_rate     control {stuck_counts[0][1]:,} / {stuck_counts[0][0]:,}, "
                f"variant {stuck_counts[1][1]:,} / {stuck_counts[1][0]:,}: "
                f"P(variant worse by more than 0.01) = {g.probability_worse:.3f}"
            )
        verdict = decide(primary, [previous], srm, guardrails)
        outcome = verdict.kind.value + (f" ({verdict.variant})" if verdict.variant else "")
        if verdict.kind is VerdictKind.NO_WINNER_YET:
            outcome += f": always-valid p {previous.p_value:.3f} > alpha 0.05"
        lines.append(f"  verdict                  {outcome}")
    return "\n".join(lines)


def test_the_worked_example_in_the_docs_is_what_the_code_computes() -> None:
    doc = WORKED_EXAMPLE_DOC.read_text(encoding="utf-8")
    block = worked_example()
    assert f"```text\n{block}\n```" in doc, f"update the worked example of docs/experiments.md to:\n{block}"
    assert "test_the_worked_example_in_the_docs_is_what_the_code_computes" in doc


def test_the_docs_state_the_defaults_of_the_code() -> None:
    doc = WORKED_EXAMPLE_DOC.read_text(encoding="utf-8")
    config = DecisionConfig()
    policy = ExtensionPolicy(planned_days=14)
    for text in (
        f"`chance_to_beat = {config.chance_to_beat:g}`",
        f"`expected_loss = {config.expected_loss:g}`",
        f"`alpha = {config.alpha:g}`",
        f"`srm_threshold = {config.srm_threshold:g}`",
        f"`guardrail_veto = {config.guardrail_veto:g}`",
        f"`tau2 = {DEFAULT_TAU2:g}`",
        f"`extension_days = {policy.extension_days}`",
        f"`max_extensions = {policy.max_extensions}`",
        "`draws = 100,000`",
        "`Beta(1, 1)`",
    ):
        assert text in doc, text
