"""The statistics that judge an experiment's variants (pure: no I/O; docs/experiments.md#statistics).

* **Binary metrics** (activation, step completion): Beta-binomial posteriors per arm, Monte Carlo
  over a seeded ``numpy.random.Generator`` for the chance to beat the control, the expected loss of
  choosing a variant (and of keeping the control), the credible interval of the relative uplift and
  the chance to be best (:func:`analyse_binary`); :func:`binary_exact` (one-dimensional quadrature)
  and :func:`binary_normal_approximation` check the Monte Carlo figures.
* **Continuous metrics** (time to activation, steps completed): Welch's t interval of the difference
  of means, a delta-method interval of the relative difference and a chance to beat under the
  normal approximation of each mean's posterior, in the metric's direction (:func:`analyse_continuous`).
* **Sample ratio mismatch**: chi-square goodness of fit of the exposures to the configured shares
  (:func:`sample_ratio_mismatch`).
* **Sequential monitoring**: the mixture sequential probability ratio test of Johari, Koomen, Pekelis
  and Walsh (always-valid p-value and confidence sequence for the difference of two proportions,
  :func:`msprt`), valid however often the results are looked at.
* **Guardrails**: the probability that a variant makes a rate where higher is worse (stuck rate,
  nudge unsubscribes) worse by more than a tolerance (:func:`analyse_guardrail`).
* **Decision**: :func:`decide` turns all of it into a :class:`Verdict`, and :func:`review` applies
  the extension rule at the planned end.

Every result is deterministic given its ``seed``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import integrate, special, stats

DEFAULT_DRAWS: Final = 100_000
"""Monte Carlo draws per posterior: the chance to beat has a standard error below 0.0016."""
DEFAULT_SEED: Final = 0
DEFAULT_CREDIBILITY: Final = 0.95
DEFAULT_TAU2: Final = 0.03**2
"""The mSPRT's mixing variance: a prior standard deviation of 3 percentage points on the difference of rates."""
DEFAULT_SRM_THRESHOLD: Final = 0.001

FloatArray = NDArray[np.float64]


# ---------------------------------------------------------------- validation


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    count = int(value)
    if count < 0:
        raise ValueError(f"{what} must not be negative, got {count}")
    return count


def _probability(value: float, what: str, *, open_low: bool = True, open_high: bool = True) -> float:
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value < 1.0 if open_high else value <= 1.0
    if not (math.isfinite(value) and low_ok and high_ok):
        low, high = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{what} must be within {low}0, 1{high}, got {value!r}")
    return float(value)


def _name(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an arm's name must be a non-empty string, got {value!r}")
    return value


def _split(names: Sequence[str], control: str | None) -> int:
    """The index of the control among unique arm names (the first arm when ``control`` is None)."""
    if len(names) < 2:
        raise ValueError("an analysis needs a control and at least one variant")
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {list(names)}")
    if control is None:
        return 0
    if control not in names:
        raise ValueError(f"control {control!r} is not one of the arms {list(names)}")
    return names.index(control)


def _draws(draws: int) -> int:
    count = _count(draws, "draws")
    if count < 100:
        raise ValueError(f"draws must be at least 100, got {count}")
    return count


# ---------------------------------------------------------------- binary metrics


@dataclass(frozen=True, slots=True)
class BetaPrior:
    """The prior of every arm's conversion rate: ``Beta(alpha, beta)`` (default uniform)."""

    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta) and self.alpha > 0 and self.beta > 0):
            raise ValueError(f"a Beta prior needs positive finite parameters, got ({self.alpha}, {self.beta})")


@dataclass(frozen=True, slots=True)
class BinaryArm:
    """One arm of a binary metric: ``conversions`` of its ``exposures`` users converted."""

    name: str
    exposures: int
    conversions: int

    def __post_init__(self) -> None:
        _name(self.name)
        exposures = _count(self.exposures, f"{self.name}: exposures")
        conversions = _count(self.conversions, f"{self.name}: conversions")
        if conversions > exposures:
            raise ValueError(f"{self.name}: conversions ({conversions}) exceed exposures ({exposures})")
        object.__setattr__(self, "exposures", exposures)
        object.__setattr__(self, "conversions", conversions)

    @property
    def rate(self) -> float:
        """The observed conversion rate (0 without exposures)."""
        return self.conversions / self.exposures if self.exposures else 0.0


@dataclass(frozen=True, slots=True)
class BetaPosterior:
    """``Beta(alpha, beta)``: an arm's conversion rate after its data."""

    alpha: float
    beta: float

    @classmethod
    def of(cls, arm: BinaryArm, prior: BetaPrior = BetaPrior()) -> BetaPosterior:
        return cls(prior.alpha + arm.conversions, prior.beta + arm.exposures - arm.conversions)

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def variance(self) -> float:
        total = self.alpha + self.beta
        return self.alpha * self.beta / (total * total * (total + 1.0))


@dataclass(frozen=True, slots=True)
class BinaryArmResult:
    """An arm of a binary analysis: its data, its posterior and its chance to be the best arm."""

    name: str
    exposures: int
    conversions: int
    posterior: BetaPosterior
    chance_to_be_best: float


@dataclass(frozen=True, slots=True)
class BinaryComparison:
    """One variant against the control on a binary metric (higher is better)."""

    control: str
    variant: str
    control_mean: float
    variant_mean: float
    chance_to_beat_control: float
    """``P(p_v > p_c)``."""
    expected_loss: float
    """Of choosing the variant: ``E[max(p_c - p_v, 0)]`` (absolute rate)."""
    expected_loss_control: float
    """Of keeping the control: ``E[max(p_v - p_c, 0)]``."""
    uplift_mean: float
    """Posterior mean of the relative uplift ``(p_v - p_c) / p_c``."""
    uplift_interval: tuple[float, float]
    """Equal-tailed credible interval of the relative uplift (``credibility`` of the analysis)."""


@dataclass(frozen=True, slots=True)
class BinaryAnalysis:
    """A binary metric's analysis: every arm, and every variant against the control."""

    control: str
    arms: tuple[BinaryArmResult, ...]
    comparisons: tuple[BinaryComparison, ...]
    prior: BetaPrior
    draws: int
    seed: int
    credibility: float

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(c.variant for c in self.comparisons)

    def arm(self, name: str) -> BinaryArmResult:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def comparison(self, variant: str) -> BinaryComparison:
        for comparison in self.comparisons:
            if comparison.variant == variant:
                return comparison
        raise KeyError(variant)


def _posterior_draws(posteriors: Sequence[BetaPosterior], draws: int, seed: int) -> FloatArray:
    """``(draws, arms)`` samples of every arm's posterior, from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    alpha = np.array([p.alpha for p in posteriors], dtype=np.float64)
    beta = np.array([p.beta for p in posteriors], dtype=np.float64)
    return np.asarray(rng.beta(alpha, beta, size=(draws, len(posteriors))), dtype=np.float64)


def _quantiles(values: FloatArray, probabilities: Sequence[float]) -> tuple[float, ...]:
    """``numpy.quantile``'s default (linear interpolation between order statistics), without its overhead."""
    ordered = np.sort(values)
    last = ordered.size - 1
    out = []
    for q in probabilities:
        position = q * last
        low = min(math.floor(position), last)
        high = min(low + 1, last)
        out.append(float(ordered[low] + (position - low) * (ordered[high] - ordered[low])))
    return tuple(out)


def analyse_binary(
    arms: Sequence[BinaryArm],
    *,
    control: str | None = None,
    prior: BetaPrior = BetaPrior(),
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
    credibility: float = DEFAULT_CREDIBILITY,
) -> BinaryAnalysis:
    """Beta-binomial analysis of a binary metric by Monte Carlo (``draws`` samples per arm's posterior).

    ``control`` names the control arm (default: the first). Deterministic given ``seed``.
    """
    names = [_name(a.name) for a in arms]
    ci = _split(names, control)
    draws = _draws(draws)
    credibility = _probability(credibility, "credibility")
    posteriors = [BetaPosterior.of(a, prior) for a in arms]
    samples = _posterior_draws(posteriors, draws, seed)
    best = np.bincount(np.argmax(samples, axis=1), minlength=len(arms)) / draws
    results = tuple(
        BinaryArmResult(a.name, a.exposures, a.conversions, post, float(best[i]))
        for i, (a, post) in enumerate(zip(arms, posteriors, strict=True))
    )
    tail = (1.0 - credibility) / 2.0
    pc = samples[:, ci]
    comparisons = []
    for j, arm in enumerate(arms):
        if j == ci:
            continue
        diff = samples[:, j] - pc
        uplift = diff / pc
        low, high = _quantiles(uplift, (tail, 1.0 - tail))
        comparisons.append(
            BinaryComparison(
                control=names[ci],
                variant=arm.name,
                control_mean=posteriors[ci].mean,
                variant_mean=posteriors[j].mean,
                chance_to_beat_control=float(np.mean(diff > 0.0)),
                expected_loss=float(np.mean(np.maximum(-diff, 0.0))),
                expected_loss_control=float(np.mean(np.maximum(diff, 0.0))),
                uplift_mean=float(np.mean(uplift)),
                uplift_interval=(low, high),
            )
        )
    return BinaryAnalysis(names[ci], results, tuple(comparisons), prior, draws, seed, credibility)


@dataclass(frozen=True, slots=True)
class BinaryCheck:
    """A chance to beat and the two expected losses computed without Monte Carlo."""

    chance_to_beat_control: float
    expected_loss: float
    expected_loss_control: float


def binary_exact(control: BetaPosterior, variant: BetaPosterior) -> BinaryCheck:
    """The chance to beat and the expected losses by one-dimensional quadrature over the control's posterior.

    ``P(p_v > p_c) = ∫ f_c(x) S_v(x) dx`` and ``E[max(p_c - p_v, 0)] = ∫ f_c(x) (x F_v(x) - m_v F_v+(x)) dx``,
    where ``F_v+`` is the CDF of ``Beta(alpha_v + 1, beta_v)`` (since ``x f_v(x) = m_v f_v+(x)``); the loss of
    keeping the control is ``m_v - m_c`` plus the loss of choosing the variant.
    """
    c = stats.beta(control.alpha, control.beta)
    v = stats.beta(variant.alpha, variant.beta)
    v_plus = stats.beta(variant.alpha + 1.0, variant.beta)
    low, high = float(c.ppf(1e-12)), float(c.isf(1e-12))
    m_v = variant.mean

    def beat(x: float) -> float:
        return float(c.pdf(x) * v.sf(x))

    def loss(x: float) -> float:
        return float(c.pdf(x) * (x * v.cdf(x) - m_v * v_plus.cdf(x)))

    chance = float(integrate.quad(beat, low, high, limit=200, epsabs=1e-10)[0])
    expected_loss = max(float(integrate.quad(loss, low, high, limit=200, epsabs=1e-12)[0]), 0.0)
    return BinaryCheck(min(max(chance, 0.0), 1.0), expected_loss, max(m_v - control.mean + expected_loss, 0.0))


def binary_normal_approximation(control: BetaPosterior, variant: BetaPosterior) -> BinaryCheck:
    """The same figures with each posterior replaced by the normal of its mean and variance.

    With ``D = p_v - p_c ~ N(mu, s²)``: ``P(D > 0) = Φ(mu / s)``, ``E[max(-D, 0)] = s φ(mu / s) - mu Φ(-mu / s)``
    and ``E[max(D, 0)] = s φ(mu / s) + mu Φ(mu / s)``. Good once each arm has a few dozen conversions and
    non-conversions.
    """
    mu = variant.mean - control.mean
    s = math.sqrt(variant.variance + control.variance)
    z = mu / s
    density = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    above, below = float(special.ndtr(z)), float(special.ndtr(-z))  # the standard normal CDF (scipy.stats.norm.cdf)
    return BinaryCheck(above, s * density - mu * below, s * density + mu * above)


# ---------------------------------------------------------------- continuous metrics


@dataclass(frozen=True, slots=True)
class ContinuousArm:
    """One arm of a continuous metric: ``n`` users, their sample mean and sample variance (``ddof=1``)."""

    name: str
    n: int
    mean: float
    variance: float

    def __post_init__(self) -> None:
        _name(self.name)
        n = _count(self.n, f"{self.name}: n")
        if n < 2:
            raise ValueError(f"{self.name}: a continuous arm needs at least 2 values, got {n}")
        if not math.isfinite(self.mean):
            raise ValueError(f"{self.name}: the mean must be finite, got {self.mean!r}")
        if not (math.isfinite(self.variance) and self.variance >= 0.0):
            raise ValueError(f"{self.name}: the variance must be finite and not negative, got {self.variance!r}")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "variance", float(self.variance))

    @classmethod
    def from_values(cls, name: str, values: Iterable[float]) -> ContinuousArm:
        """The arm of a sequence of per-user values (sample variance with ``n - 1``)."""
        data = np.asarray(list(values), dtype=np.float64)
        if data.size < 2:
            raise ValueError(f"{name}: a continuous arm needs at least 2 values, got {data.size}")
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{name}: values must be finite")
        return cls(name, int(data.size), float(data.mean()), float(data.var(ddof=1)))

    @property
    def standard_error_squared(self) -> float:
        return self.variance / self.n


@dataclass(frozen=True, slots=True)
class ContinuousComparison:
    """One variant against the control on a continuous metric."""

    control: str
    variant: str
    control_mean: float
    variant_mean: float
    difference: float
    """``mean_v - mean_c``."""
    difference_interval: tuple[float, float]
    """Welch's t interval of the difference of means."""
    degrees_of_freedom: float
    """Welch-Satterthwaite."""
    p_value: float
    """Two-sided Welch t-test of no difference: fixed-horizon, not valid under peeking."""
    relative_difference: float | None
    """``mean_v / mean_c - 1`` (None when the control's mean is 0)."""
    relative_interval: tuple[float, float] | None
    """Delta-method interval of the relative difference (None when the control's mean is 0)."""
    chance_to_beat_control: float
    """``P(mu_v better than mu_c)`` with ``mu ~ N(mean, variance / n)`` per arm, in the metric's direction."""


@dataclass(frozen=True, slots=True)
class ContinuousAnalysis:
    control: str
    higher_is_better: bool
    confidence: float
    comparisons: tuple[ContinuousComparison, ...]

    def comparison(self, variant: str) -> ContinuousComparison:
        for comparison in self.comparisons:
            if comparison.variant == variant:
                return comparison
        raise KeyError(variant)


def _compare_continuous(
    c: ContinuousArm, v: ContinuousArm, higher_is_better: bool, confidence: float
) -> ContinuousComparison:
    d = v.mean - c.mean
    vc, vv = c.standard_error_squared, v.standard_error_squared
    se = math.sqrt(vc + vv)
    if se == 0.0:
        df = float(c.n + v.n - 2)
        interval = (d, d)
        p_value = 1.0 if d == 0.0 else 0.0
        chance = 0.5 if d == 0.0 else float(d > 0.0)
    else:
        df = (vc + vv) ** 2 / (vc * vc / (c.n - 1) + vv * vv / (v.n - 1))
        t = float(stats.t.ppf(0.5 + confidence / 2.0, df))
        interval = (d - t * se, d + t * se)
        p_value = float(2.0 * stats.t.sf(abs(d) / se, df))
        chance = float(stats.norm.cdf(d / se))
    if not higher_is_better:
        chance = 1.0 - chance
    relative: float | None = None
    relative_interval: tuple[float, float] | None = None
    if c.mean != 0.0:
        relative = v.mean / c.mean - 1.0
        se_rel = math.sqrt(vv / c.mean**2 + v.mean**2 * vc / c.mean**4)
        z = float(stats.norm.ppf(0.5 + confidence / 2.0))
        relative_interval = (relative - z * se_rel, relative + z * se_rel)
    return ContinuousComparison(
        c.name, v.name, c.mean, v.mean, d, interval, df, p_value, relative, relative_interval, chance
    )


def analyse_continuous(
    arms: Sequence[ContinuousArm],
    *,
    control: str | None = None,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> ContinuousAnalysis:
    """Welch and delta-method intervals, and the normal-posterior chance to beat, of every variant.

    ``higher_is_better=False`` for a metric such as time to activation: the chance to beat is then the
    probability that the variant's mean is lower. The intervals are of ``variant - control`` either way.
    """
    names = [_name(a.name) for a in arms]
    ci = _split(names, control)
    confidence = _probability(confidence, "confidence")
    comparisons = tuple(
        _compare_continuous(arms[ci], arm, higher_is_better, confidence) for j, arm in enumerate(arms) if j != ci
    )
    return ContinuousAnalysis(names[ci], higher_is_better, confidence, comparisons)


# ---------------------------------------------------------------- sample ratio mismatch


@dataclass(frozen=True, slots=True)
class SrmCheck:
    """Chi-square goodness of fit of the observed exposures to the configured traffic shares."""

    observed: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    degrees_of_freedom: int
    p_value: float
    threshold: float
    mismatch: bool
    """``p_value < threshold``: the allocation or the exposure logging is broken; no verdict stands."""


def sample_ratio_mismatch(
    observed: Sequence[int], shares: Sequence[float], *, threshold: float = DEFAULT_SRM_THRESHOLD
) -> SrmCheck:
    """Pearson's chi-square test of ``observed`` exposures per arm against ``shares`` (normalised to sum to 1).

    ``statistic = sum((O_i - E_i)² / E_i)`` with ``E_i = N s_i``, on ``arms - 1`` degrees of freedom.
    """
    counts = tuple(_count(o, "an observed exposure count") for o in observed)
    if len(counts) < 2 or len(counts) != len(shares):
        raise ValueError(
            f"need one share per arm and at least two arms, got {len(counts)} counts, {len(shares)} shares"
        )
    if not all(math.isfinite(s) and s > 0.0 for s in shares):
        raise ValueError(f"traffic shares must be positive and finite, got {list(shares)}")
    threshold = _probability(threshold, "the SRM threshold")
    total_share = math.fsum(shares)
    n = sum(counts)
    expected = tuple(n * s / total_share for s in shares)
    df = len(counts) - 1
    if n == 0:
        return SrmCheck(counts, expected, 0.0, df, 1.0, threshold, False)
    statistic = math.fsum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))
    p_value = float(special.chdtrc(df, statistic))  # the chi-square survival function (scipy.stats.chi2.sf)
    return SrmCheck(counts, expected, statistic, df, p_value, threshold, p_value < threshold)


# ---------------------------------------------------------------- sequential monitoring (mSPRT)


@dataclass(frozen=True, slots=True)
class SequentialTest:
    """The mSPRT of one variant against the control after a look (counts are cumulative)."""

    control: str
    variant: str
    control_exposures: int
    control_conversions: int
    variant_exposures: int
    variant_conversions: int
    looks: int
    difference: float
    """``p̂_v - p̂_c`` at this look."""
    variance: float
    """``V_n = p̂_c (1 - p̂_c) / n_c + p̂_v (1 - p̂_v) / n_v``."""
    log_likelihood_ratio: float
    """``log Λ_n`` of no difference at this look."""
    p_value: float
    """Always-valid p-value: ``min(p_{n-1}, 1 / Λ_n)``, monotone over looks."""
    confidence_sequence: tuple[float, float]
    """Always-valid ``1 - alpha`` confidence sequence of the difference (running intersection over looks)."""
    tau2: float
    alpha: float


def msprt_log_likelihood_ratio(difference: float, variance: float, tau2: float, theta0: float = 0.0) -> float:
    """``log Λ_n`` of the normal-mixture SPRT with ``H0: Δ = theta0`` and mixing ``Δ ~ N(theta0, tau2)``.

    ``Λ_n = sqrt(V / (V + tau2)) exp(tau2 (Δ̂ - theta0)² / (2 V (V + tau2)))`` for an estimate
    ``Δ̂ ~ N(Δ, V)``; no evidence (0) while ``V`` is 0.
    """
    if not (math.isfinite(tau2) and tau2 > 0.0):
        raise ValueError(f"tau2 must be positive and finite, got {tau2!r}")
    if variance <= 0.0:
        return 0.0
    total = variance + tau2
    return 0.5 * math.log(variance / total) + tau2 * (difference - theta0) ** 2 / (2.0 * variance * total)


def msprt_half_width(variance: float, tau2: float, alpha: float) -> float:
    """Half the width of the look's confidence interval: ``{θ: Λ_n(θ) < 1 / alpha}`` around ``Δ̂``."""
    if variance <= 0.0:
        return math.inf
    total = variance + tau2
    return math.sqrt(variance * total / tau2 * (2.0 * math.log(1.0 / alpha) + math.log(total / variance)))


def msprt(
    control: BinaryArm,
    variant: BinaryArm,
    *,
    previous: SequentialTest | None = None,
    tau2: float = DEFAULT_TAU2,
    alpha: float = 0.05,
) -> SequentialTest:
    """One look of the always-valid test of ``p_v = p_c``, from the cumulative counts of the two arms.

    Pass the previous look's result as ``previous`` (same arms, ``tau2`` and ``alpha``; counts never
    decrease) so the p-value is the running minimum and the confidence sequence the running intersection.
    """
    if not (math.isfinite(tau2) and tau2 > 0.0):
        raise ValueError(f"tau2 must be positive and finite, got {tau2!r}")
    alpha = _probability(alpha, "alpha")
    if control.name == variant.name:
        raise ValueError("the control and the variant must be different arms")
    if previous is not None:
        if (previous.control, previous.variant) != (control.name, variant.name):
            raise ValueError(
                f"previous look is of {previous.variant!r} against {previous.control!r}, "
                f"not {variant.name!r} against {control.name!r}"
            )
        if (previous.tau2, previous.alpha) != (tau2, alpha):
            raise ValueError("tau2 and alpha must not change between looks")
        before = (
            previous.control_exposures,
            previous.control_conversions,
            previous.variant_exposures,
            previous.variant_conversions,
        )
        now = (control.exposures, control.conversions, variant.exposures, variant.conversions)
        if any(b > a for b, a in zip(before, now, strict=True)):
            raise ValueError(f"cumulative counts cannot decrease between looks: {before} then {now}")
    if control.exposures and variant.exposures:
        pc, pv = control.rate, variant.rate
        difference = pv - pc
        variance = pc * (1.0 - pc) / control.exposures + pv * (1.0 - pv) / variant.exposures
    else:
        difference, variance = 0.0, 0.0
    log_lr = msprt_log_likelihood_ratio(difference, variance, tau2)
    p_now = math.exp(-log_lr) if log_lr > 0.0 else 1.0
    if previous is None:
        p_before, (low_before, high_before) = 1.0, (-1.0, 1.0)
    else:
        p_before, (low_before, high_before) = previous.p_value, previous.confidence_sequence
    half = msprt_half_width(variance, tau2, alpha)
    low, high = max(low_before, difference - half), min(high_before, difference + half)
    if low > high:  # only when the assumptions fail (an effect that changes): report this look's interval
        low, high = difference - half, difference + half
    return SequentialTest(
        control=control.name,
        variant=variant.name,
        control_exposures=control.exposures,
        control_conversions=control.conversions,
        variant_exposures=variant.exposures,
        variant_conversions=variant.conversions,
        looks=1 if previous is None else previous.looks + 1,
        difference=difference,
        variance=variance,
        log_likelihood_ratio=log_lr,
        p_value=min(p_before, p_now),
        confidence_sequence=(low, high),
        tau2=tau2,
        alpha=alpha,
    )


def msprt_looks(
    looks: Iterable[tuple[BinaryArm, BinaryArm]], *, tau2: float = DEFAULT_TAU2, alpha: float = 0.05
) -> tuple[SequentialTest, ...]:
    """The test after each of a series of looks (``(control, variant)`` cumulative counts per look)."""
    results: list[SequentialTest] = []
    for control, variant in looks:
        results.append(msprt(control, variant, previous=results[-1] if results else None, tau2=tau2, alpha=alpha))
    return tuple(results)


# ---------------------------------------------------------------- guardrails


@dataclass(frozen=True, slots=True)
class GuardrailComparison:
    """One variant against the control on a guardrail (a rate where higher is worse)."""

    variant: str
    control_rate: float
    """Posterior mean."""
    variant_rate: float
    probability_worse: float
    """``P(p_v - p_c > tolerance)``."""


@dataclass(frozen=True, slots=True)
class GuardrailAnalysis:
    name: str
    control: str
    tolerance: float
    comparisons: tuple[GuardrailComparison, ...]

    def comparison(self, variant: str) -> GuardrailComparison:
        for comparison in self.comparisons:
            if comparison.variant == variant:
                return comparison
        raise KeyError(variant)

    def vetoes(self, variant: str, threshold: float) -> bool:
        """Whether the guardrail vetoes ``variant``: ``P(worse by more than the tolerance) >= threshold``."""
        return self.comparison(variant).probability_worse >= threshold


def analyse_guardrail(
    name: str,
    arms: Sequence[BinaryArm],
    *,
    tolerance: float,
    control: str | None = None,
    prior: BetaPrior = BetaPrior(),
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
) -> GuardrailAnalysis:
    """The probability that each variant raises the guardrail's rate by more than ``tolerance`` (absolute).

    ``arms`` count, per arm, the users exposed and those who hit the guardrail event (got stuck,
    unsubscribed from nudges). Beta-binomial posteriors, Monte Carlo as :func:`analyse_binary`.
    """
    if not name:
        raise ValueError("a guardrail needs a name")
    if not (math.isfinite(tolerance) and 0.0 <= tolerance < 1.0):
        raise ValueError(f"{name}: tolerance must be within [0, 1), got {tolerance!r}")
    names = [_name(a.name) for a in arms]
    ci = _split(names, control)
    draws = _draws(draws)
    posteriors = [BetaPosterior.of(a, prior) for a in arms]
    samples = _posterior_draws(posteriors, draws, seed)
    comparisons = tuple(
        GuardrailComparison(
            variant=arm.name,
            control_rate=posteriors[ci].mean,
            variant_rate=posteriors[j].mean,
            probability_worse=float(np.mean(samples[:, j] - samples[:, ci] > tolerance)),
        )
        for j, arm in enumerate(arms)
        if j != ci
    )
    return GuardrailAnalysis(name, names[ci], float(tolerance), comparisons)


# ---------------------------------------------------------------- the decision


class VerdictKind(enum.StrEnum):
    WINNER = "winner"
    NO_WINNER_YET = "no_winner_yet"
    SRM = "srm"
    VETOED = "vetoed"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    """The thresholds of the decision rule (docs/experiments.md#statistics)."""

    chance_to_beat: float = 0.95
    """A winner's chance to beat the control is at least this."""
    expected_loss: float = 0.001
    """A winner's expected loss (absolute rate) is at most this."""
    alpha: float = 0.05
    """The family-wise false-winner rate: each of ``m`` variants needs its always-valid p-value ``<= alpha / m``."""
    srm_threshold: float = DEFAULT_SRM_THRESHOLD
    """An SRM p-value below this blocks every verdict."""
    guardrail_veto: float = 0.9
    """A guardrail vetoes a variant it is at least this likely to worsen by more than its tolerance."""

    def __post_init__(self) -> None:
        _probability(self.chance_to_beat, "chance_to_beat", open_high=False)
        if not (math.isfinite(self.expected_loss) and self.expected_loss >= 0.0):
            raise ValueError(f"expected_loss must be finite and not negative, got {self.expected_loss!r}")
        _probability(self.alpha, "alpha", open_high=False)
        _probability(self.srm_threshold, "srm_threshold", open_low=False)
        _probability(self.guardrail_veto, "guardrail_veto", open_high=False)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    variant: str | None = None
    """The winner, or the best variant a guardrail vetoed."""
    guardrails: tuple[str, ...] = ()
    """The guardrails that vetoed ``variant``."""
    reasons: tuple[str, ...] = ()


def decide(
    primary: BinaryAnalysis,
    sequential: Sequence[SequentialTest],
    srm: SrmCheck,
    guardrails: Sequence[GuardrailAnalysis] = (),
    config: DecisionConfig = DecisionConfig(),
) -> Verdict:
    """The verdict of one look.

    1. An SRM (``srm.p_value < config.srm_threshold``) blocks everything: ``srm``.
    2. A variant is *eligible* when its chance to beat the control is ``>= config.chance_to_beat``, its
       expected loss ``<= config.expected_loss``, its always-valid p-value ``<= config.alpha / m`` (``m``
       variants) and its observed difference is positive. The Bayesian figures alone are not
       error-controlled under peeking; the sequential test is what bounds the false-winner rate.
    3. An eligible variant that a guardrail vetoes (``probability_worse >= config.guardrail_veto``) cannot win.
    4. The eligible, unvetoed variant with the largest chance to be best is the ``winner``; if every eligible
       variant is vetoed, the verdict is ``vetoed`` (the best of them and its guardrails); if none is
       eligible, ``no_winner_yet``.
    """
    tests = {t.variant: t for t in sequential}
    variants = primary.variants
    for variant in variants:
        test = tests.get(variant)
        if test is None:
            raise ValueError(f"no sequential test of variant {variant!r}")
        if test.control != primary.control:
            raise ValueError(f"the sequential test of {variant!r} is against {test.control!r}, not {primary.control!r}")
        for guardrail in guardrails:
            if guardrail.control != primary.control:
                raise ValueError(f"guardrail {guardrail.name!r} has control {guardrail.control!r}")
            if variant not in {c.variant for c in guardrail.comparisons}:
                raise ValueError(f"guardrail {guardrail.name!r} does not compare variant {variant!r}")
    if srm.p_value < config.srm_threshold:
        return Verdict(
            VerdictKind.SRM,
            reasons=(
                f"sample ratio mismatch: chi-square {srm.statistic:.2f} on {srm.degrees_of_freedom} df, "
                f"p = {srm.p_value:.2g} < {config.srm_threshold:g} (observed {list(srm.observed)}); no verdict stands",
            ),
        )
    per_variant_alpha = config.alpha / len(variants)
    reasons: list[str] = []
    eligible: list[str] = []
    for variant in variants:
        comparison = primary.comparison(variant)
        test = tests[variant]
        failed = []
        if comparison.chance_to_beat_control < config.chance_to_beat:
            failed.append(f"chance to beat {comparison.chance_to_beat_control:.4f} < {config.chance_to_beat:g}")
        if comparison.expected_loss > config.expected_loss:
            failed.append(f"expected loss {comparison.expected_loss:.5f} > {config.expected_loss:g}")
        if test.p_value > per_variant_alpha:
            failed.append(f"sequential p {test.p_value:.4f} > {per_variant_alpha:.4g}")
        if test.difference <= 0.0:
            failed.append(f"observed difference {test.difference:+.4f} is not positive")
        if failed:
            reasons.append(f"{variant}: " + "; ".join(failed))
        else:
            eligible.append(variant)
    if not eligible:
        return Verdict(VerdictKind.NO_WINNER_YET, reasons=tuple(reasons))
    vetoes: dict[str, list[str]] = {}
    for variant in eligible:
        for guardrail in guardrails:
            if guardrail.vetoes(variant, config.guardrail_veto):
                vetoes.setdefault(variant, []).append(guardrail.name)
                worse = guardrail.comparison(variant).probability_worse
                reasons.append(
                    f"{variant}: guardrail {guardrail.name} is worse by more than {guardrail.tolerance:g} "
                    f"with probability {worse:.4f} >= {config.guardrail_veto:g}"
                )
    unvetoed = [v for v in eligible if v not in vetoes]

    def best(candidates: list[str]) -> str:
        return max(candidates, key=lambda v: primary.arm(v).chance_to_be_best)

    if unvetoed:
        winner = best(unvetoed)
        c, t = primary.comparison(winner), tests[winner]
        reasons.append(
            f"{winner}: chance to beat {c.chance_to_beat_control:.4f}, expected loss {c.expected_loss:.5f}, "
            f"sequential p {t.p_value:.4f} <= {per_variant_alpha:.4g}"
        )
        return Verdict(VerdictKind.WINNER, winner, reasons=tuple(reasons))
    vetoed = best(eligible)
    return Verdict(VerdictKind.VETOED, vetoed, tuple(vetoes[vetoed]), tuple(reasons))


# ---------------------------------------------------------------- the extension rule


class Action(enum.StrEnum):
    CONTINUE = "continue"
    EXTEND = "extend"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class ExtensionPolicy:
    """Low confidence at the planned end extends the experiment, a bounded number of times."""

    planned_days: int
    extension_days: int = 7
    max_extensions: int = 2

    def __post_init__(self) -> None:
        if _count(self.planned_days, "planned_days") < 1 or _count(self.extension_days, "extension_days") < 1:
            raise ValueError("planned_days and extension_days must be positive")
        _count(self.max_extensions, "max_extensions")

    def end_day(self, extensions: int) -> int:
        return self.planned_days + extensions * self.extension_days


@dataclass(frozen=True, slots=True)
class Review:
    action: Action
    verdict: Verdict
    end_day: int
    """The day the experiment is now planned to end."""
    extensions: int
    """Extensions granted so far, this review's included."""


def review(verdict: Verdict, *, day: int, extensions: int, policy: ExtensionPolicy) -> Review:
    """What to do with the experiment after the verdict of ``day`` (days since its start).

    A ``winner``, ``srm``, ``vetoed`` or ``inconclusive`` verdict stops it. ``no_winner_yet`` before the
    current end continues; at the end it extends by ``extension_days`` while fewer than ``max_extensions``
    were granted, and otherwise stops with ``inconclusive``.
    """
    day = _count(day, "day")
    extensions = _count(extensions, "extensions")
    if extensions > policy.max_extensions:
        raise ValueError(f"extensions ({extensions}) exceed max_extensions ({policy.max_extensions})")
    end = policy.end_day(extensions)
    if verdict.kind is not VerdictKind.NO_WINNER_YET:
        return Review(Action.STOP, verdict, end, extensions)
    if day < end:
        return Review(Action.CONTINUE, verdict, end, extensions)
    if extensions < policy.max_extensions:
        return Review(Action.EXTEND, verdict, policy.end_day(extensions + 1), extensions + 1)
    reason = f"no winner after {day} days and {extensions} extension(s) of {policy.extension_days} days"
    return Review(Action.STOP, Verdict(VerdictKind.INCONCLUSIVE, reasons=(*verdict.reasons, reason)), end, extensions)
