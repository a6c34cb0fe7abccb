"""Analytics test support: the chdb store of this test process, and the independent reference.

The reference computes every analytics query in plain Python over the raw rows,
written from the definitions in docs/analytics.md and sharing no code with
``firstmile.analytics.queries`` except its result containers (frozen dataclasses).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from firstmile.analytics.queries import (
    ActivationBucket,
    ActivationRate,
    Cohort,
    Cohorts,
    CohortWeek,
    Dropoff,
    DropoffStep,
    Filters,
    Funnel,
    FunnelStep,
    PathActivation,
    Query,
    StepCompletion,
    StepRate,
    TimeToActivation,
    WeekActivation,
)
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sql import Params
from firstmile.analytics.store import AnalyticsStore, AnalyticsStoreError

STARTED = "onboarding.started"
STEP_COMPLETED = "onboarding.step_completed"
ACTIVATED = "onboarding.activated"


# -- the reference ---------------------------------------------------------------------------------


def _ms(moment: datetime) -> datetime:
    """What the store keeps: UTC, milliseconds (sub-milliseconds truncated)."""
    u = moment.astimezone(UTC)
    return u.replace(microsecond=u.microsecond // 1000 * 1000)


def _mine(rows: Iterable[AnalyticsEvent], tenant: uuid.UUID) -> list[AnalyticsEvent]:
    """The tenant's rows, each event id once (what the store holds after deduplication)."""
    seen: set[uuid.UUID] = set()
    out: list[AnalyticsEvent] = []
    for r in rows:
        if r.tenant_id == tenant and r.event_id not in seen:
            seen.add(r.event_id)
            out.append(r)
    return out


def _matches_start(r: AnalyticsEvent, f: Filters) -> bool:
    return (
        r.event_type == STARTED
        and _ms(f.start) <= _ms(r.occurred_at) < _ms(f.end)
        and (f.path_key is None or r.path_key == f.path_key)
        and (f.path_version is None or r.path_version == f.path_version)
        and (f.variant is None or r.variant == f.variant)
        and (f.persona is None or r.persona == f.persona)
    )


def starts(rows: Sequence[AnalyticsEvent], f: Filters) -> dict[str, datetime]:
    """user -> earliest matching start."""
    t0: dict[str, datetime] = {}
    for r in rows:
        if _matches_start(r, f):
            at = _ms(r.occurred_at)
            if r.user_id not in t0 or at < t0[r.user_id]:
                t0[r.user_id] = at
    return t0


def _times(
    rows: Sequence[AnalyticsEvent], event_type: str, path_key: str | None
) -> dict[tuple[str, str], list[datetime]]:
    """(user, step) -> sorted times of events of that type (on the path, when given)."""
    out: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for r in rows:
        if r.event_type == event_type and (path_key is None or r.path_key == path_key):
            out[(r.user_id, r.step_id)].append(_ms(r.occurred_at))
    for times in out.values():
        times.sort()
    return out


def quantile_exact(values: Sequence[int], level: float) -> int:
    """ClickHouse ``quantileExact``: the element at index floor(level * n) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(int(level * len(ordered)), len(ordered) - 1)]


def _ms_between(a: datetime, b: datetime) -> int:
    return (b - a) // timedelta(milliseconds=1)


def _reached(
    rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters, steps: Sequence[str], window: timedelta
) -> tuple[dict[str, datetime], dict[str, list[datetime]]]:
    """user -> t0, and user -> [t1, t2, …] as far as the user got, greedily (earliest qualifying completion)."""
    mine = _mine(rows, tenant)
    t0 = starts(mine, f)
    completions = _times(mine, STEP_COMPLETED, f.path_key)
    chains: dict[str, list[datetime]] = {}
    for user, start in t0.items():
        deadline = start + window
        chain: list[datetime] = []
        previous = start
        for step in steps:
            at = next((t for t in completions.get((user, step), []) if previous <= t <= deadline), None)
            if at is None:
                break
            chain.append(at)
            previous = at
        chains[user] = chain
    return t0, chains


def funnel(
    rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters, steps: Sequence[str], window: timedelta
) -> Funnel:
    t0, chains = _reached(rows, tenant, f, steps, window)
    started = len(t0)
    out: list[FunnelStep] = []
    previous_count = started
    for i, step in enumerate(steps):
        reached = [u for u, chain in chains.items() if len(chain) > i]
        gaps = [_ms_between(t0[u] if i == 0 else chains[u][i - 1], chains[u][i]) for u in reached]
        count = len(reached)
        out.append(
            FunnelStep(
                step_id=step,
                users=count,
                conversion_from_previous=count / previous_count if previous_count else None,
                conversion_from_start=count / started if started else None,
                median_seconds_from_previous=quantile_exact(gaps, 0.5) / 1000 if gaps else None,
            )
        )
        previous_count = count
    return Funnel(started=started, steps=tuple(out))


def dropoff(
    rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters, steps: Sequence[str], window: timedelta
) -> Dropoff:
    t0, chains = _reached(rows, tenant, f, steps, window)
    out: list[DropoffStep] = []
    for i, step in enumerate(steps):
        before = sum(1 for c in chains.values() if len(c) >= i)
        lost = sum(1 for c in chains.values() if len(c) == i)
        out.append(DropoffStep(step, before, before - lost, lost, lost / before if before else None))
    return Dropoff(started=len(t0), steps=tuple(out))


def _monday(moment: datetime) -> date:
    d = moment.astimezone(UTC).date()
    return d - timedelta(days=d.weekday())


def cohorts(
    rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters, weeks: int, as_of: datetime | None = None
) -> Cohorts:
    mine = _mine(rows, tenant)
    t0 = starts(mine, f)
    active: dict[str, set[int]] = defaultdict(set)
    for r in mine:
        if r.user_id in t0:
            offset = (_monday(r.occurred_at) - _monday(t0[r.user_id])).days // 7
            if 0 <= offset <= weeks:
                active[r.user_id].add(offset)
    by_cohort: dict[date, list[str]] = defaultdict(list)
    for user, start in t0.items():
        by_cohort[_monday(start)].append(user)
    out: list[Cohort] = []
    for week0 in sorted(by_cohort):
        members = by_cohort[week0]
        cells: list[CohortWeek] = []
        for w in range(weeks + 1):
            week_start = week0 + timedelta(weeks=w)
            if as_of is not None and week_start > as_of.astimezone(UTC).date():
                break
            n = sum(1 for u in members if w in active[u])
            cells.append(CohortWeek(w, week_start.isoformat(), n, n / len(members)))
        out.append(Cohort(week0.isoformat(), len(members), tuple(cells)))
    return Cohorts(weeks=weeks, cohorts=tuple(out))


HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
TTA_BUCKETS = (  # docs/analytics.md: label, from (inclusive), to (exclusive), in milliseconds
    ("< 1 h", 0, HOUR_MS),
    ("1-6 h", HOUR_MS, 6 * HOUR_MS),
    ("6-24 h", 6 * HOUR_MS, DAY_MS),
    ("1-3 d", DAY_MS, 3 * DAY_MS),
    ("3-7 d", 3 * DAY_MS, 7 * DAY_MS),
    ("7-14 d", 7 * DAY_MS, 14 * DAY_MS),
    ("14-30 d", 14 * DAY_MS, 30 * DAY_MS),
    ("≥ 30 d", 30 * DAY_MS, None),
)


def histogram(durations_ms: Sequence[int]) -> tuple[ActivationBucket, ...]:
    """The time-to-activation histogram of these durations, bucket by bucket."""
    return tuple(
        ActivationBucket(
            label,
            low // 1000,
            None if high is None else high // 1000,
            sum(1 for d in durations_ms if low <= d and (high is None or d < high)),
        )
        for label, low, high in TTA_BUCKETS
    )


def time_to_activation(rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters) -> TimeToActivation:
    mine = _mine(rows, tenant)
    t0 = starts(mine, f)
    activations: dict[str, list[datetime]] = defaultdict(list)
    for r in mine:
        if r.event_type == ACTIVATED and (f.path_key is None or r.path_key == f.path_key):
            activations[r.user_id].append(_ms(r.occurred_at))
    durations = []
    for user, start in t0.items():
        after = [t for t in activations.get(user, []) if t >= start]
        if after:
            durations.append(_ms_between(start, min(after)))
    if not durations:
        return TimeToActivation(len(t0), 0, None, None, histogram(()))
    return TimeToActivation(
        users=len(t0),
        activated=len(durations),
        p50_seconds=quantile_exact(durations, 0.5) / 1000,
        p90_seconds=quantile_exact(durations, 0.9) / 1000,
        histogram=histogram(durations),
    )


def step_completion(
    rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters, steps: Sequence[str]
) -> StepCompletion:
    mine = _mine(rows, tenant)
    t0 = starts(mine, f)
    completions = _times(mine, STEP_COMPLETED, f.path_key)
    rates = []
    for step in steps:
        n = sum(1 for u, start in t0.items() if any(t >= start for t in completions.get((u, step), [])))
        rates.append(StepRate(step, n, n / len(t0) if t0 else None))
    return StepCompletion(started=len(t0), steps=tuple(rates))


def activation_rate(rows: Sequence[AnalyticsEvent], tenant: uuid.UUID, f: Filters) -> ActivationRate:
    mine = _mine(rows, tenant)

    def activated(users: dict[str, datetime], path_key: str | None) -> int:
        acts: dict[str, list[datetime]] = defaultdict(list)
        for r in mine:
            if r.event_type == ACTIVATED and (path_key is None or r.path_key == path_key):
                acts[r.user_id].append(_ms(r.occurred_at))
        return sum(1 for u, start in users.items() if any(t >= start for t in acts.get(u, [])))

    overall = starts(mine, f)
    n_overall = activated(overall, f.path_key)
    keys = sorted({r.path_key for r in mine if _matches_start(r, f)})
    paths = []
    for key in keys:
        per_path = Filters(f.start, f.end, key, f.path_version, f.variant, f.persona)
        users = starts(mine, per_path)
        n = activated(users, key)
        paths.append(PathActivation(key, len(users), n, n / len(users) if users else None))
    by_week: dict[date, list[str]] = defaultdict(list)
    for user, start in overall.items():
        by_week[_monday(start)].append(user)
    first, last = _monday(f.start), _monday(f.end - timedelta(milliseconds=1))
    weeks = []
    week = first
    while week <= last:
        members = by_week.get(week, [])
        n = activated({u: overall[u] for u in members}, f.path_key)
        weeks.append(WeekActivation(week.isoformat(), len(members), n, n / len(members) if members else None))
        week += timedelta(weeks=1)
    return ActivationRate(
        users=len(overall),
        activated=n_overall,
        rate=n_overall / len(overall) if overall else None,
        paths=tuple(paths),
        weeks=tuple(weeks),
    )


class FlakyStore:
    """A real store whose queries can be made slow or failing: the fault injection of the service tests."""

    def __init__(self, inner: AnalyticsStore, delay: float = 1.0) -> None:
        self.inner = inner
        self.mode = "ok"  # ok | slow | fail
        self.delay = delay
        self.queries = 0

    def ensure_schema(self) -> None:
        self.inner.ensure_schema()

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        return self.inner.insert(rows)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        return self.inner.bulk_load(rows)

    def _fault(self) -> None:
        self.queries += 1
        if self.mode == "slow":
            time.sleep(self.delay)
        elif self.mode == "fail":
            raise AnalyticsStoreError("injected: the engine is down")

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        self._fault()
        return self.inner.run(tenant, query)

    def dangerous_raw_sql(self, sql: str, params: Params) -> list[dict[str, Any]]:
        self._fault()
        return self.inner.dangerous_raw_sql(sql, params)

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        self.inner.erase_user(tenant_id, user_id)

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        return self.inner.rebuild_experiment_users(tenant)

    def close(self) -> None:
        """The inner store belongs to the test session."""
