"""Does the shared warm-start model help a small tenant? Measured on the simulator, where every policy's value is known.

Each simulated tenant has a catalog of its own (:func:`tenant_catalog`): three to five of the demo paths' kinds,
renamed with the tenant's prefix (so no path key is shared between tenants) and perturbed (each path's base fit
by N(0, 0.3), every affinity scaled by U(0.7, 1.3), every step's difficulty shifted by N(0, 0.2)), its default
path the renamed ``generic``. Its decisions are logged as a tenant on the rules with exploration logs them: the
demo targeting rules mapped onto its catalog (a rule's path that the catalog lacks becomes its default), and
with probability ``epsilon`` (0.3) a path drawn uniformly from its whole catalog, each decision with its
propensity.

Per study seed (``--seeds``, five by default):

1. three *source* tenants with distinct catalogs log 12,000, 3,000 and 2,000 decisions; their decisions, reduced
   to the shared features (:func:`firstmile_inference.warm_start.shared_instance`) and balanced
   (:func:`~firstmile_inference.warm_start.pool`: the biggest is capped at twice the second, 6,000), train the
   shared model (:func:`~firstmile_inference.warm_start.train_shared`);
2. a *target* tenant with a catalog of its own logs ``n`` decisions for each size in ``--sizes`` (300, 500,
   800); its path model is trained on them twice with :func:`firstmile_inference.tenant.train_logged`, as
   ``firstmile models train --tenant`` does (70% to train, 30% for the off-policy report): *cold*, and
   *warm*, starting from the shared model;
3. each candidate's greedy policy (its best path over the target's catalog) is scored on 20,000 other users of
   the target tenant by the simulator's exact activation probabilities (its **true value**), beside the
   logging policy's and the oracle's; and the off-policy report's DR estimate (on the held-out 30%) and gate
   are recorded.

Command line (the table in docs/models.md#shared-warm-start-model)::

    python -m firstmile_inference.warm_start_study [--seeds 1,2,3,4,5] [--sizes 300,500,800] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

import numpy as np

from firstmile_inference.simulate import DEMO_CATALOG, Catalog, Dataset, StepSpec, demo_rules_policy, generate
from firstmile_inference.tenant import LoggedData, train_logged
from firstmile_inference.warm_start import TenantShare, WarmStart, train_shared

EPSILON: Final = 0.3
SOURCE_SIZES: Final = (12_000, 3_000, 2_000)
DEFAULT_SEEDS: Final = (1, 2, 3, 4, 5)
DEFAULT_SIZES: Final = (300, 500, 800)
POPULATION: Final = 20_000
_KINDS: Final = tuple(p.key for p in DEMO_CATALOG.paths if p.key != "generic")


def tenant_catalog(name: str, rng: np.random.Generator, size: int) -> tuple[Catalog, dict[str, str]]:
    """A catalog of ``size`` paths (``generic`` and ``size - 1`` other kinds), keys prefixed with ``name``; and the
    demo kind → this catalog's key map."""
    kinds = [str(k) for k in rng.choice(_KINDS, size=size - 1, replace=False)] + ["generic"]
    by_kind = {p.key: p for p in DEMO_CATALOG.paths}
    paths = []
    for kind in kinds:
        spec = by_kind[kind]

        def scaled(values: Mapping[str, float]) -> dict[str, float]:
            return {k: float(v * rng.uniform(0.7, 1.3)) for k, v in values.items()}

        paths.append(
            replace(
                spec,
                key=f"{name}-{kind}",
                base=float(spec.base + rng.normal(0.0, 0.3)),
                persona=scaled(spec.persona),
                use_case=scaled(spec.use_case),
                company_size=scaled(spec.company_size),
                signup_source=scaled(spec.signup_source),
                interactions=scaled(spec.interactions),
                steps=tuple(
                    StepSpec(s.id, float(s.difficulty + rng.normal(0.0, 0.2)), s.technical) for s in spec.steps
                ),
            )
        )
    keys = {kind: f"{name}-{kind}" for kind in kinds}
    return Catalog(paths=tuple(paths), default=keys["generic"]), keys


def _rules(keys: Mapping[str, str]) -> Callable[[Mapping[str, Any]], str]:
    default = keys["generic"]

    def choose(traits: Mapping[str, Any]) -> str:
        return keys.get(demo_rules_policy(traits), default)

    return choose


def logged(catalog: Catalog, keys: Mapping[str, str], n: int, seed: int) -> tuple[Dataset, LoggedData]:
    """``n`` decisions of the tenant's rules with epsilon-greedy exploration over its whole catalog."""
    rules = _rules(keys)
    data = generate(n, seed=seed, catalog=catalog, exploration=EPSILON, rules_policy=rules)
    k = len(catalog.keys)
    greedy = np.asarray([catalog.index(rules(data.traits(i))) for i in range(data.n)])
    propensity = np.where(data.assigned == greedy, 1.0 - EPSILON + EPSILON / k, EPSILON / k)
    return data, LoggedData(
        features=[dict(data.user_features(i)) for i in range(data.n)],
        actions=data.assigned.astype(np.int64),
        rewards=data.activated.astype(np.float64),
        propensities=propensity.astype(np.float64),
        eligible=np.ones((data.n, k), dtype=np.bool_),
        paths=catalog.keys,
    )


@dataclass(frozen=True)
class Run:
    seed: int
    decisions: int
    method: str  # cold | warm
    true_value: float  # the greedy policy's simulated activation on the population
    dr: float
    dr_low: float
    gate_passed: bool
    logging_value: float  # the logging policy's true value on the population
    oracle_value: float


def _value(trained: Any, population: Dataset) -> float:
    predictor = trained.predictor()
    with_scores = predictor.probabilities(predictor.encoder.encode(population.user_rows())).numpy()
    chosen = with_scores.argmax(axis=1)
    return float(population.expected[np.arange(population.n), chosen].mean())


def study(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every run (seed x size x cold/warm) and the summary per size (see the module docstring)."""
    started = time.perf_counter()
    runs: list[Run] = []
    for seed in seeds:
        rng = np.random.default_rng(10_000 + seed)
        shares = []
        for j, n in enumerate(SOURCE_SIZES):
            catalog, keys = tenant_catalog(f"s{j}", rng, int(rng.integers(3, 6)))
            _, log = logged(catalog, keys, n, seed * 100 + j)
            shares.append(TenantShare(log.features, log.rewards, log.actions, len(log.paths)))
        warm = WarmStart.from_trained(train_shared(shares, seed=seed), "study")
        catalog, keys = tenant_catalog("target", rng, 4)
        population, _ = logged(catalog, keys, POPULATION, seed * 100 + 50)
        rules = _rules(keys)
        greedy = np.asarray([catalog.index(rules(population.traits(i))) for i in range(population.n)])
        expected = population.expected
        logging_value = float(
            ((1 - EPSILON) * expected[np.arange(population.n), greedy] + EPSILON * expected.mean(axis=1)).mean()
        )
        oracle = float(expected.max(axis=1).mean())
        for n in sizes:
            _, log = logged(catalog, keys, n, seed * 100 + 60 + n)
            for method, start in (("cold", None), ("warm", warm)):
                trained = train_logged(log, seed=seed, warm_start=start)
                report = trained.metrics["ope"]
                dr = report["estimates"]["dr"]
                run = Run(seed, n, method, _value(trained, population), dr["value"], dr["low"],
                          bool(report["gate_passed"]), logging_value, oracle)  # fmt: skip
                runs.append(run)
                if progress:
                    progress(f"seed {seed} n {n} {method}: true {run.true_value:.4f} DR {run.dr:.4f} "
                             f"(logging {logging_value:.4f}, oracle {oracle:.4f})")  # fmt: skip
    return {
        "seeds": list(seeds),
        "sizes": list(sizes),
        "source_sizes": list(SOURCE_SIZES),
        "epsilon": EPSILON,
        "population": POPULATION,
        "summary": summary(runs, sizes),
        "runs": [asdict(r) for r in runs],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0}


def summary(runs: Sequence[Run], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per size: each method's true value (and as a share of the oracle's), DR estimate and gate passes, and the
    paired difference warm - cold of the true value."""
    out = []
    for n in sizes:
        cold = sorted((r for r in runs if r.decisions == n and r.method == "cold"), key=lambda r: r.seed)
        warm = sorted((r for r in runs if r.decisions == n and r.method == "warm"), key=lambda r: r.seed)
        row: dict[str, Any] = {"decisions": n, "seeds": len(cold)}
        for name, group in (("cold", cold), ("warm", warm)):
            row[name] = {
                "true_value": _mean_sd([r.true_value for r in group]),
                "of_oracle": _mean_sd([r.true_value / r.oracle_value for r in group]),
                "dr": _mean_sd([r.dr for r in group]),
                "gate_passed": sum(r.gate_passed for r in group),
            }
        diffs = [w.true_value - c.true_value for c, w in zip(cold, warm, strict=True)]
        row["warm_minus_cold"] = _mean_sd(diffs) | {"warm_better": sum(d > 0 for d in diffs)}
        row["logging_value"] = _mean_sd([r.logging_value for r in cold])
        row["oracle_value"] = _mean_sd([r.oracle_value for r in cold])
        out.append(row)
    return out


def to_markdown(result: Mapping[str, Any]) -> str:
    """The summary as docs/models.md shows it."""
    lines = [
        "| decisions | cold: true value (of the oracle's) | warm: true value (of the oracle's) | warm - cold "
        "(paired) | warm better | cold DR / gate | warm DR / gate | logging policy | oracle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        c, w, d = row["cold"], row["warm"], row["warm_minus_cold"]
        seeds = row["seeds"]
        lines.append(
            f"| {row['decisions']} | {c['true_value']['mean']:.3f} ± {c['true_value']['sd']:.3f} "
            f"({100 * c['of_oracle']['mean']:.1f}%) | {w['true_value']['mean']:.3f} ± {w['true_value']['sd']:.3f} "
            f"({100 * w['of_oracle']['mean']:.1f}%) | {d['mean']:+.3f} ± {d['sd']:.3f} | {d['warm_better']} of "
            f"{seeds} | {c['dr']['mean']:.3f} / {c['gate_passed']} of {seeds} | {w['dr']['mean']:.3f} / "
            f"{w['gate_passed']} of {seeds} | {row['logging_value']['mean']:.3f} | {row['oracle_value']['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _note(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firstmile_inference.warm_start_study")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="study seeds, comma-separated")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="the small tenant's decisions")
    parser.add_argument("--json", action="store_true", help="print every run and the summary as JSON")
    args = parser.parse_args(argv)
    result = study([int(s) for s in args.seeds.split(",")], [int(s) for s in args.sizes.split(",")], progress=_note)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
