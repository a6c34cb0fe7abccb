"""One settings tree, loaded once, from ``FIRSTMILE_*`` environment variables.

Nothing here connects to anything or reads a secret file at import time: the
embedded defaults (the ``pgserver`` database under ``.firstmile/``) are resolved
by :mod:`firstmile.kit.embedded` when the CLI or the app starts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-\d$"


class Settings(BaseSettings):
    """Every setting of the platform; documented in ``docs/configuration.md``."""

    model_config = SettingsConfigDict(
        env_prefix="FIRSTMILE_",
        env_file=None,
        extra="ignore",
        frozen=True,
    )

    region: str = Field(
        default="eu-west-1",
        pattern=REGION_PATTERN,
        description="The one region this process serves; tenants homed elsewhere get 421.",
    )
    data_dir: Path = Field(
        default=Path(".firstmile"),
        description="Folder for embedded state: the pgserver cluster, generated secrets.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL (postgresql+asyncpg://…) the API connects with, as the "
            "application role (no BYPASSRLS, owns no table). Unset: embedded pgserver."
        ),
    )
    database_admin_url: SecretStr | None = Field(
        default=None,
        description=(
            "URL of the role that owns the schema; used by `firstmile migrate`, "
            "`tenants apply` and `keys`. Must be set with an external database (the "
            "application role cannot migrate); embedded mode uses the pgserver superuser."
        ),
    )
    directory_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the global tenant directory database (which region is home for which "
            "tenant; one table, created by `tenants apply`). Unset: this region's own database."
        ),
    )
    database_app_role: str = Field(
        default="firstmile_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Name of the application role the migrations grant privileges to.",
    )
    database_pool_size: int = Field(
        default=20,
        ge=1,
        le=200,
        description="Connections each worker keeps open; size it to the requests in flight per worker.",
    )
    database_max_overflow: int = Field(default=10, ge=0, le=200)
    database_statement_timeout_ms: int = Field(
        default=5000, ge=10, description="statement_timeout applied to every API session."
    )
    api_key_pepper: SecretStr | None = Field(
        default=None,
        description=(
            "Secret key of the HMAC that API keys are stored under. Unset: generated "
            "once into <data_dir>/secrets/api_key_pepper (embedded only)."
        ),
    )
    api_key_cache_ttl_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How long a resolved API key is cached per process; revocation takes effect within it.",
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request body the onboarding API accepts."
    )
    event_dedupe_days: int = Field(
        default=7, ge=1, le=90, description="How long a Segment messageId is remembered for deduplication."
    )
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        description=(
            "Kafka bootstrap servers (host:port,…). Unset: embedded mode, the API process relays "
            "the outbox to the consumers in-process."
        ),
    )
    kafka_topic_prefix: str = Field(
        default="firstmile",
        pattern=r"^[a-zA-Z0-9._-]{1,100}$",
        description="Topics are <prefix>.<region>.events and <prefix>.<region>.events.dlq.",
    )
    kafka_partitions: int = Field(default=12, ge=1, le=1000, description="Partitions of a new events topic.")
    relay_database_url: SecretStr | None = Field(
        default=None,
        description=(
            "URL of a login role granted firstmile_relay, for `firstmile relay` (reads and deletes "
            "all tenants' outbox rows). Unset: FIRSTMILE_DATABASE_ADMIN_URL, or the embedded superuser."
        ),
    )
    relay_batch_size: int = Field(default=2000, ge=1, le=50_000, description="Outbox rows published per batch.")
    analytics_backend: Literal["chdb", "clickhouse"] = Field(
        default="chdb", description="chdb (the ClickHouse engine in-process) or a ClickHouse server."
    )
    analytics_path: Path | None = Field(
        default=None, description="chdb data folder (one process at a time). Unset: <data_dir>/analytics."
    )
    clickhouse_url: SecretStr | None = Field(
        default=None,
        description="ClickHouse DSN for clickhouse-connect, e.g. http://user:pass@clickhouse:8123/firstmile.",
    )
    clickhouse_policy_role: str = Field(
        default="firstmile_analytics",
        pattern=r"^([a-zA-Z_][a-zA-Z0-9_]{0,62})?$",
        description="ClickHouse role the tenant row policy is bound to (the API's role); empty: no policy.",
    )
    analytics_query_timeout_seconds: float = Field(
        default=5.0, gt=0, le=300, description="An analytics query slower than this answers with the cached result."
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL (redis://host:6379/0) of the online feature store. Unset: an in-process store.",
    )
    feature_ttl_days: int = Field(
        default=90, ge=1, le=3650, description="A user's online features expire this long after their last event."
    )
    feature_store_timeout_ms: float = Field(
        default=50, gt=0, le=10_000, description="Timeout of one feature read for a decision."
    )
    feature_max_staleness_seconds: float = Field(
        default=300,
        ge=0,
        le=86_400,
        description="When the feature store fails, cached features younger than this are used (marked stale).",
    )
    key_provider: Literal["local", "vault"] = Field(
        default="local", description="Key provider for tenants whose manifest has no keys section."
    )
    kek_file: Path | None = Field(
        default=None,
        description=(
            "Local KEK keyring (hex, one version per line, 0600). Unset: <data_dir>/secrets/kek, "
            "generated only in embedded mode."
        ),
    )
    data_key_cache_ttl_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="How long an unwrapped tenant data key is cached per process; 0 disables the cache.",
    )
    data_key_cache_max_uses: int = Field(
        default=100_000, ge=1, description="Operations with a cached tenant data key before it is unwrapped again."
    )
    vault_addr: str | None = Field(default=None, description="The platform Vault, for key_provider=vault.")
    vault_namespace: str | None = Field(default=None, description="Vault Enterprise namespace of the platform Vault.")
    vault_mount: str = Field(default="transit", pattern=r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$")
    vault_role_id: str | None = Field(default=None, description="AppRole role_id of the platform Vault.")
    vault_secret_id_file: Path | None = Field(
        default=None, description="File holding the AppRole secret_id, read at each login."
    )
    vault_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="Per-request timeout for every Vault call."
    )
    audit_signing_key_file: Path | None = Field(
        default=None,
        description=(
            "Ed25519 key that signs audit checkpoints (32-byte seed, hex). Unset: "
            "<data_dir>/secrets/audit_signing_key, generated only in embedded mode."
        ),
    )
    audit_checkpoint_every_entries: int = Field(
        default=1000, ge=1, le=1_000_000, description="Sign a checkpoint after this many unsigned entries."
    )
    audit_checkpoint_every_seconds: float = Field(
        default=60.0, gt=0, le=86_400, description="…or when the oldest unsigned entry is this old."
    )
    model_registry_uri: str | None = Field(
        default=None,
        description=(
            "Model registry (file:///dir or a path) holding the trained models and their stages. "
            "Unset: <data_dir>/models."
        ),
    )
    inference_url: str | None = Field(
        default=None,
        description=(
            "Base URL of the Ray Serve application (http://ray-serve:8100). Unset: the models run "
            "in-process from the registry (embedded mode)."
        ),
    )
    inference_timeout_ms: float = Field(
        default=100, gt=0, le=10_000, description="Hard timeout of one path-planner inference call."
    )
    inference_breaker_failures: int = Field(
        default=5, ge=1, le=1000, description="Consecutive inference failures that open the circuit breaker."
    )
    inference_breaker_reset_seconds: float = Field(
        default=30, gt=0, le=3600, description="How long an open breaker sends every call to the fallback."
    )
    stuck_scan_interval_seconds: float = Field(
        default=300,
        ge=0,
        le=86_400,
        description="How often the API process looks for stuck users (0: never; run `firstmile stuck scan`).",
    )
    stuck_after_hours: float = Field(
        default=24,
        gt=0,
        le=24 * 90,
        description="The time-based stuck rule: no activity for this long (used when the stuck detector fails).",
    )
    stuck_min_idle_hours: float = Field(
        default=1,
        ge=0,
        le=24 * 30,
        description="Users idle for less than this are never asked about (keeps the scan small).",
    )
    keycloak_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description=(
            "Public base URL of Keycloak, as it appears in the tokens' iss (http://127.0.0.1:8180). "
            "Unset: no SSO, the embedded admin login."
        ),
    )
    keycloak_admin_user: str | None = Field(
        default=None,
        min_length=1,
        description="Keycloak admin user for `tenants plan|apply` (SSO provisioning). Unset: provisioning skipped.",
    )
    keycloak_admin_password_file: Path | None = Field(
        default=None, description="File holding that admin user's password (e.g. a mounted secret)."
    )
    keycloak_admin_realm: str = Field(
        default="master", min_length=1, description="Realm the provisioning admin user logs in to."
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
        description=(
            "Base URL at which browsers (and Keycloak's back-channel logout) reach this region's API: the admin "
            "UI's OIDC redirect URI is <public_url>/admin/callback."
        ),
    )
    admin_session_lifetime_seconds: float = Field(
        default=8 * 3600, ge=60, le=7 * 86400, description="Absolute lifetime of an admin UI session."
    )
    admin_idle_timeout_seconds: float = Field(
        default=1800, ge=60, le=86400, description="An admin UI session without a request for this long ends."
    )
    admin_cookie_secure: bool = Field(
        default=True,
        description=(
            "Admin cookies are Secure and __Host- prefixed (browsers accept them on https and on http://localhost "
            "or 127.0.0.1). Set false only behind a plain-http test setup on another host."
        ),
    )
    sso_admin_client_id: str = Field(
        default="firstmile-admin",
        pattern=r"^[a-z][a-z0-9-]{0,62}$",
        description="Client id of the admin UI's OIDC client in every tenant realm.",
    )
    sso_admin_redirect_uris: str = Field(
        default="http://127.0.0.1:8000/admin/*",
        min_length=1,
        description="Comma-separated redirect URIs of the admin UI's OIDC client (also its web origins).",
    )
    sso_realm_prefix: str = Field(
        default="firstmile-",
        pattern=r"^[a-z][a-z0-9-]{0,30}$",
        description="A tenant's realm is <prefix><slug>.",
    )
    sso_audience: str = Field(
        default="firstmile-api", min_length=1, description="Audience every accepted access token must carry."
    )
    sso_tenant_claim: str = Field(
        default="firstmile_tenant",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="Claim that names the tenant; must equal the slug of the realm that issued the token.",
    )
    sso_leeway_seconds: float = Field(default=10, ge=0, le=300, description="Clock skew allowed on exp, nbf and iat.")
    sso_jwks_max_age_seconds: float = Field(
        default=600, ge=1, le=86_400, description="How long a realm's JWKS is used before it is fetched again."
    )
    sso_jwks_min_refetch_seconds: float = Field(
        default=30,
        ge=0,
        le=3600,
        description="An unknown kid refetches the realm's JWKS at most once per this many seconds.",
    )
    sso_http_timeout_seconds: float = Field(
        default=5, gt=0, le=60, description="Timeout of one JWKS fetch from Keycloak."
    )
    sso_event_sync_seconds: float = Field(
        default=60,
        ge=0,
        le=86_400,
        description=(
            "How often the API process copies failed logins from the tenant realms' Keycloak events into the "
            "audit log (0: never; run `firstmile sso sync-events`). Needs the Keycloak admin credentials."
        ),
    )
    host: str = Field(default="127.0.0.1", description="Bind address of `firstmile serve`.")
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64, description="Worker processes of `firstmile serve`.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="Where traces go: nowhere (spans still made), stdout, or OTLP/HTTP.",
    )
    otel_endpoint: str | None = Field(default=None, description="OTLP/HTTP endpoint, e.g. http://otel-collector:4318.")
    service_name: str = "firstmile-api"

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def embedded(self) -> bool:
        """True when no external database is configured."""
        return self.database_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
