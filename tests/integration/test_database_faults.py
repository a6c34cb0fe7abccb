"""Database faults: lost connections are replaced before use or retried (the seed design's 3 retries), outages
and a database still starting up are 503."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.app import create_app
from tests.conftest import PEPPER, Database, TenantFixture, make_settings
from tests.support.chaos import PostgresCluster, free_ports

Client = AsyncTestClient[Litestar]


async def _kill_app_backends(admin_engine: AsyncEngine, database: Database) -> int:
    async with admin_engine.connect() as conn:
        killed = (
            await conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE usename = 'firstmile_app' AND datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database.name},
            )
        ).scalar_one()
        return int(killed)


async def test_lost_connections_are_replaced_and_nothing_is_lost(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, database: Database
) -> None:
    """A connection found closed at checkout is replaced (with every older one); one lost under a statement is
    retried (tests/integration/test_start_retry.py has the retry on its own). Either way: one start, one event."""
    for i in range(3):  # fill the app's pool with connections that we then kill
        await client.post("/v1/onboarding/start", json={"user_id": f"warm-{i}"}, headers=tenant.headers)
    assert await _kill_app_backends(admin_engine, database) >= 1
    response = await client.post("/v1/onboarding/start", json={"user_id": "after-kill"}, headers=tenant.headers)
    assert response.status_code == 201, response.text
    async with admin_engine.connect() as conn:
        events = (
            await conn.execute(
                text("SELECT count(*) FROM outbox WHERE tenant_id = :t AND payload->>'user_id' = 'after-kill'"),
                {"t": tenant.id},
            )
        ).scalar_one()
    assert events == 1


async def test_connections_the_database_closed_are_not_used_when_the_key_is_cached(
    tenant: TenantFixture, admin_engine: AsyncEngine, database: Database
) -> None:
    """After the server closed the pool's connections (a restart, a failover), a request whose key is cached
    reaches the database first through the unit of work's BEGIN, sent on the driver connection: it must get a
    live connection (500 'connection is closed' before; the chaos test found it after a killed PostgreSQL)."""
    app = create_app(make_settings(api_key_cache_ttl_seconds=60), database.app_url, PEPPER)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        for i in range(3):  # the key is cached and the pool holds connections
            started = await client.post("/v1/onboarding/start", json={"user_id": f"c-{i}"}, headers=tenant.headers)
            assert started.status_code == 201, started.text
        assert await _kill_app_backends(admin_engine, database) >= 1
        await asyncio.sleep(0.5)  # asyncpg has read the end of every pooled connection
        response = await client.post("/v1/onboarding/start", json={"user_id": "c-after"}, headers=tenant.headers)
        assert response.status_code == 201, response.text
    async with admin_engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT count(*) FROM user_progress WHERE tenant_id = :t AND user_id = 'c-after'"),
                {"t": tenant.id},
            )
        ).scalar_one()
    assert rows == 1


async def test_database_outage_is_a_503_problem() -> None:
    app = create_app(make_settings(), "postgresql+asyncpg://firstmile_app@127.0.0.1:1/none", PEPPER)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as down:
        response = await down.post(
            "/v1/onboarding/start", json={"user_id": "x"}, headers={"Authorization": "Bearer fm_" + "B" * 43}
        )
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"].endswith("/service-unavailable")


@pytest.fixture
def starting_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of its own that stays in recovery: it refuses every connection with 57P03,
    as a cluster does while it replays its WAL after a crash (the chaos test's restart of a killed one)."""
    folder = Path(tempfile.mkdtemp(prefix="fm-recovering-"))  # short: the cluster's socket lives here
    os.chmod(folder, 0o755)  # the postgres user runs the cluster below it
    cluster = PostgresCluster(folder / "pg", free_ports(1)[0])
    try:
        cluster.hold_in_recovery()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_database_still_starting_up_is_a_503_problem(starting_up: PostgresCluster) -> None:
    """'the database system is starting up' (57P03 cannot_connect_now) is transient: retried, then 503, not 500."""
    app = create_app(make_settings(), starting_up.url("firstmile_app", "postgres"), PEPPER)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as down:
        response = await down.post(
            "/v1/onboarding/start", json={"user_id": "x"}, headers={"Authorization": "Bearer fm_" + "B" * 43}
        )
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"].endswith("/service-unavailable")
