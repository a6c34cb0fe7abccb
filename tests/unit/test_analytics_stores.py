"""The analytics store port: both adapters on the real engine (chdb), redelivery, erasure, the shared SQL.

The ClickHouse adapter runs here through clickhouse-connect's in-process chdb
interface, on the same engine as the chdb adapter: the same statements, the same
insert bytes, the same result parsing. Only the row policy and its tenant setting
need a ClickHouse server; for those one test drives the adapter with a client
object that records its calls (the only fake in these tests).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.binding import bind_query

from firstmile.analytics import sql
from firstmile.analytics.chdb_store import ChdbPathInUseError, ChdbStore
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.analytics.queries import build_event_count
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore, AnalyticsStoreError
from firstmile.kit.scope import OPERATOR_CLI

NOW = datetime(2025, 3, 3, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(scope="session")
def clickhouse_over_chdb(analytics_store: ChdbStore) -> Iterator[ClickHouseStore]:
    # A URL, as the wiring passes FIRSTMILE_CLICKHOUSE_URL; chdb has no custom settings and no row policies.
    store = ClickHouseStore(f"chdb://{analytics_store.path}", policy_role=None, tenant_setting=False)
    store.ensure_schema()
    yield store
    store.close()


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def store(request: pytest.FixtureRequest) -> AnalyticsStore:
    name = "analytics_store" if request.param == "chdb" else "clickhouse_over_chdb"
    chosen: AnalyticsStore = request.getfixturevalue(name)
    return chosen


def event(tenant: uuid.UUID, user: str = "u-1", *, at: datetime = NOW, **fields: Any) -> AnalyticsEvent:
    values: dict[str, Any] = {
        "tenant_id": tenant,
        "event_id": uuid.uuid4(),
        "event_type": "track",
        "event_name": "Report Viewed",
        "user_id": user,
        "anonymous_id": "",
        "occurred_at": at,
        "received_at": at + timedelta(milliseconds=30),
    }
    values.update(fields)
    return AnalyticsEvent(**values)


def count(store: AnalyticsStore, tenant: uuid.UUID) -> int:
    return int(store.dangerous_raw_sql(sql.COUNT_TENANT, {"tenant": str(tenant)})[0]["events"])


def test_both_adapters_satisfy_the_port(analytics_store: ChdbStore, clickhouse_over_chdb: ClickHouseStore) -> None:
    assert isinstance(analytics_store, AnalyticsStore)
    assert isinstance(clickhouse_over_chdb, AnalyticsStore)


def test_rows_round_trip_with_every_column(store: AnalyticsStore) -> None:
    tenant = uuid.uuid4()
    row = event(
        tenant,
        "user:ü'\\\t\"x",
        event_type="onboarding.step_completed",
        event_name="",
        anonymous_id="anon-1",
        path_key="developer-quickstart",
        path_version=3,
        step_id="install-sdk",
        variant="treatment",
        persona="developer",
        properties='{"a": "b\\n", "n": 1}',
    )
    assert store.insert([row]) == 1
    got = store.dangerous_raw_sql(
        "SELECT toString(event_id) AS id, event_type, event_name, user_id, anonymous_id, toString(occurred_at) AS at, "
        "toString(received_at) AS received, path_key, path_version, step_id, variant, persona, properties "
        "FROM events WHERE tenant_id = {tenant:UUID}",
        {"tenant": str(tenant)},
    )
    assert got == [
        {
            "id": str(row.event_id),
            "event_type": "onboarding.step_completed",
            "event_name": "",
            "user_id": "user:ü'\\\t\"x",
            "anonymous_id": "anon-1",
            "at": "2025-03-03 12:00:00.123",  # milliseconds, truncated
            "received": "2025-03-03 12:00:00.153",
            "path_key": "developer-quickstart",
            "path_version": 3,
            "step_id": "install-sdk",
            "variant": "treatment",
            "persona": "developer",
            "properties": '{"a": "b\\n", "n": 1}',
        }
    ]


def events_counted(store: AnalyticsStore, tenant: uuid.UUID) -> int:
    """What the queries count: each event id once (``queries.build_event_count``)."""
    return int(store.run(tenant, build_event_count(OPERATOR_CLI.tenant(tenant)))[0]["n"])


def test_redelivery_is_counted_once(store: AnalyticsStore) -> None:
    tenant, other = uuid.uuid4(), uuid.uuid4()
    batch = [event(tenant, f"u-{i}") for i in range(50)]
    assert store.insert(batch + batch[:10]) == 50  # repeats within the batch are written once
    assert store.insert(batch) == 50  # the whole batch again: no lookup, written again
    fresh = [event(tenant, "u-new") for _ in range(5)]
    assert store.insert(batch[20:30] + fresh) == 15  # a mixed redelivery
    # The same event id under another tenant is another event: ids are unique per tenant.
    assert store.insert([AnalyticsEvent(**{**_fields(batch[0]), "tenant_id": other})]) == 1
    assert events_counted(store, tenant) == 55
    assert events_counted(store, other) == 1
    assert store.insert([]) == 0


def _fields(row: AnalyticsEvent) -> dict[str, Any]:
    return {name: getattr(row, name) for name in sql.COLUMNS}


def test_the_table_folds_redelivered_copies(analytics_store: ChdbStore) -> None:
    """A redelivered event is a second row until a merge folds it (ReplacingMergeTree, same sorting key)."""
    tenant = uuid.uuid4()
    row = event(tenant)
    # The session's store holds other tests' rows of this month: a background merge between the two
    # inserts and the count would fold the copies early (seen in a full run). Held off while we look.
    analytics_store.dangerous_raw_sql("SYSTEM STOP MERGES events", {})
    try:
        analytics_store.insert([row])
        analytics_store.insert([row])
        assert count(analytics_store, tenant) == 2
        assert events_counted(analytics_store, tenant) == 1
        final = analytics_store.dangerous_raw_sql(
            "SELECT count() AS n FROM events FINAL WHERE tenant_id = {tenant:UUID}", {"tenant": str(tenant)}
        )
        assert final == [{"n": 1}]
    finally:
        analytics_store.dangerous_raw_sql("SYSTEM START MERGES events", {})
    analytics_store.dangerous_raw_sql("OPTIMIZE TABLE events FINAL", {})
    assert count(analytics_store, tenant) == 1


def test_erase_user_removes_only_that_users_rows(store: AnalyticsStore) -> None:
    tenant, other = uuid.uuid4(), uuid.uuid4()
    store.insert([event(tenant, "gone"), event(tenant, "gone"), event(tenant, "stays"), event(other, "gone")])
    store.erase_user(tenant, "gone")
    rows = store.dangerous_raw_sql(
        "SELECT user_id, count() AS n FROM events WHERE tenant_id = {tenant:UUID} GROUP BY user_id",
        {"tenant": str(tenant)},
    )
    assert rows == [{"user_id": "stays", "n": 1}]
    assert count(store, other) == 1


def test_parameters_are_bound_server_side_never_spliced(store: AnalyticsStore) -> None:
    tenant = uuid.uuid4()
    store.insert([event(tenant, "o'brien\\")])
    hostile = "x' OR 1=1 OR user_id != '"
    q = "SELECT count() AS n FROM events WHERE tenant_id = {tenant:UUID} AND user_id = {user:String}"
    assert store.dangerous_raw_sql(q, {"tenant": str(tenant), "user": hostile}) == [{"n": 0}]
    assert store.dangerous_raw_sql(q, {"tenant": str(tenant), "user": "o'brien\\"}) == [{"n": 1}]
    listed = "SELECT count() AS n FROM events WHERE tenant_id = {tenant:UUID} AND user_id IN {users:Array(String)}"
    assert store.dangerous_raw_sql(listed, {"tenant": str(tenant), "users": ["a", "o'brien\\", "\t\n"]}) == [{"n": 1}]


def test_engine_errors_surface_as_store_errors(store: AnalyticsStore) -> None:
    with pytest.raises(AnalyticsStoreError):
        store.dangerous_raw_sql(
            "SELECT no_such_column FROM events WHERE tenant_id = {tenant:UUID}", {"tenant": str(uuid.uuid4())}
        )


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sql.encode_rows([event(uuid.uuid4(), at=datetime(2025, 1, 1))])  # noqa: DTZ001


def test_one_chdb_path_per_process(analytics_store: ChdbStore, tmp_path: Any) -> None:
    again = ChdbStore(analytics_store.path)  # the same path: shares the open engine
    assert again.dangerous_raw_sql("SELECT 1 AS one", {}) == [{"one": 1}]
    again.close()
    assert analytics_store.dangerous_raw_sql("SELECT 1 AS one", {}) == [{"one": 1}]  # still open: reference-counted
    with pytest.raises(ChdbPathInUseError, match="one data path per process"):
        ChdbStore(tmp_path / "elsewhere")
    with pytest.raises(AnalyticsStoreError, match="closed"):
        again.dangerous_raw_sql("SELECT 1", {})


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "o'brien",
        "back\\slash",
        "tab\there",
        "new\nline",
        "tick`",
        "ünïcode",
        "",
        42,
        -7,
        0,
        ["a", "b'c", "d\\e", ""],
        [],
    ],
)
def test_parameter_encoding_matches_clickhouse_connect(value: sql.ParamValue) -> None:
    """The chdb adapter sends what clickhouse-connect sends for the same Python value."""
    query = "SELECT {v:String}" if not isinstance(value, list) else "SELECT {v:Array(String)}"
    _, bound = bind_query(query, {"v": value})
    assert bound == {"param_v": sql.encode_param(value)}


class RecordingClient:
    """Stands in for a ClickHouse server's client, only to see what the adapter sends it.

    ``answers``: what a query returns (``JSONEachRow`` bytes) by its statement; nothing for the others.
    ``failing``: statements whose ``command`` raises, as a server refusing them would."""

    def __init__(self, answers: dict[str, bytes] | None = None, failing: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.answers = answers or {}
        self.failing = failing

    def command(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("command", args, kwargs))
        if args[0] in self.failing:
            raise RuntimeError("Code: 115. DB::Exception: Unknown setting 'SQL_firstmile_tenant'")

    def raw_query(self, *args: Any, **kwargs: Any) -> bytes:
        self.calls.append(("raw_query", args, kwargs))
        return self.answers.get(args[0], b"")

    def raw_insert(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("raw_insert", args, kwargs))

    def close(self) -> None:
        self.calls.append(("close", (), {}))


def _policy(table: str) -> tuple[str, tuple[str], dict[str, Any]]:
    return (
        "command",
        (
            f"CREATE ROW POLICY IF NOT EXISTS tenant_isolation ON {table} "
            "USING tenant_id = toUUID(getSetting('SQL_firstmile_tenant')) TO firstmile_analytics",
        ),
        {},
    )


def _query(statement: str, params: dict[str, Any] | None, tenant: str | None) -> tuple[str, tuple[str], dict[str, Any]]:
    settings = None if tenant is None else {"SQL_firstmile_tenant": tenant}
    return ("raw_query", (statement,), {"parameters": params, "settings": settings, "fmt": "JSONEachRow"})


def test_clickhouse_adapter_sends_the_shared_sql_and_the_tenant_setting() -> None:
    client = RecordingClient()
    store = ClickHouseStore(client, policy_role="firstmile_analytics")
    tenant = uuid.uuid4()
    store.ensure_schema()
    assert client.calls[0] == _query(sql.EXPERIMENT_USERS_EXISTS, None, None)  # no answer: taken as there
    assert client.calls[1 : 1 + len(sql.DDL)] == [("command", (ddl,), {}) for ddl in sql.DDL]
    # the same policy on both tables that hold tenants' rows
    assert client.calls[1 + len(sql.DDL) :] == [_policy("events"), _policy("experiment_users")]
    client.calls.clear()

    rows = [event(tenant), event(tenant)]
    assert store.insert(rows + rows[:1]) == 2
    [insert] = client.calls  # no lookup before the insert, and nothing to fold
    assert insert == ("raw_insert", ("events", list(sql.COLUMNS), sql.encode_rows(rows)), {"fmt": sql.INSERT_FORMAT})
    client.calls.clear()

    exposure = event(tenant, "u-2", event_type="experiment.exposed", event_name="e-1", variant="tour")
    outcome = event(tenant, "u-2", at=NOW + timedelta(hours=1), event_type="onboarding.activated", event_name="")
    assert store.insert([exposure, outcome]) == 2
    events_insert, lookup, fold = client.calls
    assert events_insert[1][0] == "events"
    # the fold's one lookup of the batch's tenant carries the tenant setting
    assert lookup == _query(sql.LOOKUP_EXPOSURES, {"tenant": str(tenant), "users": ["u-2"]}, str(tenant))
    assert fold[:2] == ("raw_insert", ("experiment_users", list(sql.EXPERIMENT_USERS_COLUMNS), fold[1][2]))
    assert fold[1][2].count(b"\n") == 1  # one row: the exposure and the activation folded together
    client.calls.clear()

    store.dangerous_raw_sql("SELECT 1 FROM events WHERE tenant_id = {tenant:UUID}", {"tenant": str(tenant)})
    assert client.calls[0][2]["settings"] == {"SQL_firstmile_tenant": str(tenant)}
    store.erase_user(tenant, "u-1")
    assert client.calls[1:] == [
        (
            "command",
            (statement,),
            {"parameters": {"tenant": str(tenant), "user": "u-1"}, "settings": {"SQL_firstmile_tenant": str(tenant)}},
        )
        for statement in (sql.ERASE_USER, sql.ERASE_EXPERIMENT_USER)
    ]
    client.calls.clear()
    store.rebuild_experiment_users(tenant)
    assert client.calls == [
        (
            "command",
            (sql.REBUILD_EXPERIMENT_USERS,),
            {"parameters": {"tenant": str(tenant)}, "settings": {"SQL_firstmile_tenant": str(tenant)}},
        ),
        _query(sql.count_experiment_users(tenant), {"tenant": str(tenant)}, str(tenant)),
    ]
    with pytest.raises(ValueError, match="invalid ClickHouse role"):
        ClickHouseStore(client, policy_role="x; DROP TABLE events")


@pytest.mark.parametrize("refused", [False, True])
def test_clickhouse_adapter_rebuilds_experiment_users_on_upgrade(
    refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Created over stored events: rebuilt for every tenant; where the row policy refuses that, a warning."""
    answers = {sql.EXPERIMENT_USERS_EXISTS: b'{"result":0}\n', sql.EVENTS_PRESENT: b'{"n":1}\n'}
    client = RecordingClient(answers, failing=(sql.REBUILD_ALL_EXPERIMENT_USERS,) if refused else ())
    ClickHouseStore(client, policy_role="firstmile_analytics").ensure_schema()
    rebuilt = [c for c in client.calls if c[1][0] == sql.REBUILD_ALL_EXPERIMENT_USERS]
    assert rebuilt == [("command", (sql.REBUILD_ALL_EXPERIMENT_USERS,), {"parameters": None, "settings": None})]
    assert ("rebuild-experiments" in caplog.text) is refused
    client = RecordingClient({sql.EXPERIMENT_USERS_EXISTS: b'{"result":1}\n', sql.EVENTS_PRESENT: b'{"n":1}\n'})
    ClickHouseStore(client, policy_role=None).ensure_schema()
    assert not [c for c in client.calls if c[1][0] == sql.REBUILD_ALL_EXPERIMENT_USERS]  # there already: not again
