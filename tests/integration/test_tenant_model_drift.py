"""The drift check of a tenant's own model (docs/models.md#drift-and-retraining), end to end on real PostgreSQL and a
registry of really trained models: two tenants train and promote their own path model on their logged decisions and
serve starts with it. The one whose users and outcomes stay as they were is checked stable (no flag); the one whose
new users come from another persona is found drifted by the scheduler's pass, which flags its model and trains it
again in the same pass (``trigger: drift``), once; outcomes that contradict the steady tenant's model are drift too.
Every check is audited in the tenant's log, and the admin models page shows the last one."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.drift import MIN_OUTCOMES, MIN_RECENT
from firstmile.ml.planner import tenant_model_name
from firstmile.ml.tenant_training import TenantTrainer, TrainingRun
from firstmile.tenancy.cli import create_key
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings
from tests.factories import demo_document, manifest_for
from tests.integration.test_adaptive_planner import registry
from tests.integration.test_admin_access import BASE, sign_in
from tests.integration.test_models_cli import _invoke
from tests.integration.test_tenant_models import (
    EPSILON,
    SIZES,
    SOURCES,
    _model_audit,
    _outcomes,
    _promote,
    _seed,
    _train,
)

__all__ = ["registry"]

Client = AsyncTestClient[Litestar]
MATURED = MIN_OUTCOMES + 10  # decisions aged past the horizon, for the calibration
RECENT = MIN_RECENT + 10  # decisions of the last days, for PSI
TRAINING = {"schedule_days": 7}
CHEAP = ("--min-decisions", "100", "--min-per-path", "8")


async def _tenant(admin_engine: AsyncEngine) -> TenantFixture:
    slug = f"t-{secrets.token_hex(5)}"
    document = demo_document()
    document["planner"] = {"model": None, "exploration": {"epsilon": EPSILON}, "training": TRAINING}
    manifest = manifest_for(slug, REGION, document)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def _serve_own_model(admin_engine: AsyncEngine, tenant: TenantFixture) -> None:
    """The tenant names its own (promoted) model, stays opted in to scheduled training, explores no more."""
    document = demo_document()
    document["planner"] = {"model": tenant_model_name(tenant.slug), "training": TRAINING}
    await apply_manifest(admin_engine, manifest_for(tenant.slug, REGION, document))


async def _start(client: Client, tenant: TenantFixture, user: str, i: int, persona: str) -> dict[str, Any]:
    traits = {
        "persona": persona,
        "use_case": "marketing",
        "signup_source": SOURCES[i % 3],
        "company_size": SIZES[i % 3],
    }
    r = await client.post("/v1/onboarding/start", json={"user_id": user, "traits": traits}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    decision: dict[str, Any] = r.json()["decision"]
    return decision


async def _starts(client: Client, tenant: TenantFixture, prefix: str, n: int, persona: str = "developer") -> None:
    """``n`` starts, every one decided by the tenant's own model (it loads on first use: the rules decide meanwhile,
    those warm-up starts are not the model's decisions)."""
    name = tenant_model_name(tenant.slug)
    for attempt in range(240):  # up to two minutes: loading a model on a loaded machine is slow
        decision = await _start(client, tenant, f"warm-{prefix}{attempt}", attempt, persona)
        if decision["selected_by"] == "model":
            break
        await asyncio.sleep(0.5)
    assert decision["selected_by"] == "model" and decision["model"] == name, decision

    async def one(i: int) -> None:
        decision = await _start(client, tenant, f"{prefix}{i:04d}", i, persona)
        assert decision["selected_by"] == "model" and decision["model"] == name, decision

    for first in range(0, n, 20):
        await asyncio.gather(*(one(i) for i in range(first, min(n, first + 20))))


async def _age(admin_engine: AsyncEngine, tenant: TenantFixture, prefix: str, *, activated: bool) -> None:
    """Age the ``prefix`` decisions past the 14-day horizon, activated within it or not."""
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET started_at = now() - interval '20 days', activated_at = CASE WHEN :activated"
                " THEN now() - interval '19 days' END WHERE tenant_id = :t AND user_id LIKE :prefix"
            ),
            {"t": tenant.id, "prefix": prefix + "%", "activated": activated},
        )


def _drift(env: dict[str, str], registry: Path, slug: str) -> Any:
    return _invoke("drift", "--registry", str(registry), "--tenant", slug, "--json", env=env)


def _mine(runs: list[TrainingRun], *slugs: str) -> dict[str, TrainingRun]:
    return {r.slug: r for r in runs if r.slug in slugs}


async def test_drift_of_a_tenant_model_is_flagged_audited_and_retrains_it(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    env = {"FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url, "FIRSTMILE_DATABASE_URL": database.app_url}
    reg = Registry(registry)
    steady, shifted = await _tenant(admin_engine), await _tenant(admin_engine)
    settings = make_settings(public_url=BASE, admin_cookie_secure=False, model_registry_uri=str(registry))
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as client:
        # each tenant's logged decisions (rules with exploration): only the generic path activates
        for tenant in (steady, shifted):
            await _seed(client, tenant, 300)
            await _outcomes(admin_engine, tenant, "path_key = 'generic'")
            trained = await asyncio.to_thread(_train, env, registry, tenant.slug, *CHEAP)
            assert trained.exit_code == 0, trained.output
            for stage in ("shadow", "canary", "production"):
                promoted = await asyncio.to_thread(_promote, env, registry, tenant.slug, "1.0.0", stage)
                assert promoted.exit_code == 0, promoted.output
            await _serve_own_model(admin_engine, tenant)
        stored = reg.get(tenant_model_name(steady.slug), "1.0.0").metrics
        assert stored["calibration"]["chosen"]["decisions"] > 0 and "reference_unknown_fill" in stored

        # the steady tenant: the same users as in training, and the same outcomes
        await _starts(client, steady, "m-", MATURED)
        await _age(admin_engine, steady, "m-", activated=True)
        await _starts(client, steady, "r-", RECENT)
        # the shifted tenant: its new users are analysts (every logged one was a developer)
        await _starts(client, shifted, "a-", RECENT, persona="analyst")

        # the operator's check of the steady tenant: its own model (it decides the starts), stable, not flagged
        steady_name, shifted_name = tenant_model_name(steady.slug), tenant_model_name(shifted.slug)
        checked = await asyncio.to_thread(_drift, env, registry, steady.slug)
        assert checked.exit_code == 0, checked.output
        report = json.loads(checked.output)
        assert (report["model"], report["version"], report["verdict"]) == (steady_name, "1.0.0", "stable"), report
        # the recent ones, and the last start of each warm-up (decided by the model: the m- one is recent too)
        assert report["sample"] == RECENT + 2 and not report["retrain"] and not report["flagged"]
        assert {f["name"]: f["level"] for f in report["features"]}["user_persona"] == "stable"
        calibration = report["calibration"]
        assert calibration["live"]["decisions"] == MATURED and calibration["live"]["observed_rate"] == 1.0
        assert calibration["reference"] is not None and not calibration["drift"], calibration
        assert abs(calibration["shift"]) <= calibration["tolerance"]

        # the scheduler's pass checks both before deciding who is due: the shifted one drifted, is flagged and
        # trained again in the same pass; the steady one is stable and not due
        trainer = TenantTrainer(database.admin_url, reg, min_decisions=100, min_per_path=8, epochs=3)
        runs = _mine(await trainer.run_once(datetime.now(UTC)), steady.slug, shifted.slug)
        assert (runs[steady.slug].drift, runs[steady.slug].outcome) == ("stable", "not_due"), runs
        assert runs[shifted.slug].drift == "drift" and runs[shifted.slug].trigger == "drift", runs
        assert runs[shifted.slug].outcome == "registered" and runs[shifted.slug].version == "1.1.0"
        assert reg.flags(steady_name) == []
        flags = reg.flags(shifted_name)
        assert [f["version"] for f in flags] == ["1.0.0"]
        assert flags[0]["reason"].startswith("drift: feature shift (PSI > 0.25): user_persona"), flags
        assert reg.stages(shifted_name).production == "1.0.0"  # retrained, never promoted by itself

        # outcomes that contradict the steady tenant's model: none of its matured users activated
        await _age(admin_engine, steady, "m-", activated=False)
        contradicted = await asyncio.to_thread(_drift, env, registry, steady.slug)
        report = json.loads(contradicted.output)
        assert report["verdict"] == "drift" and report["flagged"], report
        assert report["calibration"]["live"]["observed_rate"] == 0.0 and report["calibration"]["drift"]
        assert report["reason"].startswith("calibration moved -") and "user_persona" not in report["reason"]
        assert [f["version"] for f in reg.flags(steady_name)] == ["1.0.0"]

        # the next pass: the steady tenant is due (its flag), trained with trigger drift; the shifted one, already
        # flagged and retrained since, is checked again (still drift) but neither flagged again nor retrained
        later = _mine(await trainer.run_once(datetime.now(UTC)), steady.slug, shifted.slug)
        assert (later[steady.slug].trigger, later[steady.slug].outcome) == ("drift", "registered"), later
        assert (later[shifted.slug].drift, later[shifted.slug].outcome) == ("drift", "not_due"), later
        assert len(reg.flags(shifted_name)) == 1 and len(reg.flags(steady_name)) == 1

        # the admin models page shows the last check
        await sign_in(client, steady.slug, "analyst")
        own = (await client.get("/admin/api/models")).json()["own"]
        assert own["drift"]["verdict"] == "drift" and own["drift"]["version"] == "1.0.0"
        assert own["drift"]["calibration"]["live"]["decisions"] == MATURED
        page = await client.get("/admin/models")
        assert page.status_code == 200 and 'data-testid="own-drift" data-verdict="drift"' in page.text
        assert 'data-testid="drift-feature"' in page.text and "calibration moved -" in page.text

    # every check audited in the tenant's own log, with its figures and verdict
    entries = [e for e in await _model_audit(admin_engine, steady) if e["action"] in ("models.drift", "models.train")]
    assert [(e["action"], e["actor"], e.get("verdict"), e.get("trigger")) for e in entries] == [
        ("models.train", "operator:cli", None, None),
        ("models.drift", "operator:cli", "stable", None),
        ("models.drift", "worker:tenant-model-training", "stable", None),
        ("models.drift", "operator:cli", "drift", None),
        ("models.drift", "worker:tenant-model-training", "drift", None),
        ("models.train", "worker:tenant-model-training", None, "drift"),
    ]
    first = entries[1]
    assert first["subject"] == f"model:{steady_name}@1.0.0" and first["scheduled"] is False
    assert first["sample"] == RECENT + 2 and first["calibration"]["live"]["decisions"] == MATURED
    assert {f["name"] for f in first["features"]} >= {"user_persona", "signup_source", "engagement_score"}
    assert entries[3]["flagged"] is True and entries[4]["flagged"] is False and entries[4]["scheduled"] is True
    moved = [(e["action"], e.get("verdict"), e.get("flagged"), e.get("trigger")) for e in
             await _model_audit(admin_engine, shifted) if e["action"] in ("models.drift", "models.train")]  # fmt: skip
    assert moved == [
        ("models.train", None, None, None),
        ("models.drift", "drift", True, None),
        ("models.train", None, None, "drift"),
        ("models.drift", "drift", False, None),
    ]
