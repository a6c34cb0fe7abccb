"""The authentication middleware of the tenant API: every request outside the public paths has a principal.

It runs before routing reaches a handler, so an unknown key is refused before the body is read.
The wiring hands it the function that resolves a credential (:meth:`KeyResolver.principal`),
so the middleware holds no service of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp, Method, Scopes

from firstmile.kit import telemetry
from firstmile.kit.auth import Principal

Authenticate = Callable[[str | None], Awaitable[Principal]]
"""Resolves an ``Authorization`` header to a principal, or raises a 401/421 problem."""


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Authenticates every request outside the excluded (public) paths."""

    def __init__(
        self,
        app: ASGIApp,
        authenticate: Authenticate,
        exclude: str | list[str] | None = None,
        exclude_from_auth_key: str = "exclude_from_auth",
        exclude_http_methods: list[Method] | None = None,
        scopes: Scopes | None = None,
    ) -> None:
        super().__init__(
            app=app,
            exclude=exclude,
            exclude_from_auth_key=exclude_from_auth_key,
            exclude_http_methods=exclude_http_methods,
            scopes=scopes,
        )
        self.authenticate = authenticate

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        principal = await self.authenticate(connection.headers.get("authorization"))
        telemetry.tenant_var.set(principal.tenant_slug)
        return AuthenticationResult(user=principal, auth=principal.actor)


__all__ = ["ApiKeyMiddleware", "Authenticate"]
