"""Synthetic onboarding with known drop-offs, for the drop-off alert tests (exact counts, no randomness)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from firstmile.analytics.alerts import AlertRule, windows
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.rows import STARTED, STEP_COMPLETED, AnalyticsEvent

PATH = "developer-quickstart"
STEPS = ("create-api-key", "install-sdk", "send-first-event", "view-live-events")
BASELINE = {"create-api-key": 0.10, "install-sdk": 0.20, "send-first-event": 0.10, "view-live-events": 0.05}
SHIFTED = BASELINE | {"install-sdk": 0.50}


def journeys(
    tenant: uuid.UUID, start: datetime, end: datetime, users: int, drops: dict[str, float]
) -> list[AnalyticsEvent]:
    """``users`` starts spread evenly over ``[start, end)`` on the path's version 1; at each required step exactly
    ``round(share * users still there)`` of them stop; the others complete it 10 minutes after the step before."""
    rows: list[AnalyticsEvent] = []
    span = (end - start) / users
    prefix = uuid.uuid4().hex[:6]

    def row(kind: str, user: str, at: datetime, step: str = "") -> AnalyticsEvent:
        return AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=kind, event_name="", user_id=user,
                              anonymous_id="", occurred_at=at, received_at=at, path_key=PATH, path_version=1,
                              step_id=step)  # fmt: skip

    starts = {f"u-{prefix}-{i}": start + span * i + timedelta(seconds=1) for i in range(users)}
    rows += [row(STARTED, user, at) for user, at in starts.items()]
    still = list(starts)
    for k, step in enumerate(STEPS, 1):
        dropped = round(drops[step] * len(still))
        still = still[dropped:]
        rows += [row(STEP_COMPLETED, user, starts[user] + timedelta(minutes=10 * k), step) for user in still]
    return rows


def seed(store: ChdbStore, tenant: uuid.UUID, now: datetime, recent: dict[str, float]) -> None:
    """400 baseline starts with the usual drop-offs and 200 recent ones with ``recent``'s."""
    w = windows(now, AlertRule())
    store.insert(journeys(tenant, w.baseline_start, w.recent_start, 400, BASELINE))
    store.insert(journeys(tenant, w.recent_start, w.recent_end, 200, recent))
