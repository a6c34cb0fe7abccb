"""Helpers for tests against the local Keycloak (deploy/local/keycloak.sh): the admin connection,
tenant-realm clients with the audience and tenant-claim mappers, client scopes, client-credentials
tokens, and reading or re-signing-free tampering of compact JWS."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keycloak import KeycloakAdmin, KeycloakOpenID, KeycloakOpenIDConnection

AUDIENCE = "firstmile-api"
CLAIM = "firstmile_tenant"


@dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:58080, what Keycloak puts into iss for requests made to it
    admin: KeycloakAdmin


def server(url: str) -> Server:
    """The admin connection to the test Keycloak, from ``http://user:pw@host:port``."""
    parts = urlsplit(url)
    assert parts.username and parts.password and parts.hostname and parts.port, "expected http://user:pw@host:port"
    base = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    connection = KeycloakOpenIDConnection(
        server_url=base, username=parts.username, password=parts.password, realm_name="master", verify=True
    )
    return Server(base, KeycloakAdmin(connection=connection))


def mappers(tenant_claim_value: str, audience: bool) -> list[dict[str, Any]]:
    """A hardcoded tenant claim and, with ``audience``, the platform's audience, in access tokens."""
    made: list[dict[str, Any]] = [
        {
            "name": "tenant",
            "protocol": "openid-connect",
            "protocolMapper": "oidc-hardcoded-claim-mapper",
            "config": {
                "claim.name": CLAIM,
                "claim.value": tenant_claim_value,
                "jsonType.label": "String",
                "access.token.claim": "true",
                "id.token.claim": "false",
                "userinfo.token.claim": "false",
                "introspection.token.claim": "true",
            },
        }
    ]
    if audience:
        made.append(
            {
                "name": "audience",
                "protocol": "openid-connect",
                "protocolMapper": "oidc-audience-mapper",
                "config": {
                    "included.custom.audience": AUDIENCE,
                    "access.token.claim": "true",
                    "id.token.claim": "false",
                    "introspection.token.claim": "true",
                },
            }
        )
    return made


def client(
    client_id: str,
    secret: str,
    client_mappers: list[dict[str, Any]],
    *,
    default_scopes: list[str] | None = None,
    attributes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A confidential client whose service account gets tokens by client credentials."""
    representation: dict[str, Any] = {
        "clientId": client_id,
        "protocol": "openid-connect",
        "publicClient": False,
        "clientAuthenticatorType": "client-secret",
        "secret": secret,
        "serviceAccountsEnabled": True,
        "standardFlowEnabled": False,
        "directAccessGrantsEnabled": False,
        "protocolMappers": client_mappers,
        "attributes": attributes or {},
    }
    if default_scopes is not None:
        representation["defaultClientScopes"] = default_scopes
    return representation


def client_scope(name: str) -> dict[str, Any]:
    """A client scope that only puts its name into the token's ``scope`` claim."""
    return {
        "name": name,
        "protocol": "openid-connect",
        "attributes": {"include.in.token.scope": "true", "display.on.consent.screen": "false"},
    }


def client_credentials_token(base: str, realm: str, client_id: str, secret: str) -> str:
    oidc = KeycloakOpenID(server_url=base, realm_name=realm, client_id=client_id, client_secret_key=secret)
    access: str = oidc.token(grant_type="client_credentials")["access_token"]
    return access


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def payload(access: str) -> dict[str, Any]:
    body = access.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return decoded


def with_claims(access: str, **changes: Any) -> str:
    """``access`` with its payload changed and the original signature kept (no longer valid)."""
    head, _, sig = access.split(".")
    return ".".join((head, b64(payload(access) | changes), sig))
