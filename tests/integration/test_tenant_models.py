"""Per-tenant models end to end (docs/models.md#per-tenant-models): a tenant's logged decisions (rules with
epsilon-greedy exploration, so propensities vary) train its own path model, the refusals name the gap, the
off-policy gate lets a good candidate through and stops one no better than the logging policy, one tenant's
training never reads another's decisions, every run is audited, and a promoted model decides the next starts."""

from __future__ import annotations

import asyncio
import secrets
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
from firstmile.ml.planner import tenant_model_name
from firstmile.tenancy.cli import create_key
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings, sequenced
from tests.factories import demo_document, manifest_for
from tests.integration.test_adaptive_planner import registry, running
from tests.integration.test_models_cli import _invoke

__all__ = ["registry"]

Client = AsyncTestClient[Litestar]
EPSILON = 0.3
SIZES = ("1-10", "11-50", "51-200")
SOURCES = ("organic", "referral", "paid_search")


def _document(planner: dict[str, Any]) -> dict[str, Any]:
    document = demo_document()
    document["planner"] = planner
    return document


async def _tenant(admin_engine: AsyncEngine) -> TenantFixture:
    slug = f"t-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, _document({"model": None, "exploration": {"epsilon": EPSILON}}))
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def _seed(client: Client, tenant: TenantFixture, users: int, *, company_size: bool = True) -> None:
    """``users`` starts of developers with a marketing use case: eligible developer-quickstart (the rules' choice),
    marketing-campaigns and generic."""

    async def start(i: int) -> None:
        traits = {"persona": "developer", "use_case": "marketing", "signup_source": SOURCES[i % 3]}
        if company_size:
            traits["company_size"] = SIZES[i % 3]
        r = await client.post(
            "/v1/onboarding/start", json={"user_id": f"u-{i:04d}", "traits": traits}, headers=tenant.headers
        )
        assert r.status_code == 201, r.text

    for first in range(0, users, 20):
        await asyncio.gather(*(start(i) for i in range(first, min(users, first + 20))))


async def _outcomes(admin_engine: AsyncEngine, tenant: TenantFixture, activated_if: str) -> None:
    """Age the decisions past the horizon and activate the users for whom ``activated_if`` (SQL) holds."""
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET started_at = now() - interval '30 days',"
                f" activated_at = CASE WHEN {activated_if} THEN now() - interval '29 days' END"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant.id},
        )


async def _deterministic_log(admin_engine: AsyncEngine, tenant: TenantFixture) -> None:
    """Rewrite the logged paths as epsilon-greedy takes them on average: user i explores onto marketing-campaigns
    when i % 10 = 8 and onto generic when i % 10 = 9, and keeps the rules' developer-quickstart otherwise."""
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET"
                " path_key = (ARRAY['developer-quickstart', 'marketing-campaigns', 'generic'])"
                "   [CASE right(user_id, 4)::int % 10 WHEN 8 THEN 2 WHEN 9 THEN 3 ELSE 1 END],"
                " path_version = 1,"
                " decision = decision || jsonb_build_object('propensity',"
                "   CASE WHEN right(user_id, 4)::int % 10 >= 8 THEN CAST(:other AS float8)"
                "   ELSE CAST(:greedy AS float8) END)"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant.id, "other": EPSILON / 3, "greedy": 1 - EPSILON + EPSILON / 3},
        )


def _train(env: dict[str, str], registry: Path, slug: str, *extra: str) -> Any:
    return _invoke("train", "--registry", str(registry), "--tenant", slug, *extra, env=env)


def _promote(env: dict[str, str], registry: Path, slug: str, version: str, stage: str) -> Any:
    return _invoke("promote", "--tenant", slug, version, "--to", stage, "--registry", str(registry), env=env)


async def _model_audit(admin_engine: AsyncEngine, tenant: TenantFixture) -> list[dict[str, Any]]:
    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT actor, subject, payload FROM audit_entries WHERE tenant_id = :t AND kind = 'model' ORDER BY seq"
            ),
            {"t": tenant.id},
        )
        return [{"actor": r[0], "subject": r[1], **r[2]} for r in rows]


async def test_a_tenant_learns_from_its_own_decisions_behind_the_off_policy_gate(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    env = {"FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url, "FIRSTMILE_DATABASE_URL": database.app_url}
    reg = Registry(registry)
    demo_before = (reg.stages("path_classifier"), [v.version for v in reg.versions("path_classifier")])
    good, noise, thin = [await _tenant(admin_engine) for _ in range(3)]
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        await _seed(client, good, 300)
        await _seed(client, noise, 210)
        await _seed(client, thin, 30, company_size=False)
        # good: only the generic path activates (the rules' greedy choice never does); noise: a third of the users
        # activate whatever their path, on a log made deterministic (the planner's draws are the OS's), so the
        # candidate, no better than the logging policy, deterministically fails the gate
        await _outcomes(admin_engine, good, "path_key = 'generic'")
        await _deterministic_log(admin_engine, noise)
        await _outcomes(admin_engine, noise, "right(user_id, 4)::int % 3 = 0")
        await _outcomes(admin_engine, thin, "false")
        cheap = ("--min-decisions", "100", "--min-per-path", "8")

        # too few decisions: refused, nothing registered
        refused = await asyncio.to_thread(_train, env, registry, good.slug)
        assert refused.exit_code != 0
        assert "300 logged decisions" in refused.output and "at least 500" in refused.output, refused.output
        assert reg.versions(tenant_model_name(good.slug)) == []

        # a feature missing from the logs, named; then a catalog change mid-window, named
        missing = await asyncio.to_thread(_train, env, registry, thin.slug, "--min-decisions", "10")
        assert missing.exit_code != 0
        assert "company_size (0 of 30 decisions carry it)" in missing.output, missing.output
        changed = _document({"model": None, "exploration": {"epsilon": EPSILON}})
        # the rules' choice for these users (about 80% of the 30 decisions; generic, 10% of them, was in none of
        # them once, so its change went unseen and the refusal named the features instead)
        quickstart = next(p for p in changed["paths"] if p["id"] == "developer-quickstart")
        quickstart["description"] = "The developer path, reworded."
        await apply_manifest(admin_engine, manifest_for(thin.slug, REGION, changed))
        catalog = await asyncio.to_thread(_train, env, registry, thin.slug, "--min-decisions", "10")
        assert catalog.exit_code != 0
        assert "developer-quickstart@1 (" in catalog.output and "current version 2" in catalog.output, catalog.output
        assert reg.versions(tenant_model_name(thin.slug)) == []

        # training: each tenant reads its own decisions only
        trained = await asyncio.to_thread(_train, env, registry, good.slug, *cheap)
        assert trained.exit_code == 0, trained.output
        other = await asyncio.to_thread(_train, env, registry, noise.slug, *cheap)
        assert other.exit_code == 0, other.output
        name = tenant_model_name(good.slug)
        mv = reg.get(name, "1.0.0")
        assert mv.config["training"]["decisions"] == 300
        assert mv.config["tenant"] == {"id": str(good.id), "slug": good.slug}
        assert reg.get(tenant_model_name(noise.slug), "1.0.0").config["training"]["decisions"] == 210
        assert reg.names() == sorted(["nudge_response_predictor", "path_classifier", "stuck_detector", name,
                                      tenant_model_name(noise.slug)])  # fmt: skip
        assert (reg.stages("path_classifier"), [v.version for v in reg.versions("path_classifier")]) == demo_before

        # the report: IPS and DR with 95% intervals against the logging policy's observed rate
        report = mv.metrics["ope"]
        logged = report["logging_policy"]["value"]
        assert 0.02 < logged < 0.25  # only generic activates: about epsilon / 3 of the decisions
        for estimator in ("ips", "dr"):
            estimate = report["estimates"][estimator]
            assert estimate["level"] == 0.95 and estimate["low"] <= estimate["value"] <= estimate["high"]
        assert report["estimates"]["dr"]["low"] > logged and report["gate_passed"]
        assert report["candidate_paths"]["generic"] == report["evaluation_decisions"]
        assert "DR" in trained.output and "it passes" in trained.output

        # the gate: the noise tenant's candidate is no better than its logging policy: refused, with the report
        assert not reg.get(tenant_model_name(noise.slug), "1.0.0").metrics["ope"]["gate_passed"]
        assert (await asyncio.to_thread(_promote, env, registry, noise.slug, "1.0.0", "shadow")).exit_code == 0
        stopped = await asyncio.to_thread(_promote, env, registry, noise.slug, "1.0.0", "canary")
        assert stopped.exit_code != 0
        assert "it fails" in stopped.output and "refused" in stopped.output and "IPS" in stopped.output
        assert reg.stages(tenant_model_name(noise.slug)).canary is None
        for stage in ("shadow", "canary", "production"):
            promoted = await asyncio.to_thread(_promote, env, registry, good.slug, "1.0.0", stage)
            assert promoted.exit_code == 0, promoted.output
        assert reg.stages(name).production == "1.0.0"
        listed = await asyncio.to_thread(_invoke, "list", "--registry", str(registry))
        assert f"{name} 1.0.0    production" in listed.output, listed.output

        # serving: the tenant names its own model; its next starts are decided by it, the demo model untouched
        with pytest.raises(ValueError, match="only its own model"):
            manifest_for(noise.slug, REGION, _document({"model": name}))
        await apply_manifest(admin_engine, manifest_for(good.slug, REGION, _document({"model": name})))
        decisions = []
        for i in range(240):  # the tenant's model loads on first use (the rules decide meanwhile): up to two minutes
            r = await client.post(
                "/v1/onboarding/start",
                json={"user_id": f"new-{i}", "traits": {"persona": "developer", "use_case": "marketing",
                                                         "company_size": "11-50", "signup_source": "organic"}},
                headers=good.headers,
            )  # fmt: skip
            assert r.status_code == 201, r.text
            decisions.append(r.json())
            if r.json()["decision"]["selected_by"] == "model":
                break
            await asyncio.sleep(0.5)
        last, last_user = decisions[-1], f"new-{len(decisions) - 1}"
        assert last["decision"]["selected_by"] == "model" and last["decision"]["model"] == name, last
        assert last["path"]["id"] == "generic"
        async with admin_engine.connect() as conn:
            stored = (
                await conn.execute(
                    text("SELECT decision FROM user_progress WHERE tenant_id = :t AND user_id = :u"),
                    {"t": good.id, "u": last_user},
                )
            ).one()[0]
        # asked for the eligible paths only: the policy its off-policy report evaluated
        assert stored["candidates_evaluated"] == 3
        assert set(stored["scores"]) <= {"developer-quickstart", "marketing-campaigns", "generic"}

    # every run audited in the tenant's own log
    entries = await _model_audit(admin_engine, good)
    assert [(e["action"], e.get("stage"), e.get("refused", False)) for e in entries] == [
        ("models.train", None, True), ("models.train", None, False), ("models.promote", "shadow", False),
        ("models.promote", "canary", False), ("models.promote", "production", False),
    ]  # fmt: skip
    # the refusal too: nothing registered, the gap named, the subject the model without a version
    assert entries[0]["subject"] == f"model:{name}" and "at least 500" in entries[0]["reason"]
    assert entries[1]["actor"] == "operator:cli" and entries[1]["subject"] == f"model:{name}@1.0.0"
    assert entries[1]["decisions"] == 300 and entries[1]["gate_passed"] is True
    assert entries[1]["gate_against"] == "logging_policy" and entries[1]["current_version"] is None
    assert entries[4]["gate_threshold"] == entries[4]["logged_rate"]
    thin_refusals = [e["reason"] for e in await _model_audit(admin_engine, thin)]
    assert len(thin_refusals) == 2 and "company_size" in thin_refusals[0]
    assert "developer-quickstart@1" in thin_refusals[1]
    refusals = [e for e in await _model_audit(admin_engine, noise) if e["action"] == "models.promote"]
    assert [(e["stage"], e["refused"]) for e in refusals] == [("shadow", False), ("canary", True)]
