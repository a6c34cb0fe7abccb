"""``experiment_users``: the fold of exposures and outcomes on insert, its rebuild from ``events``, erasure, and the
experiment analysis that reads it, on both adapters over the real engine (chdb, and clickhouse-connect over it)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import clickhouse_connect
import pytest
from click.testing import CliRunner

from firstmile.analytics import experiment_users, sql
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.cli import analytics
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.analytics.queries import AnalyticsQueries, ExperimentArm
from firstmile.analytics.rows import ACTIVATED, EXPOSED, NUDGE_UNSUBSCRIBED, STEP_COMPLETED, STUCK, AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore
from firstmile.kit.scope import OPERATOR_CLI, TenantId

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
EXPERIMENT = "quickstart-vs-tour"
SINCE = T0 - timedelta(days=1)


def _row(tenant: uuid.UUID, kind: str, user: str, at: datetime, step: str = "", **fields: str) -> AnalyticsEvent:
    return AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=kind, event_name=fields.pop("name", ""),
                          user_id=user, anonymous_id="", occurred_at=at, received_at=at, step_id=step,
                          variant=fields.pop("variant", ""), path_key="dev")  # fmt: skip


def exposed(
    tenant: uuid.UUID, user: str, at: datetime, variant: str = "tour", name: str = EXPERIMENT
) -> AnalyticsEvent:
    return _row(tenant, EXPOSED, user, at, name=name, variant=variant)


@pytest.fixture(scope="module")
def clickhouse_over_chdb(analytics_store: ChdbStore) -> Iterator[ClickHouseStore]:
    client = clickhouse_connect.get_client(dsn=f"chdb://{analytics_store.path}")
    store = ClickHouseStore(client, policy_role=None, tenant_setting=False)
    yield store
    store.close()


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def store(request: pytest.FixtureRequest) -> AnalyticsStore:
    chosen: AnalyticsStore = request.getfixturevalue(
        "analytics_store" if request.param == "chdb" else "clickhouse_over_chdb"
    )
    return chosen


def tenant() -> TenantId:
    return OPERATOR_CLI.tenant(uuid.uuid4())


def arms(
    store: AnalyticsStore, tenant: TenantId, experiment: str = EXPERIMENT, step: str | None = None,
    since: datetime = SINCE,
) -> dict[str, ExperimentArm]:  # fmt: skip
    return {a.variant: a for a in AnalyticsQueries(store).experiment(tenant, experiment, step, since)}


def stored(store: AnalyticsStore, tenant: uuid.UUID) -> int:
    """Rows (not yet merged ones included) of the tenant in experiment_users."""
    rows = store.dangerous_raw_sql(
        "SELECT count() AS n FROM experiment_users WHERE tenant_id = {tenant:UUID}", {"tenant": str(tenant)}
    )
    return int(rows[0]["n"])


def users_held(store: AnalyticsStore, tenant: uuid.UUID) -> list[str]:
    """The users the tenant has rows of in experiment_users (a count of rows would depend on background merges)."""
    rows = store.dangerous_raw_sql(
        "SELECT DISTINCT user_id FROM experiment_users WHERE tenant_id = {tenant:UUID} ORDER BY user_id",
        {"tenant": str(tenant)},
    )
    return [str(r["user_id"]) for r in rows]


# -- the fold, on its own --------------------------------------------------------------------------


class Lookups:
    def __init__(self, held: Sequence[Mapping[str, Any]] = ()) -> None:
        self.calls: list[tuple[uuid.UUID, list[str]]] = []
        self.held = held

    def __call__(self, tenant: uuid.UUID, users: list[str]) -> list[Mapping[str, Any]]:
        self.calls.append((tenant, users))
        return [r for r in self.held if r["user_id"] in users]


def test_the_fold_looks_up_once_per_tenant_and_only_for_outcomes() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    lookups = Lookups()
    assert experiment_users.fold([_row(a, "track", "u-1", T0), exposed(a, "u-1", T0)], lookups) == [
        (a, EXPERIMENT, "u-1", "tour", "2026-11-02 09:00:00.000", None, [], None, None)
    ]
    assert lookups.calls == []  # no outcome in the batch: no lookup
    rows = [_row(t, ACTIVATED, u, T0) for t in (a, b) for u in ("u-2", "u-1", "u-2")]
    assert experiment_users.fold(rows, lookups) == []  # nobody exposed: nothing folded
    assert lookups.calls == [(a, ["u-1", "u-2"]), (b, ["u-1", "u-2"])]


def test_the_fold_folds_outcomes_into_each_experiment_exposed_before_them() -> None:
    a = uuid.uuid4()
    held = [{"experiment_id": "old", "user_id": "u-1", "first_exposed": "2026-11-01 09:00:00.000"}]
    rows = [
        exposed(a, "u-1", T0),
        _row(a, STEP_COMPLETED, "u-1", T0 - timedelta(hours=1), "before-new"),  # after "old" only
        _row(a, STEP_COMPLETED, "u-1", T0 + timedelta(microseconds=900), "same-millisecond"),
        _row(a, STEP_COMPLETED, "u-1", T0 + timedelta(hours=1), "same-millisecond"),
        _row(a, ACTIVATED, "u-1", T0 + timedelta(hours=2)),
        _row(a, ACTIVATED, "u-1", T0 + timedelta(hours=1)),
        _row(a, STUCK, "u-1", T0 + timedelta(hours=3)),
        _row(a, STUCK, "u-1", T0 + timedelta(hours=4)),
        _row(a, NUDGE_UNSUBSCRIBED, "u-1", T0 + timedelta(hours=5)),
    ]
    folded = {r[1]: r for r in experiment_users.fold(rows, Lookups(held))}
    outcomes = ("2026-11-02 13:00:00.000", "2026-11-02 14:00:00.000")  # the latest stuck flag, the unsubscribe
    assert folded[EXPERIMENT] == (
        a, EXPERIMENT, "u-1", "tour", "2026-11-02 09:00:00.000", "2026-11-02 10:00:00.000", ["same-millisecond"],
        *outcomes,
    )  # fmt: skip
    assert folded["old"] == (
        a, "old", "u-1", "", None, "2026-11-02 10:00:00.000", ["before-new", "same-millisecond"], *outcomes,
    )  # fmt: skip


# -- on the stores, through the analysis -----------------------------------------------------------


def test_an_outcome_in_a_later_batch_than_the_exposure_counts(store: AnalyticsStore) -> None:
    t = tenant()
    store.insert([exposed(t, "u-1", T0), exposed(t, "u-2", T0, "control")])
    store.insert([_row(t, STEP_COMPLETED, "u-1", T0 + timedelta(minutes=30), "invite")])
    store.insert([_row(t, ACTIVATED, "u-1", T0 + timedelta(hours=1)), _row(t, STUCK, "u-2", T0 + timedelta(days=1))])
    store.insert([_row(t, NUDGE_UNSUBSCRIBED, "u-2", T0 + timedelta(days=2))])
    # since = the exposure itself (inclusive); the outcome rows hold no exposure time: the filter sees merged rows
    got = arms(store, t, since=T0)
    assert got == {
        "control": ExperimentArm("control", 1, 0, 0, None, None, 0.0, None, 1, 1),
        "tour": ExperimentArm("tour", 1, 1, 1, 3600.0, None, 1.0, None, 0, 0),
    }
    assert arms(store, t, step="invite")["tour"].converted == 1
    assert arms(store, t, step="invite")["control"].converted == 0
    assert arms(store, t, since=T0 + timedelta(milliseconds=1)) == {}


def test_an_outcome_before_the_exposure_does_not_count(store: AnalyticsStore) -> None:
    t = tenant()
    before = T0 - timedelta(minutes=1)
    store.insert([_row(t, ACTIVATED, "u-1", before), _row(t, STEP_COMPLETED, "u-1", before, "invite")])
    # the exposure, with outcomes that happened before it in the same batch, on both sides of it in the batch
    store.insert([_row(t, STUCK, "u-1", before), exposed(t, "u-1", T0), _row(t, NUDGE_UNSUBSCRIBED, "u-1", before)])
    store.insert([_row(t, ACTIVATED, "u-1", T0 - timedelta(milliseconds=1))])  # arrives later, happened before
    assert arms(store, t) == {"tour": ExperimentArm("tour", 1, 0, 0, None, None, 0.0, None, 0, 0)}
    assert arms(store, t, step="invite")["tour"].converted == 0


def _history(t: uuid.UUID, users: int, seed: int) -> list[AnalyticsEvent]:
    """Exposures to two experiments (some users to both) and outcomes before and after them, in time order."""
    rng = random.Random(seed)
    rows: list[AnalyticsEvent] = []
    for i in range(users):
        user = f"u-{i}"
        first = T0 + timedelta(minutes=rng.randrange(0, 5_000), microseconds=rng.randrange(0, 1_000_000))
        rows.append(exposed(t, user, first, rng.choice(["control", "tour"])))
        if i % 3 == 0:
            rows.append(exposed(t, user, first + timedelta(hours=rng.randrange(-5, 5)), "b", name="second"))
        if i % 7 == 0:
            rows.append(exposed(t, user, first + timedelta(days=1), "tour"))  # exposed again: the first counts
        for _ in range(rng.randrange(0, 8)):
            at = first + timedelta(minutes=rng.randrange(-600, 3_000), milliseconds=rng.randrange(0, 1000))
            kind = rng.choice([ACTIVATED, STEP_COMPLETED, STEP_COMPLETED, STUCK, NUDGE_UNSUBSCRIBED])
            rows.append(_row(t, kind, user, at, f"s{rng.randrange(0, 4)}" if kind == STEP_COMPLETED else ""))
    rows.sort(key=lambda r: r.occurred_at)
    return rows


def _insert_in_batches(store: AnalyticsStore, rows: Sequence[AnalyticsEvent], size: int) -> None:
    for start in range(0, len(rows), size):
        store.insert(rows[start : start + size])


def _every_arm(store: AnalyticsStore, t: TenantId) -> list[dict[str, ExperimentArm]]:
    return [
        arms(store, t, experiment, step, since)
        for experiment in (EXPERIMENT, "second")
        for step in (None, "s1")
        for since in (SINCE, T0 + timedelta(minutes=2_500))
    ]


def test_a_redelivered_batch_changes_no_number(store: AnalyticsStore, analytics_store: ChdbStore) -> None:
    t = tenant()
    rows = _history(t, 120, seed=3)
    _insert_in_batches(store, rows, 40)
    once = _every_arm(store, t)
    analytics_store.dangerous_raw_sql("SYSTEM STOP MERGES experiment_users", {})
    try:
        before = stored(store, t)
        _insert_in_batches(store, rows, 40)  # every batch again
        store.insert(rows[100:180] + rows[10:20])  # and a mixed one
        assert stored(store, t) > before  # written again, not merged yet
        assert _every_arm(store, t) == once
    finally:
        analytics_store.dangerous_raw_sql("SYSTEM START MERGES experiment_users", {})
    analytics_store.dangerous_raw_sql("OPTIMIZE TABLE experiment_users FINAL", {})
    assert _every_arm(store, t) == once


def test_the_rebuild_from_events_gives_the_arms_of_the_fold(store: AnalyticsStore, analytics_store: ChdbStore) -> None:
    t = tenant()
    rows = _history(t, 150, seed=5)
    _insert_in_batches(store, rows, 25)
    folded = _every_arm(store, t)
    assert folded[0] and folded[4]
    exposed_pairs = len({(r.event_name, r.user_id) for r in rows if r.event_type == EXPOSED})
    # (statements without a result go through chdb: clickhouse-connect's raw_query appends a FORMAT to them)
    analytics_store.dangerous_raw_sql("DELETE FROM experiment_users WHERE tenant_id = {t:UUID}", {"t": str(t)})
    assert arms(store, t) == {}
    assert store.rebuild_experiment_users(t) == exposed_pairs
    assert _every_arm(store, t) == folded
    assert store.rebuild_experiment_users(t) == exposed_pairs  # again: nothing changes
    assert _every_arm(store, t) == folded


def test_erasure_removes_the_user_from_the_arms(store: AnalyticsStore) -> None:
    t = tenant()
    store.insert([exposed(t, "gone", T0), exposed(t, "stays", T0, "control")])
    store.insert([_row(t, ACTIVATED, user, T0 + timedelta(hours=1)) for user in ("gone", "stays")])
    assert {v: a.users for v, a in arms(store, t).items()} == {"control": 1, "tour": 1}
    store.erase_user(t, "gone")
    assert arms(store, t) == {"control": ExperimentArm("control", 1, 1, 1, 3600.0, None, 0.0, None, 0, 0)}
    assert users_held(store, t) == ["stays"]
    store.rebuild_experiment_users(t)  # nothing left in the events to bring them back
    assert set(arms(store, t)) == {"control"}


def test_a_user_exposed_to_two_experiments_counts_in_both(store: AnalyticsStore) -> None:
    t = tenant()
    store.insert([exposed(t, "u-1", T0), exposed(t, "u-1", T0 + timedelta(hours=1), "b", name="second")])
    store.insert([_row(t, ACTIVATED, "u-1", T0 + timedelta(minutes=30))])  # after the first exposure only
    store.insert([_row(t, STEP_COMPLETED, "u-1", T0 + timedelta(hours=2), "invite")])  # after both
    assert arms(store, t) == {"tour": ExperimentArm("tour", 1, 1, 1, 1800.0, None, 1.0, None, 0, 0)}
    assert arms(store, t, "second") == {"b": ExperimentArm("b", 1, 0, 0, None, None, 1.0, None, 0, 0)}
    assert arms(store, t, "second", "invite")["b"].converted == 1


def test_another_tenants_rows_never_appear(store: AnalyticsStore) -> None:
    mine, theirs = tenant(), tenant()
    store.insert([exposed(theirs, "u-1", T0, "control"), exposed(theirs, "u-2", T0, "control")])
    store.insert([exposed(mine, "u-1", T0)])
    # u-2 is exposed only in the other tenant: their exposure must not fold this tenant's outcome
    store.insert([_row(mine, ACTIVATED, u, T0 + timedelta(hours=1)) for u in ("u-1", "u-2")])
    store.insert([_row(theirs, STUCK, u, T0 + timedelta(hours=1)) for u in ("u-1", "u-2")])
    assert arms(store, mine) == {"tour": ExperimentArm("tour", 1, 1, 1, 3600.0, None, 0.0, None, 0, 0)}
    assert arms(store, theirs) == {"control": ExperimentArm("control", 2, 0, 0, None, None, 0.0, 0.0, 2, 0)}
    assert users_held(store, mine) == ["u-1"]  # nothing for u-2: exposed only in the other tenant
    assert arms(store, tenant()) == {}
    store.rebuild_experiment_users(mine)
    assert arms(store, theirs)["control"].users == 2 and set(arms(store, mine)) == {"tour"}


def test_ensure_schema_rebuilds_experiment_users_over_stored_events(
    store: AnalyticsStore, analytics_store: ChdbStore
) -> None:
    """An upgrade: the table is created where events are already stored, and filled from them."""
    t = tenant()
    rows = _history(t, 40, seed=11)
    _insert_in_batches(store, rows, 20)
    folded = _every_arm(store, t)
    analytics_store.dangerous_raw_sql(f"DROP TABLE {sql.EXPERIMENT_USERS}", {})
    try:
        store.ensure_schema()
    finally:
        analytics_store.dangerous_raw_sql(sql.CREATE_EXPERIMENT_USERS, {})  # whatever happened, the session goes on
    assert _every_arm(store, t) == folded


class _Deps:
    def __init__(self, store: AnalyticsStore) -> None:
        self.store = store

    @contextmanager
    def analytics_store(self) -> Iterator[AnalyticsStore]:
        yield self.store


def test_the_rebuild_command(analytics_store: ChdbStore) -> None:
    t = tenant()
    rows = _history(t, 30, seed=17)
    analytics_store.insert(rows)
    folded = _every_arm(analytics_store, t)
    analytics_store.dangerous_raw_sql("DELETE FROM experiment_users WHERE tenant_id = {t:UUID}", {"t": str(t)})
    result = CliRunner().invoke(analytics, ["rebuild-experiments", "--tenant", str(t)], obj=_Deps(analytics_store))
    assert result.exit_code == 0, result.output
    pairs = len({(r.event_name, r.user_id) for r in rows if r.event_type == EXPOSED})
    assert f"{pairs:,} exposed (experiment, user) pairs" in result.stderr
    assert f"events of tenant {t}" in result.stderr
    assert _every_arm(analytics_store, t) == folded
    result = CliRunner().invoke(analytics, ["rebuild-experiments"], obj=_Deps(analytics_store))  # every tenant
    assert result.exit_code == 0, result.output
    assert "events of every tenant" in result.stderr
    assert _every_arm(analytics_store, t) == folded
