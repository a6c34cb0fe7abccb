"""One settings tree, loaded once, from ``FIRSTMILE_*`` environment variables.

The tree is split per concern: :class:`Settings` has the region and the data folder,
and one section per part of the platform (``settings.database``, ``settings.sso``, …).
Every setting keeps the flat environment name it always had: ``FIRSTMILE_DATABASE_POOL_SIZE``
is ``settings.database.pool_size``, ``FIRSTMILE_SSO_AUDIENCE`` is ``settings.sso.audience``.
A section field's *alias* is that flat name (without the prefix); ``Settings(database_pool_size=5)``
works too, which is how tests override one value. ``docs/configuration.md`` lists every name.

This module is part of the wiring: slices never import it. The wiring
(:mod:`firstmile.wiring`) reads it once and hands each service the values it needs.
Nothing here connects to anything or reads a secret file: the embedded defaults (the
``pgserver`` database under ``.firstmile/``) are resolved when the CLI or the app starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from firstmile.kit.ids import REGION_PATTERN

ENV_PREFIX = "FIRSTMILE_"


class _Section(BaseModel):
    """A group of settings of one concern; each field's alias is its flat ``FIRSTMILE_*`` name."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)


class DatabaseSettings(_Section):
    """The region's PostgreSQL (or Aurora) and its connection pool."""

    url: SecretStr | None = Field(
        validation_alias="database_url",
        default=None,
        description=(
            "SQLAlchemy URL (postgresql+asyncpg://…) the API connects with, as the "
            "application role (no BYPASSRLS, owns no table). Unset: embedded pgserver."
        ),
    )
    admin_url: SecretStr | None = Field(
        validation_alias="database_admin_url",
        default=None,
        description=(
            "URL of the role that owns the schema; used by `firstmile migrate`, "
            "`tenants apply` and `keys`. Must be set with an external database (the "
            "application role cannot migrate); embedded mode uses the pgserver superuser."
        ),
    )
    app_role: str = Field(
        validation_alias="database_app_role",
        default="firstmile_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Name of the application role the migrations grant privileges to.",
    )
    pool_size: int = Field(
        validation_alias="database_pool_size",
        default=20,
        ge=1,
        le=200,
        description="Connections each worker keeps open; size it to the requests in flight per worker.",
    )
    max_overflow: int = Field(validation_alias="database_max_overflow", default=10, ge=0, le=200)
    statement_timeout_ms: int = Field(
        validation_alias="database_statement_timeout_ms",
        default=5000,
        ge=10,
        description="statement_timeout applied to every API session.",
    )


class TenancySettings(_Section):
    """API keys and the global tenant directory."""

    api_key_pepper: SecretStr | None = Field(
        validation_alias="api_key_pepper",
        default=None,
        description=(
            "Secret key of the HMAC that API keys are stored under. Unset: generated "
            "once into <data_dir>/secrets/api_key_pepper (embedded only)."
        ),
    )
    api_key_cache_ttl_seconds: float = Field(
        validation_alias="api_key_cache_ttl_seconds",
        default=5.0,
        ge=0,
        le=300,
        description="How long a resolved API key is cached per process; revocation takes effect within it.",
    )
    embed_identity_max_seconds: int = Field(
        validation_alias="embed_identity_max_seconds",
        default=3600,
        ge=60,
        le=86_400,
        description=(
            "The longest an embed identity token may live (exp - iat): a longer one is refused "
            "(docs/embed.md). The SDK asks the tenant's backend for a new one before it expires."
        ),
    )
    directory_url: SecretStr | None = Field(
        validation_alias="directory_url",
        default=None,
        description=(
            "SQLAlchemy URL of the global tenant directory database (which region is home for which "
            "tenant; one table, created by `tenants apply`). Unset: this region's own database."
        ),
    )


class ServerSettings(_Section):
    """The HTTP server: where it listens, what it accepts, how it is reached."""

    host: str = Field(validation_alias="host", default="127.0.0.1", description="Bind address of `firstmile serve`.")
    port: int = Field(validation_alias="port", default=8000, ge=1, le=65535)
    workers: int = Field(
        validation_alias="workers", default=1, ge=1, le=64, description="Worker processes of `firstmile serve`."
    )
    public_url: str = Field(
        validation_alias="public_url",
        default="http://127.0.0.1:8000",
        pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
        description=(
            "Base URL at which browsers (and Keycloak's back-channel logout) reach this region's API: the admin "
            "UI's OIDC redirect URI is <public_url>/admin/callback."
        ),
    )
    max_body_bytes: int = Field(
        validation_alias="max_body_bytes",
        default=64 * 1024,
        ge=1024,
        description="Largest request body the onboarding API accepts.",
    )
    in_process_schedulers: bool = Field(
        validation_alias="in_process_schedulers",
        default=True,
        description=(
            "Whether `serve` and `dev` also run the periodic tasks (stuck scan, Keycloak event sync). "
            "Kubernetes sets false on the API pods and runs them in `firstmile scheduler`."
        ),
    )
    in_process_sequencer: bool = Field(
        validation_alias="in_process_sequencer",
        default=True,
        description=(
            "Whether `serve` and `dev` also run the audit sequencer and checkpointer (docs/audit.md). Kubernetes "
            "sets false on the API pods and runs them in `firstmile sequencer`."
        ),
    )
    probe_host: str = Field(
        validation_alias="probe_host",
        default="127.0.0.1",
        description="Bind address of the probe server of `relay`, `consume` and `scheduler`.",
    )
    probe_port: int = Field(
        validation_alias="probe_port",
        default=0,
        ge=0,
        le=65535,
        description=(
            "Port of the probe server of `relay`, `consume` and `scheduler` (/health/live, /health/ready, "
            "/metrics); 0: none."
        ),
    )
    shutdown_timeout_seconds: float = Field(
        validation_alias="shutdown_timeout_seconds",
        default=25.0,
        gt=0,
        le=3600,
        description=(
            "How long `relay`, `consume`, `scheduler` and `sequencer` may take to stop after SIGTERM or SIGINT; "
            "past it, the process writes every thread's stack to stderr and exits with status 1."
        ),
    )


class TelemetrySettings(_Section):
    """Logs and traces."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", validation_alias="log_level")
    log_format: Literal["json", "console"] = Field(default="json", validation_alias="log_format")
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        validation_alias="otel_exporter",
        default="none",
        description="Where traces go: nowhere (spans still made), stdout, or OTLP/HTTP.",
    )
    otel_endpoint: str | None = Field(
        validation_alias="otel_endpoint",
        default=None,
        description="OTLP/HTTP endpoint, e.g. http://otel-collector:4318.",
    )
    service_name: str = Field(default="firstmile-api", validation_alias="service_name")


class EventsSettings(_Section):
    """Ingestion, the outbox relay and Kafka."""

    dedupe_days: int = Field(
        validation_alias="event_dedupe_days",
        default=7,
        ge=1,
        le=90,
        description="How long a Segment messageId is remembered for deduplication.",
    )
    kafka_bootstrap_servers: str | None = Field(
        validation_alias="kafka_bootstrap_servers",
        default=None,
        description=(
            "Kafka bootstrap servers (host:port,…). Unset: embedded mode, the API process relays "
            "the outbox to the consumers in-process."
        ),
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        validation_alias="kafka_security_protocol",
        default="PLAINTEXT",
        description=(
            "How the relay, the consumers and the operator commands connect to Kafka: PLAINTEXT (the local "
            "broker), SSL, SASL_PLAINTEXT or SASL_SSL (Amazon MSK with SCRAM: SASL_SSL on port 9096)."
        ),
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = Field(
        validation_alias="kafka_sasl_mechanism",
        default=None,
        description="The SASL mechanism with a SASL_* protocol (MSK: SCRAM-SHA-512); required with one.",
    )
    kafka_sasl_username: str | None = Field(
        validation_alias="kafka_sasl_username",
        default=None,
        min_length=1,
        description="The SASL user; required with a SASL_* protocol.",
    )
    kafka_sasl_password: SecretStr | None = Field(
        validation_alias="kafka_sasl_password",
        default=None,
        description="The SASL password; required with a SASL_* protocol. A secret: never in values or logs.",
    )
    kafka_ssl_ca_file: Path | None = Field(
        validation_alias="kafka_ssl_ca_file",
        default=None,
        description=(
            "PEM bundle of the CAs that sign the brokers' certificates, with SSL or SASL_SSL. Unset: the "
            "system's (/etc/ssl/certs/ca-certificates.crt when present; MSK's certificates chain to Amazon's "
            "public roots)."
        ),
    )
    kafka_topic_prefix: str = Field(
        validation_alias="kafka_topic_prefix",
        default="firstmile",
        pattern=r"^[a-zA-Z0-9._-]{1,100}$",
        description="Topics are <prefix>.<region>.events and <prefix>.<region>.events.dlq.",
    )
    kafka_partitions: int = Field(
        validation_alias="kafka_partitions", default=12, ge=1, le=1000, description="Partitions of a new events topic."
    )
    relay_database_url: SecretStr | None = Field(
        validation_alias="relay_database_url",
        default=None,
        description=(
            "URL of a login role granted firstmile_relay, for `firstmile relay` (reads and deletes "
            "all tenants' outbox rows). Unset: FIRSTMILE_DATABASE_ADMIN_URL, or the embedded superuser."
        ),
    )
    relay_batch_size: int = Field(
        validation_alias="relay_batch_size",
        default=2000,
        ge=1,
        le=50_000,
        description="Outbox rows published per batch.",
    )
    ingest_delivery: Literal["kafka", "outbox"] = Field(
        validation_alias="ingest_delivery",
        default="kafka",
        description=(
            "With Kafka: how ingestion makes an accepted event durable before it answers. kafka: the API "
            "produces it (acks=all) and consumers dedupe by event id; outbox: receipts and outbox rows in "
            "PostgreSQL, relayed. Without Kafka: always the outbox."
        ),
    )
    ingest_kafka_timeout_ms: int = Field(
        validation_alias="ingest_kafka_timeout_ms",
        default=5000,
        ge=100,
        le=120_000,
        description="How long a direct delivery waits for the broker's acknowledgement before the batch goes to "
        "the outbox instead.",
    )
    ingest_kafka_retry_seconds: float = Field(
        validation_alias="ingest_kafka_retry_seconds",
        default=10.0,
        gt=0,
        le=3600,
        description="After a failed direct delivery, how long ingestion writes to the outbox before it tries "
        "Kafka again.",
    )
    ingest_max_batch_bytes: int = Field(
        validation_alias="ingest_max_batch_bytes",
        default=5 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Largest batch `POST /v1/batch` and `/v1/events` accept: the request body's bytes after gzip "
        "decoding (and the gzip body's own). 5 MiB takes the largest batch of every official Segment and "
        "RudderStack library (RudderStack's Python library sends up to 4 MiB and one message more).",
    )

    @model_validator(mode="after")
    def _kafka_security_is_whole(self) -> EventsSettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl:
            missing = [
                name
                for name, value in (
                    ("FIRSTMILE_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("FIRSTMILE_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("FIRSTMILE_KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                )
                if value is None
            ]
            if missing:
                raise ValueError(
                    f"FIRSTMILE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs {', '.join(missing)}"
                )
        elif any(
            v is not None for v in (self.kafka_sasl_mechanism, self.kafka_sasl_username, self.kafka_sasl_password)
        ):
            raise ValueError(
                "FIRSTMILE_KAFKA_SASL_* are set but FIRSTMILE_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: set it to SASL_SSL (or SASL_PLAINTEXT)"
            )
        if self.kafka_ssl_ca_file is not None and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError("FIRSTMILE_KAFKA_SSL_CA_FILE needs FIRSTMILE_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
        return self

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka's connection properties besides bootstrap.servers (the password included)."""
        config: dict[str, str] = {"security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism is not None:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username is not None:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password is not None:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol.endswith("SSL"):
            system = Path("/etc/ssl/certs/ca-certificates.crt")
            ca = self.kafka_ssl_ca_file or (system if system.is_file() else None)
            if ca is not None:
                config["ssl.ca.location"] = str(ca)
        return config


class AnalyticsSettings(_Section):
    """The analytics store (chdb or ClickHouse) and its queries."""

    backend: Literal["chdb", "clickhouse"] = Field(
        validation_alias="analytics_backend",
        default="chdb",
        description="chdb (the ClickHouse engine in-process) or a ClickHouse server.",
    )
    path: Path | None = Field(
        validation_alias="analytics_path",
        default=None,
        description="chdb data folder (one process at a time). Unset: <data_dir>/analytics.",
    )
    clickhouse_url: SecretStr | None = Field(
        validation_alias="clickhouse_url",
        default=None,
        description="ClickHouse DSN for clickhouse-connect, e.g. http://user:pass@clickhouse:8123/firstmile.",
    )
    clickhouse_policy_role: str = Field(
        validation_alias="clickhouse_policy_role",
        default="firstmile_analytics",
        pattern=r"^([a-zA-Z_][a-zA-Z0-9_]{0,62})?$",
        description="ClickHouse role the tenant row policy is bound to (the API's role); empty: no policy.",
    )
    query_timeout_seconds: float = Field(
        validation_alias="analytics_query_timeout_seconds",
        default=5.0,
        gt=0,
        le=300,
        description="An analytics query slower than this answers with the cached result.",
    )
    dropoff_alert_seconds: float = Field(
        validation_alias="dropoff_alert_seconds",
        default=3600,
        ge=0,
        le=86_400,
        description="How often the scheduler checks every tenant's drop-off by step against its baseline and "
        "delivers the alerts (docs/alerts.md); 0: never.",
    )
    dropoff_alert_recent_days: int = Field(
        validation_alias="dropoff_alert_recent_days",
        default=7,
        ge=1,
        le=90,
        description="The recent window: the onboarding starts of this many days before the check.",
    )
    dropoff_alert_baseline_days: int = Field(
        validation_alias="dropoff_alert_baseline_days",
        default=28,
        ge=1,
        le=365,
        description="The baseline window: the starts of this many days before the recent window.",
    )
    dropoff_alert_conversion_hours: int = Field(
        validation_alias="dropoff_alert_conversion_hours",
        default=24,
        ge=1,
        le=720,
        description="The conversion window of the drop-off query; the recent window ends this long before the "
        "check, so every user counted had all of it.",
    )
    dropoff_alert_min_users: int = Field(
        validation_alias="dropoff_alert_min_users",
        default=50,
        ge=5,
        le=1_000_000,
        description="A step is tested only when both windows have at least this many users at the step before.",
    )
    dropoff_alert_min_shift: float = Field(
        validation_alias="dropoff_alert_min_shift",
        default=0.05,
        ge=0,
        lt=1,
        description="The smallest absolute change of a step's drop-off share that alerts (0.05: 5 points).",
    )
    dropoff_alert_significance: float = Field(
        validation_alias="dropoff_alert_significance",
        default=0.01,
        gt=0,
        le=0.2,
        description="The two-sided significance level of the two-proportion z-test, shared by a path's tested "
        "steps (Bonferroni).",
    )
    dropoff_alert_webhook_timeout_seconds: float = Field(
        validation_alias="dropoff_alert_webhook_timeout_seconds",
        default=10.0,
        gt=0,
        le=60,
        description="How long an alert webhook may take to answer; past it the delivery is retried at the next run.",
    )


class RedisSettings(_Section):
    """The region's Redis (online features and admin sessions)."""

    url: SecretStr | None = Field(
        validation_alias="redis_url",
        default=None,
        description="Redis URL (redis://host:6379/0) of the online feature store. Unset: an in-process store.",
    )


class FeatureSettings(_Section):
    """The online feature store."""

    ttl_days: int = Field(
        validation_alias="feature_ttl_days",
        default=90,
        ge=1,
        le=3650,
        description="A user's online features expire this long after their last event.",
    )
    timeout_ms: float = Field(
        validation_alias="feature_store_timeout_ms",
        default=50,
        gt=0,
        le=10_000,
        description="Timeout of one feature read for a decision.",
    )
    max_staleness_seconds: float = Field(
        validation_alias="feature_max_staleness_seconds",
        default=300,
        ge=0,
        le=86_400,
        description="When the feature store fails, cached features younger than this are used (marked stale).",
    )


class KeySettings(_Section):
    """Key providers and the data-key cache."""

    provider: Literal["local", "vault"] = Field(
        validation_alias="key_provider",
        default="local",
        description="Key provider for tenants whose manifest has no keys section.",
    )
    kek_file: Path | None = Field(
        validation_alias="kek_file",
        default=None,
        description=(
            "Local KEK keyring (hex, one version per line, 0600). Unset: <data_dir>/secrets/kek, "
            "generated only in embedded mode."
        ),
    )
    cache_ttl_seconds: float = Field(
        validation_alias="data_key_cache_ttl_seconds",
        default=300.0,
        ge=0,
        le=86_400,
        description="How long an unwrapped tenant data key is cached per process; 0 disables the cache.",
    )
    cache_max_uses: int = Field(
        validation_alias="data_key_cache_max_uses",
        default=100_000,
        ge=1,
        description="Operations with a cached tenant data key before it is unwrapped again.",
    )
    vault_addr: str | None = Field(
        validation_alias="vault_addr", default=None, description="The platform Vault, for key_provider=vault."
    )
    vault_namespace: str | None = Field(
        validation_alias="vault_namespace",
        default=None,
        description="Vault Enterprise namespace of the platform Vault.",
    )
    vault_mount: str = Field(
        validation_alias="vault_mount", default="transit", pattern=r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$"
    )
    vault_role_id: str | None = Field(
        validation_alias="vault_role_id", default=None, description="AppRole role_id of the platform Vault."
    )
    vault_secret_id_file: Path | None = Field(
        validation_alias="vault_secret_id_file",
        default=None,
        description="File holding the AppRole secret_id, read at each login.",
    )
    vault_timeout_seconds: float = Field(
        validation_alias="vault_timeout_seconds",
        default=5.0,
        gt=0,
        le=60,
        description="Per-request timeout for every Vault call.",
    )


class AuditSettings(_Section):
    """Signing and checkpointing the audit log."""

    signing_key_file: Path | None = Field(
        validation_alias="audit_signing_key_file",
        default=None,
        description=(
            "Ed25519 key that signs audit checkpoints (32-byte seed, hex). Unset: "
            "<data_dir>/secrets/audit_signing_key, generated only in embedded mode."
        ),
    )
    checkpoint_every_entries: int = Field(
        validation_alias="audit_checkpoint_every_entries",
        default=1000,
        ge=1,
        le=1_000_000,
        description="Sign a checkpoint after this many unsigned entries.",
    )
    checkpoint_every_seconds: float = Field(
        validation_alias="audit_checkpoint_every_seconds",
        default=60.0,
        gt=0,
        le=86_400,
        description="…or when the oldest unsigned entry is this old.",
    )
    sequence_batch: int = Field(
        validation_alias="audit_sequence_batch",
        default=1000,
        ge=1,
        le=100_000,
        description="Queued audit entries the sequencer places in one transaction.",
    )
    sequence_poll_seconds: float = Field(
        validation_alias="audit_sequence_poll_seconds",
        default=0.1,
        gt=0,
        le=10,
        description=(
            "How often the sequencer looks for queued audit entries; with the batch time it bounds the maximum "
            "merge delay (docs/audit.md)."
        ),
    )


class ModelSettings(_Section):
    """The model registry and the inference client."""

    registry_uri: str | None = Field(
        validation_alias="model_registry_uri",
        default=None,
        description=(
            "Model registry (file:///dir or a path) holding the trained models and their stages. "
            "Unset: <data_dir>/models."
        ),
    )
    inference_url: str | None = Field(
        validation_alias="inference_url",
        default=None,
        description=(
            "Base URL of the Ray Serve application (http://ray-serve:8100). Unset: the models run "
            "in-process from the registry (embedded mode)."
        ),
    )
    inference_timeout_ms: float = Field(
        validation_alias="inference_timeout_ms",
        default=100,
        gt=0,
        le=10_000,
        description="Hard timeout of one path-planner inference call.",
    )
    breaker_failures: int = Field(
        validation_alias="inference_breaker_failures",
        default=5,
        ge=1,
        le=1000,
        description="Consecutive inference failures that open the circuit breaker.",
    )
    breaker_reset_seconds: float = Field(
        validation_alias="inference_breaker_reset_seconds",
        default=30,
        gt=0,
        le=3600,
        description="How long an open breaker sends every call to the fallback.",
    )
    tenant_training_seconds: float = Field(
        validation_alias="tenant_training_seconds",
        default=0,
        ge=0,
        le=7 * 86_400,
        description="How often the scheduler looks for tenants whose own path model is due for training "
        "(planner.training in the manifest: schedule or drift flag), trains, registers the candidate (never "
        "promotes) and audits each run (0: never; run `firstmile models train --tenant`). Needs the schema "
        "owner's URL (FIRSTMILE_DATABASE_ADMIN_URL, or embedded mode).",
    )
    training_ray_address: str | None = Field(
        validation_alias="training_ray_address",
        default=None,
        pattern=r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}$",
        description="The Ray cluster a tenant's path model trains on (`models train --tenant` and the scheduler's "
        "tenant-model-training task): ray://host:port (Ray Client) or host:port (the GCS, from a node of the "
        "cluster); no credentials (Ray reads RAY_AUTH_TOKEN). Unset: in process. An unreachable cluster or a "
        "failed task refuses the run; it never falls back to in process.",
    )
    training_ray_timeout_seconds: float = Field(
        validation_alias="training_ray_timeout_seconds",
        default=3600,
        gt=0,
        le=86_400,
        description="How long a training task on Ray may take, waiting for a free CPU included; past it the task "
        "is cancelled and the run refused.",
    )

    @field_validator("training_ray_address", mode="before")
    @classmethod
    def _no_ray_address(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("training_ray_address")
    @classmethod
    def _ray_port(cls, value: str | None) -> str | None:
        if value is not None and not 0 < int(value.rsplit(":", 1)[1]) < 65_536:
            raise ValueError(f"{value!r}: the port is out of range")
        return value


class StuckSettings(_Section):
    """The stuck scan."""

    scan_interval_seconds: float = Field(
        validation_alias="stuck_scan_interval_seconds",
        default=300,
        ge=0,
        le=86_400,
        description="How often the API process looks for stuck users (0: never; run `firstmile stuck scan`).",
    )
    after_hours: float = Field(
        validation_alias="stuck_after_hours",
        default=24,
        gt=0,
        le=24 * 90,
        description="The time-based stuck rule: no activity for this long (used when the stuck detector fails).",
    )
    detector: Literal["model", "time_rule"] = Field(
        validation_alias="stuck_detector",
        default="model",
        description="Who decides that a user is stuck: the stuck_detector model (the time rule when it cannot "
        "answer), or the time rule alone.",
    )
    min_idle_hours: float = Field(
        validation_alias="stuck_min_idle_hours",
        default=1,
        ge=0,
        le=24 * 30,
        description="Users idle for less than this are never asked about (keeps the scan small).",
    )


class NudgeSettings(_Section):
    """The nudge executor (docs/nudges.md): which channels it may use, the e-mail relay, the policy defaults."""

    smtp_url: SecretStr | None = Field(
        validation_alias="nudge_smtp_url",
        default=None,
        description="The SMTP relay for e-mail nudges, `smtp://[user:password@]host:port` (STARTTLS when the "
        "server offers it). Unset: no e-mail channel, and with no channel at all nothing is decided or sent.",
    )
    sendgrid_api_key: SecretStr | None = Field(
        validation_alias="nudge_sendgrid_api_key",
        default=None,
        description="A SendGrid API key (Mail Send): e-mail nudges through SendGrid's v3 API, as the backup of the "
        "SMTP relay when both are set, else on its own.",
    )
    sendgrid_base_url: str = Field(
        validation_alias="nudge_sendgrid_base_url",
        default="https://api.sendgrid.com",
        pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
        description="SendGrid's API root (its EU subuser region: https://api.eu.sendgrid.com).",
    )
    sendgrid_webhook_key: str | None = Field(
        validation_alias="nudge_sendgrid_webhook_key",
        default=None,
        max_length=400,
        description="The verification key of SendGrid's Signed Event Webhook (base64, as its console shows it); "
        "unset: POST /v1/nudges/webhooks/sendgrid refuses every request.",
    )
    twilio_account_sid: str | None = Field(
        validation_alias="nudge_twilio_account_sid",
        default=None,
        pattern=r"^AC[0-9a-f]{32}$",
        description="The Twilio account SID (AC…): SMS nudges through Twilio's Messages API, to the user's `phone` "
        "trait (sealed, read at send time). Needs FIRSTMILE_NUDGE_TWILIO_AUTH_TOKEN and FIRSTMILE_NUDGE_SMS_FROM.",
    )
    twilio_auth_token: SecretStr | None = Field(
        validation_alias="nudge_twilio_auth_token",
        default=None,
        description="The Twilio account's auth token: authenticates the sends and checks its signed status "
        "callbacks (POST /v1/nudges/webhooks/twilio).",
    )
    sms_from: str | None = Field(
        validation_alias="nudge_sms_from",
        default=None,
        pattern=r"^\+[1-9][0-9]{6,14}$",
        description="The sending number of SMS nudges (E.164).",
    )
    twilio_base_url: str | None = Field(
        validation_alias="nudge_twilio_base_url",
        default=None,
        pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
        description="Another root for Twilio's API than https://api.twilio.com (a regional edge, a test server).",
    )
    vonage_api_key: str | None = Field(
        validation_alias="nudge_vonage_api_key",
        default=None,
        pattern=r"^[0-9A-Za-z]{1,32}$",
        description="A Vonage API key: SMS nudges through Vonage's SMS API, as Twilio's backup when both are set "
        "(failover on timeouts and 5xx), else on its own. Needs FIRSTMILE_NUDGE_VONAGE_API_SECRET.",
    )
    vonage_api_secret: SecretStr | None = Field(
        validation_alias="nudge_vonage_api_secret",
        default=None,
        description="The Vonage account's API secret (HTTP basic authentication of the sends).",
    )
    vonage_signature_secret: SecretStr | None = Field(
        validation_alias="nudge_vonage_signature_secret",
        default=None,
        description="The Vonage account's signature secret: signs the sends instead of basic authentication, and "
        "checks its signed delivery receipts (/v1/nudges/webhooks/vonage); unset, every receipt is refused.",
    )
    vonage_signature_method: Literal["md5", "sha1", "sha256", "sha512"] = Field(
        validation_alias="nudge_vonage_signature_method",
        default="sha256",
        description="The HMAC of Vonage's signatures, as the account is set (its dashboard's 'SHA-256 HMAC'…).",
    )
    vonage_from: str | None = Field(
        validation_alias="nudge_vonage_from",
        default=None,
        pattern=r"^(\+?[1-9][0-9]{6,14}|[A-Za-z0-9 ]{1,11})$",
        description="The sender of SMS nudges sent through Vonage: a number (E.164) or an alphanumeric sender id "
        "of up to 11 characters, where the destination's carriers allow one. Unset: FIRSTMILE_NUDGE_SMS_FROM.",
    )
    vonage_rest_host: str = Field(
        validation_alias="nudge_vonage_rest_host",
        default="rest.nexmo.com",
        pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$",
        description="The host of Vonage's SMS API (HTTPS); another for a regional endpoint or a test server.",
    )
    vonage_ca_bundle: Path | None = Field(
        validation_alias="nudge_vonage_ca_bundle",
        default=None,
        description="A PEM file of the CAs that Vonage's TLS certificate is checked against instead of the "
        "system's (an egress proxy that inspects TLS).",
    )
    vapid_private_key_file: Path | None = Field(
        validation_alias="nudge_vapid_private_key_file",
        default=None,
        description="File holding the VAPID private key of web push (P-256: PEM, or base64url of the raw key as "
        "web-push tools print it); set, push is a channel, to the subscriptions the users' browsers give "
        "(POST /v1/users/{user_id}/push-subscriptions).",
    )
    vapid_subject: str = Field(
        validation_alias="nudge_vapid_subject",
        default="mailto:nudges@firstmile.invalid",
        pattern=r"^(mailto:\S+@\S+|https://\S+)$",
        description="The VAPID contact (`sub`) push services may write to: a mailto: or https: URL.",
    )
    email_from: str = Field(
        validation_alias="nudge_email_from",
        default="Firstmile <nudges@firstmile.invalid>",
        min_length=3,
        max_length=320,
        description="The From of nudge e-mails; its domain also names every Message-ID.",
    )
    delivery_interval_seconds: float = Field(
        validation_alias="nudge_delivery_interval_seconds",
        default=5,
        ge=0,
        le=3600,
        description="How often the API process sends the nudges that are due (0: never in this process).",
    )
    max_attempts: int = Field(
        validation_alias="nudge_max_attempts",
        default=6,
        ge=1,
        le=50,
        description="Attempts of one send over unavailable channels before it is given up (dead).",
    )
    daily_cap: int = Field(
        validation_alias="nudge_daily_cap",
        default=1,
        ge=0,
        le=20,
        description="Nudges per user per calendar day in the user's time zone, every channel together.",
    )
    quiet_hours: str = Field(
        validation_alias="nudge_quiet_hours",
        default="21:00-08:00",
        pattern=r"^(|([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9])$",
        description="Local quiet hours `HH:MM-HH:MM` (may span midnight; empty: none): nudges wait for their end.",
    )
    outcome_window_hours: float = Field(
        validation_alias="nudge_outcome_window_hours",
        default=72,
        gt=0,
        le=24 * 30,
        description="A nudge converts when its step is completed within this long after it was sent; the bandit "
        "counts a sent nudge with neither a click nor a conversion in this window as a failure.",
    )
    trigger_scan_seconds: float = Field(
        validation_alias="nudge_trigger_scan_seconds",
        default=60,
        ge=0,
        le=86_400,
        description="How often the scheduler fires the manifest's step_idle and event_missing nudge triggers "
        "(0: never in this process).",
    )
    policy_timeout_seconds: float = Field(
        validation_alias="nudge_policy_timeout_seconds",
        default=0.5,
        gt=0,
        le=30,
        description="How long each read of a nudge policy's inputs (consents, suppressions, the budget) may take; "
        "past it the nudge is denied (`policy-timeout`), as the design's guardrail rule says.",
    )
    default_time_zone: str = Field(
        validation_alias="nudge_default_time_zone",
        default="UTC",
        max_length=64,
        description="The time zone of a user whose traits name none (`timezone` trait, an IANA name).",
    )
    llm_base_url: str = Field(
        validation_alias="nudge_llm_base_url",
        default="",
        max_length=2000,
        pattern=r"^(|https?://[^\s/?#@]+(/[^\s?#]*)?)$",
        description="API root of an OpenAI-compatible Chat Completions server for the optional LLM personalisation "
        "of nudge content (e.g. `https://api.openai.com/v1`; no credentials in it). Empty: off, every nudge uses "
        "its static template.",
    )
    llm_model: str = Field(
        validation_alias="nudge_llm_model",
        default="",
        max_length=200,
        description="The model the personalisation asks; required when FIRSTMILE_NUDGE_LLM_BASE_URL is set.",
    )
    llm_timeout_seconds: float = Field(
        validation_alias="nudge_llm_timeout_seconds",
        default=2,
        gt=0,
        le=30,
        description="How long one personalisation may take; past it the static template is used.",
    )
    llm_api_key: SecretStr | None = Field(
        validation_alias="nudge_llm_api_key",
        default=None,
        description="The bearer token for the personalisation server. A secret: never in values or logs.",
    )
    in_app: Literal["auto", "on", "off"] = Field(
        validation_alias="nudge_in_app",
        default="auto",
        description="The in-app channel (stored messages, a pull endpoint and a live stream): `auto` offers it "
        "whenever another channel runs the nudges, `on` also alone, `off` never.",
    )
    stream_seconds: float = Field(
        validation_alias="nudge_stream_seconds",
        default=300,
        ge=1,
        le=3600,
        description="How long one in-app message stream stays open; then it ends and the client reconnects.",
    )
    stream_heartbeat_seconds: float = Field(
        validation_alias="nudge_stream_heartbeat_seconds",
        default=15,
        gt=0,
        le=300,
        description="A comment on an idle in-app message stream this often, so proxies keep it open.",
    )

    @model_validator(mode="after")
    def _llm_is_whole(self) -> NudgeSettings:
        if self.llm_base_url and not self.llm_model.strip():
            raise ValueError("FIRSTMILE_NUDGE_LLM_BASE_URL is set: name the model in FIRSTMILE_NUDGE_LLM_MODEL")
        twilio = (self.twilio_account_sid, self.twilio_auth_token)
        if (any(v is not None for v in twilio) and any(v is None for v in twilio)) or (
            self.twilio_account_sid is not None and self.sms_from is None
        ):
            raise ValueError(
                "SMS nudges through Twilio need all of FIRSTMILE_NUDGE_TWILIO_ACCOUNT_SID, "
                "FIRSTMILE_NUDGE_TWILIO_AUTH_TOKEN and FIRSTMILE_NUDGE_SMS_FROM"
            )
        if (self.vonage_api_key is None) != (self.vonage_api_secret is None) or (
            self.vonage_api_key is not None and self.vonage_from is None and self.sms_from is None
        ):
            raise ValueError(
                "SMS nudges through Vonage need FIRSTMILE_NUDGE_VONAGE_API_KEY, FIRSTMILE_NUDGE_VONAGE_API_SECRET "
                "and a sender (FIRSTMILE_NUDGE_VONAGE_FROM or FIRSTMILE_NUDGE_SMS_FROM)"
            )
        return self


class ExperimentSettings(_Section):
    """The experiment orchestrator (docs/experiments.md)."""

    allocation_timeout_ms: float = Field(
        validation_alias="experiment_allocation_timeout_ms",
        default=50,
        gt=0,
        le=1000,
        description="How long a start waits for the tenant's running experiments (read once per tenant revision); "
        "past it the user gets the planner's path (control) and no exposure.",
    )
    review_seconds: float = Field(
        validation_alias="experiment_review_seconds",
        default=3600,
        ge=0,
        le=86_400,
        description="How often the scheduler reviews running experiments (extends or concludes those past their "
        "planned end without a winner, raises SRM alerts); 0: never.",
    )


class ReviewSettings(_Section):
    """Human in the loop: the review queue (docs/review.md)."""

    confidence_threshold: float = Field(
        validation_alias="review_confidence_threshold",
        default=0.6,
        ge=0,
        le=1,
        description="A model's path decision below this confidence may be sampled for a person's review.",
    )
    sample_rate: float = Field(
        validation_alias="review_sample_rate",
        default=0.1,
        ge=0,
        le=1,
        description="The share of the low-confidence model decisions that go to the review queue; 0: none.",
    )
    queue_check_seconds: float = Field(
        validation_alias="review_queue_check_seconds",
        default=60.0,
        ge=0,
        le=86400,
        description="How often the scheduler measures the review queues (queue length, the oldest item's age) and "
        "notifies reviewers of a queue past its threshold; 0: it does not run here.",
    )
    queue_alert_threshold: int = Field(
        validation_alias="review_queue_alert_threshold",
        default=50,
        ge=1,
        le=1_000_000,
        description="Pending reviews of a tenant past which its reviewers are notified (once per crossing).",
    )


class DestinationSettings(_Section):
    """The delivery of the tenants' lifecycle events to their destinations (docs/destinations.md)."""

    poll_seconds: float = Field(
        validation_alias="destination_poll_seconds",
        default=2.0,
        ge=0,
        le=3600,
        description="How often the scheduler's delivery worker looks for events due at the tenants' destinations; "
        "0: it does not run here.",
    )
    timeout_seconds: float = Field(
        validation_alias="destination_timeout_seconds",
        default=10.0,
        gt=0,
        le=120,
        description="How long a destination's API may take to answer one request; past it the events are retried.",
    )
    lease_seconds: float = Field(
        validation_alias="destination_lease_seconds",
        default=300,
        ge=10,
        le=3600,
        description="How long a worker holds the batch it claimed: a worker that dies leaves its batch to another "
        "after this (sent again, with the same idempotency keys). Longer than a batch takes to send.",
    )
    max_attempts: int = Field(
        validation_alias="destination_max_attempts",
        default=15,
        ge=1,
        le=100,
        description="Attempts of an event before it is dead-lettered (`firstmile destinations replay` sends it again).",
    )
    backoff_base_seconds: float = Field(
        validation_alias="destination_backoff_base_seconds",
        default=5.0,
        gt=0,
        le=3600,
        description="The first retry's wait; each further one doubles it (with jitter), up to the cap.",
    )
    backoff_cap_seconds: float = Field(
        validation_alias="destination_backoff_cap_seconds",
        default=3600.0,
        gt=0,
        le=86_400,
        description="The longest wait between two attempts of an event (a `Retry-After` too).",
    )
    disable_after_hours: float = Field(
        validation_alias="destination_disable_after_hours",
        default=24.0,
        gt=0,
        le=24 * 30,
        description="A destination every attempt of which failed for this long is disabled (audited) until "
        "`firstmile destinations enable`.",
    )
    retention_days: float = Field(
        validation_alias="destination_retention_days",
        default=7.0,
        gt=0,
        le=90,
        description="How long delivered and dead events are kept (a redelivered event within it is not queued "
        "again; dead letters can be replayed within it).",
    )
    rotation_hours: float = Field(
        validation_alias="destination_rotation_hours",
        default=24.0,
        gt=0,
        le=24 * 30,
        description="How long the credentials replaced by `firstmile destinations credentials set --rotate` stay "
        "valid (a webhook is signed with both secrets meanwhile).",
    )
    concurrency: int = Field(
        validation_alias="destination_concurrency",
        default=16,
        ge=1,
        le=256,
        description="Destinations a worker delivers to at the same time (each destination one batch at a time).",
    )


class SsoSettings(_Section):
    """Keycloak: token validation, provisioning and the admin login."""

    keycloak_url: str | None = Field(
        validation_alias="keycloak_url",
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description=(
            "Public base URL of Keycloak, as it appears in the tokens' iss (http://127.0.0.1:8180). "
            "Unset: no SSO, the embedded admin login."
        ),
    )
    admin_user: str | None = Field(
        validation_alias="keycloak_admin_user",
        default=None,
        min_length=1,
        description="Keycloak admin user for `tenants plan|apply` (SSO provisioning). Unset: provisioning skipped.",
    )
    admin_password_file: Path | None = Field(
        validation_alias="keycloak_admin_password_file",
        default=None,
        description="File holding that admin user's password (e.g. a mounted secret).",
    )
    admin_realm: str = Field(
        validation_alias="keycloak_admin_realm",
        default="master",
        min_length=1,
        description="Realm the provisioning admin user logs in to.",
    )
    admin_client_id: str = Field(
        validation_alias="sso_admin_client_id",
        default="firstmile-admin",
        pattern=r"^[a-z][a-z0-9-]{0,62}$",
        description="Client id of the admin UI's OIDC client in every tenant realm.",
    )
    admin_redirect_uris: str = Field(
        validation_alias="sso_admin_redirect_uris",
        default="http://127.0.0.1:8000/admin/*",
        min_length=1,
        description="Comma-separated redirect URIs of the admin UI's OIDC client (also its web origins).",
    )
    realm_prefix: str = Field(
        validation_alias="sso_realm_prefix",
        default="firstmile-",
        pattern=r"^[a-z][a-z0-9-]{0,30}$",
        description="A tenant's realm is <prefix><slug>.",
    )
    audience: str = Field(
        validation_alias="sso_audience",
        default="firstmile-api",
        min_length=1,
        description="Audience every accepted access token must carry.",
    )
    tenant_claim: str = Field(
        validation_alias="sso_tenant_claim",
        default="firstmile_tenant",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="Claim that names the tenant; must equal the slug of the realm that issued the token.",
    )
    leeway_seconds: float = Field(
        validation_alias="sso_leeway_seconds",
        default=10,
        ge=0,
        le=300,
        description="Clock skew allowed on exp, nbf and iat.",
    )
    jwks_max_age_seconds: float = Field(
        validation_alias="sso_jwks_max_age_seconds",
        default=600,
        ge=1,
        le=86_400,
        description="How long a realm's JWKS is used before it is fetched again.",
    )
    jwks_min_refetch_seconds: float = Field(
        validation_alias="sso_jwks_min_refetch_seconds",
        default=30,
        ge=0,
        le=3600,
        description="An unknown kid refetches the realm's JWKS at most once per this many seconds.",
    )
    http_timeout_seconds: float = Field(
        validation_alias="sso_http_timeout_seconds",
        default=5,
        gt=0,
        le=60,
        description="Timeout of one JWKS fetch from Keycloak.",
    )
    event_sync_seconds: float = Field(
        validation_alias="sso_event_sync_seconds",
        default=60,
        ge=0,
        le=86_400,
        description=(
            "How often the API process copies failed logins from the tenant realms' Keycloak events into the "
            "audit log (0: never; run `firstmile sso sync-events`). Needs the Keycloak admin credentials."
        ),
    )


class AdminSettings(_Section):
    """Admin UI sessions."""

    session_lifetime_seconds: float = Field(
        validation_alias="admin_session_lifetime_seconds",
        default=8 * 3600,
        ge=60,
        le=7 * 86400,
        description="Absolute lifetime of an admin UI session.",
    )
    idle_timeout_seconds: float = Field(
        validation_alias="admin_idle_timeout_seconds",
        default=1800,
        ge=60,
        le=86400,
        description="An admin UI session without a request for this long ends.",
    )
    cookie_secure: bool = Field(
        validation_alias="admin_cookie_secure",
        default=True,
        description=(
            "Admin cookies are Secure and __Host- prefixed (browsers accept them on https and on http://localhost "
            "or 127.0.0.1). Set false only behind a plain-http test setup on another host."
        ),
    )


class GuardrailSettings(_Section):
    """Rate limits and the abuse detector of the tenant API (the guardrail's request policy)."""

    rate_limit_enabled: bool = Field(
        validation_alias="rate_limit_enabled",
        default=True,
        description=(
            "Whether requests with an API key or access token are rate-limited (per key and per tenant) and "
            "watched by the abuse detector. Health, metrics, the schema and the admin UI never are."
        ),
    )
    key_requests: int = Field(
        validation_alias="rate_limit_key_requests",
        default=1000,
        ge=1,
        le=10_000_000,
        description="Requests each API key (or machine client) may make per key window (a manifest may set its own).",
    )
    key_window_seconds: int = Field(
        validation_alias="rate_limit_key_window_seconds",
        default=1,
        ge=1,
        le=86_400,
        description="The per-key window: the quota refills evenly over it and may be spent at once (GCRA).",
    )
    tenant_requests: int = Field(
        validation_alias="rate_limit_tenant_requests",
        default=5000,
        ge=1,
        le=10_000_000,
        description="Requests all credentials of one tenant together may make per tenant window.",
    )
    tenant_window_seconds: int = Field(
        validation_alias="rate_limit_tenant_window_seconds",
        default=1,
        ge=1,
        le=86_400,
        description="The per-tenant window.",
    )
    embed_user_requests: int = Field(
        validation_alias="rate_limit_embed_user_requests",
        default=120,
        ge=1,
        le=1_000_000,
        description=(
            "Requests each browser user of a publishable key (the embed SDK) may make per embed window, in place "
            "of the per-key quota; they count against the tenant's quota too."
        ),
    )
    embed_user_window_seconds: int = Field(
        validation_alias="rate_limit_embed_user_window_seconds",
        default=60,
        ge=1,
        le=86_400,
        description="The per-user window of publishable-key requests.",
    )
    redis_timeout_ms: float = Field(
        validation_alias="rate_limit_redis_timeout_ms",
        default=100,
        gt=0,
        le=10_000,
        description="Timeout of the limiter's one Redis call per request; past it the request is checked locally.",
    )
    fallback_seconds: float = Field(
        validation_alias="rate_limit_fallback_seconds",
        default=5,
        gt=0,
        le=3600,
        description="After Redis failed, how long each process limits on its own before it tries Redis again.",
    )
    abuse_detection_enabled: bool = Field(
        validation_alias="abuse_detection_enabled",
        default=True,
        description="Whether the abuse detector watches each credential's request rate against its own baseline.",
    )
    abuse_factor: float = Field(
        validation_alias="abuse_factor",
        default=10,
        gt=1,
        le=1000,
        description="A credential is flagged when its requests of one kind this minute exceed this times its baseline.",
    )
    abuse_min_requests_per_minute: int = Field(
        validation_alias="abuse_min_requests_per_minute",
        default=300,
        ge=1,
        le=10_000_000,
        description="…and are at least this many (a quiet key doing a few more requests is not abuse).",
    )
    abuse_baseline_half_life_minutes: float = Field(
        validation_alias="abuse_baseline_half_life_minutes",
        default=60,
        gt=0,
        le=10_080,
        description="Half-life of the baseline: an exponentially weighted moving average of requests per minute.",
    )
    abuse_warmup_minutes: int = Field(
        validation_alias="abuse_warmup_minutes",
        default=60,
        ge=0,
        le=10_080,
        description="A credential is not flagged until its baseline has this many minutes of history.",
    )
    abuse_flag_cooldown_seconds: float = Field(
        validation_alias="abuse_flag_cooldown_seconds",
        default=3600,
        ge=1,
        le=7 * 86_400,
        description="A flagged credential is flagged again (another audit entry) at most once per this long.",
    )


SECTIONS: dict[str, type[_Section]] = {
    "database": DatabaseSettings,
    "tenancy": TenancySettings,
    "server": ServerSettings,
    "telemetry": TelemetrySettings,
    "events": EventsSettings,
    "analytics": AnalyticsSettings,
    "redis": RedisSettings,
    "features": FeatureSettings,
    "keys": KeySettings,
    "audit": AuditSettings,
    "models": ModelSettings,
    "stuck": StuckSettings,
    "nudges": NudgeSettings,
    "experiments": ExperimentSettings,
    "destinations": DestinationSettings,
    "reviews": ReviewSettings,
    "sso": SsoSettings,
    "admin": AdminSettings,
    "guardrail": GuardrailSettings,
}


def _flat_names() -> dict[str, tuple[str, str]]:
    """``{flat name: (section, field)}`` of every section field."""
    names: dict[str, tuple[str, str]] = {}
    for section, model in SECTIONS.items():
        for field, info in model.model_fields.items():
            alias = info.validation_alias
            assert isinstance(alias, str), f"{model.__name__}.{field} needs its flat name as alias"
            names[alias] = (section, field)
    return names


FLAT_NAMES = _flat_names()


class _FlatEnvironment(PydanticBaseSettingsSource):
    """``FIRSTMILE_<FLAT NAME>`` variables of the section fields (names are case-insensitive)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is read in __call__

    def __call__(self) -> dict[str, Any]:
        env = {key.upper(): value for key, value in os.environ.items()}
        found: dict[str, Any] = {}
        for flat in FLAT_NAMES:
            value = env.get(ENV_PREFIX + flat.upper())
            if value is not None:
                found[flat] = value
        return found


ENV_FILE_VARIABLE = ENV_PREFIX + "ENV_FILE"
"""Names a dotenv file (``KEY=value`` lines) read after the environment: how a Vault Agent hands over secrets."""


class _EnvFile(PydanticBaseSettingsSource):
    """``FIRSTMILE_*`` lines of the file named by ``FIRSTMILE_ENV_FILE``; the process environment wins over it.

    A file that is named but missing or unreadable is an error: the process must not start without
    the secrets it was promised (Kubernetes restarts it until the Vault Agent has written them).
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is read in __call__

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(ENV_FILE_VARIABLE)
        if not path:
            return {}
        try:
            with open(path, encoding="utf-8") as handle:
                values = dotenv_values(stream=handle)
        except OSError as exc:
            raise ValueError(f"{ENV_FILE_VARIABLE}={path}: cannot read it: {exc.strerror or exc}") from exc
        found: dict[str, Any] = {}
        top = {ENV_PREFIX + name.upper(): name for name in ("region", "data_dir")}
        for key, value in values.items():
            if value is None:
                continue
            name = key.upper()
            if name in top:
                found[top[name]] = value
            elif name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() in FLAT_NAMES:
                found[name[len(ENV_PREFIX) :].lower()] = value
        return found


class Settings(BaseSettings):
    """Every setting of the platform; documented in ``docs/configuration.md``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="ignore", frozen=True)

    region: str = Field(
        default="eu-west-1",
        pattern=REGION_PATTERN,
        description="The one region this process serves; tenants homed elsewhere get 421.",
    )
    data_dir: Path = Field(
        default=Path(".firstmile"),
        description="Folder for embedded state: the pgserver cluster, generated secrets.",
    )

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    tenancy: TenancySettings = Field(default_factory=TenancySettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    analytics: AnalyticsSettings = Field(default_factory=AnalyticsSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    keys: KeySettings = Field(default_factory=KeySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    stuck: StuckSettings = Field(default_factory=StuckSettings)
    nudges: NudgeSettings = Field(default_factory=NudgeSettings)
    experiments: ExperimentSettings = Field(default_factory=ExperimentSettings)
    destinations: DestinationSettings = Field(default_factory=DestinationSettings)
    reviews: ReviewSettings = Field(default_factory=ReviewSettings)
    sso: SsoSettings = Field(default_factory=SsoSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    guardrail: GuardrailSettings = Field(default_factory=GuardrailSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # keyword arguments win over the environment, which wins over FIRSTMILE_ENV_FILE; flat names fill the sections
        return init_settings, _FlatEnvironment(settings_cls), env_settings, _EnvFile(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _into_sections(cls, data: Any) -> Any:
        """Move flat names (``database_pool_size=5``, ``FIRSTMILE_DATABASE_POOL_SIZE``) into their section."""
        if not isinstance(data, dict):
            return data
        result = dict(data)
        for flat in [k for k in result if k in FLAT_NAMES]:
            section, field = FLAT_NAMES[flat]
            current = result.get(section)
            values = dict(current) if isinstance(current, dict) else {}
            if isinstance(current, BaseModel):
                values = current.model_dump()
            values.setdefault(field, result.pop(flat))
            result[section] = values
        return result

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def embedded(self) -> bool:
        """True when no external database is configured."""
        return self.database.url is None

    def explicitly_set(self, flat: str) -> bool:
        """Whether the flat setting ``flat`` was given (environment or argument), not defaulted."""
        section, field = FLAT_NAMES[flat]
        return field in getattr(self, section).model_fields_set


def environment_names() -> Iterator[str]:
    """Every ``FIRSTMILE_*`` name the settings read."""
    yield ENV_PREFIX + "REGION"
    yield ENV_PREFIX + "DATA_DIR"
    yield ENV_FILE_VARIABLE
    for flat in FLAT_NAMES:
        yield ENV_PREFIX + flat.upper()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use (by the wiring only)."""
    return Settings()
