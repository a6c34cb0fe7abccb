"""Machine clients from manifests (``sso.machine_clients``) against the real Keycloak and the real API.

The provisioner uses the platform's realm prefix (``firstmile-``) so the API, which finds a token's
realm by that prefix, accepts what it makes; every tenant slug is random and each test deletes the
realms it made (never by pruning, which would see other tests' realms).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakPostError
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.cli import main
from firstmile.settings import get_settings
from firstmile.sso.provisioning import (
    CLIENT_KIND_ATTRIBUTE,
    MANAGED_ATTRIBUTE,
    Change,
    KeycloakProvisioner,
    ProvisioningError,
)
from firstmile.tenancy.keys import SCOPES
from firstmile.tenancy.manifest import SsoSpec, TenantManifest
from tests.conftest import PEPPER, REGION, Database, make_settings, new_tenant, sequenced
from tests.factories import demo_document, manifest_for
from tests.support.keycloak import AUDIENCE, CLAIM, Server, client, client_scope, mappers, payload, server

pytestmark = pytest.mark.xdist_group("keycloak")

Client = AsyncTestClient[Litestar]
REDIRECTS = ("https://admin.firstmile.test/admin/callback",)


@pytest.fixture
def srv(keycloak_url: str) -> Server:
    return server(keycloak_url)


@pytest.fixture
def realms(srv: Server) -> Iterator[list[str]]:
    """Realm names a test made; deleted afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        srv.admin.change_current_realm("master")
        existing = {r["realm"] for r in srv.admin.get_realms()}
        for realm in made:
            if realm in existing:
                srv.admin.delete_realm(realm)


@pytest.fixture
def provisioner(srv: Server) -> KeycloakProvisioner:
    return KeycloakProvisioner(srv.admin, redirect_uris=REDIRECTS)


@pytest.fixture(scope="module")
async def api(keycloak_url: str, database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    """The API with Keycloak configured: it accepts the tenant realms' client-credentials tokens."""
    app = create_app(
        make_settings(keycloak_url=server(keycloak_url).base), database.app_url, PEPPER, analytics=analytics_store
    )
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as made:
        yield made


def _slug() -> str:
    return f"mc-{secrets.token_hex(4)}"


def _manifest(slug: str, *clients: tuple[str, list[str]]) -> TenantManifest:
    sso = SsoSpec.model_validate(
        {"machine_clients": [{"client_id": client_id, "scopes": scopes} for client_id, scopes in clients]}
    )
    return manifest_for(slug, REGION).model_copy(update={"sso": sso})


def _token(srv: Server, realm: str, client_id: str, secret: str, scope: str) -> str:
    oidc = KeycloakOpenID(server_url=srv.base, realm_name=realm, client_id=client_id, client_secret_key=secret)
    access: str = oidc.token(grant_type="client_credentials", scope=scope)["access_token"]
    return access


def _clients(srv: Server, realm: str) -> dict[str, dict[str, Any]]:
    """The realm's clients by client id, list values sorted (Keycloak returns the scope lists in any order)."""
    srv.admin.change_current_realm(realm)
    try:
        return {
            str(c["clientId"]): {k: sorted(v, key=str) if isinstance(v, list) else v for k, v in c.items()}
            for c in srv.admin.get_clients()
        }
    finally:
        srv.admin.change_current_realm("master")


def _platform_scopes(representation: dict[str, Any], which: str) -> set[str]:
    return {s for s in representation.get(which) or () if s in SCOPES}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_demo_machine_client_gets_tokens_the_api_accepts_with_the_requested_scope(
    srv: Server, provisioner: KeycloakProvisioner, realms: list[str], admin_engine: AsyncEngine, api: Client
) -> None:
    tenant = await new_tenant(admin_engine)
    manifest = manifest_for(tenant.slug, REGION, demo_document(sso=True))
    assert manifest.sso is not None
    [spec] = manifest.sso.machine_clients
    realm = provisioner.realm_name(tenant.slug)
    realms.append(realm)

    planned = provisioner.plan(manifest)  # a fresh realm: the plan-only branch lists the creations
    machine = [c for c in planned if c.kind == "client-scope" or c.name == spec.client_id]
    assert machine == [
        *(Change("create", "client-scope", realm, scope) for scope in spec.scopes),
        Change("create", "client", realm, spec.client_id, "machine client, optional scopes " + ", ".join(spec.scopes)),
    ]
    applied = await asyncio.to_thread(provisioner.apply, manifest)
    assert applied == planned
    assert provisioner.plan(manifest) == []  # idempotent

    made = _clients(srv, realm)[spec.client_id]
    assert made["publicClient"] is False and made["serviceAccountsEnabled"] is True
    assert made["standardFlowEnabled"] is False and made["directAccessGrantsEnabled"] is False
    assert made["implicitFlowEnabled"] is False
    assert made["attributes"][MANAGED_ATTRIBUTE] == "true" and made["attributes"][CLIENT_KIND_ATTRIBUTE] == "machine"
    assert _platform_scopes(made, "optionalClientScopes") == set(spec.scopes)
    assert _platform_scopes(made, "defaultClientScopes") == set()

    secret = provisioner.client_secret(tenant.slug, spec.client_id)
    assert secret not in "\n".join(str(c) for c in (*planned, *applied))
    access = _token(srv, realm, spec.client_id, secret, "onboarding:write")
    claims = payload(access)
    granted = set(claims["scope"].split()) & set(SCOPES)
    assert granted == {"onboarding:write"}  # only what was asked for, of the three it may ask for
    assert AUDIENCE in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
    assert claims[CLAIM] == tenant.slug

    started = await api.post("/v1/onboarding/start", json={"user_id": "mc-1"}, headers=bearer(access))
    assert started.status_code == 201, started.text
    refused = await api.get("/v1/analytics/activation-rate", headers=bearer(access))
    assert refused.status_code == 403 and refused.json()["required_scope"] == "analytics:read"

    both = _token(srv, realm, spec.client_id, secret, "onboarding:write analytics:read")
    assert set(payload(both)["scope"].split()) & set(SCOPES) == {"onboarding:write", "analytics:read"}
    allowed = await api.get("/v1/analytics/activation-rate", headers=bearer(both))
    assert allowed.status_code == 200, allowed.text
    # a scope the client was not given is refused by Keycloak itself
    with pytest.raises(KeycloakPostError) as refusal:
        _token(srv, realm, spec.client_id, secret, "users:admin")
    assert refusal.value.response_code == 400 and b"invalid_scope" in (refusal.value.response_body or b"")


async def test_changed_scopes_update_removed_clients_go_and_unmanaged_clients_stay(
    srv: Server, provisioner: KeycloakProvisioner, realms: list[str]
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    realms.append(realm)
    first = _manifest(slug, ("billing-sync", ["onboarding:write"]), ("warehouse", ["events:write", "analytics:read"]))
    await asyncio.to_thread(provisioner.apply, first)
    # the tenant's own client, made by hand, holding one of the platform's client scopes
    srv.admin.change_current_realm(realm)
    try:
        srv.admin.create_client(client("hand-made", secrets.token_urlsafe(16), mappers(slug, audience=True)))
        hand_id = srv.admin.get_client_id("hand-made")
        assert hand_id is not None
        analytics_scope = next(s for s in srv.admin.get_client_scopes() if s["name"] == "analytics:read")
        srv.admin.add_client_optional_client_scope(hand_id, analytics_scope["id"], {})
    finally:
        srv.admin.change_current_realm("master")
    hand_before = _clients(srv, realm)["hand-made"]
    assert provisioner.plan(first) == []

    second = _manifest(slug, ("billing-sync", ["onboarding:write", "audit:read"]))
    planned = provisioner.plan(second)
    assert planned == [
        Change("create", "client-scope", realm, "audit:read"),
        Change("update", "client", realm, "billing-sync", "scopes onboarding:write -> onboarding:write, audit:read"),
        Change("delete", "client", realm, "warehouse", "not in the manifest"),
        # events:write is used by nobody now; analytics:read stays: the hand-made client holds it
        Change("delete", "client-scope", realm, "events:write", "no machine client uses it"),
    ]
    assert await asyncio.to_thread(provisioner.apply, second) == planned
    assert provisioner.plan(second) == []

    after = _clients(srv, realm)
    assert "warehouse" not in after and after["hand-made"] == hand_before
    assert _platform_scopes(after["billing-sync"], "optionalClientScopes") == {"onboarding:write", "audit:read"}
    secret = provisioner.client_secret(slug, "billing-sync")
    granted = payload(_token(srv, realm, "billing-sync", secret, "audit:read"))["scope"].split()
    assert "audit:read" in granted and "onboarding:write" not in granted
    # the hand-made client is no machine client of Firstmile's: its secret is not handed out
    with pytest.raises(ProvisioningError, match="no machine client 'hand-made'"):
        provisioner.client_secret(slug, "hand-made")


async def test_drift_on_a_machine_client_is_repaired(
    srv: Server, provisioner: KeycloakProvisioner, realms: list[str]
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    realms.append(realm)
    manifest = _manifest(slug, ("billing-sync", ["onboarding:write"]))
    await asyncio.to_thread(provisioner.apply, manifest)
    srv.admin.change_current_realm(realm)
    try:
        internal = srv.admin.get_client_id("billing-sync")
        assert internal is not None
        current = srv.admin.get_client(internal)
        srv.admin.update_client(internal, {**current, "directAccessGrantsEnabled": True})
        # by hand: a platform scope every token gets without asking, and the tenant mapper gone
        users_admin = srv.admin.create_client_scope(client_scope("users:admin"))
        srv.admin.add_client_default_client_scope(internal, users_admin, {})
        tenant_mapper = next(m for m in srv.admin.get_mappers_from_client(internal) if m["name"] == "tenant")
        srv.admin.remove_client_mapper(internal, tenant_mapper["id"])
    finally:
        srv.admin.change_current_realm("master")
    planned = provisioner.plan(manifest)
    assert planned == [
        Change(
            "update",
            "client",
            realm,
            "billing-sync",
            "directAccessGrantsEnabled, mapper tenant, "
            "scopes onboarding:write (default users:admin) -> onboarding:write",
        )
    ]
    assert await asyncio.to_thread(provisioner.apply, manifest) == planned
    assert provisioner.plan(manifest) == []
    repaired = _clients(srv, realm)["billing-sync"]
    assert repaired["directAccessGrantsEnabled"] is False
    assert _platform_scopes(repaired, "defaultClientScopes") == set()
    # the hand-made users:admin scope is not Firstmile's (no managed mark): it is left in the realm
    srv.admin.change_current_realm(realm)
    try:
        assert "users:admin" in {s["name"] for s in srv.admin.get_client_scopes()}
    finally:
        srv.admin.change_current_realm("master")


def test_a_machine_client_never_takes_over_an_unmanaged_client(
    srv: Server, provisioner: KeycloakProvisioner, realms: list[str]
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    realms.append(realm)
    provisioner.apply(_manifest(slug))
    srv.admin.change_current_realm(realm)
    try:
        srv.admin.create_client(client("billing-sync", secrets.token_urlsafe(16), []))
    finally:
        srv.admin.change_current_realm("master")
    before = _clients(srv, realm)["billing-sync"]
    wanted = _manifest(slug, ("billing-sync", ["events:write"]))
    with pytest.raises(ProvisioningError, match="was not made by Firstmile"):
        provisioner.plan(wanted)
    with pytest.raises(ProvisioningError, match="was not made by Firstmile"):
        provisioner.apply(wanted)
    assert _clients(srv, realm)["billing-sync"] == before
    # nor the admin UI's client
    with pytest.raises(ProvisioningError, match="admin UI client"):
        provisioner.plan(_manifest(slug, (provisioner.client_id, ["events:write"])))


@pytest.fixture
def cli_env(database: Database, keycloak_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    parts = urlsplit(keycloak_url)
    password_file = tmp_path / "keycloak-admin-password"
    password_file.write_text(f"{parts.password}\n")
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_URL", f"{parts.scheme}://{parts.hostname}:{parts.port}")
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_USER", str(parts.username))
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE", str(password_file))
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


async def test_cli_prints_a_machine_clients_secret_audits_the_read_and_prints_nothing_else(
    cli_env: None, srv: Server, provisioner: KeycloakProvisioner, realms: list[str], admin_engine: AsyncEngine
) -> None:
    tenant = await new_tenant(admin_engine)
    slug = tenant.slug
    realm = provisioner.realm_name(slug)
    realms.append(realm)
    await asyncio.to_thread(provisioner.apply, _manifest(slug, ("billing-sync", ["events:write"])))
    srv.admin.change_current_realm(realm)
    try:
        internal = srv.admin.get_client_id("billing-sync")
        assert internal is not None
        expected = srv.admin.get_client_secrets(internal)["value"]
    finally:
        srv.admin.change_current_realm("master")
    result = await asyncio.to_thread(CliRunner().invoke, main, ["tenants", "client-secret", slug, "billing-sync"])
    assert result.exit_code == 0 and result.output == f"{expected}\n"
    await sequenced(admin_engine)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT e.subject, e.payload::text FROM audit_entries e JOIN tenants t ON t.id = e.tenant_id "
                "WHERE t.slug = :s AND e.payload->>'action' = 'sso.client_secret.read'"
            ),
            {"s": slug},
        )
        reads = [(str(target), str(body)) for target, body in rows]
    assert [target for target, _ in reads] == ["client:billing-sync"]
    assert expected not in reads[0][1]  # who read which client's secret, never the secret

    missing = await asyncio.to_thread(CliRunner().invoke, main, ["tenants", "client-secret", slug, "ghost"])
    assert missing.exit_code == 1 and "no machine client 'ghost'" in missing.output
    admin_client = await asyncio.to_thread(
        CliRunner().invoke, main, ["tenants", "client-secret", slug, provisioner.client_id]
    )
    assert admin_client.exit_code == 1
    # a realm whose tenant has no row in this region: the read cannot be audited, so nothing is printed
    stray = _slug()
    realms.append(provisioner.realm_name(stray))
    await asyncio.to_thread(provisioner.apply, _manifest(stray, ("billing-sync", ["events:write"])))
    withheld = await asyncio.to_thread(CliRunner().invoke, main, ["tenants", "client-secret", stray, "billing-sync"])
    assert withheld.exit_code == 1 and "cannot be audited" in withheld.output
    assert provisioner.client_secret(stray, "billing-sync") not in withheld.output
