"""The API process's background tasks are supervised: readiness names one that keeps failing."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from tests.conftest import PEPPER, Database, make_settings

UNREACHABLE = "postgresql+asyncpg://nobody@127.0.0.1:9/nothing"  # the discard port: nothing listens


async def test_readiness_names_a_background_task_that_keeps_failing(
    database: Database, analytics_store: ChdbStore
) -> None:
    # embedded mode: the process relays the outbox itself, here from a database it cannot reach
    app = create_app(
        make_settings(), database.app_url, PEPPER, analytics=analytics_store, relay_database_url=UNREACHABLE
    )
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        response = await client.get("/health/ready")
        for _ in range(100):  # the relay retries after 0.1, 0.2, 0.4 s: failing after three
            if response.status_code == 503:
                break
            await asyncio.sleep(0.1)
            response = await client.get("/health/ready")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["type"].endswith("/service-unavailable")
        assert body["detail"] == "background task failing: outbox-relay"
        tasks = body["tasks"]
        assert tasks["outbox-relay"].startswith("failing: ")
        assert "in a row" in tasks["outbox-relay"]
        assert tasks["audit-checkpointer"] == "ok"
        assert body["checks"]["database"] == "ok"
        assert (await client.get("/health/live")).status_code == 200  # alive, just not ready


async def test_a_healthy_process_is_ready_and_lists_its_tasks(database: Database, analytics_store: ChdbStore) -> None:
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/health/ready")
        assert response.status_code == 200, response.text
        assert response.json()["checks"] == {"database": "ok"}
        assert response.json()["tasks"] == {"audit-checkpointer": "ok"}
