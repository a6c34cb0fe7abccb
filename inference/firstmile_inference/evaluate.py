"""Evaluation of the three models on a held-out simulated :class:`~firstmile_inference.simulate.Dataset`.

* **Path selection**: accuracy against the oracle path (the argmax of the exact
  expected activation probability) of the ML planner (argmax of the path
  classifier's scores over the catalog), of a rules policy (default: the
  built-in mapping of ``tenants/demo.yaml``; the platform passes its real
  planner) and of a uniformly random choice (exact expectation), plus the
  *simulated activation rate* of each: the mean exact expected activation
  probability of the path the policy picks (the oracle's is the ceiling). The
  distribution of the margin between the best and second-best path is
  reported because near-ties bound any policy's accuracy.
* **Stuck detection**: precision and recall of the model at its stored
  threshold, and of the time rule "no activity for 24 h or more", on the same
  snapshots.
* **Nudge response**: ROC AUC of the predicted response probability (rank
  based, :func:`~firstmile_inference.metrics.roc_auc`), with the AUC of the
  simulator's true probabilities as the ceiling.

Command line (what ``firstmile models evaluate`` wraps)::

    python -m firstmile_inference.evaluate --registry DIR --sessions 10000 --seed 1007
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from firstmile_inference.metrics import precision_recall, roc_auc, threshold_for_precision
from firstmile_inference.models import load_predictor
from firstmile_inference.predictor import Predictor
from firstmile_inference.registry import Registry
from firstmile_inference.schema import MODEL_NAMES
from firstmile_inference.simulate import Dataset, Policy, demo_rules_policy, generate

Progress = Callable[[str], None]

GOAL_PATH_ACCURACY: Final = 0.89
GOAL_STUCK_PRECISION: Final = 0.92
GOAL_NUDGE_AUC: Final = 0.76
TIME_RULE_HOURS: Final = 24.0
NEAR_TIE: Final = 0.02  # absolute difference in activation probability
STUCK_DIAGNOSTIC_PRECISION: Final = 0.95  # issue 19's stuck precision goal


@dataclass(frozen=True)
class PolicyResult:
    name: str
    accuracy: float  # share of users given the oracle path
    activation_rate: float  # mean exact expected activation probability of the chosen path


@dataclass(frozen=True)
class MarginSummary:
    """Best minus second-best expected activation probability, over the held-out users."""

    p10: float
    p25: float
    median: float
    share_below_001: float
    share_below_002: float
    share_relative_below_5pct: float


@dataclass(frozen=True)
class Detection:
    name: str
    precision: float
    recall: float
    flagged: int


@dataclass(frozen=True)
class Goal:
    name: str
    target: float
    measured: float
    met: bool


@dataclass(frozen=True)
class EvaluationReport:
    sessions: int
    seed: int
    versions: dict[str, str]
    policies: tuple[PolicyResult, ...]
    margin: MarginSummary
    ml_accuracy_clear: float  # ML accuracy on users whose margin is at least NEAR_TIE
    stuck: tuple[Detection, ...]  # the model first, then the time rule
    stuck_threshold: float
    stuck_auc: float
    stuck_snapshots: int
    stuck_rate: float
    nudge_auc: float
    nudge_ceiling_auc: float
    nudge_rows: int
    # Diagnostic, not an operating point: the highest recall at which the model's precision on this held-out
    # set reaches STUCK_DIAGNOSTIC_PRECISION, the threshold picked on the held-out set itself (an upper bound).
    stuck_recall_at_95: float = float("nan")
    train_seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # the path classifier's training record, if known
    commands: tuple[str, ...] = ()
    seconds: float = 0.0

    def policy(self, name: str) -> PolicyResult:
        return next(p for p in self.policies if p.name == name)

    @property
    def goals(self) -> tuple[Goal, ...]:
        ml = self.policy("ml")
        model = self.stuck[0]
        return (
            Goal("Path selection accuracy (ML planner vs oracle)", GOAL_PATH_ACCURACY, ml.accuracy,
                 ml.accuracy >= GOAL_PATH_ACCURACY),
            Goal("Stuck detection precision (at the stored threshold)", GOAL_STUCK_PRECISION, model.precision,
                 model.precision >= GOAL_STUCK_PRECISION),
            Goal("Nudge response AUC", GOAL_NUDGE_AUC, self.nudge_auc, self.nudge_auc >= GOAL_NUDGE_AUC),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["goals"] = [asdict(g) for g in self.goals]
        return out

    def to_markdown(self) -> str:
        pct = _pct
        lines = [
            "## Model evaluation on simulated held-out data",
            "",
            f"Held-out set: {self.sessions:,} simulated sessions (seed {self.seed}), "
            f"{self.stuck_snapshots:,} stuck snapshots, {self.nudge_rows:,} nudges. "
            "Models: " + ", ".join(f"`{n}` {v}" for n, v in self.versions.items()) + ".",
            "",
        ]
        if self.training:
            t = self.training
            lines += [
                f"Training set: {t.get('sessions', 0):,} simulated sessions (seed {t.get('data_seed')}, "
                f"{100 * float(t.get('exploration', 0)):.0f}% uniformly random logged paths); "
                "the held-out seed was never used for training or tuning.",
                "",
            ]
        lines += [
            "### Goals",
            "",
            "| Goal | Target | Measured | Met |",
            "|---|---|---|---|",
        ]
        for g in self.goals:
            shown = f"{g.measured:.3f}" if g.target < 1 and "AUC" in g.name else pct(g.measured)
            target = f"≥ {g.target:.2f}" if "AUC" in g.name else f"≥ {pct(g.target)}"
            lines.append(f"| {g.name} | {target} | {shown} | {'yes' if g.met else '**no**'} |")
        lines += [
            "",
            "### Path selection",
            "",
            "| Policy | Accuracy vs oracle | Simulated activation rate |",
            "|---|---|---|",
        ]
        labels = {"ml": "ML planner (argmax of scores)", "rules": "Rules (targeting, by priority)",
                  "random": "Random (exact expectation)", "oracle": "Oracle (ceiling)"}  # fmt: skip
        for p in self.policies:
            lines.append(f"| {labels.get(p.name, p.name)} | {pct(p.accuracy)} | {pct(p.activation_rate)} |")
        m = self.margin
        lines += [
            "",
            "Margin between the best and the second-best path's expected activation probability: "
            f"10th percentile {m.p10:.3f}, quartile {m.p25:.3f}, median {m.median:.3f}; "
            f"{pct(m.share_below_001)} of users are within 0.01 and {pct(m.share_below_002)} within 0.02 "
            f"({pct(m.share_relative_below_5pct)} within 5% relative). Near-ties bound any policy's accuracy "
            f"without costing activation; on the users with a margin of at least {NEAR_TIE} the ML planner's "
            f"accuracy is {pct(self.ml_accuracy_clear)}.",
            "",
            "### Stuck detection",
            "",
            f"Label: no step completed within the next 48 h absent intervention; {pct(self.stuck_rate)} of "
            f"snapshots are stuck. Model AUC {self.stuck_auc:.3f}.",
            "",
            "| Detector | Precision | Recall | Flagged |",
            "|---|---|---|---|",
        ]
        for d in self.stuck:
            lines.append(f"| {d.name} | {pct(d.precision)} | {pct(d.recall)} | {d.flagged:,} |")
        lines += [
            "",
            "### Nudge response",
            "",
            f"AUC {self.nudge_auc:.3f} (the simulator's true response probabilities reach "
            f"{self.nudge_ceiling_auc:.3f}, the ceiling any model can reach on these outcomes).",
        ]
        if self.train_seconds:
            total = sum(self.train_seconds.values())
            parts = ", ".join(f"`{n}` {s:.1f} s" for n, s in self.train_seconds.items())
            lines += ["", f"Training time: {total:.1f} s in all ({parts})."]
        if self.commands:
            lines += ["", "### Commands", "", "```", *self.commands, "```"]
        return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def margin_summary(expected: np.ndarray[Any, np.dtype[np.float64]]) -> MarginSummary:
    ordered = np.sort(expected, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    relative = margin / np.maximum(ordered[:, -1], 1e-12)
    return MarginSummary(
        p10=float(np.quantile(margin, 0.10)),
        p25=float(np.quantile(margin, 0.25)),
        median=float(np.median(margin)),
        share_below_001=float(np.mean(margin < 0.01)),
        share_below_002=float(np.mean(margin < 0.02)),
        share_relative_below_5pct=float(np.mean(relative < 0.05)),
    )


def _policy_choices(data: Dataset, policy: Policy) -> np.ndarray[Any, np.dtype[np.int64]]:
    keys = data.path_keys
    out = np.empty(data.n, dtype=np.int64)
    for i in range(data.n):
        key = policy(data.traits(i))
        if key not in keys:
            raise ValueError(f"policy chose {key!r}, not a path of the catalog ({', '.join(keys)})")
        out[i] = keys.index(key)
    return out


def evaluate(
    heldout: Dataset,
    predictors: Mapping[str, Predictor],
    *,
    rules_policy: Policy | None = None,
    policies: Mapping[str, Policy] | None = None,
    commands: Sequence[str] = (),
    train_seconds: Mapping[str, float] | None = None,
    training: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Evaluate the three predictors (keyed by model name) on ``heldout``; see the module docstring.

    ``policies`` adds more path policies to the comparison (each called with :meth:`Dataset.traits`).
    """
    started = time.perf_counter()
    say = progress or (lambda _line: None)
    missing = [m for m in MODEL_NAMES if m not in predictors]
    if missing:
        raise ValueError(f"missing predictors: {', '.join(missing)}")
    keys = data_keys = heldout.path_keys
    rows = np.arange(heldout.n)
    expected = heldout.expected
    oracle = heldout.oracle

    # ---- path selection
    say(f"path selection on {heldout.n} users")
    instances = [{**heldout.user_features(i), "candidates": list(data_keys)} for i in range(heldout.n)]
    predicted = predictors["path_classifier"].predict(instances)
    ml = np.array([keys.index(p["path"]) for p in predicted], dtype=np.int64)
    choices = {"ml": ml, "rules": _policy_choices(heldout, rules_policy or demo_rules_policy)}
    for name, policy in (policies or {}).items():
        choices[name] = _policy_choices(heldout, policy)
    results = [
        PolicyResult(name, float(np.mean(c == oracle)), float(expected[rows, c].mean())) for name, c in choices.items()
    ]
    results.append(PolicyResult("random", 1.0 / len(keys), float(expected.mean())))
    results.append(PolicyResult("oracle", 1.0, float(expected.max(axis=1).mean())))
    margin = np.sort(expected, axis=1)
    clear = (margin[:, -1] - margin[:, -2]) >= NEAR_TIE
    ml_clear = float(np.mean(ml[clear] == oracle[clear])) if clear.any() else float("nan")

    # ---- stuck detection
    say(f"stuck detection on {len(heldout.stuck_label)} snapshots")
    stuck_out = predictors["stuck_detector"].predict(heldout.stuck_rows())
    flagged = np.array([p["stuck"] for p in stuck_out], dtype=bool)
    probability = np.array([p["stuck_probability"] for p in stuck_out])
    labels = heldout.stuck_label
    time_rule = heldout.stuck_numeric[:, 2] >= TIME_RULE_HOURS
    threshold = float(getattr(predictors["stuck_detector"], "threshold", float("nan")))
    model_pr = precision_recall(flagged, labels)
    rule_pr = precision_recall(time_rule, labels)
    stuck = (
        Detection(f"Model (threshold {threshold:.3f})", *model_pr, int(flagged.sum())),
        Detection(f"No activity ≥ {TIME_RULE_HOURS:.0f} h", *rule_pr, int(time_rule.sum())),
    )

    # ---- nudge response
    say(f"nudge response on {len(heldout.nudge_label)} nudges")
    nudge_out = predictors["nudge_response_predictor"].predict(heldout.nudge_rows())
    nudge_scores = np.array([p["response_probability"] for p in nudge_out])

    return EvaluationReport(
        sessions=heldout.n,
        seed=heldout.seed,
        versions={m: str(getattr(predictors[m], "version", "?")) for m in MODEL_NAMES},
        policies=tuple(results),
        margin=margin_summary(expected),
        ml_accuracy_clear=ml_clear,
        stuck=stuck,
        stuck_threshold=threshold,
        stuck_auc=roc_auc(probability, labels),
        stuck_snapshots=len(labels),
        stuck_rate=float(labels.mean()) if len(labels) else float("nan"),
        nudge_auc=roc_auc(nudge_scores, heldout.nudge_label),
        nudge_ceiling_auc=roc_auc(heldout.nudge_probability, heldout.nudge_label),
        nudge_rows=len(heldout.nudge_label),
        stuck_recall_at_95=_best_recall(probability, labels, STUCK_DIAGNOSTIC_PRECISION),
        train_seconds=dict(train_seconds or {}),
        training=dict(training or {}),
        commands=tuple(commands),
        seconds=time.perf_counter() - started,
    )


def _best_recall(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], precision: float) -> float:
    operating = threshold_for_precision(scores, labels, precision)
    return operating.recall if operating.met else 0.0


def load_stage(registry: Registry, stage: str = "production") -> dict[str, Predictor]:
    """Each model's version at ``stage``, or its latest version when the stage is empty."""
    out: dict[str, Predictor] = {}
    for name in MODEL_NAMES:
        mv = registry.resolve(name, stage) or registry.latest(name)
        if mv is None:
            raise LookupError(f"registry {registry.root} has no version of {name}: train first")
        out[name] = load_predictor(mv)
    return out


def evaluate_registry(
    registry: Registry,
    *,
    sessions: int = 10_000,
    seed: int = 1007,
    stage: str = "production",
    rules_policy: Policy | None = None,
    commands: Sequence[str] = (),
    progress: Progress | None = None,
) -> EvaluationReport:
    """Generate a held-out set and evaluate the registry's models at ``stage`` (what the CLI runs).

    Raises :class:`~firstmile_inference.seed_study.SeedError` when ``seed`` was used for training or tuning.
    """
    from firstmile_inference.seed_study import SeedError, refused_heldout_seeds

    predictors = load_stage(registry, stage)
    used: set[int] = set()
    for name, predictor in predictors.items():
        recorded = registry.get(name, predictor.version).config.get("training", {})
        used |= {int(v) for k in ("seed", "data_seed") if isinstance(v := recorded.get(k), int)}
    refused = refused_heldout_seeds(used)
    if seed in refused:
        raise SeedError(f"held-out seed {seed} was used for training or tuning: {refused[seed]}")
    heldout = generate(sessions, seed=seed)
    train_seconds: dict[str, float] = {}
    for name, predictor in predictors.items():
        seconds = registry.get(name, predictor.version).metrics.get("train_seconds")
        if isinstance(seconds, int | float):
            train_seconds[name] = float(seconds)
    path_version = registry.get("path_classifier", predictors["path_classifier"].version)
    training = path_version.config.get("training", {})
    if training and not commands:
        commands = [
            f"python -m firstmile_inference.train --registry {registry.root} --sessions {training.get('sessions')} "
            f"--seed {training.get('seed')}",
            f"python -m firstmile_inference.evaluate --registry {registry.root} --sessions {sessions} --seed {seed}",
        ]
    return evaluate(
        heldout,
        predictors,
        rules_policy=rules_policy,
        commands=commands,
        train_seconds=train_seconds,
        training=training,
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firstmile_inference.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--registry", required=True, help="registry directory or file:///abs/path URI")
    parser.add_argument("--sessions", type=int, default=10_000, help="simulated held-out sessions")
    parser.add_argument("--seed", type=int, default=1007, help="seed of the held-out set (not the training seed)")
    parser.add_argument("--stage", default="production", choices=("production", "canary", "shadow"))
    parser.add_argument("--markdown", help="also write the report as Markdown here")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")

    from firstmile_inference.seed_study import SeedError

    try:
        report = evaluate_registry(
            Registry(args.registry), sessions=args.sessions, seed=args.seed, stage=args.stage, progress=say
        )
    except SeedError as exc:
        parser.error(str(exc))
    text = report.to_markdown()
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
