"""The review queue and manual overrides for tenant apps (docs/review.md, docs/api.md#reviews).

``reviews:read`` lists and reads reviews and overrides; ``reviews:write`` decides reviews, pins segments and
revokes overrides (and reads). A decision is audited with the credential that made it as its reviewer
(``api_key:<id>`` or ``client:<id>``). Every refusal is a problem document and changes nothing: a bulk decision
runs in one unit of work, so one review that cannot be decided refuses the whole batch.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import Body, PathParameter, QueryParameter
from pydantic import ValidationError

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import ProblemError, strict_body
from firstmile.kit.ids import SLUG_PATTERN, SLUG_RE
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import review
from firstmile.onboarding.review import OverrideRow, ReviewRow
from firstmile.onboarding.schemas import (
    MAX_ID,
    BulkDecisionRequest,
    DecidedReviews,
    DecisionRequest,
    OverrideList,
    OverrideOut,
    ReviewOut,
    ReviewPage,
    SegmentPinRequest,
)
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.manifest import Predicate

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
MAX_AGE_SECONDS = 10 * 366 * 86_400
"""``older_than_seconds`` at most ten years."""

_READ = [require_scope("reviews:read", "reviews:write")]
_WRITE = [require_scope("reviews:write")]
_NO_REVIEW = {404: "review-not-found: the tenant has no such review"}
_DECIDE_PROBLEMS = {
    400: "validation-error: a decision that does not fit the review's kind (approve/reject a completion, "
    "right/wrong a decision), better_path on a completion or not a current path",
    404: "review-not-found: the tenant has no such review",
    409: "review-decided: decided already (status_now); step-prerequisites-unmet: approving a completion whose "
    "step's prerequisites are not complete",
}

ReviewIdPath = Annotated[int, PathParameter(description="The review's id", ge=1, le=MAX_ID)]
OverrideIdPath = Annotated[int, PathParameter(description="The override's id", ge=1, le=MAX_ID)]
Status = Literal["pending", "approved", "rejected", "right", "wrong", "any"]
Kind = Literal["step", "ambiguous", "decision"]
Slug = Annotated[str | None, QueryParameter(schema_extra={"pattern": SLUG_PATTERN, "max_length": 64})]


def review_out(row: ReviewRow) -> ReviewOut:
    return ReviewOut(
        id=row.id, kind=row.kind, reason=row.reason, status=row.status, user_id=row.user_id, path_id=row.path_key,
        path_version=row.path_version, step_id=row.step_id, source=row.source, occurred_at=row.occurred_at,
        details=row.details, created_at=row.created_at, note=row.note, better_path=row.better_path,
        decided_by=row.decided_by, decided_at=row.decided_at,
    )  # fmt: skip


def override_out(row: OverrideRow, now: datetime) -> OverrideOut:
    active = row.revoked_at is None and (row.expires_at is None or row.expires_at > now)
    return OverrideOut(
        id=row.id, path_id=row.path_key, forced=row.forced, created_by=row.created_by, created_at=row.created_at,
        active=active, user_id=row.user_id, segment=row.segment, reason=row.reason, expires_at=row.expires_at,
        revoked_at=row.revoked_at, revoked_by=row.revoked_by,
    )  # fmt: skip


def _invalid(key: str, message: str, source: str = "query") -> ProblemError:
    return ProblemError(
        400, "validation-error", f"{message} (at {key})", errors=[{"key": key, "message": message, "source": source}]
    )


def _slug(value: str | None, key: str) -> str | None:
    if value is not None and not SLUG_RE.fullmatch(value):
        raise _invalid(key, "a lower-case id: letters, digits, dashes")
    return value


class ReviewController(Controller):
    """The review queue: completions a person confirms and sampled low-confidence path decisions."""

    path = "/v1/reviews"
    tags = ["reviews"]

    @get(
        guards=_READ,
        summary="List reviews",
        description="Reviews, newest first, filtered: `status` (default `pending`; `any` for all), `kind`, `path`, "
        "`step`, `older_than_seconds` (created at least that long ago), `before` (a review id: the next page, "
        "as `next_before` says). Needs reviews:read or reviews:write.",
    )
    async def listing(
        self,
        uow: NamedDependency[UnitOfWork],
        status: Annotated[Status, QueryParameter(description="pending (default), a decided status, or any")] = (
            "pending"
        ),
        kind: Annotated[Kind | None, QueryParameter(description="step, ambiguous or decision")] = None,
        path: Slug = None,
        step: Slug = None,
        older_than_seconds: Annotated[
            int | None, QueryParameter(description="Created at least this many seconds ago", ge=0, le=MAX_AGE_SECONDS)
        ] = None,
        before: Annotated[
            int | None, QueryParameter(description="Only reviews with a smaller id (paging)", ge=1, le=MAX_ID)
        ] = None,
        limit: Annotated[int, QueryParameter(description=f"1..{MAX_LIMIT}", ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    ) -> ReviewPage:
        path_key, step_id = _slug(path, "path"), _slug(step, "step")
        created_before = None
        if older_than_seconds is not None:
            created_before = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        rows = await uow.run(
            lambda tx: review.listing(
                tx, status=None if status == "any" else status, kind=kind, path_key=path_key, step_id=step_id,
                created_before=created_before, before_id=before, limit=limit + 1,
            )
        )  # fmt: skip
        more = len(rows) > limit
        rows = rows[:limit]
        return ReviewPage([review_out(r) for r in rows], next_before=rows[-1].id if more else None)

    @get(
        "/{review_id:int}",
        guards=_READ,
        summary="A review",
        description="One review of the tenant (another tenant's is not found). Needs reviews:read or reviews:write.",
        opt={"problems": _NO_REVIEW},
    )
    async def one(self, review_id: ReviewIdPath, uow: NamedDependency[UnitOfWork]) -> ReviewOut:
        return review_out(await uow.run(lambda tx: review.get(tx, review_id)))

    @post(
        "/{review_id:int}/decision",
        guards=_WRITE,
        status_code=200,
        summary="Decide a review",
        description="`approve` completes the step at the time the completion happened (moving the user to the "
        "path's current version first when that was the ambiguity); `reject` leaves it open, with the note in the "
        "user's state. A `decision` review is `right` or `wrong` (`better_path`: the path the user should have "
        "had). Audited with this credential as the reviewer; an `onboarding.review_decided` event. Needs "
        "reviews:write.",
        opt={"problems": _DECIDE_PROBLEMS},
    )
    async def decide(
        self,
        request: Request[Principal, Any, Any],
        review_id: ReviewIdPath,
        data: Annotated[DecisionRequest, Body(description="The decision, a note, the better path")],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> ReviewOut:
        actor = request.user.actor
        decided = await uow.run(
            lambda tx: onboarding.decide_review(
                tx, review_id, data.decision, reviewer=actor, note=data.note, better_path=data.better_path
            )
        )
        return review_out(decided)

    @post(
        "/decisions",
        guards=_WRITE,
        status_code=200,
        summary="Decide reviews in bulk",
        description="Up to 100 decisions (`id`, `decision`, `note`) in one transaction: all are decided, or, when "
        "one is refused (not found, decided already, a decision that does not fit), none is, and the problem "
        "names the item (`index`, `review_id`). Answers the decided reviews in the order given. Needs "
        "reviews:write.",
        opt={"problems": _DECIDE_PROBLEMS},
    )
    async def decide_many(
        self,
        request: Request[Principal, Any, Any],
        data: Annotated[BulkDecisionRequest, Body(description="The decisions, 1 to 100, each review once")],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> DecidedReviews:
        data = strict_body(await request.body(), BulkDecisionRequest)  # "5" is not an id
        seen: dict[int, int] = {}
        for index, item in enumerate(data.decisions):
            if item.id in seen:
                raise _invalid(f"decisions[{index}].id", f"review {item.id} is decided twice", "body")
            seen[item.id] = index
        actor = request.user.actor

        decisions = [(item.id, item.decision, item.note) for item in data.decisions]
        rows = await uow.run(lambda tx: onboarding.decide_reviews(tx, decisions, reviewer=actor))
        return DecidedReviews([review_out(r) for r in rows])


class OverrideController(Controller):
    """Manual path overrides: segment pins, and the overrides of single users (set with
    ``PUT /v1/onboarding/{user_id}/path``)."""

    path = "/v1/overrides"
    tags = ["reviews"]

    @get(
        guards=_READ,
        summary="List overrides",
        description="Overrides newest first: of one user's path (`user_id`) and segment pins (`segment`); only "
        "those in force (not revoked, not expired) unless `active=false`. Needs reviews:read or reviews:write.",
    )
    async def listing(
        self,
        uow: NamedDependency[UnitOfWork],
        active: Annotated[bool, QueryParameter(description="Only those in force (default true)")] = True,
        limit: Annotated[int, QueryParameter(description=f"1..{MAX_LIMIT}", ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    ) -> OverrideList:
        now = datetime.now(UTC)
        rows = await uow.run(lambda tx: review.overrides(tx, active=active, now=now, limit=limit))
        return OverrideList([override_out(r, now) for r in rows])

    @post(
        "/pins",  # not POST /v1/overrides: Litestar's OPTIONS of a path with GET and POST handlers lists only one
        guards=_WRITE,
        status_code=201,
        summary="Pin a segment of users to a path",
        description="Users whose traits meet every predicate of `segment` (as a path's targeting: `field`, `op`, "
        "`value`) and who start from now until `expires_at` (or a revocation) get `path_id`, recorded as "
        "`selected_by: human` with the planner's own choice as the shadow. A user the path's targeting does not "
        "admit is left to the planner unless `force` (with a `reason`). Audited. Needs reviews:write.",
        opt={"problems": {404: "path-not-found: the tenant has no such current path"}},
    )
    async def pin(
        self,
        request: Request[Principal, Any, Any],
        data: Annotated[SegmentPinRequest, Body(description="The segment, the path, until when")],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> OverrideOut:
        data = strict_body(await request.body(), SegmentPinRequest)  # "true" is not a boolean
        segment = _segment(data.segment)
        if data.expires_at is not None and data.expires_at.tzinfo is None:
            raise _invalid("expires_at", "time zone required", "body")
        actor = request.user.actor
        made = await uow.run(
            lambda tx: onboarding.pin_segment(
                tx, segment, data.path_id, actor=actor, expires_at=data.expires_at, force=data.force,
                reason=data.reason,
            )
        )  # fmt: skip
        return override_out(made, datetime.now(UTC))

    @delete(
        "/{override_id:int}",
        guards=_WRITE,
        status_code=200,
        summary="Revoke an override",
        description="A segment pin stops applying to new starts (users it pinned keep their path); a user's "
        "override is marked revoked (the user stays on the path: set another with PUT "
        "/v1/onboarding/{user_id}/path). Audited. Needs reviews:write.",
        opt={"problems": {404: "override-not-found: no such override in force"}},
    )
    async def revoke(
        self,
        request: Request[Principal, Any, Any],
        override_id: OverrideIdPath,
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> OverrideOut:
        actor = request.user.actor
        revoked = await uow.run(lambda tx: onboarding.revoke_override(tx, override_id, actor=actor))
        return override_out(revoked, datetime.now(UTC))


def _segment(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segment's predicates checked as the manifest checks a path's targeting; 400 naming each fault."""
    errors: list[dict[str, str]] = []
    found: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            found.append(Predicate.model_validate(item).model_dump(mode="json"))
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(p) for p in error["loc"])
                key = f"segment[{index}]" + (f".{where}" if where else "")
                errors.append({"key": key, "message": error["msg"], "source": "body"})
    if errors:
        first = errors[0]
        raise ProblemError(400, "validation-error", f"{first['message']} (at {first['key']})", errors=errors)
    return found


__all__ = ["OverrideController", "ReviewController", "override_out", "review_out"]
