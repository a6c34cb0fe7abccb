"""The typed principal of tenant apps, scope guards, and the 421 of a tenant homed elsewhere.

Who resolves a credential to a :class:`Principal` is the ``auth`` slice
(:mod:`firstmile.auth`); this module only defines what every slice's controllers see.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import TenantId, tenant_of


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant app holding a key, or a client of the tenant's realm holding an
    access token (``key_id`` None, ``client_id`` its Keycloak client), with some scopes.

    Made only by the ``auth`` slice after the credential checked out; ``authenticated_tenant``
    is the tenant that credential belongs to.
    """

    authenticated_tenant: uuid.UUID
    tenant_slug: str
    tenant_revision: int
    scopes: frozenset[str]
    key_id: uuid.UUID | None
    client_id: str | None = None
    kind: str = "secret"
    """``secret`` (an ``fm_`` key or an access token) or ``publishable`` (an ``fmpk_`` key from a browser)."""
    user_id: str | None = None
    """A publishable key's user, proven by the identity token: the only user it may read or act for."""

    @property
    def tenant_id(self) -> TenantId:
        """The authorised tenant scope of this principal."""
        return tenant_of(self)

    @property
    def actor(self) -> str:
        """How audit entries and logs name the caller."""
        if self.key_id is not None:
            return f"api_key:{self.key_id}"
        return f"client:{self.client_id or '?'}"

    @property
    def rate_partition(self) -> str:
        """Whose quota a request spends: the credential's, and a publishable key's per user (a hash of the id)."""
        if self.user_id is None:
            return self.actor
        digest = hashlib.sha256(self.user_id.encode("utf-8")).hexdigest()[:24]
        return f"{self.actor}:user:{digest}"


def is_preflight(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """An ``OPTIONS`` request: it carries no credentials (CORS preflights never do) and reaches only
    Litestar's own OPTIONS handler, which answers 204 with ``Allow``; guards let it pass."""
    return connection.scope.get("method") == "OPTIONS"


def require_scope(scope: str, *alternatives: str) -> Guard:
    """A guard that lets the request through only if its key has ``scope`` (or one of ``alternatives``).

    An alternative is a scope that implies this one: ``onboarding:write`` also reads what
    ``onboarding:read`` reads. A refusal names ``scope``, the least the request needs.
    """
    accepted = frozenset((scope, *alternatives))

    # async on purpose: Litestar runs sync guards in a worker thread on every request
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if is_preflight(connection):
            return
        principal = connection.user
        if not isinstance(principal, Principal) or not accepted & principal.scopes:
            raise ProblemError(403, "forbidden", f"these credentials lack the scope {scope}", required_scope=scope)

    guard.__name__ = f"require_scope_{scope.replace(':', '_')}"
    return guard


def wrong_region(slug: str, home: str, here: str, detail: str | None = None) -> ProblemError:
    """The 421 of a tenant homed in another region, naming it (clients and browsers go there)."""
    return ProblemError(
        421, "wrong-region", detail or f"tenant {slug} is homed in {home}; this is {here}", home_region=home
    )


__all__ = ["Principal", "is_preflight", "require_scope", "wrong_region"]
