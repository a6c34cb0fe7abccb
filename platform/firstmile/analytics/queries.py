"""The analytics queries: funnel, drop-off, cohort retention, time to activation, step completion, activation rate,
the experiment analysis.

Tenant-scoped by construction: SQL is built only through :class:`_Builder`, whose
one way to name the ``events`` table (:meth:`_Builder.events`) writes
``tenant_id = {tenant:UUID}`` in front of every condition, and whose
:meth:`_Builder.build` refuses a statement that reads ``events`` any other way; the
same holds for ``experiment_users`` (:meth:`_Builder.experiment_users`).
Every public function takes the :data:`~firstmile.kit.db.TenantId` first.

The cohort of users a query looks at is defined by their ``onboarding.started``
events: a user belongs to it when they have a start that matches the filters
(start time in ``[start, end)``, and the path, path version, experiment variant and
persona when given), and the earliest such start is the user's start time ``t0``.
The exact semantics of each query are in docs/analytics.md; the tests check them
against an independent computation in plain Python over the raw rows.

A redelivered event may be stored twice until a merge folds it (the stores do not look
before they write; the table is a ``ReplacingMergeTree``), so every query counts an event
once by construction: the cohort queries aggregate per user with minimum times, "exists"
tests and unique sets, counts are ``uniqExact(event_id)`` and the export keeps one row per
event id (``LIMIT 1 BY event_id``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from firstmile.analytics.rows import (
    ACTIVATED,
    NUDGE_CLICKED,
    NUDGE_CONVERTED,
    NUDGE_OPENED,
    NUDGE_SENT,
    NUDGE_UNSUBSCRIBED,
    STARTED,
    STEP_COMPLETED,
    STUCK,
)
from firstmile.analytics.sql import EXPERIMENT_USERS, TABLE, ParamValue, timestamp
from firstmile.analytics.store import AnalyticsStore
from firstmile.kit.scope import TenantId

DT = "DateTime64(3, 'UTC')"
TENANT_FILTER = "tenant_id = {tenant:UUID}"
SCOPED_FROM = f"FROM {TABLE} WHERE {TENANT_FILTER} AND "
"""How every built statement reads the events table (the unit tests check every statement for it)."""
SCOPED_EXPERIMENT_USERS = f"FROM {EXPERIMENT_USERS} FINAL WHERE {TENANT_FILTER} AND "
"""How a built statement reads ``experiment_users``: merged (``FINAL``), the tenant filter first."""

_TABLE_WORD = re.compile(rf"\b{TABLE}\b")
_EXPERIMENT_USERS_WORD = re.compile(rf"\b{EXPERIMENT_USERS}\b")

MEDIAN = 0.5
P90 = 0.9


@dataclass(frozen=True, slots=True)
class Filters:
    """Which users a query looks at: those whose start matches all of these."""

    start: datetime  # inclusive, tz-aware
    end: datetime  # exclusive, tz-aware
    path_key: str | None = None
    path_version: int | None = None
    variant: str | None = None
    persona: str | None = None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("filter bounds must be timezone-aware")
        if self.start >= self.end:
            raise ValueError("filter start must be before its end")


@dataclass(frozen=True, slots=True)
class Query:
    """One built statement of one tenant: SQL with ``{name:Type}`` placeholders and its parameter values.

    Made only by :meth:`_Builder.build`, which checks that every read of the events table
    carries the tenant filter; the store runs it only for the tenant it was built for.
    """

    tenant: uuid.UUID
    sql: str
    params: dict[str, ParamValue]


class UnscopedQueryError(AssertionError):
    """A statement reads the events (or experiment_users) table without the tenant filter (a bug in this module)."""


class _Builder:
    """Collects parameters; the only way the statements here name the events table."""

    def __init__(self, tenant: TenantId) -> None:
        if not isinstance(tenant, uuid.UUID):
            raise TypeError("queries need the tenant id as a UUID (a TenantId)")
        self.tenant = tenant
        self.params: dict[str, ParamValue] = {"tenant": str(tenant)}

    def param(self, name: str, type_: str, value: ParamValue) -> str:
        if name in self.params and self.params[name] != value:
            raise ValueError(f"parameter {name} bound twice with different values")
        self.params[name] = value
        return "{" + name + ":" + type_ + "}"

    def events(self, where: str) -> str:
        """``FROM events WHERE tenant_id = {tenant:UUID} AND (where)``: the tenant filter comes first, always."""
        return f"{SCOPED_FROM}({where})"

    def experiment_users(self, where: str) -> str:
        """``FROM experiment_users FINAL WHERE tenant_id = {tenant:UUID} AND (where)``: merged, the tenant first.

        ``where`` may hold conditions on the sorting key only: the rest of a ``FINAL`` row is known after the
        merge, so filter it in an enclosing query."""
        return f"{SCOPED_EXPERIMENT_USERS}({where})"

    def build(self, statement: str) -> Query:
        reads = len(_TABLE_WORD.findall(statement))
        folded = len(_EXPERIMENT_USERS_WORD.findall(statement))
        if reads + folded == 0 or reads != statement.count(SCOPED_FROM):
            raise UnscopedQueryError("every read of the events table must go through _Builder.events")
        if folded != statement.count(SCOPED_EXPERIMENT_USERS):
            raise UnscopedQueryError("every read of experiment_users must go through _Builder.experiment_users")
        return Query(self.tenant, statement, dict(self.params))

    def start_condition(self, f: Filters) -> str:
        """A row is a start of the cohort: an ``onboarding.started`` matching every filter."""
        conds = [
            f"event_type = '{STARTED}'",
            f"occurred_at >= {self.param('date_from', DT, timestamp(f.start))}",
            f"occurred_at < {self.param('date_to', DT, timestamp(f.end))}",
        ]
        if f.path_key is not None:
            conds.append(f"path_key = {self.param('path', 'String', f.path_key)}")
        if f.path_version is not None:
            conds.append(f"path_version = {self.param('version', 'UInt32', f.path_version)}")
        if f.variant is not None:
            conds.append(f"variant = {self.param('variant', 'String', f.variant)}")
        if f.persona is not None:
            conds.append(f"persona = {self.param('persona', 'String', f.persona)}")
        return " AND ".join(conds)

    def scan(self, f: Filters, *conditions: str, path: bool = True) -> str:
        """The rows a query reads: ``conditions``, the path (when filtered on), nothing before the earliest start."""
        conds = list(conditions)
        if path and f.path_key is not None:
            conds.append(f"path_key = {self.param('path', 'String', f.path_key)}")
        conds.append(f"occurred_at >= {self.param('date_from', DT, timestamp(f.start))}")
        return " AND ".join(conds)


def _types(*types: str) -> str:
    return "event_type IN (" + ", ".join(f"'{t}'" for t in types) + ")"


def _ms(window: timedelta) -> int:
    return int(window / timedelta(milliseconds=1))


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FunnelStep:
    step_id: str
    users: int
    conversion_from_previous: float | None
    conversion_from_start: float | None
    median_seconds_from_previous: float | None


@dataclass(frozen=True, slots=True)
class Funnel:
    started: int
    steps: tuple[FunnelStep, ...]


@dataclass(frozen=True, slots=True)
class DropoffStep:
    step_id: str
    reached_previous: int
    reached: int
    dropped: int
    share: float | None  # dropped / reached_previous


@dataclass(frozen=True, slots=True)
class Dropoff:
    started: int
    steps: tuple[DropoffStep, ...]


@dataclass(frozen=True, slots=True)
class CohortWeek:
    week: int
    week_start: str  # ISO date of that week's Monday
    users: int
    retention: float


@dataclass(frozen=True, slots=True)
class Cohort:
    cohort_week: str  # ISO date of the signup week's Monday (UTC)
    users: int
    weeks: tuple[CohortWeek, ...]


@dataclass(frozen=True, slots=True)
class Cohorts:
    weeks: int
    cohorts: tuple[Cohort, ...]


@dataclass(frozen=True, slots=True)
class ActivationBucket:
    """Activated users whose time from start to activation is in ``[from_seconds, to_seconds)`` (``to_seconds``
    ``None``: no upper bound)."""

    label: str
    from_seconds: int
    to_seconds: int | None
    users: int


HOUR = 3600
DAY = 24 * HOUR
TIME_TO_ACTIVATION_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("< 1 h", 0, HOUR),
    ("1-6 h", HOUR, 6 * HOUR),
    ("6-24 h", 6 * HOUR, DAY),
    ("1-3 d", DAY, 3 * DAY),
    ("3-7 d", 3 * DAY, 7 * DAY),
    ("7-14 d", 7 * DAY, 14 * DAY),
    ("14-30 d", 14 * DAY, 30 * DAY),
    ("≥ 30 d", 30 * DAY, None),
)
"""The time-to-activation histogram's fixed buckets, roughly log-spaced: ``(label, from, to)`` in seconds, each
lower bound inclusive and upper bound exclusive, together covering every time (docs/analytics.md)."""


@dataclass(frozen=True, slots=True)
class TimeToActivation:
    users: int
    activated: int
    p50_seconds: float | None
    p90_seconds: float | None
    histogram: tuple[ActivationBucket, ...]
    """One entry per :data:`TIME_TO_ACTIVATION_BUCKETS`, in order; the counts sum to ``activated``."""


@dataclass(frozen=True, slots=True)
class StepRate:
    step_id: str
    completed: int
    rate: float | None


@dataclass(frozen=True, slots=True)
class StepCompletion:
    started: int
    steps: tuple[StepRate, ...]


@dataclass(frozen=True, slots=True)
class PathActivation:
    path_key: str
    users: int
    activated: int
    rate: float | None


@dataclass(frozen=True, slots=True)
class NudgeChannel:
    channel: str
    sent: int
    opened: int
    clicked: int
    converted: int
    unsubscribed: int

    @property
    def open_rate(self) -> float | None:
        return ratio(self.opened, self.sent)

    @property
    def click_rate(self) -> float | None:
        return ratio(self.clicked, self.sent)

    @property
    def conversion_rate(self) -> float | None:
        return ratio(self.converted, self.sent)


@dataclass(frozen=True, slots=True)
class NudgeRates:
    """The design's nudge metrics: send rate (stuck users who were nudged), open and conversion rates."""

    stuck: int
    nudged: int
    send_rate: float | None
    sent: int
    opened: int
    converted: int
    open_rate: float | None
    conversion_rate: float | None
    channels: tuple[NudgeChannel, ...]


@dataclass(frozen=True, slots=True)
class WeekActivation:
    """The users whose start ``t0`` falls in the signup week beginning ``cohort_week`` (a Monday, UTC: the cohorts'
    week), and how many of them activated at or after it."""

    cohort_week: str
    users: int
    activated: int
    rate: float | None


@dataclass(frozen=True, slots=True)
class ActivationRate:
    users: int
    activated: int
    rate: float | None
    paths: tuple[PathActivation, ...]
    weeks: tuple[WeekActivation, ...]
    """Every signup week that overlaps the range, oldest first (a week nobody started in: 0 users, rate ``None``);
    the users and activations sum to the overall ones."""


def ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# -- builders --------------------------------------------------------------------------------------


def build_funnel(tenant: TenantId, f: Filters, steps: Sequence[str], window: timedelta) -> Query:
    """Per user: ``t0``, then ``t_i`` = the earliest completion of step *i* with ``t_{i-1} <= t_i <= t0 + window``."""
    if f.path_key is None:
        raise ValueError("a funnel needs a path")
    if not steps:
        raise ValueError("a funnel needs at least one step")
    if window <= timedelta(0):
        raise ValueError("the conversion window must be positive")
    b = _Builder(tenant)
    start = b.start_condition(f)
    window_ms = b.param("window_ms", "Int64", _ms(window))
    until = b.param("until", DT, timestamp(f.end + window))
    lists = "".join(
        f",\n        arraySort(groupArrayIf(occurred_at, event_type = '{STEP_COMPLETED}' "
        f"AND step_id = {b.param(f'step_{i}', 'String', step)})) AS c{i}"
        for i, step in enumerate(steps, 1)
    )
    reached = "".join(
        f",\n      arrayFirstOrNull(x -> x >= t{i - 1} AND x <= deadline, c{i}) AS t{i}"
        for i in range(1, len(steps) + 1)
    )
    counts = "".join(
        f",\n  countIf(t{i} IS NOT NULL) AS reached_{i}"
        f",\n  quantileExactIf({MEDIAN})(dateDiff('millisecond', assumeNotNull(t{i - 1}), assumeNotNull(t{i})), "
        f"t{i} IS NOT NULL) AS median_ms_{i}"
        for i in range(1, len(steps) + 1)
    )
    scan = b.scan(f, _types(STARTED, STEP_COMPLETED), f"occurred_at < {until}")
    statement = f"""
SELECT count() AS started{counts}
FROM (
    SELECT t0, t0 + toIntervalMillisecond({window_ms}) AS deadline{reached}
    FROM (
        SELECT user_id, minIf(occurred_at, {start}) AS t0{lists}
        {b.events(scan)}
        GROUP BY user_id
        HAVING countIf({start}) > 0
    )
)""".strip()
    return b.build(statement)


def build_cohorts(tenant: TenantId, f: Filters, weeks: int) -> Query:
    """Rows ``(cohort_week, week, users)``: users of the signup week active in week ``week`` after it."""
    if weeks < 0:
        raise ValueError("weeks must be >= 0")
    b = _Builder(tenant)
    start = b.start_condition(f)
    last = monday(f.end) + timedelta(weeks=weeks + 1)
    until = b.param("until", DT, timestamp(datetime(last.year, last.month, last.day, tzinfo=UTC)))
    n = b.param("weeks", "UInt16", weeks)
    statement = f"""
SELECT toString(cohort) AS cohort_week, week, count() AS users
FROM (
    SELECT toMonday(t0) AS cohort,
        arrayFilter(w -> w >= 0 AND w <= {n}, arrayMap(m -> intDiv(toInt32(m - cohort), 7), active)) AS offsets
    FROM (
        SELECT user_id, minIf(occurred_at, {start}) AS t0, groupUniqArray(toMonday(occurred_at)) AS active
        {b.events(b.scan(f, f"occurred_at < {until}", path=False))}
        GROUP BY user_id
        HAVING countIf({start}) > 0
    )
)
ARRAY JOIN offsets AS week
GROUP BY cohort_week, week
ORDER BY cohort_week, week""".strip()
    return b.build(statement)


def build_time_to_activation(tenant: TenantId, f: Filters) -> Query:
    """Per user: ``t0`` and the earliest ``onboarding.activated`` at or after it (on the path, when one is given);
    the quantiles of the times to activation and their count in each of :data:`TIME_TO_ACTIVATION_BUCKETS`
    (``bucket_0`` …)."""
    b = _Builder(tenant)
    start = b.start_condition(f)
    buckets = "".join(
        f",\n    countIf(ta IS NOT NULL AND ms >= {low * 1000}"
        + (f" AND ms < {high * 1000}" if high is not None else "")
        + f") AS bucket_{i}"
        for i, (_, low, high) in enumerate(TIME_TO_ACTIVATION_BUCKETS)
    )
    statement = f"""
SELECT count() AS users, countIf(ta IS NOT NULL) AS activated,
    quantilesExactIf({MEDIAN}, {P90})(ms, ta IS NOT NULL) AS quantiles_ms{buckets}
FROM (
    SELECT t0, arrayFirstOrNull(x -> x >= t0, acts) AS ta, dateDiff('millisecond', t0, assumeNotNull(ta)) AS ms
    FROM (
        SELECT user_id, minIf(occurred_at, {start}) AS t0,
            arraySort(groupArrayIf(occurred_at, event_type = '{ACTIVATED}')) AS acts
        {b.events(b.scan(f, _types(STARTED, ACTIVATED)))}
        GROUP BY user_id
        HAVING countIf({start}) > 0
    )
)""".strip()
    return b.build(statement)


def build_step_completion(tenant: TenantId, f: Filters, steps: Sequence[str]) -> Query:
    """Per step: users of the cohort with a completion of it at or after their ``t0`` (any order, no window)."""
    if f.path_key is None:
        raise ValueError("step completion needs a path")
    if not steps:
        raise ValueError("step completion needs at least one step")
    b = _Builder(tenant)
    start = b.start_condition(f)
    lists = "".join(
        f",\n            groupArrayIf(occurred_at, event_type = '{STEP_COMPLETED}' "
        f"AND step_id = {b.param(f'step_{i}', 'String', step)}) AS c{i}"
        for i, step in enumerate(steps, 1)
    )
    counts = "".join(
        f",\n    countIf(arrayExists(x -> x >= t0, c{i})) AS completed_{i}" for i in range(1, len(steps) + 1)
    )
    scan = b.scan(f, _types(STARTED, STEP_COMPLETED))
    statement = f"""
SELECT count() AS started{counts}
FROM (
    SELECT user_id, minIf(occurred_at, {start}) AS t0{lists}
    {b.events(scan)}
    GROUP BY user_id
    HAVING countIf({start}) > 0
)""".strip()
    return b.build(statement)


def build_activation_rate(tenant: TenantId, f: Filters, *, per_path: bool = False, per_week: bool = False) -> Query:
    """Users of the cohort (per path: per path of their start; per week: per signup week, the Monday (UTC) of their
    ``t0`` as ``cohort_week``, as the cohorts count it) with an activation at or after ``t0``."""
    if per_path and per_week:
        raise ValueError("activation rate: per path or per week, not both")
    b = _Builder(tenant)
    start = b.start_condition(f)
    group = "path_key, user_id" if per_path else "user_id"
    outer = "path_key, " if per_path else "toString(toMonday(t0)) AS cohort_week, " if per_week else ""
    tail = "\nGROUP BY path_key\nORDER BY path_key" if per_path else ""
    if per_week:
        tail = "\nGROUP BY cohort_week\nORDER BY cohort_week"
    statement = f"""
SELECT {outer}count() AS users, countIf(activated) AS activated
FROM (
    SELECT {group}, minIf(occurred_at, {start}) AS t0,
        arrayExists(x -> x >= t0, groupArrayIf(occurred_at, event_type = '{ACTIVATED}')) AS activated
    {b.events(b.scan(f, _types(STARTED, ACTIVATED)))}
    GROUP BY {group}
    HAVING countIf({start}) > 0
){tail}""".strip()
    return b.build(statement)


def build_nudge_channels(tenant: TenantId, f: Filters) -> Query:
    """Per channel: the nudges sent in the range, and how many of those were opened, clicked, converted or led to an
    unsubscribe (at any time after, up to now). A send is counted by its ``send_id``, once."""
    b = _Builder(tenant)
    sent = f"event_type = '{NUDGE_SENT}'"
    until = b.param("date_to", DT, timestamp(f.end))
    kinds = _types(NUDGE_SENT, NUDGE_OPENED, NUDGE_CLICKED, NUDGE_CONVERTED, NUDGE_UNSUBSCRIBED)
    statement = f"""
SELECT channel, count() AS sent, countIf(opened) AS opened, countIf(clicked) AS clicked,
    countIf(converted) AS converted, countIf(unsubscribed) AS unsubscribed
FROM (
    SELECT JSONExtractString(properties, 'send_id') AS send_id,
        anyIf(JSONExtractString(properties, 'channel'), {sent}) AS channel,
        minIf(occurred_at, {sent}) AS sent_at,
        countIf(event_type = '{NUDGE_OPENED}') > 0 AS opened,
        countIf(event_type = '{NUDGE_CLICKED}') > 0 AS clicked,
        countIf(event_type = '{NUDGE_CONVERTED}') > 0 AS converted,
        countIf(event_type = '{NUDGE_UNSUBSCRIBED}') > 0 AS unsubscribed
    {b.events(b.scan(f, kinds, path=False))}
    GROUP BY send_id
    HAVING countIf({sent}) > 0 AND sent_at < {until}
)
GROUP BY channel
ORDER BY channel""".strip()
    return b.build(statement)


def build_nudge_reach(tenant: TenantId, f: Filters) -> Query:
    """Users flagged stuck in the range, and how many of them were sent a nudge at or after their first flag."""
    b = _Builder(tenant)
    until = b.param("date_to", DT, timestamp(f.end))
    flagged = f"event_type = '{STUCK}' AND occurred_at < {until}"
    statement = f"""
SELECT count() AS stuck, countIf(nudged) AS nudged
FROM (
    SELECT user_id, minIf(occurred_at, {flagged}) AS t0,
        arrayExists(x -> x >= t0, groupArrayIf(occurred_at, event_type = '{NUDGE_SENT}')) AS nudged
    {b.events(b.scan(f, _types(STUCK, NUDGE_SENT), path=False))}
    GROUP BY user_id
    HAVING countIf({flagged}) > 0
)""".strip()
    return b.build(statement)


@dataclass(frozen=True, slots=True)
class ExperimentArm:
    """One variant of an experiment: its exposed users and what they did after their exposure."""

    variant: str
    users: int
    converted: int
    """Users who reached the primary metric (activation, or the metric's step) at or after exposure."""
    activated: int
    seconds_to_activation_mean: float | None
    seconds_to_activation_variance: float | None
    steps_mean: float
    steps_variance: float | None
    stuck: int
    unsubscribed: int


def build_experiment(tenant: TenantId, experiment_id: str, step_id: str | None, since: datetime) -> Query:
    """Per variant of ``experiment_id``: the users whose first exposure is at or after ``since``, and what they did
    after it: the primary metric (activation, or ``step_id`` completed), activation and its delay, the steps
    completed, flagged stuck, a nudge unsubscribe.

    Reads ``experiment_users`` (one row per exposed user, folded from the events on insert:
    :mod:`firstmile.analytics.experiment_users`) merged with ``FINAL``, never the events: regrouping the tenant's
    events by user cost 7 s over 10 million exposures (docs/benchmarks.md, issue 16). "Steps" are the distinct step
    ids completed at or after the exposure (before the fold: distinct step events, so a step completed twice
    counted twice). The exposure is the user's first of the experiment: a user first exposed before ``since`` is
    left out even when exposed again after it. The outcomes are compared with the exposure once more here (they
    were folded only at or after it), so the answer holds whichever parts the merge has joined."""
    b = _Builder(tenant)
    experiment = b.param("experiment", "String", experiment_id)
    converted = "activated" if step_id is None else f"has(steps, {b.param('step', 'String', step_id)})"
    statement = f"""
SELECT variant, count() AS users, countIf(converted) AS n_converted, countIf(activated) AS n_activated,
    avgIf(tta_s, activated) AS tta_mean, varSampIf(tta_s, activated) AS tta_var,
    avg(n_steps) AS steps_mean, varSamp(n_steps) AS steps_var, countIf(stuck) AS n_stuck,
    countIf(unsubscribed) AS n_unsubscribed
FROM (
    SELECT variant, exposed_at AS t0, ifNull(activated_at >= t0, false) AS activated, {converted} AS converted,
        if(activated, dateDiff('millisecond', assumeNotNull(t0), assumeNotNull(activated_at)) / 1000.0, 0.0) AS tta_s,
        toFloat64(length(steps)) AS n_steps,
        ifNull(stuck_at >= t0, false) AS stuck,
        ifNull(unsubscribed_at >= t0, false) AS unsubscribed
    {b.experiment_users(f"experiment_id = {experiment}")}
)
WHERE t0 >= {b.param("since", DT, timestamp(since))}
GROUP BY variant
ORDER BY variant""".strip()
    return b.build(statement)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if number != number else number  # NaN: no rows to average


def monday(moment: datetime) -> date:
    """The Monday (UTC) of the week holding ``moment``: ClickHouse's ``toMonday``."""
    day = moment.astimezone(UTC).date()
    return day - timedelta(days=day.weekday())


# -- running ---------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    return int(value)  # 64-bit integers may arrive quoted (output_format_json_quote_64bit_integers)


class AnalyticsQueries:
    """The queries on one store; synchronous (the service runs them on worker threads)."""

    def __init__(self, store: AnalyticsStore) -> None:
        self.store = store

    def _one(self, query: Query) -> dict[str, Any]:
        rows = self.store.run(query.tenant, query)
        if len(rows) != 1:
            raise RuntimeError(f"expected one row, got {len(rows)}")
        return rows[0]

    def funnel(self, tenant: TenantId, f: Filters, steps: Sequence[str], window: timedelta) -> Funnel:
        row = self._one(build_funnel(tenant, f, steps, window))
        started = _int(row["started"])
        out: list[FunnelStep] = []
        previous = started
        for i, step in enumerate(steps, 1):
            users = _int(row[f"reached_{i}"])
            out.append(
                FunnelStep(
                    step_id=step,
                    users=users,
                    conversion_from_previous=ratio(users, previous),
                    conversion_from_start=ratio(users, started),
                    median_seconds_from_previous=_int(row[f"median_ms_{i}"]) / 1000 if users else None,
                )
            )
            previous = users
        return Funnel(started=started, steps=tuple(out))

    def dropoff(self, tenant: TenantId, f: Filters, steps: Sequence[str], window: timedelta) -> Dropoff:
        return dropoff_from(self.funnel(tenant, f, steps, window))

    def cohorts(self, tenant: TenantId, f: Filters, weeks: int, as_of: datetime | None = None) -> Cohorts:
        """``as_of``: leave out the weeks that start after it (they have no data yet)."""
        counts: dict[str, dict[int, int]] = {}
        for row in self.store.run(tenant, build_cohorts(tenant, f, weeks)):
            counts.setdefault(str(row["cohort_week"]), {})[_int(row["week"])] = _int(row["users"])
        return cohorts_from(counts, weeks, as_of)

    def time_to_activation(self, tenant: TenantId, f: Filters) -> TimeToActivation:
        row = self._one(build_time_to_activation(tenant, f))
        activated = _int(row["activated"])
        q = [_int(v) / 1000 for v in row["quantiles_ms"]] if activated else [None, None]
        histogram = tuple(
            ActivationBucket(label, low, high, _int(row[f"bucket_{i}"]))
            for i, (label, low, high) in enumerate(TIME_TO_ACTIVATION_BUCKETS)
        )
        return TimeToActivation(
            users=_int(row["users"]), activated=activated, p50_seconds=q[0], p90_seconds=q[1], histogram=histogram
        )

    def step_completion(self, tenant: TenantId, f: Filters, steps: Sequence[str]) -> StepCompletion:
        row = self._one(build_step_completion(tenant, f, steps))
        started = _int(row["started"])
        rates = tuple(
            StepRate(step, _int(row[f"completed_{i}"]), ratio(_int(row[f"completed_{i}"]), started))
            for i, step in enumerate(steps, 1)
        )
        return StepCompletion(started=started, steps=rates)

    def nudge_rates(self, tenant: TenantId, f: Filters) -> NudgeRates:
        return nudge_rates_from(self._one(build_nudge_reach(tenant, f)), self.store.run(tenant,
                                build_nudge_channels(tenant, f)))  # fmt: skip

    def experiment(
        self, tenant: TenantId, experiment_id: str, step_id: str | None, since: datetime
    ) -> tuple[ExperimentArm, ...]:
        """Per variant: exposures and outcomes after them (:func:`build_experiment`)."""
        return tuple(
            ExperimentArm(
                variant=str(r["variant"]),
                users=_int(r["users"]),
                converted=_int(r["n_converted"]),
                activated=_int(r["n_activated"]),
                seconds_to_activation_mean=_float(r["tta_mean"]) if _int(r["n_activated"]) else None,
                seconds_to_activation_variance=_float(r["tta_var"]) if _int(r["n_activated"]) > 1 else None,
                steps_mean=_float(r["steps_mean"]) or 0.0,
                steps_variance=_float(r["steps_var"]) if _int(r["users"]) > 1 else None,
                stuck=_int(r["n_stuck"]),
                unsubscribed=_int(r["n_unsubscribed"]),
            )
            for r in self.store.run(tenant, build_experiment(tenant, experiment_id, step_id, since))
        )

    def activation_rate(self, tenant: TenantId, f: Filters) -> ActivationRate:
        """Overall, per path and per signup week; the overall numbers are the weeks' sums (each user has one
        ``t0``, so one week: the same count as :func:`build_activation_rate` overall, one query fewer)."""
        by_week = {
            str(r["cohort_week"]): (_int(r["users"]), _int(r["activated"]))
            for r in self.store.run(tenant, build_activation_rate(tenant, f, per_week=True))
        }
        weeks = activation_weeks_from(by_week, f)
        paths = tuple(
            PathActivation(
                str(r["path_key"]),
                _int(r["users"]),
                _int(r["activated"]),
                ratio(_int(r["activated"]), _int(r["users"])),
            )
            for r in self.store.run(tenant, build_activation_rate(tenant, f, per_path=True))
        )
        users, activated = sum(w.users for w in weeks), sum(w.activated for w in weeks)
        return ActivationRate(users=users, activated=activated, rate=ratio(activated, users), paths=paths, weeks=weeks)


def activation_weeks_from(by_week: dict[str, tuple[int, int]], f: Filters) -> tuple[WeekActivation, ...]:
    """Every signup week (Monday, UTC) from the range's first to the week of its last instant, with
    ``{cohort_week: (users, activated)}`` where there were starts, zeros elsewhere."""
    first, last = monday(f.start), monday(f.end - timedelta(milliseconds=1))
    span = {(first + timedelta(weeks=i)).isoformat() for i in range((last - first).days // 7 + 1)}
    out: list[WeekActivation] = []
    for week in sorted(span | set(by_week)):
        users, activated = by_week.get(week, (0, 0))
        out.append(WeekActivation(week, users, activated, ratio(activated, users)))
    return tuple(out)


def nudge_rates_from(reach: dict[str, Any], rows: Sequence[dict[str, Any]]) -> NudgeRates:
    channels = tuple(
        NudgeChannel(str(r["channel"]), _int(r["sent"]), _int(r["opened"]), _int(r["clicked"]), _int(r["converted"]),
                     _int(r["unsubscribed"]))
        for r in rows
    )  # fmt: skip
    stuck, nudged = _int(reach["stuck"]), _int(reach["nudged"])
    sent = sum(c.sent for c in channels)
    opened = sum(c.opened for c in channels)
    converted = sum(c.converted for c in channels)
    return NudgeRates(stuck, nudged, ratio(nudged, stuck), sent, opened, converted, ratio(opened, sent),
                      ratio(converted, sent), channels)  # fmt: skip


def dropoff_from(funnel: Funnel) -> Dropoff:
    """Users who reached the previous step (or started, for the first) but not this one."""
    out: list[DropoffStep] = []
    previous = funnel.started
    for step in funnel.steps:
        dropped = previous - step.users
        out.append(DropoffStep(step.step_id, previous, step.users, dropped, ratio(dropped, previous)))
        previous = step.users
    return Dropoff(started=funnel.started, steps=tuple(out))


def cohorts_from(counts: dict[str, dict[int, int]], weeks: int, as_of: datetime | None) -> Cohorts:
    """The retention grid from ``{cohort_week: {week: users}}`` (week 0 holds every user of the cohort)."""
    cohorts: list[Cohort] = []
    for cohort_week in sorted(counts):
        by_week = counts[cohort_week]
        size = by_week.get(0, 0)
        first = date.fromisoformat(cohort_week)
        cells: list[CohortWeek] = []
        for w in range(weeks + 1):
            week_start = first + timedelta(weeks=w)
            if as_of is not None and week_start > as_of.astimezone(UTC).date():
                break
            users = by_week.get(w, 0)
            cells.append(CohortWeek(w, week_start.isoformat(), users, users / size if size else 0.0))
        cohorts.append(Cohort(cohort_week=cohort_week, users=size, weeks=tuple(cells)))
    return Cohorts(weeks=weeks, cohorts=tuple(cohorts))


def build_user_events(tenant: TenantId, user_id: str, limit: int = 10_000) -> Query:
    """One user's events, oldest first (the data-subject export); a redelivered event once (``LIMIT 1 BY``)."""
    b = _Builder(tenant)
    user = b.param("user", "String", user_id)
    cap = b.param("limit", "UInt32", limit)
    return b.build(
        "SELECT toString(event_id) AS event_id, event_type, event_name, path_key, path_version, step_id,"
        " variant, persona, properties, toString(occurred_at) AS occurred_at "
        + b.events(f"user_id = {user}")
        + f" ORDER BY occurred_at, event_id LIMIT 1 BY event_id LIMIT {cap}"
    )


def build_event_count(tenant: TenantId) -> Query:
    """How many events the tenant has, each once (``firstmile analytics seed`` seeds only an empty tenant)."""
    b = _Builder(tenant)
    return b.build("SELECT uniqExact(event_id) AS n " + b.events("1 = 1"))


def build_user_event_count(tenant: TenantId, user_id: str) -> Query:
    """How many events one user has, each once (whether analytics holds anything about them)."""
    b = _Builder(tenant)
    user = b.param("user", "String", user_id)
    return b.build("SELECT uniqExact(event_id) AS n " + b.events(f"user_id = {user}"))
