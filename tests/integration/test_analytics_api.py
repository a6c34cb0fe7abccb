"""The analytics API on the real PostgreSQL (paths, keys) and the real engine (chdb): numbers, scoping, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics import queries
from firstmile.analytics.api import AnalyticsController, check_query
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import Filters
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.service import AnalyticsService
from firstmile.analytics.synthetic import SyntheticPath, generate
from firstmile.app import create_app
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant
from tests.unit import analytics_support as ref
from tests.unit.analytics_support import FlakyStore

Client = AsyncTestClient[Litestar]
PROBLEM = "https://firstmile.dev/problems/"
NOW = datetime.now(UTC)
TODAY = NOW.date()
FROM = TODAY - timedelta(days=40)
TO = TODAY
RANGE = Filters(datetime.combine(FROM, time(), UTC), datetime.combine(TO + timedelta(days=1), time(), UTC))
DEV = "developer-quickstart"


@dataclass(frozen=True)
class Seeded:
    tenant: TenantFixture
    paths: dict[str, SyntheticPath]
    rows: list[AnalyticsEvent]

    @property
    def id(self) -> TenantId:
        return OPERATOR_CLI.tenant(self.tenant.id)


def synthetic_paths(tenant: TenantFixture) -> dict[str, SyntheticPath]:
    """The tenant's manifest paths (version 1: a fresh tenant's first apply)."""
    return {
        p.id: SyntheticPath(
            key=p.id,
            version=1,
            steps=tuple(s.id for s in p.steps),
            activation_step=p.activation_step,
            optional=frozenset(s.id for s in p.steps if s.optional),
        )
        for p in tenant.manifest.paths
    }


@pytest.fixture(scope="module")
def flaky(analytics_store: ChdbStore) -> FlakyStore:
    return FlakyStore(analytics_store, delay=2.5)


@pytest.fixture(scope="module")
async def client(database: Database, flaky: FlakyStore) -> AsyncIterator[Client]:
    """An app of our own: its analytics store can be made slow or failing."""
    app = create_app(make_settings(analytics_query_timeout_seconds=1.0), database.app_url, PEPPER, analytics=flaky)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        assert isinstance(c.app.state.container.analytics, AnalyticsService)
        yield c


@pytest.fixture(autouse=True)
def healthy_store(flaky: FlakyStore) -> Iterator[None]:
    flaky.mode = "ok"
    yield
    flaky.mode = "ok"


async def seed(admin_engine: AsyncEngine, store: ChdbStore, users: int, seed: int) -> Seeded:
    tenant = await new_tenant(admin_engine, scopes=("analytics:read",))
    paths = synthetic_paths(tenant)
    rows = list(generate(tenant.id, list(paths.values()), users=users, weeks=8, end=NOW, seed=seed))
    assert store.insert(rows) == len(rows)
    return Seeded(tenant, paths, rows)


@pytest.fixture(scope="module")
async def seeded(admin_engine: AsyncEngine, analytics_store: ChdbStore) -> Seeded:
    return await seed(admin_engine, analytics_store, 600, 21)


@pytest.fixture(scope="module")
async def neighbour(admin_engine: AsyncEngine, analytics_store: ChdbStore) -> Seeded:
    """Another tenant with the same paths and user ids."""
    return await seed(admin_engine, analytics_store, 300, 22)


async def get(client: Client, tenant: TenantFixture, endpoint: str, **params: Any) -> Any:
    query = {("from" if k == "from_" else k): str(v) for k, v in params.items()}
    return await client.get(f"/v1/analytics/{endpoint}", params=query, headers=tenant.headers)


def fresh(body: dict[str, Any]) -> None:
    assert body["stale"] is False
    computed = datetime.fromisoformat(body["computed_at"])
    assert abs(computed - datetime.now(UTC)) < timedelta(minutes=5)


async def test_funnel_and_dropoff_match_the_reference(client: Client, seeded: Seeded, neighbour: Seeded) -> None:
    path = seeded.paths[DEV]
    f = Filters(RANGE.start, RANGE.end, path_key=DEV)
    window = timedelta(hours=72)
    response = await get(client, seeded.tenant, "funnel", path=DEV, from_=FROM, to=TO, window=72)
    assert response.status_code == 200, response.text
    body = response.json()
    fresh(body)
    expected = ref.funnel(seeded.rows + neighbour.rows, seeded.id, f, path.required, window)
    assert body["started"] == expected.started > 0
    assert body["window_hours"] == 72
    assert body["steps_version"] == 1
    assert body["filters"] == {
        "from": f"{FROM.isoformat()}T00:00:00Z",
        "to": f"{(TO + timedelta(days=1)).isoformat()}T00:00:00Z",
        "path": DEV,
        "path_version": None,
        "variant": None,
        "persona": None,
    }
    assert [s["step_id"] for s in body["steps"]] == list(path.required)  # required steps, in path order
    assert body["steps"][0]["title"] == "Create an API key"
    for got, want in zip(body["steps"], expected.steps, strict=True):
        assert (got["users"], got["conversion_from_previous"], got["conversion_from_start"]) == (
            want.users,
            want.conversion_from_previous,
            want.conversion_from_start,
        )
        assert got["median_seconds_from_previous"] == want.median_seconds_from_previous

    response = await get(client, seeded.tenant, "dropoff", path=DEV, from_=FROM, to=TO, window=72)
    assert response.status_code == 200, response.text
    drop = ref.dropoff(seeded.rows, seeded.id, f, path.required, window)
    assert [(s["reached_previous"], s["reached"], s["dropped"], s["share"]) for s in response.json()["steps"]] == [
        (s.reached_previous, s.reached, s.dropped, s.share) for s in drop.steps
    ]


async def test_filters_narrow_the_users(client: Client, seeded: Seeded) -> None:
    path = seeded.paths[DEV]
    f = Filters(RANGE.start, RANGE.end, path_key=DEV, path_version=1, variant="treatment", persona="developer")
    response = await get(
        client,
        seeded.tenant,
        "funnel",
        path=DEV,
        path_version=1,
        variant="treatment",
        persona="developer",
        from_=FROM,
        to=TO,
    )
    assert response.status_code == 200, response.text
    expected = ref.funnel(seeded.rows, seeded.id, f, path.required, timedelta(hours=168))
    assert response.json()["started"] == expected.started
    assert [s["users"] for s in response.json()["steps"]] == [s.users for s in expected.steps]


async def test_cohorts_time_to_activation_step_completion_activation_rate(client: Client, seeded: Seeded) -> None:
    response = await get(client, seeded.tenant, "cohorts", from_=FROM, to=TO, weeks=4)
    as_of = datetime.now(UTC).date()  # the server's "today" (not the module's, should the suite cross midnight)
    assert response.status_code == 200, response.text
    body = response.json()
    fresh(body)
    expected = ref.cohorts(seeded.rows, seeded.id, RANGE, 4, datetime.combine(as_of, time(), UTC))
    assert body["weeks"] == 4
    assert [(c["cohort_week"], c["users"], [w["users"] for w in c["weeks"]]) for c in body["cohorts"]] == [
        (c.cohort_week, c.users, [w.users for w in c.weeks]) for c in expected.cohorts
    ]
    assert all(w["week_start"] <= as_of.isoformat() for c in body["cohorts"] for w in c["weeks"])

    response = await get(client, seeded.tenant, "time-to-activation", from_=FROM, to=TO, path=DEV)
    assert response.status_code == 200, response.text
    tta = ref.time_to_activation(seeded.rows, seeded.id, Filters(RANGE.start, RANGE.end, path_key=DEV))
    body = response.json()
    assert (body["users"], body["activated"], body["p50_seconds"], body["p90_seconds"]) == (
        tta.users,
        tta.activated,
        tta.p50_seconds,
        tta.p90_seconds,
    )
    assert body["histogram"] == [
        {"label": b.label, "from_seconds": b.from_seconds, "to_seconds": b.to_seconds, "users": b.users}
        for b in tta.histogram
    ]
    assert sum(b["users"] for b in body["histogram"]) == body["activated"] > 0
    assert (body["histogram"][0]["from_seconds"], body["histogram"][0]["to_seconds"]) == (0, 3600)
    assert body["histogram"][-1]["to_seconds"] is None

    path = seeded.paths[DEV]
    response = await get(client, seeded.tenant, "step-completion", from_=FROM, to=TO, path=DEV)
    assert response.status_code == 200, response.text
    sc = ref.step_completion(seeded.rows, seeded.id, Filters(RANGE.start, RANGE.end, path_key=DEV), path.steps)
    steps = response.json()["steps"]
    assert [s["step_id"] for s in steps] == list(path.steps)  # every step, optional ones included
    assert [s["optional"] for s in steps] == [s in path.optional for s in path.steps]
    assert [(s["completed"], s["rate"]) for s in steps] == [(s.completed, s.rate) for s in sc.steps]

    response = await get(client, seeded.tenant, "activation-rate", from_=FROM, to=TO)
    assert response.status_code == 200, response.text
    ar = ref.activation_rate(seeded.rows, seeded.id, RANGE)
    body = response.json()
    assert (body["users"], body["activated"], body["rate"]) == (ar.users, ar.activated, ar.rate)
    assert body["paths"] == [
        {"path": p.path_key, "users": p.users, "activated": p.activated, "rate": p.rate} for p in ar.paths
    ]
    assert body["weeks"] == [
        {"cohort_week": w.cohort_week, "users": w.users, "activated": w.activated, "rate": w.rate} for w in ar.weeks
    ]
    assert body["weeks"][0]["cohort_week"] == (FROM - timedelta(days=FROM.weekday())).isoformat()
    assert body["weeks"][-1]["cohort_week"] == (TO - timedelta(days=TO.weekday())).isoformat()
    assert sum(w["users"] for w in body["weeks"]) == body["users"]

    # the filters apply to the new fields too: the persona's histogram and weeks are the reference's for it
    persona = Filters(RANGE.start, RANGE.end, path_key=DEV, variant="treatment", persona="developer")
    params = {"from_": FROM, "to": TO, "path": DEV, "variant": "treatment", "persona": "developer"}
    narrow = (await get(client, seeded.tenant, "time-to-activation", **params)).json()
    want = ref.time_to_activation(seeded.rows, seeded.id, persona)
    assert [b["users"] for b in narrow["histogram"]] == [b.users for b in want.histogram]
    assert narrow["activated"] < tta.activated
    narrow = (await get(client, seeded.tenant, "activation-rate", **params)).json()
    want_weeks = ref.activation_rate(seeded.rows, seeded.id, persona).weeks
    assert [(w["users"], w["activated"]) for w in narrow["weeks"]] == [(w.users, w.activated) for w in want_weeks]


@pytest.mark.parametrize(
    "endpoint", ["funnel", "dropoff", "cohorts", "time-to-activation", "step-completion", "activation-rate"]
)
async def test_defaults_give_the_last_30_days(client: Client, seeded: Seeded, endpoint: str) -> None:
    params = {"path": DEV} if endpoint in ("funnel", "dropoff", "step-completion") else {}
    response = await get(client, seeded.tenant, endpoint, **params)
    assert response.status_code == 200, response.text
    filters = response.json()["filters"]
    end = datetime.fromisoformat(filters["to"])
    assert end == datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time(), UTC)
    assert datetime.fromisoformat(filters["from"]) == end - timedelta(days=30)


async def test_another_tenants_events_never_count(client: Client, seeded: Seeded, neighbour: Seeded) -> None:
    mine = (await get(client, seeded.tenant, "activation-rate", from_=FROM, to=TO)).json()
    theirs = (await get(client, neighbour.tenant, "activation-rate", from_=FROM, to=TO)).json()
    assert mine["users"] == ref.activation_rate(seeded.rows, seeded.id, RANGE).users
    assert theirs["users"] == ref.activation_rate(neighbour.rows, neighbour.id, RANGE).users
    assert mine["users"] != theirs["users"]


async def test_a_tenant_without_events_sees_zeros(client: Client, admin_engine: AsyncEngine) -> None:
    empty = await new_tenant(admin_engine, scopes=("analytics:read",))
    body = (await get(client, empty, "funnel", path=DEV)).json()
    assert body["started"] == 0
    assert body["steps"][0] == {
        "step_id": "create-api-key",
        "title": "Create an API key",
        "users": 0,
        "conversion_from_previous": None,
        "conversion_from_start": None,
        "median_seconds_from_previous": None,
    }


@pytest.mark.parametrize(
    ("endpoint", "params", "keys"),
    [
        ("funnel", {}, ["path"]),
        ("funnel", {"path": DEV, "from_": "2025-02-30"}, ["from"]),
        ("funnel", {"path": DEV, "to": "yesterday"}, ["to"]),
        ("funnel", {"path": DEV, "from_": "2025-03-01", "to": "2025-02-01"}, ["from"]),
        ("funnel", {"path": DEV, "from_": "2024-01-01", "to": "2025-06-01"}, ["to"]),
        ("funnel", {"path": DEV, "window": 0}, ["window"]),
        ("funnel", {"path": DEV, "window": 2161}, ["window"]),
        ("dropoff", {"path": DEV, "window": "a week"}, ["window"]),
        ("cohorts", {"weeks": 53}, ["weeks"]),
        ("cohorts", {"weeks": "-1"}, ["weeks"]),
        ("cohorts", {"path_version": 1}, ["path_version"]),
        ("step-completion", {"path": "Not A Slug"}, ["path"]),
        ("time-to-activation", {"path": DEV, "path_version": "v1"}, ["path_version"]),
        ("activation-rate", {"variant": "x" * 129}, ["variant"]),
        ("activation-rate", {"persona": "a\x01b"}, ["persona"]),
        ("funnel", {"window": 0, "from_": "nope"}, ["from", "path", "window"]),  # every problem at once
    ],
)
async def test_bad_input_is_a_400_problem(
    client: Client, seeded: Seeded, endpoint: str, params: dict[str, Any], keys: list[str]
) -> None:
    response = await get(client, seeded.tenant, endpoint, **params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM + "validation-error"
    assert sorted(e["key"] for e in body["errors"]) == keys
    assert all(e["source"] == "query" for e in body["errors"])
    assert f"(at {body['errors'][0]['key']})" in body["detail"]


@pytest.mark.parametrize(
    ("endpoint", "params"),
    [
        ("funnel", {"path": "no-such-path"}),
        ("funnel", {"path": DEV, "path_version": 9}),
        ("cohorts", {"path": "no-such-path"}),
        ("step-completion", {"path": "no-such-path"}),
    ],
)
async def test_unknown_path_is_404(client: Client, seeded: Seeded, endpoint: str, params: dict[str, Any]) -> None:
    response = await get(client, seeded.tenant, endpoint, **params)
    assert response.status_code == 404, response.text
    assert response.json()["type"] == PROBLEM + "path-not-found"


async def test_a_key_without_the_scope_is_403(client: Client, admin_engine: AsyncEngine) -> None:
    writer = await new_tenant(admin_engine, scopes=("onboarding:write",))
    response = await get(client, writer, "funnel", path=DEV)
    assert response.status_code == 403, response.text
    assert response.json()["type"] == PROBLEM + "forbidden"
    assert response.json()["required_scope"] == "analytics:read"
    assert (await client.get("/v1/analytics/cohorts")).status_code == 401


async def test_a_timeout_answers_with_the_cached_result_marked_stale(
    client: Client, seeded: Seeded, flaky: FlakyStore
) -> None:
    first = await get(client, seeded.tenant, "funnel", path=DEV, from_=FROM, to=TO, persona="analyst")
    assert first.status_code == 200, first.text
    flaky.mode = "slow"
    second = await get(client, seeded.tenant, "funnel", path=DEV, from_=FROM, to=TO, persona="analyst")
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["stale"] is True
    assert body["computed_at"] == first.json()["computed_at"]
    assert body["steps"] == first.json()["steps"]


async def test_no_cached_result_and_a_failure_is_503(client: Client, seeded: Seeded, flaky: FlakyStore) -> None:
    for mode, weeks in (("fail", 2), ("slow", 3)):
        flaky.mode = mode
        response = await get(client, seeded.tenant, "cohorts", from_=FROM, to=TO, weeks=weeks)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["type"] == PROBLEM + "analytics-unavailable"


def test_the_controller_is_guarded_by_the_scope() -> None:
    assert [g.__name__ for g in AnalyticsController.guards or []] == ["require_scope_analytics_read"]


def test_query_checks_accept_dates_and_datetimes() -> None:
    now = datetime(2025, 3, 5, 10, 0, tzinfo=UTC)
    checked = check_query(
        from_="2025-03-01T10:00:00+02:00",
        to="2025-03-02 08:00:00 01:00",  # an unencoded '+' arrives as a space
        path=None,
        path_version=None,
        variant="",
        persona=None,
        path_required=False,
        now=now,
    )
    assert checked.filters.start == datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    assert checked.filters.end == datetime(2025, 3, 2, 7, 0, tzinfo=UTC)
    assert checked.filters.variant == ""  # an empty variant selects users without one
    assert checked.window == timedelta(days=7) and checked.weeks == 8
    naive = check_query(
        from_="2025-03-01T00:00",
        to="2025-03-01",
        path=None,
        path_version=None,
        variant=None,
        persona=None,
        path_required=False,
        now=now,
    )
    assert (naive.filters.start, naive.filters.end) == (
        datetime(2025, 3, 1, tzinfo=UTC),
        datetime(2025, 3, 2, tzinfo=UTC),  # a date 'to' is the end of that day
    )
    with pytest.raises(ProblemError):
        check_query(
            from_="2025-03-01",
            to="2025-03-01T00:00:00Z",
            path=None,
            path_version=None,
            variant=None,
            persona=None,
            path_required=False,
        )
    assert queries.monday(now) == date(2025, 3, 3)
