"""The port through which a nudge decision asks the experiment orchestrator for the user's nudge variant.

The experiments slice sits above nudges, so nudges names what it needs here and the wiring gives it the
orchestrator (:class:`firstmile.experiments.orchestrator.ExperimentOrchestrator`). A variant of a nudge experiment
fixes the template variant, the channel, or both; the bandit then chooses among the arms the variant admits.
An assigner must never raise: when allocation fails it answers None and the decision is the bandit's alone.

Who counts as exposed (docs/experiments.md, "Nudge experiments"): a user is exposed at the first decision of
the experiment's trigger where **every** variant has an arm the policy allows (so the variants compete for
the same users; which variant a user gets does not decide whether they are in). Later decisions keep the
recorded variant; one whose arms the policy now denies falls back to the bandit's choice and says so
(``honoured: false`` in the decision), and the user stays counted in their variant (intention to treat).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from firstmile.kit.db import TenantTx


@dataclass(frozen=True, slots=True)
class NudgeVariant:
    """One variant of a nudge experiment: the template variant and channel its nudges use (None: any)."""

    name: str
    template: str | None = None
    channel: str | None = None

    def admits(self, template: str, channel: str) -> bool:
        """Whether an arm (a wording's variant on a channel) belongs to this variant."""
        return (self.template is None or self.template == template) and (
            self.channel is None or self.channel == channel
        )


@dataclass(frozen=True, slots=True)
class NudgeAssignment:
    """A user's variant of a nudge experiment, the experiment's other variants, and the hash inputs."""

    experiment: str
    variant: NudgeVariant
    variants: tuple[NudgeVariant, ...]
    exposed: bool
    """Whether the exposure is recorded already (an earlier decision): then the variant holds whatever the arms."""
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def as_record(self, honoured: bool) -> dict[str, Any]:
        return {"id": self.experiment, "variant": self.variant.name, "honoured": honoured,
                "inputs": dict(self.inputs)}  # fmt: skip


class NudgeExperimentAssigner(Protocol):
    """Allocates a user at a nudge decision to a running nudge experiment, and records the exposure."""

    async def assign_nudge(
        self, tx: TenantTx, user_id: str, traits: Mapping[str, Any], trigger: str
    ) -> NudgeAssignment | None:
        """The user's variant for a decision of ``trigger``, or None (no experiment admits them, or failure)."""
        ...

    async def record_nudge(
        self, tx: TenantTx, user_id: str, assignment: NudgeAssignment, now: datetime, send_id: str
    ) -> None:
        """Record the exposure in the decision's transaction (once per user and experiment)."""
        ...
