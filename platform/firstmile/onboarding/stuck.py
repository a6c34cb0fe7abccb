"""The progress evaluator's stuck detection: who is stuck, asked on a schedule.

Per tenant with idle users (found through ``firstmile_stuck_tenants``, migration
0007), one transaction:

1. candidates: in-progress users idle for at least ``min_idle`` (no start or step
   completion since) and not already flagged on their current step;
2. their online features (feature store) and progress (step index, time on step);
3. the stuck detector, in one batch behind the guarded inference client; when it
   fails (timeout, open breaker, not deployed) the **time-based rule** decides:
   stuck when the user has shown no activity for ``after`` (default 24 h);
4. each stuck user: ``stuck_step``/``stuck_at`` set, an ``onboarding.stuck`` event in
   the outbox (for the nudge executor) and a decision entry in the audit log.
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

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantId, authorise_tenant, run_in_tenant_transaction
from firstmile.ml.inference import GuardedInference, InferenceError
from firstmile.onboarding.catalog import CatalogCache

log = logging.getLogger(__name__)

STUCK_MODEL = "stuck_detector"
TIME_RULE = "time_rule"

_TENANTS = text("SELECT tenant_id, candidates FROM firstmile_stuck_tenants(:idle)")
_CANDIDATES = text(
    "SELECT user_id, path_key, path_version, current_step, updated_at, decision -> 'features'"
    " FROM user_progress"
    " WHERE tenant_id = :tid AND status = 'in_progress' AND updated_at <= :idle_before"
    "  AND stuck_step IS DISTINCT FROM current_step"
    " ORDER BY updated_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)
_FLAG = text(
    "WITH f AS ("
    " UPDATE user_progress p SET stuck_step = x.step, stuck_at = :now"
    " FROM jsonb_to_recordset(:flags) AS x(user_id text, step text)"
    " WHERE p.tenant_id = :tid AND p.user_id = x.user_id RETURNING 1"
    ") INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at)"
    " SELECT e.event_id, :tid, 'onboarding.stuck', :tid_text || ':' || (e.payload ->> 'user_id'), e.payload, :now"
    " FROM jsonb_to_recordset(:events) AS e(event_id uuid, payload jsonb)"
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
        inference: GuardedInference | None,
        activity: ActivitySource | None,
        *,
        after: timedelta = timedelta(hours=24),
        min_idle: timedelta = timedelta(hours=1),
        batch: int = 500,
        timeout_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.catalogs = catalogs
        self.inference = inference
        self.activity = activity
        self.after = after
        self.min_idle = min_idle
        self.batch = batch
        self.timeout_s = timeout_s

    async def tenants(self) -> list[TenantId]:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            rows = (await conn.execute(_TENANTS, {"idle": self.min_idle.total_seconds()})).all()
        return [authorise_tenant(r[0]) for r in rows]

    async def run_once(self, now: datetime | None = None) -> list[StuckFlag]:
        flagged: list[StuckFlag] = []
        for tenant_id in await self.tenants():
            at = now or datetime.now(UTC)

            async def work(
                conn: AsyncConnection, tenant_id: TenantId = tenant_id, at: datetime = at
            ) -> list[StuckFlag]:
                return await self.scan_tenant(conn, tenant_id, at)

            try:
                flagged += await run_in_tenant_transaction(self.engine, tenant_id, work)
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

    async def scan_tenant(self, conn: AsyncConnection, tenant_id: TenantId, now: datetime) -> list[StuckFlag]:
        rows = (
            await conn.execute(_CANDIDATES, {"tid": tenant_id, "idle_before": now - self.min_idle, "limit": self.batch})
        ).all()
        if not rows:
            return []
        known: dict[str, UserActivity] = {}
        if self.activity is not None:
            try:
                known = await self.activity.activity(str(tenant_id), [r[0] for r in rows], now)
            except Exception as exc:  # the store is down: progress times alone
                log.warning("feature store unavailable for stuck scan: %s", exc)
        instances: list[dict[str, Any]] = []
        idle_hours: list[float] = []
        for user_id, path_key, path_version, current_step, updated_at, decided_features in rows:
            path = await self.catalogs.version(conn, tenant_id, path_key, path_version)
            required = [s.id for s in path.required_steps]
            on_step_h = max(0.0, (now - updated_at).total_seconds() / 3600)
            seen = known.get(user_id)
            idle = on_step_h
            if seen is not None and seen.hours_since_last_activity is not None:
                idle = min(idle, seen.hours_since_last_activity)
            idle_hours.append(idle)
            # The detector was trained on the nine features as they were when onboarding started
            # (what the path decision recorded), plus live progress and activity below.
            stored = decided_features or (seen.features if seen is not None else {})
            features = dict(stored)
            instances.append(
                features
                | {
                    "path": path_key,
                    "step_index": float(required.index(current_step)) if current_step in required else 0.0,
                    "steps_total": float(len(required)),
                    "hours_since_last_activity": idle,
                    "hours_on_current_step": on_step_h,
                    "events_last_24h": seen.events_last_24h if seen is not None else 0.0,
                }
            )
        verdicts = await self._detect(instances, idle_hours)
        flags = [
            StuckFlag(str(tenant_id), row[0], row[1], row[3], by, version, prob, round(idle, 2), reason)
            for row, idle, (stuck, by, version, prob, reason) in zip(rows, idle_hours, verdicts, strict=True)
            if stuck
        ]
        if flags:
            await self._record(conn, tenant_id, flags, now)
        return flags

    async def _detect(
        self, instances: list[dict[str, Any]], idle_hours: list[float]
    ) -> list[tuple[bool, str, str | None, float | None, str | None]]:
        reason = "not_deployed"
        if self.inference is not None:
            try:
                result = await self.inference.predict(STUCK_MODEL, instances, timeout_s=self.timeout_s)
                return [
                    (bool(p["stuck"]), STUCK_MODEL, result.version, round(float(p["stuck_probability"]), 4), None)
                    for p in result.predictions
                ]
            except InferenceError as exc:
                reason = exc.reason
            except (KeyError, TypeError, ValueError) as exc:
                reason = "bad_response"
                log.warning("stuck detector answered badly: %s", exc)
        limit = self.after.total_seconds() / 3600
        return [(idle >= limit, TIME_RULE, None, None, reason) for idle in idle_hours]

    async def _record(self, conn: AsyncConnection, tenant_id: TenantId, flags: list[StuckFlag], now: datetime) -> None:
        events = []
        for f in flags:
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
        await conn.execute(
            _FLAG,
            {
                "tid": tenant_id,
                "tid_text": str(tenant_id),
                "now": now,
                "flags": [{"user_id": f.user_id, "step": f.step_id} for f in flags],
                "events": events,
            },
        )
        for f, event in zip(flags, events, strict=True):
            await audit.append(
                conn,
                tenant_id,
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
