"""Issue 19's "done means", end to end (docs/models.md#the-automatic-switch): a second tenant with its own path
catalog, on ``planner: {model: own, exploration, training: {auto_promote: true}}``, gets simulated users through
``POST /v1/onboarding/start`` on a real app; the rules and exploration choose, each user's activation is drawn from
the simulator's exact probability for the path the platform chose; the scheduler's ``tenant-model-training`` pass
trains the tenant's own model, the off-policy gate passes and the candidate is promoted by itself; the tenant's next
starts are decided by ``tenant-<slug>.path_classifier`` while the demo tenant keeps ``path_classifier``, and its
choices give fresh simulated users a higher expected activation (the simulator's ground truth) than the rules'. Then
the gate against the current model stops an equal candidate (audited, nothing promoted, the model keeps serving), and
a catalog change sends the tenant back to its rules (``catalog_changed``)."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.inference import InProcessClient
from firstmile.ml.planner import AdaptivePlanner, tenant_model_name
from firstmile.ml.tenant_training import TenantTrainer, TrainingRun
from firstmile.onboarding.catalog import catalog_fingerprint
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import plan
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.manifest import TenantManifest
from firstmile_inference.registry import Registry
from firstmile_inference.simulate import Catalog, Dataset, PathSpec, StepSpec, generate
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings
from tests.integration.test_adaptive_planner import adaptive_tenant, registry, running
from tests.integration.test_models_cli import _invoke
from tests.integration.test_tenant_models import _model_audit

__all__ = ["registry"]

Client = AsyncTestClient[Litestar]
EPSILON = 0.3
LOGGED_USERS = 1_200  # the log the tenant's model learns from (about 4 eligible-path choices' worth each)
FRESH_USERS = 300  # after the switch: the model's choices against the rules' on users it never saw
SEED = 19  # the simulated population, the planner's exploration draws and the activation draws

# ---------------------------------------------------------------- the tenant's own catalog, and the world behind it
# Its targeting says: developers get the SDK, reporting-minded users the report builder, larger companies the team
# invitation, everyone else the tour. The world (the simulator's fits) says the company size decides: the SDK works
# at small companies, the report builder at mid-sized ones, the team invitation at the largest; so the rules' choice
# is the best one for about half of the users, and far from it for most of the rest.
TARGETING: dict[str, tuple[int, list[dict[str, Any]]]] = {
    "sdk-setup": (30, [{"field": "persona", "op": "eq", "value": "developer"}]),
    "report-builder": (
        20, [{"field": "use_case", "op": "in", "value": ["reporting", "product_analytics", "customer_success"]}],
    ),
    "team-invite": (10, [{"field": "company_size", "op": "in", "value": ["51-200", "201-1000", "1001+"]}]),
    "tour": (0, []),
}  # fmt: skip
STEPS = ("welcome", "first-win", "go-deeper", "share")  # each path's four steps; the second one activates


def _sizes(*shifts: float) -> dict[str, float]:
    return dict(zip(("1-10", "11-50", "51-200", "201-1000", "1001+"), shifts, strict=True))


def _steps() -> tuple[StepSpec, ...]:
    return tuple(StepSpec(step, difficulty) for step, difficulty in zip(STEPS, (-0.5, -1.0, 0.5, 0.5), strict=True))


WORLD = Catalog(
    paths=(
        PathSpec("sdk-setup", _steps(), 1, persona={"developer": 0.5}, company_size=_sizes(3.5, 3.0, -3.0, -3.5, -3.5)),
        PathSpec("report-builder", _steps(), 1, persona={"analyst": 0.5}, use_case={"reporting": 0.3},
                 company_size=_sizes(-3.5, -3.0, 3.0, 3.5, -3.0)),
        PathSpec("team-invite", _steps(), 1, persona={"admin": 0.5}, company_size=_sizes(-3.5, -3.5, -3.0, -2.5, 3.5)),
        PathSpec("tour", _steps(), 1, base=-1.0, persona={"marketer": 0.3, "product_manager": 0.3}),
    ),
    default="tour",
)  # fmt: skip


def _path(key: str, *, description: str = "") -> dict[str, Any]:
    priority, targeting = TARGETING[key]
    return {
        "id": key, "name": key.replace("-", " ").title(), "description": description, "priority": priority,
        "targeting": targeting, "activation_step": STEPS[1],
        "steps": [{"id": s, "title": s.replace("-", " ").title(), "completion": {"event": f"{key} {s}"}}
                  for s in STEPS],
    }  # fmt: skip


def _manifest(slug: str, planner: dict[str, Any], *, tour: str = "") -> TenantManifest:
    return TenantManifest.model_validate({
        "tenant": {"slug": slug, "name": f"Tenant {slug}", "home_region": REGION},
        "default_path": "tour",
        "paths": [_path(key, description=tour if key == "tour" else "") for key in TARGETING],
        "planner": planner,
    })  # fmt: skip


OWN = {"model": "own", "exploration": {"epsilon": EPSILON}, "training": {"auto_promote": True}}
RULE_PATHS = [PathDef.from_definition(k, 1, _path(k)) for k in TARGETING]


def _rules(traits: Mapping[str, Any]) -> str:
    """The tenant's targeting rules, as the platform applies them (the baseline the model must beat)."""
    return plan(RULE_PATHS, "tour", traits).path_key


async def _tenant(admin_engine: AsyncEngine, planner: dict[str, Any]) -> TenantFixture:
    slug = f"t-{secrets.token_hex(5)}"
    manifest = _manifest(slug, planner)
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


def _users(n: int, seed: int) -> Dataset:
    """``n`` users drawn from the simulator's user model (persona, use case, company size, signup source, and the
    latents behind their exact activation probability on each of the tenant's paths)."""
    return generate(n, seed=seed, catalog=WORLD, exploration=0.0, rules_policy=_rules)


def _traits(users: Dataset, i: int) -> dict[str, Any]:
    return {
        "persona": str(users.persona[i]),
        "use_case": str(users.use_case[i]),
        "company_size": str(users.company_size[i]),
        "signup_source": str(users.signup_source[i]),
    }


async def _start(client: Client, tenant: TenantFixture, user_id: str, traits: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/onboarding/start", json={"user_id": user_id, "traits": traits}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def _stored(admin_engine: AsyncEngine, tenant: TenantFixture, prefix: str) -> dict[str, dict[str, Any]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT user_id, decision FROM user_progress WHERE tenant_id = :t AND user_id LIKE :p"),
            {"t": tenant.id, "p": f"{prefix}%"},
        )
        return {r[0]: r[1] for r in rows}


async def _age(admin_engine: AsyncEngine, tenant: TenantFixture, activated: list[str]) -> None:
    """Time travel: the decisions started 30 days ago (past the 14-day horizon); ``activated`` activated a day later."""
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_progress SET started_at = now() - interval '30 days',"
                " activated_at = CASE WHEN user_id = ANY(:ids) THEN now() - interval '29 days' END"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant.id, "ids": activated},
        )


def _mine(runs: list[TrainingRun], *slugs: str) -> dict[str, TrainingRun]:
    return {r.slug: r for r in runs if r.slug in slugs}


async def test_a_tenant_with_its_own_catalog_switches_to_its_own_model_by_the_documented_rule(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    reg = Registry(registry)
    demo = await adaptive_tenant(admin_engine)  # the demo's catalog, on the platform's path_classifier
    acme = await _tenant(admin_engine, OWN)
    thin = await _tenant(admin_engine, OWN)  # too few decisions: refused, so nothing to promote
    name = tenant_model_name(acme.slug)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    logged = _users(LOGGED_USERS, SEED)
    draws = np.random.default_rng(SEED).random(LOGGED_USERS)  # each logged user's activation draw
    keys = WORLD.keys
    async for client in running(app):
        container = app.state.container
        planner = container.onboarding.planner
        assert isinstance(planner, AdaptivePlanner)
        planner.rng = random.Random(SEED)  # the exploration draws, in the order of the (sequential) starts

        # 1. on the rules with exploration: no own model yet, so the rules decide (and say why)
        activated: list[str] = []
        reasons: dict[str | None, int] = {}
        for i in range(LOGGED_USERS):
            body = await _start(client, acme, f"log-{i:04d}", _traits(logged, i))
            decision, path = body["decision"], body["path"]["id"]
            assert decision["selected_by"] in ("rules", "default", "exploration"), decision
            reasons[decision["fallback_reason"]] = reasons.get(decision["fallback_reason"], 0) + 1
            if draws[i] < logged.expected[i, keys.index(path)]:  # the simulator's probability for this path
                activated.append(f"log-{i:04d}")
        # the first start may come before the model's stages are read (not_deployed); then no_own_model
        assert set(reasons) <= {"no_own_model", "not_deployed"}, reasons
        assert reasons["no_own_model"] >= LOGGED_USERS - 50, reasons
        stored = await _stored(admin_engine, acme, "log-")
        propensities = [d["propensity"] for d in stored.values()]
        assert len(propensities) == LOGGED_USERS and all(0.0 < p <= 1.0 for p in propensities)
        assert any(p < 0.5 for p in propensities)  # explored decisions: epsilon / K
        assert all(d["model"] == name for d in stored.values())  # planner.model: own names the tenant's model
        for i in range(30):
            await _start(client, thin, f"thin-{i}", _traits(logged, i))
        await _age(admin_engine, acme, activated)
        await _age(admin_engine, thin, [])

        # 2. the scheduler's pass: trained, the gate passes, promoted by itself (and nothing for the thin tenant)
        trainer = TenantTrainer(database.admin_url, reg)  # the documented minimums: 500 decisions, 50 per path
        now = datetime.now(UTC)
        runs = _mine(await trainer.run_once(now), acme.slug, thin.slug)
        assert runs[acme.slug].outcome == "registered" and runs[acme.slug].promoted, runs
        assert runs[thin.slug].outcome == "refused" and not runs[thin.slug].promoted, runs
        assert reg.stages(name).production == "1.0.0"
        assert reg.stages(tenant_model_name(thin.slug)).production is None
        assert reg.stages("path_classifier").production == "1.0.0"  # the platform's model untouched
        version = reg.get(name, "1.0.0")
        report = version.metrics["ope"]
        assert report["gate_passed"] and report["gate_against"] == "logging_policy" and report["current_model"] is None
        assert report["estimates"]["dr"]["low"] > report["logging_policy"]["value"]
        assert version.config["catalog"] == dict.fromkeys(TARGETING, 1)
        assert version.config["training"]["decisions"] == LOGGED_USERS
        entries = await _model_audit(admin_engine, acme)
        assert [e["action"] for e in entries] == ["models.train", "models.promote"]
        promoted = entries[1]
        assert promoted["actor"] == "worker:tenant-model-training" and promoted["subject"] == f"model:{name}@1.0.0"
        assert (promoted["auto"], promoted["stage"], promoted["refused"], promoted["gate_passed"]) == (
            True, "production", False, True,
        )  # fmt: skip
        assert promoted["dr_low"] == report["estimates"]["dr"]["low"]
        assert promoted["logged_rate"] == report["logging_policy"]["value"]
        assert promoted["gate_against"] == "logging_policy" and promoted["previous"] is None
        assert [e["action"] for e in await _model_audit(admin_engine, thin)] == ["models.train"]

        # 3. the switch: the next starts are decided by the tenant's model (the process reads the new stage and
        # loads the model; until then the rules decide), the demo tenant keeps the platform's model
        inference = container.inference.client
        assert isinstance(inference, InProcessClient)
        assert await asyncio.to_thread(inference.warm, [name], wait_s=60)
        fresh = _users(FRESH_USERS, SEED + 1)
        model_value, rules_value = [], []
        for i in range(FRESH_USERS):
            body = await _start(client, acme, f"fresh-{i:04d}", _traits(fresh, i))
            assert body["decision"]["selected_by"] in ("model", "exploration", "rules"), body["decision"]
        decided = 0
        for user, decision in (await _stored(admin_engine, acme, "fresh-")).items():
            assert decision["model"] == name
            if decision["fallback_reason"] is not None:  # a busy machine's rare timeout: the rules decided that one
                continue
            decided += 1
            assert decision["model_version"] == "1.0.0" and decision["selected_by"] in ("model", "exploration")
            i = int(user.removeprefix("fresh-"))
            chosen = decision["exploration"]["greedy"]  # the model's choice (exploration may have taken another)
            model_value.append(fresh.expected[i, keys.index(chosen)])
            rules_value.append(fresh.expected[i, keys.index(_rules(_traits(fresh, i)))])
        assert decided >= 0.95 * FRESH_USERS
        # ground truth: the simulator's expected activation of each user on the path chosen
        assert np.mean(model_value) > np.mean(rules_value) + 0.1, (np.mean(model_value), np.mean(rules_value))
        for i in range(3):
            body = await _start(client, demo, f"demo-{i}", {"persona": "analyst", "company_size": "11-50"})
            assert (body["decision"]["selected_by"], body["decision"]["model"]) == ("model", "path_classifier")

        # 4. the gate against the current model: retrained on the same decisions, the candidate equals the model
        # serving, so its lower bound cannot beat that model's estimate: audited, nothing promoted
        again = _mine(await trainer.run_once(now + timedelta(days=8)), acme.slug)[acme.slug]
        assert (again.trigger, again.outcome, again.promoted) == ("schedule", "registered", False)
        assert again.version is not None and again.version != "1.0.0"
        second = reg.get(name, again.version).metrics["ope"]
        assert second["current_model"]["version"] == "1.0.0" and second["gate_against"] == "current_model"
        assert second["gate_threshold"] == second["current_model"]["dr"]["value"] > second["logging_policy"]["value"]
        assert not second["gate_passed"]
        assert reg.stages(name).production == "1.0.0"
        refusal = (await _model_audit(admin_engine, acme))[-1]
        assert (refusal["action"], refusal["version"], refusal["auto"], refusal["refused"]) == (
            "models.promote", again.version, True, True,
        )  # fmt: skip
        assert refusal["gate_against"] == "current_model" and refusal["current_version"] == "1.0.0"
        body = await _start(client, acme, "after-refusal", _traits(fresh, 0))
        assert body["decision"]["model_version"] == "1.0.0" and body["decision"]["fallback_reason"] is None

        # 5. a catalog change (the tour reworded: a new version of it): the model was trained on another catalog,
        # so the rules decide until a model of this catalog is trained
        changed = _manifest(acme.slug, OWN, tour="A shorter tour.")
        await apply_manifest(admin_engine, changed)
        body = await _start(client, acme, "after-change", {"persona": "developer", "company_size": "1001+"})
        decision = body["decision"]
        assert decision["selected_by"] in ("rules", "exploration") and decision["fallback_reason"] == "catalog_changed"
        stored_change = (await _stored(admin_engine, acme, "after-change"))["after-change"]
        current = catalog_fingerprint({key: 2 if key == "tour" else 1 for key in TARGETING})
        assert stored_change["catalog"] == {
            "model_version": "1.0.0", "trained_on": catalog_fingerprint(version.config["catalog"]), "current": current,
        }  # fmt: skip
    listed = await asyncio.to_thread(_invoke, "list", "--registry", str(registry))
    assert f"catalog={catalog_fingerprint(version.config['catalog'])}" in listed.output, listed.output
