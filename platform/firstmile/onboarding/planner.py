"""The path planner: which path a new user starts on (pure, rule-based).

Targeted paths are tried by descending priority (the manifest forces distinct
priorities among them, so the choice is deterministic); the first whose
predicates all hold wins. Nothing matches: the tenant's default path.

:class:`PathPlanner` is the port the onboarding service asks; :class:`RulesPlanner`
is these rules behind it. The ML slice's adaptive planner
(:class:`firstmile.ml.planner.AdaptivePlanner`) implements the same port with a model
ahead of the rules; the wiring chooses which one the service gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.rules import describe, matches

if TYPE_CHECKING:
    from firstmile.onboarding.catalog import PathCatalog

PLANNER_VERSION = "rules-1"


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's decision record: what was chosen, how, and why."""

    path_key: str
    path_version: int
    selected_by: str  # "rules" | "default"
    rule: str | None
    priority: int | None
    candidates: int
    planner: str = PLANNER_VERSION
    # Set by the adaptive planner (firstmile.ml.planner) when a model was asked:
    model: str | None = None
    model_version: str | None = None
    confidence: float | None = None
    fallback_reason: str | None = None  # why the model's answer was not used
    details: Mapping[str, Any] = field(default_factory=dict)  # features, scores, stage, shadow, latency

    @property
    def fallback(self) -> str | None:
        """Which fallback fired: ``rules`` (model failed), ``default_path`` (nothing matched), or none."""
        if self.selected_by == "default":
            return "default_path"
        if self.selected_by == "rules" and self.fallback_reason is not None:
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


class PathPlanner(Protocol):
    """Chooses a new user's path; may talk to the network (features, a model), never to the database."""

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> Decision: ...


class RulesPlanner:
    """The targeting rules, then the default path: the planner with no model."""

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> Decision:
        return plan(catalog.current, catalog.default_key, traits)
