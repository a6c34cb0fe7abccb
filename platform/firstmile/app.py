"""The regional API: the Litestar app over the wiring's container.

:func:`create_app` assembles the slices' controllers, the authentication middleware, the
dependency providers and the exception handlers around one
:class:`~firstmile.wiring.container.Container`, which builds every service at startup.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from litestar import Litestar, Request, Response
from litestar.enums import ScopeType
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from firstmile import __version__
from firstmile.admin.api import LoginController, admin_api_router
from firstmile.analytics.api import AnalyticsController
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.api import AuditController
from firstmile.auth.middleware import ApiKeyMiddleware
from firstmile.embed.api import EmbedController, EmbedScriptController
from firstmile.embed.cors import EmbedCorsMiddleware
from firstmile.events.api import EventsController
from firstmile.guardrail.middleware import RateLimitMiddleware
from firstmile.kit import telemetry
from firstmile.kit.errors import exception_handlers, problem_response
from firstmile.kit.health import HealthController, metrics
from firstmile.kit.heap import freeze_startup_heap
from firstmile.kit.openapi import document_problems
from firstmile.ml.inference import GuardedInference, StageReader
from firstmile.nudges.api import (
    ConsentsController,
    InAppMessagesController,
    NudgeLinksController,
    NudgeWebhooksController,
    PushSubscriptionsController,
)
from firstmile.onboarding.api import OnboardingController
from firstmile.onboarding.review_api import OverrideController, ReviewController
from firstmile.privacy.api import UsersController
from firstmile.security.keys import KeyProviderError
from firstmile.security.pii import RedactingFilter
from firstmile.settings import Settings, get_settings
from firstmile.web.errors import for_people
from firstmile.web.pages import PagesController
from firstmile.wiring.container import Container, Overrides
from firstmile.wiring.providers import dependencies

PUBLIC_PATHS = ["^/health", "^/metrics", "^/schema", "^/embed/v1/"]
ADMIN_PATHS = ["^/admin"]  # the admin UI authenticates with its session cookie, not API keys
_access_log = logging.getLogger("firstmile.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


class RequestContextMiddleware:
    """Request id, log context and latency metrics around everything else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        rid_token = telemetry.request_id_var.set(request_id)
        tenant_token = telemetry.tenant_var.set(None)
        status = 500
        began = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - began
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "GET")
            telemetry.API_LATENCY.labels(method, route, str(status)).observe(elapsed)
            if _access_log.isEnabledFor(logging.INFO):
                _access_log.info(
                    "request",
                    extra={
                        "fields": {
                            "method": method,
                            "path": scope["path"],
                            "route": route,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                        }
                    },
                )
            telemetry.request_id_var.reset(rid_token)
            telemetry.tenant_var.reset(tenant_token)


def _on_key_provider_error(request: Request[Any, Any, Any], exc: KeyProviderError) -> Response[bytes]:
    """The tenant's key provider cannot be reached or refuses: nothing was written (no plaintext fallback)."""
    logging.getLogger("firstmile.keys").error("key provider failed", extra={"fields": {"error": str(exc)}})
    return problem_response(
        request,
        503,
        "key-provider-unavailable",
        "the tenant's key provider is unavailable; nothing was written, retry later",
        headers={"Retry-After": "5"},
    )


def create_app(
    settings: Settings,
    database_url: str,
    pepper: bytes,
    *,
    analytics: AnalyticsStore | None = None,
    relay_database_url: str | None = None,
    inference: tuple[GuardedInference, StageReader] | None = None,
) -> Litestar:
    """Build the API for one region; its services start at startup and stop at shutdown.

    ``analytics`` is the analytics store (opened from the settings when omitted).
    With ``relay_database_url`` and no Kafka configured, the process also runs the
    outbox relay and dispatches events to the consumers in-process (embedded mode).
    ``inference`` is the guarded model client and the registry's stage reader (opened
    from the settings when omitted: Ray Serve at ``inference_url``, else in-process).
    """
    # Every log line passes the PII redactor; if it fails, the line says so instead of leaking.
    telemetry.configure_logging(
        settings.telemetry.log_level, settings.telemetry.log_format, filters=[RedactingFilter()]
    )
    provider = telemetry.configure_tracing(
        settings.telemetry.service_name, settings.telemetry.otel_exporter, settings.telemetry.otel_endpoint
    )
    container = Container(
        settings,
        database_url,
        pepper,
        Overrides(analytics=analytics, inference=inference, relay_database_url=relay_database_url),
    )
    app = Litestar(
        route_handlers=[
            HealthController,
            metrics,
            OnboardingController,
            ReviewController,
            OverrideController,
            EventsController,
            AnalyticsController,
            AuditController,
            UsersController,
            NudgeLinksController,
            NudgeWebhooksController,
            InAppMessagesController,
            EmbedController,
            EmbedScriptController,
            PushSubscriptionsController,
            ConsentsController,
            LoginController,
            PagesController,
            admin_api_router(container.admin_source()),
        ],
        dependencies=dependencies(container),
        on_startup=[container.start],
        on_shutdown=[container.stop],
        middleware=[
            DefineMiddleware(
                ApiKeyMiddleware, authenticate=container.authenticator(), exclude=PUBLIC_PATHS + ADMIN_PATHS
            ),
            # after authentication (it needs the principal): per-key and per-tenant limits, the abuse detector
            *(
                [DefineMiddleware(RateLimitMiddleware, admit=container.rate_limit_check())]
                if settings.guardrail.rate_limit_enabled
                else []
            ),
        ],
        # Server spans cost ~0.3 ms of CPU per request; record them only when they go somewhere.
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=provider, exclude=PUBLIC_PATHS))]
        if settings.telemetry.otel_exporter != "none"
        else [],
        exception_handlers=for_people({**exception_handlers(), KeyProviderError: _on_key_provider_error}),
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Firstmile API",
            version=__version__,
            path="/schema",
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        bearer_format="fm_… or JWT",
                        description=(
                            "Tenant API key from `firstmile keys create`, or a client-credentials access token "
                            "of the tenant's Keycloak realm"
                        ),
                    ),
                }
            ),
            security=[{"apiKey": []}],
        ),
        logging_config=None,  # logging is ours: JSON lines via telemetry.configure_logging
        debug=False,
    )
    # Every answer in the OpenAPI document: the problems of each operation, and bodies that refuse unknown fields.
    document_problems(app, public=PUBLIC_PATHS)
    # The container is kept for the process's own lifecycle and for tests; handlers never read it.
    app.state.container = container
    # Outside Litestar's exception handling, so 401/421 from authentication and 404/405 from
    # routing also carry the request id and are measured with their real status.
    app.asgi_handler = RequestContextMiddleware(EmbedCorsMiddleware(app.asgi_handler))
    return app


def app_factory() -> Litestar:
    """Entry point for ``uvicorn --factory``: settings and secrets from the environment.

    ``firstmile serve`` resolves the embedded database and pepper first and
    passes them down as ``FIRSTMILE_*`` variables, so every worker agrees.
    """
    from firstmile.wiring.embedded import resolve_database, resolve_pepper

    settings = get_settings()
    urls = resolve_database(settings)
    relay = settings.events.relay_database_url
    relay_url = relay.get_secret_value() if relay is not None else urls.admin
    app = create_app(settings, urls.app, resolve_pepper(settings), relay_database_url=relay_url)
    # after the container's start (pools, models, caches): collections skip what startup made
    app.on_startup.append(freeze_startup_heap)
    return app
