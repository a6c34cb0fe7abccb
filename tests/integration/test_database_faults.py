"""Database faults: lost connections are retried (the seed design's 3 retries), outages are 503."""

from __future__ import annotations

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


async def test_lost_connections_are_retried_and_nothing_is_lost(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, database: Database
) -> None:
    for i in range(3):  # fill the app's pool with connections that we then kill
        await client.post("/v1/onboarding/start", json={"user_id": f"warm-{i}"}, headers=tenant.headers)
    assert await _kill_app_backends(admin_engine, database) >= 1
    before = (await client.get("/metrics")).text
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
    after = (await client.get("/metrics")).text

    def retries(metrics: str) -> float:
        line = next((ln for ln in metrics.splitlines() if ln.startswith("firstmile_db_retries_total ")), "x 0")
        return float(line.split()[1])

    assert retries(after) > retries(before)


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
