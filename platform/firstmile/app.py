"""The regional API: wiring of settings, adapters and slices into one Litestar app.

This and :mod:`firstmile.cli` are the only modules that read the environment.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from datetime import timedelta
from typing import Any, cast

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from firstmile import __version__
from firstmile.admin.api import LoginController, admin_api_router
from firstmile.admin.oidc import OidcClient
from firstmile.admin.service import AdminAuth, SessionPolicy
from firstmile.admin.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from firstmile.analytics.api import AnalyticsController
from firstmile.analytics.factory import LazyStore, open_analytics_store
from firstmile.analytics.service import AnalyticsService
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.api import AuditController
from firstmile.audit.service import AuditService, Checkpointer
from firstmile.audit.signing import resolve_signer
from firstmile.events.api import EventsController
from firstmile.events.bus import Consumer
from firstmile.events.consumers import AnalyticsSink, AutoCompletion, FeatureHook
from firstmile.events.dispatch import InProcessPublisher
from firstmile.events.relay import OutboxRelay
from firstmile.kit import telemetry
from firstmile.kit.auth import ApiKeyMiddleware, KeyResolver
from firstmile.kit.db import create_engine
from firstmile.kit.errors import exception_handlers, problem_response
from firstmile.kit.health import HealthController, metrics
from firstmile.ml.feature_reader import ResilientFeatureReader
from firstmile.ml.feature_stores import FeatureStoreSink, open_feature_store
from firstmile.ml.inference import GuardedInference, InProcessClient, StageReader, default_registry_uri, open_inference
from firstmile.ml.online import PlannerFeatures, StoreActivity
from firstmile.ml.planner import PATH_MODEL, AdaptivePlanner
from firstmile.onboarding.api import OnboardingController
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.onboarding.stuck import STUCK_MODEL, StuckScanner
from firstmile.privacy.api import UsersController
from firstmile.security.datakeys import DataKeyService, ManifestProviders
from firstmile.security.keys import KeyConfig, KeyProviderError
from firstmile.security.pii import RedactingFilter
from firstmile.settings import Settings, get_settings
from firstmile.sso.events import KeycloakEventSync
from firstmile.sso.tokens import TokenValidator
from firstmile.tenancy.directory import PostgresTenantDirectory
from firstmile.web.pages import PagesController

PUBLIC_PATHS = ["^/health", "^/metrics", "^/schema"]
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
    """Build the API for one region; its connection pool opens at startup and closes at shutdown.

    ``analytics`` is the analytics store (opened from the settings when omitted).
    With ``relay_database_url`` and no Kafka configured, the process also runs the
    outbox relay and dispatches events to the consumers in-process (embedded mode).
    ``inference`` is the guarded model client and the registry's stage reader (opened
    from the settings when omitted: Ray Serve at ``inference_url``, else in-process).
    """
    # Every log line passes the PII redactor; if it fails, the line says so instead of leaking.
    telemetry.configure_logging(settings.log_level, settings.log_format, filters=[RedactingFilter()])
    provider = telemetry.configure_tracing(settings.service_name, settings.otel_exporter, settings.otel_endpoint)
    signer = resolve_signer(settings)
    state = State(
        {
            "settings": settings,
            "onboarding": OnboardingService(CatalogCache()),
            "audit": AuditService.create(signer),
        }
    )
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []

    async def on_startup(app: Litestar) -> None:
        engine = create_engine(
            database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            statement_timeout_ms=settings.database_statement_timeout_ms,
            application_name=settings.service_name,
        )
        app.state.engine = engine
        # Client-credentials tokens of the tenants' realms, when there is a Keycloak; else API keys only.
        tokens = TokenValidator.from_settings(settings) if settings.keycloak_url is not None else None
        # The global tenant directory, when there is one: tokens of tenants homed elsewhere get 421.
        directory = (
            PostgresTenantDirectory.from_url(settings.directory_url.get_secret_value())
            if settings.directory_url is not None
            else None
        )
        app.state.key_resolver = KeyResolver(
            engine, pepper, settings.region, settings.api_key_cache_ttl_seconds, tokens=tokens, directory=directory
        )
        # Admin UI sessions: Redis when there is one (every process of the region shares them), else in-process.
        sessions: SessionStore = (
            RedisSessionStore.from_url(settings.redis_url.get_secret_value())
            if settings.redis_url is not None
            else MemorySessionStore()
        )
        app.state.admin = AdminAuth(
            engine,
            app.state.key_resolver,
            sessions,
            SessionPolicy(
                lifetime=settings.admin_session_lifetime_seconds,
                idle=settings.admin_idle_timeout_seconds,
                secure_cookies=settings.admin_cookie_secure,
            ),
            public_url=settings.public_url,
            region=settings.region,
            oidc=OidcClient(tokens, settings.sso_admin_client_id, http_timeout=settings.sso_http_timeout_seconds)
            if tokens is not None
            else None,
            pepper=pepper,
        )
        app.state.keyring = DataKeyService.from_config(engine, KeyConfig.from_settings(settings))
        app.state.onboarding.keyring = app.state.keyring
        # Online features: Redis, or in-process (then shared by the in-process consumers below).
        app.state.features = open_feature_store(settings)
        app.state.feature_reader = ResilientFeatureReader(
            app.state.features,
            timeout_s=settings.feature_store_timeout_ms / 1000,
            max_staleness_s=settings.feature_max_staleness_seconds,
        )
        guarded, stages = inference or open_inference(
            default_registry_uri(settings.data_dir, settings.model_registry_uri),
            settings.inference_url,
            timeout_s=settings.inference_timeout_ms / 1000,
            failures=settings.inference_breaker_failures,
            reset_s=settings.inference_breaker_reset_seconds,
        )
        app.state.inference = guarded
        app.state.model_stages = stages
        app.state.onboarding.planner = AdaptivePlanner(guarded, stages, PlannerFeatures(app.state.feature_reader))
        if isinstance(guarded.client, InProcessClient):
            # Load the staged models on a worker thread; until then the planner falls back to the rules.
            guarded.client.warm([PATH_MODEL, STUCK_MODEL])
        if settings.stuck_scan_interval_seconds > 0:
            scanner = StuckScanner(
                engine,
                app.state.onboarding.catalogs,
                guarded,
                StoreActivity(app.state.features),
                after=timedelta(hours=settings.stuck_after_hours),
                min_idle=timedelta(hours=settings.stuck_min_idle_hours),
            )
            background.append(
                asyncio.create_task(scanner.run(stop, settings.stuck_scan_interval_seconds), name="stuck-scan")
            )
        # Logins Keycloak refused (bad SAML responses, wrong passwords) reach the tenants' audit logs.
        event_sync = KeycloakEventSync.from_settings(settings, engine) if settings.sso_event_sync_seconds > 0 else None
        if event_sync is not None:
            background.append(
                asyncio.create_task(event_sync.run(stop, settings.sso_event_sync_seconds), name="sso-event-sync")
            )
        background.append(
            asyncio.create_task(
                Checkpointer(
                    engine,
                    signer,
                    app.state.audit.cache,
                    every_entries=settings.audit_checkpoint_every_entries,
                    every_seconds=settings.audit_checkpoint_every_seconds,
                ).run(stop),
                name="audit-checkpointer",
            )
        )
        store = analytics if analytics is not None else LazyStore(lambda: open_analytics_store(settings))
        app.state.analytics_store = store
        app.state.analytics = AnalyticsService(store, settings.analytics_query_timeout_seconds)
        if relay_database_url is not None and settings.kafka_bootstrap_servers is None:
            consumers: list[Consumer] = [
                AnalyticsSink(store),
                AutoCompletion(engine, app.state.onboarding),
                FeatureHook(FeatureStoreSink(app.state.features)),
            ]
            relay = OutboxRelay(
                relay_database_url,
                InProcessPublisher(consumers, settings.data_dir / "dead-letters"),
                batch_size=settings.relay_batch_size,
                dedupe_window=timedelta(days=settings.event_dedupe_days),
            )
            app.state.relay = relay
            background.append(asyncio.create_task(relay.run(stop), name="outbox-relay"))

    async def on_shutdown(app: Litestar) -> None:
        stop.set()
        if background:
            await asyncio.gather(*background, return_exceptions=True)
        await app.state.engine.dispose()
        await app.state.admin.store.close()
        if app.state.admin.oidc is not None:
            await app.state.admin.oidc.aclose()
        if app.state.key_resolver.tokens is not None:
            await app.state.key_resolver.tokens.aclose()
        if app.state.key_resolver.directory is not None:
            await app.state.key_resolver.directory.aclose()
        await app.state.features.close()
        if inference is None:
            await app.state.inference.close()
        app.state.analytics.close(close_store=False)
        cast(ManifestProviders, app.state.keyring.providers).registry.close()
        if analytics is None and getattr(app.state, "analytics_store", None) is not None:
            await asyncio.to_thread(app.state.analytics_store.close)

    app = Litestar(
        route_handlers=[
            HealthController,
            metrics,
            OnboardingController,
            EventsController,
            AnalyticsController,
            AuditController,
            UsersController,
            LoginController,
            PagesController,
            admin_api_router(),
        ],
        state=state,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        middleware=[DefineMiddleware(ApiKeyMiddleware, exclude=PUBLIC_PATHS + ADMIN_PATHS)],
        # Server spans cost ~0.3 ms of CPU per request; record them only when they go somewhere.
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=provider, exclude=PUBLIC_PATHS))]
        if settings.otel_exporter != "none"
        else [],
        exception_handlers={**exception_handlers(), KeyProviderError: _on_key_provider_error},
        request_max_body_size=settings.max_body_bytes,
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
    # Outside Litestar's exception handling, so 401/421 from authentication and 404/405 from
    # routing also carry the request id and are measured with their real status.
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler)
    return app


def app_factory() -> Litestar:
    """Entry point for ``uvicorn --factory``: settings and secrets from the environment.

    ``firstmile serve`` resolves the embedded database and pepper first and
    passes them down as ``FIRSTMILE_*`` variables, so every worker agrees.
    """
    from firstmile.kit.embedded import resolve_database, resolve_pepper

    settings = get_settings()
    urls = resolve_database(settings)
    relay_url = settings.relay_database_url.get_secret_value() if settings.relay_database_url else urls.admin
    return create_app(settings, urls.app, resolve_pepper(settings), relay_database_url=relay_url)
