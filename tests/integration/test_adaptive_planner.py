"""The adaptive planner in-process (embedded mode) against PostgreSQL and a real trained registry.

(Through Ray Serve, with Ray killed mid-test: tests/integration/test_ray_planner.py.)
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.inference import InProcessClient
from firstmile.ml.stuck import ModelStuckDetector
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.stuck import StuckScanner
from firstmile.tenancy.cli import create_key
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings, sequenced
from tests.factories import demo_document, manifest_for
from tests.support.inference import RecordingClient

Client = AsyncTestClient[Litestar]


async def adaptive_tenant(admin_engine: AsyncEngine) -> TenantFixture:
    """A tenant whose manifest asks the path model first (the demo's planner section)."""
    slug = f"t-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, demo_document(planner=True))
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write", "events:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def running(app: Litestar) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        inference = app.state.container.inference.client
        assert isinstance(inference, InProcessClient)
        loaded = await asyncio.to_thread(inference.warm, ["path_classifier", "stuck_detector"], wait_s=120)
        assert loaded, "the in-process models did not load"
        yield client


async def _start(client: Client, tenant: TenantFixture, user_id: str, **traits: Any) -> dict[str, Any]:
    r = await client.post("/v1/onboarding/start", json={"user_id": user_id, "traits": traits}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _stored_decision(admin_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> dict[str, Any]:
    async with admin_engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT decision FROM user_progress WHERE tenant_id = :t AND user_id = :u"),
                {"t": tenant.id, "u": user_id},
            )
        ).one()
    decision: dict[str, Any] = row[0]
    return decision


@pytest.fixture
async def registry(tiny_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the trained registry (tests stage versions in it)."""
    copy = tmp_path / "models"
    shutil.copytree(tiny_registry, copy)
    return copy


async def test_start_is_decided_by_the_model_and_recorded(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        body = await _start(client, tenant, "ml-1", persona="analyst", company_size="11-50", use_case="reporting")
        decision = body["decision"]
        assert decision["selected_by"] == "model"
        assert (decision["model"], decision["model_version"]) == ("path_classifier", "1.0.0")
        assert 0.0 < decision["confidence"] <= 1.0
        assert decision["fallback"] is None and decision["fallback_reason"] is None
        assert body["path"]["id"] in {p.id for p in tenant.manifest.paths}

        stored = await _stored_decision(admin_engine, tenant, "ml-1")
        assert stored["inference"] == "in-process"
        assert stored["stage"] == "production"
        assert stored["features"]["user_persona"] == "analyst"
        assert stored["features"]["company_size"] == "11-50"
        assert stored["feature_source"] in {"fresh", "absent"}
        assert body["path"]["id"] in stored["scores"]

        await sequenced(admin_engine)
        async with admin_engine.connect() as conn:
            audit = (
                await conn.execute(
                    text(
                        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND subject = 'ml-1'"
                        " AND payload ->> 'decision' = 'path_selection'"
                    ),
                    {"t": tenant.id},
                )
            ).one()[0]
        assert audit["model"] == "path_classifier"
        assert audit["model_version"] == "1.0.0"
        assert audit["confidence"] == decision["confidence"]
        assert audit["inputs"]["features"]["user_persona"] == "analyst"


async def test_shadow_version_is_logged_beside_production(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    reg = Registry(registry)
    current = reg.resolve("path_classifier", "production")
    assert current is not None
    shadow = reg.register(
        "path_classifier", weights=current.weights_path.read_bytes(), config=current.config, metrics=current.metrics
    )
    reg.promote("path_classifier", shadow.version, "shadow")
    tenant = await adaptive_tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        body = await _start(client, tenant, "shadowed", persona="developer")
        assert body["decision"]["model_version"] == "1.0.0"  # production decides
        stored = await _stored_decision(admin_engine, tenant, "shadowed")
        assert stored["shadow"]["version"] == shadow.version
        # same weights: the shadow agrees, and its answer is only on the record
        assert stored["shadow"]["path"] == body["path"]["id"]


async def test_a_model_slower_than_the_timeout_falls_back_to_the_rules(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    settings = make_settings(model_registry_uri=str(registry), inference_timeout_ms=0.001)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async for client in running(app):
        model = RecordingClient.install(app)
        # The model answers on the event loop, past the 1 µs limit: its answer is discarded.
        body = await _start(client, tenant, "slow-1", persona="developer")
        decision = body["decision"]
        assert (decision["selected_by"], body["path"]["id"]) == ("rules", "developer-quickstart")
        assert decision["fallback"] == "rules"
        assert decision["fallback_reason"] == "timeout"
        assert decision["model"] == "path_classifier"
        assert model.outcomes == ["answered"]
        # A model still working at the limit is not waited for: the hard timeout cancels the call.
        model.stall = 10_000
        body = await _start(client, tenant, "slow-2", persona="marketer")
        assert (body["decision"]["selected_by"], body["decision"]["fallback"]) == ("default", "default_path")
        assert body["decision"]["fallback_reason"] == "timeout"
        assert model.outcomes == ["answered", "cancelled"]


async def test_no_model_in_the_registry_means_rules_with_the_reason(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(tmp_path)), database.app_url, PEPPER, analytics=analytics_store
    )
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        body = await _start(client, tenant, "no-model", persona="analyst")
        assert body["decision"]["selected_by"] == "rules"
        assert body["decision"]["fallback_reason"] == "not_deployed"


async def test_the_stuck_detector_decides_in_the_scan(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, app_engine: AsyncEngine, registry: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        await _start(client, tenant, "gone-quiet", persona="analyst")
        async with admin_engine.begin() as conn:
            await conn.execute(
                text("UPDATE user_progress SET updated_at = now() - interval '10 days' WHERE tenant_id = :t"),
                {"t": tenant.id},
            )
        scanner = StuckScanner(
            app_engine,
            CatalogCache(),
            ModelStuckDetector(app.state.container.inference),
            None,
            after=timedelta(hours=24),
            min_idle=timedelta(hours=1),
        )
        flags = [f for f in await scanner.run_once() if f.tenant_id == str(tenant.id)]
        assert len(flags) == 1
        flag = flags[0]
        assert (flag.detected_by, flag.model_version, flag.fallback_reason) == ("stuck_detector", "1.0.0", None)
        assert flag.probability is not None and flag.probability >= 0.5


async def test_feature_store_down_means_rules_and_the_record_says_why(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path, tmp_path: Path
) -> None:
    from tests.integration.test_feature_store import PrivateRedis

    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        tenant = await adaptive_tenant(admin_engine)
        settings = make_settings(model_registry_uri=str(registry), redis_url=redis.url)
        app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
        async for client in running(app):
            up = await _start(client, tenant, "redis-up", persona="analyst")
            assert up["decision"]["selected_by"] == "model"
            assert (await _stored_decision(admin_engine, tenant, "redis-up"))["feature_source"] == "absent"
            redis.stop()  # the real server goes away
            down = await _start(client, tenant, "redis-down", persona="analyst")
            assert (down["decision"]["selected_by"], down["path"]["id"]) == ("rules", "analyst-reports")
            assert down["decision"]["fallback_reason"] == "feature_store_unavailable"
    finally:
        redis.stop()
