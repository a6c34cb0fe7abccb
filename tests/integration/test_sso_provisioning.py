"""SSO provisioning against the real Keycloak (deploy/local/keycloak.sh): plan, apply, re-apply, update, prune.

Each test uses a realm prefix of its own (``fmt<hex>-``), so pruning only ever sees the realms it made
(and only realms marked as managed are deleted in any case); the realms are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner
from keycloak import KeycloakAdmin, KeycloakOpenIDConnection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.cli import main
from firstmile.settings import get_settings
from firstmile.sso.provisioning import (
    IDP_ALIAS,
    MANAGED_ATTRIBUTE,
    Change,
    KeycloakProvisioner,
    ProvisioningError,
    parse_saml_metadata,
)
from firstmile.tenancy.manifest import ADMIN_ROLES, DEFAULT_ROLE_DESCRIPTIONS, SsoSpec, TenantManifest
from tests.conftest import REGION, Database, sequenced
from tests.factories import demo_document, manifest_for, provisioned_kek

pytestmark = pytest.mark.xdist_group("keycloak")

REDIRECTS = ("https://admin.firstmile.test/admin/callback",)


def _admin(url: str) -> KeycloakAdmin:
    parts = urlsplit(url)
    assert parts.username and parts.password and parts.hostname and parts.port, "expected http://user:pw@host:port"
    connection = KeycloakOpenIDConnection(
        server_url=f"{parts.scheme}://{parts.hostname}:{parts.port}",
        username=parts.username,
        password=parts.password,
        realm_name="master",
        verify=True,
    )
    return KeycloakAdmin(connection=connection)


@pytest.fixture
def admin(keycloak_url: str) -> KeycloakAdmin:
    return _admin(keycloak_url)


@pytest.fixture
def provisioner(admin: KeycloakAdmin) -> Iterator[KeycloakProvisioner]:
    prefix = f"fmt{secrets.token_hex(3)}-"
    made = KeycloakProvisioner(admin, realm_prefix=prefix, redirect_uris=REDIRECTS)
    try:
        yield made
    finally:
        admin.change_current_realm("master")
        for realm in admin.get_realms():
            if str(realm["realm"]).startswith(prefix):
                admin.delete_realm(realm["realm"])


def _manifest(slug: str, group_roles: dict[str, str] | None = None, **roles: str) -> TenantManifest:
    sso = SsoSpec.model_validate({"roles": roles, "group_roles": group_roles or {"Acme Admins": "owner"}})
    return manifest_for(slug, REGION).model_copy(update={"sso": sso})


def _client_uuid(admin: KeycloakAdmin) -> str:
    found = admin.get_client_id("firstmile-admin")
    assert found is not None
    return found


def _slug() -> str:
    return f"p-{secrets.token_hex(4)}"


def test_plan_on_a_fresh_tenant_lists_creations_and_changes_nothing(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    planned = provisioner.plan(_manifest(slug))
    assert planned == [
        Change("create", "realm", realm, realm),
        *(Change("create", "role", realm, role) for role in ADMIN_ROLES),
        Change("create", "client", realm, "firstmile-admin"),
        Change("create", "mapper", realm, "audience"),
        Change("create", "mapper", realm, "tenant"),
        Change("create", "group", realm, "Acme Admins", "role owner"),
    ]
    assert str(planned[1]) == f"create role owner in realm {realm}"
    assert realm not in {r["realm"] for r in admin.get_realms()}


def test_apply_creates_the_realm_and_reapply_changes_nothing(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    manifest = _manifest(slug, {"Acme Admins": "owner", "Acme Analysts": "analyst"}, viewer="Looks only.")
    planned = provisioner.plan(manifest)
    applied = provisioner.apply(manifest)
    assert applied == planned and len(applied) == 1 + 4 + 1 + 2 + 2

    info = admin.get_realm(realm)
    assert info["enabled"] is True and info["attributes"][MANAGED_ATTRIBUTE] == "true"
    admin.change_current_realm(realm)
    roles = {r["name"]: r.get("description") for r in admin.get_realm_roles()}
    assert roles["viewer"] == "Looks only." and roles["owner"] == DEFAULT_ROLE_DESCRIPTIONS["owner"]
    assert set(ADMIN_ROLES) <= set(roles)
    client = admin.get_client(_client_uuid(admin))
    assert client["publicClient"] is True and client["standardFlowEnabled"] is True
    assert client["implicitFlowEnabled"] is False and client["directAccessGrantsEnabled"] is False
    assert client["attributes"]["pkce.code.challenge.method"] == "S256"
    assert client["redirectUris"] == list(REDIRECTS)
    mappers = {m["name"]: m for m in admin.get_mappers_from_client(client["id"])}
    assert mappers["audience"]["config"]["included.custom.audience"] == "firstmile-api"
    assert mappers["tenant"]["config"]["claim.name"] == "firstmile_tenant"
    assert mappers["tenant"]["config"]["claim.value"] == slug
    groups = {g["name"]: g["id"] for g in admin.get_groups()}
    assert set(groups) == {"Acme Admins", "Acme Analysts"}
    assert [r["name"] for r in admin.get_group_realm_roles(groups["Acme Analysts"])] == ["analyst"]
    admin.change_current_realm("master")

    assert provisioner.plan(manifest) == []
    assert provisioner.apply(manifest) == []
    assert provisioner.plan(manifest) == []


def test_a_changed_mapping_role_or_redirect_is_an_update(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin
) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    provisioner.apply(_manifest(slug, {"Acme Admins": "owner", "Acme Staff": "viewer"}))

    changed = _manifest(slug, {"Acme Admins": "owner", "Acme Staff": "editor"}, analyst="Reads numbers.")
    planned = provisioner.plan(changed)
    assert planned == [
        Change("update", "role", realm, "analyst", "description"),
        Change("update", "group", realm, "Acme Staff", "role viewer -> editor"),
    ]
    assert provisioner.apply(changed) == planned
    assert provisioner.plan(changed) == []
    admin.change_current_realm(realm)
    staff = next(g for g in admin.get_groups() if g["name"] == "Acme Staff")
    assert [r["name"] for r in admin.get_group_realm_roles(staff["id"])] == ["editor"]
    assert admin.get_realm_role("analyst")["description"] == "Reads numbers."
    admin.change_current_realm("master")

    # a group dropped from the manifest goes; a new redirect URI updates the client
    moved = KeycloakProvisioner(
        admin, realm_prefix=provisioner.realm_prefix, redirect_uris=("https://new.firstmile.test/admin/*",)
    )
    dropped = _manifest(slug, {"Acme Admins": "owner"}, analyst="Reads numbers.")
    planned = moved.plan(dropped)
    assert planned == [
        Change("update", "client", realm, "firstmile-admin", "redirectUris, attributes"),
        Change("delete", "group", realm, "Acme Staff", "not in the manifest"),
    ]
    assert moved.apply(dropped) == planned and moved.plan(dropped) == []
    admin.change_current_realm(realm)
    client = admin.get_client(_client_uuid(admin))
    assert client["redirectUris"] == ["https://new.firstmile.test/admin/*"]
    assert client["attributes"]["pkce.code.challenge.method"] == "S256"
    assert [g["name"] for g in admin.get_groups()] == ["Acme Admins"]
    admin.change_current_realm("master")


def test_drift_made_in_keycloak_is_planned_and_repaired(provisioner: KeycloakProvisioner, admin: KeycloakAdmin) -> None:
    slug = _slug()
    realm = provisioner.realm_name(slug)
    manifest = _manifest(slug)
    provisioner.apply(manifest)
    admin.change_current_realm(realm)
    client_id = _client_uuid(admin)
    client = admin.get_client(client_id)
    admin.update_client(client_id, {**client, "directAccessGrantsEnabled": True})
    tenant = next(m for m in admin.get_mappers_from_client(client_id) if m["name"] == "tenant")
    admin.remove_client_mapper(client_id, tenant["id"])
    admin.change_current_realm("master")

    assert provisioner.plan(manifest) == [
        Change("update", "client", realm, "firstmile-admin", "directAccessGrantsEnabled"),
        Change("create", "mapper", realm, "tenant"),
    ]
    provisioner.apply(manifest)
    assert provisioner.plan(manifest) == []


def test_a_removed_manifest_plans_a_deletion_carried_out_only_by_prune(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin
) -> None:
    kept, gone = _slug(), _slug()
    provisioner.apply(_manifest(kept))
    provisioner.apply(_manifest(gone))
    gone_realm = provisioner.realm_name(gone)
    # a realm of the same prefix not made by the provisioner is never touched
    stranger = provisioner.realm_name("stranger")
    admin.create_realm({"realm": stranger, "enabled": True})

    planned = provisioner.plan_prune({kept})
    assert planned == [Change("delete", "realm", gone_realm, gone_realm, f"tenant {gone} has no manifest")]
    realms = {r["realm"] for r in admin.get_realms()}
    assert gone_realm in realms and stranger in realms

    assert provisioner.prune({kept}) == planned
    realms = {r["realm"] for r in admin.get_realms()}
    assert gone_realm not in realms and provisioner.realm_name(kept) in realms and stranger in realms
    assert provisioner.plan_prune({kept}) == []


# -- the CLI: `firstmile tenants plan|apply [--prune]` -----------------------------------------


@pytest.fixture
def cli_env(database: Database, keycloak_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The operator's environment with Keycloak configured; yields the realm prefix (the test's own)."""
    parts = urlsplit(keycloak_url)
    password_file = tmp_path / "keycloak-admin-password"
    password_file.write_text(f"{parts.password}\n")
    prefix = f"fmc{secrets.token_hex(3)}-"
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(provisioned_kek(tmp_path / "kek")))  # apply makes data keys
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_URL", f"{parts.scheme}://{parts.hostname}:{parts.port}")
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_USER", str(parts.username))
    monkeypatch.setenv("FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("FIRSTMILE_SSO_REALM_PREFIX", prefix)
    get_settings.cache_clear()
    try:
        yield prefix
    finally:
        get_settings.cache_clear()
        admin = _admin(keycloak_url)
        for realm in admin.get_realms():
            if str(realm["realm"]).startswith(prefix):
                admin.delete_realm(realm["realm"])


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["tenants", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


async def _cli(*args: str) -> tuple[int, str]:
    return await asyncio.to_thread(_invoke, *args)  # the command runs its own event loop


def _write(folder: Path, slug: str, group_roles: dict[str, str]) -> Path:
    doc = demo_document()
    doc["tenant"] = {"slug": slug, "name": f"Tenant {slug}", "home_region": REGION}
    doc["sso"] = {"group_roles": group_roles}
    path = folder / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _sso_audit(admin_engine: AsyncEngine, slug: str) -> list[list[str]]:
    await sequenced(admin_engine)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT e.payload FROM audit_entries e JOIN tenants t ON t.id = e.tenant_id "
                "WHERE t.slug = :s AND e.payload->>'action' = 'sso.provision' ORDER BY e.seq"
            ),
            {"s": slug},
        )
        return [list(payload["changes"]) for (payload,) in rows]


async def test_cli_plans_applies_audits_and_prunes_only_with_the_flag(
    cli_env: str, admin_engine: AsyncEngine, tmp_path: Path, keycloak_url: str
) -> None:
    folder = tmp_path / "tenants"
    folder.mkdir()
    kept, gone = _slug(), _slug()
    _write(folder, kept, {"Admins": "owner"})
    gone_file = _write(folder, gone, {"Admins": "owner"})
    kept_realm, gone_realm = f"{cli_env}{kept}", f"{cli_env}{gone}"

    code, out = await _cli("plan", str(folder))
    assert code == 0, out
    assert f"tenant {kept}: sso: would change: create realm {kept_realm}" in out
    assert f"tenant {kept}: sso: would change: create group Admins in realm {kept_realm} (role owner)" in out
    admin = _admin(keycloak_url)
    assert kept_realm not in {r["realm"] for r in admin.get_realms()}

    code, out = await _cli("apply", str(folder))
    assert code == 0, out
    assert f"tenant {kept}: sso: changed: create client firstmile-admin in realm {kept_realm}" in out
    audited = await _sso_audit(admin_engine, kept)
    assert len(audited) == 1 and f"create realm {kept_realm}" in audited[0]

    code, out = await _cli("plan", str(folder))
    assert code == 0 and f"tenant {kept}: sso: up to date" in out and "would change" not in out, out
    code, out = await _cli("apply", str(folder))
    assert code == 0 and "changed" not in out, out
    assert len(await _sso_audit(admin_engine, kept)) == 1  # nothing changed, nothing audited

    _write(folder, kept, {"Admins": "viewer"})
    code, out = await _cli("apply", str(folder))
    assert code == 0, out
    assert f"sso: changed: update group Admins in realm {kept_realm} (role owner -> viewer)" in out
    assert (await _sso_audit(admin_engine, kept))[-1] == [
        f"update group Admins in realm {kept_realm} (role owner -> viewer)"
    ]

    gone_file.unlink()
    code, out = await _cli("plan", str(folder))
    assert code == 0 and f"tenant {gone}: sso: would change: delete realm {gone_realm}" in out, out
    code, out = await _cli("apply", str(folder))
    assert code == 0 and f"tenant {gone}: sso: not done without --prune: delete realm {gone_realm}" in out, out
    assert gone_realm in {r["realm"] for r in admin.get_realms()}
    code, out = await _cli("apply", "--prune", str(folder / f"{kept}.yaml"))
    assert code == 0 and "delete realm" not in out, out  # a single file is not the whole set: no deletions
    assert gone_realm in {r["realm"] for r in admin.get_realms()}
    code, out = await _cli("apply", "--prune", str(folder))
    assert code == 0 and f"tenant {gone}: sso: changed: delete realm {gone_realm}" in out, out
    realms = {r["realm"] for r in admin.get_realms()}
    assert gone_realm not in realms and kept_realm in realms
    assert (await _sso_audit(admin_engine, gone))[-1] == [f"delete realm {gone_realm} (tenant {gone} has no manifest)"]


async def test_cli_without_keycloak_says_provisioning_is_skipped(
    database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(provisioned_kek(tmp_path / "kek")))  # apply makes data keys
    monkeypatch.delenv("FIRSTMILE_KEYCLOAK_URL", raising=False)
    get_settings.cache_clear()
    try:
        path = _write(tmp_path, _slug(), {"Admins": "owner"})
        code, out = await _cli("plan", str(path))
    finally:
        get_settings.cache_clear()
    assert code == 0, out
    assert "sso: provisioning skipped" in out and "sso: would change" not in out


# -- the customer's SAML IdP: another realm of the same Keycloak plays it -----------------------


@pytest.fixture
def customer_idp(admin: KeycloakAdmin, keycloak_url: str) -> Iterator[tuple[str, str]]:
    """A realm acting as the customer's SAML IdP; yields (metadata URL, entity id)."""
    parts = urlsplit(keycloak_url)
    realm = f"fmidp{secrets.token_hex(3)}"
    admin.create_realm({"realm": realm, "enabled": True})
    base = f"{parts.scheme}://{parts.hostname}:{parts.port}/realms/{realm}"
    try:
        yield f"{base}/protocol/saml/descriptor", base
    finally:
        admin.delete_realm(realm)


def _saml_manifest(slug: str, url: str, entity_id: str, group_roles: dict[str, str]) -> TenantManifest:
    sso = SsoSpec.model_validate(
        {
            "group_roles": group_roles,
            "saml": {"metadata_url": url, "entity_id": entity_id, "attributes": {"groups": "memberOf"}},
        }
    )
    return manifest_for(slug, REGION).model_copy(update={"sso": sso})


def test_saml_broker_and_its_mappers_are_provisioned_and_updated(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin, customer_idp: tuple[str, str]
) -> None:
    url, entity_id = customer_idp
    slug = _slug()
    realm = provisioner.realm_name(slug)
    manifest = _saml_manifest(slug, url, entity_id, {"Admins": "owner"})
    planned = provisioner.plan(manifest)
    assert planned[-4:] == [
        Change("create", "identity-provider", realm, IDP_ALIAS, entity_id),
        Change("create", "idp-mapper", realm, "email"),
        Change("create", "idp-mapper", realm, "name"),
        Change("create", "idp-mapper", realm, "group Admins"),
    ]
    # brokered admins are not stopped on Keycloak's "Update Account Information" to type a last name
    assert Change("update", "realm", realm, realm, "user profile: firstName, lastName optional") in planned
    assert provisioner.apply(manifest) == planned
    assert provisioner.plan(manifest) == []

    profile = {
        a["name"]: a for a in admin.connection.raw_get(f"admin/realms/{realm}/users/profile").json()["attributes"]
    }
    assert "required" not in profile["firstName"] and "required" not in profile["lastName"]
    assert profile["email"]["required"]  # the rest of the profile is Keycloak's
    admin.change_current_realm(realm)
    idp = admin.get_idp(IDP_ALIAS)
    assert idp["providerId"] == "saml" and idp["config"]["idpEntityId"] == entity_id
    assert idp["config"]["wantAssertionsSigned"] == "true" and idp["config"]["validateSignature"] == "true"
    assert idp["config"]["singleSignOnServiceUrl"] == f"{entity_id}/protocol/saml"
    mappers = {m["name"]: m for m in admin.get_idp_mappers(IDP_ALIAS)}
    assert mappers["group Admins"]["identityProviderMapper"] == "saml-role-idp-mapper"
    assert mappers["group Admins"]["config"]["attribute.name"] == "memberOf"
    assert mappers["group Admins"]["config"]["role"] == "owner"
    assert mappers["email"]["config"]["user.attribute"] == "email"
    admin.change_current_realm("master")
    # what we give the customer: the SP metadata (entity id = the realm, ACS = the broker endpoint)
    import httpx

    realm_url = entity_id.rsplit("/realms/", 1)[0] + f"/realms/{realm}"
    sp = httpx.get(f"{realm_url}/broker/{IDP_ALIAS}/endpoint/descriptor")
    assert sp.status_code == 200 and f'entityID="{realm_url}"' in sp.text
    assert 'WantAssertionsSigned="true"' in sp.text and f"{realm_url}/broker/{IDP_ALIAS}/endpoint" in sp.text

    changed = _saml_manifest(slug, url, entity_id, {"Admins": "editor", "Data": "analyst"})
    planned = provisioner.plan(changed)
    assert Change("update", "idp-mapper", realm, "group Admins", "config") in planned
    assert Change("create", "idp-mapper", realm, "group Data") in planned
    assert provisioner.apply(changed) == planned and provisioner.plan(changed) == []
    admin.change_current_realm(realm)
    mappers = {m["name"]: m for m in admin.get_idp_mappers(IDP_ALIAS)}
    assert mappers["group Admins"]["config"]["role"] == "editor"
    admin.change_current_realm("master")

    # a mapping dropped removes its mapper; saml dropped removes the broker
    fewer = _saml_manifest(slug, url, entity_id, {"Admins": "editor"})
    assert Change("delete", "idp-mapper", realm, "group Data", "not in the manifest") in provisioner.apply(fewer)
    assert provisioner.plan(fewer) == []
    without = _manifest(slug, {"Admins": "editor"})
    assert provisioner.apply(without) == [
        Change("delete", "identity-provider", realm, IDP_ALIAS, "no saml in the manifest")
    ]
    assert provisioner.plan(without) == []


def test_saml_metadata_for_another_entity_is_refused_before_anything_changes(
    provisioner: KeycloakProvisioner, customer_idp: tuple[str, str]
) -> None:
    url, _ = customer_idp
    manifest = _saml_manifest(_slug(), url, "https://someone-else.example/idp", {})
    with pytest.raises(ProvisioningError, match="the SAML metadata is for entity"):
        provisioner.plan(manifest)


def test_saml_metadata_xml_is_parsed_and_a_doctype_refused(customer_idp: tuple[str, str]) -> None:
    import httpx

    url, entity_id = customer_idp
    document = httpx.get(url).text
    parsed = parse_saml_metadata(document)
    assert parsed["idpEntityId"] == entity_id
    assert parsed["singleSignOnServiceUrl"] == f"{entity_id}/protocol/saml"
    assert len(parsed["signingCertificate"]) > 100
    with pytest.raises(ProvisioningError, match="DOCTYPE"):
        parse_saml_metadata('<!DOCTYPE x [<!ENTITY a "b">]>' + document)


def test_saml_broker_from_metadata_xml_is_idempotent(
    provisioner: KeycloakProvisioner, admin: KeycloakAdmin, customer_idp: tuple[str, str]
) -> None:
    import httpx

    url, entity_id = customer_idp
    slug = _slug()
    sso = SsoSpec.model_validate(
        {"group_roles": {"Admins": "owner"}, "saml": {"metadata_xml": httpx.get(url).text, "entity_id": entity_id}}
    )
    manifest = manifest_for(slug, REGION).model_copy(update={"sso": sso})
    applied = provisioner.apply(manifest)
    assert Change("create", "identity-provider", provisioner.realm_name(slug), IDP_ALIAS, entity_id) in applied
    assert provisioner.plan(manifest) == []
    admin.change_current_realm(provisioner.realm_name(slug))
    assert admin.get_idp(IDP_ALIAS)["config"]["singleSignOnServiceUrl"] == f"{entity_id}/protocol/saml"
    admin.change_current_realm("master")
