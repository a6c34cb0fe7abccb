"""The API process's background tasks are supervised: readiness names one that keeps failing."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from tests.conftest import PEPPER, Database, make_settings, new_tenant

UNREACHABLE = "postgresql+asyncpg://nobody@127.0.0.1:9/nothing"  # the discard port: nothing listens


async def test_readiness_names_a_background_task_that_keeps_failing(
    database: Database, analytics_store: ChdbStore
) -> None:
    # embedded mode: the process relays the outbox itself, here from a database it cannot reach
    app = create_app(
        make_settings(in_process_sequencer=True),
        database.app_url,
        PEPPER,
        analytics=analytics_store,
        relay_database_url=UNREACHABLE,
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
        assert tasks["audit-checkpointer"] == tasks["audit-sequencer"] == "ok"
        assert body["checks"]["database"] == "ok"
        assert (await client.get("/health/live")).status_code == 200  # alive, just not ready


async def test_a_healthy_process_is_ready_and_lists_its_tasks(database: Database, analytics_store: ChdbStore) -> None:
    app = create_app(make_settings(in_process_sequencer=True), database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/health/ready")
        assert response.status_code == 200, response.text
        assert response.json()["checks"] == {"database": "ok"}
        # the live streams' LISTEN connection (in-app messages, the embed checklist) is always supervised
        assert response.json()["tasks"] == {"audit-checkpointer": "ok", "audit-sequencer": "ok", "live-listener": "ok"}


async def test_embedded_mode_sequences_a_decision_without_help(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine
) -> None:
    """The API process's own sequencer (embedded mode) places a start's decision in the log, and
    records when: nothing but the process's poll loop runs here."""
    tenant = await new_tenant(admin_engine, scopes=("onboarding:write", "audit:read"))
    app = create_app(make_settings(in_process_sequencer=True), database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app) as client:
        started = await client.post(
            "/v1/onboarding/start",
            json={"user_id": "seq-1", "traits": {"persona": "developer"}},
            headers=tenant.headers,
        )
        assert started.status_code == 201, started.text
        entries: list[dict[str, object]] = []
        for _ in range(300):  # bounded: 30 s
            body = (await client.get("/v1/audit/entries", params={"subject": "seq-1"}, headers=tenant.headers)).json()
            entries = body["entries"]
            if entries:
                break
            await asyncio.sleep(0.1)
        assert [e["kind"] for e in entries] == ["decision"]
        assert str(entries[0]["sequenced_at"]) >= str(entries[0]["created_at"])
        metrics = (await client.get("/metrics")).text
        assert "firstmile_audit_merge_delay_seconds_count" in metrics
