"""`tenants apply` against PostgreSQL: idempotent, versioned, and users keep their version."""

from __future__ import annotations

import secrets

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.service import TenancyError
from tests.conftest import PEPPER, REGION
from tests.factories import db_snapshot, demo_document, manifest_for

Client = AsyncTestClient[Litestar]


async def _versions(admin_engine: AsyncEngine, tenant_id: object) -> dict[str, list[tuple[int, bool]]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT path_key, version, is_current FROM onboarding_paths WHERE tenant_id = :t ORDER BY 1, 2"),
            {"t": tenant_id},
        )
        found: dict[str, list[tuple[int, bool]]] = {}
        for key, version, current in rows:
            found.setdefault(key, []).append((version, current))
        return found


async def test_apply_is_idempotent_and_versions_changed_paths(admin_engine: AsyncEngine, client: Client) -> None:
    slug = f"m-{secrets.token_hex(4)}"
    first = await apply_manifest(admin_engine, manifest_for(slug, REGION))
    assert first.changes[0] == f"create tenant {slug} in {REGION}"
    assert len(first.changes) == 1 + 7
    snapshot = await db_snapshot(admin_engine, first.tenant_id)
    again = await apply_manifest(admin_engine, manifest_for(slug, REGION))
    assert again.changes == [] and again.tenant_id == first.tenant_id
    assert await db_snapshot(admin_engine, first.tenant_id) == snapshot

    key = (await create_key(admin_engine, PEPPER, slug, ["onboarding:write"])).key
    headers = {"Authorization": f"Bearer {key}"}
    old_user = await client.post(
        "/v1/onboarding/start", json={"user_id": "early", "traits": {"persona": "developer"}}, headers=headers
    )
    assert old_user.json()["path"]["version"] == 1

    doc = demo_document()
    dev = next(p for p in doc["paths"] if p["id"] == "developer-quickstart")
    dev["steps"][0]["title"] = "Generate a key"
    dev["steps"].insert(1, {"id": "read-docs", "title": "Read the docs", "completion": {"event": "Docs Read"}})
    changed = await apply_manifest(admin_engine, manifest_for(slug, REGION, doc))
    assert changed.changes == ["path developer-quickstart: new version 2 (was 1)"]
    versions = await _versions(admin_engine, first.tenant_id)
    assert versions["developer-quickstart"] == [(1, False), (2, True)]
    assert versions["generic"] == [(1, True)]

    # users on version 1 stay there; new users get version 2
    kept = (await client.get("/v1/onboarding/early", headers=headers)).json()
    assert kept["path"]["version"] == 1
    assert [s["id"] for s in kept["steps"]][:2] == ["create-api-key", "install-sdk"]
    step = await client.post("/v1/onboarding/early/steps/create-api-key/complete", headers=headers)
    assert step.status_code == 200 and step.json()["current_step"] == "install-sdk"
    late = (
        await client.post(
            "/v1/onboarding/start", json={"user_id": "late", "traits": {"persona": "developer"}}, headers=headers
        )
    ).json()
    assert late["path"]["version"] == 2
    assert [s["id"] for s in late["steps"]][:2] == ["create-api-key", "read-docs"]


async def test_removed_paths_are_retired_not_deleted(admin_engine: AsyncEngine, client: Client) -> None:
    slug = f"r-{secrets.token_hex(4)}"
    result = await apply_manifest(admin_engine, manifest_for(slug, REGION))
    key = (await create_key(admin_engine, PEPPER, slug, ["onboarding:write"])).key
    headers = {"Authorization": f"Bearer {key}"}
    await client.post("/v1/onboarding/start", json={"user_id": "an", "traits": {"persona": "analyst"}}, headers=headers)
    doc = demo_document()
    doc["paths"] = [p for p in doc["paths"] if p["id"] != "analyst-reports"]
    changed = await apply_manifest(admin_engine, manifest_for(slug, REGION, doc))
    assert changed.changes == ["path analyst-reports: retire version 1"]
    assert (await _versions(admin_engine, result.tenant_id))["analyst-reports"] == [(1, False)]
    assert (await client.get("/v1/onboarding/an", headers=headers)).json()["path"]["id"] == "analyst-reports"
    newcomer = await client.post(
        "/v1/onboarding/start", json={"user_id": "an2", "traits": {"persona": "analyst"}}, headers=headers
    )
    assert newcomer.json()["path"]["id"] == "generic"
    # bringing it back makes version 2, never reusing a number
    back = await apply_manifest(admin_engine, manifest_for(slug, REGION))
    assert back.changes == ["path analyst-reports: create version 2"]


async def test_plan_changes_nothing(admin_engine: AsyncEngine) -> None:
    slug = f"p-{secrets.token_hex(4)}"
    planned = await apply_manifest(admin_engine, manifest_for(slug, REGION), dry_run=True)
    assert planned.changes[0].startswith("create tenant")
    async with admin_engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM tenants WHERE slug = :s"), {"s": slug})).scalar_one()
    assert count == 0


async def test_home_region_cannot_move_by_manifest(admin_engine: AsyncEngine) -> None:
    slug = f"g-{secrets.token_hex(4)}"
    created = await apply_manifest(admin_engine, manifest_for(slug, REGION))
    before = await db_snapshot(admin_engine, created.tenant_id)
    with pytest.raises(TenancyError, match="data migration"):
        await apply_manifest(admin_engine, manifest_for(slug, "us-east-1"))
    assert await db_snapshot(admin_engine, created.tenant_id) == before
