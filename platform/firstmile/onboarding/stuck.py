"""The progress evaluator's stuck detection: who is stuck, asked on a schedule.

Per tenant with idle users (found through ``firstmile_stuck_tenants``, migration
0007), under the ``worker:stuck-scan`` operator context:

1. one read: candidates, in-progress users idle for at least ``min_idle`` (no start or step
   completion since) and not already flagged on their current step, with their paths;
2. outside any transaction (both talk to the network): their online features
   (:class:`ActivitySource`) and the :class:`StuckDetector`, in one batch; when the detector
   fails (timeout, open breaker, not deployed) the **time-based rule** decides: stuck when the
   user has shown no activity for ``after`` (default 24 h);
3. one write: each stuck user whose progress has not moved since the read gets
   ``stuck_step``/``stuck_at``, an ``onboarding.stuck`` event in the outbox (for the nudge
   executor) and a decision entry in the audit log. A user who completed a step meanwhile,
   or whom a concurrent scan flagged first, is left alone (the update checks both).

The detector is a port: the ML slice's model-backed one is wired in by the wiring; the
onboarding slice knows only the time rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Row, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.catalog import CatalogCache

log = logging.getLogger(__name__)

STUCK_MODEL = "stuck_detector"
TIME_RULE = "time_rule"
WORKER = OperatorContext("worker:stuck-scan")


class DetectorUnavailableError(Exception):
    """The stuck detector could not answer; ``reason`` is what the decision records as the fallback cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """The detector's answer for one user."""

    stuck: bool
    probability: float


@dataclass(frozen=True, slots=True)
class Verdicts:
    version: str
    verdicts: list[Verdict]


class StuckDetector(Protocol):
    """The stuck model behind its guard (``firstmile.ml.stuck.ModelStuckDetector``); network, never the database."""

    async def detect(self, instances: list[dict[str, Any]]) -> Verdicts:
        """One verdict per instance; :class:`DetectorUnavailableError` when it cannot answer."""
        ...


_TENANTS = text("SELECT tenant_id, candidates FROM firstmile_stuck_tenants(:idle)")
_CANDIDATES = text(
    "SELECT user_id, path_key, path_version, current_step, updated_at, decision -> 'features'"
    " FROM user_progress"
    " WHERE tenant_id = :tid AND status = 'in_progress' AND updated_at <= :idle_before"
    "  AND stuck_step IS DISTINCT FROM current_step"
    " ORDER BY updated_at LIMIT :limit"
)
# Flags only users whose progress is as read (same step, same updated_at, not flagged meanwhile),
# and writes events for exactly those: a user who moved on, or whom another scan flagged, is skipped.
_FLAG = text(
    "WITH f AS ("
    " UPDATE user_progress p SET stuck_step = x.step, stuck_at = :now"
    " FROM jsonb_to_recordset(:flags) AS x(user_id text, step text, seen timestamptz)"
    " WHERE p.tenant_id = :tid AND p.user_id = x.user_id AND p.status = 'in_progress'"
    "  AND p.current_step = x.step AND p.updated_at = x.seen AND p.stuck_step IS DISTINCT FROM x.step"
    " RETURNING p.user_id"
    ") INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at)"
    " SELECT e.event_id, :tid, 'onboarding.stuck', :tid_text || ':' || (e.payload ->> 'user_id'), e.payload, :now"
    " FROM jsonb_to_recordset(:events) AS e(event_id uuid, payload jsonb)"
    " JOIN f ON f.user_id = e.payload ->> 'user_id'"
    " RETURNING payload ->> 'user_id'"
).bindparams(bindparam("flags", type_=JSONB), bindparam("events", type_=JSONB))


@dataclass(frozen=True, slots=True)
class UserActivity:
    """What the feature store knows of a user for stuck detection."""

    features: Mapping[str, Any]  # the nine model features
    hours_since_last_activity: float | None  # None: no event seen
    events_last_24h: float = 0.0


class ActivitySource(Protocol):
    async def activity(self, tenant_id: str, user_ids: Sequence[str], now: datetime) -> dict[str, UserActivity]:
        """What is known of each user (absent users are left out); may raise on a store failure."""
        ...


@dataclass(frozen=True, slots=True)
class StuckFlag:
    tenant_id: str
    user_id: str
    path_id: str
    step_id: str
    detected_by: str  # "stuck_detector" | "time_rule"
    model_version: str | None
    probability: float | None
    hours_since_last_activity: float
    fallback_reason: str | None


class StuckScanner:
    """Finds stuck users for every tenant of the region, on a schedule or once (``firstmile stuck scan``)."""

    def __init__(
        self,
        engine: AsyncEngine,
        catalogs: CatalogCache,
        detector: StuckDetector | None,
        activity: ActivitySource | None,
        *,
        after: timedelta = timedelta(hours=24),
        min_idle: timedelta = timedelta(hours=1),
        batch: int = 500,
    ) -> None:
        self.engine = engine
        self.catalogs = catalogs
        self.detector = detector
        self.activity = activity
        self.after = after
        self.min_idle = min_idle
        self.batch = batch

    async def tenants(self) -> list[TenantId]:
        async def read(conn: AsyncConnection) -> Sequence[Row[Any]]:
            return (await conn.execute(_TENANTS, {"idle": self.min_idle.total_seconds()})).all()

        return [WORKER.tenant(r[0]) for r in await across_tenants(self.engine, read)]

    async def run_once(self, now: datetime | None = None) -> list[StuckFlag]:
        flagged: list[StuckFlag] = []
        for tenant_id in await self.tenants():
            try:
                flagged += await self.scan_tenant(UnitOfWork(self.engine, tenant_id), now or datetime.now(UTC))
            except Exception:
                log.exception("stuck scan failed", extra={"fields": {"tenant": str(tenant_id)}})
        return flagged

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                flags = await self.run_once()
                if flags:
                    log.info("stuck users flagged", extra={"fields": {"count": len(flags)}})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stuck scan failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def scan_tenant(self, uow: UnitOfWork, now: datetime) -> list[StuckFlag]:
        """One tenant's scan: read, then ask (network), then write (see the module docstring)."""
        candidates = await uow.run(lambda tx: self._candidates(tx, now))
        if not candidates:
            return []
        known: dict[str, UserActivity] = {}
        if self.activity is not None:
            try:
                known = await self.activity.activity(str(uow.tenant), [c.user_id for c in candidates], now)
            except Exception as exc:  # the store is down: progress times alone
                log.warning("feature store unavailable for stuck scan: %s", exc)
        instances: list[dict[str, Any]] = []
        idle_hours: list[float] = []
        for c in candidates:
            on_step_h = max(0.0, (now - c.updated_at).total_seconds() / 3600)
            seen = known.get(c.user_id)
            idle = on_step_h
            if seen is not None and seen.hours_since_last_activity is not None:
                idle = min(idle, seen.hours_since_last_activity)
            idle_hours.append(idle)
            # The detector was trained on the nine features as they were when onboarding started
            # (what the path decision recorded), plus live progress and activity below.
            stored = c.decided_features or (seen.features if seen is not None else {})
            instances.append(
                dict(stored)
                | {
                    "path": c.path_key,
                    "step_index": float(c.required.index(c.current_step)) if c.current_step in c.required else 0.0,
                    "steps_total": float(len(c.required)),
                    "hours_since_last_activity": idle,
                    "hours_on_current_step": on_step_h,
                    "events_last_24h": seen.events_last_24h if seen is not None else 0.0,
                }
            )
        verdicts = await self._detect(instances, idle_hours)
        flags = [
            (
                c,
                StuckFlag(
                    str(uow.tenant), c.user_id, c.path_key, c.current_step, by, version, prob, round(idle, 2), why
                ),
            )
            for c, idle, (stuck, by, version, prob, why) in zip(candidates, idle_hours, verdicts, strict=True)
            if stuck
        ]
        if not flags:
            return []
        return await uow.run(lambda tx: self._record(tx, flags, now))

    async def _candidates(self, tx: TenantTx, now: datetime) -> list[_Candidate]:
        rows = (
            await tx.execute(_CANDIDATES, {"tid": tx.tenant, "idle_before": now - self.min_idle, "limit": self.batch})
        ).all()
        found: list[_Candidate] = []
        for user_id, path_key, path_version, current_step, updated_at, decided_features in rows:
            path = await self.catalogs.version(tx, path_key, path_version)
            found.append(
                _Candidate(
                    user_id,
                    path_key,
                    current_step,
                    updated_at,
                    decided_features or {},
                    tuple(s.id for s in path.required_steps),
                )
            )
        return found

    async def _detect(
        self, instances: list[dict[str, Any]], idle_hours: list[float]
    ) -> list[tuple[bool, str, str | None, float | None, str | None]]:
        reason = "not_deployed"
        if self.detector is not None:
            try:
                result = await self.detector.detect(instances)
                if len(result.verdicts) != len(instances):
                    raise DetectorUnavailableError("bad_response", "one verdict per user expected")
                return [(v.stuck, STUCK_MODEL, result.version, round(v.probability, 4), None) for v in result.verdicts]
            except DetectorUnavailableError as exc:
                reason = exc.reason
                if reason == "bad_response":
                    log.warning("stuck detector answered badly: %s", exc)
        limit = self.after.total_seconds() / 3600
        return [(idle >= limit, TIME_RULE, None, None, reason) for idle in idle_hours]

    async def _record(self, tx: TenantTx, flags: list[tuple[_Candidate, StuckFlag]], now: datetime) -> list[StuckFlag]:
        events = []
        for _, f in flags:
            payload = {
                "user_id": f.user_id,
                "path_id": f.path_id,
                "step_id": f.step_id,
                "detected_by": f.detected_by,
                "model_version": f.model_version,
                "probability": f.probability,
                "hours_since_last_activity": f.hours_since_last_activity,
                "fallback_reason": f.fallback_reason,
            }
            events.append({"event_id": str(uuid.uuid4()), "payload": payload})
        flagged = {
            str(r[0])
            for r in await tx.execute(
                _FLAG,
                {
                    "tid": tx.tenant,
                    "tid_text": str(tx.tenant),
                    "now": now,
                    "flags": [
                        {"user_id": c.user_id, "step": c.current_step, "seen": c.updated_at.isoformat()}
                        for c, _ in flags
                    ],
                    "events": events,
                },
            )
        }
        written: list[StuckFlag] = []
        for (_, f), event in zip(flags, events, strict=True):
            if f.user_id not in flagged:
                continue  # moved on, or flagged by another scan, since the read
            await audit.append(
                tx,
                "decision",
                "progress_evaluator",
                f.user_id,
                {
                    "decision": "stuck_detection",
                    "inputs": {"step_id": f.step_id, "hours_since_last_activity": f.hours_since_last_activity},
                    "output": {"stuck": True, "path_id": f.path_id, "step_id": f.step_id},
                    "model": STUCK_MODEL if f.detected_by == STUCK_MODEL else TIME_RULE,
                    "model_version": f.model_version,
                    "confidence": f.probability,
                    "fallback": None if f.detected_by == STUCK_MODEL else TIME_RULE,
                    "fallback_reason": f.fallback_reason,
                    "event_id": event["event_id"],
                },
            )
            telemetry.STUCK_DETECTED.labels(f.detected_by).inc()
            written.append(f)
        return written


@dataclass(frozen=True, slots=True)
class _Candidate:
    user_id: str
    path_key: str
    current_step: str
    updated_at: datetime
    decided_features: Mapping[str, Any]
    required: tuple[str, ...]
