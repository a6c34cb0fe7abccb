"""The API process's services, built once from the settings, started and stopped with the app.

This is the one place that decides which adapter serves each port (through
:mod:`firstmile.wiring.adapters`) and which service gets which collaborator. Handlers
receive the services by dependency injection (:mod:`firstmile.wiring.providers`); nothing
reads them from ``app.state``.

Everything that holds a connection pool, a client or a thread is built in :meth:`Container.start`
(the app's startup, on the loop that serves it) and released in :meth:`Container.stop`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.models_api import ModelAdmin
from firstmile.admin.oidc import OidcClient
from firstmile.admin.paths import PathEditor
from firstmile.admin.service import AdminAuth, SessionPolicy
from firstmile.analytics.alerting import DropoffWatch
from firstmile.analytics.lazy import LazyStore
from firstmile.analytics.review_watch import ReviewQueueWatch
from firstmile.analytics.service import AnalyticsService
from firstmile.analytics.sink import AnalyticsSink
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.service import AuditService, Checkpointer, Sequencer
from firstmile.audit.signing import AuditSigner
from firstmile.auth.middleware import Presented
from firstmile.auth.resolver import KeyResolver
from firstmile.destinations.consumer import DestinationFeed
from firstmile.destinations.worker import DestinationDelivery
from firstmile.embed.service import EmbedService
from firstmile.events.bus import Consumer
from firstmile.events.dispatch import InProcessPublisher
from firstmile.events.relay import OutboxRelay, asyncpg_dsn
from firstmile.events.service import IngestionService
from firstmile.experiments.orchestrator import ExperimentOrchestrator
from firstmile.experiments.review import ExperimentReviewer
from firstmile.guardrail.middleware import Admit
from firstmile.guardrail.policy import Verdict
from firstmile.guardrail.service import Guardrail
from firstmile.kit.auth import Principal
from firstmile.kit.db import create_engine
from firstmile.kit.health import Readiness
from firstmile.kit.supervisor import Supervisor
from firstmile.ml.consumer import FeatureHook
from firstmile.ml.feature_reader import ResilientFeatureReader
from firstmile.ml.feature_stores import FeatureStoreSink
from firstmile.ml.features import FeatureStore
from firstmile.ml.inference import GuardedInference, InProcessClient, StageReader
from firstmile.ml.nudge_prior import NUDGE_MODEL, ModelResponsePrior
from firstmile.ml.online import PlannerFeatures, StoreActivity
from firstmile.ml.planner import PATH_MODEL, AdaptivePlanner
from firstmile.ml.stuck import ModelStuckDetector
from firstmile.ml.tenant_training import TenantTrainer
from firstmile.nudges.consumer import NudgeTriggers
from firstmile.nudges.inapp import InAppHub, InAppInbox
from firstmile.nudges.links import LinkSigner
from firstmile.nudges.personalise import Personaliser
from firstmile.nudges.push_webpush import WebPushChannel
from firstmile.nudges.replay import RedisReplayGuard
from firstmile.nudges.service import DeliveryWorker, NudgeExecutor, NudgeLinks, NudgeWebhooks, PushSubscriptions
from firstmile.nudges.triggers import TriggerScanner
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.consumer import AutoCompletion
from firstmile.onboarding.review import ReviewSampling
from firstmile.onboarding.service import OnboardingService
from firstmile.onboarding.stuck import STUCK_MODEL, StuckScanner
from firstmile.privacy.service import PrivacyService
from firstmile.security.datakeys import DataKeyService, ManifestProviders
from firstmile.settings import Settings
from firstmile.sso.events import KeycloakEventSync
from firstmile.wiring import adapters
from firstmile.wiring.embedded import resolve_database

log = logging.getLogger("firstmile.wiring")

WARM_UP_SECONDS = 60.0
"""How long startup waits for the staged models to load (the planner uses its rules meanwhile)."""


@dataclass(frozen=True, slots=True)
class Overrides:
    """Adapters a caller brings instead of the configured ones (tests, benchmarks, ``firstmile dev``)."""

    analytics: AnalyticsStore | None = None
    inference: tuple[GuardedInference, StageReader] | None = None
    relay_database_url: str | None = None
    schedulers: bool | None = None
    """Run the periodic tasks here (None: as FIRSTMILE_IN_PROCESS_SCHEDULERS says; `firstmile scheduler`: True)."""
    sequencer: bool | None = None
    """Run the audit sequencer and checkpointer here (None: as FIRSTMILE_IN_PROCESS_SEQUENCER says;
    `firstmile sequencer`: True)."""
    serves_api: bool = True
    """This process answers API requests (False: `firstmile scheduler`, which streams nothing)."""


class Container:
    """Every service of one API process (see the module docstring)."""

    def __init__(
        self, settings: Settings, database_url: str, pepper: bytes, overrides: Overrides = Overrides()
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pepper = pepper
        self.overrides = overrides
        # what needs no running loop and no connection is made now, so a bad key file fails create_app
        self.signer: AuditSigner = adapters.audit_signer(settings)
        self.audit = AuditService.create(self.signer)
        self.catalogs = CatalogCache()
        self.path_editor = PathEditor()
        self.link_signer = LinkSigner(pepper)
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build the services on the serving loop, warm the models, start the background tasks."""
        settings = self.settings
        self.supervisor = Supervisor()
        self.engine: AsyncEngine = create_engine(
            self.database_url,
            pool_size=settings.database.pool_size,
            max_overflow=settings.database.max_overflow,
            statement_timeout_ms=settings.database.statement_timeout_ms,
            application_name=settings.telemetry.service_name,
        )
        self.readiness = Readiness(self.engine, settings.region, self.supervisor)
        self.nudge_links = NudgeLinks(self.engine, self.link_signer)
        token, vonage = settings.nudges.twilio_auth_token, settings.nudges.vonage_signature_secret
        self.nudge_webhooks = NudgeWebhooks(
            self.engine,
            settings.nudges.sendgrid_webhook_key,
            adapters.webhook_replay_guard(settings),
            twilio_auth_token=token.get_secret_value() if token is not None else None,
            vonage_signature_secret=vonage.get_secret_value() if vonage is not None else None,
            vonage_signature_method=settings.nudges.vonage_signature_method,
            public_url=settings.server.public_url,
        )
        # Client-credentials tokens of the tenants' realms, when there is a Keycloak; else API keys only.
        tokens = adapters.token_validator(settings)
        # The global tenant directory, when there is one: tokens of tenants homed elsewhere get 421.
        self.key_resolver = KeyResolver(
            self.engine,
            self.pepper,
            settings.region,
            settings.tenancy.api_key_cache_ttl_seconds,
            tokens=tokens,
            directory=adapters.global_directory(settings),
            identity_max_seconds=settings.tenancy.embed_identity_max_seconds,
        )
        # Admin UI sessions: Redis when there is one (every process of the region shares them), else in-process.
        self.admin_auth = AdminAuth(
            self.engine,
            self.key_resolver,
            adapters.session_store(settings),
            SessionPolicy(
                lifetime=settings.admin.session_lifetime_seconds,
                idle=settings.admin.idle_timeout_seconds,
                secure_cookies=settings.admin.cookie_secure,
            ),
            public_url=settings.server.public_url,
            region=settings.region,
            oidc=OidcClient(tokens, settings.sso.admin_client_id, http_timeout=settings.sso.http_timeout_seconds)
            if tokens is not None
            else None,
            pepper=self.pepper,
        )
        # Rate limits and the abuse detector: Redis when there is one (every process shares them), else in-process.
        limiter, fallback = adapters.rate_limiter(settings)
        self.guardrail = Guardrail(
            self.engine,
            limiter,
            adapters.rate_limits(settings),
            detector=adapters.abuse_detector(settings),
            fallback=fallback,
            fallback_seconds=settings.guardrail.fallback_seconds,
            per_embed_user=adapters.embed_user_quota(settings),
        )
        self.keyring = DataKeyService.from_config(self.engine, adapters.key_config(settings))
        # Online features: Redis, or in-process (then shared by the in-process consumers below).
        self.features: FeatureStore = adapters.open_feature_store(settings)
        self.feature_reader = ResilientFeatureReader(
            self.features,
            timeout_s=settings.features.timeout_ms / 1000,
            max_staleness_s=settings.features.max_staleness_seconds,
        )
        self.inference, self.stages = self.overrides.inference or adapters.open_inference(settings)
        self.model_admin = ModelAdmin(self.stages)  # the admin models page: the planner's registry
        self.experiments = ExperimentOrchestrator(timeout_s=settings.experiments.allocation_timeout_ms / 1000)
        self.onboarding = OnboardingService(
            self.catalogs,
            self.keyring,
            AdaptivePlanner(self.inference, self.stages, PlannerFeatures(self.feature_reader)),
            self.experiments,
            ReviewSampling(settings.reviews.confidence_threshold, settings.reviews.sample_rate),
        )
        self.analytics_store: AnalyticsStore = self.overrides.analytics or LazyStore(
            lambda: adapters.open_analytics_store(settings)
        )
        self.analytics = AnalyticsService(self.analytics_store, settings.analytics.query_timeout_seconds)
        # With Kafka, ingestion produces its events itself (the outbox when Kafka fails); else the outbox.
        self.ingestion = IngestionService(
            self.engine,
            self.keyring,
            settings.region,
            direct=adapters.direct_publisher(settings),
            retry_direct_after=settings.events.ingest_kafka_retry_seconds,
            max_batch_bytes=settings.events.ingest_max_batch_bytes,
        )
        self.privacy = PrivacyService(self.keyring, self.analytics)
        self._started = True
        await self._warm_up()
        self._background()
        self.supervisor.start()

    async def _warm_up(self) -> None:
        """Read the model stages and load the staged models off the event loop, before the first request."""
        models = [PATH_MODEL, STUCK_MODEL, NUDGE_MODEL]  # the nudge model: the prior of the nudge bandit
        await self.stages.load(models)
        if isinstance(self.inference.client, InProcessClient):
            ready = await self.inference.client.warm_up(models, wait_s=WARM_UP_SECONDS)
            if not ready:
                log.warning("the staged models did not all load at startup; the planner uses its rules until they do")

    def _background(self) -> None:
        settings = self.settings
        supervisor = self.supervisor
        self.event_sync: KeycloakEventSync | None = None
        self.destination_delivery: DestinationDelivery | None = None
        self.personaliser: Personaliser | None = None  # the delivery worker's, where this process runs it
        schedulers = self.overrides.schedulers
        # Nudges: decided on onboarding.stuck by the consumers below, sent by a periodic task, when a channel is set.
        self.nudge_channels = adapters.nudge_channels(settings)
        push = self.nudge_channels.get("push")
        self.push_subscriptions = PushSubscriptions(self.keyring, push if isinstance(push, WebPushChannel) else None)
        self.nudges: NudgeExecutor | None = (
            NudgeExecutor(
                self.onboarding,
                list(self.nudge_channels),
                adapters.nudge_policy(settings),
                default_time_zone=settings.nudges.default_time_zone,
                policy_timeout=settings.nudges.policy_timeout_seconds,
                setup_ttl=30.0,
                links=self.link_signer,
                public_url=settings.server.public_url,
                experiments=self.experiments,
            )
            if self.nudge_channels
            else None
        )
        # Live streams: one LISTEN connection per process, opened by the first stream (in-app messages when the
        # channel is on; the relay's progress announcements for the embed SDK's checklist always).
        self.live_hub = InAppHub(asyncpg_dsn(self.database_url))
        self.inapp_hub = self.live_hub if "in_app" in self.nudge_channels else None
        self.inbox = InAppInbox(
            self.inapp_hub,
            heartbeat_s=settings.nudges.stream_heartbeat_seconds,
            stream_s=settings.nudges.stream_seconds,
        )
        self.embed = EmbedService(
            self.onboarding,
            InAppInbox(
                self.live_hub,
                heartbeat_s=settings.nudges.stream_heartbeat_seconds,
                stream_s=settings.nudges.stream_seconds,
            ),
        )
        if self.overrides.serves_api or self.inapp_hub is not None:
            supervisor.forever("live-listener", self.live_hub.run, probe=self.live_hub.health)
        if schedulers if schedulers is not None else settings.server.in_process_schedulers:
            self._periodic()
        sequencer = self.overrides.sequencer
        self.sequencer: Sequencer | None = None
        if sequencer if sequencer is not None else settings.server.in_process_sequencer:
            self._audit_log()
        self.relay: OutboxRelay | None = None
        if self.overrides.relay_database_url is not None and settings.events.kafka_bootstrap_servers is None:
            # embedded mode: this process relays the outbox to the consumers itself
            self.relay = OutboxRelay(
                self.overrides.relay_database_url,
                InProcessPublisher(self.consumers(), settings.data_dir / "dead-letters"),
                batch_size=settings.events.relay_batch_size,
                dedupe_window=timedelta(days=settings.events.dedupe_days),
            )
            supervisor.forever("outbox-relay", self.relay.run, probe=self.relay.health)

    def _periodic(self) -> None:
        """The periodic tasks: in ``serve``/``dev`` (one process), or in ``firstmile scheduler`` (Kubernetes)."""
        settings = self.settings
        supervisor = self.supervisor
        if settings.stuck.scan_interval_seconds > 0:
            scanner = StuckScanner(
                self.engine,
                self.catalogs,
                ModelStuckDetector(self.inference, timeout_s=max(2.0, settings.models.inference_timeout_ms / 1000))
                if settings.stuck.detector == "model"
                else None,
                StoreActivity(self.features),
                after=timedelta(hours=settings.stuck.after_hours),
                min_idle=timedelta(hours=settings.stuck.min_idle_hours),
            )
            supervisor.every("stuck-scan", settings.stuck.scan_interval_seconds, scanner.run_once)
        # Logins Keycloak refused (bad SAML responses, wrong passwords) reach the tenants' audit logs.
        self.event_sync = (
            adapters.keycloak_event_sync(settings, self.engine) if settings.sso.event_sync_seconds > 0 else None
        )
        if self.event_sync is not None:
            supervisor.every("sso-event-sync", settings.sso.event_sync_seconds, self.event_sync.run_once)
        nudge = settings.nudges
        key = nudge.llm_api_key.get_secret_value() if nudge.llm_api_key is not None else None
        self.personaliser = Personaliser(nudge.llm_base_url, nudge.llm_model, nudge.llm_timeout_seconds, key)
        if self.nudge_channels and settings.nudges.delivery_interval_seconds > 0:
            delivery = DeliveryWorker(
                self.engine,
                self.nudge_channels,
                self.keyring,
                max_attempts=settings.nudges.max_attempts,
                links=self.link_signer,
                public_url=settings.server.public_url,
                outcome_window=timedelta(hours=settings.nudges.outcome_window_hours),
                personaliser=self.personaliser,
            )
            supervisor.every("nudge-delivery", settings.nudges.delivery_interval_seconds, delivery.run_once)
        # Destinations: the queued lifecycle events sent to each tenant's tools, one task per destination.
        if settings.destinations.poll_seconds > 0:
            self.destination_delivery = adapters.destination_delivery(settings, self.engine, self.keyring)
            worker = self.destination_delivery
            supervisor.forever("destination-delivery", worker.run, probe=worker.health)
        if settings.experiments.review_seconds > 0:
            reviewer = ExperimentReviewer(self.engine, self.analytics)
            supervisor.every("experiment-review", settings.experiments.review_seconds, reviewer.run_once)
        # Drop-off alerts: each step's drop-off against its baseline; alerts stored, then mailed and posted.
        if settings.analytics.dropoff_alert_seconds > 0:
            watch = DropoffWatch(
                self.engine,
                self.analytics,
                self.onboarding,
                adapters.dropoff_rule(settings),
                mailer=adapters.alert_mailer(self.nudge_channels),
                public_url=settings.server.public_url,
                webhook_timeout_s=settings.analytics.dropoff_alert_webhook_timeout_seconds,
            )
            supervisor.every(
                "dropoff-alerts",
                settings.analytics.dropoff_alert_seconds,
                lambda: watch.run_once(stop=supervisor.stopping),
            )
        # The review queue: its length and oldest item's age to Prometheus; reviewers notified past the threshold.
        if settings.reviews.queue_check_seconds > 0:
            queue_watch = ReviewQueueWatch(
                self.engine,
                threshold=settings.reviews.queue_alert_threshold,
                mailer=adapters.alert_mailer(self.nudge_channels),
                public_url=settings.server.public_url,
                webhook_timeout_s=settings.analytics.dropoff_alert_webhook_timeout_seconds,
            )
            supervisor.every("review-queue", settings.reviews.queue_check_seconds, queue_watch.run_once)
        if self.nudges is not None and settings.nudges.trigger_scan_seconds > 0:
            triggers = TriggerScanner(
                self.engine, self.nudges, prior=ModelResponsePrior(self.inference, self.feature_reader)
            )
            supervisor.every("nudge-triggers", settings.nudges.trigger_scan_seconds, triggers.run_once)
        # Per-tenant path models: the opted-in tenants trained when due (schedule or drift), never promoted.
        if settings.models.tenant_training_seconds > 0:
            trainer = self._tenant_trainer()
            if trainer is not None:
                supervisor.every("tenant-model-training", settings.models.tenant_training_seconds, trainer.run_once)

    def _tenant_trainer(self) -> TenantTrainer | None:
        """The ``tenant-model-training`` task, when the schema owner's URL and the inference package are at hand."""
        database = self.settings.database
        if database.admin_url is not None:
            admin_url = database.admin_url.get_secret_value()
        elif database.url is None:  # embedded: the operator commands' own URL
            admin_url = resolve_database(self.settings).admin
        else:
            log.warning(
                "tenant-model-training not started: it reads as the schema owner (FIRSTMILE_DATABASE_ADMIN_URL)"
            )
            return None
        try:
            from firstmile_inference.registry import Registry
        except ImportError:
            log.warning("tenant-model-training not started: firstmile_inference is not installed")
            return None
        from firstmile.ml.tenant_models import RayTraining

        models = self.settings.models  # on Ray where configured (FIRSTMILE_TRAINING_RAY_ADDRESS), else in process
        ray = None if models.training_ray_address is None else RayTraining(
            models.training_ray_address, models.training_ray_timeout_seconds
        )  # fmt: skip
        return TenantTrainer(admin_url, Registry(adapters.registry_uri(self.settings)), ray=ray)

    def _audit_log(self) -> None:
        """The audit sequencer and checkpointer: in ``serve``/``dev``, or in ``firstmile sequencer`` (Kubernetes)."""
        settings = self.settings
        supervisor = self.supervisor
        self.sequencer = Sequencer(
            self.engine, batch_size=settings.audit.sequence_batch, poll_seconds=settings.audit.sequence_poll_seconds
        )
        supervisor.forever("audit-sequencer", self.sequencer.run, probe=self.sequencer.health)
        checkpointer = Checkpointer(
            self.engine,
            self.signer,
            self.audit.cache,
            every_entries=settings.audit.checkpoint_every_entries,
            every_seconds=settings.audit.checkpoint_every_seconds,
        )
        supervisor.every("audit-checkpointer", checkpointer.poll_seconds, checkpointer.run_once)

    def consumers(self) -> list[Consumer]:
        """The event consumers of the slices: analytics sink, progress auto-completion, online features, the
        destinations' queue, and the nudge triggers when a nudge channel is configured."""
        consumers: list[Consumer] = [
            AnalyticsSink(self.analytics_store),
            AutoCompletion(self.engine, self.onboarding),
            FeatureHook(FeatureStoreSink(self.features)),
            DestinationFeed(self.engine, self.keyring),
        ]
        if self.nudges is not None:
            prior = ModelResponsePrior(self.inference, self.feature_reader)
            window = timedelta(hours=self.settings.nudges.outcome_window_hours)
            consumers.append(NudgeTriggers(self.engine, self.nudges, window, prior=prior))
        return consumers

    async def stop(self) -> None:
        """Stop the background tasks, then release every pool, client and thread."""
        if not self._started:
            return
        self._started = False
        await self.supervisor.stop()
        await self.engine.dispose()
        await self.admin_auth.store.close()
        await self.guardrail.limiter.close()
        if isinstance(self.nudge_webhooks.guard, RedisReplayGuard):
            await self.nudge_webhooks.guard.close()
        if self.admin_auth.oidc is not None:
            await self.admin_auth.oidc.aclose()
        if self.key_resolver.tokens is not None:
            await self.key_resolver.tokens.aclose()
        if self.key_resolver.directory is not None:
            await self.key_resolver.directory.aclose()
        await self.features.close()
        if self.personaliser is not None:
            await self.personaliser.aclose()
        if self.ingestion.direct is not None:
            await self.ingestion.direct.close()
        if self.overrides.inference is None:
            await self.inference.close()
        self.analytics.close(close_store=False)
        providers = self.keyring.providers
        if isinstance(providers, ManifestProviders):
            providers.registry.close()
        if self.overrides.analytics is None:
            await asyncio.to_thread(self.analytics_store.close)

    # ------------------------------------------------------------------ what runs before injection

    # Plain functions, not bound methods: Litestar deep-copies route handlers, routers and their
    # middleware arguments, and a function is copied as itself while a bound method copies the container.

    def authenticator(self) -> Callable[[Presented], Awaitable[Principal]]:
        """The principal of a request's credentials, for the API key middleware."""

        async def authenticate(p: Presented) -> Principal:
            return await self.key_resolver.principal(
                p.authorization, origin=p.origin, identity=p.identity, browser=p.browser
            )

        return authenticate

    def rate_limit_check(self) -> Admit:
        """The guardrail's check of one authenticated request, for the rate-limit middleware."""

        async def admit(principal: Principal, activity: str) -> Verdict:
            return await self.guardrail.admit(principal, activity)

        return admit

    def admin_source(self) -> Callable[[], AdminAuth]:
        """The admin UI's authentication, for its middleware and guard."""

        def admin_auth() -> AdminAuth:
            return self.admin_auth

        return admin_auth


__all__ = ["Container", "Overrides"]
