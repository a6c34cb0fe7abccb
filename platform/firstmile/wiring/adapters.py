"""Which adapter serves each port, chosen from the settings: the only place that decides it.

Slices define ports (``AnalyticsStore``, ``FeatureStore``, ``InferenceClient``,
``SessionStore``, ``KeyProvider``, ``TenantDirectory``, ``RateLimiter``, ``DirectPublisher``) and
their adapters; this module reads :class:`~firstmile.settings.Settings` and builds the one each deployment uses. The
embedded defaults (``make run``) are what an unset setting gives.
"""

from __future__ import annotations

import logging
from datetime import time, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from firstmile.analytics.alerts import AlertRule
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.signing import AuditSigner, resolve_signer
from firstmile.destinations.policy import RetryPolicy
from firstmile.destinations.registry import OfficialAdapters
from firstmile.destinations.worker import DestinationDelivery
from firstmile.events.bus import DirectPublisher, topic_for
from firstmile.guardrail.limiter import InProcessLimiter, RateLimiter
from firstmile.guardrail.policy import DetectorPolicy, Limits, Quota
from firstmile.ml.feature_stores import InProcessFeatureStore, RedisFeatureStore
from firstmile.ml.features import FeatureStore
from firstmile.ml.inference import GuardedInference, InferenceClient, InProcessClient, RayServeClient, StageReader
from firstmile.nudges.channels import Channel, FailoverChannel, OutboundMessage
from firstmile.nudges.email_sendgrid import SendGridChannel
from firstmile.nudges.email_smtp import SmtpChannel
from firstmile.nudges.inapp import InAppChannel
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.push_webpush import WebPushChannel
from firstmile.nudges.replay import LocalReplayGuard, RedisReplayGuard, SharedReplayGuard
from firstmile.nudges.sms_twilio import TwilioChannel
from firstmile.nudges.sms_vonage import VONAGE_CALLBACK_MAX, VonageChannel
from firstmile.security.datakeys import DataKeyService
from firstmile.security.keys import KeyConfig
from firstmile.settings import Settings
from firstmile.sso.events import KeycloakEventSync
from firstmile.sso.provisioning import KeycloakProvisioner, ProvisioningError
from firstmile.sso.tokens import RealmNaming, TokenValidator
from firstmile.tenancy.directory import (
    CachedTenantDirectory,
    PostgresTenantDirectory,
    RegionalTenantDirectory,
    TenantDirectory,
)

log = logging.getLogger("firstmile.wiring")


# ---------------------------------------------------------------- analytics


def open_analytics_store(settings: Settings) -> AnalyticsStore:
    """The configured analytics store: chdb under the data dir, or a ClickHouse server."""
    section = settings.analytics
    if section.backend == "clickhouse":
        if section.clickhouse_url is None:
            raise RuntimeError("FIRSTMILE_CLICKHOUSE_URL must be set when FIRSTMILE_ANALYTICS_BACKEND=clickhouse")
        from firstmile.analytics.clickhouse_store import ClickHouseStore

        store: AnalyticsStore = ClickHouseStore.connect(
            section.clickhouse_url.get_secret_value(), policy_role=section.clickhouse_policy_role or None
        )
    else:
        from firstmile.analytics.chdb_store import ChdbStore

        store = ChdbStore(section.path or settings.data_dir / "analytics")
    store.ensure_schema()
    return store


def dropoff_rule(settings: Settings) -> AlertRule:
    """When a step's drop-off shift is an alert (``FIRSTMILE_DROPOFF_ALERT_*``)."""
    a = settings.analytics
    return AlertRule(
        recent=timedelta(days=a.dropoff_alert_recent_days),
        baseline=timedelta(days=a.dropoff_alert_baseline_days),
        conversion_window=timedelta(hours=a.dropoff_alert_conversion_hours),
        min_users=a.dropoff_alert_min_users,
        min_shift=a.dropoff_alert_min_shift,
        significance=a.dropoff_alert_significance,
    )


class ChannelMailer:
    """The analytics slice's ``AlertMailer`` over the platform's e-mail channel (the nudges' SMTP relay, SendGrid,
    or the one failing over to the other): the drop-off alerts go out the way nudge e-mails do."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def send_alert(self, to: str, subject: str, body: str, idempotency_key: str) -> None:
        message = OutboundMessage(channel="email", to=to, body=body, idempotency_key=idempotency_key, subject=subject)
        await self.channel.send(message)


def alert_mailer(channels: dict[str, Channel]) -> ChannelMailer | None:
    """The e-mail channel for alerts, when the settings configure one (``FIRSTMILE_NUDGE_SMTP_URL``, SendGrid)."""
    email = channels.get("email")
    return ChannelMailer(email) if email is not None else None


# ---------------------------------------------------------------- destinations


def destination_delivery(settings: Settings, engine: AsyncEngine, keyring: DataKeyService) -> DestinationDelivery:
    """The destinations' delivery worker: the vendors' official clients and the webhook sender
    (``FIRSTMILE_DESTINATION_*``)."""
    d = settings.destinations
    return DestinationDelivery(
        engine,
        keyring,
        OfficialAdapters(timeout_s=d.timeout_seconds),
        policy=RetryPolicy(d.backoff_base_seconds, max(d.backoff_cap_seconds, d.backoff_base_seconds), d.max_attempts),
        lease=timedelta(seconds=d.lease_seconds),
        poll_s=d.poll_seconds or 2.0,
        disable_after=timedelta(hours=d.disable_after_hours),
        retention=timedelta(days=d.retention_days),
        concurrency=d.concurrency,
        call_timeout_s=d.lease_seconds / 2,  # a batch is sent and recorded well within its lease
    )


# ---------------------------------------------------------------- events


def direct_publisher(settings: Settings) -> DirectPublisher | None:
    """Ingestion's Kafka producer with ``FIRSTMILE_INGEST_DELIVERY=kafka`` (the default) and Kafka set; else None."""
    events = settings.events
    if events.kafka_bootstrap_servers is None or events.ingest_delivery != "kafka":
        return None
    from firstmile.events.kafka import KafkaDirectPublisher

    return KafkaDirectPublisher(
        {"bootstrap.servers": events.kafka_bootstrap_servers, **events.kafka_client_config()},
        topic_for(events.kafka_topic_prefix, settings.region),
        timeout_s=events.ingest_kafka_timeout_ms / 1000,
    )


# ---------------------------------------------------------------- online features and models


def open_feature_store(settings: Settings, **options: Any) -> FeatureStore:
    """Redis when ``FIRSTMILE_REDIS_URL`` is set, else the in-process store (``options`` go to it)."""
    ttl = timedelta(days=settings.features.ttl_days)
    if settings.redis.url is not None:
        return RedisFeatureStore.from_url(settings.redis.url.get_secret_value(), region=settings.region, ttl=ttl)
    if settings.events.kafka_bootstrap_servers is not None or settings.server.workers > 1:
        log.warning(
            "online features are kept in each process, but events reach more than one process (Kafka "
            "consumers, or one in-process relay per API worker): each sees only its share; set FIRSTMILE_REDIS_URL"
        )
    return InProcessFeatureStore(ttl=ttl, **options)


def registry_uri(settings: Settings) -> str:
    """``FIRSTMILE_MODEL_REGISTRY_URI``, or ``<data_dir>/models``."""
    return settings.models.registry_uri or str((settings.data_dir / "models").resolve())


def open_inference(settings: Settings) -> tuple[GuardedInference, StageReader]:
    """Ray Serve at ``FIRSTMILE_INFERENCE_URL``, else the models in-process; behind their guard."""
    section = settings.models
    stages = StageReader(registry_uri(settings))
    client: InferenceClient = (
        RayServeClient(section.inference_url) if section.inference_url else InProcessClient(stages)
    )
    guarded = GuardedInference(
        client,
        timeout_s=section.inference_timeout_ms / 1000,
        failures=section.breaker_failures,
        reset_s=section.breaker_reset_seconds,
    )
    return guarded, stages


# ---------------------------------------------------------------- keys and audit


def key_config(settings: Settings) -> KeyConfig:
    """The key providers' settings (``settings.keys``)."""
    section = settings.keys
    return KeyConfig(
        data_dir=settings.data_dir,
        provider=section.provider,
        kek_file=Path(section.kek_file) if section.kek_file is not None else None,
        # one host generating its own KEK is fine embedded; with an external database
        # every API process must share one KEK, so it has to be provisioned.
        create_kek=settings.embedded,
        cache_ttl_seconds=float(section.cache_ttl_seconds),
        cache_max_uses=int(section.cache_max_uses),
        vault_addr=section.vault_addr,
        vault_namespace=section.vault_namespace,
        vault_mount=section.vault_mount,
        vault_role_id=section.vault_role_id,
        vault_secret_id_file=Path(section.vault_secret_id_file) if section.vault_secret_id_file else None,
        vault_timeout_seconds=float(section.vault_timeout_seconds),
    )


def audit_signer(settings: Settings, key_file: Path | None = None) -> AuditSigner:
    """``key_file``, else ``FIRSTMILE_AUDIT_SIGNING_KEY_FILE``, else (embedded only) the generated key."""
    return resolve_signer(
        key_file or settings.audit.signing_key_file,
        embedded_data_dir=settings.data_dir if settings.embedded else None,
    )


# ---------------------------------------------------------------- Keycloak, sessions, the directory


def token_validator(settings: Settings) -> TokenValidator | None:
    """Validation of the tenant realms' access tokens; None without ``FIRSTMILE_KEYCLOAK_URL``."""
    sso = settings.sso
    if sso.keycloak_url is None:
        return None
    return TokenValidator(
        RealmNaming(sso.keycloak_url, sso.realm_prefix),
        audience=sso.audience,
        tenant_claim=sso.tenant_claim,
        leeway=sso.leeway_seconds,
        jwks_max_age=sso.jwks_max_age_seconds,
        jwks_min_refetch=sso.jwks_min_refetch_seconds,
        http_timeout=sso.http_timeout_seconds,
    )


def keycloak_provisioner(settings: Settings) -> KeycloakProvisioner | None:
    """A provisioner from ``FIRSTMILE_KEYCLOAK_URL`` and the admin credentials; None if any is unset."""
    from keycloak import KeycloakAdmin, KeycloakOpenIDConnection

    sso = settings.sso
    if not (sso.keycloak_url and sso.admin_user and sso.admin_password_file):
        return None
    try:
        password = sso.admin_password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ProvisioningError(f"keycloak_admin_password_file: {exc}") from exc
    connection = KeycloakOpenIDConnection(
        server_url=sso.keycloak_url,
        username=sso.admin_user,
        password=password,
        realm_name=sso.admin_realm,
        user_realm_name=sso.admin_realm,
        verify=True,
    )
    uris = [u.strip() for u in sso.admin_redirect_uris.split(",") if u.strip()]
    return KeycloakProvisioner(
        KeycloakAdmin(connection=connection),
        realm_prefix=sso.realm_prefix,
        audience=sso.audience,
        tenant_claim=sso.tenant_claim,
        client_id=sso.admin_client_id,
        redirect_uris=uris,
        backchannel_logout_url=settings.server.public_url.rstrip("/") + "/admin/backchannel-logout",
    )


def keycloak_event_sync(settings: Settings, engine: AsyncEngine) -> KeycloakEventSync | None:
    """The failed-login sync with the provisioning admin credentials; None when they are unset."""
    provisioner = keycloak_provisioner(settings)
    if provisioner is None:
        return None
    return KeycloakEventSync(provisioner.admin, engine, realm_prefix=provisioner.realm_prefix)


def session_store(settings: Settings) -> SessionStore:
    """Admin sessions in Redis (shared by every process of the region), else in this process."""
    if settings.redis.url is not None:
        return RedisSessionStore.from_url(settings.redis.url.get_secret_value())
    return MemorySessionStore()


def tenant_directory(settings: Settings, regional_engine: AsyncEngine) -> TenantDirectory:
    """The global directory database when ``FIRSTMILE_DIRECTORY_URL`` is set, else this region's tenants."""
    if settings.tenancy.directory_url is None:
        return RegionalTenantDirectory(regional_engine)
    return PostgresTenantDirectory.from_url(settings.tenancy.directory_url.get_secret_value())


def global_directory(settings: Settings) -> TenantDirectory | None:
    """The global directory when one is configured (the API's 421 for tenants homed elsewhere).

    Its answers, misses included, are cached per process as long as resolved API keys are
    (FIRSTMILE_API_KEY_CACHE_TTL_SECONDS): an unknown slug costs one cross-region query per TTL.
    """
    if settings.tenancy.directory_url is None:
        return None
    directory = PostgresTenantDirectory.from_url(settings.tenancy.directory_url.get_secret_value())
    return CachedTenantDirectory(directory, ttl=settings.tenancy.api_key_cache_ttl_seconds)


# ---------------------------------------------------------------- rate limits and the abuse detector


def rate_limits(settings: Settings) -> Limits:
    """The platform's default limits (a tenant's manifest may set its own)."""
    section = settings.guardrail
    return Limits(
        Quota("key", section.key_requests, section.key_window_seconds),
        Quota("tenant", section.tenant_requests, section.tenant_window_seconds),
    )


def embed_user_quota(settings: Settings) -> Quota:
    """The quota of each browser user of a publishable key (the embed SDK)."""
    section = settings.guardrail
    return Quota("user", section.embed_user_requests, section.embed_user_window_seconds)


def abuse_detector(settings: Settings) -> DetectorPolicy | None:
    """When the abuse detector flags a credential; None when it is switched off."""
    section = settings.guardrail
    if not section.abuse_detection_enabled:
        return None
    return DetectorPolicy(
        factor=section.abuse_factor,
        min_count=section.abuse_min_requests_per_minute,
        half_life_minutes=section.abuse_baseline_half_life_minutes,
        warmup_minutes=section.abuse_warmup_minutes,
        cooldown_ms=section.abuse_flag_cooldown_seconds * 1000,
    )


def rate_limiter(settings: Settings) -> tuple[RateLimiter, RateLimiter | None]:
    """The limiter and its fallback: Redis (shared by the region's processes) with an in-process limiter for
    when Redis fails, or, without ``FIRSTMILE_REDIS_URL``, the in-process limiter alone (embedded mode)."""
    detector = abuse_detector(settings)
    if settings.redis.url is None:
        return InProcessLimiter(detector), None
    from firstmile.guardrail.redis_limiter import RedisLimiter

    limiter = RedisLimiter.from_url(
        settings.redis.url.get_secret_value(),
        settings.region,
        detector,
        timeout_s=settings.guardrail.redis_timeout_ms / 1000,
    )
    return limiter, InProcessLimiter(None)


def nudge_channels(settings: Settings) -> dict[str, Channel]:
    """The nudge channels the settings configure, by channel name: e-mail over SMTP, SendGrid, or SMTP failing
    over to SendGrid; SMS through Twilio, Vonage, or Twilio failing over to Vonage; web push with VAPID; and
    in-app (stored; on with another channel unless FIRSTMILE_NUDGE_IN_APP says otherwise)."""
    channels: dict[str, Channel] = {}
    if settings.nudges.smtp_url is not None:
        url = urlsplit(settings.nudges.smtp_url.get_secret_value())
        if url.scheme != "smtp" or not url.hostname:
            raise ValueError("FIRSTMILE_NUDGE_SMTP_URL must look like smtp://[user:password@]host:port")
        channels["email"] = SmtpChannel(
            url.hostname,
            url.port or 25,
            settings.nudges.email_from,
            username=unquote(url.username) if url.username else None,
            password=unquote(url.password) if url.password else None,
        )
    if settings.nudges.sendgrid_api_key is not None:  # the backup of the relay (failover on timeouts and 5xx)
        sendgrid = SendGridChannel(
            settings.nudges.sendgrid_api_key.get_secret_value(),
            parseaddr(settings.nudges.email_from)[1] or settings.nudges.email_from,
            sender_name=parseaddr(settings.nudges.email_from)[0] or None,
            base_url=settings.nudges.sendgrid_base_url,
        )
        smtp = channels.get("email")
        channels["email"] = FailoverChannel(smtp, sendgrid) if smtp is not None else sendgrid
    n = settings.nudges
    if n.twilio_account_sid is not None and n.twilio_auth_token is not None and n.sms_from is not None:
        channels["sms"] = TwilioChannel(
            n.twilio_account_sid,
            n.twilio_auth_token.get_secret_value(),
            from_number=n.sms_from,
            status_callback=settings.server.public_url.rstrip("/") + "/v1/nudges/webhooks/twilio",
            base_url=n.twilio_base_url,
        )
    if n.vonage_api_key is not None and n.vonage_api_secret is not None:  # Twilio's backup, or the only one
        callback = settings.server.public_url.rstrip("/") + "/v1/nudges/webhooks/vonage"
        signature = n.vonage_signature_secret
        vonage = VonageChannel(
            n.vonage_api_key,
            n.vonage_api_secret.get_secret_value(),
            from_=n.vonage_from or n.sms_from or "",
            signature_secret=signature.get_secret_value() if signature is not None else None,
            signature_method=n.vonage_signature_method,
            # Vonage takes at most 100 characters; a longer one leaves the account's default receipt URL
            callback=callback if len(callback) <= VONAGE_CALLBACK_MAX else None,
            rest_host=n.vonage_rest_host,
            ca_bundle=str(n.vonage_ca_bundle) if n.vonage_ca_bundle is not None else None,
        )
        twilio = channels.get("sms")
        channels["sms"] = FailoverChannel(twilio, vonage) if twilio is not None else vonage
    if n.vapid_private_key_file is not None:
        key = n.vapid_private_key_file.read_text(encoding="ascii")
        channels["push"] = WebPushChannel(key, n.vapid_subject)
    in_app = settings.nudges.in_app
    if in_app == "on" or (in_app == "auto" and channels):
        channels["in_app"] = InAppChannel()
    return channels


def webhook_replay_guard(settings: Settings) -> SharedReplayGuard:
    """Where the API processes remember the providers' webhook requests: the region's Redis when there is one
    (every replica refuses a replay), else this process's memory."""
    if settings.redis.url is None:
        return LocalReplayGuard()
    return RedisReplayGuard.from_url(settings.redis.url.get_secret_value(), settings.region)


def nudge_policy(settings: Settings) -> NudgePolicy:
    """The default nudge policy from the settings (a tenant's manifest will refine it)."""
    quiet = settings.nudges.quiet_hours
    start, end = (time.fromisoformat(p) for p in quiet.split("-")) if quiet else (None, None)
    return NudgePolicy(daily_cap=settings.nudges.daily_cap, quiet_start=start, quiet_end=end)
