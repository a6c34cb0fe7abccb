"""Onboarding service: start a user on a path, complete steps, read state.

Reads and completions run in the caller's :class:`~firstmile.kit.db.TenantTx`. A start
takes the caller's :class:`~firstmile.kit.uow.UnitOfWork` instead, because it talks to the
network first: the path planner (online features, the model) and, when the user brings
personal data, the tenant's key provider. Only then does it open one short transaction
for the writes (user, progress, outbox event, audit entry), so a transient database retry
repeats no network call and no lock waits on one. Nothing here commits.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy.exc import NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.outbox import OutboxEvent
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import domain, review
from firstmile.onboarding import repository as repo
from firstmile.onboarding.assignment import Assignment, ExperimentAssigner
from firstmile.onboarding.catalog import CatalogCache, PathCatalog
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import Decision, PathPlanner, RulesPlanner
from firstmile.onboarding.review import ReviewRow, ReviewSampling
from firstmile.onboarding.schemas import (
    DecisionRecord,
    OnboardingState,
    PathRef,
    ProgressSummary,
    StepReview,
    StepState,
)
from firstmile.security.crypto import FieldContext
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.security.personal_data import split_traits, valid_email
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import COMPANY_SIZES, KNOWN_TRAITS

_json = msgspec.json.Encoder()

MAX_TRAITS = 50
MAX_TRAIT_STRING = 256
_TRAIT_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_CLOCK_SKEW = timedelta(minutes=5)


def validate_traits(traits: Mapping[str, Any]) -> dict[str, Any]:
    """Check the known traits' types and values and the custom traits' shape; 400 on the first fault."""
    errors: list[dict[str, str]] = []
    if len(traits) > MAX_TRAITS:
        errors.append({"key": "traits", "message": f"at most {MAX_TRAITS} traits"})
    for key, value in traits.items():
        where = f"traits.{key}"
        if not _TRAIT_KEY.match(key):
            errors.append({"key": where, "message": "trait names are lower-case letters, digits and _, max 64"})
        elif key in KNOWN_TRAITS and value is not None and not isinstance(value, str):
            errors.append({"key": where, "message": f"Expected `str`, got `{type(value).__name__}`"})
        elif isinstance(value, str) and len(value) > MAX_TRAIT_STRING:
            errors.append({"key": where, "message": f"at most {MAX_TRAIT_STRING} characters"})
        elif key == "company_size" and value is not None and value not in COMPANY_SIZES:
            errors.append({"key": where, "message": f"must be one of {list(COMPANY_SIZES)}"})
    if errors:
        first = errors[0]
        raise ProblemError(400, "validation-error", f"{first['message']} (at {first['key']})", errors=errors)
    return {k: v for k, v in traits.items() if v is not None}


@dataclass(frozen=True, slots=True)
class StartOutcome:
    state: OnboardingState
    created: bool


@dataclass(frozen=True, slots=True)
class _Start:
    """What a start decided before its transaction: the user, their traits and the chosen path."""

    user_id: str
    plain: dict[str, Any]
    personal: dict[str, Any]
    path: PathDef
    decision: Decision
    now: datetime
    assignment: Assignment | None = None


def _event(event_type: str, payload: dict[str, Any]) -> OutboxEvent:
    return OutboxEvent.new(event_type, payload)


def render_state(user_id: str, path: PathDef, row: repo.ProgressRow) -> OnboardingState:
    """The API view of a user's progress."""
    done = row.completions
    progress = domain.evaluate(path, done)
    reviews = row.reviews
    steps = [
        StepState(
            id=s.id,
            title=s.title,
            description=s.description,
            optional=s.optional,
            prerequisites=list(s.prerequisites),
            completed=s.id in done,
            completed_at=done.get(s.id),
            available=domain.is_available(s, done),
            pending_review=s.id not in done and reviews.get(s.id, {}).get("status") == "pending",
            review=_step_review(reviews.get(s.id)),
            validation=s.validation,
        )
        for s in path.steps
    ]
    d = row.decision
    return OnboardingState(
        user_id=user_id,
        path=PathRef(id=path.key, version=path.version, name=path.name, activation_step=path.activation_step),
        status=row.status,
        current_step=row.current_step,
        activated=row.activated_at is not None,
        activated_at=row.activated_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        progress=ProgressSummary(progress.completed_required, progress.required, progress.percent),
        steps=steps,
        decision=DecisionRecord(
            selected_by=d["selected_by"],
            rule=d.get("rule"),
            priority=d.get("priority"),
            planner=d["planner"],
            fallback=d.get("fallback"),
            candidates_evaluated=int(d.get("candidates_evaluated", 0)),
            decided_at=datetime.fromisoformat(d["decided_at"]),
            model=d.get("model"),
            model_version=d.get("model_version"),
            confidence=d.get("confidence"),
            fallback_reason=d.get("fallback_reason"),
            override=d.get("override"),
            shadow=d.get("shadow"),
            propensity=d.get("propensity"),
            exploration=d.get("exploration"),
        ),
    )


def _step_review(found: Mapping[str, Any] | None) -> StepReview | None:
    if not found:
        return None
    return StepReview(int(found["id"]), str(found["status"]), str(found["reason"]), found.get("note"))


class OnboardingService:
    """Start, complete and read onboarding (see the module docstring for who owns the transaction).

    ``keyring`` encrypts personal traits; without one, a start that carries personal data is
    refused rather than stored in clear. ``planner`` chooses paths (the targeting rules when
    none is given; the wiring gives the ML slice's adaptive planner).
    """

    def __init__(
        self,
        catalogs: CatalogCache,
        keyring: DataKeyService | None = None,
        planner: PathPlanner | None = None,
        experiments: ExperimentAssigner | None = None,
        sampling: ReviewSampling | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.catalogs = catalogs
        self.keyring = keyring
        self.planner: PathPlanner = planner or RulesPlanner()
        self.experiments = experiments
        self.sampling = sampling or ReviewSampling(rate=0.0)
        self._rng = rng or random.Random()

    async def catalog(self, uow: UnitOfWork, revision: int) -> PathCatalog:
        """The tenant's current paths: from this process's cache, else one short read."""
        cached = self.catalogs.cached(uow.tenant, revision)
        if cached is not None:
            return cached
        return await uow.run(lambda tx: self.catalogs.catalog(tx, revision))

    async def start(self, uow: UnitOfWork, revision: int, user_id: str, traits: Mapping[str, Any]) -> StartOutcome:
        clean = validate_traits(traits)
        catalog = await self.catalog(uow, revision)
        plain, personal = split_traits(clean, catalog.pii_traits)
        if "email" in personal and not valid_email(personal["email"]):
            raise ProblemError(
                400,
                "validation-error",
                "not an email address (at traits.email)",
                errors=[{"key": "traits.email", "message": "not an email address"}],
            )
        if personal and self.keyring is None:
            raise RuntimeError("personal traits need a keyring; none is configured")
        began = time.perf_counter()
        now = datetime.now(UTC)
        experiment = await self._experiment_path(uow, revision, catalog, user_id, clean)
        with telemetry.tracer.start_as_current_span("path_planner.plan") as span:
            if experiment is not None:  # the orchestrator first: an experiment's variant decides the path
                assignment, path = experiment
                decision = Decision(path.key, path.version, "experiment", None, None, 0,
                                    details={"experiment": assignment.as_record()})  # fmt: skip
            else:
                assignment = None
                decision = await self.planner.plan(str(uow.tenant), user_id, catalog, clean, now)
                decision = _pinned(catalog, decision, clean, now)
                path = next(p for p in catalog.current if p.key == decision.path_key)
            span.set_attribute("firstmile.selected_by", decision.selected_by)
            span.set_attribute("firstmile.path", f"{decision.path_key}@{decision.path_version}")
            if decision.fallback_reason is not None:
                span.set_attribute("firstmile.fallback_reason", decision.fallback_reason)
        telemetry.PATH_SELECTION_LATENCY.labels(decision.selected_by).observe(time.perf_counter() - began)
        start = _Start(user_id, plain, personal, path, decision, now, assignment)
        if personal:
            assert self.keyring is not None
            # the key provider (network) is asked before the transaction opens, never inside it
            return await self.keyring.run_with_keys(uow, lambda tx, keys: self._write_start(tx, start, keys))
        return await uow.run(lambda tx: self._write_start(tx, start, None))

    async def _experiment_path(
        self, uow: UnitOfWork, revision: int, catalog: PathCatalog, user_id: str, traits: Mapping[str, Any]
    ) -> tuple[Assignment, PathDef] | None:
        """The experiment variant's path for this user, or None (no experiment, or control by failure)."""
        if self.experiments is None:
            return None
        assignment = await self.experiments.assign(uow, revision, user_id, traits)
        if assignment is None:
            return None
        current = next((p for p in catalog.current if p.key == assignment.path_key), None)
        if current is None:
            return None  # the variant's path is gone from the catalog: the planner's path (control)
        if assignment.path_version is None or assignment.path_version == current.version:
            return assignment, current
        pinned = await self.find_path(uow, revision, assignment.path_key, assignment.path_version)
        return (assignment, pinned) if pinned is not None else None

    async def _write_start(self, tx: TenantTx, start: _Start, keys: TenantKeys | None) -> StartOutcome:
        """The start's one transaction: user, progress, event and audit entry (database only)."""
        path, decision, user_id, now = start.path, start.decision, start.user_id, start.now
        record = decision.as_record() | {"decided_at": now.isoformat()}
        first = domain.evaluate(path, ()).current_step
        event = _event(
            "onboarding.started",
            {
                "user_id": user_id,
                "path_id": path.key,
                "path_version": path.version,
                "current_step": first,
                "decision": record,
                "traits": start.plain,
            },
        )
        sealed, email_index = None, None
        if keys is not None and start.personal:
            key = await keys.user_key(tx, user_id, create=True)
            sealed = key.encrypt(_json.encode(start.personal), FieldContext(tx.tenant, "end_users", "pii", user_id))
            email = start.personal.get("email")
            email_index = keys.blind_index("email", email) if isinstance(email, str) else None
        created = await repo.insert_start(
            tx,
            user_id,
            start.plain,
            path.key,
            path.version,
            first,
            record,
            now,
            [event],
            pii=sealed,
            email_index=email_index,
        )
        if created:
            if start.assignment is not None and self.experiments is not None:
                await self.experiments.record(tx, user_id, start.assignment, now)
            await audit.append(
                tx,
                "decision",
                "path_planner",
                user_id,
                {
                    "decision": "path_selection",
                    "inputs": {
                        "traits": start.plain,
                        "personal_traits": sorted(start.personal),
                        "features": record.get("features"),
                    },
                    "output": {"path_id": path.key, "path_version": path.version},
                    "model": decision.model or decision.planner,
                    "model_version": decision.model_version or decision.planner,
                    "confidence": decision.confidence,
                    "selected_by": decision.selected_by,
                    "fallback": record.get("fallback"),
                    "fallback_reason": decision.fallback_reason,
                    "shadow": record.get("shadow"),
                    "propensity": record.get("propensity"),
                    "exploration": record.get("exploration"),
                    "event_id": str(event.event_id),
                }
                | ({"experiment": record["experiment"]} if "experiment" in record else {}),
            )
            if self._sampled(decision):
                await review.queue(
                    tx, kind="decision", reason="low_confidence", user_id=user_id, path=path, step_id=None,
                    source="path_planner", occurred_at=now, now=now,
                    details={"model": decision.model, "model_version": decision.model_version,
                             "confidence": decision.confidence, "features": record.get("features"),
                             "scores": record.get("scores"), "threshold": self.sampling.threshold},
                )  # fmt: skip
            telemetry.ONBOARDING_STARTS.labels(decision.selected_by).inc()
            row = repo.ProgressRow(path.key, path.version, "in_progress", first, record, now, None, None, {})
            return StartOutcome(render_state(user_id, path, row), created=True)
        if start.assignment is not None and self.experiments is not None:
            await self.experiments.recheck(tx, user_id, start.assignment)
        return StartOutcome(await self.get(tx, user_id), created=False)

    async def find_path(self, uow: UnitOfWork, revision: int, key: str, version: int | None) -> PathDef | None:
        """A current path (``version`` None) or a stored version of one; None when the tenant has no such path."""
        if version is None:
            catalog = await self.catalog(uow, revision)
            return next((p for p in catalog.current if p.key == key), None)

        async def stored(tx: TenantTx) -> PathDef | None:
            try:
                return await self.catalogs.version(tx, key, version)
            except NoResultFound:
                return None

        return await uow.run(stored)

    async def progress(self, tx: TenantTx, user_id: str) -> repo.ProgressRow | None:
        """The user's progress as stored, or None before they started."""
        return await repo.get_progress(tx, user_id)

    async def get(self, tx: TenantTx, user_id: str) -> OnboardingState:
        row = await repo.get_progress(tx, user_id)
        if row is None:
            raise ProblemError(404, "user-not-found", f"user {user_id!r} has not started onboarding")
        path = await self.catalogs.version(tx, row.path_key, row.path_version)
        return render_state(user_id, path, row)

    async def complete(
        self,
        tx: TenantTx,
        user_id: str,
        step_id: str,
        occurred_at: datetime | None = None,
        source: str = "api",
    ) -> OnboardingState:
        now = datetime.now(UTC)
        if occurred_at is not None:
            if occurred_at.tzinfo is None:
                raise ProblemError(
                    400,
                    "validation-error",
                    "occurred_at needs a time zone (at occurred_at)",
                    errors=[{"key": "occurred_at", "message": "time zone required"}],
                )
            if occurred_at > now + MAX_CLOCK_SKEW:
                raise ProblemError(
                    400,
                    "validation-error",
                    "occurred_at is in the future (at occurred_at)",
                    errors=[{"key": "occurred_at", "message": "in the future"}],
                )
        row = await repo.get_progress(tx, user_id, for_update=True)
        if row is None:
            raise ProblemError(404, "user-not-found", f"user {user_id!r} has not started onboarding")
        path = await self.catalogs.version(tx, row.path_key, row.path_version)
        reviewed = source.startswith("review:")
        step = path.step(step_id)
        if step is None and not reviewed:
            current = await self._current_version(tx, path.key)
            if current is not None and current.version != path.version and current.step(step_id) is not None:
                details = {"user_version": path.version, "current_version": current.version}
                return await self._to_review(
                    tx, row, path, user_id, step_id, "path_version_changed", source, occurred_at or now, details
                )
        if step is None:
            raise ProblemError(
                404,
                "step-not-found",
                f"step {step_id!r} is not on path {path.key} v{path.version}",
                path_id=path.key,
                path_version=path.version,
                steps=[s.id for s in path.steps],
            )
        if step_id in row.completions:
            return render_state(user_id, path, row)
        missing = domain.missing_prerequisites(path, step_id, row.completions)
        if missing:
            raise ProblemError(
                409, "step-prerequisites-unmet", f"step {step_id!r} needs {', '.join(missing)} first", missing=missing
            )
        if not reviewed and step.validation == "review":
            return await self._to_review(tx, row, path, user_id, step_id, "review_step", source, occurred_at or now, {})
        if (
            not reviewed
            and source == "api"
            and occurred_at is not None
            and occurred_at < row.started_at - MAX_CLOCK_SKEW
        ):
            on_record = {"started_at": row.started_at.isoformat()}
            return await self._to_review(tx, row, path, user_id, step_id, "contradicts_record", source, occurred_at,
                                         on_record)  # fmt: skip
        completions = {**row.completions, step_id: now}
        progress = domain.evaluate(path, completions)
        activated_now = step_id == path.activation_step and row.activated_at is None
        activated_at = now if activated_now else row.activated_at
        completed_now = progress.status == "completed" and row.completed_at is None
        completed_at = now if completed_now else row.completed_at
        base = {"user_id": user_id, "path_id": path.key, "path_version": path.version}
        at = (occurred_at or now).isoformat()
        events = [
            _event(
                "onboarding.step_completed",
                base
                | {
                    "step_id": step_id,
                    "occurred_at": at,
                    "source": source,
                    "current_step": progress.current_step,
                },
            )
        ]
        if activated_now:
            events.append(_event("onboarding.activated", base | {"step_id": step_id, "occurred_at": at}))
        if completed_now:
            events.append(_event("onboarding.completed", base | {"occurred_at": at}))
        inserted = await repo.insert_completion(
            tx,
            user_id,
            step_id,
            path.key,
            path.version,
            now,
            occurred_at or now,
            source,
            progress.current_step,
            progress.status,
            activated_at,
            completed_at,
            events,
        )
        if inserted and source != "api":
            # An automated decision (a tracked event completed the step): it goes on the record.
            await audit.append(
                tx,
                "decision",
                "progress_evaluator",
                user_id,
                {
                    "decision": "step_completion",
                    "inputs": {"source": source, "occurred_at": at},
                    "output": {"path_id": path.key, "path_version": path.version, "step_id": step_id},
                    "model_version": "completion-criteria-1",
                    "confidence": None,
                    "fallback": None,
                },
            )
        if inserted:
            telemetry.STEP_COMPLETIONS.inc()
            if activated_now:
                telemetry.ACTIVATIONS.inc()
        new_row = repo.ProgressRow(
            path.key,
            path.version,
            progress.status,
            progress.current_step,
            row.decision,
            row.started_at,
            activated_at,
            completed_at,
            completions,
        )
        return render_state(user_id, path, new_row)

    # ------------------------------------------------------------------ human in the loop (docs/review.md)

    async def _current_version(self, tx: TenantTx, key: str) -> PathDef | None:
        # the tenant's revision first: a catalog this process cached before a manifest added a version is stale
        catalog = await self.catalogs.catalog(tx, await tenancy.revision(tx))
        return next((p for p in catalog.current if p.key == key), None)

    async def _to_review(
        self,
        tx: TenantTx,
        row: repo.ProgressRow,
        path: PathDef,
        user_id: str,
        step_id: str,
        reason: str,
        source: str,
        occurred_at: datetime,
        details: Mapping[str, Any],
    ) -> OnboardingState:
        """Queue a completion for review instead of completing it; the user's state, showing it pending."""
        kind = "step" if reason == "review_step" else "ambiguous"
        await review.queue(
            tx, kind=kind, reason=reason, user_id=user_id, path=path, step_id=step_id, source=source,
            occurred_at=occurred_at, details=details, now=datetime.now(UTC),
        )  # fmt: skip
        return await self.get(tx, user_id)

    async def review_completion(
        self,
        tx: TenantTx,
        user_id: str,
        step_id: str,
        *,
        reason: str,
        source: str,
        occurred_at: datetime,
        details: Mapping[str, Any],
    ) -> ReviewRow | None:
        """Queue a completion the caller could not decide (the progress consumer's partial matches); None when
        the user has no such open step."""
        row = await repo.get_progress(tx, user_id, for_update=True)
        if row is None or step_id in row.completions:
            return None
        path = await self.catalogs.version(tx, row.path_key, row.path_version)
        if path.step(step_id) is None:
            return None
        kind = "step" if reason == "review_step" else "ambiguous"
        return await review.queue(
            tx, kind=kind, reason=reason, user_id=user_id, path=path, step_id=step_id, source=source,
            occurred_at=occurred_at, details=details, now=datetime.now(UTC),
        )  # fmt: skip

    async def decide_review(
        self,
        tx: TenantTx,
        review_id: int,
        decision: str,
        *,
        reviewer: str,
        note: str | None = None,
        better_path: str | None = None,
    ) -> ReviewRow:
        """Decide a pending review: approval completes the step at the time the completion happened (moving
        the user to the path's current version first when that was the ambiguity); rejection leaves it open.
        409 when it was decided already, 404 when the tenant has no such review."""
        now = datetime.now(UTC)
        found = await review.get(tx, review_id, for_update=True)
        if better_path is not None:
            if found.kind != "decision":
                raise ProblemError(400, "validation-error", "better_path is for decision reviews (at better_path)",
                                   errors=[{"key": "better_path", "message": "only for decision reviews"}])  # fmt: skip
            if await self._current_version(tx, better_path) is None:
                raise ProblemError(400, "validation-error", f"no current path {better_path!r} (at better_path)",
                                   errors=[{"key": "better_path", "message": "not a current path"}])  # fmt: skip
        decided = await review.record_decision(
            tx, found, decision, note=note, better_path=better_path, reviewer=reviewer, now=now
        )
        if decided.status == "approved" and found.step_id is not None:
            if found.reason == "path_version_changed":
                await self._move_to_current(tx, found.user_id, found.path_key, reviewer, now)
            await self.complete(tx, found.user_id, found.step_id, found.occurred_at, source=f"review:{found.id}")
        return decided

    async def decide_reviews(
        self, tx: TenantTx, decisions: Sequence[tuple[int, str, str | None]], *, reviewer: str
    ) -> list[ReviewRow]:
        """Decide several reviews (id, decision, note) in the caller's transaction, all or none: the first that
        cannot be decided raises its problem, naming its ``index`` and ``review_id``, and the caller's unit of
        work rolls back the others."""
        decided: list[ReviewRow] = []
        for index, (review_id, decision, note) in enumerate(decisions):
            try:
                decided.append(await self.decide_review(tx, review_id, decision, reviewer=reviewer, note=note))
            except ProblemError as exc:
                extensions = dict(exc.extensions)
                errors = extensions.pop("errors", None)
                if isinstance(errors, list):
                    extensions["errors"] = [
                        {**e, "key": f"decisions[{index}].{e.get('key', '')}".rstrip("."), "source": "body"}
                        for e in errors
                    ]
                raise ProblemError(
                    exc.status,
                    exc.slug,
                    f"decisions[{index}] (review {review_id}): {exc.detail}; none of the {len(decisions)} reviews "
                    "was decided",
                    headers=exc.headers,
                    **(extensions | {"index": index, "review_id": review_id}),
                ) from exc
        return decided

    async def _move_to_current(self, tx: TenantTx, user_id: str, key: str, actor: str, now: datetime) -> None:
        row = await repo.get_progress(tx, user_id, for_update=True)
        current = await self._current_version(tx, key)
        if row is None or current is None or (row.path_key, row.path_version) == (current.key, current.version):
            return
        decision = row.decision | {"migrated": {"from_version": row.path_version, "by": actor, "at": now.isoformat()}}
        await self._switch(tx, user_id, row, current, decision, now)

    async def _switch(
        self, tx: TenantTx, user_id: str, row: repo.ProgressRow, target: PathDef, decision: dict[str, Any],
        now: datetime,
    ) -> None:  # fmt: skip
        keep = [s.id for s in target.steps if s.id in row.completions]
        progress = domain.evaluate(target, keep)
        completed_at = (row.completed_at or now) if progress.status == "completed" else None
        event = _event(
            "onboarding.path_changed",
            {
                "user_id": user_id,
                "path_id": target.key,
                "path_version": target.version,
                "previous": {"path_id": row.path_key, "path_version": row.path_version},
                "current_step": progress.current_step,
                "decision": decision,
            },
        )
        await repo.switch_path(
            tx, user_id, path_key=target.key, path_version=target.version, keep=keep, decision=decision,
            current_step=progress.current_step, status=progress.status, completed_at=completed_at, now=now,
            events=[event],
        )  # fmt: skip

    async def override_user(
        self,
        uow: UnitOfWork,
        revision: int,
        user_id: str,
        path_key: str,
        *,
        actor: str,
        force: bool = False,
        reason: str | None = None,
    ) -> OnboardingState:
        """Set a started user's path by hand (``selected_by: human``), the planner's choice recorded as the
        shadow; a path the user is not eligible for is refused (409) unless forced with a reason."""
        if force and not (reason or "").strip():
            raise ProblemError(400, "validation-error", "a forced override needs a reason (at reason)",
                               errors=[{"key": "reason", "message": "required when force is true"}])  # fmt: skip
        catalog = await self.catalog(uow, revision)
        target = next((p for p in catalog.current if p.key == path_key), None)
        if target is None:
            raise ProblemError(404, "path-not-found", f"the tenant has no current path {path_key!r}")

        async def read(tx: TenantTx) -> dict[str, Any]:
            if await repo.get_progress(tx, user_id) is None:
                raise ProblemError(404, "user-not-found", f"user {user_id!r} has not started onboarding")
            return await repo.user_traits(tx, user_id) or {}

        traits = await uow.run(read)
        if not force and not review.eligible(target, traits):
            raise ProblemError(
                409,
                "path-not-eligible",
                f"user {user_id!r} is not eligible for path {path_key!r} (its targeting does not hold); "
                "force it with a reason",
                targeting=[dict(r) for r in target.targeting],
            )
        now = datetime.now(UTC)
        shadow = await self.planner.plan(str(uow.tenant), user_id, catalog, traits, now)  # network: before the tx

        async def write(tx: TenantTx) -> OnboardingState:
            row = await repo.get_progress(tx, user_id, for_update=True)
            if row is None:
                raise ProblemError(404, "user-not-found", f"user {user_id!r} has not started onboarding")
            made = await repo.insert_override(
                tx, user_id=user_id, segment=None, path_key=path_key, forced=force, reason=reason, by=actor,
                now=now, expires_at=None,
            )  # fmt: skip
            override = {"override_id": made.id, "by": actor, "forced": force, "reason": reason}
            decision = _human_record(target, override, shadow, now)
            await self._switch(tx, user_id, row, target, decision, now)
            await _audit_human(tx, actor, user_id, target, override, shadow, row)
            return await self.get(tx, user_id)

        return await uow.run(write)

    async def pin_segment(
        self,
        tx: TenantTx,
        segment: list[dict[str, Any]],
        path_key: str,
        *,
        actor: str,
        expires_at: datetime | None,
        force: bool = False,
        reason: str | None = None,
    ) -> review.OverrideRow:
        """Pin the users of ``segment`` (predicates over traits) who start from now on to ``path_key``, until
        ``expires_at``. Unless forced, a user the path's targeting does not admit is left to the planner."""
        now = datetime.now(UTC)
        if force and not (reason or "").strip():
            raise ProblemError(400, "validation-error", "a forced pin needs a reason (at reason)",
                               errors=[{"key": "reason", "message": "required when force is true"}])  # fmt: skip
        if not segment:
            raise ProblemError(400, "validation-error", "a segment needs at least one predicate (at segment)",
                               errors=[{"key": "segment", "message": "at least one predicate"}])  # fmt: skip
        if expires_at is not None and expires_at <= now:
            raise ProblemError(400, "validation-error", "expires_at is in the past (at expires_at)",
                               errors=[{"key": "expires_at", "message": "in the past"}])  # fmt: skip
        if await self._current_version(tx, path_key) is None:
            raise ProblemError(404, "path-not-found", f"the tenant has no current path {path_key!r}")
        made = await repo.insert_override(
            tx, user_id=None, segment=segment, path_key=path_key, forced=force, reason=reason, by=actor, now=now,
            expires_at=expires_at,
        )  # fmt: skip
        await audit.append(tx, "review", actor, f"override:{made.id}", {
            "override": "pinned", "override_id": made.id, "segment": segment, "path_id": path_key,
            "forced": force, "reason": reason, "expires_at": None if expires_at is None else expires_at.isoformat(),
        })  # fmt: skip
        await tenancy.bump_revision(tx)  # the catalogs (which hold the pins) reload
        return made

    async def revoke_override(self, tx: TenantTx, override_id: int, *, actor: str) -> review.OverrideRow:
        """End an override (a pin stops applying to new starts); 404 when there is none in force."""
        revoked = await repo.revoke_override(tx, override_id, actor, datetime.now(UTC))
        if revoked is None:
            raise ProblemError(404, "override-not-found", f"no override {override_id} in force")
        payload = {"override": "revoked", "override_id": override_id, "path_id": revoked.path_key}
        await audit.append(tx, "review", actor, f"override:{override_id}", payload)
        if revoked.segment is not None:
            await tenancy.bump_revision(tx)
        return revoked

    def _sampled(self, decision: Decision) -> bool:
        """A model decision below the confidence threshold, drawn at the sample rate: it goes to review."""
        sampling = self.sampling
        if decision.selected_by != "model" or decision.confidence is None or sampling.rate <= 0:
            return False
        return decision.confidence < sampling.threshold and self._rng.random() < sampling.rate


def _pinned(catalog: PathCatalog, decision: Decision, traits: Mapping[str, Any], now: datetime) -> Decision:
    """The decision of a segment pin that applies (the planner's own kept as its shadow), else ``decision``."""
    pin = catalog.pin_for(traits, now)
    if pin is None:
        return decision
    path = next((p for p in catalog.current if p.key == pin.path_key), None)
    if path is None:
        return decision
    if not pin.forced and not review.eligible(path, traits):
        skipped = {"override_id": pin.id, "reason": "not_eligible"}
        return replace(decision, details={**decision.details, "override_skipped": skipped})
    return Decision(path.key, path.version, "human", None, None, 0, planner="override",
                    details={"override": pin.as_record(), "shadow": _shadow(decision)})  # fmt: skip


def _shadow(decision: Decision) -> dict[str, Any]:
    """The planner's own decision, kept beside a person's: which path it chose, and how."""
    return {"path_id": decision.path_key, "path_version": decision.path_version} | decision.as_record()


def _human_record(target: PathDef, override: dict[str, Any], shadow: Decision, now: datetime) -> dict[str, Any]:
    return {
        "selected_by": "human",
        "rule": None,
        "priority": None,
        "candidates_evaluated": 0,
        "planner": "override",
        "fallback": None,
        "decided_at": now.isoformat(),
        "override": override,
        "shadow": _shadow(shadow),
    }


async def _audit_human(
    tx: TenantTx, actor: str, user_id: str, target: PathDef, override: dict[str, Any], shadow: Decision,
    previous: repo.ProgressRow,
) -> None:  # fmt: skip
    await audit.append(
        tx,
        "decision",
        actor,
        user_id,
        {
            "decision": "path_selection",
            "selected_by": "human",
            "output": {"path_id": target.key, "path_version": target.version},
            "previous": {"path_id": previous.path_key, "path_version": previous.path_version},
            "override": override,
            "shadow": {"path_id": shadow.path_key, "path_version": shadow.path_version,
                       "selected_by": shadow.selected_by, "model": shadow.model, "confidence": shadow.confidence},
        },
    )  # fmt: skip


# ---- what the slice holds about one end user: for the privacy slice's export and erasure ----

HeldUser = repo.HeldUser


async def user_traits(tx: TenantTx, user_id: str) -> dict[str, Any] | None:
    """The user's traits (no personal data: that is sealed apart), or None for an unknown user."""
    return await repo.user_traits(tx, user_id)


async def held_user(tx: TenantTx, user_id: str) -> HeldUser:
    """The user's profile (personal data still sealed), progress and completions, as stored."""
    return await repo.held_user(tx, user_id)


async def decision_labels(
    conn: AsyncConnection, model: str, window: timedelta, tenant: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    """Reviewed low-confidence decisions of ``model`` (operator read): features, chosen path, the verdict, the
    better path a reviewer named. Labels for training, counted in the drift report."""
    return await repo.decision_labels(conn, model, window.total_seconds(), tenant)


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    """Delete the user's rows; how many of each table there were."""
    return await repo.delete_user(tx, user_id)


async def users_on_step_since(
    tx: TenantTx, path_key: str, step_id: str, before: datetime, after: str = "", limit: int = 500
) -> list[str]:
    """In-progress users of ``path_key`` still on ``step_id`` with no progress since ``before`` (a page, by user id
    after ``after``): who a ``step_idle`` nudge trigger is for."""
    return await repo.users_on_step_since(tx, path_key, step_id, before, after, limit)


async def users_started_before(
    tx: TenantTx, path_key: str, before: datetime, after: str = "", limit: int = 500
) -> list[str]:
    """In-progress users of ``path_key`` who started before ``before`` (a page, by user id after ``after``)."""
    return await repo.users_started_before(tx, path_key, before, after, limit)


async def users_by_email_index(tx: TenantTx, index: bytes) -> list[str]:
    """The users whose email has this blind index."""
    return await repo.users_by_email_index(tx, index)


async def recent_model_features(
    conn: AsyncConnection, model: str, window: timedelta, tenant: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    """The features of ``model``'s recent path decisions, across tenants or one (operator read, for drift)."""
    return await repo.recent_model_features(conn, model, window.total_seconds(), tenant)


async def model_outcomes(
    conn: AsyncConnection, model: str, outcome: timedelta, tenant: uuid.UUID | None = None
) -> list[tuple[float, bool]]:
    """(predicted activation, activated within ``outcome``) of ``model``'s decisions old enough to know."""
    return await repo.model_outcomes(conn, model, outcome.total_seconds(), tenant)


async def tenant_model_decisions(
    conn: AsyncConnection, tenant: uuid.UUID, model: str, version: str, window: timedelta, horizon: timedelta
) -> tuple[list[dict[str, Any]], list[tuple[float, bool]]]:
    """One tenant's decisions by ``model``, in one query (operator read, for the drift check of a tenant's own
    model): the features of those of the last ``window``, and (predicted activation, activated within ``horizon``)
    of those by ``version`` at least ``horizon`` old."""
    return await repo.tenant_model_decisions(
        conn, tenant, model, version, window.total_seconds(), horizon.total_seconds()
    )


async def latest_model(conn: AsyncConnection, tenant: uuid.UUID, window: timedelta) -> str | None:
    """The model that decided the tenant's latest start decided by a model within ``window`` (operator read)."""
    return await repo.latest_model(conn, tenant, window.total_seconds())


LoggedDecision = repo.LoggedDecisionRow


async def logged_decisions(
    conn: AsyncConnection, tenant: uuid.UUID, horizon: timedelta, window: timedelta
) -> list[LoggedDecision]:
    """One tenant's path decisions that carry a propensity, started within ``window`` and at least ``horizon`` ago,
    with the plain traits, the features the model saw (if any) and activation within ``horizon`` (operator read, for
    ``firstmile models train --tenant``). Never another tenant's rows, never personal data."""
    return await repo.logged_decisions(conn, tenant, horizon.total_seconds(), window.total_seconds())
