"""The best stuck detection and nudge AUC that the features allow: estimates of the feature-only ceilings.

Issue 19 asks for stuck precision >= 95% at a recall no lower than 78.6% and for a nudge AUC >= 0.80. Both
labels depend on things no feature reveals (``simulate``'s docstring: the latent skill and motivation, whether
the user committed, the episode the user is in, a per-user responsiveness), so no model reaches the scores of
the simulator's own probabilities. The best *feature-only* score is that of ``E[label | features]``. It is
estimated here as :mod:`~firstmile_inference.ceiling` does for paths: the production model's encoder and
network, trained with *full information*, i.e. each training row's exact probability of its label given the
latent state instead of its 0/1 outcome. The conditional expectation of that target given the features is
``E[label | features]`` as well, with far less noise, so only finite data and capacity separate the network
from the Bayes-optimal feature-only score, and its held-out score (on the held-out *outcomes*) estimates the
ceiling from below.

* Nudges: the target is :attr:`~firstmile_inference.simulate.Dataset.nudge_probability`, the probability the
  simulator draws each response from (motivation and responsiveness included).
* Stuck: the label (no step completion within 48 h of the snapshot, or never) has no closed form, so
  :func:`stuck_probability` computes it by importance sampling. Given the user's latents, whether they
  committed and the step they would give up at, the session up to the current step's start and the snapshot
  time, it weighs every way the current step's episode can go (its kind, duration and visits: the likelihood
  of the visits seen so far, in closed form given the episode's parameters) and how the rest of the path goes
  (a snapshot time is uniform up to the end of the path, so a path that ends sooner makes a given snapshot
  time likelier). ``samples`` quasi-random draws per episode kind and scenario.

Beside each full-information model the production recipe (:func:`~firstmile_inference.train.train_stuck_detector`,
:func:`~firstmile_inference.train.train_nudge_response_predictor`, labels) is trained on the same data and
scored on the same held-out sets. Nothing is tuned on the held-out sets (their seeds go through
:func:`~firstmile_inference.seed_study.check_heldout_seeds`).

    python -m firstmile_inference.feature_ceiling --train-seeds 7,8,9,10,11 --heldout-seeds 1007,1008,1009
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from firstmile_inference.features import Encoded, Encoder
from firstmile_inference.metrics import precision_recall, roc_auc, threshold_for_precision
from firstmile_inference.models import nudge_response_predictor as nudge_model
from firstmile_inference.models import stuck_detector as stuck_model
from firstmile_inference.models.network import TabularNet
from firstmile_inference.seed_study import (
    DEFAULT_HELDOUT_SEEDS,
    DEFAULT_TRAIN_SEEDS,
    DEFAULT_TRAIN_SESSIONS,
    GOAL_NUDGE_AUC,
    GOAL_STUCK_PRECISION,
    TODAY_STUCK_RECALL,
    SeedError,
    Spread,
    add_seed_arguments,
    check_heldout_seeds,
    print_json,
    say_on_stderr,
)
from firstmile_inference.simulate import SNAPSHOT_WINDOW_H, STUCK_HORIZON_H, Dataset, generate, step_logits
from firstmile_inference.train import (
    DEFAULT_HYPER,
    Hyper,
    _new_net,
    _split_sessions,
    simulate_training_set,
    train_nudge_response_predictor,
    train_stuck_detector,
)

FloatArray = NDArray[np.float64]
Progress = Callable[[str], None]

# Chosen on training seed 7's own validation split (the loss against the full-information targets), never on a
# held-out set: 16 epochs of a 128 x 128 x 64 network beat 8 or 16 epochs of 64 x 64 (the production size) and
# 16 of 128 x 128; 32 epochs gained nothing, and 32 epochs of 256 x 256 x 128 overfit.
FULL_INFORMATION_HYPER: Final = {
    "stuck_detector": Hyper(epochs=16, batch_size=1024, hidden=(128, 128, 64), weight_decay=0.0, val_fraction=0.2),
    "nudge_response_predictor": Hyper(epochs=16, batch_size=1024, hidden=(128, 128, 64), weight_decay=0.0),
}
DEFAULT_SAMPLES: Final = 64
CHUNK_ROWS: Final = 4096
_SNAPSHOT_SPAN: Final = SNAPSHOT_WINDOW_H - 0.25  # snapshots are uniform on [0.25, end of the path or 7 days]

# The episode model of simulate._simulate_sessions (its module docstring).
_PAUSE_BURST_H: Final = 0.3  # Exponential scale of the first burst of a pause
_PAUSE_GAP: Final = (math.log(30.0), 0.45)  # LogNormal of the silence
_PAUSE_RETURN_H: Final = 0.5  # Exponential scale of the return session
_PAUSE_RETURN_VISITS: Final = 2.0  # 1 + Poisson(2) visits in the return session
_RECOVER: Final = (math.log(60.0), 0.5)
_RECOVER_VISITS_PER_H: Final = 1.0 / 6.0
_STRUGGLE: Final = (math.log(20.0), 0.7)
_STRUGGLE_VISITS_PER_H: Final = 1.0 / 5.0
_STRUGGLE_SHARE: Final = 0.45
_SMOOTH_SIGMA: Final = 0.8


# ---------------------------------------------------------------- the stuck label's probability
def _ndtr(x: FloatArray) -> FloatArray:
    return np.asarray(torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy())


def _ndtri(p: FloatArray) -> FloatArray:
    return np.asarray(torch.special.ndtri(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy())


def _log(x: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.log(x), dtype=np.float64)


def _truncated_lognormal(
    mu: FloatArray, sigma: float, lo: FloatArray, hi: FloatArray, u: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Draws of LogNormal(mu, sigma) restricted to (lo, hi) by inverse CDF of ``u``, and the log of the prior mass
    of (lo, hi). Upper tails are drawn mirrored, so a tiny mass far in the tail keeps its precision."""
    with np.errstate(divide="ignore", invalid="ignore"):
        zlo = np.where(lo > 0, (_log(np.maximum(lo, 1e-300)) - mu) / sigma, -np.inf)
        zhi = np.where(np.isfinite(hi), (_log(np.maximum(hi, 1e-300)) - mu) / sigma, np.inf)
        upper = zlo > 0
        a_lo, a_hi = _ndtr(np.where(upper, -zhi, zlo)), _ndtr(np.where(upper, -zlo, zhi))
        mass = np.maximum(a_hi - a_lo, 0.0)
        w = _ndtri(np.clip(a_lo + u * mass, 1e-300, 1.0 - 1e-16))
        z = np.where(upper, -w, w)
        z = np.clip(z, zlo, zhi)
        value = np.exp(mu + sigma * z)
    return np.asarray(value, dtype=np.float64), _log(mass)


def _truncated_exponential(
    scale: float, lo: FloatArray, hi: FloatArray, u: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Draws of Exponential(scale) restricted to [lo, hi) (``hi`` may be inf), and the log of the prior mass."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        width = np.maximum(hi - lo, 0.0)
        keep = -np.expm1(-width / scale)  # P(x < hi | x >= lo)
        value = lo - scale * np.log1p(-u * keep)
        log_mass = -lo / scale + _log(keep)
    return np.asarray(value, dtype=np.float64), np.asarray(log_mass, dtype=np.float64)


def _exponential_mixture(
    scale: float, power: FloatArray, lo: FloatArray, hi: FloatArray, rng: np.random.Generator, samples: int
) -> tuple[FloatArray, FloatArray]:
    """Importance draws of an Exponential(``scale``) variable restricted to [lo, hi), for an integrand that also
    carries a factor ``x^-power`` (the density of visits spread over x hours), which the exponential alone samples
    badly when ``lo`` is small. Half the draws come from the restricted exponential, half from a density
    ``∝ x^-power`` on [lo, min(hi, lo + 10 scale)) (a random half per row, so the draws of two variables are
    independent); returns the draws and log(prior density / mixture density)."""
    n = lo.shape[0]
    half = samples // 2
    lo = np.maximum(np.broadcast_to(lo, (n, samples)), 1e-9)
    hi = np.broadcast_to(hi, (n, samples))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        keep = -np.expm1(-np.maximum(hi - lo, 0.0) / scale)
        from_exp = lo - scale * np.log1p(-_stratified(rng, n, samples) * keep)
        top = np.maximum(np.minimum(hi, lo + 10.0 * scale), lo)
        k = np.clip(np.broadcast_to(power, (n, samples)), 0.0, 8.0) - 1.0  # the power minus 1
        u = _stratified(rng, n, samples)
        one = np.abs(k) < 1e-9
        kk = np.where(one, 1.0, k)
        from_pow = np.where(one, lo * (top / lo) ** u, (lo ** (-kk) - u * (lo ** (-kk) - top ** (-kk))) ** (-1.0 / kk))
        # which draws come from which part: a random half per row, independent of any other variable's draws
        use_exp = rng.permuted(np.tile(np.arange(samples) < half, (n, 1)), axis=1)
        x = np.where(use_exp, from_exp, from_pow)
        q_exp = np.where(x < hi, np.exp(-(x - lo) / scale) / (scale * keep), 0.0)
        norm = np.where(one, np.log(top / lo), (lo ** (-kk) - top ** (-kk)) / kk)
        q_pow = np.where(x < top, x ** (-(k + 1.0)) / norm, 0.0)
        log_ratio = -x / scale - math.log(scale) - _log(0.5 * q_exp + 0.5 * q_pow)
    return np.asarray(x, dtype=np.float64), np.asarray(np.where(hi > lo, log_ratio, -np.inf), dtype=np.float64)


def _log_visits(m: FloatArray, a: FloatArray, span: FloatArray, rate: FloatArray) -> FloatArray:
    """Log density of seeing exactly the ``m`` visits (at given times) within the first ``a`` hours of an episode
    of ``span`` > ``a`` hours with 1 + Poisson(``rate``) visits uniform over it (ordered-tuple density):
    ``span^-m exp(-rate a / span) rate^(m-1) (m + rate (span - a) / span)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (
            -m * _log(span)
            - rate * a / span
            + (m - 1.0) * _log(rate)
            + _log(m + rate * np.maximum(span - a, 0.0) / span)
        )
    return np.asarray(np.where(span > a, out, -np.inf), dtype=np.float64)


@dataclass(frozen=True)
class _Rows:
    """Per snapshot, what the posterior needs (columns: one value per snapshot unless noted)."""

    a: FloatArray  # hours on the current step
    start: FloatArray  # the current step's start (hours from the session's start)
    m: FloatArray  # visits seen within the current step so far
    first: FloatArray  # (rows, 4): the first four visit offsets, nan-padded
    last: FloatArray  # the latest visit offset (nan when none)
    p_done: FloatArray  # P(the current step completes | latents, committed, fail_at)
    q_pause: FloatArray
    q_recover: FloatArray
    smooth_mu: FloatArray
    future_done: FloatArray  # (rows, later steps): completion probability of each (1 past the path's end)
    future_pause: FloatArray
    future_recover: FloatArray
    future_mu: FloatArray  # smooth duration's log median per later step (nan past the path's end)


def _stuck_rows(data: Dataset) -> _Rows:
    if data.timeline is None or data.stuck_time is None:
        raise ValueError("the dataset has no timeline: draw it with simulate.generate(..., keep_timeline=True)")
    tl = data.timeline
    logits = step_logits(
        data.catalog, data.persona, data.use_case, data.company_size, data.signup_source, data.numeric, data.skill
    )
    step_probs = [1.0 / (1.0 + np.exp(-z)) for z in logits]
    low_engagement = np.clip((60.0 - data.numeric[:, 0]) / 60.0, 0.0, 1.0)
    rows = len(data.stuck_session)
    a, start, m, last = (np.zeros(rows) for _ in range(4))
    first = np.full((rows, 4), np.nan)
    p_done, q_pause, q_recover, smooth_mu = (np.zeros(rows) for _ in range(4))
    width = max(1, max(len(p.steps) for p in data.catalog.paths) - 1)  # later steps at most
    future = {name: np.ones((rows, width)) for name in ("done", "pause", "recover")}
    future_mu = np.full((rows, width), np.nan)  # nan: no such later step
    future["pause"][:] = 0.0
    future["recover"][:] = 0.0

    def kind_shares(i: int, difficulty: float, technical: float) -> tuple[float, float]:
        pause = 0.20 + 0.15 * float(low_engagement[i]) + 0.05 * difficulty
        recover = 0.05 + 0.08 * max(difficulty, 0.0) + 0.04 * max(-float(data.skill[i]), 0.0) * technical
        return pause, recover

    for r, (i, k) in enumerate(
        zip(data.stuck_session.tolist(), data.stuck_numeric[:, 0].astype(int).tolist(), strict=True)
    ):
        path = int(data.assigned[i])
        spec = data.catalog.paths[path]
        t = float(data.stuck_time[r])
        begin = tl.step_starts[i][k]
        ev = tl.events[i]
        seen = ev[np.searchsorted(ev, begin, side="right") : np.searchsorted(ev, t, side="right")] - begin
        a[r], start[r], m[r] = t - begin, begin, len(seen)
        first[r, : min(4, len(seen))] = seen[:4]
        last[r] = seen[-1] if len(seen) else np.nan
        fail_at = int(tl.fail_at[i])
        probs = step_probs[path][i]
        step = spec.steps[k]
        p_done[r] = float(probs[k]) if k < fail_at else 0.0
        q_pause[r], q_recover[r] = kind_shares(i, step.difficulty, step.technical)
        smooth_mu[r] = math.log(0.4 + 1.2 * max(step.difficulty, 0.0))
        for o, j in enumerate(range(k + 1, len(spec.steps))):
            later = spec.steps[j]
            future["done"][r, o] = float(probs[j]) if j < fail_at else 0.0
            future["pause"][r, o], future["recover"][r, o] = kind_shares(i, later.difficulty, later.technical)
            future_mu[r, o] = math.log(0.4 + 1.2 * max(later.difficulty, 0.0))
    return _Rows(a, start, m, first, last, p_done, q_pause, q_recover, smooth_mu, future["done"], future["pause"],
                 future["recover"], future_mu)  # fmt: skip


def _stratified(rng: np.random.Generator, rows: int, samples: int) -> FloatArray:
    """Uniforms in (0, 1), one stratum per column, in a random column order per row."""
    u = (np.arange(samples)[None, :] + rng.random((rows, samples))) / samples
    return np.asarray(rng.permuted(u, axis=1), dtype=np.float64)


def _later_duration(
    rng: np.random.Generator, pause: FloatArray, recover: FloatArray, mu: FloatArray, shape: tuple[int, int]
) -> FloatArray:
    """Durations of a completed later step (kind drawn with its shares), ``shape`` = (rows, samples)."""
    u = rng.random(shape)
    burst = rng.exponential(_PAUSE_BURST_H, shape)
    pause_d = (
        burst + np.exp(_PAUSE_GAP[0] + _PAUSE_GAP[1] * rng.normal(size=shape)) + rng.exponential(_PAUSE_RETURN_H, shape)
    )
    recover_d = np.exp(_RECOVER[0] + _RECOVER[1] * rng.normal(size=shape))
    smooth_d = np.exp(mu[:, None] + _SMOOTH_SIGMA * rng.normal(size=shape))
    return np.asarray(
        np.where(u < pause[:, None], pause_d, np.where(u < (pause + recover)[:, None], recover_d, smooth_d)),
        dtype=np.float64,
    )


_FACTORIAL: Final = np.array([1.0, 1.0, 2.0, 6.0, 24.0])


def _factorial(x: FloatArray) -> FloatArray:
    """``x!`` for 0 <= x <= 4 (what the episodes need; clipped outside)."""
    return np.asarray(_FACTORIAL[np.clip(x, 0, 4).astype(np.int64)], dtype=np.float64)


def _posterior_chunk(rows: _Rows, sl: slice, rng: np.random.Generator, samples: int) -> FloatArray:
    a = rows.a[sl][:, None]
    start = rows.start[sl][:, None]
    m = rows.m[sl][:, None]
    last = np.nan_to_num(rows.last[sl][:, None], nan=0.0)
    first = rows.first[sl]
    n = a.shape[0]
    shape = (n, samples)
    inf = np.full_like(a, np.inf)
    horizon = a + STUCK_HORIZON_H
    p_done = rows.p_done[sl][:, None]
    # the simulator draws u < q_pause -> pause, u < q_pause + q_recover -> recover, else smooth
    pause_share = np.clip(rows.q_pause[sl][:, None], 0.0, 1.0)
    recover_share = np.clip(rows.q_pause[sl][:, None] + rows.q_recover[sl][:, None], 0.0, 1.0) - pause_share
    smooth_share = 1.0 - pause_share - recover_share

    # the rest of the path: P(every later step completes) and the hours they take, one draw paired with each
    all_done = np.prod(rows.future_done[sl], axis=1)[:, None]
    later = np.zeros(shape)
    for o in range(rows.future_done.shape[1]):
        exists = np.isfinite(rows.future_mu[sl, o])
        mu = np.nan_to_num(rows.future_mu[sl, o], nan=0.0)
        d = _later_duration(rng, rows.future_pause[sl, o], rows.future_recover[sl, o], mu, shape)
        later += np.where(exists[:, None], d, 0.0)

    never = math.log(1.0 / _SNAPSHOT_SPAN)  # a snapshot time's density when the path does not end within 7 days

    def log_rho(done_at: FloatArray) -> FloatArray:
        """Log density of this snapshot's time when the current step completes ``done_at`` hours after it began."""
        end = np.minimum(start + done_at + later, SNAPSHOT_WINDOW_H)
        return _log((1.0 - all_done) / _SNAPSHOT_SPAN + all_done / (end - 0.25))

    weights: list[FloatArray] = []
    stuck: list[FloatArray] = []

    def add(log_prior: FloatArray, log_w: FloatArray, is_stuck: NDArray[Any] | float) -> None:
        draws = log_w.shape[1]
        weights.append(np.asarray(log_prior + log_w - math.log(draws), dtype=np.float64))
        stuck.append(np.broadcast_to(np.asarray(is_stuck, dtype=np.float64), log_w.shape))

    # smooth and recover: complete after D > a hours with 1 + Poisson(rate(D)) visits uniform over them
    for share, mu, sigma, rate in (
        (smooth_share, rows.smooth_mu[sl][:, None], _SMOOTH_SIGMA, 0.0),
        (recover_share, np.full_like(a, _RECOVER[0]), _RECOVER[1], _RECOVER_VISITS_PER_H),
    ):
        d, log_mass = _truncated_lognormal(mu, sigma, a, inf, _stratified(rng, n, samples))
        lam = 2.0 + 2.0 * np.sqrt(d) if rate == 0.0 else rate * d
        add(_log(p_done * share), log_mass + _log_visits(m, a, d, lam) + log_rho(d), d > horizon)

    # struggle: never completes; 1 + Poisson(S / 5) visits over S hours, which may have ended before the snapshot
    log_fail = _log((1.0 - p_done) * _STRUGGLE_SHARE)
    mu_s = np.full_like(a, _STRUGGLE[0])
    s_long, log_mass = _truncated_lognormal(mu_s, _STRUGGLE[1], a, inf, _stratified(rng, n, samples))
    add(log_fail, log_mass + _log_visits(m, a, s_long, _STRUGGLE_VISITS_PER_H * s_long) + never, 1.0)
    has_visits = m >= 1
    s_short, log_mass = _truncated_lognormal(mu_s, _STRUGGLE[1], last, a, _stratified(rng, n, samples))
    lam = _STRUGGLE_VISITS_PER_H * s_short
    log_l = -lam + (m - 1.0) * _log(lam) + _log(np.maximum(m, 1.0)) - m * _log(s_short)  # all m visits, N = m
    add(log_fail, np.where(has_visits, log_mass + log_l, -np.inf) + never, 1.0)

    # silent: 0, 1 or 2 visits uniform within the first hour, never completes (exact, no draws)
    late = np.where((m <= 2) & (last <= 1.0), _factorial(m), 0.0)
    early = np.zeros_like(a)
    for visits in range(3):
        early += np.where(
            m <= visits,
            _factorial(np.full_like(m, visits))
            / _factorial(visits - m)
            * np.maximum(1.0 - a, 0.0) ** np.maximum(visits - m, 0.0),
            0.0,
        )
    silent = np.where(a >= 1.0, late, early)
    add(_log((1.0 - p_done) * (1.0 - _STRUGGLE_SHARE) / 3.0), _log(silent) + never, 1.0)

    # pause: 1 to 3 visits over a burst of b ~ Exp(0.3 h), a silence g, then 1 + Poisson(2) visits over a return
    # session of r ~ Exp(0.5 h), completing at b + g + r
    log_pause = _log(p_done * pause_share / 3.0)
    mu_g = np.full_like(a, _PAUSE_GAP[0])
    # (A) the burst is not over (b > a): the m visits so far are some of its n1 >= m visits
    b, log_mass = _exponential_mixture(_PAUSE_BURST_H, m, a, inf, rng, samples)
    g = np.exp(_PAUSE_GAP[0] + _PAUSE_GAP[1] * rng.normal(size=shape))
    r = rng.exponential(_PAUSE_RETURN_H, shape)
    burst = np.zeros(shape)
    for n1 in (1, 2, 3):
        falling = _factorial(np.full_like(m, n1)) / _factorial(n1 - m)
        burst += np.where(m <= n1, falling * b ** (-m) * (np.maximum(b - a, 0.0) / b) ** np.maximum(n1 - m, 0.0), 0.0)
    add(log_pause, log_mass + _log(burst) + log_rho(b + g + r), b + g + r > horizon)
    # (B) the burst is over, the silence goes on (b < a <= b + g): the m visits (1 to 3) are the whole burst
    few = (m >= 1) & (m <= 3)
    b, log_mass = _exponential_mixture(_PAUSE_BURST_H, m, np.where(few, last, a), a, rng, samples)
    g, log_mass_g = _truncated_lognormal(
        mu_g, _PAUSE_GAP[1], a - b, np.full_like(b, np.inf), _stratified(rng, n, samples)
    )
    r = rng.exponential(_PAUSE_RETURN_H, shape)
    log_l = _log(_factorial(m)) - m * _log(b)
    add(log_pause, np.where(few, log_mass + log_mass_g + log_l, -np.inf) + log_rho(b + g + r), b + g + r > horizon)
    # (C) the user is back (b + g < a): the first n1 visits were the burst, the other m - n1 the return session's
    for n1 in (1, 2, 3):
        valid = m >= n1
        m2 = np.maximum(m - n1, 0.0)
        lo = np.nan_to_num(first[:, n1 - 1 : n1], nan=0.0)
        upper = np.where(m2 >= 1, np.nan_to_num(first[:, n1 : n1 + 1], nan=0.0), a)  # the return starts before
        b, log_mass = _exponential_mixture(_PAUSE_BURST_H, np.full_like(a, n1), lo, upper, rng, samples)
        g, log_mass_g = _truncated_lognormal(
            mu_g, _PAUSE_GAP[1], np.zeros_like(b), upper - b, _stratified(rng, n, samples)
        )
        back = np.maximum(a - b - g, 0.0)  # hours of the return session so far
        r, log_mass_r = _exponential_mixture(_PAUSE_RETURN_H, m2, back, np.full_like(b, np.inf), rng, samples)
        log_l = (
            math.log(math.factorial(n1))
            - n1 * _log(b)
            + _log_visits(m2, back, r, np.full_like(r, _PAUSE_RETURN_VISITS))
        )
        add(log_pause, np.where(valid, log_mass + log_mass_g + log_mass_r + log_l, -np.inf) + log_rho(b + g + r),
            b + g + r > horizon)  # fmt: skip

    log_w = np.concatenate([np.broadcast_to(w, (n, w.shape[1])) for w in weights], axis=1)
    y = np.concatenate([np.broadcast_to(s, (n, s.shape[1])) for s in stuck], axis=1)
    log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    top = log_w.max(axis=1, keepdims=True)
    w = np.exp(log_w - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(axis=1)
    return np.asarray(np.where(total > 0, (w * y).sum(axis=1) / np.maximum(total, 1e-300), np.nan), dtype=np.float64)


def stuck_probability(data: Dataset, *, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> FloatArray:
    """Per stuck snapshot of ``data`` (from :func:`~firstmile_inference.simulate.generate`), the probability that
    its label is *stuck* given the user's latents (skill, motivation, committed, the step they would give up at),
    the session up to the snapshot and the snapshot's time: ``E[label | that]``, whose mean given the features is
    ``E[label | features]``. Importance sampling with ``samples`` draws per episode kind and scenario."""
    if samples < 1:
        raise ValueError("samples must be positive")
    rows = _stuck_rows(data)
    rng = np.random.default_rng([data.seed, 19, samples, seed])
    out = np.empty(len(rows.a))
    for begin in range(0, len(out), CHUNK_ROWS):
        sl = slice(begin, min(begin + CHUNK_ROWS, len(out)))
        out[sl] = _posterior_chunk(rows, sl, rng, samples)
    if np.isnan(out).any():
        raise ArithmeticError(f"{int(np.isnan(out).sum())} snapshots have no episode consistent with their visits")
    return out


# ---------------------------------------------------------------- full-information training
def _fit_soft(encoder: Encoder, x: Encoded, target: FloatArray, hyper: Hyper, seed: int) -> TabularNet:
    """The production network trained by BCE against soft targets (probabilities), one output."""
    net, _ = _new_net(encoder, 1, hyper, seed)
    y = torch.from_numpy(target.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=hyper.epochs)
    loss_fn = nn.BCEWithLogitsLoss()
    for _epoch in range(hyper.epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for begin in range(0, len(order), hyper.batch_size):
            idx = order[begin : begin + hyper.batch_size]
            loss = loss_fn(net.logits(x.rows(idx))[:, 0], y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        scheduler.step()
    net.eval()
    return net


def _scores(net: TabularNet, x: Encoded) -> FloatArray:
    with torch.inference_mode():
        return np.asarray(torch.sigmoid(net.logits(x)[:, 0]).double().numpy(), dtype=np.float64)


@dataclass(frozen=True)
class _Detector:
    """A stuck score and its two thresholds chosen on the training seed's validation rows (true labels)."""

    score: Callable[[Dataset], FloatArray]
    threshold: float  # the stored rule: lowest with validation precision >= 0.92 + 0.01
    threshold_95: float  # the same rule for issue 19's 95%: validation precision >= 0.95 + 0.01


def _thresholds(val_scores: FloatArray, val_labels: NDArray[np.bool_]) -> tuple[float, float]:
    stored = threshold_for_precision(
        val_scores, val_labels, stuck_model.TARGET_PRECISION + stuck_model.PRECISION_MARGIN
    )
    at_95 = threshold_for_precision(val_scores, val_labels, GOAL_STUCK_PRECISION + stuck_model.PRECISION_MARGIN)
    return stored.threshold, at_95.threshold


def full_information_stuck_detector(
    data: Dataset, *, seed: int, samples: int = DEFAULT_SAMPLES, hyper: Hyper | None = None
) -> tuple[_Detector, FloatArray]:
    """The stuck detector's encoder and network trained on :func:`stuck_probability` (training rows of the
    production split), thresholds on the validation rows' true labels; also returns the targets."""
    hyper = hyper or FULL_INFORMATION_HYPER["stuck_detector"]
    target = stuck_probability(data, samples=samples, seed=seed)
    is_val = _split_sessions(data.n, hyper.val_fraction, seed)[data.stuck_session]
    train_rows, val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    columns = data.stuck_columns()
    encoder = stuck_model.make_encoder(list(data.path_keys)).fit(_subset(columns, train_rows))
    x = encoder.encode_columns(columns)
    net = _fit_soft(encoder, x.rows(torch.from_numpy(train_rows)), target[train_rows], hyper, seed)
    val_scores = _scores(net, x.rows(torch.from_numpy(val_rows)))
    stored, at_95 = _thresholds(val_scores, data.stuck_label[val_rows])

    def score(held: Dataset) -> FloatArray:
        return _scores(net, encoder.encode_columns(held.stuck_columns()))

    return _Detector(score, stored, at_95), target


def label_trained_stuck_detector(data: Dataset, *, seed: int) -> _Detector:
    """The production recipe (:func:`~firstmile_inference.train.train_stuck_detector` on
    :func:`~firstmile_inference.train.simulate_training_set`: ``data``'s sessions, with more snapshots each),
    with the same two rules."""
    training = simulate_training_set(data.n, seed=data.seed, exploration=data.exploration)
    trained = train_stuck_detector(training, seed=seed)
    predictor = trained.predictor()
    hyper = DEFAULT_HYPER["stuck_detector"]
    is_val = _split_sessions(training.n, hyper.val_fraction, seed)[training.stuck_session]
    val_rows = np.flatnonzero(is_val)

    def score(held: Dataset) -> FloatArray:
        probs = predictor.probabilities(predictor.encoder.encode_columns(held.stuck_columns()))
        return np.asarray(probs[:, 0].double().numpy(), dtype=np.float64)

    val_scores = score(training)[val_rows]
    stored, at_95 = _thresholds(val_scores, training.stuck_label[val_rows])
    return _Detector(score, stored, at_95)


def full_information_nudge_scorer(
    data: Dataset, *, seed: int, hyper: Hyper | None = None
) -> Callable[[Dataset], FloatArray]:
    """The nudge model's encoder and network trained on every nudge's true response probability (all rows)."""
    hyper = hyper or FULL_INFORMATION_HYPER["nudge_response_predictor"]
    columns = data.nudge_columns()
    encoder = nudge_model.make_encoder().fit(columns)
    net = _fit_soft(encoder, encoder.encode_columns(columns), data.nudge_probability, hyper, seed)
    return lambda held: _scores(net, encoder.encode_columns(held.nudge_columns()))


def label_trained_nudge_scorer(data: Dataset, *, seed: int) -> Callable[[Dataset], FloatArray]:
    """The production recipe (:func:`~firstmile_inference.train.train_nudge_response_predictor`)."""
    predictor = train_nudge_response_predictor(data, seed=seed).predictor()

    def score(held: Dataset) -> FloatArray:
        probs = predictor.probabilities(predictor.encoder.encode_columns(held.nudge_columns()))
        return np.asarray(probs[:, 0].double().numpy(), dtype=np.float64)

    return score


def _subset(columns: dict[str, Any], rows: NDArray[np.int64]) -> dict[str, Any]:
    return {k: (v[rows] if isinstance(v, np.ndarray) else [v[i] for i in rows.tolist()]) for k, v in columns.items()}


def _stuck_metrics(scores: FloatArray, labels: NDArray[np.bool_], detector: _Detector | None) -> dict[str, float]:
    at_95 = threshold_for_precision(scores, labels, GOAL_STUCK_PRECISION)
    out = {"auc": roc_auc(scores, labels), "recall_at_95": at_95.recall if at_95.met else 0.0}
    if detector is not None:
        out["precision"], out["recall"] = precision_recall(scores >= detector.threshold, labels)
        out["precision_95_rule"], out["recall_95_rule"] = precision_recall(scores >= detector.threshold_95, labels)
    return out


# ---------------------------------------------------------------- the study
def feature_ceiling_study(
    *,
    train_seeds: Sequence[int] = DEFAULT_TRAIN_SEEDS,
    heldout_seeds: Sequence[int] = DEFAULT_HELDOUT_SEEDS,
    train_sessions: int = DEFAULT_TRAIN_SESSIONS,
    sessions: int = 10_000,
    samples: int = DEFAULT_SAMPLES,
    progress: Progress | None = None,
    min_train: int = 1,
    min_heldout: int = 1,
) -> dict[str, Any]:
    """Full-information and production-recipe stuck and nudge scores on every held-out set, per run and as
    mean ± sd; the held-out sets' own latent-state probabilities as the (not feature-only) reference."""
    check_heldout_seeds(heldout_seeds, train_seeds, min_train=min_train, min_heldout=min_heldout)
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        heldouts: dict[int, Dataset] = {}
        reference: dict[int, dict[str, float]] = {}
        for h in heldout_seeds:
            say(f"held-out seed {h}: simulating {sessions} sessions and the latent-state stuck probabilities")
            held = heldouts[h] = generate(sessions, seed=h, keep_timeline=True)
            latent = _stuck_metrics(stuck_probability(held, samples=samples), held.stuck_label, None)
            reference[h] = {
                "stuck_latent_auc": latent["auc"],
                "stuck_latent_recall_at_95": latent["recall_at_95"],
                "nudge_true_probability_auc": roc_auc(held.nudge_probability, held.nudge_label),
            }
        runs: list[dict[str, float]] = []
        train_seconds: dict[str, float] = {}
        for s in train_seeds:
            t0 = time.perf_counter()
            say(f"training seed {s}: simulating {train_sessions} sessions")
            data = generate(train_sessions, seed=s, keep_timeline=True)
            say(f"training seed {s}: stuck probabilities of {len(data.stuck_label)} snapshots, full-information nets")
            full_stuck, target = full_information_stuck_detector(data, seed=s, samples=samples)
            full_nudge = full_information_nudge_scorer(data, seed=s)
            say(f"training seed {s}: production-recipe nets")
            label_stuck = label_trained_stuck_detector(data, seed=s)
            label_nudge = label_trained_nudge_scorer(data, seed=s)
            train_seconds[str(s)] = round(time.perf_counter() - t0, 1)
            say(
                f"training seed {s}: {train_seconds[str(s)]:.0f}s; stuck target mean {target.mean():.4f} vs label "
                f"rate {data.stuck_label.mean():.4f}"
            )
            for h, held in heldouts.items():
                run: dict[str, float] = {"train_seed": s, "heldout_seed": h, **reference[h]}
                for name, detector in (("stuck_full", full_stuck), ("stuck_label", label_stuck)):
                    for metric, value in _stuck_metrics(detector.score(held), held.stuck_label, detector).items():
                        run[f"{name}_{metric}"] = value
                run["nudge_full_auc"] = roc_auc(full_nudge(held), held.nudge_label)
                run["nudge_label_auc"] = roc_auc(label_nudge(held), held.nudge_label)
                runs.append(run)
                say(
                    f"  held-out {h}: nudge AUC full {run['nudge_full_auc']:.4f} label {run['nudge_label_auc']:.4f}; "
                    f"stuck recall at 95% full {run['stuck_full_recall_at_95']:.4f} label "
                    f"{run['stuck_label_recall_at_95']:.4f}"
                )
    finally:
        torch.set_num_threads(previous)
    metrics = sorted(k for k in runs[0] if k not in ("train_seed", "heldout_seed"))
    summary = {k: vars(Spread.of([r[k] for r in runs])) for k in metrics}
    full_recall = summary["stuck_full_recall_at_95"]["mean"]
    return {
        "train_seeds": list(train_seeds),
        "heldout_seeds": list(heldout_seeds),
        "train_sessions": train_sessions,
        "heldout_sessions": sessions,
        "samples": samples,
        "goals": {
            "nudge_auc": {
                "goal": GOAL_NUDGE_AUC,
                "feature_only_ceiling": summary["nudge_full_auc"]["mean"],
                "reachable": summary["nudge_full_auc"]["mean"] >= GOAL_NUDGE_AUC,
            },
            "stuck_recall_at_95_precision": {
                "goal": TODAY_STUCK_RECALL,
                "feature_only_ceiling": full_recall,
                "reachable": full_recall >= TODAY_STUCK_RECALL,
            },
        },
        "metrics": summary,
        "runs": runs,
        "train_seconds": train_seconds,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firstmile_inference.feature_ceiling", description=(__doc__ or "").split("\n")[0]
    )
    add_seed_arguments(parser)
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="draws per episode kind of the stuck probability"
    )
    args = parser.parse_args(argv)
    try:
        check_heldout_seeds(args.heldout_seeds, args.train_seeds, min_train=1, min_heldout=1)
    except SeedError as exc:
        parser.error(str(exc))
    if args.train_sessions < 1 or args.sessions < 1 or args.samples < 1:
        parser.error("--train-sessions, --sessions and --samples must be positive")

    found = feature_ceiling_study(
        train_seeds=args.train_seeds,
        heldout_seeds=args.heldout_seeds,
        train_sessions=args.train_sessions,
        sessions=args.sessions,
        samples=args.samples,
        progress=say_on_stderr,
    )
    print_json(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
