"""Exploration end to end: the manifest's ``planner.exploration`` reaches the planner through the tenant's
catalog, and every start's stored decision (``user_progress.decision``, the ``onboarding.started`` event)
carries the propensity of the path taken (docs/models.md#exploration-and-propensities)."""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION, TenantFixture
from tests.factories import demo_document, manifest_for

Client = AsyncTestClient[Litestar]
EPSILON = 0.5
ELIGIBLE = ["developer-quickstart", "marketing-campaigns", "generic"]  # a developer whose use case is marketing


async def _tenant(admin_engine: AsyncEngine, planner: dict[str, Any] | None) -> TenantFixture:
    slug = f"t-{secrets.token_hex(5)}"
    document = demo_document()
    if planner is not None:
        document["planner"] = planner
    manifest = manifest_for(slug, REGION, document)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def _decisions(admin_engine: AsyncEngine, tenant: TenantFixture) -> dict[str, dict[str, Any]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT user_id, path_key, decision FROM user_progress WHERE tenant_id = :t"), {"t": tenant.id}
        )
        return {r[0]: {"path": r[1], **r[2]} for r in rows}


async def _start(client: Client, tenant: TenantFixture, user_id: str) -> dict[str, Any]:
    r = await client.post(
        "/v1/onboarding/start",
        json={"user_id": user_id, "traits": {"persona": "developer", "use_case": "marketing"}},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_tenants_exploration_is_applied_and_every_decision_records_its_propensity(
    client: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine, {"model": None, "exploration": {"epsilon": EPSILON}})
    users = [f"x-{i}" for i in range(60)]
    answers = {u: await _start(client, tenant, u) for u in users}
    stored = await _decisions(admin_engine, tenant)
    assert set(stored) == set(users)
    greedy = 1 - EPSILON + EPSILON / len(ELIGIBLE)
    for user, decision in stored.items():
        assert decision["path"] == answers[user]["path"]["id"]
        assert decision["path"] in ELIGIBLE  # never outside targeting
        exploration = decision["exploration"]
        assert exploration == {
            "policy": "epsilon_greedy",
            "epsilon": EPSILON,
            "explored": exploration["explored"],
            "eligible": ELIGIBLE,
            "greedy": "developer-quickstart",
        }
        if decision["path"] == "developer-quickstart":
            assert decision["selected_by"] == "rules" and decision["propensity"] == pytest.approx(greedy)
        else:
            assert decision["selected_by"] == "exploration" and exploration["explored"]
            assert decision["propensity"] == pytest.approx(EPSILON / len(ELIGIBLE))
            assert answers[user]["decision"]["selected_by"] == "exploration"
    taken = Counter(d["path"] for d in stored.values())
    assert taken["developer-quickstart"] < len(users)  # with 60 starts at epsilon 0.5, some explored (p > 1 - 1e-10)
    # the onboarding.started event carries the same decision, propensity included
    async with admin_engine.connect() as conn:
        events = await conn.execute(
            text("SELECT payload FROM outbox WHERE tenant_id = :t AND event_type = 'onboarding.started'"),
            {"t": tenant.id},
        )
        for (payload,) in events:
            assert payload["decision"]["propensity"] == stored[payload["user_id"]]["propensity"]


async def test_without_exploration_decisions_are_deterministic_with_propensity_one(
    client: Client, admin_engine: AsyncEngine
) -> None:
    for planner in (None, {"model": None}, {"model": None, "exploration": {"epsilon": 0}}):
        tenant = await _tenant(admin_engine, planner)
        for i in range(5):
            await _start(client, tenant, f"d-{i}")
        stored = await _decisions(admin_engine, tenant)
        assert {(d["path"], d["selected_by"], d["propensity"], d["exploration"]) for d in stored.values()} == {
            ("developer-quickstart", "rules", 1.0, None)
        }, planner
