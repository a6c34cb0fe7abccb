"""Off-policy evaluation: what a *target* policy would have achieved on decisions a *logging* policy made.

Pure numpy. Each logged decision ``i`` has the user's action (path index) ``a_i``, its reward
``r_i`` (activation within the horizon: 0 or 1, any finite number works), and the propensity
``p_i = mu(a_i | x_i)``, the probability with which the logging policy chose it (the platform records
it on every decision: ``decision.propensity``). The target policy is given as the probability
matrix ``pi[i, a]`` of each action for each logged user (:func:`policy_probabilities` builds it from a
model's scores). With importance weights ``w_i = pi(a_i | x_i) / p_i``:

* **IPS** (inverse propensity scoring): ``V = mean(w_i r_i)``; unbiased whenever every action the
  target may take had a positive logging probability (``pi > 0`` only where ``mu > 0``).
* **SNIPS** (self-normalised IPS): ``V = sum(w_i r_i) / sum(w_i)``; a little biased, consistent, never
  outside the range of the rewards, and of lower variance when weights are large.
* **DR** (doubly robust): with a reward model's predictions ``q[i, a]`` (expected reward of each action
  for user ``i``), ``V = mean(sum_a pi[i, a] q[i, a] + w_i (r_i - q[i, a_i]))``: unbiased if either the
  propensities or the reward model are right, and of lower variance than IPS when the model is decent.

Each estimate comes with a confidence interval: the normal approximation ``V +/- z se`` with ``se`` the
sample standard deviation of the per-decision terms over ``sqrt(n)`` (for SNIPS, the terms of its
linearisation ``w_i (r_i - V) / mean(w)``), or, on request, a percentile bootstrap over decisions. The
effective sample size is Kish's ``(sum w)^2 / sum w^2``: how many on-policy decisions the logged ones are
worth for this target; a small one means a wide, fragile interval.

The estimators are validated on the simulator, where every policy's true value is known
(:mod:`firstmile_inference.ope_study`, docs/models.md#off-policy-evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Estimate",
    "doubly_robust",
    "effective_sample_size",
    "evaluate_policy",
    "ips",
    "policy_probabilities",
    "snips",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
Estimator = Literal["ips", "snips", "dr"]

ROW_SUM_TOLERANCE: Final = 1e-6
_BOOTSTRAP_CELLS: Final = 4_000_000  # resampled indices held at once (memory bound of the bootstrap)


@dataclass(frozen=True)
class Estimate:
    """An off-policy estimate of a target policy's mean reward, with its interval."""

    estimator: Estimator
    value: float
    standard_error: float
    low: float
    high: float
    level: float  # the interval's nominal coverage, e.g. 0.95
    interval: Literal["normal", "bootstrap"]
    n: int  # logged decisions used
    effective_sample_size: float  # Kish's (sum w)^2 / sum w^2 of the importance weights
    max_weight: float

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies in the interval (bounds included)."""
        return self.low <= value <= self.high

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- input validation
def _vector(name: str, values: ArrayLike) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, one value per logged decision (shape {array.shape})")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} must be finite numbers: {name}[{bad[0]}] = {array[bad[0]]}")
    return array


def _matrix(name: str, values: ArrayLike, n: int) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] < 1:
        raise ValueError(f"{name} must have shape (decisions, actions) = ({n}, K), not {array.shape}")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        i, a = bad[0]
        raise ValueError(f"{name} must be finite numbers: {name}[{i}, {a}] = {array[i, a]}")
    return array


def _inputs(
    actions: ArrayLike, rewards: ArrayLike, propensities: ArrayLike, target: ArrayLike, level: float, bootstrap: int
) -> tuple[IntArray, FloatArray, FloatArray, FloatArray]:
    raw_actions = np.asarray(actions)
    if raw_actions.ndim != 1:
        raise ValueError(f"actions must be one-dimensional, one action index per decision (shape {raw_actions.shape})")
    if raw_actions.size and not np.issubdtype(raw_actions.dtype, np.integer):
        raise ValueError(f"actions must be integer indices into the target's columns, not {raw_actions.dtype}")
    a = raw_actions.astype(np.int64)
    r = _vector("rewards", rewards)
    p = _vector("propensities", propensities)
    n = a.size
    if r.size != n or p.size != n:
        raise ValueError(f"lengths differ: {n} actions, {r.size} rewards, {p.size} propensities")
    if n < 2:
        raise ValueError(f"at least 2 logged decisions are needed for an interval, got {n}")
    bad = np.flatnonzero((p <= 0.0) | (p > 1.0))
    if bad.size:
        raise ValueError(f"propensities must be in (0, 1]: propensities[{bad[0]}] = {p[bad[0]]}")
    pi = _matrix("target", target, n)
    k = pi.shape[1]
    bad = np.flatnonzero((a < 0) | (a >= k))
    if bad.size:
        raise ValueError(f"actions must index the target's {k} columns: actions[{bad[0]}] = {a[bad[0]]}")
    bad_cells = np.argwhere((pi < 0.0) | (pi > 1.0))
    if bad_cells.size:
        i, j = bad_cells[0]
        raise ValueError(f"target probabilities must be in [0, 1]: target[{i}, {j}] = {pi[i, j]}")
    sums = pi.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(f"each row of target must sum to 1: row {bad[0]} sums to {sums[bad[0]]}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, not {level}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (normal interval) or a number of resamples, not {bootstrap}")
    return a, r, p, pi


def _weights(a: IntArray, p: FloatArray, pi: FloatArray) -> FloatArray:
    return np.asarray(pi[np.arange(a.size), a] / p, dtype=np.float64)


def effective_sample_size(weights: ArrayLike) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of importance weights (0 when all are 0)."""
    w = _vector("weights", weights)
    if np.any(w < 0):
        raise ValueError("importance weights cannot be negative")
    squares = float(np.dot(w, w))
    return float(w.sum() ** 2 / squares) if squares > 0 else 0.0


# ---------------------------------------------------------------- intervals
def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _resampled_means(values: FloatArray, bootstrap: int, rng: np.random.Generator) -> FloatArray:
    """Means of ``values``' columns over ``bootstrap`` resamples of its rows (with replacement)."""
    n = values.shape[0]
    out = np.empty((bootstrap, values.shape[1]), dtype=np.float64)
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, bootstrap, chunk):
        stop = min(bootstrap, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _estimate(
    estimator: Estimator,
    value: float,
    terms: FloatArray,
    weights: FloatArray,
    level: float,
    replicates: FloatArray | None,
) -> Estimate:
    n = terms.size
    if replicates is None:
        se = float(np.std(terms, ddof=1) / np.sqrt(n))
        half = _z(level) * se
        low, high, interval = value - half, value + half, "normal"
    else:
        se = float(np.std(replicates, ddof=1))
        alpha = 1.0 - level
        low, high = (float(q) for q in np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0]))
        interval = "bootstrap"
    return Estimate(
        estimator=estimator,
        value=value,
        standard_error=se,
        low=low,
        high=high,
        level=level,
        interval=interval,  # type: ignore[arg-type]
        n=n,
        effective_sample_size=effective_sample_size(weights),
        max_weight=float(weights.max()),
    )


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------- estimators
def ips(
    actions: ArrayLike,
    rewards: ArrayLike,
    propensities: ArrayLike,
    target: ArrayLike,
    *,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int | np.random.Generator | None = None,
) -> Estimate:
    """Inverse propensity scoring: ``mean(pi(a_i|x_i) / p_i * r_i)``.

    ``actions`` (n,) action indices, ``rewards`` (n,), ``propensities`` (n,) in (0, 1], ``target`` (n, K)
    the target policy's probabilities (rows sum to 1). ``bootstrap`` > 0: a percentile bootstrap interval
    over that many resamples (``seed`` makes it reproducible) instead of the normal one.
    """
    a, r, p, pi = _inputs(actions, rewards, propensities, target, level, bootstrap)
    w = _weights(a, p, pi)
    terms = w * r
    replicates = _resampled_means(terms[:, None], bootstrap, _rng(seed))[:, 0] if bootstrap else None
    return _estimate("ips", float(terms.mean()), terms, w, level, replicates)


def snips(
    actions: ArrayLike,
    rewards: ArrayLike,
    propensities: ArrayLike,
    target: ArrayLike,
    *,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int | np.random.Generator | None = None,
) -> Estimate:
    """Self-normalised IPS: ``sum(w_i r_i) / sum(w_i)``; arguments as :func:`ips`.

    Refused when the target gives probability 0 to every logged action (nothing to normalise by).
    """
    a, r, p, pi = _inputs(actions, rewards, propensities, target, level, bootstrap)
    w = _weights(a, p, pi)
    mean_w = float(w.mean())
    if mean_w <= 0.0:
        raise ValueError("the target policy gives probability 0 to every logged action: no overlap to evaluate")
    value = float(np.dot(w, r) / w.sum())
    terms = w * (r - value) / mean_w  # the linearisation (delta method) of the ratio
    replicates = None
    if bootstrap:
        sums = _resampled_means(np.stack([w * r, w], axis=1), bootstrap, _rng(seed))
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = sums[:, 0] / sums[:, 1]
        replicates = ratios[np.isfinite(ratios)]  # a resample with no weight at all has no ratio
        if replicates.size < 2:
            raise ValueError("too few bootstrap resamples overlap the target policy: log more decisions")
    return _estimate("snips", value, terms, w, level, replicates)


def doubly_robust(
    actions: ArrayLike,
    rewards: ArrayLike,
    propensities: ArrayLike,
    target: ArrayLike,
    predictions: ArrayLike,
    *,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int | np.random.Generator | None = None,
) -> Estimate:
    """Doubly robust: ``mean(sum_a pi[i, a] q[i, a] + w_i (r_i - q[i, a_i]))``.

    ``predictions`` (n, K): a reward model's expected reward of every action for each logged user (for
    activation, predicted activation probabilities); the other arguments as :func:`ips`.
    """
    a, r, p, pi = _inputs(actions, rewards, propensities, target, level, bootstrap)
    q = _matrix("predictions", predictions, a.size)
    if q.shape != pi.shape:
        raise ValueError(f"predictions and target differ in shape: {q.shape} vs {pi.shape}")
    w = _weights(a, p, pi)
    rows = np.arange(a.size)
    terms = (pi * q).sum(axis=1) + w * (r - q[rows, a])
    replicates = _resampled_means(terms[:, None], bootstrap, _rng(seed))[:, 0] if bootstrap else None
    return _estimate("dr", float(terms.mean()), terms, w, level, replicates)


def evaluate_policy(
    actions: ArrayLike,
    rewards: ArrayLike,
    propensities: ArrayLike,
    target: ArrayLike,
    predictions: ArrayLike | None = None,
    *,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int | np.random.Generator | None = None,
) -> dict[str, Estimate]:
    """IPS, SNIPS and (given a reward model's ``predictions``) DR of one target policy, by estimator name."""
    out = {
        "ips": ips(actions, rewards, propensities, target, level=level, bootstrap=bootstrap, seed=seed),
        "snips": snips(actions, rewards, propensities, target, level=level, bootstrap=bootstrap, seed=seed),
    }
    if predictions is not None:
        out["dr"] = doubly_robust(
            actions, rewards, propensities, target, predictions, level=level, bootstrap=bootstrap, seed=seed
        )
    return out


# ---------------------------------------------------------------- target policies
def policy_probabilities(scores: ArrayLike, eligible: ArrayLike | None = None, epsilon: float = 0.0) -> FloatArray:
    """The (n, K) action probabilities of the policy that picks the highest-scoring eligible action.

    ``scores`` (n, K): a model's scores (e.g. predicted activation per path); ``eligible`` (n, K) booleans:
    the actions the policy may take for each user (default: all; each row needs at least one); scores of
    ineligible actions are ignored and may be NaN. Ties go to the first action. ``epsilon`` > 0 makes it
    epsilon-greedy as the platform's planner explores: ``epsilon / K_i`` on each of the ``K_i`` eligible
    actions, plus ``1 - epsilon`` on the greedy one.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"scores must have shape (users, actions), not {s.shape}")
    if eligible is None:
        allowed = np.ones(s.shape, dtype=np.bool_)
    else:
        allowed = np.asarray(eligible)
        if allowed.dtype != np.bool_:
            raise ValueError(f"eligible must be booleans, not {allowed.dtype}")
        if allowed.shape != s.shape:
            raise ValueError(f"eligible and scores differ in shape: {allowed.shape} vs {s.shape}")
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"every user needs at least one eligible action: row {empty[0]} has none")
    bad = np.argwhere(allowed & ~np.isfinite(s))
    if bad.size:
        i, a = bad[0]
        raise ValueError(f"scores of eligible actions must be finite: scores[{i}, {a}] = {s[i, a]}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], not {epsilon}")
    masked = np.where(allowed, s, -np.inf)
    greedy = np.argmax(masked, axis=1)
    k = allowed.sum(axis=1, keepdims=True)
    out = np.where(allowed, epsilon / k, 0.0)
    out[np.arange(s.shape[0]), greedy] += 1.0 - epsilon
    return np.asarray(out, dtype=np.float64)
