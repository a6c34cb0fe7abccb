"""End to end: an admin signs in to Firstmile through the customer's SAML IdP, in a real Chromium.

Nothing is stood in for: the API runs as ``firstmile serve`` (a subprocess, on this worker's own
database, the test Redis and the test Keycloak), the tenants are applied with ``firstmile tenants
apply``, which provisions their realms (``firstmile-<slug>`` under a prefix of this module's own), a
second realm of the same Keycloak plays the customer's SAML IdP (:mod:`tests.support.customer_idp`), and
Debian's Chromium is driven by Playwright (headless, ``executable_path``; Playwright downloads nothing).

The chain each login goes through::

    /admin/login?tenant=<slug>  -> tenant realm (kc_idp_hint=customer-idp) -> SAML AuthnRequest (POST,
    signed) -> the IdP's login page -> signed SAML Response -> broker endpoint -> first broker login
    (no form: see KeycloakProvisioner._user_profile) -> /admin/callback?code=… -> /admin/

Run alone (the services must be up: ``make services``)::

    FIRSTMILE_TEST_ADMIN_URL=$(deploy/local/postgres.sh url test) \\
    FIRSTMILE_TEST_REDIS=$(deploy/local/redis.sh url test) \\
    FIRSTMILE_TEST_KEYCLOAK=$(deploy/local/keycloak.sh url test) \\
      .venv/bin/pytest -q tests/integration/test_admin_sso_e2e.py -p no:randomly
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from firstmile.tenancy.manifest import ADMIN_ROLES
from tests.conftest import _TAG, REGION, migrated_database
from tests.factories import ROOT, demo_document
from tests.support.customer_idp import BROKER_ALIAS, CustomerIdp, IdpUser
from tests.support.keycloak import Server, payload, server

pytestmark = pytest.mark.xdist_group("keycloak")

GROUP_ROLES = {"fm-analysts": "analyst", "fm-editors": "editor"}
WAIT_MS = 20_000  # one browser step: a Keycloak page, a redirect chain; bounded, never open-ended
BROWSER_ARGS = [
    "--no-sandbox",  # the tests run as root (CI), where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the stack: a database, two tenants with realms, the customer's IdP, the API ------------------


@dataclass(frozen=True)
class Stack:
    base: str  # where the browser reaches Firstmile: http://127.0.0.1:<port>
    keycloak: Server
    idp: CustomerIdp
    prefix: str  # this module's realm prefix
    slug: str  # the tenant whose admins log in through the customer's IdP
    other: str  # a second tenant, with no IdP and no account of theirs
    analyst: IdpUser
    reader: IdpUser  # another fm-analysts member, for the Keycloak-only test: each test has its own sessions
    editor: IdpUser
    log: Path  # the server's output, shown when a test fails

    def realm(self, slug: str) -> str:
        return f"{self.prefix}{slug}"

    def server_log(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


def _own_database(worker_id: str) -> tuple[str, str]:
    """A migrated database for this module alone: the server relays every tenant's outbox, which must not
    reach into the rows other tests of this worker leave in theirs. Returns (admin URL, app URL)."""
    made = migrated_database(f"firstmile_test_{_TAG}{worker_id}_e2e")
    return made.admin_url, made.app_url


def _secret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _environment(
    *,
    admin_url: str,
    app_url: str,
    keycloak: Server,
    keycloak_user: str,
    keycloak_password: Path,
    redis: str,
    base: str,
    prefix: str,
    data: Path,
) -> dict[str, str]:
    """What an operator sets for a region with SSO: the same for ``tenants apply`` and ``serve``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_")}
    parts = urlsplit(base)
    return env | {
        "FIRSTMILE_DATABASE_URL": app_url,
        "FIRSTMILE_DATABASE_ADMIN_URL": admin_url,
        "FIRSTMILE_API_KEY_PEPPER": secrets.token_hex(16),
        "FIRSTMILE_DATA_DIR": str(data),
        # with an external database these are provisioned, never generated: one file each, 32 random bytes (hex)
        "FIRSTMILE_KEK_FILE": str(_secret(data / "secrets" / "kek")),
        "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": str(_secret(data / "secrets" / "audit_signing_key")),
        "FIRSTMILE_REGION": REGION,
        "FIRSTMILE_REDIS_URL": redis,
        "FIRSTMILE_KEYCLOAK_URL": keycloak.base,
        "FIRSTMILE_KEYCLOAK_ADMIN_USER": keycloak_user,
        "FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE": str(keycloak_password),
        "FIRSTMILE_SSO_REALM_PREFIX": prefix,
        "FIRSTMILE_PUBLIC_URL": base,
        "FIRSTMILE_SSO_ADMIN_REDIRECT_URIS": f"{base}/admin/*",
        "FIRSTMILE_HOST": str(parts.hostname),
        "FIRSTMILE_PORT": str(parts.port),
        # no models, no background scans: the admin login is what is under test
        "FIRSTMILE_MODEL_REGISTRY_URI": str(ROOT / ".firstmile" / "test-no-models"),
        "FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS": "0",
        "FIRSTMILE_LOG_LEVEL": "WARNING",
    }


def _manifest(folder: Path, slug: str, sso: dict[str, Any]) -> None:
    doc = demo_document()
    doc["tenant"] = {"slug": slug, "name": f"Tenant {slug}", "home_region": REGION}
    doc["sso"] = sso
    (folder / f"{slug}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


def _firstmile(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "firstmile.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"firstmile {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 180) -> None:
    """Until ``/health/ready`` answers 200. Generous: on a cold CI machine the first start (imports, the app's
    startup) shares two cores with Keycloak's first boot and the deployment tools' Go builds."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"firstmile serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:500]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise AssertionError(f"firstmile serve was not ready in {timeout:.0f} s (last: {last}):\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def stack(
    worker_id: str, keycloak_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("admin-e2e")
    keycloak = server(keycloak_url)
    password_file = root / "keycloak-admin-password"
    password_file.write_text(f"{urlsplit(keycloak_url).password}\n", encoding="utf-8")
    prefix = f"fme{secrets.token_hex(3)}-"
    base = f"http://127.0.0.1:{_free_port()}"
    admin_url, app_url = _own_database(worker_id)
    env = _environment(
        admin_url=admin_url,
        app_url=app_url,
        keycloak=keycloak,
        keycloak_user=str(urlsplit(keycloak_url).username),
        keycloak_password=password_file,
        redis=redis_url,
        base=base,
        prefix=prefix,
        data=root / "data",
    )
    idp = CustomerIdp.create(keycloak, groups=tuple(GROUP_ROLES))
    log = root / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        analyst = idp.add_user(f"ada-{secrets.token_hex(2)}", "Ada Lovelace", "fm-analysts")
        reader = idp.add_user(f"alan-{secrets.token_hex(2)}", "Alan Turing", "fm-analysts")
        editor = idp.add_user(f"grace-{secrets.token_hex(2)}", "Grace Hopper", "fm-editors")
        slug, other = f"e2e-{secrets.token_hex(3)}", f"e2e-{secrets.token_hex(3)}"
        folder = root / "tenants"
        folder.mkdir()
        _manifest(folder, slug, {"group_roles": GROUP_ROLES, "saml": idp.saml_section()})
        _manifest(folder, other, {"group_roles": {"fm-analysts": "owner"}})
        out = _firstmile(env, "tenants", "apply", str(folder))
        assert f"create identity-provider {BROKER_ALIAS} in realm {prefix}{slug}" in out, out
        # the customer's side: trust our SP from the metadata the tenant realm now publishes
        idp.trust(f"{prefix}{slug}")
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "firstmile.cli", "serve"],
                env=env,
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        _wait_ready(proc, base, log)
        yield Stack(base, keycloak, idp, prefix, slug, other, analyst, reader, editor, log)
    finally:
        if proc is not None:
            _stop(proc)
        keycloak.admin.change_current_realm("master")
        for realm in keycloak.admin.get_realms():
            if str(realm["realm"]).startswith(prefix):
                keycloak.admin.delete_realm(realm["realm"])
        idp.delete()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright, chromium_path: str) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=BROWSER_ARGS)
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile per test: no cookie of one admin reaches another's test."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


# -- helpers -------------------------------------------------------------------------------------


def _sign_in_at_idp(page: Page, stack: Stack, user: IdpUser) -> None:
    """On the customer's IdP login page (no Keycloak page of the tenant realm before it): type, submit."""
    page.wait_for_url(f"{stack.idp.entity_id}/**")
    page.fill("#username", user.username)
    page.fill("#password", user.password)
    page.click("#kc-login")


def _fetch(
    page: Page, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """``fetch`` from the admin page itself: its cookies, its origin, as the UI's own scripts would."""
    result: dict[str, Any] = page.evaluate(
        """async ([method, path, body, headers]) => {
            const init = {method, headers: headers || {}, credentials: "same-origin"};
            if (body !== null) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
            const response = await fetch(path, init);
            const text = await response.text();
            let json = null;
            try { json = JSON.parse(text); } catch (e) {}
            return {status: response.status, type: response.headers.get("content-type") || "", json, text};
        }""",
        [method, path, body, headers],
    )
    return result


def _realm_roles_of(stack: Stack, slug: str, email: str) -> set[str]:
    """The admin roles the brokered user holds in the tenant realm (Keycloak's admin API)."""
    admin = stack.keycloak.admin
    admin.change_current_realm(stack.realm(slug))
    try:
        users = [u for u in admin.get_users({"email": email}) if u.get("email") == email]
        assert len(users) == 1, users
        return {str(r["name"]) for r in admin.get_realm_roles_of_user(users[0]["id"])} & set(ADMIN_ROLES)
    finally:
        admin.change_current_realm("master")


def _realm_sessions(stack: Stack, slug: str, email: str) -> int:
    """How many Keycloak sessions the brokered user has in the tenant realm."""
    admin = stack.keycloak.admin
    admin.change_current_realm(stack.realm(slug))
    try:
        return sum(len(admin.get_sessions(u["id"])) for u in admin.get_users({"email": email}))
    finally:
        admin.change_current_realm("master")


# -- the Keycloak half of the chain, with no Firstmile route involved ----------------------------


def test_saml_chain_returns_a_code_whose_token_carries_the_group_role(stack: Stack, page: Page) -> None:
    """Browser -> tenant realm -> SAML -> customer IdP -> back: Keycloak redirects to the admin client's
    redirect URI with a code, and the code (PKCE) buys a token of the tenant realm with the role the IdP
    group maps to. No Firstmile route takes part: this is the Keycloak half, checked on its own."""
    realm = stack.realm(stack.slug)
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    # accepted by the client (<public_url>/admin/*) but served by no route: the code reaches only this test
    # (Playwright cannot intercept the end of a redirect chain, so the browser does load it: a 404)
    redirect_uri = f"{stack.base}/admin/e2e-code"
    query = {
        "client_id": "firstmile-admin",
        "response_type": "code",
        "scope": "openid",
        "redirect_uri": redirect_uri,
        "state": secrets.token_urlsafe(8),
        "nonce": secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "kc_idp_hint": BROKER_ALIAS,
    }
    page.goto(f"{stack.keycloak.base}/realms/{realm}/protocol/openid-connect/auth?{urlencode(query)}")
    _sign_in_at_idp(page, stack, stack.reader)
    page.wait_for_url(lambda url: url.startswith(f"{redirect_uri}?"))
    params = parse_qs(urlsplit(page.url).query)
    assert params["state"] == [query["state"]] and params["iss"] == [f"{stack.keycloak.base}/realms/{realm}"]

    tokens = httpx.post(
        f"{stack.keycloak.base}/realms/{realm}/protocol/openid-connect/token",
        data={
            "grant_type": "authorization_code",
            "client_id": "firstmile-admin",
            "code": params["code"][0],
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
        timeout=10,
    )
    assert tokens.status_code == 200, tokens.text
    access = payload(tokens.json()["access_token"])
    assert access["iss"] == f"{stack.keycloak.base}/realms/{realm}"
    assert access["firstmile_tenant"] == stack.slug and "firstmile-api" in access["aud"]
    assert "analyst" in access["realm_access"]["roles"] and "editor" not in access["realm_access"]["roles"]
    assert access["email"] == stack.reader.email and access["given_name"] == "Alan Turing"
    # the role is the brokered user's own, granted by the group's IdP mapper
    assert _realm_roles_of(stack, stack.slug, stack.reader.email) == {"analyst"}


# -- the admin UI ----------------------------------------------------------------------------------


def _login(page: Page, stack: Stack, user: IdpUser) -> None:
    page.goto(f"{stack.base}/admin/login?tenant={stack.slug}")
    _sign_in_at_idp(page, stack, user)
    page.wait_for_url(f"{stack.base}/admin/")


def _text(page: Page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text().strip()


def _listed_paths(page: Page) -> list[str]:
    """The path keys the dashboard lists (each ``<li data-path=…>`` of ``data-testid=paths``)."""
    items = page.get_by_test_id("paths").locator("li[data-path]")
    return sorted(str(items.nth(i).get_attribute("data-path")) for i in range(items.count()))


def test_analyst_signs_in_sees_only_their_tenant_cannot_edit_and_signs_out(stack: Stack, page: Page) -> None:
    try:
        _login(page, stack, stack.analyst)
    except Exception as exc:
        raise AssertionError(f"login did not reach /admin/ (at {page.url}): {exc}\n{stack.server_log()}") from exc

    assert _text(page, "tenant") == stack.slug
    assert _text(page, "tenant-name") == f"Tenant {stack.slug}"
    # the session lives in cookies the page's scripts cannot read, sent only over a secure context
    # (Chromium counts http://127.0.0.1 as one, so FIRSTMILE_ADMIN_COOKIE_SECURE keeps its default, true)
    ours = page.context.cookies(f"{stack.base}/admin/")
    assert ours and all(c["secure"] and c["httpOnly"] for c in ours), ours
    assert _text(page, "region") == REGION
    assert stack.analyst.email in _text(page, "user") or "Ada Lovelace" in _text(page, "user")
    assert [r.strip() for r in _text(page, "roles").split(",")] == ["analyst"]
    path_keys = _listed_paths(page)
    assert path_keys == sorted(str(p["id"]) for p in demo_document()["paths"])
    assert page.locator("form.edit-path").count() == 0  # no edit controls for a role that cannot edit

    me = _fetch(page, "GET", "/admin/api/me")
    assert me["status"] == 200, me
    body = me["json"]
    assert body["tenant"] == {"slug": stack.slug, "name": f"Tenant {stack.slug}", "home_region": REGION}
    assert body["roles"] == ["analyst"] and body["user"]["email"] == stack.analyst.email
    assert body["csrf_token"] and body["expires_at"]
    assert stack.other not in json.dumps(body)

    # an analyst reads, exports, and edits nothing (even with the right CSRF token)
    csrf = {"X-CSRF-Token": str(body["csrf_token"])}
    refused = _fetch(page, "PATCH", f"/admin/api/paths/{path_keys[0]}", {"name": "Renamed"}, csrf)
    assert refused["status"] == 403 and refused["type"].startswith("application/problem+json"), refused
    export = _fetch(page, "GET", "/admin/api/users/nobody-here/export")
    assert export["status"] != 403, export

    # another tenant: its login goes to its own realm, which knows nobody here; the session stays ours
    page.goto(f"{stack.base}/admin/login?tenant={stack.other}")
    page.wait_for_url(f"{stack.keycloak.base}/realms/{stack.realm(stack.other)}/**")
    assert page.locator("#username").is_visible()  # its realm's own login form, no IdP, no account
    page.goto(f"{stack.base}/admin/")
    assert _text(page, "tenant") == stack.slug
    me = _fetch(page, "GET", "/admin/api/me")
    assert me["status"] == 200 and me["json"]["tenant"]["slug"] == stack.slug, me

    assert _realm_sessions(stack, stack.slug, stack.analyst.email) == 1
    page.get_by_test_id("logout").click()
    page.wait_for_url(f"{stack.base}/admin/logged-out")
    assert page.get_by_test_id("logged-out").is_visible()
    assert _realm_sessions(stack, stack.slug, stack.analyst.email) == 0  # Keycloak's session ended too
    gone = _fetch(page, "GET", "/admin/api/me")
    assert gone["status"] == 401 and gone["type"].startswith("application/problem+json"), gone
    page.goto(f"{stack.base}/admin/")
    assert urlsplit(page.url).path == "/admin/signin"


def test_editor_group_member_gets_the_editor_role(stack: Stack, page: Page) -> None:
    try:
        _login(page, stack, stack.editor)
    except Exception as exc:
        raise AssertionError(f"login did not reach /admin/ (at {page.url}): {exc}\n{stack.server_log()}") from exc
    assert _text(page, "tenant") == stack.slug
    assert [r.strip() for r in _text(page, "roles").split(",")] == ["editor"]
    me = _fetch(page, "GET", "/admin/api/me")
    assert me["status"] == 200 and me["json"]["roles"] == ["editor"], me
    assert _realm_roles_of(stack, stack.slug, stack.editor.email) == {"editor"}

    # an editor edits: the dashboard's own form (PATCH with the page's CSRF token) makes a new version
    key = _listed_paths(page)[0]
    form = page.locator(f'form.edit-path[data-key="{key}"]')
    form.locator("input[name=name]").fill("Renamed through SSO")
    form.get_by_role("button", name="Rename").click()
    expect(page.get_by_test_id("status")).to_contain_text("Saved: version")
    listed = _fetch(page, "GET", "/admin/api/paths")
    assert listed["status"] == 200, listed
    assert next(p for p in listed["json"] if p["key"] == key)["name"] == "Renamed through SSO"

    page.get_by_test_id("logout").click()
    page.wait_for_url(f"{stack.base}/admin/logged-out")
    assert _fetch(page, "GET", "/admin/api/me")["status"] == 401
