"""What the tenant realm's SAML broker refuses, against the real Keycloak, and how refusals reach the audit log.

A tenant (database row and realm, provisioned by :class:`KeycloakProvisioner` from a manifest whose
``sso.saml.metadata_xml`` names a test IdP whose key the test holds) is logged in to through the
broker ``customer-idp`` with responses the test writes (:mod:`tests.support.saml`):

- the positive control first: a correctly signed response goes through first-broker-login to the
  admin client's redirect URI with a code that PKCE redeems for the tenant's token. Without it a
  refusal could just as well mean a broken harness;
- then each forgery, refused with HTTP 400, no redirect, no code and no new Keycloak user: no
  signature, the wrong key, XML Signature Wrapping (Somorovsky et al. 2012: XSW1-4, 7, 8), replay,
  expired conditions or subject confirmation, wrong audience, recipient, destination, InResponseTo;
- and what Keycloak accepts that is worth knowing: an unsigned Response around a signed assertion,
  and the ACS URL as an audience.

After each refusal :class:`KeycloakEventSync` copies the failure into the tenant's audit log as
``sso.login_failed`` with Keycloak's error; a second run adds nothing, the other tenant gets nothing.
One realm for the module (provisioning costs seconds), a fresh login (AuthnRequest) per case.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from click.testing import CliRunner
from lxml import etree
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.cli import main
from firstmile.settings import get_settings
from firstmile.sso.events import LOGIN_FAILED, EventSyncError, KeycloakEventSync
from firstmile.sso.provisioning import IDP_ALIAS, KeycloakProvisioner
from firstmile.tenancy.manifest import SsoSpec
from tests.conftest import Database, TenantFixture, new_tenant, sequenced
from tests.support import saml
from tests.support.keycloak import Server, server

pytestmark = pytest.mark.xdist_group("keycloak")

REDIRECT = "https://admin.firstmile.test/admin/callback"
CLIENT = "firstmile-admin"


@dataclass
class Setup:
    kc: Server
    provisioner: KeycloakProvisioner
    idp: saml.SamlIdp
    tenant: TenantFixture
    other: TenantFixture
    sync: KeycloakEventSync

    @property
    def realm(self) -> str:
        return self.provisioner.realm_name(self.tenant.slug)

    def users(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.kc.admin.connection.raw_get(
            f"admin/realms/{self.realm}/users", max="1000"
        ).json()
        return found

    def start(self, http: httpx.Client) -> tuple[saml.Login, saml.AuthnRequest]:
        return saml.start_login(http, self.kc.base, self.realm, CLIENT, REDIRECT)

    def signed(self, request: saml.AuthnRequest, subject: saml.Subject | None = None, **kw: Any) -> etree._Element:
        """A response whose assertion is signed with the IdP's key (the response itself unsigned)."""
        response = saml.build_response(self.idp, request, subject or saml.Subject(), **kw)
        saml.sign(saml.assertion_of(response), self.idp.key)
        return response

    def fully_signed(self, request: saml.AuthnRequest, subject: saml.Subject | None = None) -> etree._Element:
        """Assertion and response both signed, as Keycloak, ADFS or Entra ID (configured so) send them."""
        return saml.sign(self.signed(request, subject), self.idp.key)


@pytest.fixture(scope="module")
def kc(keycloak_url: str) -> Server:
    return server(keycloak_url)


@pytest.fixture(scope="module")
async def setup(kc: Server, admin_engine: AsyncEngine, app_engine: AsyncEngine) -> AsyncIterator[Setup]:
    prefix = f"fms{secrets.token_hex(3)}-"
    provisioner = KeycloakProvisioner(kc.admin, realm_prefix=prefix, redirect_uris=(REDIRECT,))
    idp = saml.make_idp()
    tenant = await new_tenant(admin_engine)
    other = await new_tenant(admin_engine)
    sso = SsoSpec.model_validate(
        {"group_roles": {"Admins": "owner"}, "saml": {"metadata_xml": idp.metadata_xml(), "entity_id": idp.entity_id}}
    )
    try:
        await asyncio.to_thread(provisioner.apply, tenant.manifest.model_copy(update={"sso": sso}))
        await asyncio.to_thread(provisioner.apply, other.manifest)  # a realm of its own, no SAML
        # the test's own prefix: only these two realms are synced here, whatever else runs
        yield Setup(kc, provisioner, idp, tenant, other, KeycloakEventSync(kc.admin, app_engine, realm_prefix=prefix))
    finally:
        kc.admin.change_current_realm("master")
        for realm in kc.admin.get_realms():
            if str(realm["realm"]).startswith(prefix):
                kc.admin.delete_realm(realm["realm"])


@pytest.fixture
def browser() -> Iterator[httpx.Client]:
    with saml.browser() as client:
        yield client


async def _failures(admin_engine: AsyncEngine, tenant: TenantFixture) -> list[tuple[str, str, dict[str, Any]]]:
    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT actor, subject, payload FROM audit_entries WHERE tenant_id = :t AND kind = :k ORDER BY seq"),
            {"t": tenant.id, "k": LOGIN_FAILED},
        )
        return [(str(r[0]), str(r[1]), dict(r[2])) for r in rows]


def _finish(http: httpx.Client, answer: httpx.Response, login: saml.Login) -> str | None:
    """Follow Keycloak's redirects after an accepted response up to the client's redirect URI; the code."""
    for _ in range(10):
        location = answer.headers.get("location")
        assert answer.status_code in (302, 303) and location, f"stopped at HTTP {answer.status_code}"
        if location.startswith(REDIRECT):
            return saml.code_of(location, login)
        answer = http.get(location, follow_redirects=False)
    raise AssertionError("too many redirects")


def _redeem(s: Setup, code: str, login: saml.Login) -> dict[str, Any]:
    token = httpx.post(
        f"{s.kc.base}/realms/{s.realm}/protocol/openid-connect/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": CLIENT,
            "code_verifier": login.verifier,
        },
    )
    assert token.status_code == 200, token.text
    claims: dict[str, Any] = jwt.decode(token.json()["access_token"], options={"verify_signature": False})
    return claims


def _assert_refused(answer: httpx.Response, page: str = "login-error") -> None:
    """A Keycloak page with HTTP 400 and no redirect (so no code): by default the "We are sorry" error page."""
    assert answer.status_code == 400, (answer.status_code, answer.headers.get("location"))
    assert "location" not in answer.headers
    assert "code=" not in answer.text
    assert f'data-page-id="{page}"' in answer.text


def test_the_broker_is_provisioned_with_every_check_keycloak_offers(setup: Setup) -> None:
    idp = setup.kc.admin.connection.raw_get(f"admin/realms/{setup.realm}/identity-provider/instances/{IDP_ALIAS}")
    config = idp.json()["config"]
    assert config["validateSignature"] == "true" and config["wantAssertionsSigned"] == "true"
    assert config["postBindingResponse"] == "true" and config["allowedClockSkew"] == "5"
    assert config["signingCertificate"] == setup.idp.key.cert_base64  # pinned from the manifest's metadata
    assert config.get("useMetadataDescriptorUrl", "false") == "false"


# -- the positive control --------------------------------------------------------------------


async def test_a_correctly_signed_response_logs_in_with_a_code(
    setup: Setup, browser: httpx.Client, admin_engine: AsyncEngine
) -> None:
    subject = saml.Subject(groups=("Admins",))
    login, request = setup.start(browser)
    assert request.acs_url == f"{setup.kc.base}/realms/{setup.realm}/broker/{IDP_ALIAS}/endpoint"
    assert request.issuer == f"{setup.kc.base}/realms/{setup.realm}"  # the SP entity id, our audience
    answer = saml.post_response(browser, request, setup.fully_signed(request, subject))
    assert answer.status_code in (302, 303) and "first-broker-login" in answer.headers["location"]
    code = _finish(browser, answer, login)
    assert code is not None
    claims = _redeem(setup, code, login)
    assert claims["firstmile_tenant"] == setup.tenant.slug
    assert "owner" in claims["realm_access"]["roles"]  # the groups attribute went through the mapper
    assert subject.name_id in [u["username"] for u in setup.users()]
    # a successful login is no failure: nothing for the audit log
    before = await _failures(admin_engine, setup.tenant)
    assert await setup.sync.run_once() == 0
    assert await _failures(admin_engine, setup.tenant) == before


def test_an_unsigned_response_around_a_signed_assertion_is_accepted(setup: Setup, browser: httpx.Client) -> None:
    """Keycloak 26 requires no Response signature when the assertion is signed (no setting for it):
    the assertion is what it trusts, and it is what the wrapping tests below attack."""
    login, request = setup.start(browser)
    answer = saml.post_response(browser, request, setup.signed(request))
    assert _finish(browser, answer, login) is not None


def test_the_acs_url_is_accepted_as_an_audience(setup: Setup, browser: httpx.Client) -> None:
    """Keycloak accepts the SP entity id and the response's Destination (the ACS URL) as audiences."""
    login, request = setup.start(browser)
    answer = saml.post_response(browser, request, setup.signed(request, audience=request.acs_url))
    assert _finish(browser, answer, login) is not None


# -- forgeries -------------------------------------------------------------------------------

EVIL = saml.Subject(name_id="mallory", email="mallory@evil.test", name="Mallory", groups=("Admins",))
WRONG_KEY = saml.signing_key("not-the-idp")
PAST = timedelta(minutes=2)


def _unsigned(s: Setup, r: saml.AuthnRequest) -> etree._Element:
    return saml.build_response(s.idp, r, EVIL)


def _wrong_key(s: Setup, r: saml.AuthnRequest) -> etree._Element:
    response = saml.build_response(s.idp, r, EVIL)
    saml.sign(saml.assertion_of(response), WRONG_KEY)
    return saml.sign(response, WRONG_KEY)


def _response_signed_only(s: Setup, r: saml.AuthnRequest) -> etree._Element:
    return saml.sign(saml.build_response(s.idp, r, EVIL), s.idp.key)


def _tampered(s: Setup, r: saml.AuthnRequest) -> etree._Element:
    """Signed, then the NameID changed: the digest no longer matches."""
    response = s.fully_signed(r)
    name_id = response.find(f".//{{{saml.SAML}}}NameID")
    assert name_id is not None
    name_id.text = EVIL.name_id
    return response


def _expired(s: Setup, r: saml.AuthnRequest, where: str) -> etree._Element:
    past = datetime.now(UTC) - PAST
    if where == "conditions":
        return s.signed(r, conditions_not_on_or_after=past)
    return s.signed(r, confirmation_not_on_or_after=past)


Forge = Callable[[Setup, saml.AuthnRequest], etree._Element]
CASES: dict[str, tuple[Forge, str, str | None]] = {
    # name: (forgery, Keycloak's error, its reason detail)
    "unsigned response and assertion": (_unsigned, "invalid_signature", None),
    "signed with the wrong key": (_wrong_key, "invalid_signature", None),
    "signed, then the subject changed": (_tampered, "invalid_signature", None),
    "response signed, assertion not": (_response_signed_only, "invalid_signature", None),
    "XSW1 signed response nested in its signature": (
        lambda s, r: saml.xsw1(s.fully_signed(r), EVIL),
        "invalid_signature",
        None,
    ),
    "XSW2 signed response before its detached signature": (
        lambda s, r: saml.xsw2(s.fully_signed(r), EVIL),
        "invalid_saml_response",
        "invalid_saml_document",
    ),
    "XSW3 evil assertion before the signed one": (
        lambda s, r: saml.xsw3(s.signed(r), EVIL),
        "invalid_signature",
        None,
    ),
    "XSW4 signed assertion inside the evil one": (
        lambda s, r: saml.xsw4(s.signed(r), EVIL),
        "invalid_saml_response",
        "invalid_saml_document",
    ),
    "XSW7 signed assertion moved into Extensions": (
        lambda s, r: saml.xsw7(s.signed(r), EVIL),
        "invalid_signature",
        None,
    ),
    "XSW8 signed assertion in the evil one's Signature Object": (
        lambda s, r: saml.xsw8(s.signed(r), EVIL),
        "invalid_signature",
        None,
    ),
    "Conditions NotOnOrAfter in the past": (
        lambda s, r: _expired(s, r, "conditions"),
        "invalid_saml_response",
        None,
    ),
    "SubjectConfirmationData NotOnOrAfter in the past": (
        lambda s, r: _expired(s, r, "confirmation"),
        "invalid_saml_response",
        None,
    ),
    "issued in the future (NotBefore beyond the skew)": (
        lambda s, r: s.signed(r, now=datetime.now(UTC) + timedelta(minutes=2)),
        "invalid_saml_response",
        None,
    ),
    "another SP's audience": (
        lambda s, r: s.signed(r, audience="https://other-sp.example/saml"),
        "invalid_saml_response",
        None,
    ),
    "another recipient": (
        lambda s, r: s.signed(r, recipient="https://other-sp.example/saml/acs"),
        "invalid_saml_response",
        None,
    ),
    "another destination": (
        lambda s, r: s.signed(r, destination="https://other-sp.example/saml/acs"),
        "invalid_saml_response",
        "invalid_destination",
    ),
    "an answer to another request": (
        lambda s, r: s.signed(r, in_response_to="ID_someone-elses-request"),
        "invalid_saml_response",
        None,
    ),
}


async def _sync_until_written(s: Setup, within_s: float = 3.0) -> int:
    """Run the sync until it writes something (Keycloak may commit an event just after its answer)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        written = await s.sync.run_once()
        if written or asyncio.get_running_loop().time() > deadline:
            return written
        await asyncio.sleep(0.1)


async def _one_failure_audited(
    s: Setup, admin_engine: AsyncEngine, error: str, reason: str | None, event_type: str
) -> dict[str, Any]:
    before = await _failures(admin_engine, s.tenant)
    assert await _sync_until_written(s) == 1
    after = await _failures(admin_engine, s.tenant)
    assert len(after) == len(before) + 1
    actor, subject, payload = after[-1]
    assert actor == f"keycloak:{s.realm}"
    assert payload["keycloak_event_type"] == event_type
    assert payload["error"] == error and payload["reason"] == reason
    assert payload["keycloak_event_id"] and payload["time"].startswith(str(datetime.now(UTC).year))
    assert subject.startswith(("idp:", "user:", "realm:"))
    assert not {"ipAddress", "ip_address", "username", "email"} & set(payload)
    assert EVIL.email not in str(payload) and "127.0.0.1" not in str(payload)
    return payload


@pytest.mark.parametrize("case", list(CASES))
async def test_a_forged_response_is_refused_and_audited(
    case: str, setup: Setup, browser: httpx.Client, admin_engine: AsyncEngine
) -> None:
    forge, error, reason = CASES[case]
    users = setup.users()
    _, request = setup.start(browser)
    forged = forge(setup, request)
    answer = await asyncio.to_thread(saml.post_response, browser, request, forged)
    _assert_refused(answer)
    assert setup.users() == users, f"{case}: Keycloak's users changed ({saml.describe(forged)})"
    await _one_failure_audited(setup, admin_engine, error, reason, "IDENTITY_PROVIDER_RESPONSE_ERROR")


async def test_a_replayed_response_is_refused(setup: Setup, admin_engine: AsyncEngine) -> None:
    """The victim's accepted response, posted again: by the victim's browser, by an attacker's browser
    with the victim's RelayState, and in the attacker's own login. Keycloak binds a response to one
    authentication session (RelayState, cookie, InResponseTo); that session is used up."""
    victim = saml.browser()
    attacker = saml.browser()
    try:
        login, request = setup.start(victim)
        captured = saml.encode(setup.fully_signed(request))
        assert _finish(victim, saml.post_response(victim, request, captured), login) is not None
        await setup.sync.run_once()
        users = setup.users()

        # the victim's own session has logged in already: an info page, still 400 and no code
        _assert_refused(saml.post_response(victim, request, captured), page="login-info")
        await _one_failure_audited(setup, admin_engine, "already_logged_in", None, "IDENTITY_PROVIDER_LOGIN_ERROR")

        _assert_refused(saml.post_response(attacker, request, captured))
        await _one_failure_audited(setup, admin_engine, "cookie_not_found", None, "IDENTITY_PROVIDER_LOGIN_ERROR")

        _, own = setup.start(attacker)
        own_answer = attacker.post(
            own.acs_url, data={"SAMLResponse": captured, "RelayState": own.relay_state}, follow_redirects=False
        )
        _assert_refused(own_answer)
        await _one_failure_audited(
            setup, admin_engine, "invalid_saml_response", None, "IDENTITY_PROVIDER_RESPONSE_ERROR"
        )
        assert setup.users() == users
    finally:
        victim.close()
        attacker.close()


# -- the sync itself ---------------------------------------------------------------------------


async def _refuse_one(s: Setup, admin_engine: AsyncEngine) -> str:
    """Post an unsigned response, copy the failure; the copied Keycloak event id."""
    with saml.browser() as http:
        _, request = s.start(http)
        _assert_refused(await asyncio.to_thread(saml.post_response, http, request, _unsigned(s, request)))
    assert await _sync_until_written(s) == 1
    return str((await _failures(admin_engine, s.tenant))[-1][2]["keycloak_event_id"])


async def _cursor(admin_engine: AsyncEngine, s: Setup) -> tuple[int, list[str]]:
    async with admin_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT last_event_time, last_event_ids FROM sso_event_cursors WHERE tenant_id = :t AND realm = :r"
                ),
                {"t": s.tenant.id, "r": s.realm},
            )
        ).one()
    return int(row[0]), list(row[1])


async def test_a_second_run_writes_nothing_and_the_other_tenant_gets_nothing(
    setup: Setup, admin_engine: AsyncEngine
) -> None:
    await _refuse_one(setup, admin_engine)
    before = await _failures(admin_engine, setup.tenant)
    assert await setup.sync.run_once() == 0
    assert await setup.sync.run_once() == 0
    assert await _failures(admin_engine, setup.tenant) == before
    assert await _failures(admin_engine, setup.other) == []
    time, ids = await _cursor(admin_engine, setup)
    assert time > 0 and ids


async def test_events_of_the_same_millisecond_are_copied_once(setup: Setup, admin_engine: AsyncEngine) -> None:
    """A cursor at the newest event's millisecond that lacks its id: that event, and only it, is copied again."""
    event_id = await _refuse_one(setup, admin_engine)
    time, ids = await _cursor(admin_engine, setup)
    assert event_id in ids
    async with admin_engine.begin() as conn:
        await conn.execute(
            text("UPDATE sso_event_cursors SET last_event_ids = :ids WHERE tenant_id = :t AND realm = :r"),
            {"ids": [i for i in ids if i != event_id], "t": setup.tenant.id, "r": setup.realm},
        )
    assert await setup.sync.run_once() == 1
    assert (await _failures(admin_engine, setup.tenant))[-1][2]["keycloak_event_id"] == event_id
    assert await setup.sync.run_once() == 0
    assert await _cursor(admin_engine, setup) == (time, ids)


def _newest_event_id(s: Setup) -> str | None:
    events = s.kc.admin.connection.raw_get(f"admin/realms/{s.realm}/events", max="1").json()
    return str(events[0]["id"]) if events else None


async def test_cli_sync_events(
    setup: Setup,
    admin_engine: AsyncEngine,
    database: Database,
    keycloak_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """`firstmile sso sync-events` as an operator runs it: the app role's database URL, the provisioning admin."""
    parts = urlsplit(keycloak_url)
    password_file = tmp_path / "keycloak-admin-password"
    password_file.write_text(f"{parts.password}\n")
    newest = _newest_event_id(setup)
    with saml.browser() as http:
        _, request = setup.start(http)
        _assert_refused(await asyncio.to_thread(saml.post_response, http, request, _unsigned(setup, request)))
    for _ in range(30):  # the CLI runs once: wait until Keycloak has saved the event
        if _newest_event_id(setup) != newest:
            break
        await asyncio.sleep(0.1)
    before = await _failures(admin_engine, setup.tenant)
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.app_url)
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_URL", setup.kc.base)
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_USER", str(parts.username))
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("FIRSTMILE_SSO_REALM_PREFIX", setup.provisioner.realm_prefix)
    get_settings.cache_clear()
    try:
        first = await asyncio.to_thread(CliRunner().invoke, main, ["sso", "sync-events"])
        again = await asyncio.to_thread(CliRunner().invoke, main, ["sso", "sync-events"])
        monkeypatch.delenv("FIRSTMILE_KEYCLOAK_ADMIN_USER")
        get_settings.cache_clear()
        unset = await asyncio.to_thread(CliRunner().invoke, main, ["sso", "sync-events"])
    finally:
        get_settings.cache_clear()
    assert first.exit_code == 0 and "1 failed login(s) audited" in first.output, first.output
    assert again.exit_code == 0 and "0 failed login(s) audited" in again.output, again.output
    assert unset.exit_code != 0 and "FIRSTMILE_KEYCLOAK_ADMIN_USER" in unset.output
    after = await _failures(admin_engine, setup.tenant)
    assert len(after) == len(before) + 1 and after[-1][2]["error"] == "invalid_signature"


async def test_keycloak_unreachable_is_logged_and_retried_not_raised(app_engine: AsyncEngine) -> None:
    from keycloak import KeycloakAdmin, KeycloakOpenIDConnection

    nowhere = KeycloakAdmin(
        connection=KeycloakOpenIDConnection(
            server_url="http://127.0.0.1:9", username="admin", password="x", realm_name="master", timeout=2
        )
    )
    sync = KeycloakEventSync(nowhere, app_engine, realm_prefix="fms-none-")
    with pytest.raises(EventSyncError):
        await sync.run_once()
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop, interval_s=0.05))
    await asyncio.sleep(0.3)
    assert not task.done()  # still trying, not crashed
    stop.set()
    await asyncio.wait_for(task, timeout=5)
