"""The analytics queries on the real engine (chdb) against the plain-Python reference, and their tenant scoping.

One synthetic tenant (several paths, versions, variants and personas over ten
weeks), hand-made edge cases on top (completions at the start instant and at the
window's edge, out of order, on another path, before the start; a user with two
starts; redelivered events), and a second tenant with the same user ids and
paths that must never leak into the first one's numbers.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import clickhouse_connect
import pytest

from firstmile.analytics import queries
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.analytics.queries import AnalyticsQueries, Filters, UnscopedQueryError, _Builder
from firstmile.analytics.rows import ACTIVATED, STARTED, STEP_COMPLETED, AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore
from firstmile.analytics.synthetic import SyntheticPath, generate
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.unit import analytics_support as ref

END = datetime(2025, 3, 5, 15, 30, tzinfo=UTC)  # a Wednesday afternoon
BEGIN = END - timedelta(weeks=10)
DEV = SyntheticPath("dev", 2, ("key", "sdk", "event", "live", "invite"), "event", frozenset({"invite"}))
DEV_V1 = SyntheticPath("dev", 1, ("key", "sdk", "event", "live"), "sdk")
ANALYST = SyntheticPath("analyst", 1, ("source", "report", "dashboard", "share"), "report")
ADMIN = SyntheticPath("admin", 1, ("workspace", "invite", "roles", "billing"), "invite")
PATHS = (DEV, ANALYST, ADMIN, DEV_V1)
DEV_STEPS = DEV.required


@dataclass(frozen=True)
class Dataset:
    tenant: TenantId
    other: TenantId
    rows: list[AnalyticsEvent]  # every row inserted, both tenants, duplicates included


def _fact(tenant: uuid.UUID, event_type: str, user: str, at: datetime, step: str = "", **fields: Any) -> AnalyticsEvent:
    values: dict[str, Any] = {
        "path_key": "dev",
        "path_version": 2,
        "variant": "control",
        "persona": "developer",
        **fields,
    }
    return AnalyticsEvent(
        tenant_id=tenant,
        event_id=uuid.uuid4(),
        event_type=event_type,
        event_name="",
        user_id=user,
        anonymous_id="",
        occurred_at=at,
        received_at=at,
        step_id=step,
        **values,
    )


def edge_cases(tenant: uuid.UUID) -> list[AnalyticsEvent]:
    t = datetime(2025, 2, 10, 9, 0, tzinfo=UTC)
    week = timedelta(days=7)
    ms = timedelta(milliseconds=1)
    return [
        # completes the first step at the start instant, the second exactly at the 7-day edge, the third just after
        _fact(tenant, STARTED, "edge-1", t),
        _fact(tenant, STEP_COMPLETED, "edge-1", t, "key"),
        _fact(tenant, STEP_COMPLETED, "edge-1", t + week, "sdk"),
        _fact(tenant, STEP_COMPLETED, "edge-1", t + week + ms, "event"),
        # out of order: sdk before key, then sdk again after key
        _fact(tenant, STARTED, "edge-2", t),
        _fact(tenant, STEP_COMPLETED, "edge-2", t + timedelta(hours=1), "sdk"),
        _fact(tenant, STEP_COMPLETED, "edge-2", t + timedelta(hours=2), "key"),
        _fact(tenant, STEP_COMPLETED, "edge-2", t + timedelta(hours=3), "sdk"),
        _fact(tenant, STEP_COMPLETED, "edge-2", t + timedelta(hours=3), "event"),  # same instant as the previous
        _fact(tenant, ACTIVATED, "edge-2", t - timedelta(hours=1), "event"),  # before the start: never counts
        _fact(tenant, ACTIVATED, "edge-2", t + timedelta(hours=3), "event"),
        # two starts: control, then treatment a day later; a completion between them
        _fact(tenant, STARTED, "edge-3", t),
        _fact(tenant, STARTED, "edge-3", t + timedelta(days=1), variant="treatment"),
        _fact(tenant, STEP_COMPLETED, "edge-3", t + timedelta(hours=12), "key"),
        _fact(tenant, STEP_COMPLETED, "edge-3", t + timedelta(days=2), "sdk"),
        # a completion on another path, and a start on the boundaries of the range
        _fact(tenant, STARTED, "edge-4", t),
        _fact(tenant, STEP_COMPLETED, "edge-4", t + timedelta(hours=1), "key", path_key="analyst"),
        _fact(tenant, STARTED, "edge-5", BEGIN),
        _fact(tenant, STARTED, "edge-6", END - ms),
        _fact(tenant, STARTED, "edge-7", END),
        # sub-millisecond parts are truncated by the store, the reference does the same
        _fact(tenant, STARTED, "edge-8", t + timedelta(microseconds=999)),
        _fact(tenant, STEP_COMPLETED, "edge-8", t + timedelta(microseconds=500), "key"),
    ]


@pytest.fixture(scope="module")
def dataset(analytics_store: ChdbStore) -> Dataset:
    tenant, other = OPERATOR_CLI.tenant(uuid.uuid4()), OPERATOR_CLI.tenant(uuid.uuid4())
    mine = list(generate(tenant, PATHS, users=1200, weeks=10, end=END, seed=11)) + edge_cases(tenant)
    theirs = list(generate(other, PATHS, users=600, weeks=10, end=END, seed=12)) + edge_cases(other)
    assert analytics_store.insert(mine + theirs) == len(mine) + len(theirs)
    redelivered = mine[::7] + theirs[::5]
    assert analytics_store.insert(redelivered) == len(redelivered)  # written again; counted once
    return Dataset(tenant, other, mine + theirs + redelivered)


@pytest.fixture(scope="module")
def clickhouse_over_chdb(analytics_store: ChdbStore) -> Iterator[ClickHouseStore]:
    client = clickhouse_connect.get_client(dsn=f"chdb://{analytics_store.path}")
    store = ClickHouseStore(client, policy_role=None, tenant_setting=False)
    yield store
    store.close()


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def q(request: pytest.FixtureRequest) -> AnalyticsQueries:
    name = "analytics_store" if request.param == "chdb" else "clickhouse_over_chdb"
    store: AnalyticsStore = request.getfixturevalue(name)
    return AnalyticsQueries(store)


ALL = Filters(BEGIN, END)
FILTERS: dict[str, Filters] = {
    "everything": ALL,
    "path": replace(ALL, path_key="dev"),
    "path-version": replace(ALL, path_key="dev", path_version=2),
    "old-version": replace(ALL, path_key="dev", path_version=1),
    "variant": replace(ALL, path_key="dev", variant="treatment"),
    "no-variant": replace(ALL, variant=""),
    "persona": replace(ALL, persona="developer"),
    "narrow-range": Filters(datetime(2025, 2, 3, tzinfo=UTC), datetime(2025, 2, 17, 12, tzinfo=UTC), path_key="dev"),
    "combined": Filters(
        BEGIN + timedelta(weeks=2), END, path_key="analyst", variant="control", persona="analyst", path_version=1
    ),
    "nobody": replace(ALL, persona="astronaut"),
}
PATH_FILTERS = [k for k, f in FILTERS.items() if f.path_key is not None]


def _steps(f: Filters) -> tuple[str, ...]:
    return {"dev": DEV_STEPS, "analyst": ANALYST.required}[f.path_key or "dev"]


@pytest.mark.parametrize("name", PATH_FILTERS)
@pytest.mark.parametrize("window", [timedelta(days=7), timedelta(hours=3)])
def test_funnel_matches_the_reference(dataset: Dataset, q: AnalyticsQueries, name: str, window: timedelta) -> None:
    f = FILTERS[name]
    got = q.funnel(dataset.tenant, f, _steps(f), window)
    assert got == ref.funnel(dataset.rows, dataset.tenant, f, _steps(f), window)
    if name == "path":
        assert got.started > 100 and got.steps[-1].users > 10  # the data exercises every step


@pytest.mark.parametrize("name", PATH_FILTERS)
def test_dropoff_matches_the_reference(dataset: Dataset, q: AnalyticsQueries, name: str) -> None:
    f = FILTERS[name]
    window = timedelta(days=2)
    got = q.dropoff(dataset.tenant, f, _steps(f), window)
    assert got == ref.dropoff(dataset.rows, dataset.tenant, f, _steps(f), window)
    funnel = q.funnel(dataset.tenant, f, _steps(f), window)
    reached = [funnel.started, *(s.users for s in funnel.steps)]
    assert [s.dropped for s in got.steps] == [reached[i] - reached[i + 1] for i in range(len(funnel.steps))]


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize(("weeks", "as_of"), [(8, None), (3, None), (10, datetime(2025, 2, 20, tzinfo=UTC))])
def test_cohorts_match_the_reference(
    dataset: Dataset, q: AnalyticsQueries, name: str, weeks: int, as_of: datetime | None
) -> None:
    f = FILTERS[name]
    got = q.cohorts(dataset.tenant, f, weeks, as_of)
    assert got == ref.cohorts(dataset.rows, dataset.tenant, f, weeks, as_of)
    if name == "everything" and as_of is None:
        assert len(got.cohorts) == 11
        assert all(c.weeks[0].retention == 1.0 for c in got.cohorts)
        assert 0 < got.cohorts[0].weeks[3].retention < 1


@pytest.mark.parametrize("name", list(FILTERS))
def test_time_to_activation_matches_the_reference(dataset: Dataset, q: AnalyticsQueries, name: str) -> None:
    f = FILTERS[name]
    got = q.time_to_activation(dataset.tenant, f)
    assert got == ref.time_to_activation(dataset.rows, dataset.tenant, f)
    if name == "everything":
        assert got.activated > 100
        assert got.p50_seconds is not None and got.p90_seconds is not None
        assert got.p50_seconds < got.p90_seconds


@pytest.mark.parametrize("name", PATH_FILTERS)
def test_step_completion_matches_the_reference(dataset: Dataset, q: AnalyticsQueries, name: str) -> None:
    f = FILTERS[name]
    steps = DEV.steps if f.path_key == "dev" else ANALYST.steps
    got = q.step_completion(dataset.tenant, f, steps)
    assert got == ref.step_completion(dataset.rows, dataset.tenant, f, steps)


@pytest.mark.parametrize("name", list(FILTERS))
def test_activation_rate_matches_the_reference(dataset: Dataset, q: AnalyticsQueries, name: str) -> None:
    f = FILTERS[name]
    got = q.activation_rate(dataset.tenant, f)
    assert got == ref.activation_rate(dataset.rows, dataset.tenant, f)
    if name == "everything":
        assert {p.path_key for p in got.paths} == {"dev", "analyst", "admin"}


def test_edge_cases_count_as_documented(dataset: Dataset, q: AnalyticsQueries) -> None:
    """The hand-made users, counted by hand (not only against the reference)."""
    day = Filters(
        datetime(2025, 2, 10, tzinfo=UTC), datetime(2025, 2, 11, tzinfo=UTC), path_key="dev", persona="developer"
    )
    week = timedelta(days=7)
    edges = [r for r in dataset.rows if r.tenant_id == dataset.tenant and r.user_id.startswith("edge-")]
    # started: edge-1, -2, -3 (its control start), -4, -8; edge-4's completion is on another path
    assert set(ref.starts(edges, day)) == {"edge-1", "edge-2", "edge-3", "edge-4", "edge-8"}
    assert ref.funnel(edges, dataset.tenant, day, DEV_STEPS, week).steps[:3] == (
        # gaps 0 s (edge-1), 7200 s, 43200 s, 0 s (edge-8: t0 and key in the same ms): element 2 of 4 sorted
        queries.FunnelStep("key", 4, 4 / 5, 4 / 5, 7200.0),
        # 604800 s (edge-1, exactly at the window's edge), 3600 s (edge-2's second sdk), 129600 s (edge-3)
        queries.FunnelStep("sdk", 3, 3 / 4, 3 / 5, 129600.0),
        # edge-2 at the same instant as its sdk; edge-1's is 1 ms past the window
        queries.FunnelStep("event", 1, 1 / 3, 1 / 5, 0.0),
    )
    # edge-3's treatment start is a day later than its control start; its 'key' came between them
    treatment = replace(day, variant="treatment", end=day.end + timedelta(days=2))
    edge_treatment = ref.funnel(edges, dataset.tenant, treatment, DEV_STEPS, week)
    assert edge_treatment.started == 1 and edge_treatment.steps[0].users == 0
    for f in (day, treatment):
        assert q.funnel(dataset.tenant, f, DEV_STEPS, week) == ref.funnel(
            dataset.rows, dataset.tenant, f, DEV_STEPS, week
        )
    # edge-2 activated an hour before its start (ignored) and at 3 h: 10800 s, in the 1-6 h bucket
    got = ref.time_to_activation(edges, dataset.tenant, day)
    assert (got.users, got.activated, got.p50_seconds, got.p90_seconds) == (5, 1, 10800.0, 10800.0)
    assert [b.users for b in got.histogram] == [0, 1, 0, 0, 0, 0, 0, 0]


def test_range_bounds_are_inclusive_exclusive(dataset: Dataset, q: AnalyticsQueries) -> None:
    users = ref.starts([r for r in dataset.rows if r.tenant_id == dataset.tenant], ALL)
    assert "edge-5" in users and "edge-6" in users and "edge-7" not in users
    got = q.activation_rate(dataset.tenant, ALL)
    assert got.users == len(users)


def test_another_tenants_rows_never_count(dataset: Dataset, q: AnalyticsQueries) -> None:
    f = FILTERS["path"]
    mine = q.funnel(dataset.tenant, f, DEV_STEPS, timedelta(days=7))
    only_mine = [r for r in dataset.rows if r.tenant_id == dataset.tenant]
    assert mine == ref.funnel(only_mine, dataset.tenant, f, DEV_STEPS, timedelta(days=7))
    theirs = q.funnel(dataset.other, f, DEV_STEPS, timedelta(days=7))
    assert theirs == ref.funnel(dataset.rows, dataset.other, f, DEV_STEPS, timedelta(days=7))
    assert theirs.started != mine.started  # same user ids and paths, different numbers
    nobody = OPERATOR_CLI.tenant(uuid.uuid4())
    assert q.funnel(nobody, f, DEV_STEPS, timedelta(days=7)).started == 0
    assert q.cohorts(nobody, ALL, 4).cohorts == ()
    nothing = q.time_to_activation(nobody, ALL)
    assert (nothing.users, nothing.activated, nothing.p50_seconds, nothing.p90_seconds) == (0, 0, None, None)
    assert len(nothing.histogram) == 8 and {b.users for b in nothing.histogram} == {0}
    assert q.step_completion(nobody, f, DEV.steps).steps[0] == queries.StepRate("key", 0, None)
    rate = q.activation_rate(nobody, ALL)
    assert (rate.users, rate.activated, rate.rate, rate.paths) == (0, 0, None, ())
    assert len(rate.weeks) == 11 and {(w.users, w.activated, w.rate) for w in rate.weeks} == {(0, 0, None)}


def _every_answer(q: AnalyticsQueries, tenant: TenantId, user: str) -> list[Any]:
    """Every query's answer for ``tenant`` under every filter, the counts and one user's export."""
    week = timedelta(days=7)
    answers: list[Any] = []
    for f in FILTERS.values():
        with_path = f if f.path_key is not None else replace(f, path_key="dev")
        answers += [
            q.funnel(tenant, with_path, DEV_STEPS, week),
            q.dropoff(tenant, with_path, DEV_STEPS, week),
            q.cohorts(tenant, f, 6),
            q.time_to_activation(tenant, f),
            q.step_completion(tenant, with_path, DEV.steps),
            q.activation_rate(tenant, f),
        ]
    store = q.store
    answers += [
        store.run(tenant, queries.build_event_count(tenant)),
        store.run(tenant, queries.build_user_event_count(tenant, user)),
        store.run(tenant, queries.build_user_events(tenant, user)),
    ]
    return answers


def test_a_redelivered_event_counts_once_in_every_query(analytics_store: ChdbStore, q: AnalyticsQueries) -> None:
    """Every row stored twice (merges held off, so both copies are there): every answer is unchanged."""
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    rows = list(generate(tenant, PATHS, users=150, weeks=10, end=END, seed=13)) + edge_cases(tenant)
    user = rows[0].user_id
    analytics_store.dangerous_raw_sql("SYSTEM STOP MERGES events", {})
    try:
        assert q.store.insert(rows) == len(rows)
        once = _every_answer(q, tenant, user)
        assert q.store.insert(rows) == len(rows)
        stored = analytics_store.dangerous_raw_sql(
            "SELECT count() AS n FROM events WHERE tenant_id = {t:UUID}", {"t": str(tenant)}
        )
        assert int(stored[0]["n"]) == 2 * len(rows)  # both copies are there
        assert _every_answer(q, tenant, user) == once
    finally:
        analytics_store.dangerous_raw_sql("SYSTEM START MERGES events", {})
    assert int(once[-3][0]["n"]) == len(rows)
    assert once[-1] and len({r["event_id"] for r in once[-1]}) == len(once[-1])


# -- tenant scoping by construction ----------------------------------------------------------------


def _every_built_statement(tenant: TenantId) -> list[queries.Query]:
    built: list[queries.Query] = []
    for f in FILTERS.values():
        with_path = f if f.path_key is not None else replace(f, path_key="dev")
        built += [
            queries.build_funnel(tenant, with_path, DEV_STEPS, timedelta(days=7)),
            queries.build_cohorts(tenant, f, 8),
            queries.build_time_to_activation(tenant, f),
            queries.build_step_completion(tenant, with_path, DEV.steps),
            queries.build_activation_rate(tenant, f, per_path=False),
            queries.build_activation_rate(tenant, f, per_path=True),
            queries.build_activation_rate(tenant, f, per_week=True),
        ]
    return built


def test_every_built_statement_filters_on_the_tenant() -> None:
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    for query in _every_built_statement(tenant):
        reads = re.findall(r"\bevents\b", query.sql)
        assert reads, query.sql
        assert query.sql.count("FROM events WHERE tenant_id = {tenant:UUID} AND (") == len(reads), query.sql
        assert query.params["tenant"] == str(tenant)
        placeholders = set(re.findall(r"\{(\w+):", query.sql))
        assert placeholders == set(query.params), "every placeholder bound, nothing extra"


def test_the_builder_refuses_unscoped_statements() -> None:
    b = _Builder(OPERATOR_CLI.tenant(uuid.uuid4()))
    with pytest.raises(UnscopedQueryError):
        b.build("SELECT count() FROM events")
    with pytest.raises(UnscopedQueryError):
        b.build(f"SELECT count() {b.events('1')} UNION ALL SELECT count() FROM events")
    with pytest.raises(TypeError):
        _Builder("not-a-uuid")  # type: ignore[arg-type]


def test_the_experiment_analysis_reads_experiment_users_scoped_and_merged() -> None:
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    for step in (None, "invite"):
        query = queries.build_experiment(tenant, "e-1", step, END)
        assert not re.findall(r"\bevents\b", query.sql), "the analysis never regroups the events"
        reads = re.findall(r"\bexperiment_users\b", query.sql)
        assert reads, query.sql
        assert query.sql.count("FROM experiment_users FINAL WHERE tenant_id = {tenant:UUID} AND (") == len(reads)
        assert query.tenant == tenant and query.params["tenant"] == str(tenant)
        assert set(re.findall(r"\{(\w+):", query.sql)) == set(query.params)
    b = _Builder(tenant)
    with pytest.raises(UnscopedQueryError):
        b.build("SELECT count() FROM experiment_users FINAL")
    with pytest.raises(UnscopedQueryError):
        b.build(f"SELECT count() {b.experiment_users('1')} UNION ALL SELECT count() FROM experiment_users")
    with pytest.raises(UnscopedQueryError):
        b.build(f"SELECT count() {b.experiment_users('1')} UNION ALL SELECT count() FROM events")


def test_bad_query_arguments_are_refused() -> None:
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    with pytest.raises(ValueError, match="needs a path"):
        queries.build_funnel(tenant, ALL, DEV_STEPS, timedelta(days=1))
    with pytest.raises(ValueError, match="at least one step"):
        queries.build_funnel(tenant, FILTERS["path"], (), timedelta(days=1))
    with pytest.raises(ValueError, match="positive"):
        queries.build_funnel(tenant, FILTERS["path"], DEV_STEPS, timedelta(0))
    with pytest.raises(ValueError, match="before its end"):
        Filters(END, BEGIN)
    with pytest.raises(ValueError, match="timezone-aware"):
        Filters(datetime(2025, 1, 1), END)  # noqa: DTZ001


# -- the time-to-activation histogram and activation by signup week, counted by hand ----------------

MS = timedelta(milliseconds=1)
H = timedelta(hours=1)
D = timedelta(days=1)
TUE = datetime(2025, 1, 7, 10, 0, tzinfo=UTC)  # week of Monday 2025-01-06
WED = datetime(2025, 1, 15, 8, 0, tzinfo=UTC)  # week of 2025-01-13
SUNDAY_LAST_MS = datetime(2025, 1, 20, tzinfo=UTC) - MS  # still the week of 2025-01-13
MONDAY = datetime(2025, 1, 20, tzinfo=UTC)  # the week of 2025-01-20 begins
TUE_LATE = datetime(2025, 1, 28, 9, 0, tzinfo=UTC)  # week of 2025-01-27
HAND = Filters(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 29, tzinfo=UTC))  # Wednesday to Wednesday
BUCKETS = ["< 1 h", "1-6 h", "6-24 h", "1-3 d", "3-7 d", "7-14 d", "14-30 d", "≥ 30 d"]


def hand_made(tenant: uuid.UUID) -> tuple[list[AnalyticsEvent], AnalyticsEvent]:
    """Users activated at each bucket's bounds (in milliseconds), spread over the range's signup weeks; the second
    value is an activation to redeliver. Defaults: path dev, variant control, persona developer."""
    rows: list[AnalyticsEvent] = []

    def user(name: str, t0: datetime, *delays: timedelta, **fields: Any) -> None:
        rows.append(_fact(tenant, STARTED, name, t0, **fields))
        rows.extend(_fact(tenant, ACTIVATED, name, t0 + d, "event", **fields) for d in delays)

    treatment = {"variant": "treatment"}
    user("b-00", TUE, timedelta(0), **treatment)  # < 1 h: at the start instant
    user("b-01", TUE, H - MS, **treatment)  # < 1 h
    user("b-02", TUE, H, **treatment)  # 1-6 h: the lower bound is inclusive
    user("b-03", TUE, 6 * H - MS)  # 1-6 h
    user("b-04", TUE, 6 * H)  # 6-24 h
    user("b-05", TUE, D)  # 1-3 d
    user("b-06", WED, 3 * D - MS)  # 1-3 d
    user("b-07", WED, 3 * D)  # 3-7 d
    user("b-08", WED, 7 * D)  # 7-14 d
    user("b-09", WED, 14 * D)  # 14-30 d
    user("b-10", WED, 30 * D - MS)  # 14-30 d
    user("b-11", SUNDAY_LAST_MS, 30 * D)  # ≥ 30 d; signup week 2025-01-13
    user("b-12", MONDAY, 90 * D)  # ≥ 30 d, long after the range; signup week 2025-01-20
    user("b-13", HAND.start, -H)  # the range's first instant; activated only before the start: not activated
    user("b-14", MONDAY)  # never activated
    user("b-15", MONDAY, -H, 2 * D, 5 * H)  # the earliest activation at or after the start: 5 h
    user("b-16", MONDAY)  # activated on another path only, at 2 h
    rows.append(_fact(tenant, ACTIVATED, "b-16", MONDAY + 2 * H, "report", path_key="analyst", path_version=1))
    user("b-17", TUE_LATE, 10 * D, persona="analyst")  # 7-14 d
    user("b-18", TUE_LATE)  # < 1 h, redelivered
    again = _fact(tenant, ACTIVATED, "b-18", TUE_LATE + 20 * timedelta(minutes=1), "event")
    rows.append(again)
    user("x-early", HAND.start - MS, H)  # started before the range
    user("x-late", HAND.end, H)  # started at the range's end (exclusive)
    return rows, again


@pytest.fixture(scope="module")
def hand(analytics_store: ChdbStore) -> TenantId:
    tenant, other = OPERATOR_CLI.tenant(uuid.uuid4()), OPERATOR_CLI.tenant(uuid.uuid4())
    rows, again = hand_made(tenant)
    theirs = [  # the same users in another tenant, every one activated 40 days after the start
        replace(r, tenant_id=other, event_id=uuid.uuid4(), occurred_at=r.occurred_at + (40 * D if r.event_type ==
                ACTIVATED else timedelta(0)))
        for r in rows
    ]  # fmt: skip
    analytics_store.insert(rows + theirs)
    analytics_store.insert([again])  # redelivered: stored twice, counted once
    return tenant


@pytest.mark.parametrize(
    ("f", "users", "counts"),
    [
        (HAND, 19, [3, 4, 1, 2, 1, 2, 2, 2]),
        (replace(HAND, path_key="dev"), 19, [3, 3, 1, 2, 1, 2, 2, 2]),  # b-16's activation is on another path
        (replace(HAND, persona="developer"), 18, [3, 4, 1, 2, 1, 1, 2, 2]),  # b-17 is an analyst
        (replace(HAND, variant="treatment"), 3, [2, 1, 0, 0, 0, 0, 0, 0]),
        (replace(HAND, path_key="dev", path_version=1), 0, [0] * 8),
        (replace(HAND, start=WED, end=MONDAY), 6, [0, 0, 0, 1, 1, 1, 2, 1]),  # b-06 … b-11
    ],
    ids=["everything", "path", "persona", "variant", "no-such-version", "narrow-range"],
)
def test_the_time_to_activation_histogram_counts_each_user_in_its_bucket(
    hand: TenantId, q: AnalyticsQueries, f: Filters, users: int, counts: list[int]
) -> None:
    got = q.time_to_activation(hand, f)
    assert got.users == users
    assert [b.label for b in got.histogram] == BUCKETS
    assert [b.users for b in got.histogram] == counts
    assert got.activated == sum(counts)
    bounds = [(b.from_seconds, b.to_seconds) for b in got.histogram]
    assert bounds == [(0, 3600), (3600, 21600), (21600, 86400), (86400, 259200), (259200, 604800),
                      (604800, 1209600), (1209600, 2592000), (2592000, None)]  # fmt: skip
    assert got == ref.time_to_activation(hand_made(hand)[0], hand, f)  # the reference agrees on the same users


@pytest.mark.parametrize(
    ("f", "weeks"),
    [
        (HAND, [("2024-12-30", 1, 0), ("2025-01-06", 6, 6), ("2025-01-13", 6, 6), ("2025-01-20", 4, 3),
                ("2025-01-27", 2, 2)]),
        (replace(HAND, path_key="dev"), [("2024-12-30", 1, 0), ("2025-01-06", 6, 6), ("2025-01-13", 6, 6),
                                         ("2025-01-20", 4, 2), ("2025-01-27", 2, 2)]),
        (replace(HAND, persona="developer"), [("2024-12-30", 1, 0), ("2025-01-06", 6, 6), ("2025-01-13", 6, 6),
                                              ("2025-01-20", 4, 3), ("2025-01-27", 1, 1)]),
        (replace(HAND, variant="treatment"), [("2024-12-30", 0, 0), ("2025-01-06", 3, 3), ("2025-01-13", 0, 0),
                                              ("2025-01-20", 0, 0), ("2025-01-27", 0, 0)]),
        (replace(HAND, start=SUNDAY_LAST_MS, end=MONDAY + MS), [("2025-01-13", 1, 1), ("2025-01-20", 4, 3)]),
    ],
    ids=["everything", "path", "persona", "variant", "week-boundary"],
)  # fmt: skip
def test_the_activation_rate_per_signup_week(
    hand: TenantId, q: AnalyticsQueries, f: Filters, weeks: list[tuple[str, int, int]]
) -> None:
    got = q.activation_rate(hand, f)
    assert [(w.cohort_week, w.users, w.activated) for w in got.weeks] == weeks
    assert [w.rate for w in got.weeks] == [a / u if u else None for _, u, a in weeks]
    assert (got.users, got.activated) == (sum(u for _, u, _ in weeks), sum(a for _, _, a in weeks))
    assert got == ref.activation_rate(hand_made(hand)[0], hand, f)
    cohorts = q.cohorts(hand, f, 0)  # the same signup weeks as the cohorts
    assert [(c.cohort_week, c.users) for c in cohorts.cohorts] == [(w, u) for w, u, _ in weeks if u]


@pytest.mark.parametrize("name", list(FILTERS))
def test_the_histogram_and_the_weeks_add_up(dataset: Dataset, q: AnalyticsQueries, name: str) -> None:
    f = FILTERS[name]
    tta = q.time_to_activation(dataset.tenant, f)
    assert sum(b.users for b in tta.histogram) == tta.activated
    rate = q.activation_rate(dataset.tenant, f)
    assert sum(w.users for w in rate.weeks) == rate.users == tta.users
    assert sum(w.activated for w in rate.weeks) == rate.activated
    if name == "everything":
        assert sum(1 for b in tta.histogram if b.users) >= 3  # the synthetic delays spread over the buckets
        assert len(rate.weeks) == 11 and all(w.users for w in rate.weeks)


def test_activation_by_week_and_by_path_are_separate_questions() -> None:
    with pytest.raises(ValueError, match="not both"):
        queries.build_activation_rate(OPERATOR_CLI.tenant(uuid.uuid4()), ALL, per_path=True, per_week=True)
