"""What the slices' commands get from the platform: :class:`OperatorServices`, built lazily per invocation.

Each slice's command group declares a ``Protocol`` of what it needs (``AuditCommandDeps``,
``TenantCommandDeps``, …); this class implements all of them from the settings, so the slices
never read the environment or choose an adapter. :func:`_conforms` makes mypy check that it
does. Nothing is opened until a command asks, so ``firstmile --help`` touches no database.

Database access checks the schema first: with the embedded database (``make run``) a command
run before the first ``make run`` migrates it, as ``serve`` does; with an external database it
stops with the command to run instead of a SQL traceback.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import click
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.cli import AdminCommandDeps
from firstmile.analytics.alerting import DropoffWatch
from firstmile.analytics.cli import AnalyticsCommandDeps
from firstmile.analytics.lazy import LazyStore
from firstmile.analytics.service import AnalyticsService
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.cli import AuditCommandDeps
from firstmile.audit.signing import AuditSigner, SigningKeyError
from firstmile.controlplane.cli import TenantCommandDeps
from firstmile.destinations.cli import DestinationCommandDeps
from firstmile.destinations.worker import DestinationDelivery
from firstmile.events.cli import EventCommandDeps
from firstmile.events.topics import StreamConfig
from firstmile.kit.cli import run
from firstmile.kit.db import create_engine
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from firstmile.ml.cli import ModelCommandDeps
from firstmile.ml.inference import InProcessClient
from firstmile.ml.online import StoreActivity
from firstmile.ml.stuck import ModelStuckDetector
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.onboarding.stuck import StuckScanner
from firstmile.security.cli import KeyCommandDeps as RotateCommandDeps
from firstmile.security.datakeys import DataKeyService, ManifestProviders, ProviderSource
from firstmile.security.keys import KeyConfig, ProviderRegistry
from firstmile.settings import Settings, get_settings
from firstmile.sso.cli import SsoCommandDeps
from firstmile.sso.events import KeycloakEventSync
from firstmile.sso.provisioning import KeycloakProvisioner, ProvisioningError
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.cli import KeyCommandDeps
from firstmile.tenancy.directory import TenantDirectory
from firstmile.wiring import adapters
from firstmile.wiring.embedded import DatabaseUrls, resolve_database, resolve_pepper
from firstmile.wiring.migrate import at_head, upgrade
from firstmile.wiring.workers import stream_config

SERVED_FILE = "serving"
"""``<data_dir>/run/serving``: the URL ``firstmile serve``/``dev`` listens on, for ``admin login-link``."""


class OperatorServices:
    """The platform as one command invocation sees it (see the module docstring)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._migrated = False

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    # ---------------------------------------------------------------- databases

    @cached_property
    def database_urls(self) -> DatabaseUrls:
        try:
            return resolve_database(self.settings)
        except Exception as exc:  # pgserver and URL problems surface as one clear line
            raise click.ClickException(f"database: {exc}") from exc

    def operator_database_url(self) -> str:
        """The schema owner's URL, for commands that open their own engine; the schema is checked first."""

        async def check() -> None:
            async with self.operator_engine():
                pass

        if not self._migrated:
            run(check())
        return self.database_urls.admin

    def migrate(self) -> None:
        """Apply the migrations (and, embedded, let the application role log in)."""
        migrate_database(self.settings, self.database_urls)
        self._migrated = True

    async def _ensure_migrated(self, engine: AsyncEngine) -> None:
        if self._migrated:
            return
        try:
            async with engine.connect() as conn:
                current = await at_head(conn)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
                raise click.ClickException(
                    "this command runs as the schema owner: set FIRSTMILE_DATABASE_ADMIN_URL (the role that ran "
                    "`firstmile migrate`); the application role of FIRSTMILE_DATABASE_URL may not"
                ) from exc
            raise click.ClickException(f"database: {type(exc).__name__}: {exc.orig}") from exc
        except Exception as exc:
            raise click.ClickException(f"database: cannot connect: {type(exc).__name__}: {exc}") from exc
        if current:
            self._migrated = True
            return
        if self.database_urls.embedded:
            click.echo("the embedded database is not migrated yet: migrating it first", err=True)
            await asyncio.to_thread(self.migrate)
            return
        raise click.ClickException(
            "the database is not migrated to this version of Firstmile: run `firstmile migrate` "
            "(as the schema owner, FIRSTMILE_DATABASE_ADMIN_URL) first"
        )

    @asynccontextmanager
    async def operator_engine(self) -> AsyncIterator[AsyncEngine]:
        engine = create_engine(self.database_urls.admin, pool_size=1, max_overflow=0, application_name="firstmile-cli")
        try:
            await self._ensure_migrated(engine)
            yield engine
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def app_engine(self) -> AsyncIterator[AsyncEngine]:
        """An engine of the application role (what workers run as)."""
        if self.database_urls.admin != self.database_urls.app:
            # the application role may not read alembic_version: check with the owner when one is configured
            async with self.operator_engine():
                pass  # checks (or, embedded, brings) the schema up to date first
        engine = create_engine(self.database_urls.app, pool_size=2, max_overflow=0, application_name="firstmile-cli")
        try:
            yield engine
        finally:
            await engine.dispose()

    async def operator_tenant(self, engine: AsyncEngine, name: str) -> TenantId:
        """A tenant named by slug or id (operator commands)."""
        async with engine.connect() as conn:
            found = await tenancy.find_tenant_by_slug_or_id(conn, name)
        if found is None:
            raise click.ClickException(f"no tenant {name!r}")
        return OPERATOR_CLI.tenant(found.id)

    def tenant_directory(self, engine: AsyncEngine) -> TenantDirectory:
        return adapters.tenant_directory(self.settings, engine)

    # ---------------------------------------------------------------- secrets and keys

    def api_key_pepper(self) -> bytes:
        try:
            return resolve_pepper(self.settings)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc

    def audit_signer(self, key_file: Path | None) -> AuditSigner:
        try:
            return adapters.audit_signer(self.settings, key_file)
        except (SigningKeyError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    def key_config(self) -> KeyConfig:
        return adapters.key_config(self.settings)

    @contextmanager
    def key_providers(self) -> Iterator[ProviderSource]:
        registry = ProviderRegistry(self.key_config())
        try:
            yield ManifestProviders(registry)
        finally:
            registry.close()

    # ---------------------------------------------------------------- Keycloak

    @property
    def sso_configured(self) -> bool:
        return self.settings.sso.keycloak_url is not None

    def keycloak_provisioner(self) -> KeycloakProvisioner | None:
        return adapters.keycloak_provisioner(self.settings)

    @asynccontextmanager
    async def keycloak_event_sync(self) -> AsyncIterator[KeycloakEventSync]:
        sso = self.settings.sso
        if not (sso.keycloak_url and sso.admin_user and sso.admin_password_file):
            raise click.ClickException(
                "FIRSTMILE_KEYCLOAK_URL, FIRSTMILE_KEYCLOAK_ADMIN_USER and FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE "
                "must all be set"
            )
        async with self.app_engine() as engine:
            try:
                sync = adapters.keycloak_event_sync(self.settings, engine)
            except ProvisioningError as exc:
                raise click.ClickException(str(exc)) from exc
            assert sync is not None  # the settings were checked above
            yield sync

    # ---------------------------------------------------------------- events, analytics, models

    @property
    def region(self) -> str:
        return self.settings.region

    def stream_config(self) -> StreamConfig:
        return stream_config(self.settings)

    @contextmanager
    def analytics_store(self) -> Iterator[AnalyticsStore]:
        store = adapters.open_analytics_store(self.settings)
        try:
            yield store
        finally:
            store.close()

    @asynccontextmanager
    async def dropoff_watch(self) -> AsyncIterator[DropoffWatch]:
        settings = self.settings
        analytics = AnalyticsService(
            LazyStore(lambda: adapters.open_analytics_store(settings)), settings.analytics.query_timeout_seconds
        )
        try:
            async with self.app_engine() as engine:
                yield DropoffWatch(
                    engine,
                    analytics,
                    OnboardingService(CatalogCache()),
                    adapters.dropoff_rule(settings),
                    mailer=adapters.alert_mailer(adapters.nudge_channels(settings)),
                    public_url=self.public_url(),
                    webhook_timeout_s=settings.analytics.dropoff_alert_webhook_timeout_seconds,
                )
        finally:
            analytics.close()

    @asynccontextmanager
    async def destination_delivery(self) -> AsyncIterator[DestinationDelivery]:
        settings = self.settings
        async with self.operator_engine() as engine:
            registry = ProviderRegistry(self.key_config())
            keyring = DataKeyService(
                engine,
                ManifestProviders(registry),
                ttl_seconds=0,  # a command: nothing to keep between calls
            )
            delivery = adapters.destination_delivery(settings, engine, keyring)
            try:
                yield delivery
            finally:
                await delivery.close()
                registry.close()

    def destination_rotation(self) -> timedelta:
        return timedelta(hours=self.settings.destinations.rotation_hours)

    def model_registry_uri(self) -> str:
        return adapters.registry_uri(self.settings)

    def training_ray(self) -> tuple[str | None, float]:
        models = self.settings.models
        return models.training_ray_address, models.training_ray_timeout_seconds

    @asynccontextmanager
    async def stuck_scanner(self) -> AsyncIterator[StuckScanner]:
        settings = self.settings
        guarded, _ = adapters.open_inference(settings)
        if isinstance(guarded.client, InProcessClient):
            await guarded.client.warm_up(["stuck_detector"], wait_s=60)
        features = adapters.open_feature_store(settings)
        try:
            async with self.app_engine() as engine:
                yield StuckScanner(
                    engine,
                    CatalogCache(),
                    ModelStuckDetector(guarded, timeout_s=max(2.0, settings.models.inference_timeout_ms / 1000))
                    if settings.stuck.detector == "model"
                    else None,
                    StoreActivity(features),
                    after=timedelta(hours=settings.stuck.after_hours),
                    min_idle=timedelta(hours=settings.stuck.min_idle_hours),
                )
        finally:
            await features.close()
            await guarded.close()

    # ---------------------------------------------------------------- where browsers reach this region

    def public_url(self) -> str:
        """``FIRSTMILE_PUBLIC_URL``; else the URL a running ``serve``/``dev`` recorded; else host and port."""
        settings = self.settings
        if settings.explicitly_set("public_url"):
            return settings.server.public_url
        served = served_url(settings.data_dir)
        if served is not None:
            return served
        host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
        return f"http://{host}:{settings.server.port}"


def migrate_database(settings: Settings, urls: DatabaseUrls) -> None:
    """Apply migrations; in embedded mode also let the application role log in.

    Blocking and loop-free (Alembic runs its own loop): from async code, call it in a thread.
    """
    upgrade(urls.admin, settings.database.app_role)
    if urls.embedded:

        async def login() -> None:
            engine = create_engine(urls.admin, pool_size=1, max_overflow=0, application_name="firstmile-cli")
            try:
                async with engine.begin() as conn:
                    await conn.execute(text(f"ALTER ROLE {settings.database.app_role} LOGIN"))
            finally:
                await engine.dispose()

        asyncio.run(login())


def served_url(data_dir: Path) -> str | None:
    """The URL a live ``firstmile serve``/``dev`` on this data folder listens on, if one is running."""
    path = data_dir / "run" / SERVED_FILE
    try:
        pid_text, url = path.read_text(encoding="utf-8").split("\n", 1)
        os.kill(int(pid_text), 0)
    except (OSError, ValueError):
        return None
    return url.strip() or None


def record_served_url(data_dir: Path, url: str) -> None:
    """Remember the URL this process serves on (read by :func:`served_url`)."""
    folder = data_dir / "run"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SERVED_FILE).write_text(f"{os.getpid()}\n{url}\n", encoding="utf-8")


def _conforms(services: OperatorServices) -> None:
    """Never called: mypy checks here that :class:`OperatorServices` gives every slice's commands what they need."""
    needs: tuple[
        AdminCommandDeps,
        AnalyticsCommandDeps,
        AuditCommandDeps,
        DestinationCommandDeps,
        EventCommandDeps,
        KeyCommandDeps,
        ModelCommandDeps,
        RotateCommandDeps,
        SsoCommandDeps,
        TenantCommandDeps,
    ] = (services, services, services, services, services, services, services, services, services, services)
    del needs


__all__ = ["OperatorServices", "migrate_database", "record_served_url", "served_url"]
