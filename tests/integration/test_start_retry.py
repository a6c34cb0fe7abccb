"""A start's network calls happen before its transaction, so a retried transaction repeats none of them.

The planner (online features, the model) and the key provider used to run inside the start's
transaction: a transient database failure retried them along with the writes, and the transaction held
its locks while the network was slow. Here PostgreSQL refuses the first write of a user with a
serialisation failure (40001, as under contention); the unit of work retries the transaction and the
start succeeds, having asked the planner once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.onboarding.catalog import PathCatalog
from firstmile.onboarding.planner import Decision, PathPlanner
from tests.conftest import TenantFixture, sequenced

Client = AsyncTestClient[Litestar]

_FLAKY = [
    "CREATE SEQUENCE IF NOT EXISTS test_flaky_seq",
    "GRANT USAGE ON SEQUENCE test_flaky_seq TO firstmile_app",
    """
    CREATE OR REPLACE FUNCTION test_flaky_progress() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.user_id LIKE 'flaky-%' AND nextval('test_flaky_seq') % 2 = 1 THEN
        RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001';
      END IF;
      RETURN NEW;
    END $$
    """,
    "DROP TRIGGER IF EXISTS test_flaky ON user_progress",
    "CREATE TRIGGER test_flaky BEFORE INSERT ON user_progress FOR EACH ROW EXECUTE FUNCTION test_flaky_progress()",
]


@pytest.fixture
async def flaky_first_write(admin_engine: AsyncEngine) -> AsyncIterator[None]:
    """The first insert of a ``flaky-…`` user's progress fails with 40001; the next one passes."""
    async with admin_engine.begin() as conn:
        for statement in _FLAKY:
            await conn.execute(text(statement))
        await conn.execute(text("SELECT setval('test_flaky_seq', 2)"))  # the next value is odd: a failure
    yield
    async with admin_engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER IF EXISTS test_flaky ON user_progress"))


class CountingPlanner:
    """The app's planner, counting how often a start asks it."""

    def __init__(self, inner: PathPlanner) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> Decision:
        self.calls.append(user_id)
        return await self.inner.plan(tenant_id, user_id, catalog, traits, now)


async def test_a_retried_start_asks_the_planner_once(
    client: Client, app: Litestar, tenant: TenantFixture, admin_engine: AsyncEngine, flaky_first_write: None
) -> None:
    onboarding = app.state.container.onboarding
    counting = CountingPlanner(onboarding.planner)
    onboarding.planner = counting
    try:
        response = await client.post(
            "/v1/onboarding/start",
            json={"user_id": "flaky-1", "traits": {"persona": "developer", "email": "flaky@example.com"}},
            headers=tenant.headers,
        )
    finally:
        onboarding.planner = counting.inner
    assert response.status_code == 201, response.text
    assert counting.calls == ["flaky-1"]  # the transaction ran twice, the planner once
    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        attempts = (await conn.execute(text("SELECT last_value FROM test_flaky_seq"))).scalar_one()
        assert attempts == 4  # two inserts reached the trigger: the refused one and the retried one
        decisions = (
            await conn.execute(
                text("SELECT count(*) FROM audit_entries WHERE tenant_id = :t AND subject = 'flaky-1'"),
                {"t": tenant.id},
            )
        ).scalar_one()
        assert decisions == 1
