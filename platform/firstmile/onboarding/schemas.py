"""Wire types of the onboarding API (msgspec structs; ORM rows never leave repositories)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from firstmile.kit.ids import SLUG_PATTERN, USER_ID_MAX_LENGTH, USER_ID_PATTERN

MAX_REASON = 1000
"""The longest reason of an override and note of a review decision (characters)."""
MAX_ID = 2**63 - 1
"""Review and override ids are PostgreSQL bigints."""
MAX_BULK = 100
"""The most reviews one bulk decision decides."""
MAX_PREDICATES = 20
"""The most predicates of a segment pin."""

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
PathId = Annotated[str, Meta(min_length=2, max_length=64, pattern=SLUG_PATTERN, description="A path's id")]
Reason = Annotated[str, Meta(min_length=1, max_length=MAX_REASON, description="Why (free text, audited)")]


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
    propensity: float | None = None
    """The probability with which the logging policy chose this path (1 without exploration; docs/models.md)."""
    exploration: dict[str, Any] | None = None
    """The exploration in force: policy, epsilon, whether this decision explored, the eligible paths."""


class OverrideRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Set a started user's path by hand (docs/review.md)."""

    path_id: PathId
    force: bool = False
    """Set a path whose targeting the user does not meet (``reason`` then required)."""
    reason: Reason | None = None


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


# ---- the review queue and overrides (docs/review.md, docs/api.md#reviews) ----

ReviewDecision = Literal["approve", "reject", "right", "wrong"]
"""``approve`` or ``reject`` a completion (a ``step`` or ``ambiguous`` review); ``right`` or ``wrong`` for a
model's decision (a ``decision`` review)."""
ReviewId = Annotated[int, Meta(ge=1, le=MAX_ID, description="A review's id")]
Note = Annotated[str, Meta(max_length=MAX_REASON, description="The reviewer's note (free text)")]


class ReviewOut(msgspec.Struct):
    """One item of the review queue."""

    id: int
    kind: str
    """``step`` (a ``validation: review`` step), ``ambiguous`` (a completion that could not be decided) or
    ``decision`` (a sampled low-confidence path decision)."""
    reason: str
    """``review_step``, ``partial_match``, ``path_version_changed``, ``contradicts_record`` or ``low_confidence``."""
    status: str
    """``pending``; then ``approved`` or ``rejected`` (a completion), ``right`` or ``wrong`` (a decision)."""
    user_id: str
    path_id: str
    path_version: int
    step_id: str | None
    source: str
    """Where the completion came from: ``api``, ``event:<event id>``, or ``path_planner`` for a decision."""
    occurred_at: datetime
    """When the completion happened (approval completes the step at this time), or when the path was chosen."""
    details: dict[str, Any]
    """What the reviewer needs: the criteria met, the versions, the time on record, the model's confidence."""
    created_at: datetime
    note: str | None = None
    better_path: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None


class ReviewPage(msgspec.Struct):
    """Reviews, newest first; ``next_before``: pass it as ``before`` for the next page (null: no more)."""

    reviews: list[ReviewOut]
    next_before: int | None = None


class DecisionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Decide one review."""

    decision: ReviewDecision
    note: Note | None = None
    better_path: PathId | None = None
    """A ``decision`` review judged wrong: the path the user should have had (a current path)."""


class BulkDecision(msgspec.Struct, forbid_unknown_fields=True):
    id: ReviewId
    decision: ReviewDecision
    note: Note | None = None


class BulkDecisionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Decide up to 100 reviews at once: all of them, or (any refused) none."""

    decisions: Annotated[list[BulkDecision], Meta(min_length=1, max_length=MAX_BULK)]


class DecidedReviews(msgspec.Struct):
    reviews: list[ReviewOut]


Predicate = dict[str, Any]


class SegmentPinRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Pin the users of a segment who start from now on to a path (docs/review.md)."""

    segment: Annotated[list[Predicate], Meta(min_length=1, max_length=MAX_PREDICATES)]
    """Predicates over the user's traits, as a path's ``targeting``: ``{field, op, value}``, all must hold."""
    path_id: PathId
    expires_at: datetime | None = None
    """When the pin stops applying (RFC 3339 with a time zone, in the future); null: until revoked."""
    force: bool = False
    """Apply it also to users the path's targeting does not admit (``reason`` then required)."""
    reason: Reason | None = None


class OverrideOut(msgspec.Struct):
    """A manual override: of one user's path (``user_id``), or a segment pin (``segment``)."""

    id: int
    path_id: str
    forced: bool
    created_by: str
    created_at: datetime
    active: bool
    """In force: not revoked, not expired."""
    user_id: str | None = None
    segment: list[dict[str, Any]] | None = None
    reason: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


class OverrideList(msgspec.Struct):
    overrides: list[OverrideOut]
