"""Adversarial tenant isolation: raw SQL as the application role, pooled connections, missing context."""

from __future__ import annotations

import uuid

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.kit.db import TenantTx, bind_tenant, tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.wiring.schema import TENANT_OWNED_TABLES
from tests.conftest import Database, TenantFixture
from tests.factories import db_snapshot

Client = AsyncTestClient[Litestar]


async def _seed(client: Client, tenant: TenantFixture, user: str) -> None:
    response = await client.post(
        "/v1/onboarding/start", json={"user_id": user, "traits": {"persona": "developer"}}, headers=tenant.headers
    )
    assert response.status_code == 201
    assert (
        await client.post(f"/v1/onboarding/{user}/steps/create-api-key/complete", headers=tenant.headers)
    ).status_code == 200


async def _visible(tx: TenantTx, table: str) -> set[uuid.UUID]:
    column = "id" if table == "tenants" else "tenant_id"
    return {r[0] for r in await tx.execute(text(f"SELECT DISTINCT {column} FROM {table}"))}


async def test_app_role_sees_only_its_tenant_in_every_table(
    client: Client, tenant: TenantFixture, other_tenant: TenantFixture, app_engine: AsyncEngine
) -> None:
    await _seed(client, tenant, "mine")
    await _seed(client, other_tenant, "theirs")
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        for table in (*TENANT_OWNED_TABLES, "tenants"):
            assert await _visible(tx, table) <= {tenant.id}, table
        users = {r[0] for r in await tx.execute(text("SELECT user_id FROM end_users"))}
    assert users == {"mine"}


async def test_no_tenant_context_sees_nothing(client: Client, tenant: TenantFixture, app_engine: AsyncEngine) -> None:
    await _seed(client, tenant, "ctx")
    async with app_engine.connect() as conn:
        for table in (*TENANT_OWNED_TABLES, "tenants"):
            count = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            assert count == 0, table
        # an empty setting (what a connection holds after a SET LOCAL ended) is no tenant either
        await conn.execute(text("SELECT set_config('firstmile.tenant_id', '', false)"))
        assert (await conn.execute(text("SELECT count(*) FROM end_users"))).scalar_one() == 0


async def test_pooled_connection_does_not_carry_context(
    client: Client, tenant: TenantFixture, database: Database
) -> None:
    await _seed(client, tenant, "pooled")
    engine = create_async_engine(database.app_url, pool_size=1, max_overflow=0)
    try:
        async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
            assert (await tx.execute(text("SELECT count(*) FROM end_users"))).scalar_one() == 1
            pid = (await tx.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as conn:  # same physical connection, next checkout
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() == pid
            assert (await conn.execute(text("SELECT current_setting('firstmile.tenant_id', true)"))).scalar_one() in (
                None,
                "",
            )
            assert (await conn.execute(text("SELECT count(*) FROM end_users"))).scalar_one() == 0
        # a transaction that fails does not leak its context either
        with pytest.raises(RuntimeError):
            async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)):
                raise RuntimeError("boom")
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM user_progress"))).scalar_one() == 0
    finally:
        await engine.dispose()


async def test_cannot_write_into_another_tenant(
    client: Client,
    tenant: TenantFixture,
    other_tenant: TenantFixture,
    app_engine: AsyncEngine,
    admin_engine: AsyncEngine,
) -> None:
    await _seed(client, other_tenant, "victim")
    before = await db_snapshot(admin_engine, other_tenant.id)
    attacks = [
        ("INSERT INTO end_users (tenant_id, user_id) VALUES (:other, 'planted')", DBAPIError),
        (
            "INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload) "
            "VALUES (gen_random_uuid(), :other, 'x', 'x', '{}')",
            DBAPIError,
        ),
        ("UPDATE end_users SET tenant_id = :other WHERE user_id = 'nobody'", None),
    ]
    for sql, error in attacks:
        if error is None:
            async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
                await tx.execute(text(sql), {"other": other_tenant.id})
            continue
        with pytest.raises(error, match="row-level security"):
            async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
                await tx.execute(text(sql), {"other": other_tenant.id})
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        hit = await tx.execute(text("UPDATE user_progress SET status = 'hacked' WHERE user_id = 'victim'"))
        assert hit.rowcount == 0
        gone = await tx.execute(text("DELETE FROM end_users WHERE user_id = 'victim'"))
        assert gone.rowcount == 0
    assert await db_snapshot(admin_engine, other_tenant.id) == before


async def test_moving_own_rows_to_another_tenant_is_refused(
    client: Client, tenant: TenantFixture, other_tenant: TenantFixture, app_engine: AsyncEngine
) -> None:
    await _seed(client, tenant, "mover")
    with pytest.raises(DBAPIError, match="row-level security"):
        async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
            await tx.execute(text("UPDATE outbox SET tenant_id = :other"), {"other": other_tenant.id})


async def test_app_role_cannot_escape(app_engine: AsyncEngine, tenant: TenantFixture) -> None:
    async with app_engine.connect() as conn:
        role = (
            await conn.execute(text("SELECT rolbypassrls, rolsuper FROM pg_roles WHERE rolname = current_user"))
        ).one()
        assert tuple(role) == (False, False)
        owned = (
            await conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user")
            )
        ).scalar_one()
        assert owned == 0
    refused = [
        (["ALTER TABLE end_users DISABLE ROW LEVEL SECURITY"], "must be owner"),
        (["DROP POLICY tenant_isolation ON end_users"], "must be owner"),
        (["SET row_security = off", "SELECT count(*) FROM end_users"], "row-level security"),
        (["SELECT * FROM api_keys FOR UPDATE"], "permission denied"),
        (["DELETE FROM tenants"], "permission denied"),
        (["SET ROLE firstmile_key_resolver"], "permission denied"),
    ]
    for statements, message in refused:
        with pytest.raises(DBAPIError, match=message):
            async with app_engine.begin() as conn:
                await bind_tenant(conn, OPERATOR_CLI.tenant(tenant.id))
                for statement in statements:
                    await conn.execute(text(statement))


async def test_key_resolver_is_the_only_door_to_other_tenants_keys(
    app_engine: AsyncEngine, tenant: TenantFixture, other_tenant: TenantFixture
) -> None:
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        rows = (await tx.execute(text("SELECT tenant_id FROM api_keys"))).all()
        assert {r[0] for r in rows} == {tenant.id}
        # the resolver takes a hash, never a tenant: nothing to enumerate with
        none = (await tx.execute(text("SELECT count(*) FROM firstmile_resolve_api_key(''::bytea)"))).scalar_one()
        assert none == 0


async def test_every_tenant_table_has_forced_rls_and_a_policy(admin_engine: AsyncEngine) -> None:
    """Meta-test: find tenant-owned tables from the live catalog, not from a list we maintain."""
    async with admin_engine.connect() as conn:
        tables = [
            r[0]
            for r in await conn.execute(
                text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
                )
            )
        ]
        assert set(tables) == set(TENANT_OWNED_TABLES)
        for table in [*tables, "tenants"]:
            enabled, forced = (
                await conn.execute(
                    text("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = :t"), {"t": table}
                )
            ).one()
            assert enabled and forced, table
            policy = (
                await conn.execute(
                    text("SELECT qual FROM pg_policies WHERE tablename = :t AND policyname = 'tenant_isolation'"),
                    {"t": table},
                )
            ).scalar_one()
            assert "current_setting('firstmile.tenant_id'" in policy, table
            # tenant_id leads the primary key or an index of every tenant table
            if table != "tenants":
                lead = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] "
                            "WHERE c.relname = :t AND a.attname = 'tenant_id'"
                        ),
                        {"t": table},
                    )
                ).scalar_one()
                assert lead >= 1, table


async def test_failed_unit_of_work_leaves_nothing_and_the_connection_serves_on(
    tenant: TenantFixture, database: Database, admin_engine: AsyncEngine
) -> None:
    engine = create_async_engine(database.app_url, pool_size=1, max_overflow=0)
    try:
        with pytest.raises(DBAPIError, match="duplicate key"):
            async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
                await tx.execute(
                    text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'ghost')"), {"t": tenant.id}
                )
                await tx.execute(
                    text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'ghost')"), {"t": tenant.id}
                )
        with pytest.raises(RuntimeError):
            async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
                await tx.execute(
                    text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'ghost2')"), {"t": tenant.id}
                )
                raise RuntimeError("handler failed after writing")
        async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
            await tx.execute(text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'kept')"), {"t": tenant.id})
        async with admin_engine.connect() as conn:
            users = {
                r[0]
                for r in await conn.execute(
                    text("SELECT user_id FROM end_users WHERE tenant_id = :t"), {"t": tenant.id}
                )
            }
        assert users == {"kept"}
    finally:
        await engine.dispose()
