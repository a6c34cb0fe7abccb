"""Path experiments on the real stack: the manifest declares, the lifecycle runs, starts are allocated first by
the orchestrator, each exposure is recorded once, and a failing allocation gives control."""

from __future__ import annotations

import random
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.rows import ACTIVATED, EXPOSED, AnalyticsEvent
from firstmile.analytics.service import AnalyticsService
from firstmile.controlplane.service import apply_manifest
from firstmile.experiments import service as experiments
from firstmile.experiments.allocation import allocate
from firstmile.experiments.analysis import analyse
from firstmile.experiments.demo import DEMO_EXPERIMENT, seed_demo_results, start_demo_experiment
from firstmile.experiments.orchestrator import to_allocation
from firstmile.experiments.review import ExperimentReviewer
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.manifest import ExperimentsSpec
from firstmile.tenancy.service import TenancyError
from tests.conftest import PEPPER, REGION, TenantFixture, sequenced
from tests.factories import demo_document, manifest_for

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("operator:test-experiments")
EXPERIMENT_ID = "quickstart-vs-analytics"
VARIANTS: list[dict[str, Any]] = [{"name": "quickstart", "path": "developer-quickstart"},
                                  {"name": "analytics", "path": "product-analytics"}]  # fmt: skip
EXPERIMENT: dict[str, Any] = {
    "id": EXPERIMENT_ID,
    "control": "quickstart",
    "variants": VARIANTS,
    "targeting": [{"field": "persona", "op": "eq", "value": "developer"}],
    "traffic_percent": 100,
}  # fmt: skip


def _document(**changes: Any) -> dict[str, Any]:
    doc = demo_document()
    doc["experiments"] = {"experiments": [EXPERIMENT | changes]}
    return doc


async def _tenant(admin_engine: AsyncEngine) -> TenantFixture:
    slug = f"x-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, _document())
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


async def _start(client: Client, tenant: TenantFixture, user_id: str, persona: str = "developer") -> dict[str, Any]:
    r = await client.post("/v1/onboarding/start", headers=tenant.headers,
                          json={"user_id": user_id, "traits": {"persona": persona}})  # fmt: skip
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body


async def _rows(admin_engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with admin_engine.connect() as conn:
        return list(await conn.execute(text(sql), params))


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_running_experiment_allocates_starts_and_records_each_exposure_once(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    [(status,)] = await _rows(admin_engine, "SELECT status FROM experiments WHERE tenant_id = :t", t=tenant.id)
    assert status == "draft"
    before = await _start(client, tenant, "early-dev")  # a draft allocates no one: the planner decides
    assert before["path"]["id"] == "developer-quickstart"

    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        with pytest.raises(experiments.ExperimentError, match="only when approved"):
            await experiments.start(tx, EXPERIMENT_ID, "admin:editor", datetime.now(UTC))
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        approved = await experiments.approve(tx, EXPERIMENT_ID, "admin:owner")
        running = await experiments.start(tx, EXPERIMENT_ID, "admin:editor", datetime.now(UTC))
    assert approved.approved_by == "admin:owner" and running.status == "running"
    assert running.planned_end_at is not None and running.started_at is not None
    assert (running.planned_end_at - running.started_at).days == 14

    spec = ExperimentsSpec.model_validate({"experiments": [EXPERIMENT]}).experiments[0]
    expected = {}
    for i in range(40):
        user_id = f"dev-{i}"
        outcome = allocate(to_allocation(spec), user_id, {"persona": "developer"})
        assert outcome.allocation is not None
        expected[user_id] = outcome.allocation.variant
    paths = {"quickstart": "developer-quickstart", "analytics": "product-analytics"}
    for user_id, variant in expected.items():
        state = await _start(client, tenant, user_id)
        assert state["path"]["id"] == paths[variant], (user_id, variant)
    assert set(expected.values()) == {"quickstart", "analytics"}
    await _start(client, tenant, "mk-1", persona="marketer")  # targeting: not in the experiment
    [(planned,)] = await _rows(admin_engine, "SELECT decision FROM user_progress WHERE tenant_id = :t"
                                             " AND user_id = 'mk-1'", t=tenant.id)  # fmt: skip
    assert planned["selected_by"] != "experiment" and "experiment" not in planned

    exposures = await _rows(admin_engine, "SELECT user_id, variant, inputs FROM experiment_exposures"
                                          " WHERE tenant_id = :t ORDER BY user_id", t=tenant.id)  # fmt: skip
    assert {u: v for u, v, _ in exposures} == expected  # early-dev and the marketer: none
    assert all(inputs["hash"] == "sha256" and inputs["seed"] == EXPERIMENT_ID for _, _, inputs in exposures)
    [(decision,)] = await _rows(admin_engine, "SELECT decision FROM user_progress WHERE tenant_id = :t"
                                              " AND user_id = 'dev-0'", t=tenant.id)  # fmt: skip
    assert decision["selected_by"] == "experiment"
    assert decision["experiment"]["id"] == EXPERIMENT_ID and decision["experiment"]["variant"] == expected["dev-0"]
    events = await _rows(admin_engine, "SELECT payload FROM outbox WHERE tenant_id = :t"
                                       " AND event_type = 'experiment.exposed'", t=tenant.id)  # fmt: skip
    assert sorted(p["user_id"] for (p,) in events) == sorted(expected)

    agree = _metric("firstmile_experiment_reallocations_total", outcome="agree")
    again = await _start(client, tenant, "dev-0")  # a repeated start: the same path, no second exposure
    assert again["path"]["id"] == paths[expected["dev-0"]]
    assert _metric("firstmile_experiment_reallocations_total", outcome="agree") == agree + 1
    assert len(await _rows(admin_engine, "SELECT 1 FROM experiment_exposures WHERE tenant_id = :t",
                           t=tenant.id)) == len(expected)  # fmt: skip

    await sequenced(app_engine, tenant.id)  # the start's audit entry names the experiment and the hash inputs
    [(entry,)] = await _rows(admin_engine, "SELECT payload FROM audit_entries WHERE tenant_id = :t"
                                           " AND subject = 'dev-0' AND kind = 'decision'", t=tenant.id)  # fmt: skip
    assert entry["selected_by"] == "experiment" and entry["experiment"]["inputs"]["hash"] == "sha256"
    lifecycle = await _rows(admin_engine, "SELECT actor, payload->>'action' FROM audit_entries WHERE tenant_id = :t"
                                          " AND kind = 'experiment' ORDER BY seq", t=tenant.id)  # fmt: skip
    assert [tuple(r) for r in lifecycle] == [
        ("operator:cli", "draft"), ("admin:owner", "approved"), ("admin:editor", "running")]  # fmt: skip


async def test_a_running_experiment_keeps_its_allocation_and_a_failure_gives_control(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        await experiments.approve(tx, EXPERIMENT_ID, "admin:owner")
        await experiments.start(tx, EXPERIMENT_ID, "admin:owner", datetime.now(UTC))
    slug = tenant.manifest.tenant.slug
    moved = manifest_for(slug, REGION, _document(variants=[*VARIANTS,
                                                           {"name": "admin", "path": "workspace-admin"}]))  # fmt: skip
    with pytest.raises(TenancyError, match="its variants can no longer change"):
        await apply_manifest(admin_engine, moved)
    wider = await apply_manifest(admin_engine, manifest_for(slug, REGION, _document(traffic_percent=50)))
    assert "experiment quickstart-vs-analytics: definition updated (running)" in wider.changes

    # a definition that no longer parses: allocation fails, the start gets the planner's path, no exposure
    async with admin_engine.begin() as conn:
        await conn.execute(text("UPDATE experiments SET definition = '{\"id\": 1}'::jsonb WHERE tenant_id = :t"),
                           {"t": tenant.id})  # fmt: skip
        await conn.execute(text("UPDATE tenants SET revision = revision + 1 WHERE id = :t"), {"t": tenant.id})
    fallbacks = _metric("firstmile_experiment_allocation_fallbacks_total", error="ValidationError")
    state = await _start(client, tenant, f"dev-{secrets.token_hex(3)}")
    assert state["path"]["id"] == "developer-quickstart"  # the rules' path for a developer: control
    assert _metric("firstmile_experiment_allocation_fallbacks_total", error="ValidationError") == fallbacks + 1
    assert await _rows(admin_engine, "SELECT 1 FROM experiment_exposures WHERE tenant_id = :t", t=tenant.id) == []


def _exposures(tenant: TenantFixture, counts: dict[str, tuple[int, float]], at: datetime) -> list[AnalyticsEvent]:
    """Exposures of ``counts[variant][0]`` users per variant, of whom the share ``counts[variant][1]`` activate."""
    rng = random.Random(3)
    rows = []
    for variant, (users, rate) in counts.items():
        for i in range(users):
            user = f"{variant}-{i}"
            rows.append(AnalyticsEvent(tenant_id=tenant.id, event_id=uuid.uuid4(), event_type=EXPOSED,
                                       event_name=EXPERIMENT_ID, user_id=user, anonymous_id="", occurred_at=at,
                                       received_at=at, variant=variant))  # fmt: skip
            if rng.random() < rate:
                later = at + timedelta(hours=1)
                rows.append(AnalyticsEvent(tenant_id=tenant.id, event_id=uuid.uuid4(), event_type=ACTIVATED,
                                           event_name="", user_id=user, anonymous_id="", occurred_at=later,
                                           received_at=later))  # fmt: skip
    return rows


async def test_the_review_extends_an_experiment_without_a_winner_then_concludes_it_and_alerts_on_srm(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore
) -> None:
    flat, skewed = await _tenant(admin_engine), await _tenant(admin_engine)
    began = datetime.now(UTC) - timedelta(days=20)  # planned for 14 days: over since 6 days
    for tenant in (flat, skewed):
        async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
            await experiments.approve(tx, EXPERIMENT_ID, "admin:owner")
            await experiments.start(tx, EXPERIMENT_ID, "admin:owner", began)
    analytics_store.insert(_exposures(flat, {"quickstart": (800, 0.3), "analytics": (800, 0.3)}, began))
    analytics_store.insert(_exposures(skewed, {"quickstart": (900, 0.3), "analytics": (700, 0.3)}, began))
    reviewer = ExperimentReviewer(app_engine, AnalyticsService(analytics_store))
    assert {OPS.tenant(flat.id), OPS.tenant(skewed.id)} <= {OPS.tenant(t) for t in await reviewer.tenants()}

    async def look(tenant: TenantFixture, now: datetime) -> tuple[str, str]:
        [reviewed] = await reviewer.review_tenant(OPS.tenant(tenant.id), now)
        return reviewed.action, reviewed.verdict

    now = datetime.now(UTC)
    assert await look(flat, now) == ("extend", "no_winner_yet")  # past the end, no winner: one more week
    assert await look(flat, now) == ("continue", "no_winner_yet")  # the new end is a day away
    assert await look(flat, now + timedelta(days=8)) == ("extend", "no_winner_yet")
    assert await look(flat, now + timedelta(days=15)) == ("conclude", "no_winner_yet")  # 2 extensions: the limit
    async with tenant_transaction(app_engine, OPS.tenant(flat.id), commit=False) as tx:
        [row] = await experiments.experiments(tx)
    assert row.status == "concluded" and row.extensions == 2 and row.verdict is not None
    async with tenant_transaction(app_engine, OPS.tenant(flat.id), commit=False) as tx:
        looks = await experiments.history(tx, EXPERIMENT_ID)
    days = (now - began).days
    assert [(day, look["action"]) for day, look in looks] == [
        (days, "extend"), (days + 8, "extend"), (days + 15, "conclude")]  # fmt: skip  # the first look of a day
    assert {a["variant"] for a in looks[0][1]["arms"]} == {"quickstart", "analytics"}
    assert row.verdict["kind"] == "inconclusive"
    assert await reviewer.review_tenant(OPS.tenant(flat.id), now) == []  # concluded: allocation ended

    assert await look(skewed, now) == ("srm_alert", "srm")  # 900 vs 700 on a 50/50 split
    assert await look(skewed, now) == ("srm_alert", "srm")
    await sequenced(app_engine, skewed.id)
    alerts = await _rows(admin_engine, "SELECT payload FROM audit_entries WHERE tenant_id = :t AND kind = 'experiment'"
                                       " AND payload->>'action' = 'srm_alert'", t=skewed.id)  # fmt: skip
    assert len(alerts) == 1 and alerts[0][0]["srm"]["mismatch"] is True  # one alert a day
    async with tenant_transaction(app_engine, OPS.tenant(skewed.id), commit=False) as tx:
        [still] = await experiments.experiments(tx)
    assert still.status == "running"  # an SRM is a bug to fix: no verdict, but the experiment is not ended


async def test_make_runs_demo_experiment_starts_once_and_its_synthetic_results_give_a_verdict(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore
) -> None:
    slug = f"x-{secrets.token_hex(5)}"
    applied = await apply_manifest(admin_engine, manifest_for(slug, REGION))  # the demo manifest, no experiments
    scope = OperatorContext("operator:demo").tenant(applied.tenant_id)
    async with tenant_transaction(app_engine, scope) as tx:
        began = await start_demo_experiment(tx, datetime.now(UTC))
    assert began is not None
    async with tenant_transaction(app_engine, scope) as tx:
        assert await start_demo_experiment(tx, datetime.now(UTC)) is None  # once
        [row] = await experiments.experiments(tx)
    assert (row.id, row.status, row.started_by) == (DEMO_EXPERIMENT, "running", "operator:demo")
    assert seed_demo_results(analytics_store, applied.tenant_id, began) > 3000
    result = await analyse(AnalyticsService(analytics_store), scope, row, datetime.now(UTC))
    assert result.verdict["kind"] == "winner" and result.verdict["variant"] == "analytics", result.verdict
    assert result.srm is not None and result.srm["mismatch"] is False
