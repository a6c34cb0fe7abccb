"""An experiment's results: the analytics store's counts per variant, judged by :mod:`firstmile.experiments.stats`.

:func:`analyse` asks the analytics store (through :class:`~firstmile.analytics.service.AnalyticsService`, with
its timeout and its cache of the last good answer) for each variant's exposed users and what they did after
their exposure, then computes the primary metric's Bayesian comparison, the sequential test, the sample-ratio
check against the variants' weights (times the traffic's independence: the shares are the weights), the
guardrails and the continuous metrics, and the verdict of this look with the extension rule.

The design's rule "stats engine unavailable → defer analysis": when the store cannot answer and nothing is
cached, or the statistics fail (too few users for a check, a numerical failure), the result's verdict is
``deferred`` with the reason. Nothing about allocation depends on it: users keep being allocated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from firstmile.analytics.queries import ExperimentArm
from firstmile.analytics.service import AnalyticsService
from firstmile.experiments import stats
from firstmile.experiments.repository import ExperimentRow
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import TenantId
from firstmile.tenancy.manifest import ExperimentSpec

log = logging.getLogger("firstmile.experiments")

GUARDRAIL_TOLERANCE = 0.02
"""How much worse (absolute rate) a guardrail may get before it can veto: two percentage points."""
SINCE_SLACK = timedelta(minutes=5)
"""Exposures are read from a little before the start (clocks of other processes)."""


@dataclass(frozen=True, slots=True)
class Result:
    """One look at an experiment (JSON-ready through :meth:`as_dict`)."""

    experiment_id: str
    computed_at: str | None
    stale: bool
    day: int
    arms: list[dict[str, Any]]
    srm: dict[str, Any] | None
    guardrails: list[dict[str, Any]]
    continuous: dict[str, list[dict[str, Any]]]
    verdict: dict[str, Any]
    review: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _deferred(row: ExperimentRow, reason: str, day: int, arms: list[dict[str, Any]] | None = None) -> Result:
    return Result(row.id, None, False, day, arms or [], None, [], {}, {"kind": "deferred", "variant": None,
                  "reasons": [reason]})  # fmt: skip


async def analyse(analytics: AnalyticsService, tenant: TenantId, row: ExperimentRow, now: datetime) -> Result:
    """The results of ``row`` now (see the module docstring)."""
    spec = ExperimentSpec.model_validate(row.definition)
    day = max(0, (now - row.started_at).days) if row.started_at is not None else 0
    if row.started_at is None:
        return _deferred(row, "the experiment has not started", day)
    since = row.started_at - SINCE_SLACK
    step = spec.metric.removeprefix("step:") if spec.metric != "activation" else None
    try:
        computed = await analytics.run(tenant, "experiment", (row.id, step, since.isoformat()),
                                       lambda: analytics.queries.experiment(tenant, row.id, step, since))  # fmt: skip
    except ProblemError as exc:  # the store is unavailable and nothing is cached: defer (design rule)
        return _deferred(row, f"analytics unavailable: {exc.detail}", day)
    found = {a.variant: a for a in computed.value}
    arms = [found.get(v.name) or ExperimentArm(v.name, 0, 0, 0, None, None, 0.0, None, 0, 0) for v in spec.variants]
    try:
        result = await asyncio.to_thread(_judge, spec, row, arms, day)
    except (ValueError, ArithmeticError) as exc:  # too few users for a check, a numerical failure: defer
        log.warning("experiment analysis deferred: %s", exc, extra={"fields": {"experiment": row.id}})
        return _deferred(row, f"statistics unavailable: {exc}", day, [_arm_counts(a) for a in arms])
    return Result(row.id, computed.computed_at.isoformat(), computed.stale, day, *result)


def _arm_counts(arm: ExperimentArm) -> dict[str, Any]:
    rate = arm.converted / arm.users if arm.users else None
    return {"variant": arm.variant, "users": arm.users, "converted": arm.converted, "rate": rate,
            "activated": arm.activated, "stuck": arm.stuck, "unsubscribed": arm.unsubscribed}  # fmt: skip


def _judge(
    spec: ExperimentSpec, row: ExperimentRow, arms: list[ExperimentArm], day: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]],
           dict[str, Any], dict[str, Any]]:  # fmt: skip
    by_name = {a.variant: a for a in arms}
    order = [spec.control] + [v.name for v in spec.variants if v.name != spec.control]
    binary = [stats.BinaryArm(n, by_name[n].users, by_name[n].converted) for n in order]
    primary = stats.analyse_binary(binary, control=spec.control, seed=stats.DEFAULT_SEED)
    sequential = [stats.msprt(binary[0], arm, alpha=spec.thresholds.alpha) for arm in binary[1:]]
    weights = {v.name: v.weight for v in spec.variants}
    srm = stats.sample_ratio_mismatch([by_name[n].users for n in order], [weights[n] for n in order])
    guardrails = []
    for guard in spec.guardrails:
        counts = [stats.BinaryArm(n, by_name[n].users, by_name[n].stuck if guard == "stuck_rate"
                                  else by_name[n].unsubscribed) for n in order]  # fmt: skip
        guardrails.append(stats.analyse_guardrail(guard, counts, tolerance=GUARDRAIL_TOLERANCE, control=spec.control))
    config = stats.DecisionConfig(chance_to_beat=spec.thresholds.chance_to_beat,
                                  expected_loss=spec.thresholds.expected_loss, alpha=spec.thresholds.alpha)  # fmt: skip
    verdict = stats.decide(primary, sequential, srm, guardrails, config)
    policy = stats.ExtensionPolicy(spec.planned_days, max_extensions=spec.max_extensions)
    review = stats.review(verdict, day=day, extensions=min(row.extensions, spec.max_extensions), policy=policy)
    tests = {t.variant: t for t in sequential}
    out_arms = []
    for name in order:
        entry = _arm_counts(by_name[name]) | {"control": name == spec.control,
                                               "chance_to_be_best": primary.arm(name).chance_to_be_best}  # fmt: skip
        if name != spec.control:
            c, t = primary.comparison(name), tests[name]
            entry |= {"chance_to_beat_control": c.chance_to_beat_control, "expected_loss": c.expected_loss,
                      "uplift_mean": c.uplift_mean, "uplift_interval": list(c.uplift_interval),
                      "sequential_p": t.p_value, "difference_interval": list(t.confidence_sequence)}  # fmt: skip
        out_arms.append(entry)
    continuous = {
        "seconds_to_activation": _continuous(by_name, order, spec.control, "tta", higher_is_better=False),
        "steps_completed": _continuous(by_name, order, spec.control, "steps", higher_is_better=True),
    }
    return (
        out_arms,
        {"p_value": srm.p_value, "statistic": srm.statistic, "mismatch": bool(srm.p_value < config.srm_threshold)},
        [{"name": g.name, "variants": {c.variant: c.probability_worse for c in g.comparisons}} for g in guardrails],
        continuous,
        {"kind": str(verdict.kind), "variant": verdict.variant, "guardrails": list(verdict.guardrails),
         "reasons": list(verdict.reasons)},
        {"action": str(review.action), "end_day": review.end_day, "extensions": review.extensions,
         "verdict": str(review.verdict.kind)},
    )  # fmt: skip


def _continuous(
    arms: Mapping[str, ExperimentArm], order: list[str], control: str, which: str, *, higher_is_better: bool
) -> list[dict[str, Any]]:
    """Welch/delta-method comparisons of a continuous metric, where every arm has enough values (else none)."""
    built = []
    for name in order:
        a = arms[name]
        n, mean, var = ((a.activated, a.seconds_to_activation_mean, a.seconds_to_activation_variance)
                        if which == "tta" else (a.users, a.steps_mean, a.steps_variance))  # fmt: skip
        if n < 2 or mean is None or var is None:
            return []
        built.append(stats.ContinuousArm(name, n, mean, var))
    analysis = stats.analyse_continuous(built, control=control, higher_is_better=higher_is_better)
    return [{"variant": c.variant, "difference": c.difference, "interval": list(c.difference_interval),
             "chance_to_beat_control": c.chance_to_beat_control} for c in analysis.comparisons]  # fmt: skip
