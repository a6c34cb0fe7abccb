"""Authentication of tenant apps by API key, the typed principal, scope guards.

The middleware resolves ``Authorization: Bearer fm_…`` (or Segment's ``Basic``
with the key as user name) to a :class:`Principal`
before any handler runs, so an unknown key is refused before the body is even
read. The tenant's home region is checked here too: a process serves one region.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp, Guard, Scopes
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit import telemetry
from firstmile.kit.db import TenantId, authorise_tenant, retry_transient
from firstmile.kit.errors import ProblemError
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import repository as tenancy_repo


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant app holding a key with some scopes."""

    tenant_id: TenantId
    tenant_slug: str
    tenant_revision: int
    scopes: frozenset[str]
    key_id: uuid.UUID


class KeyResolver:
    """Resolves key hashes to principals, with a small per-process TTL cache.

    Revocation takes effect within ``ttl`` seconds. Unknown keys are not cached,
    so a stream of random keys cannot fill memory.
    """

    def __init__(self, engine: AsyncEngine, pepper: bytes, region: str, ttl: float, max_entries: int = 10_000):
        self.engine = engine
        self.pepper = pepper
        self.region = region
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[bytes, tuple[float, tenancy_repo.ResolvedKey]] = OrderedDict()

    async def _lookup(self, digest: bytes) -> tenancy_repo.ResolvedKey | None:
        if self.ttl > 0:
            hit = self._cache.get(digest)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]

        async def lookup() -> tenancy_repo.ResolvedKey | None:
            async with self.engine.connect() as conn:
                # one statement, read-only: no BEGIN/ROLLBACK round trips around it
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                return await tenancy_repo.resolve_key(conn, digest)

        resolved = await retry_transient(lookup)
        if resolved is not None and self.ttl > 0:
            self._cache[digest] = (time.monotonic() + self.ttl, resolved)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return resolved

    async def principal(self, authorization: str | None) -> Principal:
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
        if not keylib.looks_like_key(token):
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
            raise ProblemError(
                421,
                "wrong-region",
                f"tenant {resolved.tenant_slug} is homed in {resolved.home_region}; this is {self.region}",
                home_region=resolved.home_region,
            )
        if resolved.key_region != self.region:
            raise ProblemError(
                421,
                "wrong-region",
                f"this key was issued for {resolved.key_region}; this is {self.region}",
                home_region=resolved.home_region,
            )
        return Principal(
            tenant_id=authorise_tenant(resolved.tenant_id),
            tenant_slug=resolved.tenant_slug,
            tenant_revision=resolved.tenant_revision,
            scopes=frozenset(resolved.scopes),
            key_id=resolved.key_id,
        )


def _basic_user(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Authenticates every request outside the excluded (public) paths."""

    def __init__(
        self,
        app: ASGIApp,
        exclude: str | list[str] | None = None,
        exclude_from_auth_key: str = "exclude_from_auth",
        exclude_http_methods: list[Any] | None = None,
        scopes: Scopes | None = None,
    ) -> None:
        super().__init__(
            app=app,
            exclude=exclude,
            exclude_from_auth_key=exclude_from_auth_key,
            exclude_http_methods=exclude_http_methods,
            scopes=scopes,
        )

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        resolver: KeyResolver = connection.app.state.key_resolver
        principal = await resolver.principal(connection.headers.get("authorization"))
        telemetry.tenant_var.set(principal.tenant_slug)
        return AuthenticationResult(user=principal, auth=principal.key_id)


def require_scope(scope: str) -> Guard:
    """A guard that lets the request through only if its key has ``scope``."""

    # async on purpose: Litestar runs sync guards in a worker thread on every request
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = connection.user
        if not isinstance(principal, Principal) or scope not in principal.scopes:
            raise ProblemError(403, "forbidden", f"this key lacks the scope {scope}", required_scope=scope)

    guard.__name__ = f"require_scope_{scope.replace(':', '_')}"
    return guard
