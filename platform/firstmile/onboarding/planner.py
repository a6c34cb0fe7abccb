"""The path planner: which path a new user starts on (pure, rule-based).

Targeted paths are tried by descending priority (the manifest forces distinct
priorities among them, so the choice is deterministic); the first whose
predicates all hold wins. Nothing matches: the tenant's default path.

:class:`PathPlanner` is the port the onboarding service asks; :class:`RulesPlanner`
is these rules behind it. The ML slice's adaptive planner
(:class:`firstmile.ml.planner.AdaptivePlanner`) implements the same port with a model
ahead of the rules; the wiring chooses which one the service gets.

Both end with :func:`explore`: the tenant's epsilon-greedy exploration (manifest
``planner.exploration``, off by default) over the user's *eligible* paths, and the
*propensity* of the path taken, the probability with which the logging policy chose
it, recorded on every decision so the logged decisions stay usable for off-policy
evaluation and learning (docs/models.md#exploration-and-propensities).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.rules import describe, matches

if TYPE_CHECKING:
    from firstmile.onboarding.catalog import PathCatalog

PLANNER_VERSION = "rules-1"
EXPLORATION_POLICY = "epsilon_greedy"


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's decision record: what was chosen, how, and why."""

    path_key: str
    path_version: int
    selected_by: str  # "model" | "rules" | "default" | "exploration" (| "experiment" | "human", set by the service)
    rule: str | None
    priority: int | None
    candidates: int
    planner: str = PLANNER_VERSION
    # Set by the adaptive planner (firstmile.ml.planner) when a model was asked:
    model: str | None = None
    model_version: str | None = None
    confidence: float | None = None
    fallback_reason: str | None = None  # why the model's answer was not used
    details: Mapping[str, Any] = field(default_factory=dict)  # features, scores, stage, shadow, latency, propensity

    @property
    def fallback(self) -> str | None:
        """Which fallback fired: ``rules`` (model failed), ``default_path`` (nothing matched), or none."""
        if self.selected_by == "default":
            return "default_path"
        if self.selected_by in ("rules", "exploration") and self.fallback_reason is not None:
            return "rules"
        return None

    def after_model_failure(self, model: str, reason: str, **details: Any) -> Decision:
        """This rule-based decision, recorded as the fallback of a model that could not be used."""
        return replace(self, model=model, fallback_reason=reason, details={**self.details, **details})

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "selected_by": self.selected_by,
            "rule": self.rule,
            "priority": self.priority,
            "candidates_evaluated": self.candidates,
            "planner": self.planner,
            "fallback": self.fallback,
        }
        if self.model is not None:
            record |= {
                "model": self.model,
                "model_version": self.model_version,
                "confidence": self.confidence,
                "fallback_reason": self.fallback_reason,
            }
        return record | dict(self.details)


def plan(paths: Sequence[PathDef], default_key: str, traits: Mapping[str, Any]) -> Decision:
    """Choose a path for a user with ``traits`` among the current ``paths``."""
    targeted = sorted((p for p in paths if p.targeting), key=lambda p: (-p.priority, p.key))
    for evaluated, path in enumerate(targeted, start=1):
        if all(matches(r["field"], r.get("op", "eq"), r.get("value"), traits) for r in path.targeting):
            rule = " AND ".join(describe(r["field"], r.get("op", "eq"), r.get("value")) for r in path.targeting)
            return Decision(path.key, path.version, "rules", f"{path.key}: {rule}", path.priority, evaluated)
    default = next((p for p in paths if p.key == default_key), None)
    if default is None:
        raise LookupError(f"default path {default_key!r} is not among the current paths")
    return Decision(default.key, default.version, "default", None, None, len(targeted))


def eligible_paths(
    paths: Sequence[PathDef], default_key: str, traits: Mapping[str, Any], greedy_key: str
) -> tuple[PathDef, ...]:
    """The paths exploration may choose for a user, in catalog order: those whose targeting holds for ``traits``,
    the default path, and the planner's own (greedy) choice. A path without targeting other than the default
    is never chosen by the rules, so it is never explored into either (the model may still choose it)."""
    return tuple(
        p
        for p in paths
        if p.key in (default_key, greedy_key)
        or (p.targeting and all(matches(r["field"], r.get("op", "eq"), r.get("value"), traits) for r in p.targeting))
    )


def explore(
    decision: Decision,
    paths: Sequence[PathDef],
    default_key: str,
    traits: Mapping[str, Any],
    epsilon: float,
    rng: random.Random,
) -> Decision:
    """The decision actually taken under epsilon-greedy exploration, with its ``propensity`` and ``exploration``.

    ``decision`` is the greedy choice (the model's, the rules', or the default path). With probability
    ``epsilon`` the path is instead drawn uniformly from the ``K`` eligible paths (:func:`eligible_paths`,
    the greedy one among them), so the greedy path is taken with probability ``1 - epsilon + epsilon / K``
    and any other eligible path with ``epsilon / K``: that probability is the decision's ``propensity``.
    ``epsilon`` 0 draws nothing: a deterministic choice, ``propensity`` 1 and ``exploration`` null.
    ``explored`` says the exploration draw fired (the uniform draw may still land on the greedy path; only a
    different path is recorded as ``selected_by: exploration``, without rule and confidence, the greedy path
    in ``exploration.greedy`` and the model that chose it, if any, in ``model``/``model_version``).
    """
    if epsilon <= 0.0:
        return replace(decision, details={**decision.details, "propensity": 1.0, "exploration": None})
    if epsilon > 1.0:
        raise ValueError(f"exploration epsilon {epsilon} is not a probability")
    eligible = eligible_paths(paths, default_key, traits, decision.path_key)
    explored = rng.random() < epsilon
    chosen = eligible[rng.randrange(len(eligible))] if explored else None
    k = len(eligible)
    record: dict[str, Any] = {
        "policy": EXPLORATION_POLICY,
        "epsilon": epsilon,
        "explored": explored,
        "eligible": [p.key for p in eligible],
        "greedy": decision.path_key,
    }
    if chosen is None or chosen.key == decision.path_key:
        propensity = 1.0 - epsilon + epsilon / k
        return replace(decision, details={**decision.details, "propensity": propensity, "exploration": record})
    return replace(
        decision,
        path_key=chosen.key,
        path_version=chosen.version,
        selected_by="exploration",
        rule=None,
        priority=None,
        confidence=None,
        details={**decision.details, "propensity": epsilon / k, "exploration": record},
    )


class PathPlanner(Protocol):
    """Chooses a new user's path; may talk to the network (features, a model), never to the database."""

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> Decision: ...


class RulesPlanner:
    """The targeting rules, then the default path: the planner with no model (and the tenant's exploration)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()  # the exploration draws; tests pass a seeded one

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> Decision:
        decision = plan(catalog.current, catalog.default_key, traits)
        return explore(decision, catalog.current, catalog.default_key, traits, catalog.exploration, self.rng)
