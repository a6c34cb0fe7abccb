"""The experiment analysis query on the real engine (chdb, and ClickHouse's client over it) against a plain-Python
reference: per variant, the users exposed and what they did after their exposure only."""

from __future__ import annotations

import random
import statistics
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import clickhouse_connect
import pytest

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.analytics.queries import AnalyticsQueries
from firstmile.analytics.rows import (
    ACTIVATED,
    EXPOSED,
    NUDGE_UNSUBSCRIBED,
    STEP_COMPLETED,
    STUCK,
    AnalyticsEvent,
)
from firstmile.analytics.sink import to_analytics
from firstmile.events.envelope import Envelope
from firstmile.kit.scope import OPERATOR_CLI, TenantId

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
EXPERIMENT = "quickstart-vs-tour"


def _row(tenant: uuid.UUID, kind: str, user: str, at: datetime, step: str = "", **fields: str) -> AnalyticsEvent:
    return AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=kind, event_name=fields.pop("name", ""),
                          user_id=user, anonymous_id="", occurred_at=at, received_at=at, step_id=step,
                          variant=fields.pop("variant", ""), path_key=fields.pop("path", "dev"))  # fmt: skip


@dataclass(frozen=True)
class User:
    variant: str
    exposed_at: datetime
    activated_after_s: float | None
    steps_after: int
    invite_done: bool
    stuck: bool
    unsubscribed: bool


@dataclass(frozen=True)
class Seeded:
    tenant: TenantId
    users: dict[str, User]


@pytest.fixture(scope="module")
def seeded(analytics_store: ChdbStore) -> Seeded:
    rng = random.Random(16)
    tenant, other = OPERATOR_CLI.tenant(uuid.uuid4()), OPERATOR_CLI.tenant(uuid.uuid4())
    rows: list[AnalyticsEvent] = []
    users: dict[str, User] = {}
    for i in range(400):
        user_id, variant = f"u-{i}", ("control" if i % 2 else "tour")
        exposed = T0 + timedelta(minutes=rng.randrange(0, 10_000))
        rows.append(_row(tenant, EXPOSED, user_id, exposed, name=EXPERIMENT, variant=variant))
        rows.append(_row(other, EXPOSED, user_id, exposed, name=EXPERIMENT, variant="control"))  # never counted
        # before the exposure: must not count for anything
        rows.append(_row(tenant, STEP_COMPLETED, user_id, exposed - timedelta(hours=1), "key"))
        if i % 9 == 0:
            rows.append(_row(tenant, ACTIVATED, user_id, exposed - timedelta(minutes=5)))
        steps = rng.randrange(0, 5)
        for k in range(steps):
            rows.append(_row(tenant, STEP_COMPLETED, user_id, exposed + timedelta(minutes=10 * (k + 1)), f"s{k}"))
        invite = rng.random() < (0.5 if variant == "tour" else 0.35)
        if invite:
            rows.append(_row(tenant, STEP_COMPLETED, user_id, exposed + timedelta(hours=3), "invite"))
        activated = rng.random() < (0.45 if variant == "tour" else 0.3)
        delay = rng.uniform(60, 86_400) if activated else None
        if delay is not None:
            rows.append(_row(tenant, ACTIVATED, user_id, exposed + timedelta(seconds=round(delay, 3))))
            rows.append(_row(tenant, ACTIVATED, user_id, exposed + timedelta(seconds=round(delay, 3) + 100)))  # a 2nd
        stuck = rng.random() < 0.2
        if stuck:
            rows.append(_row(tenant, STUCK, user_id, exposed + timedelta(days=1)))
        unsubscribed = rng.random() < 0.05
        if unsubscribed:
            rows.append(_row(tenant, NUDGE_UNSUBSCRIBED, user_id, exposed + timedelta(days=2)))
        users[user_id] = User(variant, exposed, None if delay is None else round(delay, 3),
                              steps + int(invite), invite, stuck, unsubscribed)  # fmt: skip
    rows.append(_row(tenant, EXPOSED, "u-other-experiment", T0, name="another", variant="control"))
    assert analytics_store.insert(rows) == len(rows)
    assert analytics_store.insert(rows[::5]) == len(rows[::5])  # redelivered: counted once
    return Seeded(tenant, users)


@pytest.fixture(scope="module")
def clickhouse_over_chdb(analytics_store: ChdbStore) -> Iterator[ClickHouseStore]:
    client = clickhouse_connect.get_client(dsn=f"chdb://{analytics_store.path}")
    store = ClickHouseStore(client, policy_role=None, tenant_setting=False)
    yield store
    store.close()


@pytest.fixture(params=["chdb", "clickhouse-connect"])
def q(request: pytest.FixtureRequest) -> AnalyticsQueries:
    return AnalyticsQueries(request.getfixturevalue("analytics_store" if request.param == "chdb" else
                                                    "clickhouse_over_chdb"))  # fmt: skip


@pytest.mark.parametrize("step", [None, "invite"])
def test_each_variant_counts_what_its_users_did_after_exposure(
    seeded: Seeded, q: AnalyticsQueries, step: str | None
) -> None:
    arms = {a.variant: a for a in q.experiment(seeded.tenant, EXPERIMENT, step, T0 - timedelta(days=1))}
    assert set(arms) == {"control", "tour"}
    for variant, arm in arms.items():
        mine = [u for u in seeded.users.values() if u.variant == variant]
        delays = [u.activated_after_s for u in mine if u.activated_after_s is not None]
        goal = [u for u in mine if (u.activated_after_s is not None if step is None else u.invite_done)]
        assert (arm.users, arm.converted, arm.activated) == (len(mine), len(goal), len(delays))
        assert (arm.stuck, arm.unsubscribed) == (sum(u.stuck for u in mine), sum(u.unsubscribed for u in mine))
        assert arm.seconds_to_activation_mean == pytest.approx(statistics.fmean(delays), abs=1e-3)
        assert arm.seconds_to_activation_variance == pytest.approx(statistics.variance(delays), rel=1e-6)
        steps = [u.steps_after for u in mine]
        assert arm.steps_mean == pytest.approx(statistics.fmean(steps), abs=1e-9)
        assert arm.steps_variance == pytest.approx(statistics.variance(steps), rel=1e-9)


def test_exposures_before_the_window_and_of_other_experiments_are_left_out(seeded: Seeded, q: AnalyticsQueries) -> None:
    later = T0 + timedelta(minutes=5_000)
    arms = q.experiment(seeded.tenant, EXPERIMENT, None, later)
    assert sum(a.users for a in arms) == sum(u.exposed_at >= later for u in seeded.users.values())
    assert q.experiment(seeded.tenant, "no-such-experiment", None, T0) == ()
    [other] = q.experiment(seeded.tenant, "another", None, T0 - timedelta(days=1))
    assert (other.users, other.converted, other.steps_mean, other.steps_variance) == (1, 0, 0.0, None)


def test_the_sink_maps_an_exposure_event() -> None:
    tenant = uuid.uuid4()
    envelope = Envelope(uuid.uuid4(), tenant, EXPOSED, T0, {"user_id": "u-1", "experiment_id": EXPERIMENT,
                        "variant": "tour", "path_id": "product-tour", "inputs": {"hash": "sha256"}})  # fmt: skip
    row = to_analytics(envelope)
    assert (row.event_type, row.event_name, row.variant, row.path_key, row.user_id) == (
        EXPOSED, EXPERIMENT, "tour", "product-tour", "u-1")  # fmt: skip
