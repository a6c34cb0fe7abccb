"""Concurrent edits of one path are serialised: each makes its own version, none fails.

Two admins renaming the same path at once both computed "latest + 1": the second insert hit the
unique version and answered 500. The edit now locks the path for its transaction, so the second waits
for the first to commit and makes the version after it.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.paths import PathEditor
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from tests.conftest import TenantFixture

EDITOR = OperatorContext("operator:test")
KEY = "developer-quickstart"


async def test_a_second_edit_waits_for_the_first_and_makes_the_next_version(
    app_engine: AsyncEngine, tenant: TenantFixture
) -> None:
    editor = PathEditor()
    scope = EDITOR.tenant(tenant.id)
    async with tenant_transaction(app_engine, scope) as first:
        made = await editor.edit(first, KEY, {"name": "First rename"}, actor="admin:a")
        assert made["version"] == 2

        async def second() -> dict[str, object]:
            async with tenant_transaction(app_engine, scope) as tx:
                return await editor.edit(tx, KEY, {"description": "Second edit"}, actor="admin:b")

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # it waits for the first edit's transaction
    result = await asyncio.wait_for(waiting, 10)
    assert result["version"] == 3
    assert result["name"] == "First rename"  # it edited the version the first one made
    assert result["description"] == "Second edit"
    async with app_engine.connect() as conn, conn.begin():
        await conn.execute(text("SELECT set_config('firstmile.tenant_id', :t, true)"), {"t": str(tenant.id)})
        rows = (
            await conn.execute(
                text(
                    "SELECT version, is_current FROM onboarding_paths WHERE tenant_id = :t AND path_key = :k"
                    " ORDER BY version"
                ),
                {"t": tenant.id, "k": KEY},
            )
        ).all()
    assert [tuple(r) for r in rows] == [(1, False), (2, False), (3, True)]


async def test_edits_at_once_all_land(app_engine: AsyncEngine, tenant: TenantFixture) -> None:
    editor = PathEditor()
    scope = EDITOR.tenant(tenant.id)

    async def edit(n: int) -> int:
        async with tenant_transaction(app_engine, scope) as tx:
            result = await editor.edit(tx, KEY, {"priority": n}, actor=f"admin:{n}")
            return int(str(result["version"]))

    versions = await asyncio.gather(*(edit(n) for n in range(1, 5)))
    assert sorted(versions) == [2, 3, 4, 5]
