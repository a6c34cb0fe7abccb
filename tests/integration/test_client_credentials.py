"""Machine access with OAuth2 client-credentials tokens of the tenant's Keycloak realm, end to end.

Real Keycloak (deploy/local/keycloak.sh), real PostgreSQL: three tenants made with ``new_tenant``
(``home`` and ``other`` in this region, ``abroad`` homed in us-east-1), each with a realm
``firstmile-<slug>`` holding client scopes named like the platform's and confidential clients:
``app`` (``onboarding:write`` and ``events:write``), ``reader`` (``analytics:read`` only) and, in
``other``'s realm, ``liar`` (its tenant claim names ``home``). A fourth realm, ``stray``, has no tenant
row here. The API under test is a fresh app with ``FIRSTMILE_KEYCLOAK_URL`` set; the shared ``client``
fixture is an app without Keycloak.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.auth.resolver import KeyResolver
from firstmile.sso.tokens import RealmNaming
from firstmile.tenancy import keys as keylib
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant, sequenced
from tests.support.keycloak import (
    Server,
    client,
    client_credentials_token,
    client_scope,
    mappers,
    payload,
    server,
    with_claims,
)

pytestmark = pytest.mark.xdist_group("keycloak")

Client = AsyncTestClient[Litestar]


@dataclass(frozen=True)
class Realm:
    tenant: TenantFixture | None
    slug: str
    secrets: dict[str, str]  # client id -> secret


@dataclass(frozen=True)
class World:
    server: Server
    naming: RealmNaming
    home: Realm
    other: Realm
    abroad: Realm
    stray: Realm
    app: Litestar
    api: Client

    def token(self, realm: Realm, client_id: str = "app") -> str:
        return client_credentials_token(
            self.server.base, self.naming.realm(realm.slug), client_id, realm.secrets[client_id]
        )

    @property
    def fetches(self) -> int:
        resolver: KeyResolver = self.app.state.container.key_resolver
        assert resolver.tokens is not None
        return resolver.tokens.jwks.fetches


def _make_realm(
    srv: Server, naming: RealmNaming, tenant: TenantFixture | None, slug: str, liar_for: str | None
) -> Realm:
    realm = naming.realm(slug)
    srv.admin.create_realm({"realm": realm, "enabled": True})
    srv.admin.change_current_realm(realm)
    try:
        for name in keylib.SCOPES:
            srv.admin.create_client_scope(client_scope(name))
        clients: dict[str, tuple[str, list[str]]] = {
            "app": (slug, ["onboarding:write", "events:write"]),
            "reader": (slug, ["analytics:read"]),
        }
        if liar_for is not None:
            clients["liar"] = (liar_for, ["onboarding:write"])
        made: dict[str, str] = {}
        for client_id, (claim, scopes) in clients.items():
            secret = secrets.token_urlsafe(24)
            srv.admin.create_client(client(client_id, secret, mappers(claim, audience=True), default_scopes=scopes))
            made[client_id] = secret
    finally:
        srv.admin.change_current_realm("master")
    return Realm(tenant, slug, made)


@pytest.fixture(scope="module")
async def world(
    keycloak_url: str, admin_engine: AsyncEngine, database: Database, analytics_store: ChdbStore
) -> AsyncIterator[World]:
    srv = server(keycloak_url)
    naming = RealmNaming(srv.base)
    home = await new_tenant(admin_engine)
    other = await new_tenant(admin_engine)
    abroad = await new_tenant(admin_engine, region="us-east-1")
    stray_slug = f"t-{secrets.token_hex(5)}"  # a realm with no tenant here
    slugs = [home.slug, other.slug, abroad.slug, stray_slug]
    try:
        realms = (
            _make_realm(srv, naming, home, home.slug, None),
            _make_realm(srv, naming, other, other.slug, home.slug),
            _make_realm(srv, naming, abroad, abroad.slug, None),
            _make_realm(srv, naming, None, stray_slug, None),
        )
        app = create_app(make_settings(keycloak_url=srv.base), database.app_url, PEPPER, analytics=analytics_store)
        async with AsyncTestClient(app=app, raise_server_exceptions=False) as api:
            yield World(srv, naming, *realms, app=app, api=api)
    finally:
        srv.admin.change_current_realm("master")
        existing = {r["realm"] for r in srv.admin.get_realms()}
        for slug in slugs:
            if naming.realm(slug) in existing:
                srv.admin.delete_realm(naming.realm(slug))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(response: Any, reason: str | None = None) -> dict[str, Any]:
    """A 401 invalid-token problem that does not echo the token."""
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/invalid-token")
    if reason is not None:
        assert body["reason"] == reason and reason in body["detail"]
    return body


async def test_a_scoped_token_starts_a_user_and_reads_it(world: World) -> None:
    access = world.token(world.home)
    assert {"onboarding:write", "events:write"} <= set(payload(access)["scope"].split())
    started = await world.api.post("/v1/onboarding/start", json={"user_id": "cc-1"}, headers=bearer(access))
    assert started.status_code == 201, started.text
    read = await world.api.get("/v1/onboarding/cc-1", headers=bearer(access))
    assert read.status_code == 200 and read.json()["user_id"] == "cc-1"
    # the tenant's API key sees the same user: same tenant, either credential
    assert world.home.tenant is not None
    by_key = await world.api.get("/v1/onboarding/cc-1", headers=world.home.tenant.headers)
    assert by_key.status_code == 200


async def test_a_token_without_the_scope_is_403(world: World) -> None:
    access = world.token(world.home, "reader")
    assert "onboarding:write" not in payload(access)["scope"].split()
    response = await world.api.post("/v1/onboarding/start", json={"user_id": "cc-2"}, headers=bearer(access))
    assert response.status_code == 403
    body = response.json()
    assert body["type"].endswith("/forbidden") and body["required_scope"] == "onboarding:write"


async def test_another_tenants_realm_cannot_speak_for_this_tenant(world: World) -> None:
    home_token = world.token(world.home)
    assert (
        await world.api.post("/v1/onboarding/start", json={"user_id": "cc-mine"}, headers=bearer(home_token))
    ).status_code == 201
    # a client of the other realm whose tenant claim names this tenant
    liar = world.token(world.other, "liar")
    refused(await world.api.get("/v1/onboarding/cc-mine", headers=bearer(liar)), "wrong_tenant")
    # the other realm's token relabelled as issued by this tenant's realm: its signature is not this realm's
    other_token = world.token(world.other)
    relabelled = with_claims(other_token, iss=world.naming.issuer(world.home.slug), firstmile_tenant=world.home.slug)
    refused(await world.api.get("/v1/onboarding/cc-mine", headers=bearer(relabelled)))
    # the other tenant's own valid token acts for the other tenant only: this tenant's user is not there
    theirs = await world.api.get("/v1/onboarding/cc-mine", headers=bearer(other_token))
    assert theirs.status_code == 404


async def test_a_tampered_token_is_401_without_echoing_it(world: World) -> None:
    access = world.token(world.home, "reader")
    tampered = with_claims(access, scope="onboarding:write users:admin")
    response = await world.api.post("/v1/onboarding/start", json={"user_id": "cc-3"}, headers=bearer(tampered))
    body = refused(response, "bad_signature")
    assert tampered not in response.text and tampered.split(".")[1] not in response.text
    assert "cc-3" not in str(body)
    garbage = await world.api.get("/v1/onboarding/cc-3", headers=bearer("a.b.c"))
    refused(garbage, "malformed")


async def test_a_tenant_homed_elsewhere_gets_421(world: World) -> None:
    response = await world.api.post(
        "/v1/onboarding/start", json={"user_id": "cc-4"}, headers=bearer(world.token(world.abroad))
    )
    assert response.status_code == 421
    body = response.json()
    assert body["type"].endswith("/wrong-region") and body["home_region"] == "us-east-1"


async def test_unknown_realms_are_refused_without_fetching_keys(world: World) -> None:
    # warm up: this tenant's realm keys are fetched once
    started = await world.api.post(
        "/v1/onboarding/start", json={"user_id": "cc-6"}, headers=bearer(world.token(world.home))
    )
    assert started.status_code == 201
    before = world.fetches
    # a real token of a realm that has no tenant here
    stray = world.token(world.stray)
    refused(await world.api.get("/v1/onboarding/cc-6", headers=bearer(stray)), "wrong_tenant")
    # made-up realm names, many of them
    for _ in range(5):
        ghost = f"ghost-{secrets.token_hex(4)}"
        forged = with_claims(stray, iss=world.naming.issuer(ghost), firstmile_tenant=ghost)
        refused(await world.api.get("/v1/onboarding/cc-6", headers=bearer(forged)), "wrong_tenant")
    # an issuer that is no realm of ours at all
    foreign = with_claims(stray, iss="https://evil.example/realms/firstmile-x")
    refused(await world.api.get("/v1/onboarding/cc-6", headers=bearer(foreign)), "wrong_issuer")
    assert world.fetches == before


async def test_api_keys_keep_working_next_to_tokens(world: World) -> None:
    assert world.home.tenant is not None
    response = await world.api.post(
        "/v1/onboarding/start", json={"user_id": "cc-key"}, headers=world.home.tenant.headers
    )
    assert response.status_code == 201


async def test_without_keycloak_tokens_are_401_and_keys_work(world: World, client: Client) -> None:
    access = world.token(world.home)
    body = refused(await client.post("/v1/onboarding/start", json={"user_id": "cc-5"}, headers=bearer(access)))
    assert "no Keycloak is configured" in body["detail"]
    assert world.home.tenant is not None
    by_key = await client.post("/v1/onboarding/start", json={"user_id": "cc-5"}, headers=world.home.tenant.headers)
    assert by_key.status_code == 201


async def test_each_refused_token_of_a_tenant_realm_is_an_audit_entry(world: World, admin_engine: AsyncEngine) -> None:
    assert world.home.tenant is not None and world.other.tenant is not None

    async def refusals(tenant_id: object) -> list[dict[str, Any]]:
        await sequenced(admin_engine)
        async with admin_engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT payload FROM audit_entries WHERE tenant_id = :t AND kind = 'auth.token_refused' "
                    "ORDER BY seq"
                ),
                {"t": tenant_id},
            )
            return [r[0] for r in rows]

    home_before = len(await refusals(world.home.tenant.id))
    other_before = len(await refusals(world.other.tenant.id))
    tampered = with_claims(world.token(world.home, "reader"), scope="onboarding:write users:admin")
    refused(await world.api.get("/v1/onboarding/cc-audit", headers=bearer(tampered)), "bad_signature")
    expired = with_claims(world.token(world.home, "reader"), exp=1)
    refused(await world.api.get("/v1/onboarding/cc-audit", headers=bearer(expired)))
    liar = world.token(world.other, "liar")  # the other realm's client claiming this tenant
    refused(await world.api.get("/v1/onboarding/cc-audit", headers=bearer(liar)), "wrong_tenant")

    home = (await refusals(world.home.tenant.id))[home_before:]
    assert [(p["reason"], p["client_id"]) for p in home] == [("bad_signature", "reader"), ("bad_signature", "reader")]
    other = (await refusals(world.other.tenant.id))[other_before:]
    assert [(p["reason"], p["client_id"]) for p in other] == [("wrong_tenant", "liar")]
    # a valid token writes no refusal
    assert (await world.api.get("/v1/onboarding/cc-audit", headers=bearer(world.token(world.home)))).status_code == 404
    assert len(await refusals(world.home.tenant.id)) == home_before + 2
