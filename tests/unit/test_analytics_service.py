"""The analytics service's recovery rule: timeout or failure → last good result, marked stale; none → 503."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import Filters
from firstmile.analytics.service import AnalyticsService
from firstmile.analytics.synthetic import SyntheticPath, generate
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.unit.analytics_support import FlakyStore

END = datetime(2025, 3, 5, tzinfo=UTC)
PATH = SyntheticPath("dev", 1, ("a", "b", "c", "d"), "b")
F = Filters(END - timedelta(weeks=4), END, path_key="dev")


@pytest.fixture
def flaky(analytics_store: ChdbStore) -> FlakyStore:
    return FlakyStore(analytics_store, delay=0.6)


@pytest.fixture
def service(flaky: FlakyStore) -> Iterator[AnalyticsService]:
    svc = AnalyticsService(flaky, timeout_seconds=0.2, retry_after_seconds=7)
    yield svc
    svc.close()


@pytest.fixture
def tenant(analytics_store: ChdbStore) -> TenantId:
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    analytics_store.insert(list(generate(tenant, [PATH], users=200, weeks=4, end=END, seed=3)))
    return tenant


async def test_a_fresh_result_is_not_stale(service: AnalyticsService, tenant: TenantId) -> None:
    before = datetime.now(UTC)
    result = await service.run(tenant, "time-to-activation", F, lambda: service.queries.time_to_activation(tenant, F))
    assert result.stale is False
    assert before <= result.computed_at <= datetime.now(UTC)
    assert result.value.users > 0


@pytest.mark.parametrize("fault", ["slow", "fail"])
async def test_a_timeout_or_failure_answers_with_the_last_good_result(
    service: AnalyticsService, flaky: FlakyStore, tenant: TenantId, fault: str
) -> None:
    good = await service.run(tenant, "funnel", F, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))
    flaky.mode = fault
    again = await service.run(tenant, "funnel", F, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))
    assert again.stale is True
    assert again.value == good.value
    assert again.computed_at == good.computed_at
    flaky.mode = "ok"
    fresh = await service.run(tenant, "funnel", F, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))
    assert fresh.stale is False and fresh.computed_at > good.computed_at


@pytest.mark.parametrize("fault", ["slow", "fail"])
async def test_without_a_cached_result_it_is_503_with_retry_after(
    service: AnalyticsService, flaky: FlakyStore, tenant: TenantId, fault: str
) -> None:
    flaky.mode = fault
    with pytest.raises(ProblemError) as caught:
        await service.run(tenant, "funnel", F, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))
    assert caught.value.status == 503
    assert caught.value.slug == "analytics-unavailable"
    assert caught.value.headers == {"Retry-After": "7"}
    assert ("timed out" if fault == "slow" else "failed") in caught.value.detail


async def test_the_cache_is_per_tenant_query_and_parameters(
    service: AnalyticsService, flaky: FlakyStore, tenant: TenantId
) -> None:
    other = OPERATOR_CLI.tenant(uuid.uuid4())
    narrow = Filters(END - timedelta(weeks=1), END, path_key="dev")
    await service.run(tenant, "funnel", F, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))
    flaky.mode = "fail"
    for who, name, key in ((other, "funnel", F), (tenant, "dropoff", F), (tenant, "funnel", narrow)):
        with pytest.raises(ProblemError):
            await service.run(who, name, key, lambda: service.queries.funnel(tenant, F, ("a",), timedelta(days=7)))


async def test_the_cache_is_bounded(flaky: FlakyStore, tenant: TenantId) -> None:
    svc = AnalyticsService(flaky, timeout_seconds=5, cache_entries=2)
    try:
        for days in (1, 2, 3):
            await svc.run(tenant, "q", days, partial(int, days))

        def boom() -> int:
            raise RuntimeError("down")

        assert (await svc.run(tenant, "q", 3, boom)).stale
        with pytest.raises(ProblemError):
            await svc.run(tenant, "q", 1, boom)  # evicted, least recently used
    finally:
        svc.close()


async def test_the_service_inserts_off_the_event_loop(service: AnalyticsService, analytics_store: ChdbStore) -> None:
    tenant = OPERATOR_CLI.tenant(uuid.uuid4())
    rows = list(generate(tenant, [PATH], users=5, weeks=1, end=END, seed=1))
    assert await service.insert(rows) == len(rows)
    assert await service.insert(rows + rows) == len(rows)  # repeats within a batch are written once


def test_the_timeout_must_be_positive(flaky: FlakyStore) -> None:
    with pytest.raises(ValueError, match="positive"):
        AnalyticsService(flaky, timeout_seconds=0)
