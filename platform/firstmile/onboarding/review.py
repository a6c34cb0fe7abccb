"""Human in the loop: the review queue and manual path overrides (docs/review.md).

The progress evaluator and the planner send a person what they should not decide alone:

- **step** reviews: a completion of a step whose manifest says ``validation: review`` (a signed contract, a
  security review) waits here instead of completing;
- **ambiguous** reviews: a completion whose criteria cannot be decided, with its ``reason``:
  ``partial_match`` (a tracked event of the step's name whose properties meet only some of the criteria),
  ``path_version_changed`` (a completion of a step that the path's current version has and the user's
  pinned version does not), ``contradicts_record`` (a completion claimed through the API at a time before
  the user started the path, by more than the 5 minutes of clock skew allowed);
- **decision** reviews: a sample of the model's path decisions below a confidence threshold
  (``low_confidence``); the reviewer marks each ``right`` or ``wrong``, or names the better path, and the
  verdicts become labels for training and the drift report.

Approving a completion completes the step at the time the completion happened (``occurred_at``), as its
source would have; rejecting leaves the step open with the reviewer's note. Each review and each decision is
an audit entry naming its reviewer, and an outbox event (``onboarding.review_created``,
``onboarding.review_decided``) that webhook destinations can subscribe to.

A manual override is a person's choice of path: for one started user (moved at once, keeping the
completions of the steps both paths share) or for a segment of users (predicates over traits) who start
while the pin is in force. A path the user is not eligible for (its targeting does not hold) is refused
unless forced with a reason. The planner's own choice is still computed and recorded as the decision's
``shadow``, so the model's accuracy can be compared with the person's.

Pure rules here, and the functions the service and the controllers call; all SQL is in ``repository``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.outbox import OutboxEvent, enqueue
from firstmile.onboarding import repository as repo
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.rules import matches

KINDS: tuple[str, ...] = ("step", "ambiguous", "decision")
REASONS: dict[str, str] = {
    "review_step": "the step asks a person to confirm each completion",
    "partial_match": "the event has the step's name, but its properties meet only some of the criteria",
    "path_version_changed": "the step is on the path's current version, not on the version the user is on",
    "contradicts_record": "the completion is dated before the user started the path (more than the clock skew)",
    "low_confidence": "the model chose this path with low confidence",
}
COMPLETION_DECISIONS: tuple[str, ...] = ("approve", "reject")
DECISION_VERDICTS: tuple[str, ...] = ("right", "wrong")
_STATUS_OF = {"approve": "approved", "reject": "rejected", "right": "right", "wrong": "wrong"}

ReviewRow = repo.ReviewRow
OverrideRow = repo.OverrideRow


@dataclass(frozen=True, slots=True)
class ReviewSampling:
    """Which model decisions go to review: those below ``threshold`` confidence, a ``rate`` share of them."""

    threshold: float = 0.6
    rate: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.rate <= 1.0:
            raise ValueError("the review threshold and sample rate are between 0 and 1")


@dataclass(frozen=True, slots=True)
class Pin:
    """A segment pin in force: users whose traits meet ``segment`` start on ``path_key``."""

    id: int
    segment: tuple[Mapping[str, Any], ...]
    path_key: str
    forced: bool
    reason: str | None
    created_by: str
    expires_at: datetime | None

    def applies(self, traits: Mapping[str, Any], now: datetime) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return False
        return all(matches(p["field"], p.get("op", "eq"), p.get("value"), traits) for p in self.segment)

    def as_record(self) -> dict[str, Any]:
        return {"override_id": self.id, "by": self.created_by, "forced": self.forced, "reason": self.reason}


def eligible(path: PathDef, traits: Mapping[str, Any]) -> bool:
    """The user's traits meet the path's targeting (every path with none is open to anyone)."""
    return all(matches(r["field"], r.get("op", "eq"), r.get("value"), traits) for r in path.targeting)


def criteria_met(completion: Mapping[str, Any], properties: Mapping[str, Any]) -> tuple[int, int]:
    """How many of a step's property criteria ``properties`` meet, and how many there are."""
    where = completion.get("where") or ()
    met = sum(1 for w in where if matches(w["field"], w.get("op", "eq"), w.get("value"), properties))
    return met, len(where)


def status_of(kind: str, decision: str) -> str:
    """The review's status after ``decision``; a 400 problem when the decision does not fit its kind."""
    allowed = DECISION_VERDICTS if kind == "decision" else COMPLETION_DECISIONS
    if decision not in allowed:
        raise ProblemError(
            400,
            "validation-error",
            f"a {kind} review is decided with one of {list(allowed)} (at decision)",
            errors=[{"key": "decision", "message": f"one of {list(allowed)}"}],
        )
    return _STATUS_OF[decision]


def _event(event_type: str, row: ReviewRow) -> OutboxEvent:
    payload: dict[str, Any] = {
        "review_id": row.id,
        "kind": row.kind,
        "reason": row.reason,
        "status": row.status,
        "user_id": row.user_id,
        "path_id": row.path_key,
        "path_version": row.path_version,
        "step_id": row.step_id,
        "occurred_at": row.occurred_at.isoformat(),
    }
    if row.decided_by is not None:
        payload |= {"decided_by": row.decided_by, "note": row.note, "better_path": row.better_path}
    return OutboxEvent.new(event_type, payload)


async def queue(
    tx: TenantTx,
    *,
    kind: str,
    reason: str,
    user_id: str,
    path: PathDef,
    step_id: str | None,
    source: str,
    occurred_at: datetime,
    details: Mapping[str, Any],
    now: datetime,
) -> ReviewRow:
    """Queue a review (audited, with its outbox event); a pending one for the same user and step is reused."""
    if kind not in KINDS or reason not in REASONS:
        raise ValueError(f"unknown review kind or reason: {kind}/{reason}")
    row, created = await repo.insert_review(
        tx, kind=kind, reason=reason, user_id=user_id, path_key=path.key, path_version=path.version,
        step_id=step_id, source=source, occurred_at=occurred_at, details=dict(details), now=now,
    )  # fmt: skip
    if created:
        telemetry.REVIEWS_CREATED.labels(kind, reason).inc()
        await audit.append(
            tx,
            "review",
            "progress_evaluator" if kind != "decision" else "path_planner",
            user_id,
            {
                "review": "created",
                "review_id": row.id,
                "kind": kind,
                "reason": reason,
                "path_id": path.key,
                "path_version": path.version,
                "step_id": step_id,
                "source": source,
            },
        )
        await enqueue(tx, [_event("onboarding.review_created", row)], user_id=user_id, now=now)
    return row


async def record_decision(
    tx: TenantTx,
    review: ReviewRow,
    decision: str,
    *,
    note: str | None,
    better_path: str | None,
    reviewer: str,
    now: datetime,
) -> ReviewRow:
    """Mark a pending review decided (audited with its reviewer, with its outbox event); 409 when it is not
    pending any more. Completing an approved step is the caller's (``OnboardingService.decide_review``)."""
    status = status_of(review.kind, decision)
    if review.status != "pending":
        raise ProblemError(
            409,
            "review-decided",
            f"review {review.id} was decided already ({review.status} by {review.decided_by})",
            status_now=review.status,
        )
    decided = await repo.decide_review(tx, review.id, status, note, better_path, reviewer, now)
    if decided is None:  # decided by someone else since it was read
        raise ProblemError(409, "review-decided", f"review {review.id} was decided already")
    await audit.append(
        tx,
        "review",
        reviewer,
        review.user_id,
        {
            "review": "decided",
            "review_id": review.id,
            "kind": review.kind,
            "reason": review.reason,
            "decision": decision,
            "status": status,
            "note": note,
            "better_path": better_path,
            "path_id": review.path_key,
            "path_version": review.path_version,
            "step_id": review.step_id,
        },
    )
    await enqueue(tx, [_event("onboarding.review_decided", decided)], user_id=review.user_id, now=now)
    telemetry.REVIEWS_DECIDED.labels(review.kind, status).inc()
    return decided


async def get(tx: TenantTx, review_id: int, *, for_update: bool = False) -> ReviewRow:
    """One review of the tenant; 404 otherwise (another tenant's is not found: row-level security)."""
    row = await repo.get_review(tx, review_id, for_update=for_update)
    if row is None:
        raise ProblemError(404, "review-not-found", f"no review {review_id}")
    return row


async def listing(
    tx: TenantTx,
    *,
    status: str | None = "pending",
    kind: str | None = None,
    path_key: str | None = None,
    step_id: str | None = None,
    created_before: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[ReviewRow]:
    """Reviews, newest first, filtered (``status`` None: any)."""
    return await repo.list_reviews(
        tx, status=status, kind=kind, path_key=path_key, step_id=step_id, created_before=created_before,
        before_id=before_id, limit=limit,
    )  # fmt: skip


async def queue_summary(tx: TenantTx) -> dict[str, tuple[int, datetime]]:
    """Per kind, the pending reviews and when the oldest was created."""
    return await repo.queue_summary(tx)


async def review_queues(conn: AsyncConnection) -> list[tuple[uuid.UUID, str, int, datetime]]:
    """Every tenant's pending reviews (a worker's cross-tenant read, ``kit.db.across_tenants``): tenant, kind,
    how many, and when the oldest was created. Tenants with none are not listed."""
    return await repo.review_queues(conn)


async def overrides(tx: TenantTx, *, active: bool, now: datetime, limit: int = 100) -> list[OverrideRow]:
    """The tenant's overrides, newest first: only those in force at ``now`` (not revoked, not expired) when
    ``active``, else every one."""
    return await repo.list_overrides(tx, active=active, now=now, limit=limit)


def pins_of(rows: Sequence[OverrideRow]) -> tuple[Pin, ...]:
    return tuple(
        Pin(r.id, tuple(r.segment or ()), r.path_key, r.forced, r.reason, r.created_by, r.expires_at) for r in rows
    )


__all__ = [
    "COMPLETION_DECISIONS",
    "DECISION_VERDICTS",
    "KINDS",
    "REASONS",
    "OverrideRow",
    "Pin",
    "ReviewRow",
    "ReviewSampling",
    "criteria_met",
    "eligible",
    "get",
    "listing",
    "overrides",
    "pins_of",
    "queue",
    "queue_summary",
    "record_decision",
    "review_queues",
    "status_of",
]
