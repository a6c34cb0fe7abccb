"""Litestar dependency providers: how a handler gets its services and its tenant-bound unit of work.

A handler names what it needs as parameters (``uow: UnitOfWork``, ``onboarding:
OnboardingService``, …); :func:`dependencies` maps each name to the container's service.
The unit of work is made per request from the authenticated principal (an API key, a
client-credentials token or an admin session): the one place a request's tenant scope is
minted (:func:`firstmile.kit.scope.tenant_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request
from litestar.di import Provide

from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import AuthenticatedPrincipal, tenant_of
from firstmile.kit.uow import UnitOfWork
from firstmile.wiring.container import Container


def _service(container: Container, attribute: str) -> Provide:
    def provide() -> Any:
        return getattr(container, attribute)

    provide.__name__ = f"provide_{attribute}"
    return Provide(provide, sync_to_thread=False)


def _unit_of_work(container: Container) -> Callable[[Request[Any, Any, Any]], UnitOfWork]:
    def provide_uow(request: Request[Any, Any, Any]) -> UnitOfWork:
        principal = request.scope.get("user")
        if not hasattr(principal, "authenticated_tenant"):
            raise ProblemError(401, "unauthenticated", "this endpoint needs credentials")
        scoped: AuthenticatedPrincipal = principal
        return UnitOfWork(container.engine, tenant_of(scoped))

    return provide_uow


def dependencies(container: Container) -> dict[str, Provide]:
    """Every dependency a handler may declare, by parameter name."""
    services = {
        "onboarding": "onboarding",
        "ingestion": "ingestion",
        "analytics": "analytics",
        "audit_log": "audit",
        "privacy": "privacy",
        "admin_auth": "admin_auth",
        "path_editor": "path_editor",
        "readiness": "readiness",
        "nudge_links": "nudge_links",
        "nudge_webhooks": "nudge_webhooks",
        "push_subscriptions": "push_subscriptions",
        "inbox": "inbox",
        "embed": "embed",
        "model_admin": "model_admin",
    }
    provided = {name: _service(container, attribute) for name, attribute in services.items()}
    provided["uow"] = Provide(_unit_of_work(container), sync_to_thread=False)
    return provided


__all__ = ["dependencies"]
