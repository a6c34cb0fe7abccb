"""Keycloak login events of the tenant realms, carried into the audit log.

Keycloak refuses bad SAML responses and failed logins itself, before Firstmile sees
anything; the realm records them as events (provisioning turns events on with
:data:`REALM_EVENT_TYPES`), and this module copies the failures into the tenant's
audit log.
"""

from __future__ import annotations

REALM_EVENT_TYPES: tuple[str, ...] = (
    "LOGIN",
    "LOGIN_ERROR",
    "LOGOUT",
    "LOGOUT_ERROR",
    "CODE_TO_TOKEN",
    "CODE_TO_TOKEN_ERROR",
    "IDENTITY_PROVIDER_LOGIN",
    "IDENTITY_PROVIDER_LOGIN_ERROR",
    "IDENTITY_PROVIDER_FIRST_LOGIN",
    "IDENTITY_PROVIDER_FIRST_LOGIN_ERROR",
    "IDENTITY_PROVIDER_POST_LOGIN",
    "IDENTITY_PROVIDER_POST_LOGIN_ERROR",
    "IDENTITY_PROVIDER_RESPONSE",
    "IDENTITY_PROVIDER_RESPONSE_ERROR",
    "IDENTITY_PROVIDER_LINK_ACCOUNT_ERROR",
)
"""The event types a tenant realm saves (Keycloak keeps them ``REALM_EVENTS_EXPIRATION`` seconds)."""

REALM_EVENTS_EXPIRATION = 7 * 24 * 3600
