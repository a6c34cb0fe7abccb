"""Wire types of the onboarding API (msgspec structs; ORM rows never leave repositories)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from firstmile.kit.ids import USER_ID_MAX_LENGTH, USER_ID_PATTERN

UserId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=USER_ID_MAX_LENGTH,
        pattern=USER_ID_PATTERN,
        description="The tenant's own id for the user: letters, digits and . _ : @ + -",
    ),
]
TraitValue = str | int | float | bool | None


class StartRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Start (or resume) a user's onboarding."""

    user_id: UserId
    traits: dict[str, TraitValue] = msgspec.field(default_factory=dict)


class CompleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Optional body of a step completion."""

    occurred_at: datetime | None = None


class PathRef(msgspec.Struct):
    id: str
    version: int
    name: str
    activation_step: str


class StepReview(msgspec.Struct):
    """The latest review of a completion of this step (docs/review.md)."""

    id: int
    status: str  # pending | approved | rejected
    reason: str
    note: str | None = None


class StepState(msgspec.Struct):
    id: str
    title: str
    description: str
    optional: bool
    prerequisites: list[str]
    completed: bool
    completed_at: datetime | None
    available: bool
    pending_review: bool = False
    """A completion waits for a person's review: the checklist can say so."""
    review: StepReview | None = None
    validation: str = "auto"


class ProgressSummary(msgspec.Struct):
    completed_required: int
    required: int
    percent: int


class DecisionRecord(msgspec.Struct):
    """How the path was chosen: ``selected_by`` model, rules or default; ``fallback`` names the
    fallback that fired (``rules`` when the model could not be used, ``default_path`` when no rule
    matched) and ``fallback_reason`` why the model was not used."""

    selected_by: str
    rule: str | None
    priority: int | None
    planner: str
    fallback: str | None
    candidates_evaluated: int
    decided_at: datetime
    model: str | None = None
    model_version: str | None = None
    confidence: float | None = None
    fallback_reason: str | None = None
    override: dict[str, Any] | None = None
    """For ``selected_by: human``: the override (its id, who set it, forced, the reason)."""
    shadow: dict[str, Any] | None = None
    """What the planner (or a model in shadow) chose besides the path taken."""


class OverrideRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Set a started user's path by hand (docs/review.md)."""

    path_id: str
    force: bool = False
    reason: str | None = None


class OnboardingState(msgspec.Struct):
    user_id: str
    path: PathRef
    status: str
    current_step: str | None
    activated: bool
    activated_at: datetime | None
    started_at: datetime
    completed_at: datetime | None
    progress: ProgressSummary
    steps: list[StepState]
    decision: DecisionRecord
