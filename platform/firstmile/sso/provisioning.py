"""SSO provisioning from manifests: each tenant's Keycloak realm, made to match its manifest.

For a manifest with tenant ``acme`` the realm ``<realm_prefix>acme`` (``firstmile-acme``) holds:

- the realm itself, enabled, marked with the attributes ``firstmile.managed=true`` and
  ``firstmile.tenant=<slug>`` (only realms so marked are ever deleted);
- the realm roles ``owner``, ``editor``, ``analyst``, ``viewer`` with the manifest's descriptions;
- the admin UI's OIDC client: public, authorization code only (no implicit flow, no password grant,
  no service account), PKCE with ``S256`` required, the configured redirect URIs, and two protocol
  mappers: ``audience`` (adds the platform audience, ``firstmile-api``) and ``tenant`` (the hardcoded
  claim ``firstmile_tenant=<slug>``), the claims :mod:`firstmile.sso.tokens` insists on;
- one top-level group per ``sso.group_roles`` entry, named after the IdP group, holding exactly its
  admin role; groups not in the manifest are removed.

:meth:`KeycloakProvisioner.plan` reads Keycloak and lists the :class:`Change` objects that
:meth:`KeycloakProvisioner.apply` would carry out; ``apply`` carries them out and returns the same
list. Both are idempotent: after an apply the plan is empty. Realms of tenants whose manifest is gone
are listed by :meth:`KeycloakProvisioner.plan_prune` and deleted only by
:meth:`KeycloakProvisioner.prune` (the CLI's ``--prune``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from keycloak import KeycloakAdmin
from keycloak.exceptions import KeycloakError

from firstmile.sso.events import REALM_EVENT_TYPES, REALM_EVENTS_EXPIRATION
from firstmile.tenancy.keys import SCOPES
from firstmile.tenancy.manifest import ADMIN_ROLES, MachineClientSpec, SamlSpec, SsoSpec, TenantManifest

MANAGED_ATTRIBUTE = "firstmile.managed"
TENANT_ATTRIBUTE = "firstmile.tenant"
AUDIENCE_MAPPER = "audience"
TENANT_MAPPER = "tenant"
CLIENT_KIND_ATTRIBUTE = "firstmile.client"
MACHINE_CLIENT = "machine"

Action = Literal["create", "update", "delete"]
Kind = Literal["realm", "role", "client", "mapper", "group", "identity-provider", "idp-mapper", "client-scope"]
IDP_ALIAS = "customer-idp"
_MD = "{urn:oasis:names:tc:SAML:2.0:metadata}"
_DS = "{http://www.w3.org/2000/09/xmldsig#}"
_POST_BINDING = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
# what we insist on whatever the metadata says: signed assertions and responses, signature checked
SAML_OVERRIDES: dict[str, str] = {
    "validateSignature": "true",
    "wantAssertionsSigned": "true",
    "wantAuthnRequestsSigned": "true",
    "postBindingResponse": "true",
    "postBindingAuthnRequest": "true",
    "nameIDPolicyFormat": "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent",
    "principalType": "SUBJECT",
    "syncMode": "FORCE",
    # Keycloak's SAML conditions check (NotBefore/NotOnOrAfter) tolerates this much clock difference;
    # pinned so that a larger value set by hand shows as drift (docs/sso.md, SAML response security)
    "allowedClockSkew": "5",
}
COMPARED_METADATA = ("idpEntityId", "singleSignOnServiceUrl", "signingCertificate")
# user-profile attributes a brokered admin is never asked for (see KeycloakProvisioner._user_profile)
OPTIONAL_PROFILE_ATTRIBUTES = ("firstName", "lastName")
_OPTIONAL_NAMES_DETAIL = "user profile: firstName, lastName optional"


class ProvisioningError(RuntimeError):
    """Keycloak refused or failed a provisioning call; the message says which."""


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between a manifest and Keycloak, and what apply does about it."""

    action: Action
    kind: Kind
    realm: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        where = "" if self.kind == "realm" else f" in realm {self.realm}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.action} {self.kind} {self.name}{where}{detail}"


def _subset_differs(desired: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Names of the desired keys whose actual value differs (lists compared as sets)."""
    differ: list[str] = []
    for key, want in desired.items():
        have = actual.get(key)
        if isinstance(want, dict):
            if not isinstance(have, dict) or any(have.get(k) != v for k, v in want.items()):
                differ.append(key)
        elif isinstance(want, list):
            if not isinstance(have, list) or sorted(map(str, have)) != sorted(map(str, want)):
                differ.append(key)
        elif have != want:
            differ.append(key)
    return differ


@dataclass(frozen=True)
class _MapperWork:
    """A client protocol mapper to create (``have`` None) or update, and what differs."""

    name: str
    mapper: dict[str, Any]
    have: dict[str, Any] | None
    differ: str


class KeycloakProvisioner:
    """Reconciles tenant realms with manifests through the Keycloak admin API (python-keycloak)."""

    def __init__(
        self,
        admin: KeycloakAdmin,
        *,
        realm_prefix: str = "firstmile-",
        audience: str = "firstmile-api",
        tenant_claim: str = "firstmile_tenant",
        client_id: str = "firstmile-admin",
        redirect_uris: Sequence[str] = ("http://127.0.0.1:8000/admin/*",),
        backchannel_logout_url: str | None = None,
    ) -> None:
        if not redirect_uris:
            raise ValueError("the admin client needs at least one redirect URI")
        self._admin = admin
        self._home_realm = admin.connection.realm_name or "master"
        self.realm_prefix = realm_prefix
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.client_id = client_id
        self.redirect_uris = tuple(redirect_uris)
        self.backchannel_logout_url = backchannel_logout_url

    def realm_name(self, slug: str) -> str:
        return f"{self.realm_prefix}{slug}"

    @property
    def admin(self) -> KeycloakAdmin:
        """The admin connection; :class:`firstmile.sso.events.KeycloakEventSync` reads the realms' events with it."""
        return self._admin

    # -- public operations ---------------------------------------------------------------

    def plan(self, manifest: TenantManifest) -> list[Change]:
        """What :meth:`apply` would change for ``manifest``; changes nothing."""
        return self._guarded(lambda: self._reconcile(manifest, execute=False))

    def apply(self, manifest: TenantManifest) -> list[Change]:
        """Make the tenant's realm match ``manifest``; returns what was changed (empty: nothing)."""
        return self._guarded(lambda: self._reconcile(manifest, execute=True))

    def plan_prune(self, slugs: set[str]) -> list[Change]:
        """Deletions of managed realms (of this prefix) whose tenant is not in ``slugs``."""
        return self._guarded(lambda: self._prune(slugs, execute=False))

    def prune(self, slugs: set[str]) -> list[Change]:
        """Delete the realms :meth:`plan_prune` lists."""
        return self._guarded(lambda: self._prune(slugs, execute=True))

    def managed_realms(self) -> dict[str, str]:
        """Realm name -> tenant slug of every realm this provisioner manages."""
        found: dict[str, str] = {}
        for realm in self._admin.get_realms():
            name = str(realm.get("realm", ""))
            attributes = realm.get("attributes") or {}
            if name.startswith(self.realm_prefix) and attributes.get(MANAGED_ATTRIBUTE) == "true":
                found[name] = str(attributes.get(TENANT_ATTRIBUTE) or name[len(self.realm_prefix) :])
        return found

    # -- internals -----------------------------------------------------------------------

    def _guarded(self, work: Any) -> list[Change]:
        try:
            result: list[Change] = work()
            return result
        except KeycloakError as exc:
            raise ProvisioningError(f"keycloak: {exc}") from exc
        finally:
            self._admin.change_current_realm(self._home_realm)

    @contextmanager
    def _in_realm(self, realm: str) -> Iterator[None]:
        self._admin.change_current_realm(realm)
        try:
            yield
        finally:
            self._admin.change_current_realm(self._home_realm)

    def _prune(self, slugs: set[str], *, execute: bool) -> list[Change]:
        changes: list[Change] = []
        for realm, slug in sorted(self.managed_realms().items()):
            if slug in slugs:
                continue
            changes.append(Change("delete", "realm", realm, realm, f"tenant {slug} has no manifest"))
            if execute:
                self._admin.delete_realm(realm)
        return changes

    def _reconcile(self, manifest: TenantManifest, *, execute: bool) -> list[Change]:
        slug = manifest.tenant.slug
        sso = manifest.sso or SsoSpec()
        realm = self.realm_name(slug)
        changes: list[Change] = []
        desired_realm = {
            "enabled": True,
            "displayName": manifest.tenant.name,
            "attributes": {MANAGED_ATTRIBUTE: "true", TENANT_ATTRIBUTE: slug},
            # Keycloak refuses bad SAML responses and failed logins itself: its events are how they
            # reach the tenant's audit log (firstmile.sso.events)
            "eventsEnabled": True,
            "enabledEventTypes": list(REALM_EVENT_TYPES),
            "eventsExpiration": REALM_EVENTS_EXPIRATION,
        }
        existing = next((r for r in self._admin.get_realms() if r.get("realm") == realm), None)
        if existing is None:
            changes.append(Change("create", "realm", realm, realm))
            if not execute:
                if sso.saml is not None:
                    self._metadata(
                        realm, sso.saml, via=self._home_realm
                    )  # a bad IdP shows in the plan, not half-way through apply
                # nothing below exists yet: everything is a creation
                changes.extend(Change("create", "role", realm, role) for role in ADMIN_ROLES)
                changes.append(Change("create", "client", realm, self.client_id))
                changes.extend(Change("create", "mapper", realm, m) for m in (AUDIENCE_MAPPER, TENANT_MAPPER))
                changes.extend(
                    Change("create", "group", realm, group, f"role {role}")
                    for group, role in sorted(sso.group_roles.items())
                )
                if sso.saml is not None:
                    # a new realm has Keycloak's default profile, which requires both names
                    changes.append(Change("update", "realm", realm, realm, _OPTIONAL_NAMES_DETAIL))
                    changes.append(Change("create", "identity-provider", realm, IDP_ALIAS, sso.saml.entity_id))
                    changes.extend(
                        Change("create", "idp-mapper", realm, name) for name in self._desired_idp_mappers(sso)
                    )
                changes.extend(self._machine_client_creations(realm, sso))
                return changes
            self._admin.create_realm({"realm": realm, **desired_realm})
        else:
            current = self._admin.get_realm(realm)
            differ = _subset_differs(desired_realm, current)
            if differ:
                changes.append(Change("update", "realm", realm, realm, ", ".join(differ)))
                if execute:
                    attributes = {**(current.get("attributes") or {}), **desired_realm["attributes"]}  # type: ignore[dict-item]
                    self._admin.update_realm(realm, {**desired_realm, "attributes": attributes})
        with self._in_realm(realm):
            changes.extend(self._roles(realm, sso, execute))
            changes.extend(self._client(realm, slug, execute))
            changes.extend(self._groups(realm, sso, execute))
            changes.extend(self._user_profile(realm, sso, execute))
            changes.extend(self._identity_provider(realm, sso, execute))
            changes.extend(self._machine_clients(realm, slug, sso, execute))
        return changes

    def _roles(self, realm: str, sso: SsoSpec, execute: bool) -> list[Change]:
        changes: list[Change] = []
        actual = {str(r["name"]): r.get("description") or "" for r in self._admin.get_realm_roles()}
        for role, description in sso.role_descriptions().items():
            if role not in actual:
                changes.append(Change("create", "role", realm, role))
                if execute:
                    self._admin.create_realm_role({"name": role, "description": description})
            elif actual[role] != description:
                changes.append(Change("update", "role", realm, role, "description"))
                if execute:
                    self._admin.update_realm_role(role, {"name": role, "description": description})
        return changes

    def _desired_client(self) -> dict[str, Any]:
        attributes = {
            "pkce.code.challenge.method": "S256",
            "post.logout.redirect.uris": "##".join(self.redirect_uris),
        }
        if self.backchannel_logout_url is not None:
            # Keycloak posts a signed logout token here when the admin's realm session ends
            attributes["backchannel.logout.url"] = self.backchannel_logout_url
            attributes["backchannel.logout.session.required"] = "true"
            attributes["backchannel.logout.revoke.offline.tokens"] = "false"
        return {
            "clientId": self.client_id,
            "name": "Firstmile admin UI",
            "protocol": "openid-connect",
            "enabled": True,
            "publicClient": True,
            "standardFlowEnabled": True,
            "implicitFlowEnabled": False,
            "directAccessGrantsEnabled": False,
            "serviceAccountsEnabled": False,
            "redirectUris": list(self.redirect_uris),
            "webOrigins": ["+"],
            "frontchannelLogout": False,
            "attributes": attributes,
        }

    def _desired_mappers(self, slug: str) -> dict[str, dict[str, Any]]:
        return {
            AUDIENCE_MAPPER: {
                "name": AUDIENCE_MAPPER,
                "protocol": "openid-connect",
                "protocolMapper": "oidc-audience-mapper",
                "config": {
                    "included.custom.audience": self.audience,
                    "access.token.claim": "true",
                    "id.token.claim": "false",
                    "introspection.token.claim": "true",
                },
            },
            TENANT_MAPPER: {
                "name": TENANT_MAPPER,
                "protocol": "openid-connect",
                "protocolMapper": "oidc-hardcoded-claim-mapper",
                "config": {
                    "claim.name": self.tenant_claim,
                    "claim.value": slug,
                    "jsonType.label": "String",
                    "access.token.claim": "true",
                    "id.token.claim": "true",
                    "userinfo.token.claim": "false",
                    "introspection.token.claim": "true",
                },
            },
        }

    def _client(self, realm: str, slug: str, execute: bool) -> list[Change]:
        changes: list[Change] = []
        desired = self._desired_client()
        mappers = self._desired_mappers(slug)
        internal_id = self._admin.get_client_id(self.client_id)
        if internal_id is None:
            changes.append(Change("create", "client", realm, self.client_id))
            changes.extend(Change("create", "mapper", realm, name) for name in mappers)
            if execute:
                self._admin.create_client({**desired, "protocolMappers": list(mappers.values())})
            return changes
        current = self._admin.get_client(internal_id)
        differ = _subset_differs(desired, current)
        if differ:
            changes.append(Change("update", "client", realm, self.client_id, ", ".join(differ)))
            if execute:
                attributes = {**(current.get("attributes") or {}), **desired["attributes"]}
                self._admin.update_client(internal_id, {**current, **desired, "attributes": attributes})
        work = self._client_mapper_work(internal_id, mappers)
        changes.extend(
            Change("create", "mapper", realm, w.name)
            if w.have is None
            else Change("update", "mapper", realm, w.name, w.differ)
            for w in work
        )
        if execute:
            self._write_client_mappers(internal_id, work)
        return changes

    def _client_mapper_work(self, internal_id: str, mappers: dict[str, dict[str, Any]]) -> list[_MapperWork]:
        """The protocol mappers of a client that are missing or differ from ``mappers``."""
        actual = {str(m["name"]): m for m in self._admin.get_mappers_from_client(internal_id)}
        work: list[_MapperWork] = []
        for name, mapper in mappers.items():
            have = actual.get(name)
            differ = (
                _subset_differs({"protocolMapper": mapper["protocolMapper"], "config": mapper["config"]}, have)
                if have is not None
                else []
            )
            if have is None or differ:
                work.append(_MapperWork(name, mapper, have, ", ".join(differ)))
        return work

    def _write_client_mappers(self, internal_id: str, work: list[_MapperWork]) -> None:
        for w in work:
            if w.have is None:
                self._admin.add_mapper_to_client(internal_id, w.mapper)
            else:
                self._admin.update_client_mapper(internal_id, str(w.have["id"]), {**w.have, **w.mapper})

    def _groups(self, realm: str, sso: SsoSpec, execute: bool) -> list[Change]:
        changes: list[Change] = []
        actual = {str(g["name"]): str(g["id"]) for g in self._admin.get_groups()}
        for group, role in sorted(sso.group_roles.items()):
            group_id = actual.get(group)
            if group_id is None:
                changes.append(Change("create", "group", realm, group, f"role {role}"))
                if execute:
                    new_id = self._admin.create_group({"name": group})
                    if new_id is None:
                        raise ProvisioningError(f"keycloak did not return the id of group {group!r} in {realm}")
                    self._admin.assign_group_realm_roles(new_id, [self._admin.get_realm_role(role)])
                continue
            held = [r for r in self._admin.get_group_realm_roles(group_id) if r.get("name") in ADMIN_ROLES]
            if [str(r["name"]) for r in held] != [role]:
                before = ", ".join(sorted(str(r["name"]) for r in held)) or "none"
                changes.append(Change("update", "group", realm, group, f"role {before} -> {role}"))
                if execute:
                    stale = [r for r in held if r.get("name") != role]
                    if stale:
                        self._admin.delete_group_realm_roles(group_id, stale)
                    if not any(r.get("name") == role for r in held):
                        self._admin.assign_group_realm_roles(group_id, [self._admin.get_realm_role(role)])
        for group, group_id in sorted(actual.items()):
            if group not in sso.group_roles:
                changes.append(Change("delete", "group", realm, group, "not in the manifest"))
                if execute:
                    self._admin.delete_group(group_id)
        return changes

    def _user_profile(self, realm: str, sso: SsoSpec, execute: bool) -> list[Change]:
        """With a SAML IdP, first and last name are optional in the realm's user profile.

        Keycloak 26 requires both of every user by default, and its first broker login stops on an
        "Update Account Information" page to ask for whatever the IdP did not send. The customer's IdP
        sends one display name (mapped to firstName) and no last name, so every admin's first login
        would end on a Keycloak form asking for data we do not use, instead of in the admin UI. Only the
        ``required`` of these two attributes changes; the rest of the profile stays Keycloak's. A realm
        without an IdP keeps the defaults (nobody logs in through a broker), and one whose IdP is
        removed keeps the relaxed profile (harmless: no attribute becomes required behind its back).
        """
        if sso.saml is None:
            return []
        path = f"admin/realms/{realm}/users/profile"
        response = self._admin.connection.raw_get(path)
        if response.status_code != 200:
            raise ProvisioningError(f"{realm}: keycloak did not return the user profile (HTTP {response.status_code})")
        profile: dict[str, Any] = response.json()
        required = [
            a
            for a in profile.get("attributes") or []
            if a.get("name") in OPTIONAL_PROFILE_ATTRIBUTES and a.get("required") is not None
        ]
        if not required:
            return []
        names = ", ".join(str(a["name"]) for a in required)
        if execute:
            for attribute in required:
                del attribute["required"]
            response = self._admin.connection.raw_put(path, data=json.dumps(profile))
            if response.status_code != 200:
                raise ProvisioningError(f"{realm}: keycloak refused the user profile (HTTP {response.status_code})")
        return [Change("update", "realm", realm, realm, f"user profile: {names} optional")]

    # -- the customer's SAML IdP -----------------------------------------------------------

    def _metadata(self, realm: str, saml: SamlSpec, via: str | None = None) -> dict[str, str]:
        """The broker's config from the IdP's metadata (Keycloak fetches a URL itself), checked against the manifest."""
        if saml.metadata_url is not None:
            response = self._admin.connection.raw_post(
                f"admin/realms/{via or realm}/identity-provider/import-config",
                data=json.dumps({"providerId": "saml", "fromUrl": saml.metadata_url}),
            )
            if response.status_code != 200:
                raise ProvisioningError(
                    f"{realm}: keycloak could not import the SAML metadata at {saml.metadata_url} "
                    f"(HTTP {response.status_code})"
                )
            config = {str(k): str(v) for k, v in response.json().items()}
        else:
            assert saml.metadata_xml is not None
            config = parse_saml_metadata(saml.metadata_xml)
        if config.get("idpEntityId") != saml.entity_id:
            raise ProvisioningError(
                f"{realm}: the SAML metadata is for entity {config.get('idpEntityId')!r}, "
                f"the manifest says {saml.entity_id!r}"
            )
        if not config.get("singleSignOnServiceUrl") or not config.get("signingCertificate"):
            raise ProvisioningError(f"{realm}: the SAML metadata names no SSO service URL or no signing certificate")
        return config

    def _desired_idp_mappers(self, sso: SsoSpec) -> dict[str, dict[str, Any]]:
        assert sso.saml is not None
        attributes = sso.saml.attributes

        def mapper(name: str, kind: str, **config: str) -> dict[str, Any]:
            return {
                "name": name,
                "identityProviderAlias": IDP_ALIAS,
                "identityProviderMapper": kind,
                "config": {"syncMode": "FORCE", **config},
            }

        mappers = {
            "email": mapper(
                "email",
                "saml-user-attribute-idp-mapper",
                **{"attribute.name": attributes.email, "user.attribute": "email"},
            ),
            "name": mapper(
                "name",
                "saml-user-attribute-idp-mapper",
                **{"attribute.name": attributes.name, "user.attribute": "firstName"},
            ),
        }
        for group, role in sorted(sso.group_roles.items()):
            name = f"group {group}"
            mappers[name] = mapper(
                name,
                "saml-role-idp-mapper",
                **{"attribute.name": attributes.groups, "attribute.value": group, "role": role},
            )
        return mappers

    def _identity_provider(self, realm: str, sso: SsoSpec, execute: bool) -> list[Change]:
        changes: list[Change] = []
        existing = next((i for i in self._admin.get_idps() if i.get("alias") == IDP_ALIAS), None)
        if sso.saml is None:
            if existing is not None:
                changes.append(Change("delete", "identity-provider", realm, IDP_ALIAS, "no saml in the manifest"))
                if execute:
                    self._admin.delete_idp(IDP_ALIAS)
            return changes
        metadata = self._metadata(realm, sso.saml)
        desired: dict[str, Any] = {
            "alias": IDP_ALIAS,
            "displayName": "Company login",
            "providerId": "saml",
            "enabled": True,
            "trustEmail": False,
            "config": {**{k: metadata[k] for k in COMPARED_METADATA}, **SAML_OVERRIDES},
        }
        mappers = self._desired_idp_mappers(sso)
        if existing is None:
            changes.append(Change("create", "identity-provider", realm, IDP_ALIAS, sso.saml.entity_id))
            changes.extend(Change("create", "idp-mapper", realm, name) for name in mappers)
            if execute:
                self._admin.create_idp({**desired, "config": {**metadata, **desired["config"]}})
                for payload in mappers.values():
                    self._admin.add_mapper_to_idp(IDP_ALIAS, payload)
            return changes
        differ = _subset_differs(desired, existing)
        if differ:
            changes.append(Change("update", "identity-provider", realm, IDP_ALIAS, ", ".join(differ)))
            if execute:
                config = {**(existing.get("config") or {}), **metadata, **desired["config"]}
                self._admin.update_idp(IDP_ALIAS, {**existing, **desired, "config": config})
        actual = {str(m["name"]): m for m in self._admin.get_idp_mappers(IDP_ALIAS)}
        for name, payload in mappers.items():
            have = actual.get(name)
            if have is None:
                changes.append(Change("create", "idp-mapper", realm, name))
                if execute:
                    self._admin.add_mapper_to_idp(IDP_ALIAS, payload)
                continue
            wanted = {"identityProviderMapper": payload["identityProviderMapper"], "config": payload["config"]}
            differ = _subset_differs(wanted, have)
            if differ:
                changes.append(Change("update", "idp-mapper", realm, name, ", ".join(differ)))
                if execute:
                    self._admin.update_mapper_in_idp(IDP_ALIAS, str(have["id"]), {**have, **payload})
        for name, have in sorted(actual.items()):
            if name not in mappers:
                changes.append(Change("delete", "idp-mapper", realm, name, "not in the manifest"))
                if execute:
                    self._admin.connection.raw_delete(
                        f"admin/realms/{realm}/identity-provider/instances/{IDP_ALIAS}/mappers/{have['id']}"
                    )
        return changes

    # -- machine clients: client-credentials access for the tenant's apps -------------------

    def client_secret(self, slug: str, client_id: str) -> str:
        """The current secret of the tenant's machine client ``client_id``, read from Keycloak (never stored here)."""
        realm = self.realm_name(slug)
        try:
            with self._in_realm(realm):
                found = next((c for c in self._admin.get_clients() if c.get("clientId") == client_id), None)
                if found is None or not self._is_machine_client(found):
                    raise ProvisioningError(f"{realm} has no machine client {client_id!r} made by Firstmile")
                secret = self._admin.get_client_secrets(str(found["id"])).get("value")
        except KeycloakError as exc:
            raise ProvisioningError(f"keycloak: {exc}") from exc
        if not secret:
            raise ProvisioningError(f"{realm}: keycloak returned no secret for {client_id!r}")
        return str(secret)

    def _is_machine_client(self, client: dict[str, Any]) -> bool:
        """Only clients this provisioner made as machine clients are ever changed or deleted by it."""
        attributes = client.get("attributes") or {}
        return (
            client.get("clientId") != self.client_id
            and attributes.get(MANAGED_ATTRIBUTE) == "true"
            and attributes.get(CLIENT_KIND_ATTRIBUTE) == MACHINE_CLIENT
        )

    def _used_scopes(self, realm: str, sso: SsoSpec) -> list[str]:
        """The platform scopes the manifest's machine clients use, in SCOPES order."""
        if any(c.client_id == self.client_id for c in sso.machine_clients):
            raise ProvisioningError(f"{realm}: machine client {self.client_id!r} has the admin UI client's id")
        used = {scope for c in sso.machine_clients for scope in c.scopes}
        return [scope for scope in SCOPES if scope in used]

    def _machine_client_creations(self, realm: str, sso: SsoSpec) -> list[Change]:
        """Everything :meth:`_machine_clients` would create in an empty realm."""
        changes = [Change("create", "client-scope", realm, scope) for scope in self._used_scopes(realm, sso)]
        changes.extend(
            Change("create", "client", realm, c.client_id, _machine_detail(c.scopes)) for c in sso.machine_clients
        )
        return changes

    @staticmethod
    def _desired_client_scope(name: str) -> dict[str, Any]:
        # include.in.token.scope: the scope's name goes into the token's scope claim, which kit/auth reads
        return {
            "name": name,
            "protocol": "openid-connect",
            "attributes": {
                "include.in.token.scope": "true",
                "display.on.consent.screen": "false",
                MANAGED_ATTRIBUTE: "true",
            },
        }

    def _desired_machine_client(self, spec: MachineClientSpec) -> dict[str, Any]:
        return {
            "clientId": spec.client_id,
            "description": spec.description,
            "protocol": "openid-connect",
            "enabled": True,
            "publicClient": False,
            "bearerOnly": False,
            "clientAuthenticatorType": "client-secret",
            "serviceAccountsEnabled": True,  # the client-credentials grant
            "standardFlowEnabled": False,
            "implicitFlowEnabled": False,
            "directAccessGrantsEnabled": False,
            "attributes": {
                MANAGED_ATTRIBUTE: "true",
                CLIENT_KIND_ATTRIBUTE: MACHINE_CLIENT,
                "oauth2.device.authorization.grant.enabled": "false",
                "oidc.ciba.grant.enabled": "false",
            },
        }

    def _machine_clients(self, realm: str, slug: str, sso: SsoSpec, execute: bool) -> list[Change]:
        """Client scopes named like the platform scopes, one confidential client per manifest entry.

        A client's platform scopes are its *optional* client scopes: a token carries those the app asks for
        (``scope=…``), Keycloak refuses a scope the client was not given (``invalid_scope``). Unmanaged clients
        are never changed; a managed client scope is deleted once no client holds it.
        """
        changes: list[Change] = []
        used = self._used_scopes(realm, sso)
        clients = {str(c["clientId"]): c for c in self._admin.get_clients()}
        for spec in sso.machine_clients:  # before any change: a clash leaves the realm as it was
            if spec.client_id in clients and not self._is_machine_client(clients[spec.client_id]):
                raise ProvisioningError(
                    f"{realm}: client {spec.client_id!r} exists and was not made by Firstmile; "
                    "rename the machine client in the manifest or remove that client"
                )
        scopes = {str(s["name"]): s for s in self._admin.get_client_scopes()}
        scope_ids = {name: str(s["id"]) for name, s in scopes.items()}
        for name in used:
            desired_scope = self._desired_client_scope(name)
            have_scope = scopes.get(name)
            if have_scope is None:
                changes.append(Change("create", "client-scope", realm, name))
                if execute:
                    scope_ids[name] = str(self._admin.create_client_scope(desired_scope))
                continue
            differ = _subset_differs(desired_scope, have_scope)
            if differ:
                changes.append(Change("update", "client-scope", realm, name, ", ".join(differ)))
                if execute:
                    attributes = {**(have_scope.get("attributes") or {}), **desired_scope["attributes"]}
                    self._admin.update_client_scope(
                        scope_ids[name], {**have_scope, **desired_scope, "attributes": attributes}
                    )
        mappers = self._desired_mappers(slug)
        for spec in sso.machine_clients:
            desired = self._desired_machine_client(spec)
            have = clients.get(spec.client_id)
            if have is None:
                changes.append(Change("create", "client", realm, spec.client_id, _machine_detail(spec.scopes)))
                if execute:
                    # no secret given: Keycloak generates it; Firstmile never sees it unless asked (client_secret)
                    self._admin.create_client(
                        {
                            **desired,
                            "protocolMappers": list(mappers.values()),
                            "optionalClientScopes": list(spec.scopes),
                        }
                    )
                continue
            changes.extend(self._machine_client_update(realm, spec, desired, have, mappers, scope_ids, execute))
        for client_id, have in sorted(clients.items()):
            if client_id not in {c.client_id for c in sso.machine_clients} and self._is_machine_client(have):
                changes.append(Change("delete", "client", realm, client_id, "not in the manifest"))
                if execute:
                    self._admin.delete_client(str(have["id"]))
        # a scope another (unmanaged) client holds stays: deleting it would change that client
        held = {
            name
            for c in clients.values()
            if not self._is_machine_client(c)
            for name in (*(c.get("defaultClientScopes") or ()), *(c.get("optionalClientScopes") or ()))
        }
        for name, have_scope in sorted(scopes.items()):
            managed = (have_scope.get("attributes") or {}).get(MANAGED_ATTRIBUTE) == "true"
            if name in SCOPES and managed and name not in used and name not in held:
                changes.append(Change("delete", "client-scope", realm, name, "no machine client uses it"))
                if execute:
                    self._admin.delete_client_scope(scope_ids[name])
        return changes

    def _machine_client_update(
        self,
        realm: str,
        spec: MachineClientSpec,
        desired: dict[str, Any],
        have: dict[str, Any],
        mappers: dict[str, dict[str, Any]],
        scope_ids: dict[str, str],
        execute: bool,
    ) -> list[Change]:
        internal_id = str(have["id"])
        current = {**have, "description": have.get("description") or ""}  # Keycloak drops an empty description
        differ = _subset_differs(desired, current)
        mapper_work = self._client_mapper_work(internal_id, mappers)
        differ.extend(f"mapper {w.name}" for w in mapper_work)
        optional = {s for s in have.get("optionalClientScopes") or () if s in SCOPES}
        default = {s for s in have.get("defaultClientScopes") or () if s in SCOPES}
        want = set(spec.scopes)
        if optional != want or default:
            before = ", ".join(s for s in SCOPES if s in optional) or "none"
            if default:
                before += " (default " + ", ".join(s for s in SCOPES if s in default) + ")"
            differ.append(f"scopes {before} -> {', '.join(s for s in SCOPES if s in want)}")
        if not differ:
            return []
        if execute:
            if _subset_differs(desired, current):
                attributes = {**(have.get("attributes") or {}), **desired["attributes"]}
                self._admin.update_client(internal_id, {**have, **desired, "attributes": attributes})
            self._write_client_mappers(internal_id, mapper_work)
            for scope in default:
                self._admin.delete_client_default_client_scope(internal_id, scope_ids[scope])
            for scope in optional - want:
                self._admin.delete_client_optional_client_scope(internal_id, scope_ids[scope])
            for scope in want - optional:
                self._admin.add_client_optional_client_scope(internal_id, scope_ids[scope], {})
        return [Change("update", "client", realm, spec.client_id, ", ".join(differ))]


def _machine_detail(scopes: Sequence[str]) -> str:
    return "machine client, optional scopes " + ", ".join(scopes)


def parse_saml_metadata(document: str) -> dict[str, str]:
    """The broker settings Keycloak would import from an IdP's metadata: entity id, SSO URL, signing cert.

    A document with a DOCTYPE is refused (no entity declarations: nothing to expand or fetch).
    """
    if "<!DOCTYPE" in document.upper():
        raise ProvisioningError("SAML metadata with a DOCTYPE is refused")
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise ProvisioningError(f"SAML metadata is not well-formed XML: {exc}") from exc
    descriptor = root if root.tag == f"{_MD}EntityDescriptor" else root.find(f".//{_MD}EntityDescriptor")
    if descriptor is None:
        raise ProvisioningError("SAML metadata has no EntityDescriptor")
    idp = descriptor.find(f"{_MD}IDPSSODescriptor")
    if idp is None:
        raise ProvisioningError("SAML metadata has no IDPSSODescriptor")
    config = {"idpEntityId": descriptor.get("entityID", "")}
    for service in idp.findall(f"{_MD}SingleSignOnService"):
        if service.get("Binding") == _POST_BINDING:
            config["singleSignOnServiceUrl"] = service.get("Location", "")
    certificates = [
        "".join((cert.text or "").split())
        for key in idp.findall(f"{_MD}KeyDescriptor")
        if key.get("use") in (None, "signing")
        for cert in key.findall(f"{_DS}KeyInfo/{_DS}X509Data/{_DS}X509Certificate")
    ]
    if certificates:
        config["signingCertificate"] = ",".join(certificates)
    return config
