"""Validation of access tokens issued by a tenant's Keycloak realm, done here, with no call per request.

Each tenant has its own realm, ``<realm_prefix><slug>`` (``firstmile-acme``), so the realm's issuer URL,
``<keycloak_url>/realms/firstmile-acme``, names the tenant. A token is accepted only if all of these hold:

- it is a compact JWS whose header names an allowed asymmetric algorithm (RS256, ES256); ``none`` and
  the HMAC family are refused before any key is looked at (an HMAC "signature" made with a public key
  is the classic confusion attack);
- its issuer is exactly the issuer of the realm of the tenant it is checked for (or, when no tenant is
  given, of a realm this platform names); an issuer that is another tenant's realm is ``wrong_tenant``;
- its ``kid`` is in that realm's JWKS (``…/protocol/openid-connect/certs``), a signing key (``use``
  absent or ``sig``) of the same algorithm, and the signature verifies with it;
- ``exp`` is present and not past, ``nbf``/``iat`` are not in the future (both with a small leeway);
- ``aud`` contains the expected audience;
- ``typ`` (Keycloak's token type) is ``Bearer``: ID and refresh tokens are not access tokens;
- the tenant claim equals the realm's tenant, so a realm whose mappers were set up for someone else
  cannot speak for this tenant.

The JWKS of each realm is cached for ``jwks_max_age`` seconds (removed keys stop being trusted after
that). An unknown ``kid`` (a key rotated in) triggers one refetch, at most once per
``jwks_min_refetch`` seconds per realm, so a stream of forged ``kid`` values cannot make us hammer
Keycloak. Every refusal is a :class:`TokenError` with one :class:`TokenReason`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from jwt.exceptions import PyJWKError

from firstmile.kit.ids import SLUG_PATTERN

ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "ES256"})
_SLUG = re.compile(SLUG_PATTERN[1:-1])


class TokenReason(enum.StrEnum):
    """Why a token was refused; stable values (they go to logs, metrics and audit entries)."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_TENANT = "wrong_tenant"
    WRONG_TYPE = "wrong_type"
    JWKS_UNAVAILABLE = "jwks_unavailable"


class TokenError(Exception):
    """A token that is not accepted, with the reason; ``detail`` is for logs, never for the caller."""

    def __init__(self, reason: TokenReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    """An access token that passed every check."""

    tenant_slug: str
    subject: str
    client_id: str | None
    scopes: frozenset[str]
    issuer: str
    key_id: str
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RealmNaming:
    """Where a tenant's realm lives: ``<keycloak_url>/realms/<prefix><slug>``.

    ``keycloak_url`` is the public base URL, the one Keycloak puts into ``iss`` (its ``hostname``).
    """

    keycloak_url: str
    prefix: str = "firstmile-"

    def realm(self, tenant_slug: str) -> str:
        return f"{self.prefix}{tenant_slug}"

    def issuer(self, tenant_slug: str) -> str:
        return f"{self.keycloak_url.rstrip('/')}/realms/{self.realm(tenant_slug)}"

    def jwks_url(self, tenant_slug: str) -> str:
        return f"{self.issuer(tenant_slug)}/protocol/openid-connect/certs"

    def tenant_of_issuer(self, issuer: str) -> str | None:
        """The tenant whose realm ``issuer`` is, or None when it is no realm of ours."""
        head = f"{self.keycloak_url.rstrip('/')}/realms/{self.prefix}"
        if not issuer.startswith(head):
            return None
        slug = issuer[len(head) :]
        return slug if _SLUG.fullmatch(slug) else None


# ---------------------------------------------------------------- pure checks


def parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, unverified; :class:`TokenError` (malformed) if it is not one."""
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 16_384:
        raise TokenError(TokenReason.MALFORMED, "not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise TokenError(TokenReason.MALFORMED, f"cannot decode: {exc}") from exc
    if not isinstance(claims, dict):
        raise TokenError(TokenReason.MALFORMED, "the payload is not a JSON object")
    return header, claims


def check_algorithm(header: Mapping[str, Any]) -> tuple[str, str]:
    """The (algorithm, kid) of a header, refusing ``none``, HMAC and anything not allowed."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise TokenError(TokenReason.BAD_SIGNATURE, f"algorithm {alg!r} is not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError(TokenReason.UNKNOWN_KEY, "the header names no key (kid)")
    if "jku" in header or "x5u" in header or "jwk" in header:
        # keys come from the realm's JWKS only, never from the token
        raise TokenError(TokenReason.BAD_SIGNATURE, "the header carries its own key reference")
    return alg, kid


def expected_tenant(naming: RealmNaming, issuer: object, tenant_slug: str | None) -> str:
    """The tenant the token must belong to, from its (still unverified) issuer.

    The unverified issuer only picks which realm's keys to verify with; with ``tenant_slug`` given, a
    realm other than that tenant's is refused before any key is fetched.
    """
    if not isinstance(issuer, str):
        raise TokenError(TokenReason.WRONG_ISSUER, "no issuer")
    issuer_tenant = naming.tenant_of_issuer(issuer)
    if issuer_tenant is None:
        raise TokenError(TokenReason.WRONG_ISSUER, f"issuer {issuer!r} is not a tenant realm of this platform")
    if tenant_slug is not None and issuer_tenant != tenant_slug:
        raise TokenError(TokenReason.WRONG_TENANT, f"issued by the realm of {issuer_tenant!r}, not {tenant_slug!r}")
    if issuer != naming.issuer(issuer_tenant):
        raise TokenError(TokenReason.WRONG_ISSUER, f"issuer {issuer!r} differs from {naming.issuer(issuer_tenant)!r}")
    return issuer_tenant


def select_key(jwks: Mapping[str, Any], kid: str, alg: str) -> jwt.PyJWK | None:
    """The signing key ``kid`` of ``jwks`` usable with ``alg``; None when there is none."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        return None
    for entry in keys:
        if not isinstance(entry, dict) or entry.get("kid") != kid:
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", alg) != alg:
            continue  # Keycloak publishes its encryption keys (RSA-OAEP) in the same set
        try:
            key = jwt.PyJWK(entry, algorithm=alg)
        except PyJWKError:
            continue
        return key
    return None


def verify(
    token: str,
    key: jwt.PyJWK,
    alg: str,
    *,
    issuer: str,
    audience: str,
    leeway: float,
    now: float | None = None,
) -> dict[str, Any]:
    """Signature, issuer, audience and times of ``token`` against ``key``; its claims if all hold.

    PyJWT checks the signature (with ``alg`` only), ``iss`` and ``aud``; the times are checked here
    against ``now`` (default: the wall clock) so that the pure checks can be tested at any instant.
    """
    now = time.time() if now is None else now
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iss", "aud"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenError(TokenReason.BAD_SIGNATURE, str(exc)) from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenError(TokenReason.WRONG_AUDIENCE, str(exc)) from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenError(TokenReason.WRONG_ISSUER, str(exc)) from exc
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim == "aud":
            raise TokenError(TokenReason.WRONG_AUDIENCE, str(exc)) from exc
        if exc.claim == "iss":
            raise TokenError(TokenReason.WRONG_ISSUER, str(exc)) from exc
        raise TokenError(TokenReason.MALFORMED, str(exc)) from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError(TokenReason.MALFORMED, str(exc)) from exc
    exp = _number(claims, "exp")
    if exp is None or exp <= now - leeway:
        raise TokenError(TokenReason.EXPIRED, f"expired at {exp} (now {now:.0f}, leeway {leeway} s)")
    for name in ("nbf", "iat"):
        value = _number(claims, name)
        if value is not None and value > now + leeway:
            raise TokenError(TokenReason.NOT_YET_VALID, f"{name} {value} is in the future (now {now:.0f})")
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(TokenReason.MALFORMED, f"{name} is not a number")
    return float(value)


def check_claims(claims: Mapping[str, Any], *, tenant_slug: str, tenant_claim: str) -> None:
    """Keycloak's token type and the tenant claim."""
    typ = claims.get("typ")
    if typ is not None and typ != "Bearer":
        raise TokenError(TokenReason.WRONG_TYPE, f"a {typ!r} token is not an access token")
    value = claims.get(tenant_claim)
    if value is None:
        raise TokenError(TokenReason.WRONG_TENANT, f"no {tenant_claim!r} claim")
    if value != tenant_slug:
        raise TokenError(
            TokenReason.WRONG_TENANT, f"{tenant_claim!r} is {value!r}, the realm's tenant is {tenant_slug!r}"
        )


def validated(claims: Mapping[str, Any], *, tenant_slug: str, issuer: str, kid: str) -> ValidatedToken:
    scope = claims.get("scope")
    client = claims.get("azp", claims.get("client_id"))
    return ValidatedToken(
        tenant_slug=tenant_slug,
        subject=str(claims.get("sub", "")),
        client_id=client if isinstance(client, str) else None,
        scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
        issuer=issuer,
        key_id=kid,
        claims=dict(claims),
    )


# ---------------------------------------------------------------- the JWKS cache

Fetch = Callable[[str], Awaitable[Mapping[str, Any]]]


@dataclass
class _Entry:
    jwks: Mapping[str, Any] | None = None
    fetched_at: float = float("-inf")  # last successful fetch
    attempted_at: float = float("-inf")  # last attempt, successful or not
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksCache:
    """Each realm's JWKS, fetched on first use and kept ``max_age`` seconds; an unknown ``kid`` makes
    one refetch, at most once per ``min_refetch`` seconds per realm (failed attempts count too).

    When a refetch fails, the keys already held keep serving (Keycloak down must not log everyone out)
    and the next attempt waits ``min_refetch``; with no keys held yet the token is refused with
    ``jwks_unavailable``.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        max_age: float,
        min_refetch: float,
        max_realms: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.max_realms = max_realms
        self.max_age = max_age
        self.min_refetch = min_refetch
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self.fetches = 0

    async def key(self, url: str, kid: str, alg: str) -> jwt.PyJWK:
        entry = self._entries.get(url)
        if entry is None:
            while len(self._entries) >= self.max_realms:  # bounded: issuers are attacker-chosen
                del self._entries[next(iter(self._entries))]
            entry = self._entries[url] = _Entry()
        async with entry.lock:  # one fetch per realm at a time; uncontended, it costs no await
            stale = self._clock() - entry.fetched_at >= self.max_age
            if entry.jwks is None or (stale and self._may_attempt(entry)):
                await self._load(entry, url)
            assert entry.jwks is not None
            key = select_key(entry.jwks, kid, alg)
            if key is None and self._may_attempt(entry):
                await self._load(entry, url)
                key = select_key(entry.jwks, kid, alg)
        if key is None:
            raise TokenError(TokenReason.UNKNOWN_KEY, f"no signing key {kid!r} for {alg} in {url}")
        return key

    def _may_attempt(self, entry: _Entry) -> bool:
        return self._clock() - entry.attempted_at >= self.min_refetch

    async def _load(self, entry: _Entry, url: str) -> None:
        if not self._may_attempt(entry):
            if entry.jwks is None:  # the last attempt failed moments ago: do not ask again yet
                raise TokenError(TokenReason.JWKS_UNAVAILABLE, f"{url} failed less than {self.min_refetch} s ago")
            return
        entry.attempted_at = self._clock()
        try:
            jwks = await self._fetch(url)
        except (httpx.HTTPError, ValueError) as exc:
            if entry.jwks is None:
                raise TokenError(TokenReason.JWKS_UNAVAILABLE, f"cannot fetch {url}: {exc}") from exc
            return
        self.fetches += 1
        entry.jwks = jwks
        entry.fetched_at = self._clock()


def http_fetch(client: httpx.AsyncClient) -> Fetch:
    async def fetch(url: str) -> Mapping[str, Any]:
        response = await client.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        body = json.loads(response.content)
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise ValueError("not a JWK set")
        return body

    return fetch


# ---------------------------------------------------------------- the validator


class TokenValidator:
    """Validates access tokens of tenant realms; one per process, shared by every request."""

    def __init__(
        self,
        naming: RealmNaming,
        *,
        audience: str,
        tenant_claim: str = "firstmile_tenant",
        leeway: float = 10.0,
        jwks_max_age: float = 600.0,
        jwks_min_refetch: float = 30.0,
        http_timeout: float = 5.0,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.naming = naming
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.leeway = leeway
        self._http: httpx.AsyncClient | None = None
        if fetch is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(http_timeout), follow_redirects=False)
            fetch = http_fetch(self._http)
        self.jwks = JwksCache(fetch, max_age=jwks_max_age, min_refetch=jwks_min_refetch, clock=clock)

    async def validate(self, token: str, tenant_slug: str | None = None) -> ValidatedToken:
        """The validated token, or :class:`TokenError`. With ``tenant_slug``, only that tenant's realm
        is accepted; without, the realm named by the issuer (one of ours) decides the tenant."""
        header, unverified = parse_unverified(token)
        alg, kid = check_algorithm(header)
        tenant = expected_tenant(self.naming, unverified.get("iss"), tenant_slug)
        issuer = self.naming.issuer(tenant)
        key = await self.jwks.key(self.naming.jwks_url(tenant), kid, alg)
        claims = verify(token, key, alg, issuer=issuer, audience=self.audience, leeway=self.leeway)
        check_claims(claims, tenant_slug=tenant, tenant_claim=self.tenant_claim)
        return validated(claims, tenant_slug=tenant, issuer=issuer, kid=kid)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
