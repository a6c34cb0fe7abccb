"""The admin UI with its session store (Redis) down: a 503 problem with Retry-After, not a 500.

Redis here is really down: the URL names a loopback port where nothing listens, so every call is
refused as it would be during a Redis outage. Progress and the onboarding API keep working (their
state is in PostgreSQL); only what needs an admin session waits for Redis.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.service import AdminAuth
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant

Client = AsyncTestClient[Litestar]
BASE = "http://testserver.local"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
async def api(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(
        public_url=BASE, admin_cookie_secure=False, redis_url=f"redis://127.0.0.1:{_closed_port()}/0"
    )
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
async def tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine)


def _assert_unavailable(response: httpx.Response) -> None:
    body = response.json()
    assert response.status_code == 503, body
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    assert body["type"].endswith("/service-unavailable")
    assert "session store (Redis)" in body["detail"]


async def test_a_signed_in_request_answers_503_while_redis_is_down(api: Client) -> None:
    auth: AdminAuth = api.app.state.container.admin_auth
    api.cookies.clear()
    api.cookies.set(auth.policy.cookie, "some-session-id")
    _assert_unavailable(await api.get("/admin/api/me"))


async def test_redeeming_a_login_link_answers_503(api: Client, tenant: TenantFixture) -> None:
    auth: AdminAuth = api.app.state.container.admin_auth
    api.cookies.clear()
    token = auth.bootstrap_token(tenant.slug, "viewer")
    _assert_unavailable(await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False))


async def test_the_onboarding_api_does_not_need_redis(api: Client, tenant: TenantFixture) -> None:
    started = await api.post(
        "/v1/onboarding/start", json={"user_id": "u-redis-down", "traits": {}}, headers=tenant.headers
    )
    assert started.status_code in (200, 201), started.text
