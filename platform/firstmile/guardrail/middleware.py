"""The rate-limit middleware of the tenant API: after authentication, before the handler.

It sees the principal the API key middleware set. A request without one (health, metrics, the
schema, the admin UI, the Segment webhook, an ``OPTIONS`` preflight) passes untouched. Every
other request is checked once (:meth:`~firstmile.guardrail.service.Guardrail.admit`): refused,
it answers ``429`` ``rate-limited`` with ``Retry-After`` before the body is read, so nothing
of it is processed; admitted, its response (whatever its status) carries ``RateLimit-Policy``
and ``RateLimit``. The wiring hands it the check as a plain function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from firstmile.guardrail.policy import Verdict, limit_header, policy_header
from firstmile.kit.auth import Principal
from firstmile.kit.errors import ProblemError

Admit = Callable[[Principal, str], Awaitable[Verdict]]
"""Checks one request: its principal and ``METHOD /route/{template}``."""


def header_fields(verdict: Verdict) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` of a checked request."""
    return {
        "RateLimit-Policy": policy_header(tuple(s.quota for s in verdict.standings)),
        "RateLimit": limit_header(verdict.standings),
    }


def rate_limited(verdict: Verdict) -> ProblemError:
    """The 429 of a refused request: which limits refused it, when to retry, and the RateLimit fields."""
    violated = verdict.violated
    retry = verdict.retry_after_seconds
    return ProblemError(
        429,
        "rate-limited",
        f"too many requests for the {' and '.join(violated)} rate limit; retry in {retry} s",
        headers={"Retry-After": str(retry), **header_fields(verdict)},
        violated_policies=violated,
    )


class RateLimitMiddleware:
    """Applies the guardrail's limits to every authenticated request (see the module docstring)."""

    def __init__(self, app: ASGIApp, admit: Admit) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("user")
        if scope["type"] != ScopeType.HTTP or not isinstance(principal, Principal):
            await self.app(scope, receive, send)
            return
        # the route's template, never the path itself: it may carry a user id
        activity = f"{scope['method']} {scope.get('path_template') or 'unmatched'}"
        verdict = await self.admit(principal, activity)
        if not verdict.admitted:
            raise rate_limited(verdict)
        fields = [(name.lower().encode(), value.encode()) for name, value in header_fields(verdict).items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *fields]
            await send(message)

        await self.app(scope, receive, send_with_limits)


__all__ = ["Admit", "RateLimitMiddleware", "header_fields", "rate_limited"]
