"""The admin UI without Keycloak: bootstrap links, sessions, role-based access on every admin
endpoint, CSRF, cookies and tenant isolation (real PostgreSQL; sessions in-process).

Bootstrap links give a session of any role cheaply, so the whole permission matrix runs here;
the SSO login that gives the same sessions is tested against Keycloak in test_admin_login.py.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.api import AdminApiController
from firstmile.admin.experiments_api import ExperimentsAdminController
from firstmile.admin.models_api import ModelsAdminController
from firstmile.admin.rbac import GRANTS, Permission
from firstmile.admin.service import AdminAuth, bootstrap_key, mint_bootstrap_token
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.rows import ACTIVATED, EXPOSED, AnalyticsEvent
from firstmile.analytics.service import AnalyticsService
from firstmile.app import create_app
from firstmile.experiments import service as experiments
from firstmile.experiments.review import ExperimentReviewer
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import NudgeExecutor
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant, sequenced

Client = AsyncTestClient[Litestar]
BASE = "http://testserver.local"
PROBLEMS = "https://firstmile.dev/problems/"


@pytest.fixture(scope="module")
async def admin_app(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
        yield api


@pytest.fixture(scope="module")
async def home(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine)


@pytest.fixture(scope="module")
async def other(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine)


def _fact(tenant: uuid.UUID, kind: str, user: str, at: datetime, **fields: str) -> AnalyticsEvent:
    return AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=kind, event_name=fields.get("name", ""),
                          user_id=user, anonymous_id="", occurred_at=at, received_at=at,
                          variant=fields.get("variant", ""))  # fmt: skip


def _auth(api: Client) -> AdminAuth:
    auth: AdminAuth = api.app.state.container.admin_auth
    return auth


async def sign_in(api: Client, slug: str, role: str) -> dict[str, Any]:
    """A fresh session (cookie jar cleared) through a bootstrap link; /admin/api/me of it."""
    api.cookies.clear()
    token = _auth(api).bootstrap_token(slug, role)
    page = await api.get("/admin/bootstrap", params={"token": token})
    assert page.status_code == 200 and f"as <strong>{role}</strong>" in page.text
    redeemed = await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert redeemed.status_code == 303, redeemed.text
    me = await api.get("/admin/api/me")
    assert me.status_code == 200, me.text
    body: dict[str, Any] = me.json()
    return body


async def audit_kinds(admin_engine: AsyncEngine, tenant: TenantFixture, kind_prefix: str) -> list[tuple[str, Any]]:
    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind, payload FROM audit_entries WHERE tenant_id = :t AND kind LIKE :k ORDER BY seq"),
            {"t": tenant.id, "k": kind_prefix + "%"},
        )
        return [(r[0], r[1]) for r in rows]


async def test_a_bootstrap_link_opens_one_session_once_and_is_audited(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    me = await sign_in(admin_app, home.slug, "owner")
    assert me["tenant"]["slug"] == home.slug and me["roles"] == ["owner"] and me["origin"] == "bootstrap"
    assert (await admin_app.get("/admin/api/me")).headers["cache-control"] == "no-store"  # it holds the CSRF token
    assert set(me["permissions"]) == {str(p) for p in Permission}
    token = _auth(admin_app).bootstrap_token(home.slug, "viewer")
    first = await admin_app.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert first.status_code == 303
    again = await admin_app.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert again.status_code == 400 and again.json()["reason"] == "replayed_bootstrap_link"
    assert again.headers["content-type"].startswith("application/problem+json")
    kinds = [k for k, _ in await audit_kinds(admin_engine, home, "admin.login")]
    assert "admin.login" in kinds and "admin.login_failed" in kinds


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB"), "bad_bootstrap_link"),
        (lambda t: "not-a-token", "bad_bootstrap_link"),
    ],
)
async def test_a_forged_bootstrap_link_is_refused(
    admin_app: Client, home: TenantFixture, mutate: Any, reason: str
) -> None:
    token = mutate(_auth(admin_app).bootstrap_token(home.slug, "owner"))
    response = await admin_app.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert response.status_code == 400 and response.json()["reason"] == reason
    assert "set-cookie" not in response.headers


async def test_an_expired_or_foreign_bootstrap_link_is_refused(admin_app: Client, home: TenantFixture) -> None:
    expired = mint_bootstrap_token(bootstrap_key(PEPPER), home.slug, "owner", ttl=-1)
    response = await admin_app.post("/admin/bootstrap/redeem", data={"token": expired})
    assert response.status_code == 400 and response.json()["reason"] == "expired_bootstrap_link"
    foreign = mint_bootstrap_token(bootstrap_key(b"another-installation-pepper"), home.slug, "owner", ttl=60)
    response = await admin_app.post("/admin/bootstrap/redeem", data={"token": foreign})
    assert response.status_code == 400 and response.json()["reason"] == "bad_bootstrap_link"
    unknown = _auth(admin_app).bootstrap_token("t-nobody-here", "owner")
    response = await admin_app.post("/admin/bootstrap/redeem", data={"token": unknown})
    assert response.status_code == 404


def test_every_admin_api_handler_declares_a_permission() -> None:
    controllers = (AdminApiController, ExperimentsAdminController, ModelsAdminController)
    handlers = [getattr(c, name) for c in controllers for name in dir(c)]
    routes = [h for h in handlers if hasattr(h, "opt") and hasattr(h, "http_methods")]
    assert len(routes) >= 11
    for handler in routes:
        declared = handler.opt.get("permission")
        assert declared == "session" or declared in set(Permission), handler


async def _call(api: Client, method: str, url: str, csrf: str, body: Any = None) -> httpx.Response:
    return await api.request(method, url, json=body, headers={"X-CSRF-Token": csrf})


# Each endpoint with the answer its handler gives when the role may call it: 200 for the lists, and the
# handler's own 404 problem for the made-up user and path. Litestar's routing 404 (.../problems/not-found,
# a misspelt or removed route) is neither, so it cannot pass for "allowed".
ENDPOINTS: list[tuple[str, str, Permission, Any, int, str | None]] = [
    ("GET", "/admin/api/paths", Permission.PATHS_READ, None, 200, None),
    ("GET", "/admin/api/audit", Permission.AUDIT_READ, None, 200, None),
    ("GET", "/admin/api/users/nobody/export", Permission.USERS_EXPORT, None, 404, "user-not-found"),
    ("DELETE", "/admin/api/users/nobody", Permission.USERS_ERASE, None, 404, "user-not-found"),
    ("PATCH", "/admin/api/paths/no-such-path", Permission.PATHS_WRITE, {"name": "x"}, 404, "path-not-found"),
    ("GET", "/admin/api/experiments", Permission.EXPERIMENTS_READ, None, 200, None),
    ("POST", "/admin/api/experiments", Permission.EXPERIMENTS_WRITE, {}, 400, "validation-error"),
    *[(method, f"/admin/api/experiments/no-such-one{tail}", permission, None, 404, "experiment-not-found")
      for method, tail, permission in [
          ("POST", "/start", Permission.EXPERIMENTS_WRITE), ("POST", "/stop", Permission.EXPERIMENTS_WRITE),
          ("POST", "/approve", Permission.EXPERIMENTS_APPROVE), ("GET", "/results", Permission.EXPERIMENTS_READ),
          ("POST", "/declare", Permission.EXPERIMENTS_WRITE), ("POST", "/promote", Permission.EXPERIMENTS_APPROVE)]],
    ("GET", "/admin/api/reviews", Permission.REVIEWS_READ, None, 200, None),
    ("GET", "/admin/api/reviews/999999", Permission.REVIEWS_READ, None, 404, "review-not-found"),
    ("POST", "/admin/api/reviews/999999/decide", Permission.REVIEWS_DECIDE, {"decision": "approve"}, 404,
     "review-not-found"),
    ("GET", "/admin/api/overrides", Permission.REVIEWS_READ, None, 200, None),
    ("POST", "/admin/api/overrides/999999/revoke", Permission.OVERRIDES_MANAGE, None, 404, "override-not-found"),
    ("GET", "/admin/api/models", Permission.MODELS_READ, None, 200, None),
    ("POST", "/admin/api/models/9.9.9/promote", Permission.MODELS_PROMOTE, {"stage": "shadow"}, 404,
     "model-version-not-found"),
    ("POST", "/admin/api/models/9.9.9/rollback", Permission.MODELS_PROMOTE, None, 404, "model-version-not-found"),
]  # fmt: skip


@pytest.mark.parametrize("role", ["viewer", "analyst", "editor", "owner"])
async def test_each_role_reaches_exactly_its_permissions(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine, role: str
) -> None:
    me = await sign_in(admin_app, home.slug, role)
    assert set(me["permissions"]) == {str(p) for p in GRANTS[role]}
    denied_before = len(await audit_kinds(admin_engine, home, "admin.forbidden"))
    denied = 0
    for method, url, permission, body, status, problem in ENDPOINTS:
        response = await _call(admin_app, method, url, me["csrf_token"], body)
        answer = (role, method, url, response.status_code, response.text)
        if permission in GRANTS[role]:
            # allowed: the handler itself answered
            assert response.status_code == status, answer
            if problem is not None:
                assert response.json()["type"] == PROBLEMS + problem, answer
        else:
            # refused by the permission guard (not by CSRF, not by routing)
            assert response.status_code == 403, answer
            assert response.json()["required_permission"] == str(permission), answer
            denied += 1
    assert len(await audit_kinds(admin_engine, home, "admin.forbidden")) == denied_before + denied


async def test_an_analyst_cannot_edit_paths_and_a_viewer_cannot_export(admin_app: Client, home: TenantFixture) -> None:
    analyst = await sign_in(admin_app, home.slug, "analyst")
    paths = (await admin_app.get("/admin/api/paths")).json()
    key = paths[0]["key"]
    refused = await admin_app.patch(
        f"/admin/api/paths/{key}", json={"name": "Analyst was here"}, headers={"X-CSRF-Token": analyst["csrf_token"]}
    )
    assert refused.status_code == 403 and refused.json()["required_permission"] == "paths:write"
    assert (await admin_app.get("/admin/api/paths")).json() == paths  # nothing changed
    viewer = await sign_in(admin_app, home.slug, "viewer")
    assert viewer["roles"] == ["viewer"]
    export = await admin_app.get("/admin/api/users/u1/export")
    assert export.status_code == 403 and export.json()["required_permission"] == "users:export"


async def test_an_editor_edits_a_path_as_a_new_version_with_csrf_only(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    editor = await sign_in(admin_app, home.slug, "editor")
    before = {p["key"]: p for p in (await admin_app.get("/admin/api/paths")).json()}
    key = sorted(before)[0]
    no_token = await admin_app.patch(f"/admin/api/paths/{key}", json={"name": "Renamed"})
    wrong_token = await admin_app.patch(
        f"/admin/api/paths/{key}", json={"name": "Renamed"}, headers={"X-CSRF-Token": "guess"}
    )
    foreign = await admin_app.patch(
        f"/admin/api/paths/{key}",
        json={"name": "Renamed"},
        headers={"X-CSRF-Token": editor["csrf_token"], "Origin": "https://evil.example"},
    )
    for refused in (no_token, wrong_token, foreign):
        assert refused.status_code == 403 and refused.json()["type"].endswith("/csrf-failed"), refused.text
    assert {p["key"]: p for p in (await admin_app.get("/admin/api/paths")).json()} == before
    reasons = [p["reason"] for _, p in await audit_kinds(admin_engine, home, "admin.csrf_refused")]
    assert reasons[-3:] == ["missing_or_wrong_token", "missing_or_wrong_token", "foreign_origin"]

    bad = await admin_app.patch(
        f"/admin/api/paths/{key}", json={"priority": -4}, headers={"X-CSRF-Token": editor["csrf_token"]}
    )
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
    unknown_field = await admin_app.patch(
        f"/admin/api/paths/{key}", json={"steps": []}, headers={"X-CSRF-Token": editor["csrf_token"]}
    )
    assert unknown_field.status_code == 400
    coerced = await admin_app.patch(
        f"/admin/api/paths/{key}", json={"priority": "5"}, headers={"X-CSRF-Token": editor["csrf_token"]}
    )
    assert coerced.status_code == 400 and coerced.json()["errors"][0]["key"] == "priority", coerced.text

    done = await admin_app.patch(
        f"/admin/api/paths/{key}",
        json={"name": "Renamed by an editor"},
        headers={"X-CSRF-Token": editor["csrf_token"], "Origin": BASE},
    )
    assert done.status_code == 200, done.text
    assert done.json()["version"] == before[key]["version"] + 1 and done.json()["name"] == "Renamed by an editor"
    assert all(p["matches_manifest"] for p in before.values())
    after = {p["key"]: p for p in (await admin_app.get("/admin/api/paths")).json()}
    assert not after[key]["matches_manifest"]  # the manifest still says otherwise: shown as an edit
    assert all(p["matches_manifest"] for k, p in after.items() if k != key)
    page = await admin_app.get("/admin/")
    assert f'data-testid="edited-{key}"' in page.text and page.text.count('data-testid="edited-') == 1
    edits = await audit_kinds(admin_engine, home, "path.edit")
    assert edits[-1][1]["after"] == {"name": "Renamed by an editor"}
    assert edits[-1][1]["before"] == {"name": before[key]["name"]}


async def test_a_session_sees_only_its_own_tenant(admin_app: Client, home: TenantFixture, other: TenantFixture) -> None:
    me = await sign_in(admin_app, other.slug, "editor")
    renamed = await admin_app.patch(
        "/admin/api/paths/" + (await admin_app.get("/admin/api/paths")).json()[0]["key"],
        json={"name": "Only in other"},
        headers={"X-CSRF-Token": me["csrf_token"]},
    )
    assert renamed.status_code == 200
    await sign_in(admin_app, home.slug, "owner")
    names = [p["name"] for p in (await admin_app.get("/admin/api/paths")).json()]
    assert "Only in other" not in names
    audit = (await admin_app.get("/admin/api/audit", params={"limit": 500})).json()
    assert all("Only in other" not in str(entry["payload"]) for entry in audit)
    assert (await admin_app.get("/admin/api/me")).json()["tenant"]["slug"] == home.slug


async def test_logout_ends_the_session_and_needs_the_form_token(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    me = await sign_in(admin_app, home.slug, "viewer")
    refused = await admin_app.post("/admin/logout", data={"csrf_token": "nope"}, follow_redirects=False)
    assert refused.status_code == 403
    assert (await admin_app.get("/admin/api/me")).status_code == 200
    out = await admin_app.post("/admin/logout", data={"csrf_token": me["csrf_token"]}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/admin/logged-out"
    gone = await admin_app.get("/admin/api/me")
    assert gone.status_code == 401 and gone.headers["content-type"].startswith("application/problem+json")
    page = await admin_app.get("/admin/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/admin/signin"
    logouts = await audit_kinds(admin_engine, home, "admin.logout")
    assert logouts[-1][1]["how"] == "user"


async def test_the_dashboard_shows_the_tenant_role_and_region_under_a_strict_policy(
    admin_app: Client, home: TenantFixture
) -> None:
    await sign_in(admin_app, home.slug, "analyst")
    page = await admin_app.get("/admin/")
    assert page.status_code == 200
    assert f'data-testid="tenant">{home.slug}<' in page.text and 'data-testid="roles">analyst<' in page.text
    assert 'data-testid="region">eu-west-1<' in page.text
    assert 'class="edit-path' not in page.text  # an analyst gets no edit form
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text  # no inline script: the CSP would block it


async def test_without_keycloak_the_sso_login_is_not_offered(admin_app: Client, home: TenantFixture) -> None:
    response = await admin_app.get("/admin/login", params={"tenant": home.slug}, follow_redirects=False)
    assert response.status_code == 404 and response.json()["type"].endswith("/sso-not-configured")
    signin = await admin_app.get("/admin/signin")
    assert 'data-testid="embedded-signin"' in signin.text


async def test_admin_routes_do_not_take_api_keys(admin_app: Client, home: TenantFixture) -> None:
    admin_app.cookies.clear()
    response = await admin_app.get("/admin/api/me", headers=home.headers)
    assert response.status_code == 401


async def test_secure_cookies_are_host_prefixed_http_only_and_lax(
    database: Database, analytics_store: ChdbStore, home: TenantFixture
) -> None:
    app = create_app(make_settings(public_url=BASE), database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
        token = _auth(api).bootstrap_token(home.slug, "viewer")
        response = await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-fm_admin=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "path", "samesite"} <= attributes and "domain" not in attributes
    assert "samesite=lax" in cookie.lower()


async def test_a_tenant_homed_in_another_region_signs_in_there(admin_app: Client, admin_engine: AsyncEngine) -> None:
    abroad = await new_tenant(admin_engine, region="us-east-1")
    token = _auth(admin_app).bootstrap_token(abroad.slug, "owner")
    response = await admin_app.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert response.status_code == 421 and response.json()["home_region"] == "us-east-1"
    assert "set-cookie" not in response.headers


async def test_the_audit_page_shows_logins_to_analysts_and_is_refused_to_viewers(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    await sign_in(admin_app, home.slug, "analyst")
    page = await admin_app.get("/admin/audit", params={"kind": "admin.login"})
    assert page.status_code == 200
    kinds = set(re.findall(r'<tr data-kind="([^"]+)"', page.text))
    assert kinds == {"admin.login"}
    assert 'data-testid="audit-link"' in (await admin_app.get("/admin/")).text
    assert (await admin_app.get("/admin/audit", params={"kind": "<script>"})).status_code == 400
    await sign_in(admin_app, home.slug, "viewer")
    assert 'data-testid="audit-link"' not in (await admin_app.get("/admin/")).text
    refused = await admin_app.get("/admin/audit")
    assert refused.status_code == 403 and refused.json()["required_permission"] == "audit:read"
    forbidden = await audit_kinds(admin_engine, home, "admin.forbidden")
    assert forbidden[-1][1]["permission"] == "audit:read"


async def test_the_nudge_page_shows_a_users_decisions_and_previews_the_wordings_to_analysts(
    admin_app: Client, home: TenantFixture, app_engine: AsyncEngine
) -> None:
    user_id = f"nl-{uuid.uuid4().hex[:8]}"
    started = await admin_app.post(
        "/v1/onboarding/start", json={"user_id": user_id, "traits": {"persona": "developer"}}, headers=home.headers
    )
    assert started.status_code == 201, started.text
    anytime = NudgePolicy(quiet_start=None, quiet_end=None)
    executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email", "in_app"], anytime, ThompsonSampler())
    async with tenant_transaction(app_engine, OperatorContext("worker:test-admin").tenant(home.id)) as tx:
        decided = await executor.on_stuck(tx, user_id, "create-api-key", datetime.now(UTC))
    assert decided.status == "scheduled" and decided.arm is not None
    await sign_in(admin_app, home.slug, "analyst")
    assert 'data-testid="nudges-link"' in (await admin_app.get("/admin/")).text
    page = await admin_app.get("/admin/nudges", params={"user": user_id, "persona": "developer", "locale": "de"})
    assert page.status_code == 200, page.text
    assert re.findall(r'<tr data-status="([^"]+)"', page.text) == ["scheduled"]
    assert decided.arm.split("|")[1] + " · " + decided.arm in page.text  # channel and arm
    assert "email: allowed" in page.text and "stuck:create-api-key" in page.text
    # the preview: the manifest's developer wording in German, rendered with the tenant's name
    assert "zwei Minuten, dann sind Sie live" in page.text and f"Tenant {home.slug}" in page.text
    assert (await admin_app.get("/admin/nudges", params={"locale": "<b>"})).status_code == 400
    empty = await admin_app.get("/admin/nudges", params={"user": "nobody-here"})
    assert 'data-testid="nudge-log-empty"' in empty.text
    await sign_in(admin_app, home.slug, "viewer")
    refused = await admin_app.get("/admin/nudges", params={"user": user_id})
    assert refused.status_code == 403 and refused.json()["required_permission"] == "audit:read"


async def test_an_editor_drafts_and_starts_an_experiment_that_only_an_owner_approves(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    experiment = {"id": f"exp-{uuid.uuid4().hex[:8]}", "control": "quickstart",
                  "variants": [{"name": "quickstart", "path": "developer-quickstart"},
                               {"name": "analytics", "path": "product-analytics"}]}  # fmt: skip
    editor = await sign_in(admin_app, home.slug, "editor")
    ghost = experiment | {"variants": [experiment["variants"][0], {"name": "ghost", "path": "no-such-path"}]}
    refused = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], ghost)
    assert refused.status_code == 400 and "no-such-path" in refused.json()["detail"], refused.text
    bad = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"],
                      experiment | {"traffic_percent": 150})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["errors"][0]["key"] == "traffic_percent"
    drafted = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], experiment)
    assert drafted.status_code == 201 and drafted.json()["status"] == "draft", drafted.text
    base = f"/admin/api/experiments/{experiment['id']}"
    early = await _call(admin_app, "POST", f"{base}/start", editor["csrf_token"])
    assert early.status_code == 409 and early.json()["type"] == PROBLEMS + "experiment-state"
    own = await _call(admin_app, "POST", f"{base}/approve", editor["csrf_token"])
    assert own.status_code == 403 and own.json()["required_permission"] == "experiments:approve"
    owner = await sign_in(admin_app, home.slug, "owner")
    approved = await _call(admin_app, "POST", f"{base}/approve", owner["csrf_token"])
    assert approved.status_code == 200 and approved.json()["approved_by"] == f"admin:{owner['user']['subject']}"
    again = await _call(admin_app, "POST", f"{base}/approve", owner["csrf_token"])
    assert again.status_code == 409
    editor = await sign_in(admin_app, home.slug, "editor")
    started = await _call(admin_app, "POST", f"{base}/start", editor["csrf_token"])
    assert started.status_code == 200 and started.json()["status"] == "running"
    redraft = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], experiment)
    assert redraft.status_code == 409  # it left draft: its definition is fixed
    listed = {e["id"]: e for e in (await admin_app.get("/admin/api/experiments")).json()}
    assert listed[experiment["id"]]["status"] == "running"
    stopped = await _call(admin_app, "POST", f"{base}/stop", editor["csrf_token"])
    assert stopped.status_code == 200 and stopped.json()["stopped_at"] is not None
    actions = [(p["action"]) for k, p in await audit_kinds(admin_engine, home, "experiment")
               if k == "experiment"]  # fmt: skip
    assert actions[-4:] == ["draft", "approved", "running", "stopped"]


async def test_a_winner_found_by_the_analysis_is_declared_and_promoted_to_the_controls_path(
    admin_app: Client,
    home: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    analytics_store: ChdbStore,
) -> None:
    experiment_id = f"win-{uuid.uuid4().hex[:8]}"
    experiment = {"id": experiment_id, "control": "quickstart", "planned_days": 14,
                  "variants": [{"name": "quickstart", "path": "developer-quickstart"},
                               {"name": "analytics", "path": "product-analytics"}]}  # fmt: skip
    base = f"/admin/api/experiments/{experiment_id}"
    editor = await sign_in(admin_app, home.slug, "editor")
    drafted = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], experiment)
    assert drafted.status_code == 201
    owner = await sign_in(admin_app, home.slug, "owner")
    assert (await _call(admin_app, "POST", f"{base}/approve", owner["csrf_token"])).status_code == 200
    assert (await _call(admin_app, "POST", f"{base}/start", owner["csrf_token"])).status_code == 200
    early = (await admin_app.get(f"{base}/results")).json()  # no exposures yet: nothing to judge
    assert early["verdict"]["kind"] in ("deferred", "no_winner_yet"), early
    refused = await _call(admin_app, "POST", f"{base}/declare", owner["csrf_token"])
    assert refused.status_code == 409 and refused.json()["type"] == PROBLEMS + "no-verdict"
    assert (await _call(admin_app, "POST", f"{base}/promote", owner["csrf_token"])).status_code == 409

    # exposures and activations as the analytics store receives them: the variant activates clearly more
    now = datetime.now(UTC)
    rng = random.Random(5)
    rows = []
    for i in range(4000):
        variant = "analytics" if i % 2 else "quickstart"
        user, at = f"{experiment_id}-u{i}", now + timedelta(seconds=rng.uniform(1, 600))
        rows.append(_fact(home.id, EXPOSED, user, at, name=experiment_id, variant=variant))
        if rng.random() < (0.48 if variant == "analytics" else 0.30):
            rows.append(_fact(home.id, ACTIVATED, user, at + timedelta(minutes=30)))
    analytics_store.insert(rows)
    result = (await admin_app.get(f"{base}/results")).json()
    assert result["verdict"]["kind"] == "winner" and result["verdict"]["variant"] == "analytics", result
    assert result["srm"]["mismatch"] is False and result["review"]["action"] == "stop"
    arms = {a["variant"]: a for a in result["arms"]}
    assert arms["quickstart"]["users"] == arms["analytics"]["users"] == 2000
    assert arms["analytics"]["chance_to_beat_control"] > 0.99 and arms["analytics"]["sequential_p"] < 0.05
    # the scheduled review keeps the day's look for the page
    reviewed = await ExperimentReviewer(app_engine, AnalyticsService(analytics_store)).review_tenant(
        OperatorContext("worker:test-review").tenant(home.id), datetime.now(UTC))  # fmt: skip
    assert [(r.experiment_id, r.action, r.verdict) for r in reviewed if r.experiment_id == experiment_id] == [
        (experiment_id, "continue", "winner")]  # fmt: skip
    page = await admin_app.get(f"{base.replace('/api', '')}")
    assert page.status_code == 200 and 'data-testid="history"' in page.text and '<tr data-day="0">' in page.text
    editor = await sign_in(admin_app, home.slug, "editor")
    declared = await _call(admin_app, "POST", f"{base}/declare", editor["csrf_token"])
    assert declared.status_code == 200 and declared.json()["status"] == "concluded", declared.text
    assert declared.json()["verdict"]["variant"] == "analytics"
    concluded_page = await admin_app.get(f"/admin/experiments/{experiment_id}")
    assert concluded_page.status_code == 200 and 'data-testid="status">concluded<' in concluded_page.text
    not_owner = await _call(admin_app, "POST", f"{base}/promote", editor["csrf_token"])
    assert not_owner.status_code == 403 and not_owner.json()["required_permission"] == "experiments:approve"
    before = {p["key"]: p for p in (await admin_app.get("/admin/api/paths")).json()}
    owner = await sign_in(admin_app, home.slug, "owner")
    promoted = await _call(admin_app, "POST", f"{base}/promote", owner["csrf_token"])
    assert promoted.status_code == 200, promoted.text
    done = promoted.json()["verdict"]["promoted"]
    assert done["path"] == "developer-quickstart"
    assert done["to_version"] == before["developer-quickstart"]["version"] + 1
    after = {p["key"]: p for p in (await admin_app.get("/admin/api/paths")).json()}
    assert after["developer-quickstart"]["version"] == done["to_version"]
    assert (await _call(admin_app, "POST", f"{base}/promote", owner["csrf_token"])).status_code == 409  # once
    actions = [p["action"] for k, p in await audit_kinds(admin_engine, home, "experiment") if k == "experiment"]
    assert actions[-3:] == ["running", "concluded", "promoted"]


async def test_the_experiment_manager_pages_show_each_role_its_actions_and_the_result(
    admin_app: Client, home: TenantFixture
) -> None:
    experiment_id = f"page-{uuid.uuid4().hex[:8]}"
    editor = await sign_in(admin_app, home.slug, "editor")
    draft = {"id": experiment_id, "control": "quickstart",
             "variants": [{"name": "quickstart", "path": "developer-quickstart"},
                          {"name": "analytics", "path": "product-analytics"}]}  # fmt: skip
    assert (await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], draft)).status_code == 201
    page = await admin_app.get("/admin/experiments")
    assert page.status_code == 200 and f'data-experiment="{experiment_id}" data-status="draft"' in page.text
    assert 'class="draft-experiment"' in page.text  # an editor drafts
    assert f'data-action="approve" data-experiment="{experiment_id}"' not in page.text  # but does not approve
    owner = await sign_in(admin_app, home.slug, "owner")
    page = await admin_app.get("/admin/experiments")
    assert f'data-action="approve" data-experiment="{experiment_id}"' in page.text
    assert (await _call(admin_app, "POST", f"/admin/api/experiments/{experiment_id}/approve",
                        owner["csrf_token"])).status_code == 200  # fmt: skip
    viewer = await sign_in(admin_app, home.slug, "viewer")
    assert viewer["roles"] == ["viewer"]
    page = await admin_app.get("/admin/experiments")
    assert 'data-status="approved"' in page.text and "data-action=" not in page.text  # a viewer only looks
    assert 'class="draft-experiment"' not in page.text
    result = await admin_app.get(f"/admin/experiments/{experiment_id}")
    assert result.status_code == 200 and 'data-testid="verdict">deferred<' in result.text  # not started
    assert (await admin_app.get("/admin/experiments/no-such-one")).status_code == 404
    assert (await admin_app.get("/admin/experiments/Bad%20Id")).status_code == 400
    dashboard = await admin_app.get("/admin/")
    assert 'data-testid="experiments-link"' in dashboard.text


async def test_a_nudge_experiment_is_drafted_in_the_admin_api_shown_by_its_arms_and_never_promoted(
    admin_app: Client, home: TenantFixture, app_engine: AsyncEngine
) -> None:
    experiment_id = f"nudge-{uuid.uuid4().hex[:8]}"
    editor = await sign_in(admin_app, home.slug, "editor")
    variants = [{"name": "bandit"}, {"name": "in-app", "channel": "in_app"},
                {"name": "benefit-mail", "template": "benefit", "channel": "email"}]  # fmt: skip
    draft: dict[str, Any] = {"id": experiment_id, "kind": "nudge", "trigger": "stuck", "control": "bandit",
                             "variants": variants}  # fmt: skip
    unknown = draft | {"variants": [{"name": "bandit"}, {"name": "ghost", "template": "no-such-wording"}]}
    refused = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], unknown)
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("application/problem+json")
    assert "unknown nudge templates ['no-such-wording']" in refused.json()["detail"]
    pathful = draft | {"variants": [{"name": "bandit", "path": "developer-quickstart"}, {"name": "in-app"}]}
    assert (await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"],
                        pathful)).status_code == 400  # fmt: skip
    assert experiment_id not in {e["id"] for e in (await admin_app.get("/admin/api/experiments")).json()}

    drafted = await _call(admin_app, "POST", "/admin/api/experiments", editor["csrf_token"], draft)
    assert drafted.status_code == 201, drafted.text
    assert drafted.json()["definition"]["kind"] == "nudge"
    page = await admin_app.get("/admin/experiments")
    row = page.text[page.text.index(f'data-experiment="{experiment_id}"') :]
    row = row[: row.index("</tr>")]
    assert "nudges of stuck" in row and "the bandit's choice" in row and "by in_app" in row
    assert "wording <code>benefit</code> by email" in row
    async with tenant_transaction(app_engine, OperatorContext("operator:test").tenant(home.id)) as tx:
        await experiments.approve(tx, experiment_id, "admin:owner")
        await experiments.start(tx, experiment_id, "admin:owner", datetime.now(UTC))
        await experiments.conclude(tx, experiment_id, "admin:owner", datetime.now(UTC),
                                   {"kind": "winner", "variant": "in-app"})  # fmt: skip
    owner = await sign_in(admin_app, home.slug, "owner")
    page = await admin_app.get(f"/admin/experiments/{experiment_id}")
    assert page.status_code == 200 and f'data-action="promote" data-experiment="{experiment_id}"' not in page.text
    promoted = await _call(admin_app, "POST", f"/admin/api/experiments/{experiment_id}/promote", owner["csrf_token"])
    assert promoted.status_code == 409 and "is a nudge experiment" in promoted.json()["detail"]


async def test_the_path_editor_api_validates_every_field_versions_diffs_and_reverts(
    admin_app: Client, home: TenantFixture, admin_engine: AsyncEngine
) -> None:
    editor = await sign_in(admin_app, home.slug, "editor")
    csrf = {"X-CSRF-Token": editor["csrf_token"]}
    key = "marketing-campaigns"  # a path no other test of the module edits
    current = (await admin_app.get(f"/admin/api/paths/{key}/versions")).json()
    start = current[0]["version"]
    steps = (await admin_app.get(f"/admin/api/paths/{key}/versions/{start}")).json()["definition"]["steps"]
    broken = [dict(s) for s in steps]
    broken[1]["title"] = ""
    broken[3]["prerequisites"] = ["no-such-step"]
    refused = await admin_app.post(f"/admin/api/paths/{key}/validate", json={"steps": broken}, headers=csrf)
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("application/problem+json")
    keys = [e["key"] for e in refused.json()["errors"]]
    assert "steps.1.title" in keys, refused.json()
    published = await admin_app.patch(f"/admin/api/paths/{key}", json={"steps": broken}, headers=csrf)
    assert published.status_code == 400
    assert (await admin_app.get(f"/admin/api/paths/{key}/versions")).json() == current  # nothing published

    renamed = [dict(s) for s in steps]
    renamed[0]["title"] = "Connect your warehouse first"
    checked = await admin_app.post(f"/admin/api/paths/{key}/validate", json={"steps": renamed}, headers=csrf)
    assert checked.status_code == 200 and checked.json()["preview"][0]["title"] == "Connect your warehouse first"
    assert checked.json()["preview"][0]["available"] and not checked.json()["preview"][1]["available"]
    done = await admin_app.patch(f"/admin/api/paths/{key}", json={"steps": renamed, "targeting": []}, headers=csrf)
    assert done.status_code == 200 and done.json()["version"] == start + 1, done.text
    diff = (await admin_app.get(f"/admin/api/paths/{key}/diff", params={"from": start, "to": start + 1})).json()
    assert diff["steps_changed"] == [{"id": steps[0]["id"], "fields": {"title": {
        "from": steps[0]["title"], "to": "Connect your warehouse first"}}}]  # fmt: skip
    assert "targeting" in diff["fields"] and not diff["order_changed"]
    assert (await admin_app.get(f"/admin/api/paths/{key}/diff", params={"from": 99, "to": 1})).status_code == 404
    reverted = await admin_app.post(f"/admin/api/paths/{key}/revert", json={"version": start}, headers=csrf)
    assert reverted.status_code == 200 and reverted.json()["version"] == start + 2
    assert reverted.json()["matches_manifest"]  # the manifest's definition again
    again = await admin_app.post(f"/admin/api/paths/{key}/revert", json={"version": start + 2}, headers=csrf)
    assert again.json()["version"] == start + 2  # the current version already: no new one
    bad = await admin_app.post(f"/admin/api/paths/{key}/revert", json={"version": "1"}, headers=csrf)
    assert bad.status_code == 400
    kinds = [k for k, _ in await audit_kinds(admin_engine, home, "path.revert")]
    assert kinds.count("path.revert") >= 1
