"""The authentication middleware of the tenant API: every request outside the public paths has a principal.

It runs before routing reaches a handler, so an unknown key is refused before the body is read.
The wiring hands it the function that resolves a credential (:meth:`KeyResolver.principal`),
so the middleware holds no service of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp, Method, Scopes

from firstmile.kit import telemetry
from firstmile.kit.auth import Principal

IDENTITY_HEADER = "x-firstmile-identity"
"""The embed SDK's identity token (docs/embed.md): which user a publishable key speaks for."""


@dataclass(frozen=True, slots=True)
class Presented:
    """The credentials a request presents: its ``Authorization``, and what tells a browser's request apart."""

    authorization: str | None
    origin: str | None = None
    identity: str | None = None
    browser: bool = False
    """``Origin`` or a ``Sec-Fetch-Site`` header is present: only browsers send those on their own."""


Authenticate = Callable[[Presented], Awaitable[Principal]]
"""Resolves a request's credentials to a principal, or raises a 401/403/421 problem."""


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
        headers = connection.headers
        origin = headers.get("origin")
        presented = Presented(
            headers.get("authorization"),
            origin,
            headers.get(IDENTITY_HEADER),
            origin is not None or "sec-fetch-site" in headers,
        )
        principal = await self.authenticate(presented)
        telemetry.tenant_var.set(principal.tenant_slug)
        return AuthenticationResult(user=principal, auth=principal.actor)


__all__ = ["IDENTITY_HEADER", "ApiKeyMiddleware", "Authenticate", "Presented"]
