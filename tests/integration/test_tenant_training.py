"""Scheduled training of the tenants' own path models (docs/models.md#scheduled-training): the
``tenant-model-training`` task trains an opted-in tenant with enough logged decisions and registers its
candidate, refuses one below the minimums (audited with the reason, nothing registered), promotes nothing,
waits for the schedule, and trains again when ``models drift`` flags the tenant's model."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.planner import tenant_model_name
from firstmile.ml.tenant_training import TenantTrainer, TrainingRun
from firstmile.tenancy.cli import create_key
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings
from tests.factories import demo_document, manifest_for
from tests.integration.test_adaptive_planner import registry, running
from tests.integration.test_tenant_models import EPSILON, _model_audit, _outcomes, _seed

__all__ = ["registry"]


async def _opted_in(admin_engine: AsyncEngine, planner: dict[str, Any]) -> TenantFixture:
    slug = f"t-{secrets.token_hex(5)}"
    document = demo_document()
    document["planner"] = planner
    manifest = manifest_for(slug, REGION, document)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


def _mine(runs: list[TrainingRun], *slugs: str) -> dict[str, TrainingRun]:
    return {r.slug: r for r in runs if r.slug in slugs}


async def test_opted_in_tenants_are_trained_when_due_audited_and_never_promoted(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    planner = {"model": None, "exploration": {"epsilon": EPSILON}, "training": {"schedule_days": 7}}
    good, thin = await _opted_in(admin_engine, planner), await _opted_in(admin_engine, planner)
    bystander = await _opted_in(admin_engine, {"model": None, "exploration": {"epsilon": EPSILON}})
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        await _seed(client, good, 300)
        await _seed(client, thin, 30)
        await _seed(client, bystander, 300)
    await _outcomes(admin_engine, good, "path_key = 'generic'")
    await _outcomes(admin_engine, thin, "path_key = 'generic'")
    await _outcomes(admin_engine, bystander, "path_key = 'generic'")

    reg = Registry(registry)
    trainer = TenantTrainer(database.admin_url, reg, min_decisions=100, min_per_path=8, epochs=3)
    now = datetime.now(UTC)
    slugs = (good.slug, thin.slug, bystander.slug)
    first = _mine(await trainer.run_once(now), *slugs)
    assert bystander.slug not in first  # not opted in: never trained by the task
    assert first[good.slug].trigger == "first" and first[good.slug].outcome == "registered", first
    assert first[good.slug].version == "1.0.0"
    assert first[thin.slug].outcome == "refused" and "30 logged decisions" in str(first[thin.slug].reason)
    name = tenant_model_name(good.slug)
    assert [v.version for v in reg.versions(name)] == ["1.0.0"]
    assert reg.versions(tenant_model_name(thin.slug)) == []
    assert reg.versions(tenant_model_name(bystander.slug)) == []
    stages = reg.stages(name)
    assert (stages.shadow, stages.canary, stages.production) == (None, None, None)  # never promoted by itself

    good_audit, thin_audit = await _model_audit(admin_engine, good), await _model_audit(admin_engine, thin)
    assert [e["action"] for e in good_audit] == ["models.train"]
    entry = good_audit[0]
    assert entry["actor"] == "worker:tenant-model-training" and entry["subject"] == f"model:{name}@1.0.0"
    assert entry["trigger"] == "first" and entry["refused"] is False and entry["decisions"] == 300
    assert isinstance(entry["gate_passed"], bool)
    assert len(thin_audit) == 1 and thin_audit[0]["refused"] is True
    assert "at least 100 are needed" in thin_audit[0]["reason"] and "keeps serving" in thin_audit[0]["reason"]

    # within the schedule: nothing (the refused tenant is not retried on every pass either)
    later = _mine(await trainer.run_once(now + timedelta(hours=1)), *slugs)
    assert {r.outcome for r in later.values()} == {"not_due"}
    # a drift flag on the tenant's model trains it again before the schedule; still not promoted
    await asyncio.sleep(0.01)
    reg.flag(name, "1.0.0", "live accuracy dropped")
    drift = _mine(await trainer.run_once(datetime.now(UTC) + timedelta(hours=2)), *slugs)
    assert drift[good.slug].trigger == "drift" and drift[good.slug].outcome == "registered"
    assert drift[thin.slug].outcome == "not_due"
    assert len(reg.versions(name)) == 2 and reg.stages(name).production is None
    # past the schedule: the refused tenant is tried again, and refused again (audited again)
    weekly = _mine(await trainer.run_once(now + timedelta(days=8)), *slugs)
    assert weekly[thin.slug].trigger == "schedule" and weekly[thin.slug].outcome == "refused"
    assert len(await _model_audit(admin_engine, thin)) == 2
    assert [e["trigger"] for e in await _model_audit(admin_engine, good)][:2] == ["first", "drift"]
