"""The port through which a start asks the experiment orchestrator first (the design's planner flow).

The experiments slice sits above onboarding, so onboarding names what it needs here and the wiring gives it
the orchestrator (:class:`firstmile.experiments.orchestrator.ExperimentOrchestrator`). An assigner must answer
quickly and never raise: when allocation fails or times out it answers None, and the user gets what they
would have got without experiments, the planner's path (the design's rule: allocation fails → control).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from firstmile.kit.db import TenantTx
from firstmile.kit.uow import UnitOfWork


@dataclass(frozen=True, slots=True)
class Assignment:
    """A user's variant of a path experiment: the path (and version) they start on, and why."""

    experiment: str
    variant: str
    path_key: str
    path_version: int | None
    """A pinned version of the path; None: its current version."""
    inputs: Mapping[str, Any] = field(default_factory=dict)
    """The allocation's hash inputs (seed, layer, draws), recorded with the exposure."""

    def as_record(self) -> dict[str, Any]:
        return {"id": self.experiment, "variant": self.variant, "inputs": dict(self.inputs)}


class ExperimentAssigner(Protocol):
    """Allocates a starting user to a running path experiment, and records the exposure."""

    async def assign(
        self, uow: UnitOfWork, revision: int, user_id: str, traits: Mapping[str, Any]
    ) -> Assignment | None:
        """The user's variant, or None (no experiment admits them, or allocation failed: control)."""
        ...

    async def record(self, tx: TenantTx, user_id: str, assignment: Assignment, now: datetime) -> None:
        """Record the exposure in the start's transaction (once per user and experiment)."""
        ...

    async def recheck(self, tx: TenantTx, user_id: str, assignment: Assignment) -> None:
        """A repeated start of a user: compare this allocation with their recorded exposure (a metric only)."""
        ...
