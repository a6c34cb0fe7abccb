"""Rate limits and the abuse detector through the HTTP API, on the real PostgreSQL and Redis.

A tenant's manifest sets small limits (3 a key, 5 the tenant, per hour), so the tests reach them in a few
requests and nothing refills while they run. Each limit test runs twice: on the embedded in-process
limiter and on Redis (the production shape). Redis down is a loopback port where nothing listens.
"""

from __future__ import annotations

import logging
import secrets
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.settings import Settings
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION, Database, make_settings, sequenced
from tests.factories import ROOT, db_snapshot, demo_document, manifest_for
from tests.integration.test_audit_doc import documented_rows, undocumented

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
HOUR_LIMITS = {
    "per_key": {"requests": 3, "window_seconds": 3600},
    "per_tenant": {"requests": 5, "window_seconds": 3600},
}
HOUR_POLICY = '"key";q=3;w=3600, "tenant";q=5;w=3600'
# the abuse detector made eager: no warm-up, flag at 5 requests a minute over twice the baseline
EAGER_DETECTOR: dict[str, Any] = {
    "abuse_warmup_minutes": 0,
    "abuse_min_requests_per_minute": 5,
    "abuse_factor": 2,
}


@dataclass(frozen=True)
class LimitedTenant:
    id: uuid.UUID
    slug: str
    keys: tuple[tuple[uuid.UUID, str], ...]

    def headers(self, key: int = 0) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key][1]}"}


_made: list[uuid.UUID] = []


async def limited_tenant(
    admin_engine: AsyncEngine, limits: dict[str, Any] | None = HOUR_LIMITS, *, keys: int = 2
) -> LimitedTenant:
    slug = f"t-{secrets.token_hex(5)}"
    document = demo_document()
    if limits is not None:
        document["limits"] = limits
    result = await apply_manifest(admin_engine, manifest_for(slug, REGION, document))
    made = []
    for i in range(keys):
        created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write", "audit:read"], f"key-{i}")
        made.append((created.key_id, created.key))
    _made.append(result.tenant_id)
    return LimitedTenant(result.tenant_id, slug, tuple(made))


@pytest.fixture(scope="module", autouse=True)
async def _forget_limits(redis_url: str) -> AsyncIterator[None]:
    """The tenants' limiter keys go with the module (baselines would stay a week)."""
    yield
    client = Redis.from_url(redis_url)
    try:
        for tenant in _made:
            keys = [k async for k in client.scan_iter(match=f"fm:{REGION}:rl:{{{tenant}}}:*", count=1000)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _client(database: Database, analytics_store: ChdbStore, settings: Settings) -> AsyncIterator[Client]:
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module", params=["in-process", "redis"])
async def api(
    request: pytest.FixtureRequest, database: Database, analytics_store: ChdbStore, redis_url: str
) -> AsyncIterator[Client]:
    settings = make_settings(redis_url=redis_url) if request.param == "redis" else make_settings()
    async for client in _client(database, analytics_store, settings):
        yield client


def start(user: str) -> dict[str, Any]:
    return {"user_id": user, "traits": {"persona": "developer"}}


class _Remaining(str):
    """A ``RateLimit`` field list that equals the expected one when every item's name and ``r`` match and its
    ``t`` is the expected one or up to 2 s less: the seconds the test itself took (a busy machine)."""

    __hash__ = str.__hash__

    @staticmethod
    def _items(text: str) -> list[tuple[str, int, int]]:
        items = []
        for item in text.split(", "):
            name, *params = item.split(";")
            values = dict(p.split("=", 1) for p in params)
            items.append((name, int(values["r"]), int(values["t"])))
        return items

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        try:
            mine, theirs = self._items(self), self._items(other)
        except (KeyError, ValueError):
            return str.__eq__(self, other)
        return len(mine) == len(theirs) and all(
            a[:2] == b[:2] and b[2] - 2 <= a[2] <= b[2] for a, b in zip(mine, theirs, strict=True)
        )


def limited(response: httpx.Response) -> tuple[str, str] | None:
    policy, remaining = response.headers.get("ratelimit-policy"), response.headers.get("ratelimit")
    return None if policy is None or remaining is None else (policy, _Remaining(remaining))


def counted(limit: str) -> float:
    return REGISTRY.get_sample_value("firstmile_rate_limited_total", {"limit": limit}) or 0.0


async def test_a_key_past_its_limit_gets_429_with_the_fields_and_its_start_writes_nothing(
    api: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await limited_tenant(admin_engine)
    remaining = []
    for i in range(3):
        response = await api.post("/v1/onboarding/start", json=start(f"u-{i}"), headers=tenant.headers())
        assert response.status_code == 201, response.text
        fields = limited(response)
        assert fields is not None and fields[0] == HOUR_POLICY
        remaining.append(fields[1])
    # each answer says what is left of both policies and when one more request comes (3600/3 and 3600/5 s)
    assert remaining == [
        '"key";r=2;t=1200, "tenant";r=4;t=720',
        '"key";r=1;t=1200, "tenant";r=3;t=720',
        '"key";r=0;t=1200, "tenant";r=2;t=720',
    ]
    before = await db_snapshot(admin_engine, tenant.id)
    refusals = counted("key")
    for _ in range(3):
        refused = await api.post("/v1/onboarding/start", json=start("u-refused"), headers=tenant.headers())
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == PROBLEM
        problem = refused.json()
        assert problem["type"] == "https://firstmile.dev/problems/rate-limited"
        assert problem["title"] == "Too many requests for this credential or tenant"
        assert problem["violated_policies"] == ["key"]
        assert problem["instance"] == "/v1/onboarding/start" and problem["request_id"]
        assert 1190 <= int(refused.headers["retry-after"]) <= 1200
        assert limited(refused) == (HOUR_POLICY, f'"key";r=0;t={refused.headers["retry-after"]}, "tenant";r=2;t=720')
    assert await db_snapshot(admin_engine, tenant.id) == before  # no user, no progress, no event, no audit entry
    assert counted("key") == refusals + 3


async def test_the_tenant_limit_spans_its_keys_and_other_tenants_are_unaffected(
    api: Client, admin_engine: AsyncEngine
) -> None:
    tenant, other = await limited_tenant(admin_engine), await limited_tenant(admin_engine, None)
    for i in range(3):
        assert (
            await api.post("/v1/onboarding/start", json=start(f"a-{i}"), headers=tenant.headers(0))
        ).status_code == 201
    for i in range(2):  # the second key has its own three, but the tenant only two more
        response = await api.post("/v1/onboarding/start", json=start(f"b-{i}"), headers=tenant.headers(1))
        assert response.status_code == 201, response.text
    refusals = counted("tenant")
    refused = await api.post("/v1/onboarding/start", json=start("b-2"), headers=tenant.headers(1))
    assert refused.status_code == 429 and refused.json()["violated_policies"] == ["tenant"]
    assert limited(refused) == (HOUR_POLICY, '"key";r=1;t=1200, "tenant";r=0;t=720')
    assert counted("tenant") == refusals + 1
    # another tenant, on the platform's defaults, and its first key: untouched
    fine = await api.post("/v1/onboarding/start", json=start("a-0"), headers=other.headers())
    assert fine.status_code == 201, fine.text
    assert limited(fine) == ('"key";q=1000;w=1, "tenant";q=5000;w=1', '"key";r=999;t=1, "tenant";r=4999;t=1')


async def test_every_answer_to_a_credential_is_counted_and_carries_the_fields(
    api: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await limited_tenant(admin_engine)
    missing = await api.get("/v1/onboarding/nobody", headers=tenant.headers())
    assert missing.status_code == 404 and limited(missing) == (HOUR_POLICY, '"key";r=2;t=1200, "tenant";r=4;t=720')
    invalid = await api.post("/v1/onboarding/start", json={"user_id": ""}, headers=tenant.headers())
    assert invalid.status_code == 400 and limited(invalid) is not None
    # what is not a tenant app's request is neither limited nor counted
    for response in (
        await api.get("/health/live"),
        await api.get("/metrics"),
        await api.get("/schema/openapi.json"),
        await api.post("/v1/onboarding/start", json=start("x"), headers={"Authorization": "Bearer fm_" + "x" * 43}),
        await api.options("/v1/onboarding/start"),
    ):
        assert limited(response) is None, response.request.url
    third = await api.get("/v1/onboarding/nobody", headers=tenant.headers())
    assert limited(third) == (HOUR_POLICY, '"key";r=0;t=1200, "tenant";r=2;t=720')


async def test_a_manifest_change_of_the_limits_applies_at_the_next_request(
    api: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await limited_tenant(admin_engine, {"per_key": {"requests": 1, "window_seconds": 3600}})
    assert (await api.get("/v1/onboarding/nobody", headers=tenant.headers())).status_code == 404
    assert (await api.get("/v1/onboarding/nobody", headers=tenant.headers())).status_code == 429
    document = demo_document()
    document["limits"] = {"per_key": {"requests": 2, "window_seconds": 3600}}
    await apply_manifest(admin_engine, manifest_for(tenant.slug, REGION, document))  # a new revision
    raised = await api.get("/v1/onboarding/nobody", headers=tenant.headers())
    assert raised.status_code == 404, raised.text  # a new limit starts with its whole quota
    assert raised.headers["ratelimit-policy"].startswith('"key";q=2;w=3600, ')
    assert raised.headers["ratelimit"].startswith('"key";r=1;t=1800, ')


# ---------------------------------------------------------------- the abuse detector


@pytest.fixture(scope="module")
async def eager(database: Database, analytics_store: ChdbStore, redis_url: str) -> AsyncIterator[Client]:
    async for client in _client(database, analytics_store, make_settings(redis_url=redis_url, **EAGER_DETECTOR)):
        yield client


async def flags(admin_engine: AsyncEngine, tenant: uuid.UUID) -> list[tuple[str, str, str, Any]]:
    await sequenced(admin_engine, tenant)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT kind, actor, subject, payload FROM audit_entries "
                "WHERE tenant_id = :t AND kind = 'guardrail.abuse_flagged' ORDER BY seq"
            ),
            {"t": tenant},
        )
        return [(r.kind, r.actor, r.subject, r.payload) for r in rows]


async def test_a_burst_from_one_key_is_flagged_into_the_audit_log_once(
    eager: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await limited_tenant(admin_engine, None)
    before = REGISTRY.get_sample_value("firstmile_abuse_flags_total") or 0.0
    for i in range(4):  # under the minimum of 5 a minute: nothing
        assert (
            await eager.post("/v1/onboarding/start", json=start(f"s-{i}"), headers=tenant.headers())
        ).status_code == 201
    assert await flags(admin_engine, tenant.id) == []
    for i in range(4, 12):  # the fifth is flagged; the burst goes on, and is not flagged again
        response = await eager.post("/v1/onboarding/start", json=start(f"s-{i}"), headers=tenant.headers())
        assert response.status_code == 201, response.text  # a flag refuses nothing
    found = await flags(admin_engine, tenant.id)
    key_id = tenant.keys[0][0]
    assert found == [
        (
            "guardrail.abuse_flagged",
            "guardrail",
            f"api_key:{key_id}",
            {
                "activity": "POST /v1/onboarding/start",
                "requests_this_minute": 5,
                "baseline_per_minute": 0.0,
                "factor": 2.0,
                "min_requests_per_minute": 5,
            },
        )
    ]
    assert REGISTRY.get_sample_value("firstmile_abuse_flags_total") == before + 1
    # the entry is one docs/audit.md describes, and names no end user
    assert undocumented(documented_rows((ROOT / "docs" / "audit.md").read_text("utf-8")), found) == []
    assert "s-4" not in str(found)
    # the other key of the tenant is judged on its own
    for i in range(4):
        await eager.get(f"/v1/onboarding/s-{i}", headers=tenant.headers(1))
    assert len(await flags(admin_engine, tenant.id)) == 1


# ---------------------------------------------------------------- Redis down


@pytest.fixture(scope="module")
async def redis_down(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", **EAGER_DETECTOR)
    async for client in _client(database, analytics_store, settings):
        yield client


@pytest.fixture
def guardrail_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="firstmile.guardrail")
    return caplog


async def test_with_redis_down_each_process_limits_alone_and_unchecked_requests_are_logged_and_allowed(
    redis_down: Client, admin_engine: AsyncEngine, guardrail_log: pytest.LogCaptureFixture
) -> None:
    tenant = await limited_tenant(admin_engine, {"per_key": {"requests": 8, "window_seconds": 3600}})
    fallbacks = REGISTRY.get_sample_value("firstmile_rate_limit_fallbacks_total") or 0.0
    answers = [
        await redis_down.post("/v1/onboarding/start", json=start(f"d-{i}"), headers=tenant.headers()) for i in range(9)
    ]
    # the limits still hold, from this process's own limiter, with the same fields
    assert [r.status_code for r in answers] == [201] * 8 + [429]
    assert limited(answers[0]) == ('"key";q=8;w=3600, "tenant";q=5000;w=1', '"key";r=7;t=450, "tenant";r=4999;t=1')
    assert answers[8].headers["content-type"] == PROBLEM and answers[8].headers["retry-after"]
    # the detector is unavailable: eight requests over its eager threshold, no flag; each one logged and allowed
    assert await flags(admin_engine, tenant.id) == []
    skipped = [r for r in guardrail_log.records if r.getMessage().startswith("abuse check skipped")]
    assert len(skipped) == 8
    assert all(r.__dict__["fields"]["activity"] == "POST /v1/onboarding/start" for r in skipped)
    assert all(r.__dict__["fields"]["credential"] == f"api_key:{tenant.keys[0][0]}" for r in skipped)
    assert REGISTRY.get_sample_value("firstmile_rate_limit_fallbacks_total") == fallbacks + 9
