"""What the tenant realm's SAML broker refuses, against the real Keycloak, and how refusals reach the audit log.

A tenant (database row and realm, provisioned by :class:`KeycloakProvisioner` from a manifest whose
``sso.saml.metadata_xml`` names a test IdP whose key the test holds) is logged in to through the
broker ``customer-idp`` with responses the test writes (:mod:`tests.support.saml`):

- the positive control first: a correctly signed response goes through first-broker-login to the
  admin client's redirect URI with a code that PKCE redeems for the tenant's token. Without it a
  refusal could just as well mean a broken harness;
- and what Keycloak accepts that is worth knowing: an unsigned Response around a signed assertion,
  and the ACS URL as an audience.

One realm for the module (provisioning costs seconds), a fresh login (AuthnRequest) per case.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from lxml import etree
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.sso.provisioning import IDP_ALIAS, KeycloakProvisioner
from firstmile.tenancy.manifest import SsoSpec
from tests.conftest import TenantFixture, new_tenant
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
async def setup(kc: Server, admin_engine: AsyncEngine) -> AsyncIterator[Setup]:
    prefix = f"fms{secrets.token_hex(3)}-"
    provisioner = KeycloakProvisioner(kc.admin, realm_prefix=prefix, redirect_uris=(REDIRECT,))
    idp = saml.make_idp()
    tenant = await new_tenant(admin_engine)
    sso = SsoSpec.model_validate(
        {"group_roles": {"Admins": "owner"}, "saml": {"metadata_xml": idp.metadata_xml(), "entity_id": idp.entity_id}}
    )
    try:
        await asyncio.to_thread(provisioner.apply, tenant.manifest.model_copy(update={"sso": sso}))
        yield Setup(kc, provisioner, idp, tenant)
    finally:
        kc.admin.change_current_realm("master")
        for realm in kc.admin.get_realms():
            if str(realm["realm"]).startswith(prefix):
                kc.admin.delete_realm(realm["realm"])


@pytest.fixture
def browser() -> Iterator[httpx.Client]:
    with saml.browser() as client:
        yield client


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


# -- the positive control --------------------------------------------------------------------


def test_a_correctly_signed_response_logs_in_with_a_code(setup: Setup, browser: httpx.Client) -> None:
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
