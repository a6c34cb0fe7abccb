"""The models page's API (docs/admin-ui.md#models): a tenant's own path model beside the platform's shared one,
with versions, stages, off-policy reports and history; an owner promotes a version whose report passes the gate and
rolls back, a failing one is refused with its report and nothing staged, an analyst reads but cannot stage, another
tenant's model is never shown, and every promotion is a ``model`` audit entry of the admin (real PostgreSQL, a
registry of real trained models)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.ml.planner import model_instance, tenant_model_name
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, Database, make_settings, new_tenant
from tests.integration.test_admin_access import BASE, PROBLEMS, sign_in
from tests.integration.test_tenant_models import _model_audit

Client = AsyncTestClient[Litestar]
PATHS = ("developer-quickstart", "marketing-campaigns", "generic")


def register_tenant_model(registry: Registry, slug: str, *, passing: bool, seed: int = 7) -> str:
    """Train a tenant model in process on 400 logged decisions (rules' choice 80%, two explored paths 10% each) and
    register it with its off-policy report: ``passing``, only the explored generic path activates (the candidate
    takes it: DR near 1 against a logged rate near 0.1); else a third of the users activate whatever their path
    (no better than the logging policy)."""
    import dataclasses

    from firstmile_inference.tenant import TENANT_HYPER, LoggedData, train_logged

    n = 400
    actions = np.asarray([2 if i % 10 == 9 else 1 if i % 10 == 8 else 0 for i in range(n)], dtype=np.int64)
    propensities = np.where(actions == 0, 0.8, 0.1)
    rewards = (actions == 2) if passing else (np.arange(n) % 3 == 0)
    sizes, sources = ("1-10", "11-50", "51-200"), ("organic", "referral", "paid_search")
    features = [model_instance({"persona": "developer", "use_case": "marketing", "company_size": sizes[i % 3],
                                "signup_source": sources[(i // 3) % 3]}, None) for i in range(n)]  # fmt: skip
    logged = LoggedData(features=features, actions=actions, rewards=rewards.astype(np.float64),
                        propensities=propensities.astype(np.float64), eligible=np.ones((n, 3), dtype=np.bool_),
                        paths=PATHS)  # fmt: skip
    trained = train_logged(logged, seed=seed, hyper=dataclasses.replace(TENANT_HYPER, epochs=8), threads=1)
    assert trained.metrics["ope"]["gate_passed"] is passing, trained.metrics["ope"]
    trained.config["tenant"] = {"slug": slug}
    mv = registry.register(tenant_model_name(slug), weights=trained.state_dict, config=trained.config,
                           metrics=trained.metrics, reference=trained.reference)  # fmt: skip
    return mv.version


@pytest.fixture(scope="module")
def model_registry(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the trained registry (its shared path_classifier in production)."""
    copy = tmp_path_factory.mktemp("models-admin") / "models"
    shutil.copytree(tiny_registry, copy)
    return copy


@pytest.fixture(scope="module")
async def api(database: Database, analytics_store: ChdbStore, model_registry: Path) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False, model_registry_uri=str(model_registry))
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as client:
        yield client


async def _post(api: Client, url: str, csrf: str, body: Any = None) -> Any:
    return await api.post(url, json=body, headers={"X-CSRF-Token": csrf})


async def test_an_owner_stages_a_passing_version_and_rolls_back_and_the_gate_refuses_a_failing_one(
    api: Client, admin_engine: AsyncEngine, model_registry: Path
) -> None:
    home, other = await new_tenant(admin_engine), await new_tenant(admin_engine)
    registry = Registry(model_registry)
    name = tenant_model_name(home.slug)
    good = register_tenant_model(registry, home.slug, passing=True)
    noise = register_tenant_model(registry, home.slug, passing=False)
    newer = register_tenant_model(registry, home.slug, passing=True, seed=8)
    register_tenant_model(registry, other.slug, passing=True)
    assert (good, noise, newer) == ("1.0.0", "1.1.0", "1.2.0")

    # an analyst reads: the shared model (read-only) and the tenant's own, reports and all; never another tenant's
    analyst = await sign_in(api, home.slug, "analyst")
    read = await api.get("/admin/api/models")
    assert read.status_code == 200, read.text
    body = read.json()
    assert body["tenant"] == home.slug and other.slug not in read.text
    assert body["shared"]["name"] == "path_classifier" and body["shared"]["stages"]["production"] == "1.0.0"
    own = body["own"]
    assert own["name"] == name and [v["version"] for v in own["versions"]] == ["1.2.0", "1.1.0", "1.0.0"]
    reports = {v["version"]: v["ope"] for v in own["versions"]}
    assert reports["1.0.0"]["gate_passed"] is True and reports["1.1.0"]["gate_passed"] is False
    assert reports["1.0.0"]["dr_low"] > reports["1.0.0"]["logged_rate"]
    # no own model in production yet: the bar is the logging policy's observed rate, said in words for the page
    assert reports["1.0.0"]["gate_against"] == "logging_policy" and reports["1.0.0"]["current_version"] is None
    assert reports["1.0.0"]["gate_threshold"] == reports["1.0.0"]["logged_rate"]
    assert reports["1.0.0"]["gate_bar"] == "the logged activation rate"
    assert set(reports["1.0.0"]["estimates"]) == {"ips", "snips", "dr"}
    assert "effective_sample_size" in reports["1.0.0"]["estimates"]["dr"] and "gate:" in reports["1.0.0"]["text"]
    page = await api.get("/admin/models")
    assert page.status_code == 200 and 'data-testid="promote"' not in page.text and "Passes the gate" in page.text
    refused = await _post(api, f"/admin/api/models/{good}/promote", analyst["csrf_token"], {"stage": "shadow"})
    assert refused.status_code == 403 and refused.json()["required_permission"] == "models:promote"
    assert registry.stages(name).shadow is None

    owner = await sign_in(api, home.slug, "owner")
    csrf = owner["csrf_token"]
    # bad input: a problem, nothing staged
    for url, payload, key in (
        (f"/admin/api/models/{good}/promote", {"stage": "live"}, "stage"),
        (f"/admin/api/models/{good}/promote", {"stage": "production", "weight": 0.5}, "weight"),
        (f"/admin/api/models/{good}/promote", {"stage": "canary", "weight": 1.5}, "weight"),
        ("/admin/api/models/latest/promote", {"stage": "shadow"}, "version"),
    ):
        bad = await _post(api, url, csrf, payload)
        assert bad.status_code == 400 and bad.json()["errors"][0]["key"] == key, bad.text
        assert bad.headers["content-type"].startswith("application/problem+json")
    unknown = await _post(api, f"/admin/api/models/{good}/promote", csrf, {"stage": "shadow", "extra": 1})
    assert unknown.status_code == 400
    missing = await _post(api, "/admin/api/models/9.9.9/promote", csrf, {"stage": "shadow"})
    assert missing.status_code == 404 and missing.json()["type"] == PROBLEMS + "model-version-not-found"
    out_of_order = await _post(api, f"/admin/api/models/{good}/promote", csrf, {"stage": "production"})
    assert out_of_order.status_code == 409 and out_of_order.json()["type"] == PROBLEMS + "model-stage-order"
    assert registry.stages(name).to_json() == {"production": None, "canary": None, "canary_weight": 0.0,
                                               "shadow": None}  # fmt: skip

    # the passing version: shadow, canary (20%), production
    for payload in ({"stage": "shadow"}, {"stage": "canary", "weight": 0.2}, {"stage": "production"}):
        done = await _post(api, f"/admin/api/models/{good}/promote", csrf, payload)
        assert done.status_code == 200, done.text
        if payload["stage"] == "canary":
            assert done.json()["stages"]["canary"] == good and done.json()["stages"]["canary_weight"] == 0.2
    assert registry.stages(name).production == good

    # the failing version: refused with its report, forced or not, into canary or production; nothing staged
    before = registry.stages(name)
    for payload in ({"stage": "canary", "force": True}, {"stage": "production", "force": True}):
        gate = await _post(api, f"/admin/api/models/{noise}/promote", csrf, payload)
        assert gate.status_code == 409 and gate.json()["type"] == PROBLEMS + "model-gate-failed", gate.text
        assert gate.json()["report"]["gate_passed"] is False and "it fails" in gate.json()["report"]["text"]
        assert "stays out of" in gate.json()["detail"]
    assert registry.stages(name) == before
    assert (await _post(api, f"/admin/api/models/{noise}/promote", csrf, {"stage": "shadow"})).status_code == 200

    # a newer version forced into production, then the rollback to the older one; a "rollback" forward is refused
    forced = await _post(api, f"/admin/api/models/{newer}/promote", csrf, {"stage": "production", "force": True})
    assert forced.status_code == 200 and registry.stages(name).production == newer
    forward = await _post(api, f"/admin/api/models/{newer}/rollback", csrf)
    assert forward.status_code == 409 and forward.json()["type"] == PROBLEMS + "model-not-older"
    back = await _post(api, f"/admin/api/models/{good}/rollback", csrf)
    assert back.status_code == 200, back.text
    assert registry.stages(name).production == good and registry.stages(name).shadow == noise
    history = registry.history(name)
    assert history[-1]["forced"] is True and history[-1]["to"] == good
    assert all(h["actor"] == f"admin:{owner['user']['subject']}" for h in history)
    # the other tenant's model was never touched
    assert registry.stages(tenant_model_name(other.slug)).to_json()["production"] is None
    shared = (await api.get("/admin/api/models")).json()["shared"]
    assert shared["stages"] == body["shared"]["stages"]

    entries = await _model_audit(admin_engine, home)
    assert {e["actor"] for e in entries} == {f"admin:{owner['user']['subject']}"}
    assert [(e["action"], e["version"], e["stage"], e["refused"]) for e in entries] == [
        ("models.promote", good, "shadow", False),
        ("models.promote", good, "canary", False),
        ("models.promote", good, "production", False),
        ("models.promote", noise, "canary", True),
        ("models.promote", noise, "production", True),
        ("models.promote", noise, "shadow", False),
        ("models.promote", newer, "production", False),
        ("models.rollback", good, "production", False),
    ]
    assert entries[3]["gate_passed"] is False and entries[3]["subject"] == f"model:{name}@{noise}"
    assert entries[3]["gate_against"] in ("logging_policy", "current_model") and "gate_threshold" in entries[3]
    assert await _model_audit(admin_engine, other) == []


async def test_a_tenant_without_a_model_of_its_own_sees_the_shared_one_only(
    api: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await new_tenant(admin_engine)
    owner = await sign_in(api, tenant.slug, "owner")
    body = (await api.get("/admin/api/models")).json()
    assert body["own"]["versions"] == [] and body["shared"]["versions"]
    page = await api.get("/admin/models")
    assert page.status_code == 200 and 'data-testid="own-empty"' in page.text
    refused = await _post(api, "/admin/api/models/1.0.0/promote", owner["csrf_token"], {"stage": "shadow"})
    assert refused.status_code == 404 and refused.json()["type"] == PROBLEMS + "model-version-not-found"
    viewer = await sign_in(api, tenant.slug, "viewer")
    assert viewer["roles"] == ["viewer"]
    assert (await api.get("/admin/api/models")).status_code == 403
