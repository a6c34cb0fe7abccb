"""Path-classifier learning recipes compared on the validation splits of training seeds only (issue 19).

Each recipe is trained on ``generate(sessions, seed=s)`` for every training seed ``s`` with the production
recipe's split (:func:`~firstmile_inference.train._split_sessions`: 10% of the sessions for validation, the
encoder fitted on the training rows) and scored on that validation split only:

* ``val_loss``: the BCE of the logged path's output against the logged activation;
* ``val_dr`` and ``val_snips``: the doubly robust and self-normalised IPS estimates of the greedy policy's
  activation rate from the validation split's *logged* outcomes and logging propensities (by default 40%
  uniform plus 60% rules; ``--exploration`` changes the uniform share), what a real tenant has;
* ``val_path_accuracy``: agreement with the simulator's oracle path on the validation users. It reads the
  simulator's truth, so it is a diagnostic for this study, never something a recipe selects on.

Recipes (:data:`RECIPES`): the production recipe (16 epochs) and the one before it (``epochs8``, from which
the other variants were measured), inverse-propensity weighting of the logged rows, a shared base with shrunk
per-path output weights, epoch selection by the validation DR estimate, decoupled weight decay, a structured
reward model ``logit P(act | x, path) = base(x) + delta_path(x)`` with ``delta_path`` linear in the features
(and persona x company-size cells), averages of the weights over the last epochs or steps (``swa``, ``ema``),
distillation of five fits into one network, and two diagnostics that train on the simulator's truth to split
the gap (``noise_free``: the logged path's exact expected activation instead of the Bernoulli outcome;
``full_feedback``: a Bernoulli outcome on every path for every user).

No held-out seed is touched: a training seed among the evaluation's held-out seeds (default 1007, 1008, 1009)
is refused (:func:`~firstmile_inference.seed_study.check_heldout_seeds`). ``python -m
firstmile_inference.ceiling --recipe NAME`` measures one recipe on the held-out sets, once.

    python -m firstmile_inference.recipe_study --train-seeds 8,9,10 --recipes production,ipw,structured
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from firstmile_inference.features import Encoded, Encoder
from firstmile_inference.models import path_classifier as path_model
from firstmile_inference.models.network import TabularNet
from firstmile_inference.seed_study import (
    DEFAULT_HELDOUT_SEEDS,
    DEFAULT_TRAIN_SESSIONS,
    SeedError,
    Spread,
    check_heldout_seeds,
    parse_seeds,
    print_json,
    say_on_stderr,
)
from firstmile_inference.simulate import Dataset, demo_rules_policy, generate
from firstmile_inference.train import DEFAULT_HYPER, Hyper, _new_net, _split_sessions, _subset

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Weighting = Literal["none", "ipw", "sqrt_ipw"]
Target = Literal["logged", "noise_free", "full_feedback"]
DEFAULT_TRAIN_SEEDS: Final = (8, 9, 10)
PRODUCTION: Final = DEFAULT_HYPER["path_classifier"]
BEFORE: Final = Hyper(epochs=8, hidden=(32, 32), weight_decay=5e-4)
"""The production recipe before the 16-epoch selection; the variants below were measured against it."""


@dataclass(frozen=True)
class Recipe:
    """How a path classifier is fitted to logged data (``Hyper`` plus what the production recipe does not do)."""

    description: str
    hyper: Hyper = BEFORE
    weighting: Weighting = "none"  # row weights 1 / (K * propensity) (ipw) or their square root, mean 1
    head_shrinkage: float = 0.0  # L2 on each output's weights minus the mean output's: shared base, small deltas
    decoupled_decay: bool = False  # AdamW instead of Adam's L2 term
    select: Literal["last", "dr"] = "last"  # keep the last epoch, or the epoch with the best validation DR value
    structured: bool = False  # base(x) + per-path deltas linear in the features (StructuredNet)
    delta_l2: float = 1e-4
    target: Target = "logged"  # noise_free and full_feedback read the simulator's truth: diagnostics only
    diagnostic: bool = False
    average: Literal["none", "epochs", "ema"] = "none"  # keep an average of the weights instead of the last ones
    average_from: int = 1  # "epochs": the uniform mean of the end-of-epoch weights from this epoch on
    ema_decay: float = 0.998  # "ema": per-step exponential moving average of the weights
    distill: int = 0  # > 0: fit this many epochs8 teachers (init seeds differ), learn their mean on every path
    step_targets: float = 0.0  # > 0: also learn each reached step's completion on the logged path, this weight

    @property
    def needs_timeline(self) -> bool:
        """Whether its training set must keep the simulated time line (``generate(keep_timeline=True)``)."""
        return self.step_targets > 0


RECIPES: Final[dict[str, Recipe]] = {
    "production": Recipe(
        "the production recipe: 32 x 32, Adam, weight decay 5e-4, 16 epochs, last epoch", hyper=PRODUCTION
    ),
    "epochs8": Recipe("the production recipe before this study's selection: 8 epochs"),
    "ipw": Recipe("rows weighted by 1 / (K x logging propensity)", weighting="ipw"),
    "sqrt_ipw": Recipe("rows weighted by the square root of the IPW weight", weighting="sqrt_ipw"),
    "base_delta": Recipe("shared base, per-path output weights shrunk to their mean (1e-3)", head_shrinkage=1e-3),
    "dr_select": Recipe("epoch chosen by the validation DR estimate of the greedy policy", select="dr"),
    "adamw": Recipe(
        "decoupled weight decay (AdamW, 0.1)",
        hyper=Hyper(epochs=8, hidden=(32, 32), weight_decay=0.1),
        decoupled_decay=True,
    ),
    "structured": Recipe(
        "base(x) (32 x 32 MLP) + per-path deltas linear in the features and persona x size",
        hyper=Hyper(epochs=8, hidden=(32, 32), weight_decay=0.0),
        structured=True,
    ),
    "swa": Recipe(
        "16 epochs, the uniform mean of the weights at the end of epochs 9 to 16",
        hyper=Hyper(epochs=16, hidden=(32, 32), weight_decay=5e-4),
        average="epochs",
        average_from=9,
    ),
    "ema": Recipe(
        "16 epochs, a per-step moving average of the weights (decay 0.998)",
        hyper=Hyper(epochs=16, hidden=(32, 32), weight_decay=5e-4),
        average="ema",
    ),
    "distilled": Recipe(
        "the 8-epoch network fitted to the mean of 5 8-epoch fits on every path (distillation)", distill=5
    ),
    "step_targets": Recipe(
        "16 epochs; a second head learns each reached step's completion on the logged path (weight 1), dropped after",
        hyper=PRODUCTION,
        step_targets=1.0,
    ),
    "noise_free": Recipe(
        "diagnostic: the logged path's exact expected activation as the target",
        hyper=PRODUCTION,
        target="noise_free",
        diagnostic=True,
    ),
    "full_feedback": Recipe(
        "diagnostic: a Bernoulli outcome on every path for every user",
        hyper=PRODUCTION,
        target="full_feedback",
        diagnostic=True,
    ),
}


class StructuredNet(nn.Module):
    """``logit P(act | x, path) = base(x) + delta_path(x)``: an MLP base shared by the paths, and per-path
    deltas linear in the categorical indices, the persona x company-size cell and the numerics."""

    def __init__(self, cardinalities: Sequence[int], numeric_width: int, paths: int, hyper: Hyper) -> None:
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        self.embeddings = nn.ModuleList(nn.Embedding(c, hyper.embedding_dim) for c in self.cardinalities)
        layers: list[nn.Module] = []
        width = hyper.embedding_dim * len(self.cardinalities) + numeric_width
        for h in hyper.hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.base = nn.Sequential(*layers)
        self.deltas = nn.ModuleList(nn.Embedding(c, paths) for c in self.cardinalities)
        self.cell = nn.Embedding(self.cardinalities[0] * self.cardinalities[2], paths)  # persona x company size
        self.numeric_delta = nn.Linear(numeric_width, paths)
        for table in [*self.deltas, self.cell]:
            nn.init.zeros_(table.weight)
        nn.init.zeros_(self.numeric_delta.weight)
        nn.init.zeros_(self.numeric_delta.bias)

    def logits(self, batch: Encoded) -> torch.Tensor:
        cat, num = batch.categorical, batch.numeric
        hidden = torch.cat([emb(cat[:, i]) for i, emb in enumerate(self.embeddings)] + [num], dim=1)
        out = self.base(hidden) + self.numeric_delta(num)
        for i, table in enumerate(self.deltas):
            out = out + table(cat[:, i])
        out = out + self.cell(cat[:, 0] * self.cardinalities[2] + cat[:, 2])
        assert isinstance(out, torch.Tensor)
        return out

    def penalty(self) -> torch.Tensor:
        total = (self.numeric_delta.weight**2).sum() + (self.cell.weight**2).sum()
        for table in self.deltas:
            assert isinstance(table, nn.Embedding)
            total = total + (table.weight**2).sum()
        return total


def logging_propensities(data: Dataset) -> FloatArray:
    """The logging policy's probability of each logged path: ``exploration / K`` plus ``1 - exploration`` where
    it is the demo rules' path (:func:`~firstmile_inference.simulate.demo_rules_policy`, the simulator's default)."""
    keys = list(data.path_keys)
    rules = np.empty(data.n, dtype=np.int64)
    for i in range(data.n):
        traits = {"persona": str(data.persona[i]), "role": str(data.role[i]),
                  "company_size": str(data.company_size[i]), "use_case": str(data.use_case[i])}  # fmt: skip
        key = demo_rules_policy(traits)
        rules[i] = keys.index(key if key in keys else data.catalog.default)
    chosen = (data.assigned == rules).astype(np.float64)
    return np.asarray(data.exploration / len(keys) + (1.0 - data.exploration) * chosen, dtype=np.float64)


def greedy_value(q: FloatArray, actions: IntArray, rewards: FloatArray, propensities: FloatArray) -> dict[str, float]:
    """DR and SNIPS estimates of the policy that picks ``argmax q`` from logged (action, reward, propensity)."""
    rows = np.arange(len(actions))
    chosen = q.argmax(axis=1)
    w = (chosen == actions).astype(np.float64) / propensities
    dr = float(np.mean(q[rows, chosen] + w * (rewards - q[rows, actions])))
    snips = float(np.sum(w * rewards) / np.sum(w)) if np.sum(w) > 0 else float("nan")
    return {"dr": dr, "snips": snips}


@dataclass
class Fitted:
    """A recipe fitted to one training seed: scores for any users, and its validation figures."""

    recipe: str
    encoder: Encoder
    network: TabularNet | StructuredNet
    validation: dict[str, float]
    chosen_epoch: int

    def probabilities(self, data: Dataset) -> FloatArray:
        with torch.inference_mode():
            logits = self.network.logits(self.encoder.encode_columns(data.user_columns()))
        return np.asarray(torch.sigmoid(logits).numpy(), dtype=np.float64)


def _row_weights(weighting: Weighting, propensities: FloatArray, paths: int) -> torch.Tensor:
    w = np.ones_like(propensities) if weighting == "none" else 1.0 / (paths * propensities)
    if weighting == "sqrt_ipw":
        w = np.sqrt(w)
    return torch.from_numpy((w / w.mean()).astype(np.float32))


def fit_recipe(
    data: Dataset, name: str, *, seed: int, propensities: FloatArray | None = None, init_seed: int | None = None
) -> Fitted:
    """Fit recipe ``name`` on ``data``'s training rows (the production split under ``seed``; the initial weights
    and batch order under ``init_seed``, by default ``seed``)."""
    recipe = RECIPES[name]
    init = seed if init_seed is None else init_seed
    hyper = recipe.hyper
    prop = logging_propensities(data) if propensities is None else propensities
    val_mask = _split_sessions(data.n, hyper.val_fraction, seed)
    train_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    columns = data.user_columns()
    encoder = path_model.make_encoder().fit(_subset(columns, train_rows))
    x = encoder.encode_columns(columns)
    paths = len(data.path_keys)
    if recipe.structured:
        torch.manual_seed(init)
        net: TabularNet | StructuredNet = StructuredNet(encoder.cardinalities, encoder.numeric_width, paths, hyper)
    else:
        steps = max(len(p.steps) for p in data.catalog.paths) if recipe.step_targets else 0
        net, _ = _new_net(encoder, paths * (1 + steps), hyper, init)
    t_idx = torch.from_numpy(train_rows)
    xt, xv = x.rows(t_idx), x.rows(torch.from_numpy(val_rows))
    actions = torch.from_numpy(data.assigned[train_rows])
    if recipe.target == "noise_free":
        yt = torch.from_numpy(data.expected[train_rows, data.assigned[train_rows]].astype(np.float32))
    else:
        yt = torch.from_numpy(data.activated[train_rows].astype(np.float32))
    full: torch.Tensor | None = None
    if recipe.target == "full_feedback":
        draws = np.random.default_rng(seed + 99).random((len(train_rows), paths)) < data.expected[train_rows]
        full = torch.from_numpy(draws.astype(np.float32))
    if recipe.distill:
        teachers = [
            fit_recipe(data, "epochs8", seed=seed, propensities=prop, init_seed=init * 1_000 + k)
            for k in range(recipe.distill)
        ]
        with torch.inference_mode():
            soft = torch.stack([torch.sigmoid(t.network.logits(xt)) for t in teachers]).mean(0)
        full = soft.detach().clone()
    step_reached, step_done = _step_outcomes(data, train_rows) if recipe.step_targets else (None, None)
    weights = _row_weights(recipe.weighting, prop[train_rows], paths)
    optimiser_cls = torch.optim.AdamW if recipe.decoupled_decay else torch.optim.Adam
    optimiser = optimiser_cls(net.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=hyper.epochs)
    generator = torch.Generator().manual_seed(init)
    averaged = _averaged(net, recipe)
    val_a = data.assigned[val_rows]
    val_r = data.activated[val_rows].astype(np.float64)
    oracle = data.oracle[val_rows]
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float]] | None = None
    for epoch in range(1, hyper.epochs + 1):
        net.train()
        order = torch.randperm(len(train_rows), generator=generator)
        for start in range(0, len(order), hyper.batch_size):
            idx = order[start : start + hyper.batch_size]
            logits = net.logits(xt.rows(idx))
            aux = logits[:, paths:]
            logits = logits[:, :paths]
            if full is not None:
                loss = nn.functional.binary_cross_entropy_with_logits(logits, full[idx])
            else:
                picked = logits.gather(1, actions[idx][:, None])[:, 0]
                per_row = nn.functional.binary_cross_entropy_with_logits(picked, yt[idx], reduction="none")
                loss = (per_row * weights[idx]).mean()
            if step_reached is not None and step_done is not None:
                per_step = aux.view(len(idx), paths, -1)[torch.arange(len(idx)), actions[idx]]
                mask = step_reached[idx]
                step_loss = nn.functional.binary_cross_entropy_with_logits(per_step, step_done[idx], reduction="none")
                loss = loss + recipe.step_targets * (step_loss * mask).sum() / mask.sum().clamp(min=1.0)
            if recipe.head_shrinkage > 0 and isinstance(net, TabularNet):
                last = net.mlp[-1]
                assert isinstance(last, nn.Linear)
                head = last.weight
                loss = loss + recipe.head_shrinkage * ((head - head.mean(0, keepdim=True)) ** 2).sum()
            if isinstance(net, StructuredNet):
                loss = loss + recipe.delta_l2 * net.penalty()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            if averaged is not None and recipe.average == "ema":
                averaged.update_parameters(net)
        scheduler.step()
        if averaged is not None and recipe.average == "epochs" and epoch >= recipe.average_from:
            averaged.update_parameters(net)
        scored = net
        if averaged is not None and (recipe.average == "ema" or epoch >= recipe.average_from):
            assert isinstance(averaged.module, TabularNet | StructuredNet)
            scored = averaged.module
        scored.eval()
        with torch.inference_mode():
            val_logits = scored.logits(xv)[:, :paths]
        q = np.asarray(torch.sigmoid(val_logits).numpy(), dtype=np.float64)
        picked_val = val_logits[torch.arange(len(val_rows)), torch.from_numpy(val_a)]
        figures = {
            "val_loss": float(
                nn.functional.binary_cross_entropy_with_logits(picked_val, torch.from_numpy(val_r).float())
            ),
            **{f"val_{k}": v for k, v in greedy_value(q, val_a, val_r, prop[val_rows]).items()},
            "val_path_accuracy": float(np.mean(q.argmax(axis=1) == oracle)),
        }
        key = figures["val_dr"] if recipe.select == "dr" else float(epoch)
        if best is None or key > best[0]:
            state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
            best = (key, epoch, state, figures)
    assert best is not None
    net.load_state_dict(best[2])
    if recipe.step_targets and isinstance(net, TabularNet):
        net = _main_head(net, encoder, paths, hyper)
    net.eval()
    return Fitted(name, encoder, net, best[3], best[1])


def _step_outcomes(data: Dataset, rows: IntArray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: which steps of its logged path it reached, and which of those it completed (``generate``'s
    time line: a session completes steps in order and stops at the first one it fails)."""
    if data.timeline is None:
        raise ValueError("step targets need the time line that generate keeps")
    steps = max(len(p.steps) for p in data.catalog.paths)
    reached = np.zeros((len(rows), steps), dtype=np.float32)
    done = np.zeros((len(rows), steps), dtype=np.float32)
    for j, i in enumerate(rows.tolist()):
        reached[j, : len(data.timeline.step_starts[i])] = 1.0
        done[j, : len(data.timeline.completions[i])] = 1.0
    return torch.from_numpy(reached), torch.from_numpy(done)


def _main_head(net: TabularNet, encoder: Encoder, paths: int, hyper: Hyper) -> TabularNet:
    """The registered form: the same network with only its first ``paths`` outputs (the step head dropped)."""
    kept, _ = _new_net(encoder, paths, hyper, 0)
    state = net.state_dict()
    last = f"mlp.{len(net.mlp) - 1}"  # the output layer
    for key in (f"{last}.weight", f"{last}.bias"):
        state[key] = state[key][:paths]
    kept.load_state_dict(state)
    return kept


def _averaged(net: TabularNet | StructuredNet, recipe: Recipe) -> AveragedModel | None:
    if recipe.average == "none":
        return None
    if recipe.average == "ema":
        ema = get_ema_multi_avg_fn(recipe.ema_decay)  # type: ignore[no-untyped-call]
        return AveragedModel(net, multi_avg_fn=ema, use_buffers=True)
    return AveragedModel(net, use_buffers=True)


def recipe_study(
    *,
    train_seeds: Sequence[int] = DEFAULT_TRAIN_SEEDS,
    recipes: Sequence[str] = tuple(RECIPES),
    sessions: int = DEFAULT_TRAIN_SESSIONS,
    exploration: float = 0.4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every recipe on every training seed's validation split; see the module docstring.

    ``exploration`` is the logging policy's share of uniformly random paths (the simulator's default 0.4)."""
    check_training_seeds(train_seeds)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}: expected some of {', '.join(RECIPES)}")
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, float]]] = {r: [] for r in recipes}
    timeline = any(RECIPES[r].needs_timeline for r in recipes)
    try:
        for s in train_seeds:
            data = generate(sessions, seed=s, exploration=exploration, keep_timeline=timeline)
            prop = logging_propensities(data)
            for name in recipes:
                t0 = time.perf_counter()
                fitted = fit_recipe(data, name, seed=s, propensities=prop)
                run = {"train_seed": float(s), "epoch": float(fitted.chosen_epoch), **fitted.validation,
                       "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
                runs[name].append(run)
                say(f"seed {s} {name}: validation path accuracy {run['val_path_accuracy']:.4f}, "
                    f"loss {run['val_loss']:.4f}, DR {run['val_dr']:.4f}")  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    figures = ("val_path_accuracy", "val_loss", "val_dr", "val_snips")
    return {
        "train_seeds": list(train_seeds),
        "sessions": sessions,
        "exploration": exploration,
        "split": "validation (10% of each training seed's sessions); no held-out seed is read",
        "recipes": {
            name: {
                "description": RECIPES[name].description,
                "diagnostic": RECIPES[name].diagnostic,
                **{f: vars(Spread.of([r[f] for r in runs[name]])) for f in figures},
                "runs": runs[name],
            }
            for name in recipes
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_training_seeds(train_seeds: Sequence[int], heldout_seeds: Sequence[int] = DEFAULT_HELDOUT_SEEDS) -> None:
    """Raise :class:`~firstmile_inference.seed_study.SeedError` for a training seed the held-out sets use."""
    if not train_seeds:
        raise SeedError("need at least one training seed")
    check_heldout_seeds(heldout_seeds, train_seeds, min_train=1, min_heldout=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firstmile_inference.recipe_study", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--train-seeds", type=parse_seeds, default=DEFAULT_TRAIN_SEEDS)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--sessions", type=int, default=DEFAULT_TRAIN_SESSIONS, help="simulated sessions per seed")
    parser.add_argument("--exploration", type=float, default=0.4, help="share of uniformly random logged paths")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}: expected some of {', '.join(RECIPES)}")
    try:
        check_training_seeds(args.train_seeds)
    except SeedError as exc:
        parser.error(str(exc))

    if not 0.0 < args.exploration <= 1.0:
        parser.error(f"--exploration must be in (0, 1], not {args.exploration}")
    found = recipe_study(
        train_seeds=args.train_seeds,
        recipes=recipes,
        sessions=args.sessions,
        exploration=args.exploration,
        progress=say_on_stderr,
    )
    print_json(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
