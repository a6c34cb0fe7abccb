"""The stuck scan against the real PostgreSQL: the time-based rule when no detector answers.

(The stuck detector itself answering through Ray Serve and in-process is covered in
tests/integration/test_ml_serving.py.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.stuck import StuckScanner
from tests.conftest import TenantFixture, sequenced

Client = AsyncTestClient[Litestar]


async def _start(client: Client, tenant: TenantFixture, user_id: str) -> None:
    r = await client.post(
        "/v1/onboarding/start", json={"user_id": user_id, "traits": {"persona": "analyst"}}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text


async def _idle(admin_engine: AsyncEngine, tenant: TenantFixture, user_id: str, hours: float) -> None:
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET updated_at = now() - make_interval(secs => :s)"
                " WHERE tenant_id = :t AND user_id = :u"
            ),
            {"s": hours * 3600, "t": tenant.id, "u": user_id},
        )


async def _stuck_events(admin_engine: AsyncEngine, tenant: TenantFixture) -> list[dict[str, Any]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT payload, partition_key FROM outbox"
                " WHERE tenant_id = :t AND event_type = 'onboarding.stuck' ORDER BY id"
            ),
            {"t": tenant.id},
        )
        out = []
        for payload, key in rows:
            assert key == f"{tenant.id}:{payload['user_id']}"
            out.append(payload)
        return out


def _scanner(app_engine: AsyncEngine) -> StuckScanner:
    return StuckScanner(app_engine, CatalogCache(), None, None, after=timedelta(hours=24), min_idle=timedelta(hours=1))


async def test_time_rule_flags_users_idle_past_the_limit_once_per_step(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    await _start(client, tenant, "idle-long")
    await _start(client, tenant, "idle-short")
    await _start(client, tenant, "active")
    await _idle(admin_engine, tenant, "idle-long", 30)
    await _idle(admin_engine, tenant, "idle-short", 2)

    scanner = _scanner(app_engine)
    flags = [f for f in await scanner.run_once() if f.tenant_id == str(tenant.id)]
    assert [(f.user_id, f.step_id, f.detected_by, f.fallback_reason) for f in flags] == [
        ("idle-long", "connect-data-source", "time_rule", "not_deployed")
    ]
    events = await _stuck_events(admin_engine, tenant)
    assert len(events) == 1
    assert events[0]["user_id"] == "idle-long"
    assert events[0]["detected_by"] == "time_rule"
    assert events[0]["hours_since_last_activity"] >= 30

    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT stuck_step, stuck_at FROM user_progress WHERE tenant_id = :t AND user_id = 'idle-long'"),
                {"t": tenant.id},
            )
        ).one()
        assert row[0] == "connect-data-source"
        assert row[1] is not None
        audit = (
            await conn.execute(
                text(
                    "SELECT actor, payload FROM audit_entries WHERE tenant_id = :t AND subject = 'idle-long'"
                    " AND payload ->> 'decision' = 'stuck_detection'"
                ),
                {"t": tenant.id},
            )
        ).all()
    assert len(audit) == 1
    assert audit[0][0] == "progress_evaluator"
    assert audit[0][1]["fallback"] == "time_rule"
    assert audit[0][1]["event_id"]

    # the same step is not flagged twice
    again = [f for f in await scanner.run_once() if f.tenant_id == str(tenant.id)]
    assert again == []
    assert len(await _stuck_events(admin_engine, tenant)) == 1

    # the next step can be: complete the current one, go idle again
    r = await client.post("/v1/onboarding/idle-long/steps/connect-data-source/complete", headers=tenant.headers)
    assert r.status_code == 200, r.text
    await _idle(admin_engine, tenant, "idle-long", 48)
    later = [f for f in await scanner.run_once() if f.tenant_id == str(tenant.id)]
    assert [(f.step_id, f.detected_by) for f in later] == [("build-first-report", "time_rule")]


async def test_finished_users_are_never_stuck(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    await _start(client, tenant, "done")
    for step in ("connect-data-source", "build-first-report", "create-dashboard", "share-dashboard"):
        r = await client.post(f"/v1/onboarding/done/steps/{step}/complete", headers=tenant.headers)
        assert r.status_code == 200, r.text
    await _idle(admin_engine, tenant, "done", 100)
    flags = await _scanner(app_engine).run_once(datetime.now(UTC))
    assert [f for f in flags if f.tenant_id == str(tenant.id)] == []
    assert await _stuck_events(admin_engine, tenant) == []
