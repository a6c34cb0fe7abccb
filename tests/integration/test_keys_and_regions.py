"""API keys end to end: the CLI prints once, only a keyed hash is stored, revocation, regions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.auth.resolver import KeyResolver
from firstmile.kit.errors import ProblemError
from firstmile.tenancy import keys as keylib
from firstmile.tenancy.cli import create_key, list_keys, revoke_key
from tests.conftest import PEPPER, REGION, Database, TenantFixture, new_tenant
from tests.factories import db_snapshot

Client = AsyncTestClient[Litestar]


def _cli(database: Database, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "FIRSTMILE_DATABASE_URL": database.app_url,
        "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
        "FIRSTMILE_API_KEY_PEPPER": PEPPER.decode(),
        "FIRSTMILE_REGION": REGION,
    }
    return subprocess.run(
        [sys.executable, "-m", "firstmile.cli", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


async def test_cli_creates_a_key_shown_once_and_stored_as_hash(
    database: Database, tenant: TenantFixture, admin_engine: AsyncEngine, client: Client
) -> None:
    done = _cli(
        database,
        "keys",
        "create",
        "--tenant",
        tenant.slug,
        "--scope",
        "onboarding:write",
        "--scope",
        "events:write",
        "--name",
        "ci",
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("fm_") and "\n" not in key
    assert "shown once" in done.stderr and key not in done.stderr
    async with admin_engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT k::text, key_hash FROM api_keys k WHERE tenant_id = :t"), {"t": tenant.id})
        ).all()
    assert all(key not in row[0] and key[10:] not in row[0] for row in rows)
    assert keylib.hash_key(PEPPER, key) in {bytes(row[1]) for row in rows}
    response = await client.post(
        "/v1/onboarding/start", json={"user_id": "cli"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 201
    listing = _cli(database, "keys", "list", "--tenant", tenant.slug)
    assert "onboarding:write,events:write" in listing.stdout and key not in listing.stdout


def test_cli_refuses_bad_requests(database: Database, tenant: TenantFixture) -> None:
    unknown_scope = _cli(database, "keys", "create", "--tenant", tenant.slug, "--scope", "root")
    assert unknown_scope.returncode != 0 and "unknown scope" in unknown_scope.stderr
    unknown_tenant = _cli(database, "keys", "create", "--tenant", "nobody-here", "--scope", "onboarding:write")
    assert unknown_tenant.returncode != 0 and "no tenant 'nobody-here'" in unknown_tenant.stderr


async def test_revoked_key_is_refused(admin_engine: AsyncEngine, tenant: TenantFixture, client: Client) -> None:
    assert (
        await client.post("/v1/onboarding/start", json={"user_id": "r1"}, headers=tenant.headers)
    ).status_code == 201
    (active,) = [k for k in await list_keys(admin_engine, tenant.slug) if k.revoked_at is None]
    assert await revoke_key(admin_engine, tenant.slug, active.id)
    assert not await revoke_key(admin_engine, tenant.slug, active.id)
    before = await db_snapshot(admin_engine, tenant.id)
    refused = await client.post("/v1/onboarding/start", json={"user_id": "r2"}, headers=tenant.headers)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_tenant_homed_elsewhere_gets_421(admin_engine: AsyncEngine, client: Client) -> None:
    abroad = await new_tenant(admin_engine, region="us-east-1")
    before = await db_snapshot(admin_engine, abroad.id)
    response = await client.post("/v1/onboarding/start", json={"user_id": "x"}, headers=abroad.headers)
    assert response.status_code == 421
    body = response.json()
    assert body["type"].endswith("/wrong-region") and body["home_region"] == "us-east-1"
    assert "us-east-1" in body["detail"]
    assert await db_snapshot(admin_engine, abroad.id) == before


async def test_key_cache_bounds_revocation_delay(admin_engine: AsyncEngine, app_engine: AsyncEngine) -> None:
    tenant = await new_tenant(admin_engine)
    resolver = KeyResolver(app_engine, PEPPER, REGION, ttl=0.5)
    header = f"Bearer {tenant.key}"
    principal = await resolver.principal(header)
    assert principal.tenant_id == tenant.id and principal.scopes == {"onboarding:write"}
    (active,) = await list_keys(admin_engine, tenant.slug)
    await revoke_key(admin_engine, tenant.slug, active.id)
    assert (await resolver.principal(header)).key_id == active.id  # cached within the TTL
    await asyncio.sleep(0.6)
    with pytest.raises(ProblemError) as refused:
        await resolver.principal(header)
    assert refused.value.status == 401


async def test_keys_are_bound_to_their_tenant(
    admin_engine: AsyncEngine, tenant: TenantFixture, other_tenant: TenantFixture, client: Client
) -> None:
    created = await create_key(admin_engine, PEPPER, other_tenant.slug, ["onboarding:write"])
    await client.post("/v1/onboarding/start", json={"user_id": "shared-name"}, headers=tenant.headers)
    seen = await client.get("/v1/onboarding/shared-name", headers={"Authorization": f"Bearer {created.key}"})
    assert seen.status_code == 404  # another tenant's user does not exist for this key
