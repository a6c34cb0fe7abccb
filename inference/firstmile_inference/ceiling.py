"""The path accuracy that the nine features allow: an estimate of the best feature-only policy.

The oracle path is the argmax over paths of ``P(activate | user, path)``, which depends on the latent
*skill* and *motivation* that no model sees (``simulate``'s docstring). The best policy that sees only the
features ``x`` picks ``argmax_P E[P(activate | user, P) | x]`` (the Bayes policy); its accuracy against the
oracle is the ceiling of any model's path accuracy, below 100% wherever the latents change the best path.

It is estimated here by the path classifier's own network trained with *full information*: every training
user's exact expected activation probability on every path as soft targets (no logging policy, no Bernoulli
outcome noise), so the only things between it and the Bayes policy are finite data and capacity; its held-out
accuracy estimates the ceiling from below. Nothing here is tuned on the held-out sets (their seeds go through
:func:`~firstmile_inference.seed_study.check_heldout_seeds`).

    python -m firstmile_inference.ceiling --train-seeds 7,8,9,10,11 --heldout-seeds 1007,1008,1009

``--ensemble K`` measures instead what averaging ``K`` path classifiers of the production recipe
(:func:`~firstmile_inference.train.train_path_classifier`, the same data and validation split, ``K``
initialisation seeds) gives on the same held-out sets: whether the training seed's spread, the larger part of
the gap to the goal, averages out.

``--recipe NAME`` measures one learning recipe of :mod:`firstmile_inference.recipe_study` (compared there on
validation splits only) on the same held-out sets, beside the production recipe trained on the same data: the
once-at-the-end check of the best candidate.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from firstmile_inference.models import path_classifier as path_model
from firstmile_inference.seed_study import (
    DEFAULT_HELDOUT_SEEDS,
    DEFAULT_TRAIN_SEEDS,
    DEFAULT_TRAIN_SESSIONS,
    Spread,
    add_seed_arguments,
    check_heldout_seeds,
    print_json,
    say_on_stderr,
    training_seed_sd,
)
from firstmile_inference.simulate import Dataset, generate
from firstmile_inference.train import Hyper, _new_net

FULL_INFORMATION_HYPER: Final = Hyper(epochs=8, hidden=(64, 64), weight_decay=0.0)


def full_information_policy(
    train: Dataset, *, seed: int, hyper: Hyper = FULL_INFORMATION_HYPER
) -> Callable[[Dataset], np.ndarray[Any, np.dtype[np.int64]]]:
    """Train on every path's exact expected activation; return a function choosing each user's path index."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        columns = train.user_columns()
        encoder = path_model.make_encoder().fit(columns)
        x = encoder.encode_columns(columns)
        y = torch.from_numpy(train.expected.astype(np.float32))
        net, _ = _new_net(encoder, len(train.path_keys), hyper, seed)
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(net.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=hyper.epochs)
        loss_fn = nn.BCEWithLogitsLoss()
        for _epoch in range(hyper.epochs):
            net.train()
            order = torch.randperm(train.n, generator=generator)
            for start in range(0, train.n, hyper.batch_size):
                idx = order[start : start + hyper.batch_size]
                loss = loss_fn(net.logits(x.rows(idx)), y[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            scheduler.step()
        net.eval()
    finally:
        torch.set_num_threads(previous)

    def choose(data: Dataset) -> np.ndarray[Any, np.dtype[np.int64]]:
        if list(data.path_keys) != list(train.path_keys):
            raise ValueError("the held-out catalog differs from the training catalog")
        with torch.inference_mode():
            logits = net.logits(encoder.encode_columns(data.user_columns()))
        return np.asarray(logits.argmax(dim=1).numpy(), dtype=np.int64)

    return choose


Scorer = Callable[[Dataset], dict[str, float]]
"""One trained policy (or several) scoring a held-out set: its metrics."""


def _heldout_study(
    fit: Callable[[int, Dataset], Scorer],
    metrics: Sequence[str],
    *,
    train_seeds: Sequence[int],
    heldout_seeds: Sequence[int],
    train_sessions: int,
    sessions: int,
    progress: Callable[[str], None] | None,
    keep_timeline: bool = False,
) -> dict[str, Any]:
    """The skeleton of every study here: refuse a held-out seed used for training, simulate the held-out sets once,
    ``fit`` each training seed's data (with its time line when ``keep_timeline``), score every held-out set; each
    metric as mean ± sd over the runs, with the training-seed sd of the path accuracy, the runs themselves and the
    time taken."""
    check_heldout_seeds(heldout_seeds, train_seeds, min_train=1, min_heldout=1)
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    heldouts = {h: generate(sessions, seed=h) for h in heldout_seeds}
    runs: list[dict[str, float]] = []
    for s in train_seeds:
        score = fit(s, generate(train_sessions, seed=s, keep_timeline=keep_timeline))
        for h, held in heldouts.items():
            run: dict[str, float] = {"train_seed": s, "heldout_seed": h, **score(held)}
            runs.append(run)
            say(f"  held-out {h}: " + ", ".join(f"{m} {run[m]:.4f}" for m in metrics))
    return {
        "train_seeds": list(train_seeds),
        "heldout_seeds": list(heldout_seeds),
        "train_sessions": train_sessions,
        "heldout_sessions": sessions,
        **{m: vars(Spread.of([r[m] for r in runs])) for m in metrics},
        "training_seed_sd": training_seed_sd(runs, "path_accuracy", train_seeds),
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def ceiling_study(
    *,
    train_seeds: Sequence[int] = DEFAULT_TRAIN_SEEDS,
    heldout_seeds: Sequence[int] = DEFAULT_HELDOUT_SEEDS,
    train_sessions: int = DEFAULT_TRAIN_SESSIONS,
    sessions: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Full-information accuracy and activation vs the oracle's, per run and as mean ± sd."""
    say = progress or (lambda _line: None)

    def fit(seed: int, train: Dataset) -> Scorer:
        say(f"full-information policy, training seed {seed} ({train_sessions} sessions)")
        choose = full_information_policy(train, seed=seed)

        def score(held: Dataset) -> dict[str, float]:
            chosen = choose(held)
            oracle_rate = float(held.expected.max(axis=1).mean())
            return {
                "path_accuracy": float(np.mean(chosen == held.oracle)),
                "activation_vs_oracle": float(held.expected[np.arange(held.n), chosen].mean()) / oracle_rate,
            }

        return score

    return _heldout_study(
        fit, ("path_accuracy", "activation_vs_oracle"), train_seeds=train_seeds, heldout_seeds=heldout_seeds,
        train_sessions=train_sessions, sessions=sessions, progress=progress,
    )  # fmt: skip


def ensemble_study(
    members: int,
    *,
    train_seeds: Sequence[int] = DEFAULT_TRAIN_SEEDS,
    heldout_seeds: Sequence[int] = DEFAULT_HELDOUT_SEEDS,
    train_sessions: int = DEFAULT_TRAIN_SESSIONS,
    sessions: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Path accuracy of the mean of ``members`` production-recipe classifiers per training seed, beside the single
    classifier the production recipe trains (member 0, the training seed itself), per run and as mean ± sd."""
    from firstmile_inference.models import build_predictor
    from firstmile_inference.train import train_path_classifier

    if members < 2:
        raise ValueError(f"an ensemble needs at least 2 members, not {members}")
    say = progress or (lambda _line: None)

    def fit(seed: int, train: Dataset) -> Scorer:
        nets = []
        for k in range(members):  # member 0 is what `models train` registers; the others differ in their init seed
            trained = train_path_classifier(train, seed=seed if k == 0 else seed * 1_000 + k)
            nets.append(build_predictor(path_model.NAME, str(k), trained.config, trained.state_dict))
            say(f"training seed {seed}: member {k + 1} of {members} trained")

        def score(held: Dataset) -> dict[str, float]:
            columns = held.user_columns()
            with torch.inference_mode():
                probs = [torch.sigmoid(n.network.logits(n.encoder.encode_columns(columns))).numpy() for n in nets]
            return {
                "path_accuracy": float(np.mean(np.mean(probs, axis=0).argmax(axis=1) == held.oracle)),
                "single_path_accuracy": float(np.mean(probs[0].argmax(axis=1) == held.oracle)),
            }

        return score

    found = _heldout_study(
        fit, ("path_accuracy", "single_path_accuracy"), train_seeds=train_seeds, heldout_seeds=heldout_seeds,
        train_sessions=train_sessions, sessions=sessions, progress=progress,
    )  # fmt: skip
    return {"members": members, **found}


def recipe_heldout_study(
    recipe: str,
    *,
    train_seeds: Sequence[int] = DEFAULT_TRAIN_SEEDS,
    heldout_seeds: Sequence[int] = DEFAULT_HELDOUT_SEEDS,
    train_sessions: int = DEFAULT_TRAIN_SESSIONS,
    sessions: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Held-out path accuracy of ``recipe`` (:data:`~firstmile_inference.recipe_study.RECIPES`) and of the
    production recipe fitted to the same data, per run and as mean ± sd (with the training-seed sd)."""
    from firstmile_inference.recipe_study import RECIPES, fit_recipe, logging_propensities

    say = progress or (lambda _line: None)

    def fit(seed: int, train: Dataset) -> Scorer:
        prop = logging_propensities(train)
        fitted = {name: fit_recipe(train, name, seed=seed, propensities=prop) for name in (recipe, "production")}
        say(f"training seed {seed}: {recipe} and production fitted")

        def score(held: Dataset) -> dict[str, float]:
            chosen = {name: f.probabilities(held).argmax(axis=1) for name, f in fitted.items()}
            return {
                "path_accuracy": float(np.mean(chosen[recipe] == held.oracle)),
                "production_path_accuracy": float(np.mean(chosen["production"] == held.oracle)),
            }

        return score

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = _heldout_study(
            fit, ("path_accuracy", "production_path_accuracy"), train_seeds=train_seeds, heldout_seeds=heldout_seeds,
            train_sessions=train_sessions, sessions=sessions, progress=progress,
            keep_timeline=RECIPES[recipe].needs_timeline,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return {"recipe": recipe, **found}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firstmile_inference.ceiling", description=__doc__.split("\n")[0])
    add_seed_arguments(parser)
    parser.add_argument("--ensemble", type=int, default=0, metavar="K",
                        help="measure the mean of K production-recipe path classifiers instead")  # fmt: skip
    parser.add_argument("--recipe", metavar="NAME",
                        help="measure a recipe of firstmile_inference.recipe_study instead")  # fmt: skip
    args = parser.parse_args(argv)
    if args.recipe is not None and args.ensemble:
        parser.error("--recipe and --ensemble measure different things: give one")

    study: Callable[..., dict[str, Any]] = ceiling_study
    if args.ensemble:
        study = functools.partial(ensemble_study, args.ensemble)
    elif args.recipe is not None:
        from firstmile_inference.recipe_study import RECIPES

        if args.recipe not in RECIPES:
            parser.error(f"unknown recipe {args.recipe!r}: expected one of {', '.join(RECIPES)}")
        study = functools.partial(recipe_heldout_study, args.recipe)
    found = study(
        train_seeds=args.train_seeds,
        heldout_seeds=args.heldout_seeds,
        train_sessions=args.train_sessions,
        sessions=args.sessions,
        progress=say_on_stderr,
    )
    print_json(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
