"""The admin UI's OpenID Connect client: authorization code with PKCE against a tenant's realm.

Firstmile validates every token itself with the realm's cached JWKS (the same cache
as client-credentials tokens, :class:`~firstmile.sso.tokens.TokenValidator`): the id
token (signature, issuer, audience = the admin client, expiry, nonce, tenant claim)
and the access token (audience ``firstmile-api``, tenant claim), whose realm roles
are the admin's roles. Back-channel logout tokens (OpenID Connect Back-Channel
Logout 1.0) are checked the same way and are single-use.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from firstmile.admin.rbac import admin_roles
from firstmile.sso.tokens import (
    TokenError,
    TokenReason,
    TokenValidator,
    check_algorithm,
    expected_tenant,
    parse_unverified,
    verify,
)

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
IDP_HINT = "customer-idp"


class LoginError(Exception):
    """A login that cannot finish; ``reason`` is stable (audit entries, problem documents)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str


def new_pkce() -> Pkce:
    """RFC 7636 S256: a 86-character verifier and its SHA-256, base64url without padding."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return Pkce(verifier, challenge)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who logged in, from validated tokens."""

    subject: str
    email: str
    name: str
    roles: tuple[str, ...]
    realm_session: str | None
    id_token: str


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    tenant_slug: str
    sid: str | None
    subject: str | None
    jti: str


class OidcClient:
    """One per process; ``validator`` supplies the realm naming, JWKS cache and leeway."""

    def __init__(self, validator: TokenValidator, client_id: str, *, http_timeout: float = 5.0) -> None:
        self.validator = validator
        self.naming = validator.naming
        self.client_id = client_id
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(http_timeout), follow_redirects=False)

    def _endpoint(self, slug: str, name: str) -> str:
        return f"{self.naming.issuer(slug)}/protocol/openid-connect/{name}"

    def authorization_url(
        self, slug: str, *, redirect_uri: str, state: str, nonce: str, challenge: str, idp_hint: str | None
    ) -> str:
        query = {
            "client_id": self.client_id,
            "response_type": "code",
            "scope": "openid",
            "redirect_uri": redirect_uri,
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if idp_hint:
            query["kc_idp_hint"] = idp_hint  # straight to the customer's IdP, no Keycloak login page
        return f"{self._endpoint(slug, 'auth')}?{urlencode(query)}"

    def end_session_url(self, slug: str, *, id_token: str | None, post_logout_redirect_uri: str) -> str:
        query = {"client_id": self.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        if id_token:
            query["id_token_hint"] = id_token
        return f"{self._endpoint(slug, 'logout')}?{urlencode(query)}"

    async def exchange(self, slug: str, *, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        """The token response for ``code``; :class:`LoginError` ``code_rejected`` when Keycloak refuses it."""
        try:
            response = await self._http.post(
                self._endpoint(slug, "token"),
                data={
                    "grant_type": "authorization_code",
                    "client_id": self.client_id,
                    "code": code,
                    "code_verifier": verifier,
                    "redirect_uri": redirect_uri,
                },
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise LoginError("idp_unavailable", f"token endpoint: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise LoginError("code_rejected", f"token endpoint answered {response.status_code} {error or ''}".strip())
        if not isinstance(body.get("id_token"), str) or not isinstance(body.get("access_token"), str):
            raise LoginError("bad_token_response", "the token response lacks id_token or access_token")
        return body

    async def _signing_key(self, token: str, slug: str | None) -> tuple[str, jwt.PyJWK, str]:
        """(tenant, key, algorithm) of a token of one of our realms (``slug``'s, when given), before verifying it."""
        header, unverified = parse_unverified(token)
        alg, kid = check_algorithm(header)
        tenant = expected_tenant(self.naming, unverified.get("iss"), slug)
        return tenant, await self.validator.jwks.key(self.naming.jwks_url(tenant), kid, alg), alg

    async def _claims(self, token: str, slug: str, audience: str) -> dict[str, Any]:
        tenant, key, alg = await self._signing_key(token, slug)
        return verify(
            token, key, alg, issuer=self.naming.issuer(tenant), audience=audience, leeway=self.validator.leeway
        )

    async def identity(self, slug: str, tokens: dict[str, Any], nonce: str) -> Identity:
        """Validate the id and access tokens of a token response; :class:`LoginError` with the reason."""
        id_token = str(tokens["id_token"])
        try:
            claims = await self._claims(id_token, slug, self.client_id)
            if claims.get("typ") not in (None, "ID"):
                raise TokenError(TokenReason.WRONG_TYPE, f"a {claims.get('typ')!r} token is not an id token")
            if claims.get(self.validator.tenant_claim) != slug:
                raise TokenError(TokenReason.WRONG_TENANT, "the id token names another tenant")
            access = await self.validator.validate(str(tokens["access_token"]), tenant_slug=slug)
        except TokenError as exc:
            raise LoginError(f"token_{exc.reason.value}", exc.detail) from exc
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
            raise LoginError("nonce_mismatch", "the id token's nonce is not the one this login sent")
        if access.subject != claims.get("sub"):
            raise LoginError("subject_mismatch", "the access and id tokens name different subjects")
        realm_access = access.claims.get("realm_access")
        raw_roles = realm_access.get("roles", []) if isinstance(realm_access, dict) else []
        email = claims.get("email") if isinstance(claims.get("email"), str) else ""
        name = claims.get("name") or claims.get("preferred_username") or email
        sid = claims.get("sid")
        return Identity(
            subject=str(claims["sub"]),
            email=str(email),
            name=str(name),
            roles=admin_roles(raw_roles if isinstance(raw_roles, list) else []),
            realm_session=sid if isinstance(sid, str) else None,
            id_token=id_token,
        )

    async def logout_request(self, token: str) -> LogoutRequest:
        """A valid back-channel logout token's request; :class:`TokenError` (never trusted unverified)."""
        slug, key, alg = await self._signing_key(token, None)  # one of our realms, or refused
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.client_id,
                issuer=self.naming.issuer(slug),
                leeway=self.validator.leeway,
                options={"require": ["iss", "aud", "iat", "jti"]},
            )
        except jwt.InvalidSignatureError as exc:
            raise TokenError(TokenReason.BAD_SIGNATURE, str(exc)) from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenError(TokenReason.WRONG_AUDIENCE, str(exc)) from exc
        except jwt.ExpiredSignatureError as exc:
            raise TokenError(TokenReason.EXPIRED, str(exc)) from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError(TokenReason.MALFORMED, str(exc)) from exc
        events = claims.get("events")
        if not isinstance(events, dict) or BACKCHANNEL_EVENT not in events or "nonce" in claims:
            raise TokenError(TokenReason.WRONG_TYPE, "not a back-channel logout token")
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or abs(time.time() - float(iat)) > 300 + self.validator.leeway:
            raise TokenError(TokenReason.EXPIRED, "the logout token was issued more than 5 minutes ago")
        sid, sub = claims.get("sid"), claims.get("sub")
        if not isinstance(sid, str) and not isinstance(sub, str):
            raise TokenError(TokenReason.MALFORMED, "the logout token names neither sid nor sub")
        return LogoutRequest(
            tenant_slug=slug,
            sid=sid if isinstance(sid, str) else None,
            subject=sub if isinstance(sub, str) else None,
            jti=str(claims["jti"]),
        )

    async def aclose(self) -> None:
        await self._http.aclose()
