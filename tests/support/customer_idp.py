"""A customer's SAML identity provider, played by a second realm of the test Keycloak.

Enterprise tenants log their admins in through their own IdP (Entra ID, Okta, ADFS…); the tenant's
realm ``firstmile-<slug>`` brokers it as ``customer-idp`` (:mod:`firstmile.sso.provisioning`). In the
tests a realm ``fmidp<hex>`` of the same Keycloak stands in for that IdP, set up the way a customer's
administrator would set up theirs from what ``docs/sso.md`` tells them to:

- the IdP's metadata (``<realm>/protocol/saml/descriptor``) and entity id (the realm's URL) go into the
  tenant manifest's ``sso.saml``;
- after ``tenants apply`` made the broker, :meth:`CustomerIdp.trust` registers our service provider from
  the SP metadata we publish (``…/broker/customer-idp/endpoint/descriptor``), through Keycloak's own
  metadata import (``client-description-converter``), so the client id is the broker's SP entity id,
  the ACS URL the broker endpoint and the AuthnRequest signing certificate the tenant realm's; on top
  of it: signed documents and assertions, POST binding, persistent NameID, and the attributes the
  manifest names (``email``, ``name`` and multi-valued ``groups``, group names without their path);
- users with passwords in groups (``fm-analysts``, ``fm-editors``…), which the manifest's
  ``sso.group_roles`` turns into admin roles.

The realm is deleted by :meth:`CustomerIdp.delete`; the helper never touches other realms.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from keycloak import KeycloakAdmin

from tests.support.keycloak import Server

BROKER_ALIAS = "customer-idp"  # firstmile.sso.provisioning.IDP_ALIAS, the alias the SP metadata lives under


@dataclass(frozen=True)
class IdpUser:
    """A user of the customer's directory: what they type on the IdP's login page, and who they are."""

    username: str
    password: str
    email: str
    display_name: str
    groups: tuple[str, ...]


def _mapper(name: str, kind: str, **config: str) -> dict[str, Any]:
    return {"name": name, "protocol": "saml", "protocolMapper": kind, "config": config}


def attribute_mappers(email: str = "email", name: str = "name", groups: str = "groups") -> list[dict[str, Any]]:
    """The assertion's attributes: email, display name, and every group the user is in (names only)."""
    basic = "Basic"
    return [
        _mapper(
            "email",
            "saml-user-property-mapper",
            **{"user.attribute": "email", "attribute.name": email, "attribute.nameformat": basic},
        ),
        _mapper(
            "display name",
            "saml-user-attribute-mapper",
            **{"user.attribute": "displayName", "attribute.name": name, "attribute.nameformat": basic},
        ),
        _mapper(
            "groups",
            "saml-group-membership-mapper",
            **{"attribute.name": groups, "attribute.nameformat": basic, "full.path": "false", "single": "true"},
        ),
    ]


# the SAML client's settings whatever the SP metadata said: what the broker insists on (SAML_OVERRIDES)
SP_CLIENT_ATTRIBUTES: dict[str, str] = {
    "saml.server.signature": "true",  # the Response (document) is signed
    "saml.assertion.signature": "true",  # and so is the Assertion in it
    "saml.signature.algorithm": "RSA_SHA256",
    "saml.client.signature": "true",  # the broker's AuthnRequests must be signed, by the key in the SP metadata
    "saml.force.post.binding": "true",
    "saml.authnstatement": "true",
    "saml.encrypt": "false",
    "saml_name_id_format": "persistent",
    "saml.force.name.id.format": "false",
}


@dataclass
class CustomerIdp:
    """A realm of the test Keycloak acting as one customer's SAML IdP."""

    server: Server
    realm: str
    users: dict[str, IdpUser] = field(default_factory=dict)

    @property
    def entity_id(self) -> str:
        """The IdP's entity id, what Keycloak puts in its metadata: the realm's URL."""
        return f"{self.server.base}/realms/{self.realm}"

    @property
    def metadata_url(self) -> str:
        return f"{self.entity_id}/protocol/saml/descriptor"

    def saml_section(self, **attributes: str) -> dict[str, Any]:
        """The manifest's ``sso.saml`` for this IdP (attribute names: the defaults unless given)."""
        section: dict[str, Any] = {"metadata_url": self.metadata_url, "entity_id": self.entity_id}
        if attributes:
            section["attributes"] = attributes
        return section

    # -- set-up ------------------------------------------------------------------------------

    @classmethod
    def create(cls, server: Server, groups: tuple[str, ...] = ("fm-analysts", "fm-editors")) -> CustomerIdp:
        """A new realm ``fmidp<hex>`` with the given (top-level) groups and free-form user attributes."""
        admin = server.admin
        realm = f"fmidp{secrets.token_hex(3)}"
        admin.create_realm({"realm": realm, "enabled": True, "displayName": "Customer corporate login"})
        made = cls(server, realm)
        try:
            with made._in_realm() as kc:
                # directories carry a display name of their own (displayName in Entra ID, AD, Okta); Keycloak 26
                # keeps only declared attributes unless unmanaged ones are enabled
                profile = kc.connection.raw_get(f"admin/realms/{realm}/users/profile").json()
                profile["unmanagedAttributePolicy"] = "ENABLED"
                put = kc.connection.raw_put(f"admin/realms/{realm}/users/profile", data=json.dumps(profile))
                _ok(put, "user profile")
                for group in groups:
                    kc.create_group({"name": group})
        except BaseException:
            made.delete()  # a half-made realm is not left behind
            raise
        return made

    def add_user(self, username: str, display_name: str, *groups: str) -> IdpUser:
        """A user with a random password, in ``groups`` (which must exist)."""
        user = IdpUser(
            username=username,
            password=secrets.token_urlsafe(12),
            email=f"{username}@customer.example",
            display_name=display_name,
            groups=tuple(groups),
        )
        first, _, last = display_name.partition(" ")
        with self._in_realm() as kc:
            kc.create_user(
                {
                    "username": username,
                    "email": user.email,
                    "emailVerified": True,
                    "firstName": first,
                    "lastName": last or first,
                    "enabled": True,
                    "attributes": {"displayName": [display_name]},
                    "credentials": [{"type": "password", "value": user.password, "temporary": False}],
                    "groups": [f"/{g}" for g in groups],
                }
            )
        self.users[username] = user
        return user

    def trust(self, sp_realm: str, **attribute_names: str) -> str:
        """Register the tenant realm's broker as a service provider, from the SP metadata it publishes.

        Returns the SAML client's id, which is the SP's entity id. Call it after ``tenants apply``: the
        metadata carries the tenant realm's signing certificate, which exists only once the realm does.
        """
        import httpx

        descriptor = f"{self.server.base}/realms/{sp_realm}/broker/{BROKER_ALIAS}/endpoint/descriptor"
        response = httpx.get(descriptor, timeout=10)
        response.raise_for_status()
        with self._in_realm() as kc:
            converted = kc.connection.raw_post(
                f"admin/realms/{self.realm}/client-description-converter", data=response.text
            )
            _ok(converted, "SP metadata import")
            client: dict[str, Any] = converted.json()
            client["attributes"] = {**(client.get("attributes") or {}), **SP_CLIENT_ATTRIBUTES}
            client["protocolMappers"] = attribute_mappers(**attribute_names)
            client["enabled"] = True
            kc.create_client(client)
        return str(client["clientId"])

    def delete(self) -> None:
        self.server.admin.change_current_realm("master")
        self.server.admin.delete_realm(self.realm)

    # -- internals ---------------------------------------------------------------------------

    def _in_realm(self) -> _RealmScope:
        return _RealmScope(self.server.admin, self.realm)


class _RealmScope:
    """The admin client pointed at one realm for a block, back on master afterwards."""

    def __init__(self, admin: KeycloakAdmin, realm: str) -> None:
        self._admin = admin
        self._realm = realm

    def __enter__(self) -> KeycloakAdmin:
        self._admin.change_current_realm(self._realm)
        return self._admin

    def __exit__(self, *exc: object) -> None:
        self._admin.change_current_realm("master")


def _ok(response: Any, what: str) -> None:
    if response.status_code >= 300:
        raise AssertionError(f"keycloak refused the {what}: HTTP {response.status_code} {response.text[:300]}")
