"""Authentication of tenant apps by API key or client-credentials token.

:class:`KeyResolver` turns ``Authorization: Bearer fm_…`` (or Segment's ``Basic``
with the key as user name) into a :class:`~firstmile.kit.auth.Principal`; the middleware
(:mod:`firstmile.auth.middleware`) calls it before any handler runs, so an unknown key is
refused before the body is even read. The tenant's home region is checked here too: a
process serves one region.

A bearer credential shaped like a JWT (three dot-separated parts, not ``fm_``) is an
access token of the tenant's Keycloak realm (OAuth2 client credentials): the realm
named by its issuer (``firstmile-<slug>``) picks the tenant, which must exist here
before any JWKS is fetched; :class:`~firstmile.sso.tokens.TokenValidator` checks it;
its scopes are the ``scope`` claim's values that are platform scopes. Without
``FIRSTMILE_KEYCLOAK_URL`` tokens are refused (401 ``invalid-token``).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any, Never

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.auth.identity import IdentityError, verify_identity
from firstmile.kit.auth import Principal, wrong_region
from firstmile.kit.cache import MISS, TtlCache
from firstmile.kit.db import TenantTx, retry_transient
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.sso.tokens import TokenError, TokenReason, TokenValidator, parse_unverified
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.directory import TenantDirectory
from firstmile.tenancy.service import ResolvedKey, ResolvedTenant

log = logging.getLogger("firstmile.auth")

PLATFORM_SCOPES: frozenset[str] = frozenset(keylib.SCOPES)
REFUSALS_AUDITED_PER_MINUTE = 20


_REFUSALS = OperatorContext("worker:auth")
"""Refused credentials are audited for the tenant they name (a token's issuer, a known key), which
authenticated nothing."""


class KeyResolver:
    """Resolves key hashes to principals, with a small per-process TTL cache.

    Revocation takes effect within ``ttl`` seconds. Unknown keys are not cached,
    so a stream of random keys cannot fill memory.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        pepper: bytes,
        region: str,
        ttl: float,
        max_entries: int = 10_000,
        tokens: TokenValidator | None = None,
        directory: TenantDirectory | None = None,
        identity_max_seconds: int = 3600,
    ):
        self.engine = engine
        self.pepper = pepper
        self.region = region
        self.ttl = ttl
        self.max_entries = max_entries
        self.tokens = tokens
        self.directory = directory
        self.identity_max_seconds = identity_max_seconds
        self._cache: TtlCache[bytes, ResolvedKey] = TtlCache(ttl, max_entries)
        self._tenants: TtlCache[str, ResolvedTenant] = TtlCache(ttl, max_entries)
        self._refusals: dict[str, tuple[float, int, int]] = {}  # slug -> (window start, audited, left out)

    async def _lookup(self, digest: bytes) -> ResolvedKey | None:
        hit = self._cache.get(digest)
        if hit is not MISS:
            return hit

        async def lookup() -> ResolvedKey | None:
            async with self.engine.connect() as conn:
                # one statement, read-only: no BEGIN/ROLLBACK round trips around it
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await tenancy.resolve_key(conn, digest)

        resolved = await retry_transient(lookup)
        if resolved is not None:
            self._cache.put(digest, resolved)
        return resolved

    async def principal(
        self,
        authorization: str | None,
        *,
        origin: str | None = None,
        identity: str | None = None,
        browser: bool = False,
    ) -> Principal:
        """The principal of a request's credential, or a 401/403/421 problem.

        ``origin`` is the request's ``Origin`` header, ``identity`` its ``X-Firstmile-Identity`` (the embed SDK's
        identity token), ``browser`` whether a browser sent it (``Origin`` or ``Sec-Fetch-*`` present): a secret
        ``fm_`` key is refused from a browser; a publishable ``fmpk_`` key is accepted only from one of its
        origins and with a valid identity token, and then speaks for that one user.
        """
        if not authorization:
            raise ProblemError(
                401,
                "unauthenticated",
                "send an API key as 'Authorization: Bearer fm_…'",
                headers={"WWW-Authenticate": 'Bearer realm="firstmile"'},
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "basic":
            # Segment's convention: the write key is the Basic user name, the password empty.
            token = _basic_user(token)
        elif scheme.lower() != "bearer":
            token = ""
        if scheme.lower() == "bearer" and keylib.looks_like_publishable(token):
            return await self._publishable_principal(token, origin, identity)
        if not keylib.looks_like_key(token):
            if scheme.lower() == "bearer" and token.count(".") == 2:
                return await self._token_principal(token)
            raise ProblemError(
                401,
                "unauthenticated",
                "the Authorization header is not a Firstmile API key",
                headers={"WWW-Authenticate": 'Bearer realm="firstmile", error="invalid_token"'},
            )
        resolved = await self._lookup(keylib.hash_key(self.pepper, token))
        if resolved is None or resolved.revoked:
            raise ProblemError(
                401,
                "unauthenticated",
                "the API key is unknown or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="firstmile", error="invalid_token"'},
            )
        if resolved.home_region != self.region:
            raise wrong_region(resolved.tenant_slug, resolved.home_region, self.region)
        self._check_region(resolved)
        if browser:
            await self._refused(
                resolved, "secret-key-in-browser", {"origin": origin},
                ProblemError(403, "secret-key-in-browser", "a secret fm_ key is never accepted from a browser: a web "
                             "page uses a publishable fmpk_ key with an identity token (docs/embed.md)"),
            )  # fmt: skip
        return Principal(
            authenticated_tenant=resolved.tenant_id,
            tenant_slug=resolved.tenant_slug,
            tenant_revision=resolved.tenant_revision,
            scopes=frozenset(resolved.scopes),
            key_id=resolved.key_id,
        )

    def _check_region(self, resolved: ResolvedKey) -> None:
        if resolved.key_region != self.region:
            raise wrong_region(
                resolved.tenant_slug,
                resolved.home_region,
                self.region,
                f"this key was issued for {resolved.key_region}; this is {self.region}",
            )

    async def _publishable_principal(self, token: str, origin: str | None, identity: str | None) -> Principal:
        """A publishable key's principal: one of its origins, and the user its identity token names."""
        resolved = await self._lookup(keylib.hash_key(self.pepper, token))
        if resolved is None or resolved.revoked or resolved.kind != "publishable":
            raise ProblemError(
                401,
                "unauthenticated",
                "the publishable key is unknown or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="firstmile", error="invalid_token"'},
            )
        if resolved.home_region != self.region:
            raise wrong_region(resolved.tenant_slug, resolved.home_region, self.region)
        self._check_region(resolved)
        if origin is None or origin not in resolved.origins:
            shown = "no Origin header" if origin is None else f"the origin {origin!r}"
            await self._refused(
                resolved, "origin-not-allowed", {"origin": origin},
                ProblemError(403, "origin-not-allowed", f"this publishable key may not be used from {shown}; "
                             "the tenant lists its origins when it creates the key"),
            )  # fmt: skip
        try:
            verified = verify_identity(
                identity, keylib.identity_secret(self.pepper, resolved.key_id), max_lifetime_s=self.identity_max_seconds
            )
        except IdentityError as exc:
            await self._refused(
                resolved, "invalid-identity", {"origin": origin, "identity": exc.reason.value},
                ProblemError(401, "invalid-identity", exc.detail, reason=exc.reason.value,
                             headers={"WWW-Authenticate": 'FirstmileIdentity realm="firstmile"'}),
            )  # fmt: skip
        return Principal(
            authenticated_tenant=resolved.tenant_id,
            tenant_slug=resolved.tenant_slug,
            tenant_revision=resolved.tenant_revision,
            scopes=frozenset((keylib.EMBED_SCOPE,)),
            key_id=resolved.key_id,
            kind="publishable",
            user_id=verified.user_id,
        )

    async def _refused(
        self, resolved: ResolvedKey, reason: str, payload: dict[str, Any], problem: ProblemError
    ) -> Never:
        """Audit a refused use of a known key (``auth.key_refused``, rate-limited), then raise ``problem``."""
        log.info("key refused: %s", reason, extra={"fields": {"key_id": str(resolved.key_id), "reason": reason}})
        await self._audit_limited(
            resolved.tenant_id, resolved.tenant_slug, "auth.key_refused", f"api_key:{resolved.key_id}",
            {"reason": reason, **payload},
        )  # fmt: skip
        raise problem

    async def _token_principal(self, token: str) -> Principal:
        """The principal of a client-credentials access token of the tenant's realm, or a 401."""
        if self.tokens is None:
            raise _invalid_token("access tokens are not accepted here: no Keycloak is configured; use an API key")
        try:
            _, unverified = parse_unverified(token)
            issuer = unverified.get("iss")
            slug = self.tokens.naming.tenant_of_issuer(issuer) if isinstance(issuer, str) else None
            if slug is None:
                raise TokenError(TokenReason.WRONG_ISSUER, "the issuer is not a tenant realm of this platform")
            # Only realms of tenants that exist make the validator fetch keys: a made-up realm name
            # costs one indexed lookup, never a request to Keycloak.
            tenant = await self.tenant(slug)
            if tenant is None:
                await self._refuse_if_homed_elsewhere(slug)
                raise TokenError(TokenReason.WRONG_TENANT, f"no tenant {slug!r} for the issuing realm")
            try:
                checked = await self.tokens.validate(token, slug)
            except TokenError as exc:
                await self._audit_refusal(tenant, exc, unverified)
                raise
        except TokenError as exc:
            log.info("access token refused: %s", exc.reason.value, extra={"reason": exc.detail})
            raise _invalid_token(f"the access token is not accepted: {exc.reason.value}", exc.reason) from None
        if tenant.home_region != self.region:
            raise wrong_region(tenant.tenant_slug, tenant.home_region, self.region)
        return Principal(
            authenticated_tenant=tenant.tenant_id,
            tenant_slug=tenant.tenant_slug,
            tenant_revision=tenant.tenant_revision,
            scopes=checked.scopes & PLATFORM_SCOPES,
            key_id=None,
            client_id=checked.client_id,
        )

    async def _audit_refusal(self, tenant: ResolvedTenant, exc: TokenError, unverified: dict[str, Any]) -> None:
        """An ``auth.token_refused`` entry in the tenant's audit log for a token naming its realm."""
        client = unverified.get("azp", unverified.get("client_id"))
        payload = {"reason": exc.reason.value, "client_id": client if isinstance(client, str) else None}
        await self._audit_limited(tenant.tenant_id, tenant.tenant_slug, "auth.token_refused", "access-token", payload)

    async def _audit_limited(
        self, tenant_id: uuid.UUID, slug: str, kind: str, subject: str, payload: dict[str, Any]
    ) -> None:
        """A refusal's entry in the tenant's audit log, actor ``anonymous``.

        At most :data:`REFUSALS_AUDITED_PER_MINUTE` per tenant and minute per process, so a flood of bad
        credentials cannot flood the log (or hold its per-tenant append lock): the next entry after a full
        minute counts the ones left out (``not_audited_before``). A failed write is logged, never turns the
        refusal into a 500.
        """
        now = time.monotonic()
        start, count, left_out = self._refusals.get(slug, (now, 0, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= REFUSALS_AUDITED_PER_MINUTE:
            self._refusals[slug] = (start, count, left_out + 1)
            return
        self._refusals[slug] = (start, count + 1, 0)
        entry = {**payload, "not_audited_before": left_out}

        async def work(tx: TenantTx) -> None:
            await audit.append(tx, kind, "anonymous", subject, entry)

        try:
            await UnitOfWork(self.engine, _REFUSALS.tenant(tenant_id)).run(work)
        except Exception:
            log.exception("could not audit a refused credential")

    async def _refuse_if_homed_elsewhere(self, slug: str) -> None:
        """421 with the directory's home region for a tenant this region's database does not hold.

        Said before the token is checked (no JWKS is fetched for a tenant not held here):
        it tells a misrouted client where the tenant lives, which the directory makes no secret of.
        """
        if self.directory is None:
            return
        home = await self.directory.home_region(slug)
        if home is not None and home != self.region:
            raise wrong_region(slug, home, self.region)

    async def tenant(self, slug: str) -> ResolvedTenant | None:
        """The tenant ``slug`` if this region's database holds it (cached like keys; unknown slugs are not)."""
        hit = self._tenants.get(slug)
        if hit is not MISS:
            return hit

        async def lookup() -> ResolvedTenant | None:
            async with self.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await tenancy.resolve_tenant(conn, slug)

        resolved = await retry_transient(lookup)
        if resolved is not None:  # unknown slugs are not cached: no memory for made-up realms
            self._tenants.put(slug, resolved)
        return resolved


def _invalid_token(detail: str, reason: TokenReason | None = None) -> ProblemError:
    extensions = {} if reason is None else {"reason": reason.value}
    return ProblemError(
        401,
        "invalid-token",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="firstmile", error="invalid_token"'},
        **extensions,
    )


def _basic_user(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]
