"""A tenant's own path model, trained on its logged decisions, with an off-policy report.

The platform reads a tenant's logged decisions (the nine features at the decision, the path taken,
its propensity, activation within the horizon: ``firstmile.ml.tenant_models``) and hands them here as
a :class:`LoggedData`. :func:`train_logged` splits them (deterministically under ``seed``) into a
training part and an *evaluation* part the model never sees, trains the same network as the global
path classifier (one activation logit per path, binary cross-entropy on the logged path's output),
and evaluates the candidate *policy*, argmax of the predicted activation over the user's eligible
paths, on the evaluation part with :mod:`firstmile_inference.ope`:

* IPS and DR (the model's own per-path predictions as the reward model) with 95% intervals;
* the logging policy's observed activation rate on the same decisions (its on-policy value) with a
  normal interval;
* given the tenant's production model (:class:`CurrentModel`), its DR estimate on the same decisions;
* ``gate_passed``: the DR lower bound beats the logging policy's observed rate, and the current model's
  estimate when there is one (``gate_against`` names the larger, ``gate_threshold`` its value).

The registered version carries the report in its metrics (``ope``) and the training rows in its
config (``training``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from firstmile_inference import ope
from firstmile_inference.features import USER_NUMERIC
from firstmile_inference.models import path_classifier as path_model
from firstmile_inference.train import CONFIG_FORMAT, Hyper, TrainedModel, _fit, _new_net, _reference, _state

if TYPE_CHECKING:
    from firstmile_inference.warm_start import WarmStart

__all__ = ["TENANT_HYPER", "CurrentModel", "LoggedData", "NoOverlapError", "train_logged"]

TENANT_HYPER: Final = Hyper(epochs=30, batch_size=64, hidden=(32, 32), weight_decay=5e-4, val_fraction=0.3)
"""Small logged datasets (hundreds to a few hundred thousand rows): more passes and smaller batches than the
simulator's 50K sessions; ``val_fraction`` is the evaluation share the off-policy report is computed on."""
LEVEL: Final = 0.95


class NoOverlapError(ValueError):
    """The candidate chose none of the paths logged for its held-out decisions: no estimate can be made of it."""


@dataclass(frozen=True)
class LoggedData:
    """A tenant's logged decisions: one row each (no user ids)."""

    features: Sequence[Mapping[str, Any]]  # the nine features at the decision (None: unknown)
    actions: NDArray[np.int64]  # index into ``paths`` of the path taken
    rewards: NDArray[np.float64]  # 1.0 activated within the horizon, else 0.0
    propensities: NDArray[np.float64]  # the logging policy's probability of the path taken
    eligible: NDArray[np.bool_]  # (n, K): the paths the candidate policy may choose for each user
    paths: tuple[str, ...]

    @property
    def n(self) -> int:
        return int(self.actions.size)


@dataclass(frozen=True)
class CurrentModel:
    """The tenant's production model, which a candidate must also beat: its version and its predicted activation of
    every path (columns in ``LoggedData.paths``) for every logged decision, ``(n, K)``."""

    version: str
    scores: NDArray[np.float64]


def _fit_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Columns for the encoder's statistics: an unknown number takes the mean of the known ones (0 if none)."""
    columns: dict[str, Any] = {name: [row.get(name) for row in rows] for name in path_model.make_encoder().fields}
    for spec in USER_NUMERIC:
        known = [float(v) for v in columns[spec.name] if isinstance(v, int | float) and not isinstance(v, bool)]
        fill = float(np.mean(known)) if known else 0.0
        columns[spec.name] = np.asarray(
            [float(v) if isinstance(v, int | float) and not isinstance(v, bool) else fill for v in columns[spec.name]]
        )
    return columns


def _observed(rewards: NDArray[np.float64]) -> dict[str, float]:
    mean = float(rewards.mean())
    se = float(rewards.std(ddof=1) / np.sqrt(rewards.size)) if rewards.size > 1 else 0.0
    half = NormalDist().inv_cdf(0.5 + LEVEL / 2.0) * se
    return {"value": mean, "standard_error": se, "low": mean - half, "high": mean + half, "n": int(rewards.size)}


def train_logged(
    data: LoggedData,
    *,
    seed: int = 7,
    hyper: Hyper | None = None,
    threads: int | None = None,
    warm_start: WarmStart | None = None,
    current: CurrentModel | None = None,
) -> TrainedModel:
    """Train a per-path activation model on ``data`` and attach the off-policy report (``metrics["ope"]``).

    With ``warm_start`` (the shared model, :mod:`firstmile_inference.warm_start`) the network starts from its
    embeddings and trunk, every path's output from its one output, and encodes with its encoder; the config
    records it (``warm_start``: ``{model, version}``, ``None`` when trained cold)."""
    hyper = hyper or TENANT_HYPER
    if data.n < 10:
        raise ValueError(f"at least 10 logged decisions are needed, got {data.n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _train(data, seed, hyper, warm_start, current)
    finally:
        torch.set_num_threads(previous)


def _train(
    data: LoggedData, seed: int, hyper: Hyper, warm: WarmStart | None = None, current: CurrentModel | None = None
) -> TrainedModel:
    started = time.perf_counter()
    rng = np.random.default_rng(seed + 1_000_003)
    order = rng.permutation(data.n)
    n_eval = max(2, round(hyper.val_fraction * data.n))
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    train_features = [data.features[i] for i in train_rows.tolist()]
    encoder = path_model.make_encoder().fit(_fit_columns(train_features)) if warm is None else warm.encoder()
    x_all = encoder.encode(list(data.features))
    y_all = torch.from_numpy(data.rewards.astype(np.float32))
    out_all = torch.from_numpy(data.actions.astype(np.int64))
    net, net_cfg = (
        _new_net(encoder, len(data.paths), hyper, seed) if warm is None else warm.network(len(data.paths), seed)
    )
    t_idx, v_idx = torch.from_numpy(train_rows), torch.from_numpy(eval_rows)
    history = _fit(
        "path_classifier", net, x_all.rows(t_idx), y_all[t_idx], x_all.rows(v_idx), y_all[v_idx], hyper, seed,
        None, out_all[t_idx], out_all[v_idx],
    )  # fmt: skip
    net.eval()
    with torch.inference_mode():
        q = torch.sigmoid(net.logits(x_all.rows(v_idx))).numpy().astype(np.float64)
    report = off_policy_report(data, eval_rows, q, current)
    seconds = time.perf_counter() - started
    config: dict[str, Any] = {
        "model": "path_classifier",
        "format": CONFIG_FORMAT,
        "encoder": encoder.to_config(),
        "network": net_cfg,
        "paths": list(data.paths),
        "warm_start": None if warm is None else warm.record(),
        "training": {
            "source": "logged_decisions",
            "seed": seed,
            "decisions": data.n,
            "train_rows": len(train_rows),
            "evaluation_rows": len(eval_rows),
            **hyper.record(seconds),
        },
    }
    metrics: dict[str, Any] = {
        "val_auc": auc if np.isfinite(auc := history[-1]["val_auc"]) else None,  # None: one class held out
        "val_loss": history[-1]["val_loss"],
        "train_seconds": round(seconds, 2),
        "ope": report,
        # what the drift check of this version compares live decisions with (firstmile.ml.drift)
        "calibration": calibration_report(data, eval_rows, q),
        "reference_unknown_fill": unknown_fill(train_features),
    }
    return TrainedModel(
        "path_classifier", _state(net), config, metrics, _reference(encoder, _fit_columns(train_features)), history
    )


def _path_counts(data: LoggedData, chosen: NDArray[np.int64]) -> dict[str, int]:
    return {data.paths[k]: int(c) for k, c in enumerate(np.bincount(chosen, minlength=len(data.paths)))}


def _counted(data: LoggedData, chosen: NDArray[np.int64]) -> str:
    return ", ".join(f"{path} {count}" for path, count in _path_counts(data, chosen).items() if count)


def off_policy_report(
    data: LoggedData, rows: NDArray[np.int64], q: NDArray[np.float64], current: CurrentModel | None = None
) -> dict[str, Any]:
    """IPS, SNIPS and DR of the greedy policy over eligible paths on ``rows``, against the logged rate and, given
    the tenant's production model (``current``), against that model's DR estimate on the same decisions (the same
    estimator and reward model ``q``): the candidate's DR lower bound must beat the larger of the two."""
    eligible = data.eligible[rows]
    target = ope.policy_probabilities(q, eligible)
    chosen = np.argmax(np.where(eligible, q, -np.inf), axis=1)
    a, r, p = data.actions[rows], data.rewards[rows], data.propensities[rows]
    if not np.any(target[np.arange(rows.size), a] > 0):
        raise NoOverlapError(
            f"the candidate chose none of the paths logged for its {rows.size} held-out decisions, so the off-policy "
            "estimators have nothing to weigh: log more decisions (or more exploration) and train again (logged: "
            f"{_counted(data, a)}; the candidate chose: {_counted(data, chosen)})"
        )
    estimates = ope.evaluate_policy(a, r, p, target, q, level=LEVEL)
    logged = _observed(r)
    dr = estimates["dr"]
    threshold, against, current_report = float(logged["value"]), "logging_policy", None
    if current is not None:
        scores = np.asarray(current.scores, dtype=np.float64)[rows]
        current_dr = ope.doubly_robust(a, r, p, ope.policy_probabilities(scores, eligible), q, level=LEVEL)
        current_report = {
            "version": current.version,
            "dr": current_dr.to_json(),
            "paths": _path_counts(data, np.argmax(np.where(eligible, scores, -np.inf), axis=1)),
        }
        if current_dr.value > threshold:
            threshold, against = float(current_dr.value), "current_model"
    return {
        "level": LEVEL,
        "evaluation_decisions": int(rows.size),
        "logging_policy": logged,
        "estimates": {name: e.to_json() for name, e in estimates.items()},
        "candidate_paths": _path_counts(data, chosen),
        "current_model": current_report,  # None: the tenant had no production model (of this catalog)
        "gate": "dr.low > logging_policy.value"
        if current is None
        else "dr.low > max(logging_policy.value, current_model.dr.value)",
        "gate_threshold": threshold,
        "gate_against": against,  # which of the two the candidate had to beat: the larger
        "gate_passed": bool(dr.low > threshold),
    }


def _calibration(predicted: NDArray[np.float64], observed: NDArray[np.float64]) -> dict[str, Any]:
    n = int(predicted.size)
    if n == 0:
        return {"decisions": 0}
    residual = observed - predicted
    return {
        "decisions": n,
        "mean_predicted": float(predicted.mean()),
        "observed_rate": float(observed.mean()),
        "gap": float(residual.mean()),  # observed - predicted: > 0 the model under-predicts activation
        "residual_sd": float(residual.std(ddof=1)) if n > 1 else 0.0,
        "brier": float(np.mean(residual**2)),
        "accuracy": float(np.mean((predicted >= 0.5) == (observed >= 0.5))),
    }


def calibration_report(data: LoggedData, rows: NDArray[np.int64], q: NDArray[np.float64]) -> dict[str, Any]:
    """How the predicted activation of the logged path compared with what happened on the held-out ``rows``:
    ``chosen``, the rows whose logged path is the one the model chooses among the eligible paths (what its live
    decisions are), and ``all`` the held-out rows. Each: decisions, mean predicted, observed rate, their gap
    (observed - predicted), the residuals' standard deviation, the Brier score and the accuracy at 0.5."""
    a, r = data.actions[rows], data.rewards[rows]
    predicted = q[np.arange(rows.size), a]
    chosen = np.argmax(np.where(data.eligible[rows], q, -np.inf), axis=1) == a
    return {"chosen": _calibration(predicted[chosen], r[chosen]), "all": _calibration(predicted, r)}


def unknown_fill(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The value an unknown numeric took in the training reference (as :func:`_fit_columns` fills it: the mean of
    the known ones, 0 if none), so a drift check bins live unknowns where training put them."""
    out: dict[str, float] = {}
    for spec in USER_NUMERIC:
        known = [
            float(v) for row in rows if isinstance(v := row.get(spec.name), int | float) and not isinstance(v, bool)
        ]
        out[spec.name] = float(np.mean(known)) if known else 0.0
    return out
