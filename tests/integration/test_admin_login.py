"""The admin SSO login against the real Keycloak: OIDC code + PKCE, sessions, roles from groups,
refused logins (each audited), logout and back-channel logout.

A tenant (real PostgreSQL) gets its realm from ``KeycloakProvisioner`` with group roles
``fm-analysts → analyst`` and ``fm-editors → editor``; users with passwords log in on the realm's
own login form (the SAML leg is covered by test_admin_sso_e2e.py and test_saml_negative.py). The
browser is played by two cookie jars: the test client for Firstmile and an httpx client for
Keycloak. Keycloak's back-channel logout posts to a small loopback listener, which hands the real
logout token to Firstmile's endpoint.
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from keycloak import KeycloakAdmin
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.sso.provisioning import KeycloakProvisioner
from firstmile.tenancy.manifest import SsoSpec, TenantManifest
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant, sequenced
from tests.support.keycloak import Server, server
from tests.support.loopback_http import LoopbackHTTPServer

pytestmark = pytest.mark.xdist_group("keycloak")

Client = AsyncTestClient[Litestar]
BASE = "http://testserver.local"
GROUPS = {"fm-analysts": "analyst", "fm-editors": "editor"}
_FORM = re.compile(r'<form[^>]*id="kc-form-login"[^>]*action="([^"]+)"', re.S)


class _Capture(BaseHTTPRequestHandler):
    bodies: list[dict[str, list[str]]]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.bodies.append(parse_qs(self.rfile.read(length).decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return None


@pytest.fixture(scope="module")
def backchannel() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    """A loopback listener standing where Keycloak posts back-channel logout tokens."""
    bodies: list[dict[str, list[str]]] = []
    handler = type("Capture", (_Capture,), {"bodies": bodies})
    listener = LoopbackHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.server_address[1]}/admin/backchannel-logout", bodies
    finally:
        listener.shutdown()
        listener.server_close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        yield client


@dataclass
class World:
    srv: Server
    provisioner: KeycloakProvisioner
    tenant: TenantFixture
    manifest: TenantManifest
    realm: str
    api: Client
    http: httpx.Client
    passwords: dict[str, str] = field(default_factory=dict)
    user_ids: dict[str, str] = field(default_factory=dict)

    def in_realm(self) -> KeycloakAdmin:
        self.srv.admin.change_current_realm(self.realm)
        return self.srv.admin


def _add_user(world: World, username: str, group: str | None) -> None:
    admin = world.in_realm()
    password = secrets.token_urlsafe(12)
    user_id = admin.create_user(
        {
            "username": username,
            "enabled": True,
            "email": f"{username}@customer.test",
            "emailVerified": True,
            "firstName": username.capitalize(),
            "lastName": "Tester",
            "credentials": [{"type": "password", "value": password, "temporary": False}],
        }
    )
    if group is not None:
        group_id = next(g["id"] for g in admin.get_groups() if g["name"] == group)
        admin.group_user_add(user_id, group_id)
    admin.change_current_realm("master")
    world.passwords[username] = password
    world.user_ids[username] = user_id


@pytest.fixture(scope="module")
async def world(
    keycloak_url: str,
    admin_engine: AsyncEngine,
    database: Database,
    analytics_store: ChdbStore,
    backchannel: tuple[str, list[dict[str, list[str]]]],
    http: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    srv = server(keycloak_url)
    tenant = await new_tenant(admin_engine)
    manifest = tenant.manifest.model_copy(update={"sso": SsoSpec.model_validate({"group_roles": GROUPS})})
    provisioner = KeycloakProvisioner(
        srv.admin, redirect_uris=[f"{BASE}/admin/*"], backchannel_logout_url=backchannel[0]
    )
    provisioner.apply(manifest)
    realm = provisioner.realm_name(tenant.slug)
    password_file = tmp_path_factory.mktemp("keycloak") / "admin-password"
    password_file.write_text(str(urlsplit(keycloak_url).password))
    settings = make_settings(
        keycloak_url=srv.base,
        public_url=BASE,
        admin_cookie_secure=False,
        # the API copies Keycloak's failure events into the audit log every second
        keycloak_admin_user=urlsplit(keycloak_url).username,
        keycloak_admin_password_file=password_file,
        sso_event_sync_seconds=1,
    )
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    try:
        async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
            made = World(srv, provisioner, tenant, manifest, realm, api, http)
            _add_user(made, "ana", "fm-analysts")
            _add_user(made, "eddie", "fm-editors")
            _add_user(made, "nobody", None)
            yield made
    finally:
        srv.admin.change_current_realm("master")
        srv.admin.delete_realm(realm)


class KeycloakJar:
    """The browser's side towards Keycloak. Keycloak marks its cookies Secure, which a browser sends to
    http://127.0.0.1 (a secure context) but httpx's cookie jar does not: the jar is kept here."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._cookies: dict[str, str] = {}

    def _send(self, method: str, url: str, data: dict[str, str] | None = None) -> httpx.Response:
        cookie = "; ".join(f"{k}={v}" for k, v in self._cookies.items())
        response = self._http.request(method, url, data=data, headers={"Cookie": cookie} if cookie else {})
        for header in response.headers.get_list("set-cookie"):
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self._cookies.pop(name, None)
                else:
                    self._cookies[name] = morsel.value
        return response

    def get(self, url: str) -> httpx.Response:
        return self._send("GET", url)

    def post(self, url: str, data: dict[str, str]) -> httpx.Response:
        return self._send("POST", url, data)


@dataclass
class Browser:
    """Firstmile's cookie jar is the test client's; Keycloak's is a :class:`KeycloakJar`."""

    keycloak: KeycloakJar
    callback: str = ""


async def start(world: World) -> str:
    """GET /admin/login: the redirect to the realm's authorization endpoint, PKCE included."""
    response = await world.api.get("/admin/login", params={"tenant": world.tenant.slug}, follow_redirects=False)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == ["firstmile-admin"] and "kc_idp_hint" not in query
    return location


def keycloak_login(browser: Browser, authorize: str, username: str, password: str) -> str:
    """The realm's login form, filled in: Keycloak's redirect back to our callback."""
    page = browser.keycloak.get(authorize)
    assert page.status_code == 200, page.text[:500]
    match = _FORM.search(page.text)
    assert match, "no Keycloak login form"
    answer = browser.keycloak.post(html.unescape(match.group(1)), data={"username": username, "password": password})
    assert answer.status_code == 302, (
        re.findall(r"(?s)<span[^>]*(?:input-error|alert__title|kc-feedback-text)[^>]*>(.*?)</span>", answer.text)
        or answer.text[-3000:]
    )
    location = answer.headers["location"]
    assert location.startswith(f"{BASE}/admin/callback?"), location
    return location


async def login(world: World, username: str) -> tuple[Browser, httpx.Response]:
    world.api.cookies.clear()
    browser = Browser(KeycloakJar(world.http))
    browser.callback = keycloak_login(browser, await start(world), username, world.passwords[username])
    finished = await world.api.get(browser.callback.removeprefix(BASE), follow_redirects=False)
    return browser, finished


async def audit(admin_engine: AsyncEngine, tenant: TenantFixture, prefix: str) -> list[tuple[str, str, Any]]:
    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind, actor, payload FROM audit_entries WHERE tenant_id = :t AND kind LIKE :k ORDER BY seq"),
            {"t": tenant.id, "k": prefix + "%"},
        )
        return [(r[0], r[1], r[2]) for r in rows]


async def test_an_analyst_logs_in_with_code_and_pkce_and_gets_the_group_role(
    world: World, admin_engine: AsyncEngine
) -> None:
    _, finished = await login(world, "ana")
    assert finished.status_code == 303 and finished.headers["location"] == "/admin/"
    me = (await world.api.get("/admin/api/me")).json()
    assert me["tenant"]["slug"] == world.tenant.slug and me["roles"] == ["analyst"] and me["origin"] == "sso"
    assert me["user"]["subject"] == world.user_ids["ana"] and me["user"]["email"] == "ana@customer.test"
    page = await world.api.get("/admin/")
    assert 'data-testid="roles">analyst<' in page.text
    logins = await audit(admin_engine, world.tenant, "admin.login")
    assert ("admin.login", f"admin:{world.user_ids['ana']}") in [(k, a) for k, a, _ in logins]
    async with admin_engine.connect() as conn:
        roles = (
            await conn.execute(
                text("SELECT roles FROM admin_identities WHERE tenant_id = :t AND subject = :s"),
                {"t": world.tenant.id, "s": world.user_ids["ana"]},
            )
        ).scalar()
    assert roles == ["analyst"]


async def test_a_replayed_callback_or_one_from_another_browser_is_refused_and_audited(
    world: World, admin_engine: AsyncEngine
) -> None:
    browser, finished = await login(world, "ana")
    assert finished.status_code == 303
    replay = await world.api.get(browser.callback.removeprefix(BASE), follow_redirects=False)
    assert replay.status_code == 400 and replay.json()["reason"] == "replayed_state"
    assert "set-cookie" not in replay.headers

    world.api.cookies.clear()
    other = Browser(KeycloakJar(world.http))
    callback = keycloak_login(other, await start(world), "ana", world.passwords["ana"])
    world.api.cookies.clear()  # the callback arrives in a browser that did not start this login
    stolen = await world.api.get(callback.removeprefix(BASE), follow_redirects=False)
    assert stolen.status_code == 400 and stolen.json()["reason"] == "browser_mismatch"
    assert (await world.api.get("/admin/api/me")).status_code == 401

    unknown = await world.api.get("/admin/callback", params={"state": "made-up", "code": "x"})
    assert unknown.status_code == 400 and unknown.json()["reason"] == "unknown_state"
    reasons = [p["reason"] for _, _, p in await audit(admin_engine, world.tenant, "admin.login_failed")]
    assert "replayed_state" in reasons and "browser_mismatch" in reasons


async def test_a_user_without_a_firstmile_role_gets_no_session(world: World, admin_engine: AsyncEngine) -> None:
    _, finished = await login(world, "nobody")
    assert finished.status_code == 403 and finished.json()["reason"] == "no_role"
    assert (await world.api.get("/admin/api/me")).status_code == 401
    failed = await audit(admin_engine, world.tenant, "admin.login_failed")
    assert failed[-1][2]["reason"] == "no_role" and failed[-1][2]["subject"] == world.user_ids["nobody"]


async def test_a_changed_group_is_a_role_change_at_the_next_login(world: World, admin_engine: AsyncEngine) -> None:
    _, finished = await login(world, "eddie")
    assert finished.status_code == 303
    assert (await world.api.get("/admin/api/me")).json()["roles"] == ["editor"]
    admin = world.in_realm()
    groups = {g["name"]: g["id"] for g in admin.get_groups()}
    admin.group_user_remove(world.user_ids["eddie"], groups["fm-editors"])
    admin.group_user_add(world.user_ids["eddie"], groups["fm-analysts"])
    admin.change_current_realm("master")
    _, finished = await login(world, "eddie")
    assert finished.status_code == 303
    assert (await world.api.get("/admin/api/me")).json()["roles"] == ["analyst"]
    changes = await audit(admin_engine, world.tenant, "admin.role_change")
    assert changes[-1][2] == {"from": ["editor"], "to": ["analyst"]}


@pytest.mark.parametrize(
    ("mapper", "config", "reason"),
    [
        ("audience", {"included.custom.audience": "someone-else"}, "token_wrong_audience"),
        ("tenant", {"claim.value": "another-tenant"}, "token_wrong_tenant"),
    ],
)
async def test_tokens_with_a_wrong_audience_or_tenant_end_the_login_audited(
    world: World, admin_engine: AsyncEngine, mapper: str, config: dict[str, str], reason: str
) -> None:
    admin = world.in_realm()
    client = admin.get_client_id("firstmile-admin")
    assert client is not None
    current = next(m for m in admin.get_mappers_from_client(client) if m["name"] == mapper)
    admin.update_client_mapper(client, current["id"], {**current, "config": {**current["config"], **config}})
    admin.change_current_realm("master")
    try:
        _, finished = await login(world, "ana")
        assert finished.status_code == 400 and finished.json()["reason"] == reason, finished.text
        assert (await world.api.get("/admin/api/me")).status_code == 401
        failed = await audit(admin_engine, world.tenant, "admin.login_failed")
        assert failed[-1][2]["reason"] == reason
    finally:
        world.provisioner.apply(world.manifest)  # provisioning repairs the drift
    _, finished = await login(world, "ana")
    assert finished.status_code == 303


async def test_logout_ends_the_session_and_the_realm_session(world: World, admin_engine: AsyncEngine) -> None:
    browser, _ = await login(world, "ana")
    me = (await world.api.get("/admin/api/me")).json()
    out = await world.api.post("/admin/logout", data={"csrf_token": me["csrf_token"]}, follow_redirects=False)
    assert out.status_code == 303
    end_session = out.headers["location"]
    assert end_session.startswith(f"{world.srv.base}/realms/{world.realm}/protocol/openid-connect/logout?")
    assert "id_token_hint=" in end_session
    assert (await world.api.get("/admin/api/me")).status_code == 401
    back = browser.keycloak.get(end_session)
    assert back.status_code == 302 and back.headers["location"] == f"{BASE}/admin/logged-out"
    # the realm session is over too: the authorization endpoint asks for a password again
    again = browser.keycloak.get(await start(world))
    assert again.status_code == 200 and _FORM.search(again.text)
    how = [p["how"] for k, _, p in await audit(admin_engine, world.tenant, "admin.logout") if k == "admin.logout"]
    assert how[-1] == "user"


async def test_backchannel_logout_from_keycloak_ends_the_session_once(
    world: World, admin_engine: AsyncEngine, backchannel: tuple[str, list[dict[str, list[str]]]]
) -> None:
    _, bodies = backchannel
    await login(world, "ana")
    assert (await world.api.get("/admin/api/me")).status_code == 200
    cookies = dict(world.api.cookies)
    seen = len(bodies)
    admin = world.in_realm()
    admin.user_logout(world.user_ids["ana"])  # an admin ends the user's realm sessions in Keycloak
    admin.change_current_realm("master")
    # one logout token per realm session of the user (earlier tests left some): each names its sid
    tokens = [body["logout_token"][0] for body in bodies[seen:]]
    assert tokens, "Keycloak sent no back-channel logout"

    tampered = tokens[0][:-6] + ("A" * 6 if not tokens[0].endswith("AAAAAA") else "B" * 6)
    refused = await world.api.post("/admin/backchannel-logout", data={"logout_token": tampered})
    assert refused.status_code == 400
    assert (await world.api.get("/admin/api/me")).status_code == 200  # a forged token ends nothing

    ended = 0
    for token in tokens:
        answer = await world.api.post("/admin/backchannel-logout", data={"logout_token": token})
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        ended += answer.json()["sessions_ended"]
    assert ended >= 1
    world.api.cookies.update(cookies)
    assert (await world.api.get("/admin/api/me")).status_code == 401
    replay = await world.api.post("/admin/backchannel-logout", data={"logout_token": tokens[-1]})
    assert replay.status_code == 400
    logouts = await audit(admin_engine, world.tenant, "admin.logout")
    assert [p.get("how") for k, _, p in logouts if k == "admin.logout"][-1] == "backchannel"
    assert any(k == "admin.logout_refused" and p["reason"] == "bad_signature" for k, _, p in logouts)


async def test_login_to_an_unknown_tenant_or_with_a_bad_slug_is_refused(world: World) -> None:
    unknown = await world.api.get("/admin/login", params={"tenant": f"t-{uuid.uuid4().hex[:8]}"})
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/problem+json")
    bad = await world.api.get("/admin/login", params={"tenant": "../../evil"})
    assert bad.status_code == 400
    redirect = await world.api.get(
        "/admin/login", params={"tenant": world.tenant.slug, "next": "https://evil.example/"}, follow_redirects=False
    )
    assert redirect.status_code == 302  # the next target is dropped, not followed (checked at the callback)


async def test_a_wrong_password_at_the_realm_reaches_the_audit_log_through_the_api(
    world: World, admin_engine: AsyncEngine
) -> None:
    """Keycloak refuses it before Firstmile sees anything: the API's event sync copies its event."""
    browser = Browser(KeycloakJar(world.http))
    page = browser.keycloak.get(await start(world))
    match = _FORM.search(page.text)
    assert match
    refused = browser.keycloak.post(html.unescape(match.group(1)), data={"username": "ana", "password": "wrong"})
    assert refused.status_code == 200 and "location" not in refused.headers  # the form again, no code
    deadline = time.monotonic() + 20
    errors: list[str] = []
    while time.monotonic() < deadline:
        entries = await audit(admin_engine, world.tenant, "sso.login_failed")
        errors = [str(p.get("error")) for _, _, p in entries]
        if "invalid_user_credentials" in errors:
            break
        await asyncio.sleep(0.5)
    assert "invalid_user_credentials" in errors
