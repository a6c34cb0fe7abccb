"""The off-policy estimators checked on the simulator, where every policy's true value is known.

The simulator (:mod:`firstmile_inference.simulate`) knows each user's exact activation probability on
every path, so the true value of any policy on a population (its *simulated activation rate*) is the
mean of those probabilities along its choices. This study:

1. draws one population of simulated users (``population`` users, the demo catalog) and, from other
   users of the same draw, fits a **reward model** for DR the way one would on real logs: a ridge
   logistic regression of activation on the nine features, with coefficients per path, fitted on the
   simulator's historical log (40% uniformly random paths, otherwise the rules);
2. per replicate (``replicates`` of them, each with its own seed), logs ``sample`` decisions: users
   drawn from the population, paths drawn from the **logging policy** (the demo rules with the
   platform's epsilon-greedy exploration, over the eligible paths of ``tenants/demo.yaml`` or, in the
   *open* scenario, over all paths), and activation drawn from the exact probability of the logged path;
   the propensity of each logged path is recorded, as the planner does;
3. estimates a different **target policy**'s value with IPS, SNIPS and DR and checks each interval
   against the truth.

It reports, per scenario and estimator: the coverage of the intervals (the share that contain the
truth, against the nominal level), the mean estimate's bias and its standard error over the replicates,
the standard deviation of the estimates, the mean reported standard error and the mean effective sample
size. ``tests/unit/test_ope.py`` asserts on the same figures.

Command line::

    python -m firstmile_inference.ope_study [--replicates 200] [--sample 1000] [--seed 11] [--bootstrap 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np

from firstmile_inference import ope
from firstmile_inference.ope import FloatArray, IntArray
from firstmile_inference.schema import COMPANY_SIZES, PERSONAS, SIGNUP_SOURCES, USE_CASES
from firstmile_inference.simulate import Dataset, demo_eligible, demo_rules_policy, generate

TargetKind = Literal["oracle", "model"]
ESTIMATORS: Final = ("ips", "snips", "dr")
RIDGE: Final = 1.0  # the reward model's L2 penalty


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    epsilon: float  # the logging policy's exploration share
    targeting: bool  # explore over the eligible paths of the demo targeting (True) or over every path
    target: TargetKind  # the best path by the true probabilities (oracle) or by the reward model (model)


SCENARIOS: Final = (
    Scenario(
        "targeting-oracle",
        "logging: rules, epsilon 0.2 over the eligible paths; target: the best eligible path (oracle)",
        0.2,
        True,
        "oracle",
    ),
    Scenario(
        "targeting-model",
        "logging: rules, epsilon 0.2 over the eligible paths; target: the reward model's best eligible path",
        0.2,
        True,
        "model",
    ),
    Scenario(
        "open-oracle",
        "logging: rules, epsilon 0.3 over all 7 paths; target: the oracle over all paths",
        0.3,
        False,
        "oracle",
    ),
)


@dataclass(frozen=True)
class EstimatorSummary:
    estimator: str
    coverage: float  # share of the replicates whose interval contains the truth
    mean: float  # mean estimate over the replicates
    bias: float  # mean - truth
    bias_se: float  # standard error of that mean: sd / sqrt(replicates)
    sd: float  # standard deviation of the estimates over the replicates
    mean_se: float  # mean reported standard error
    mean_width: float  # mean interval width


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    truth: float  # the target policy's true value on the population
    logging_value: float  # the logging policy's true value (what was experienced)
    mean_ess: float  # mean effective sample size of the importance weights
    estimators: tuple[EstimatorSummary, ...]

    def summary(self, estimator: str) -> EstimatorSummary:
        return next(e for e in self.estimators if e.estimator == estimator)


@dataclass(frozen=True)
class StudyReport:
    population: int
    model_sessions: int
    sample: int
    replicates: int
    seed: int
    level: float
    bootstrap: int  # 0: normal intervals
    reward_model_rmse: float  # against the true probabilities of the population, every path
    results: tuple[ScenarioResult, ...]
    seconds: float

    def result(self, name: str) -> ScenarioResult:
        return next(r for r in self.results if r.scenario.name == name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        interval = f"percentile bootstrap ({self.bootstrap} resamples)" if self.bootstrap else "normal"
        lines = [
            f"{self.replicates} replicates of {self.sample:,} logged decisions each, users drawn from a simulated "
            f"population of {self.population:,} (seed {self.seed}); {100 * self.level:.0f}% {interval} intervals; "
            f"reward model for DR: a logistic regression per path on the nine features, fitted on "
            f"{self.model_sessions:,} other simulated sessions (RMSE {self.reward_model_rmse:.3f} against the "
            "true probabilities).",
            "",
            "| Scenario | Truth | Estimator | Coverage | Bias ± s.e. | SD of estimates | Mean s.e. | Mean ESS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {result.scenario.name} | {result.truth:.4f} | {e.estimator.upper()} | {100 * e.coverage:.0f}% | "
            f"{e.bias:+.4f} ± {e.bias_se:.4f} | {e.sd:.4f} | {e.mean_se:.4f} | {result.mean_ess:,.0f} |"
            for result in self.results
            for e in result.estimators
        ]
        lines += ["", "Scenarios:", ""]
        for result in self.results:
            lines.append(
                f"- `{result.scenario.name}`: {result.scenario.description} (the logging policy's own value: "
                f"{result.logging_value:.4f})."
            )
        return "\n".join(lines) + "\n"


def _eligibility(data: Dataset, rows: IntArray, targeting: bool) -> np.ndarray[Any, np.dtype[np.bool_]]:
    keys = data.path_keys
    if not targeting:
        return np.ones((rows.size, len(keys)), dtype=np.bool_)
    out = np.zeros((rows.size, len(keys)), dtype=np.bool_)
    for j, i in enumerate(rows.tolist()):
        for key in demo_eligible(data.traits(i)):
            out[j, keys.index(key)] = True
    return out


def _design(data: Dataset, rows: IntArray) -> FloatArray:
    """The reward model's user features: an intercept, the four categoricals one-hot (first level dropped) and
    the five numerics, transformed as the simulator's fit reads them."""
    columns = [np.ones(rows.size)]
    for vocabulary, values in (
        (PERSONAS, data.persona),
        (USE_CASES, data.use_case),
        (COMPANY_SIZES, data.company_size),
        (SIGNUP_SOURCES, data.signup_source),
    ):
        columns += [(values[rows] == v).astype(np.float64) for v in vocabulary[1:]]
    numeric = data.numeric[rows]
    columns += [
        (numeric[:, 0] - 50.0) / 20.0,
        np.log1p(numeric[:, 1]) / np.log1p(168.0),
        np.log1p(numeric[:, 2]),
        np.log1p(numeric[:, 3]),
        np.log(np.maximum(numeric[:, 4], 1.0) / 240.0),
    ]
    return np.stack(columns, axis=1)


def _path_features(users: FloatArray, paths: IntArray, k: int) -> FloatArray:
    """Per-path copies of the user features (each path its own coefficients) beside shared ones."""
    n, f = users.shape
    blocks = np.zeros((n, f * k))
    for path in range(k):
        chosen = paths == path
        blocks[chosen, path * f : (path + 1) * f] = users[chosen]
    return np.concatenate([blocks, users[:, 1:]], axis=1)


def reward_model(data: Dataset, train: IntArray, rows: IntArray) -> FloatArray:
    """Predicted activation of every path for ``rows``: a ridge logistic regression (per-path coefficients,
    Newton's method) fitted on the logged paths and outcomes of ``train``, the simulator's historical log."""
    k = len(data.path_keys)
    x = _path_features(_design(data, train), data.assigned[train], k)
    y = data.activated[train].astype(np.float64)
    beta = np.zeros(x.shape[1])
    ridge = RIDGE * np.eye(beta.size)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        step = np.linalg.solve((x * (p * (1.0 - p))[:, None]).T @ x + ridge, x.T @ (p - y) + RIDGE * beta)
        beta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    users = _design(data, rows)
    scores = [_path_features(users, np.full(rows.size, path), k) @ beta for path in range(k)]
    return np.asarray(1.0 / (1.0 + np.exp(-np.stack(scores, axis=1))), dtype=np.float64)


def _draw(rng: np.random.Generator, probabilities: FloatArray) -> IntArray:
    """One action per row of ``probabilities``, never one of probability 0 (rounding cannot pick a trailing one)."""
    cumulative = np.cumsum(probabilities, axis=1)
    cumulative[:, -1] = 1.0
    drawn = (rng.random(len(probabilities))[:, None] > cumulative).sum(axis=1)
    last = probabilities.shape[1] - 1 - np.argmax(probabilities[:, ::-1] > 0, axis=1)
    return np.asarray(np.minimum(drawn, last), dtype=np.int64)


def study(
    *,
    population: int = 8_000,
    model_sessions: int = 6_000,
    sample: int = 1_000,
    replicates: int = 200,
    seed: int = 11,
    level: float = 0.95,
    bootstrap: int = 0,
    scenarios: Sequence[Scenario] = SCENARIOS,
    data: Dataset | None = None,
) -> StudyReport:
    """Run the study of the module docstring; deterministic for a given ``seed``.

    ``data``: the simulated users (``generate(population + model_sessions, seed)``, the default), to share one
    draw between several studies; its first ``model_sessions`` train the reward model, the rest are the population.
    """
    if population < 2 or model_sessions < 1 or sample < 2 or replicates < 2:
        raise ValueError("population, sample and replicates need at least 2, model_sessions at least 1")
    started = time.perf_counter()
    if data is None:
        data = generate(population + model_sessions, seed=seed)
    elif data.n != population + model_sessions:
        raise ValueError(f"data has {data.n} users, not population + model_sessions = {population + model_sessions}")
    train = np.arange(model_sessions, dtype=np.int64)
    people = np.arange(model_sessions, model_sessions + population, dtype=np.int64)
    keys = data.path_keys
    expected = data.expected[people]
    predicted = reward_model(data, train, people)
    rules = np.array([keys.index(demo_rules_policy(data.traits(int(i)))) for i in people], dtype=np.int64)
    rules_scores = np.eye(len(keys))[rules]
    results = []
    for s, scenario in enumerate(scenarios):
        eligible = _eligibility(data, people, scenario.targeting)
        logging = ope.policy_probabilities(rules_scores, eligible, scenario.epsilon)
        target = ope.policy_probabilities(expected if scenario.target == "oracle" else predicted, eligible)
        truth = float((target * expected).sum(axis=1).mean())
        values: dict[str, list[ope.Estimate]] = {name: [] for name in ESTIMATORS}
        ess: list[float] = []
        for r in range(replicates):
            rng = np.random.default_rng([seed, s, r])
            idx = rng.integers(0, population, sample)
            actions = _draw(rng, logging[idx])
            rows = np.arange(sample)
            rewards = (rng.random(sample) < expected[idx, actions]).astype(np.float64)
            propensities = logging[idx][rows, actions]
            found = ope.evaluate_policy(
                actions, rewards, propensities, target[idx], predicted[idx], level=level, bootstrap=bootstrap, seed=rng
            )
            for name in ESTIMATORS:
                values[name].append(found[name])
            ess.append(found["ips"].effective_sample_size)
        summaries = []
        for name in ESTIMATORS:
            estimates = values[name]
            points = np.array([e.value for e in estimates])
            sd = float(points.std(ddof=1))
            summaries.append(
                EstimatorSummary(
                    estimator=name,
                    coverage=float(np.mean([e.covers(truth) for e in estimates])),
                    mean=float(points.mean()),
                    bias=float(points.mean() - truth),
                    bias_se=sd / float(np.sqrt(replicates)),
                    sd=sd,
                    mean_se=float(np.mean([e.standard_error for e in estimates])),
                    mean_width=float(np.mean([e.high - e.low for e in estimates])),
                )
            )
        results.append(
            ScenarioResult(
                scenario=scenario,
                truth=truth,
                logging_value=float((logging * expected).sum(axis=1).mean()),
                mean_ess=float(np.mean(ess)),
                estimators=tuple(summaries),
            )
        )
    return StudyReport(
        population=population,
        model_sessions=model_sessions,
        sample=sample,
        replicates=replicates,
        seed=seed,
        level=level,
        bootstrap=bootstrap,
        reward_model_rmse=float(np.sqrt(np.mean((predicted - expected) ** 2))),
        results=tuple(results),
        seconds=time.perf_counter() - started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firstmile_inference.ope_study", description=__doc__.split("\n")[0])
    parser.add_argument("--population", type=int, default=8_000, help="simulated users the samples are drawn from")
    parser.add_argument("--model-sessions", type=int, default=6_000, help="simulated sessions the reward model learns")
    parser.add_argument("--sample", type=int, default=1_000, help="logged decisions per replicate")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--bootstrap", type=int, default=0, help="resamples of a percentile bootstrap (0: normal)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    args = parser.parse_args(argv)
    report = study(
        population=args.population,
        model_sessions=args.model_sessions,
        sample=args.sample,
        replicates=args.replicates,
        seed=args.seed,
        level=args.level,
        bootstrap=args.bootstrap,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(report.to_markdown())
        sys.stderr.write(f"{report.seconds:.1f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
