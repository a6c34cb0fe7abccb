"""CORS for the embed API: browsers on a tenant's pages call ``/v1/embed`` with custom headers.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) to ``/v1/embed/…`` is
answered here, before authentication (a preflight never carries credentials): it allows the
methods and headers the SDK sends, for the asking origin, cached for ten minutes. This says yes to
any origin *for the question*, because only the request itself carries the key that says which
origins are allowed; the request is then refused with ``403 origin-not-allowed`` (and audited) by
the ``auth`` slice unless its ``Origin`` is one of the key's. Every answer of an embed request that
has an ``Origin`` echoes it in ``Access-Control-Allow-Origin`` (with ``Vary: Origin``), so the SDK
can read the problem of a refusal too; an answer with data is only ever made for an allowed origin.
No cookies are involved (no ``Access-Control-Allow-Credentials``).
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send

PREFIX = "/v1/embed/"
ALLOWED_METHODS = "GET, POST"
ALLOWED_HEADERS = "authorization, x-firstmile-identity, content-type, last-event-id"
EXPOSED_HEADERS = "RateLimit, RateLimit-Policy, Retry-After, X-Request-Id"
MAX_AGE_S = 600


def _origin(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            return value
    return None


class EmbedCorsMiddleware:
    """See the module docstring; everything outside ``/v1/embed/`` passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        origin = _origin(scope)
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and any(n == b"access-control-request-method" for n, _ in scope["headers"]):
            start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 204, "headers": [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                (b"access-control-max-age", str(MAX_AGE_S).encode()),
                (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            ]}  # fmt: skip
            await send(start)
            body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(body)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers += [
                    (b"access-control-allow-origin", origin),
                    (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
                    (b"vary", b"Origin"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_cors)


__all__ = ["EmbedCorsMiddleware"]
