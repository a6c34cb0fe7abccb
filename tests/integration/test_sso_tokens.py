"""Access tokens from a real Keycloak (deploy/local/keycloak.sh), validated by the platform itself.

Two tenant realms, each with confidential clients whose service accounts get tokens by client
credentials: ``app`` (audience firstmile-api, the tenant claim), ``no-audience`` (the tenant claim
only), ``short`` (as ``app``, with a 2 s token lifespan) and, in the first realm, ``liar`` (the other
tenant's slug in the tenant claim).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from firstmile.sso.tokens import RealmNaming, TokenError, TokenReason, TokenValidator
from tests.support.keycloak import AUDIENCE, CLAIM, Server, client_credentials_token
from tests.support.keycloak import b64 as _b64
from tests.support.keycloak import client as _client
from tests.support.keycloak import mappers as _mappers
from tests.support.keycloak import payload as _payload
from tests.support.keycloak import server as _server

pytestmark = pytest.mark.xdist_group("keycloak")


@dataclass(frozen=True)
class Tenant:
    slug: str
    realm: str
    secrets: dict[str, str]  # client id -> secret


def _make_tenant(server: Server, slug: str, other_slug: str, naming: RealmNaming) -> Tenant:
    realm = naming.realm(slug)
    server.admin.create_realm({"realm": realm, "enabled": True})
    server.admin.change_current_realm(realm)
    clients = {
        "app": _mappers(slug, audience=True),
        "no-audience": _mappers(slug, audience=False),
        "short": _mappers(slug, audience=True),
        "liar": _mappers(other_slug, audience=True),
    }
    made: dict[str, str] = {}
    for client_id, mappers in clients.items():
        secret = secrets.token_urlsafe(24)
        attributes = {"access.token.lifespan": "2"} if client_id == "short" else {}
        server.admin.create_client(_client(client_id, secret, mappers, attributes=attributes))
        made[client_id] = secret
    server.admin.change_current_realm("master")
    return Tenant(slug, realm, made)


@dataclass(frozen=True)
class Realms:
    server: Server
    naming: RealmNaming
    a: Tenant
    b: Tenant


@pytest.fixture(scope="module")
def realms(keycloak_url: str) -> Iterator[Realms]:
    server = _server(keycloak_url)
    naming = RealmNaming(server.base)
    a_slug, b_slug = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
    try:
        a = _make_tenant(server, a_slug, b_slug, naming)
        b = _make_tenant(server, b_slug, a_slug, naming)
        yield Realms(server, naming, a, b)
    finally:
        server.admin.change_current_realm("master")
        for slug in (a_slug, b_slug):
            if any(r["realm"] == naming.realm(slug) for r in server.admin.get_realms()):
                server.admin.delete_realm(naming.realm(slug))


def token(realms: Realms, tenant: Tenant, client_id: str = "app", base: str | None = None) -> str:
    return client_credentials_token(base or realms.server.base, tenant.realm, client_id, tenant.secrets[client_id])


def validator(realms: Realms, **kwargs: Any) -> TokenValidator:
    return TokenValidator(realms.naming, audience=AUDIENCE, tenant_claim=CLAIM, **kwargs)


async def refused(v: TokenValidator, access: str, tenant: str | None) -> TokenReason:
    with pytest.raises(TokenError) as caught:
        await v.validate(access, tenant)
    return caught.value.reason


async def test_a_token_of_the_tenant_realm_passes(realms: Realms) -> None:
    v = validator(realms)
    try:
        access = token(realms, realms.a)
        checked = await v.validate(access, realms.a.slug)
        assert checked.tenant_slug == realms.a.slug
        assert checked.client_id == "app"
        assert checked.issuer == f"{realms.server.base}/realms/firstmile-{realms.a.slug}"
        assert checked.claims[CLAIM] == realms.a.slug
        # without a tenant given, the realm in iss decides it
        assert (await v.validate(token(realms, realms.b), None)).tenant_slug == realms.b.slug
        assert v.jwks.fetches == 2  # one JWKS per realm, then cached
        await v.validate(access, realms.a.slug)
        assert v.jwks.fetches == 2
    finally:
        await v.aclose()


async def test_tampered_foreign_and_misaddressed_tokens_are_refused(realms: Realms) -> None:
    v = validator(realms)
    try:
        access = token(realms, realms.a)
        head, body, sig = access.split(".")
        tampered = f"{head}.{_b64({**_payload(access), 'scope': 'users:admin audit:read'})}.{sig}"
        assert await refused(v, tampered, realms.a.slug) == TokenReason.BAD_SIGNATURE
        # a signature of realm b on a payload of realm a
        b_sig = token(realms, realms.b).split(".")[2]
        assert await refused(v, f"{head}.{body}.{b_sig}", realms.a.slug) == TokenReason.BAD_SIGNATURE

        # the other tenant's realm, with a valid token of its own
        assert await refused(v, token(realms, realms.b), realms.a.slug) == TokenReason.WRONG_TENANT
        # realm a's client that claims to be tenant b
        assert await refused(v, token(realms, realms.a, "liar"), realms.a.slug) == TokenReason.WRONG_TENANT
        assert await refused(v, token(realms, realms.a, "liar"), None) == TokenReason.WRONG_TENANT
        # no firstmile-api audience
        assert await refused(v, token(realms, realms.a, "no-audience"), realms.a.slug) == TokenReason.WRONG_AUDIENCE
        # the same realm reached under another host name: Keycloak (no fixed hostname in dev mode)
        # issues it with that issuer
        other_host = realms.server.base.replace("127.0.0.1", "localhost")
        misissued = token(realms, realms.a, base=other_host)
        assert _payload(misissued)["iss"].startswith("http://localhost:")
        assert await refused(v, misissued, realms.a.slug) == TokenReason.WRONG_ISSUER
    finally:
        await v.aclose()


async def test_a_master_realm_token_is_a_wrong_issuer(realms: Realms) -> None:
    admin_token = realms.server.admin.connection.token
    assert admin_token is not None
    v = validator(realms)
    try:
        assert await refused(v, admin_token["access_token"], None) == TokenReason.WRONG_ISSUER
        assert v.jwks.fetches == 0
    finally:
        await v.aclose()


async def test_an_expired_token_is_refused(realms: Realms) -> None:
    v = validator(realms, leeway=0)
    try:
        access = token(realms, realms.a, "short")
        claims = _payload(access)
        assert claims["exp"] - claims["iat"] == 2
        await v.validate(access, realms.a.slug)  # still fresh
        await asyncio.sleep(3.2)
        assert await refused(v, access, realms.a.slug) == TokenReason.EXPIRED
    finally:
        await v.aclose()


async def test_key_rotation_fetches_the_new_jwks(realms: Realms) -> None:
    v = validator(realms, jwks_min_refetch=0)
    admin = realms.server.admin
    try:
        before = token(realms, realms.b)
        await v.validate(before, realms.b.slug)
        fetches = v.jwks.fetches

        admin.change_current_realm(realms.b.realm)
        realm_id = admin.get_realm(realms.b.realm)["id"]
        admin.create_component(
            {
                "name": "rotated-in",
                "providerId": "rsa-generated",
                "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": realm_id,
                "config": {"priority": ["200"], "enabled": ["true"], "active": ["true"], "keySize": ["2048"]},
            }
        )
        admin.change_current_realm("master")

        after = token(realms, realms.b)
        new_kid = json.loads(base64.urlsafe_b64decode(after.split(".")[0] + "==="))["kid"]
        old_kid = json.loads(base64.urlsafe_b64decode(before.split(".")[0] + "==="))["kid"]
        assert new_kid != old_kid
        checked = await v.validate(after, realms.b.slug)
        assert checked.key_id == new_kid
        assert v.jwks.fetches == fetches + 1  # the unknown kid made exactly one refetch
        await v.validate(before, realms.b.slug)  # the old key is still published and still good
        assert v.jwks.fetches == fetches + 1
    finally:
        admin.change_current_realm("master")
        await v.aclose()


async def test_an_unknown_realm_is_jwks_unavailable(realms: Realms) -> None:
    v = validator(realms)
    try:
        access = token(realms, realms.a)
        ghost = f"t-{secrets.token_hex(4)}"
        head, _, sig = access.split(".")
        forged = {**_payload(access), "iss": realms.naming.issuer(ghost), CLAIM: ghost}
        # the realm does not exist: its JWKS cannot be fetched (404), so nothing verifies
        assert await refused(v, f"{head}.{_b64(forged)}.{sig}", None) == TokenReason.JWKS_UNAVAILABLE
    finally:
        await v.aclose()
