"""The shared warm-start model: trained across the tenants that opt in, on features that carry no tenant data.

A tenant's own path model (:mod:`firstmile_inference.tenant`) learns from a few hundred logged decisions at
first. The tenants that opt in (manifest ``planner.training.warm_start: shared``) pool their decisions into one
model with the same network as a tenant's path model (an embedding per categorical feature and the 32 x 32
trunk). What is shared is **path-agnostic**: the embeddings, the trunk and one output, the probability that a
user activates on whatever path the tenant's policy gave them. While it trains, each contributing tenant's
paths also get outputs of their own, *anonymous* columns (tenant 2's third path is a column number; no key is
read), so that the trunk learns what tells paths apart for a user, not only who activates; those heads are
discarded after training and never stored. A tenant model that warm-starts copies the embeddings and the
trunk, encodes with the shared encoder, starts its own per-path outputs fresh, and fine-tunes on its own
decisions.

**What the shared model sees** (:func:`shared_instance`; nothing else reaches its inputs):

* the four categorical traits, ``user_persona``, ``signup_source``, ``company_size`` and ``use_case``, **only
  when the value is in the platform's fixed vocabulary** (:data:`firstmile_inference.schema.VOCABULARIES`);
  a tenant's own value (its persona names, its own signup sources) becomes *unknown* (``None``) before it is
  pooled, so it is never stored, encoded or written to the artifact;
* the five behavioural numerics (``engagement_score``, ``time_since_signup``, ``steps_completed``,
  ``session_count``, ``avg_session_duration``), which the platform computes the same way for every tenant from
  event counts and times, only when finite and within their range (a score within 0..100, counts and
  durations not negative); otherwise *unknown*;
* and whether the user activated within the horizon (the label).

The path taken enters only as that anonymous column index of the discarded heads. Never: a path key or
version (path ids are the tenant's), the eligible paths (the tenant's targeting), propensities, tenant or user
ids, the ``role`` trait or any other trait, any free text.

**Balance** (:func:`pool`): the largest contributor holds at most :data:`CAP_RATIO` (2) times the decisions of
the second largest, and at most :data:`MAX_PER_TENANT`; a bigger tenant's decisions are subsampled uniformly
(seeded). With N tenants the largest holds at most 2 / (N + 1) of the pool (50% with three tenants, whatever
its size). Fewer than :data:`MIN_TENANTS` (2) shares are refused: one tenant's data is never a "shared" model
(the platform asks for at least three by default).

**The artifact** holds the embeddings, the trunk and the one path-agnostic output; it records the number of
contributing tenants and the decisions each contributed (sorted, with no name), the encoder (the platform's
vocabularies and the pooled mean and standard deviation of the five numerics), the network and its training;
no per-tenant head, no reference distributions, no tenant or path name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from firstmile_inference.features import USER_NUMERIC, Encoded, Encoder, user_encoder
from firstmile_inference.metrics import roc_auc
from firstmile_inference.models.network import TabularNet, build_network, network_config
from firstmile_inference.schema import CATEGORICAL_FEATURES, NUMERIC_FEATURES, VOCABULARIES
from firstmile_inference.train import CONFIG_FORMAT, Hyper, TrainedModel, _fit, _state

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion

__all__ = [
    "CAP_RATIO",
    "MAX_PER_TENANT",
    "MIN_TENANTS",
    "SHARED_HYPER",
    "SHARED_MODEL",
    "TenantShare",
    "WarmStart",
    "pool",
    "shared_instance",
    "train_shared",
]

SHARED_MODEL: Final = "shared.path_warmstart"
"""The shared model's registry name (``<registry>/shared.path_warmstart/<version>/…``)."""
KIND: Final = "path_warmstart"
MIN_TENANTS: Final = 2
"""The fewest shares :func:`pool` accepts, whatever the caller asks: one tenant is never a shared model."""
CAP_RATIO: Final = 2.0
"""The largest contributor holds at most this many times the decisions of the second largest."""
MAX_PER_TENANT: Final = 20_000
"""No tenant contributes more decisions than this (subsampled uniformly, seeded)."""
SHARED_HYPER: Final = Hyper(epochs=20, batch_size=128, hidden=(32, 32), weight_decay=5e-4, val_fraction=0.2)
"""The trunk's shape matches :data:`firstmile_inference.tenant.TENANT_HYPER` (8-wide embeddings, 32 x 32), so a
tenant model can start from it; ``val_fraction`` of the pooled rows measure the validation loss and AUC."""

_RANGES: Final = {"score": (0.0, 100.0), "count": (0.0, math.inf), "duration": (0.0, math.inf)}


def shared_instance(features: Mapping[str, Any]) -> dict[str, Any]:
    """The nine features reduced to what carries no tenant data (see the module docstring): categoricals in the
    platform's vocabularies, numerics finite and within range, everything else ``None``; no other key."""
    out: dict[str, Any] = {}
    for name in CATEGORICAL_FEATURES:
        value = features.get(name)
        out[name] = value if isinstance(value, str) and value in VOCABULARIES[name] else None
    for spec in USER_NUMERIC:
        value = features.get(spec.name)
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        low, high = _RANGES[spec.kind]
        out[spec.name] = number if math.isfinite(number) and low <= number <= high else None
    return out


@dataclass(frozen=True)
class TenantShare:
    """One opted-in tenant's decisions, already reduced by :func:`shared_instance`: no id, no path key.

    ``actions`` are anonymous column numbers, 0 to ``paths - 1``: which of the tenant's paths a decision took,
    for the per-tenant heads that training discards."""

    features: Sequence[Mapping[str, Any]]
    rewards: NDArray[np.float64]  # 1.0 activated within the horizon, else 0.0
    actions: NDArray[np.int64]
    paths: int

    def __post_init__(self) -> None:
        if not len(self.features) == int(self.rewards.size) == int(self.actions.size):
            raise ValueError(
                f"{len(self.features)} feature rows, {self.rewards.size} rewards and {self.actions.size} actions"
            )
        if self.actions.size and not 0 <= int(self.actions.min()) <= int(self.actions.max()) < self.paths:
            raise ValueError(f"actions must be column numbers within 0..{self.paths - 1}")

    @property
    def n(self) -> int:
        return len(self.features)


def cap_of(counts: Sequence[int]) -> int:
    """The most decisions one tenant contributes: :data:`CAP_RATIO` times the second largest, at most
    :data:`MAX_PER_TENANT`."""
    if len(counts) < MIN_TENANTS:
        raise ValueError(
            f"a shared model needs at least {MIN_TENANTS} contributing tenants, got {len(counts)}: one tenant's "
            "decisions are never a shared model"
        )
    second = sorted(counts, reverse=True)[1]
    return min(MAX_PER_TENANT, math.ceil(CAP_RATIO * second))


@dataclass(frozen=True)
class Pooled:
    """The balanced pool, in no tenant's order: rows, labels, each row's head column (1 + the tenant's offset +
    its action; column 0 is the shared output), and how many decisions each (unnamed) tenant contributed."""

    features: list[dict[str, Any]]
    rewards: NDArray[np.float64]
    heads: NDArray[np.int64]
    columns: int  # 1 + every tenant's paths
    contributed: list[int]  # per tenant, sorted descending
    offered: int  # decisions before the cap
    cap: int


def pool(shares: Sequence[TenantShare], *, seed: int = 7) -> Pooled:
    """Cap each share (:func:`cap_of`, uniform subsample under ``seed``), reduce every row again with
    :func:`shared_instance`, give each tenant's paths their anonymous head columns and shuffle the pool."""
    cap = cap_of([s.n for s in shares])
    rng = np.random.default_rng(seed + 2_000_003)
    features: list[dict[str, Any]] = []
    rewards: list[NDArray[np.float64]] = []
    heads: list[NDArray[np.int64]] = []
    contributed = []
    offset = 1
    for share in shares:
        rows = np.arange(share.n) if share.n <= cap else np.sort(rng.choice(share.n, size=cap, replace=False))
        features += [shared_instance(share.features[i]) for i in rows.tolist()]
        rewards.append(share.rewards[rows].astype(np.float64))
        heads.append(share.actions[rows].astype(np.int64) + offset)
        contributed.append(int(rows.size))
        offset += share.paths
    order = rng.permutation(len(features))
    return Pooled(
        [features[i] for i in order.tolist()],
        np.concatenate(rewards)[order],
        np.concatenate(heads)[order],
        offset,
        sorted(contributed, reverse=True),
        sum(s.n for s in shares),
        cap,
    )


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Columns for the encoder's statistics: an unknown number takes the mean of the known ones (0 if none)."""
    columns: dict[str, Any] = {name: [row.get(name) for row in rows] for name in CATEGORICAL_FEATURES}
    for name in NUMERIC_FEATURES:
        known = [float(row[name]) for row in rows if row.get(name) is not None]
        fill = float(np.mean(known)) if known else 0.0
        columns[name] = np.asarray([fill if row.get(name) is None else float(row[name]) for row in rows])
    return columns


def train_shared(
    shares: Sequence[TenantShare], *, seed: int = 7, hyper: Hyper | None = None, threads: int | None = None
) -> TrainedModel:
    """Pool ``shares`` (:func:`pool`) and train the shared model on them (see the module docstring)."""
    hyper = hyper or SHARED_HYPER
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _train(pool(shares, seed=seed), seed, hyper)
    finally:
        torch.set_num_threads(previous)


def _twice(x: Encoded, rows: NDArray[np.int64]) -> Encoded:
    """Each row twice: once for the shared output, once for its tenant's head."""
    index = torch.from_numpy(np.concatenate([rows, rows]))
    return x.rows(index)


def _train(pooled: Pooled, seed: int, hyper: Hyper) -> TrainedModel:
    started = time.perf_counter()
    n = len(pooled.features)
    rng = np.random.default_rng(seed + 1_000_003)
    order = rng.permutation(n)
    n_val = max(2, round(hyper.val_fraction * n))
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    encoder = user_encoder().fit(_columns([pooled.features[i] for i in train_rows.tolist()]))
    x_all = encoder.encode(pooled.features)
    y_all = pooled.rewards.astype(np.float32)
    torch.manual_seed(seed)
    training_net = build_network(
        network_config(
            encoder.cardinalities,
            encoder.numeric_width,
            pooled.columns,
            embedding_dim=hyper.embedding_dim,
            hidden=hyper.hidden,
        )
    )

    def part(rows: NDArray[np.int64]) -> tuple[Encoded, torch.Tensor, torch.Tensor]:
        y = torch.from_numpy(np.concatenate([y_all[rows], y_all[rows]]))
        out = torch.from_numpy(np.concatenate([np.zeros(rows.size, dtype=np.int64), pooled.heads[rows]]))
        return _twice(x_all, rows), y, out

    (tx, ty, tout), (vx, vy, vout) = part(train_rows), part(val_rows)
    history = _fit(KIND, training_net, tx, ty, vx, vy, hyper, seed, None, tout, vout)
    # keep the shared output (column 0); the per-tenant heads are dropped here
    net_cfg = network_config(
        encoder.cardinalities, encoder.numeric_width, 1, embedding_dim=hyper.embedding_dim, hidden=hyper.hidden
    )
    state = _state(training_net)
    head_w, head_b = _head_names(state)
    state[head_w], state[head_b] = state[head_w][:1].clone(), state[head_b][:1].clone()
    net = build_network(net_cfg)
    net.load_state_dict(state)
    net.eval()
    with torch.inference_mode():
        shared_p = torch.sigmoid(net.logits(x_all.rows(torch.from_numpy(val_rows)))[:, 0]).numpy()
    seconds = time.perf_counter() - started
    config: dict[str, Any] = {
        "model": KIND,
        "format": CONFIG_FORMAT,
        "encoder": encoder.to_config(),
        "network": net_cfg,
        "head": "path-agnostic: one output, P(activate within the horizon | the shared features); the per-tenant "
        "heads trained beside it are not stored",
        "features": {
            "categorical": {name: list(VOCABULARIES[name]) for name in CATEGORICAL_FEATURES},
            "numeric": list(NUMERIC_FEATURES),
            "rule": "categoricals outside the platform's vocabularies and numerics out of range are unknown; no "
            "path key, tenant, user, role or free text",
        },
        "contributors": {
            "tenants": len(pooled.contributed),
            "decisions": pooled.contributed,
            "offered_decisions": pooled.offered,
            "cap_per_tenant": pooled.cap,
            "cap_rule": f"at most {CAP_RATIO:g} x the second largest contributor, at most {MAX_PER_TENANT}",
        },
        "training": {
            "source": "pooled_logged_decisions",
            "seed": seed,
            "decisions": n,
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "head_columns_during_training": pooled.columns,
            **hyper.record(seconds),
        },
    }
    auc = roc_auc(shared_p, y_all[val_rows])
    metrics: dict[str, Any] = {
        "val_auc": auc if np.isfinite(auc) else None,  # of the shared output, on the validation rows
        "val_loss": history[-1]["val_loss"],  # both outputs of each validation row
        "activation_rate": float(pooled.rewards.mean()),
        "train_seconds": round(seconds, 2),
    }
    return TrainedModel(SHARED_MODEL, state, config, metrics, {}, history)


@dataclass(frozen=True)
class WarmStart:
    """A shared model's version, ready to initialise a tenant's path model (:meth:`initialise`)."""

    model: str
    version: str
    config: Mapping[str, Any]
    state_dict: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if self.config.get("model") != KIND or int(self.config["network"]["outputs"]) != 1:
            raise ValueError(f"{self.model} {self.version} is not a shared warm-start model")
        if self.encoder().fields != user_encoder().fields:
            raise ValueError(f"{self.model} {self.version}: its inputs are not the nine features")

    @classmethod
    def from_trained(cls, trained: TrainedModel, version: str = "0.0.0") -> WarmStart:
        return cls(trained.name, version, trained.config, trained.state_dict)

    @classmethod
    def load(cls, mv: ModelVersion) -> WarmStart:
        """A registered version (weights read with ``weights_only=True``)."""
        state = torch.load(mv.weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{mv.name} {mv.version}: weights.pt does not hold a state dict")
        return cls(mv.name, mv.version, mv.config, state)

    def encoder(self) -> Encoder:
        """The shared encoder: the tenant model encodes as the trunk was trained (vocabularies and the pooled
        standardisation of the numerics)."""
        return Encoder.from_config(self.config["encoder"])

    def network(self, outputs: int, seed: int) -> tuple[TabularNet, dict[str, Any]]:
        """A tenant network of the shared shape with ``outputs`` paths, initialised by :meth:`initialise`."""
        shape = self.config["network"]
        torch.manual_seed(seed)
        cfg = network_config(
            shape["cardinalities"], int(shape["numeric_width"]), outputs, embedding_dim=int(shape["embedding_dim"]),
            hidden=tuple(int(h) for h in shape["hidden"]),
        )  # fmt: skip
        net = build_network(cfg)
        self.initialise(net)
        return net, cfg

    def initialise(self, net: TabularNet) -> list[str]:
        """Copy the embeddings and the trunk into ``net`` (its per-path outputs keep their fresh initialisation);
        returns the parameters copied."""
        own = net.state_dict()
        head = _head_names(own)
        copied = []
        for name, value in self.state_dict.items():
            if name in head:
                continue
            if name not in own or own[name].shape != value.shape:
                raise ValueError(f"{self.model} {self.version}: its layer {name} does not fit the tenant network")
            own[name] = value.detach().clone()
            copied.append(name)
        net.load_state_dict(own)
        return copied

    def record(self) -> dict[str, Any]:
        """What the tenant model's config records (``warm_start``)."""
        return {"model": self.model, "version": self.version}


def _head_names(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The output layer: the last ``mlp.<i>`` Linear."""
    last = max(int(name.split(".")[1]) for name in state if name.startswith("mlp.") and name.endswith(".weight"))
    return f"mlp.{last}.weight", f"mlp.{last}.bias"
