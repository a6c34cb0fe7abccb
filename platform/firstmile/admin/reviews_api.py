"""The review queue's API under ``/admin/api/reviews`` and ``/admin/api/overrides`` (behind the admin session and
its guard), which the review queue page (``/admin/reviews``) calls.

Roles (``admin/rbac.py``): the analyst and up read the queue and the segment pins in force (``reviews:read``); the
editor and the owner decide reviews (``reviews:decide``) and revoke pins (``overrides:manage``); the viewer has
none of it. The reviewer recorded on a decision, in its audit entry and in its outbox event is the admin
(``admin:<subject>``), as on every other admin action.

A decision is :meth:`OnboardingService.decide_review`'s: approving a completion completes the step at the time it
happened, rejecting leaves it open with the note; a decision review is judged ``right`` or ``wrong`` with an
optional better path. A review decided already is ``409 review-decided``, one the tenant does not have ``404
review-not-found``. A bulk decision is one unit of work: every review is decided or, at the first refusal, none
is (the problem names the review that was refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from firstmile.admin.rbac import Permission
from firstmile.admin.sessions import AdminSession
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError, strict_body
from firstmile.kit.ids import SLUG_RE
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import paths, review
from firstmile.onboarding.review import OverrideRow, ReviewRow
from firstmile.onboarding.service import OnboardingService

STATUSES: tuple[str, ...] = ("pending", "decided", "approved", "rejected", "right", "wrong", "any")
"""What the queue can show: ``decided`` is any of the four outcomes, ``any`` everything."""
DECIDED: tuple[str, ...] = ("approved", "rejected", "right", "wrong")
MAX_NOTE = 1000
MAX_BULK = 100
MAX_LIMIT = 200
MAX_AGE_HOURS = 24 * 366
MAX_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ReviewFilter:
    """Which reviews to list: a status of :data:`STATUSES`; kind, path and step exact; created at least
    ``older_than_hours`` ago; ids below ``before_id`` (the next page)."""

    status: str = "pending"
    kind: str | None = None
    path: str | None = None
    step: str | None = None
    older_than_hours: int | None = None
    before_id: int | None = None
    limit: int = 50

    def as_query(self) -> dict[str, str]:
        """The filter as the page's query parameters (the defaults left out)."""
        values = {"status": self.status if self.status != "pending" else None, "kind": self.kind, "path": self.path,
                  "step": self.step, "older_than": self.older_than_hours}  # fmt: skip
        return {k: str(v) for k, v in values.items() if v is not None}


def _bad(key: str, message: str) -> ProblemError:
    return ProblemError(400, "validation-error", f"{message} (at {key})",
                        errors=[{"key": key, "message": message, "source": "query"}])  # fmt: skip


def _whole(key: str, value: str | None, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 19 or not low <= int(value) <= high:
        raise _bad(key, f"a whole number from {low} to {high}")
    return int(value)


def review_filter(
    *,
    status: str | None = None,
    kind: str | None = None,
    path: str | None = None,
    step: str | None = None,
    older_than: str | None = None,
    before_id: str | None = None,
    limit: str | None = None,
) -> ReviewFilter:
    """The filter of the query parameters (an empty one: no filter); 400 ``validation-error`` at the first
    parameter that cannot be one (the page and the API refuse the same)."""
    status, kind, path, step = status or None, kind or None, path or None, step or None
    older_than, before_id, limit = older_than or None, before_id or None, limit or None
    if status is not None and status not in STATUSES:
        raise _bad("status", f"one of {', '.join(STATUSES)}")
    if kind is not None and kind not in review.KINDS:
        raise _bad("kind", f"one of {', '.join(review.KINDS)}")
    if path is not None and not SLUG_RE.fullmatch(path):
        raise _bad("path", "a path's id (lower-case letters, digits and dashes)")
    if step is not None and not SLUG_RE.fullmatch(step):
        raise _bad("step", "a step's id (lower-case letters, digits and dashes)")
    return ReviewFilter(
        status=status or "pending",
        kind=kind,
        path=path,
        step=step,
        older_than_hours=_whole("older_than", older_than, 1, MAX_AGE_HOURS),
        before_id=_whole("before_id", before_id, 1, MAX_ID),
        limit=_whole("limit", limit, 1, MAX_LIMIT) or 50,
    )


async def find_reviews(tx: TenantTx, wanted: ReviewFilter, now: datetime) -> list[ReviewRow]:
    """The reviews of ``wanted``, newest first (``decided``: the four outcomes' lists merged)."""
    created_before = None if wanted.older_than_hours is None else now - timedelta(hours=wanted.older_than_hours)
    statuses: tuple[str | None, ...] = (
        DECIDED if wanted.status == "decided" else (None,) if wanted.status == "any" else (wanted.status,)
    )
    found: list[ReviewRow] = []
    for status in statuses:
        found += await review.listing(
            tx, status=status, kind=wanted.kind, path_key=wanted.path, step_id=wanted.step,
            created_before=created_before, before_id=wanted.before_id, limit=wanted.limit,
        )  # fmt: skip
    return sorted(found, key=lambda r: r.id, reverse=True)[: wanted.limit]


def age(seconds: float) -> str:
    """A review's age, for people."""
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} d"


def review_view(row: ReviewRow, now: datetime) -> dict[str, Any]:
    """A review as the API answers it and the page shows it."""
    seconds = (now - row.created_at).total_seconds()
    return {
        "id": row.id,
        "kind": row.kind,
        "reason": row.reason,
        "reason_text": review.REASONS.get(row.reason, row.reason),
        "status": row.status,
        "user_id": row.user_id,
        "path_id": row.path_key,
        "path_version": row.path_version,
        "step_id": row.step_id,
        "source": row.source,
        "occurred_at": row.occurred_at.astimezone(UTC).isoformat(),
        "created_at": row.created_at.astimezone(UTC).isoformat(),
        "age_seconds": round(max(seconds, 0.0), 3),
        "age": age(seconds),
        "details": row.details,
        "note": row.note,
        "better_path": row.better_path,
        "decided_by": row.decided_by,
        "decided_at": None if row.decided_at is None else row.decided_at.astimezone(UTC).isoformat(),
    }


def pin_view(pin: OverrideRow) -> dict[str, Any]:
    """A segment pin in force as the API answers it and the page shows it."""
    return {
        "id": pin.id,
        "segment": [dict(p) for p in pin.segment or ()],
        "path_id": pin.path_key,
        "forced": pin.forced,
        "reason": pin.reason,
        "created_by": pin.created_by,
        "created_at": pin.created_at.astimezone(UTC).isoformat(),
        "expires_at": None if pin.expires_at is None else pin.expires_at.astimezone(UTC).isoformat(),
    }


async def pins_and_paths(tx: TenantTx, now: datetime) -> tuple[list[OverrideRow], list[str]]:
    """The tenant's segment pins in force at ``now``, newest first (a one-user override moved its user once and
    is shown on the users page, in the user's decision), and its current paths' ids, sorted (the page's path
    filter and better-path choices)."""
    in_force = await review.overrides(tx, active=True, now=now, limit=MAX_LIMIT)
    keys = sorted(key for key, _, _ in await paths.current_paths(tx))
    return [o for o in in_force if o.segment is not None], keys


class ReviewDecision(msgspec.Struct, forbid_unknown_fields=True):
    """``approve`` or ``reject`` for a completion review, ``right`` or ``wrong`` for a decision review; a note;
    for a decision review, the path that would have been better."""

    decision: str
    note: str | None = None
    better_path: str | None = None


class BulkDecision(msgspec.Struct, forbid_unknown_fields=True):
    """One decision, with one note, for every review of ``ids`` (1 to 100, each once)."""

    ids: list[int]
    decision: str
    note: str | None = None


def _note(note: str | None) -> str | None:
    cleaned = (note or "").strip()
    if len(cleaned) > MAX_NOTE:
        message = f"at most {MAX_NOTE} characters"
        raise ProblemError(400, "validation-error", f"the note has {message} (at note)",
                           errors=[{"key": "note", "message": message, "source": "body"}])  # fmt: skip
    return cleaned or None


def _reviewer(request: Request[Any, Any, Any]) -> str:
    session = request.user
    assert isinstance(session, AdminSession)
    return f"admin:{session.subject}"


def _review_id(value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18 or int(value) < 1:
        raise ProblemError(400, "validation-error", "review_id must be a review's id (1, 2, …)")
    return int(value)


class ReviewsAdminController(Controller):
    path = "/admin/api/reviews"
    tags = ["admin"]

    @get(summary="The review queue, filtered (pending by default), newest first",
         opt={"permission": Permission.REVIEWS_READ})  # fmt: skip
    async def list_reviews(
        self,
        uow: NamedDependency[UnitOfWork],
        status: FromQuery[str | None] = None,
        kind: FromQuery[str | None] = None,
        path: FromQuery[str | None] = None,
        step: FromQuery[str | None] = None,
        older_than: FromQuery[str | None] = None,
        before_id: FromQuery[str | None] = None,
        limit: FromQuery[str | None] = None,
    ) -> dict[str, Any]:
        wanted = review_filter(status=status, kind=kind, path=path, step=step, older_than=older_than,
                               before_id=before_id, limit=limit)  # fmt: skip
        now = datetime.now(UTC)
        rows = await uow.run(lambda tx: find_reviews(tx, wanted, now))
        return {
            "reviews": [review_view(r, now) for r in rows],
            "next_before_id": rows[-1].id if len(rows) == wanted.limit else None,
        }

    @get("/{review_id:str}", summary="One review", opt={"permission": Permission.REVIEWS_READ})
    async def one_review(self, review_id: FromPath[str], uow: NamedDependency[UnitOfWork]) -> dict[str, Any]:
        found = _review_id(review_id)
        row = await uow.run(lambda tx: review.get(tx, found))
        return review_view(row, datetime.now(UTC))

    @post("/{review_id:str}/decide", summary="Decide a pending review (409 when decided already)", status_code=200,
          opt={"permission": Permission.REVIEWS_DECIDE})  # fmt: skip
    async def decide(
        self,
        request: Request[Any, Any, Any],
        review_id: FromPath[str],
        data: JSONBody[ReviewDecision],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> dict[str, Any]:
        found = _review_id(review_id)
        body = strict_body(await request.body(), ReviewDecision)
        note, reviewer = _note(body.note), _reviewer(request)
        if body.better_path is not None and not SLUG_RE.fullmatch(body.better_path):
            raise ProblemError(400, "validation-error", "better_path must be a path's id (at better_path)",
                               errors=[{"key": "better_path", "message": "a path's id", "source": "body"}])  # fmt: skip
        decided = await uow.run(
            lambda tx: onboarding.decide_review(
                tx, found, body.decision, reviewer=reviewer, note=note, better_path=body.better_path
            )
        )
        return review_view(decided, datetime.now(UTC))

    @post("/bulk", summary="Decide several pending reviews at once: all of them, or none", status_code=200,
          opt={"permission": Permission.REVIEWS_DECIDE})  # fmt: skip
    async def bulk(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[BulkDecision],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> dict[str, Any]:
        body = strict_body(await request.body(), BulkDecision)
        ids = body.ids
        if not 1 <= len(ids) <= MAX_BULK or len(set(ids)) != len(ids) or not all(1 <= i <= MAX_ID for i in ids):
            raise ProblemError(400, "validation-error", f"ids: 1 to {MAX_BULK} reviews' ids, each once (at ids)",
                               errors=[{"key": "ids", "message": f"1 to {MAX_BULK} ids, each once",
                                        "source": "body"}])  # fmt: skip
        note, reviewer = _note(body.note), _reviewer(request)

        decisions = [(review_id, body.decision, note) for review_id in ids]
        rows = await uow.run(lambda tx: onboarding.decide_reviews(tx, decisions, reviewer=reviewer))
        now = datetime.now(UTC)
        return {"decided": [review_view(r, now) for r in rows]}


class OverridesAdminController(Controller):
    path = "/admin/api/overrides"
    tags = ["admin"]

    @get(summary="The segment pins in force, newest first", opt={"permission": Permission.REVIEWS_READ})
    async def list_pins(self, uow: NamedDependency[UnitOfWork]) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        pins, _ = await uow.run(lambda tx: pins_and_paths(tx, now))
        return [pin_view(p) for p in pins]

    @post("/{override_id:str}/revoke", summary="End an override in force (404 when none is)", status_code=200,
          opt={"permission": Permission.OVERRIDES_MANAGE})  # fmt: skip
    async def revoke(
        self,
        request: Request[Any, Any, Any],
        override_id: FromPath[str],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> dict[str, Any]:
        if not override_id.isascii() or not override_id.isdigit() or len(override_id) > 18:
            raise ProblemError(400, "validation-error", "override_id must be an override's id (1, 2, …)")
        actor = _reviewer(request)
        revoked = await uow.run(lambda tx: onboarding.revoke_override(tx, int(override_id), actor=actor))
        return {
            "id": revoked.id,
            "path_id": revoked.path_key,
            "revoked_by": revoked.revoked_by,
            "revoked_at": None if revoked.revoked_at is None else revoked.revoked_at.astimezone(UTC).isoformat(),
        }
