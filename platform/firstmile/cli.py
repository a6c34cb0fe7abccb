"""The ``firstmile`` command: serve, migrate, tenants, keys, and the slices' groups (bench, audit, models, …)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import text

from firstmile.admin.cli import admin, login_link
from firstmile.audit.cli import audit
from firstmile.kit.db import create_engine
from firstmile.kit.embedded import DatabaseUrls, resolve_database, resolve_pepper
from firstmile.ml.cli import ensure_demo_models, models, stuck
from firstmile.security.cli import rotate as rotate_key
from firstmile.settings import Settings, get_settings
from firstmile.sso.cli import sso
from firstmile.tenancy.directory import DirectoryEntry, TenantDirectory

T = TypeVar("T")


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(factory())  # type: ignore[arg-type]


def _urls(settings: Settings) -> DatabaseUrls:
    try:
        return resolve_database(settings)
    except Exception as exc:  # pgserver and URL problems surface as one clear line
        raise click.ClickException(f"database: {exc}") from exc


async def _with_admin_engine(urls: DatabaseUrls, work: Callable[[Any], Awaitable[T]]) -> T:
    engine = create_engine(urls.admin, pool_size=1, max_overflow=0, application_name="firstmile-cli")
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def migrate_database(settings: Settings, urls: DatabaseUrls) -> None:
    """Apply migrations; in embedded mode also let the application role log in."""
    from firstmile.kit.migrate import upgrade

    upgrade(urls.admin, settings.database_app_role)
    if urls.embedded:

        async def login(engine: Any) -> None:
            async with engine.begin() as conn:
                await conn.execute(text(f"ALTER ROLE {settings.database_app_role} LOGIN"))

        _run(lambda: _with_admin_engine(urls, login))


@click.group()
@click.version_option(package_name="firstmile")
def main() -> None:
    """Firstmile: adaptive onboarding for B2B SaaS."""


@main.command()
def migrate() -> None:
    """Apply database migrations (idempotent)."""
    settings = get_settings()
    urls = _urls(settings)
    migrate_database(settings, urls)
    click.echo("database is at the latest migration")


def _manifest_files(paths: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.yaml") if not p.name.startswith(".")))
        else:
            files.append(path)
    if not files:
        raise click.ClickException("no manifest files found")
    return files


@main.group()
def tenants() -> None:
    """Tenant manifests: plan, apply, schema."""


def _directory(settings: Settings, engine: Any) -> TenantDirectory:
    """The tenant directory: the global database's (schema ensured) or this region's own tenants."""
    from firstmile.tenancy.directory import PostgresTenantDirectory, RegionalTenantDirectory

    if settings.directory_url is None:
        return RegionalTenantDirectory(engine)
    return PostgresTenantDirectory.from_url(settings.directory_url.get_secret_value())


def _region_topics(settings: Settings, dry_run: bool) -> None:
    """Plan or create the region's Kafka topics (shared by its tenants); skipped without Kafka."""
    from firstmile.events.runtime import reconcile_region_topics

    if not settings.kafka_bootstrap_servers:
        click.echo("kafka: skipped (FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS unset: events are relayed in-process)")
        return
    try:
        created = reconcile_region_topics(settings, execute=not dry_run)
    except Exception as exc:  # confluent-kafka raises KafkaException or its own errors: say which
        raise click.ClickException(f"kafka: {type(exc).__name__}: {exc}") from exc
    for change in created:
        click.echo(f"kafka: {'would change' if dry_run else 'changed'}: {change}")
    if not created:
        click.echo("kafka: up to date")


def _apply(paths: tuple[Path, ...], dry_run: bool, prune: bool = False) -> None:
    from firstmile.security.datakeys import DataKeyService, ManifestProviders
    from firstmile.security.keys import KeyConfig, KeyProviderError, ProviderRegistry
    from firstmile.sso.provisioning import KeycloakProvisioner, ProvisioningError
    from firstmile.tenancy.manifest import ManifestError, load_manifest
    from firstmile.tenancy.service import TenancyError, apply_manifest, record_provisioning

    try:
        manifests = [load_manifest(f) for f in _manifest_files(paths)]
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = get_settings()
    urls = _urls(settings)
    try:
        provisioner = KeycloakProvisioner.from_settings(settings)
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from exc
    verb = "would change" if dry_run else "changed"
    # deletions only when the arguments are folders: a single file is not the whole set of tenants
    whole_set = all(path.is_dir() for path in paths)

    async def work(engine: Any) -> None:
        directory = _directory(settings, engine)
        registry = ProviderRegistry(KeyConfig.from_settings(settings))
        try:
            if not dry_run:
                await directory.ensure_schema()
            await asyncio.to_thread(_region_topics, settings, dry_run)
            # nothing cached: this process only creates keys, it encrypts nothing
            data_keys = DataKeyService(engine, ManifestProviders(registry), ttl_seconds=0)
            await reconcile_all(engine, directory, data_keys)
        finally:
            await directory.aclose()
            registry.close()

    async def reconcile_all(engine: Any, directory: TenantDirectory, data_keys: DataKeyService) -> None:
        for manifest in manifests:
            try:
                result = await apply_manifest(engine, manifest, dry_run=dry_run, data_keys=data_keys)
            except TenancyError as exc:
                raise click.ClickException(str(exc)) from exc
            except KeyProviderError as exc:
                raise click.ClickException(f"tenant {manifest.tenant.slug}: data key: {exc}") from exc
            if not result.changes:
                click.echo(f"tenant {result.slug}: up to date")
            for change in result.changes:
                click.echo(f"tenant {result.slug}: {verb}: {change}")
            if not dry_run and await directory.register(result.slug, result.tenant_id, manifest.tenant.home_region):
                click.echo(f"tenant {result.slug}: directory: home region {manifest.tenant.home_region}")
            if provisioner is None:
                continue
            reconcile = provisioner.plan if dry_run else provisioner.apply
            try:
                sso_changes = await asyncio.to_thread(reconcile, manifest)
            except ProvisioningError as exc:
                raise click.ClickException(f"tenant {result.slug}: sso: {exc}") from exc
            if not sso_changes:
                click.echo(f"tenant {result.slug}: sso: up to date")
            for sso_change in sso_changes:
                click.echo(f"tenant {result.slug}: sso: {verb}: {sso_change}")
            if not dry_run:
                await record_provisioning(engine, result.slug, [str(c) for c in sso_changes])
        if provisioner is None:
            click.echo("sso: provisioning skipped (FIRSTMILE_KEYCLOAK_URL and the Keycloak admin credentials unset)")
            return
        if not whole_set:
            return
        slugs = {m.tenant.slug for m in manifests}
        try:
            deletions = await asyncio.to_thread(provisioner.plan_prune, slugs)
            if deletions and prune and not dry_run:
                deletions = await asyncio.to_thread(provisioner.prune, slugs)
                for deletion in deletions:
                    slug = deletion.realm[len(provisioner.realm_prefix) :]
                    click.echo(f"tenant {slug}: sso: changed: {deletion}")
                    await record_provisioning(engine, slug, [str(deletion)])
                return
        except ProvisioningError as exc:
            raise click.ClickException(f"sso: {exc}") from exc
        for deletion in deletions:
            slug = deletion.realm[len(provisioner.realm_prefix) :]
            note = "would change" if dry_run else "not done without --prune"
            click.echo(f"tenant {slug}: sso: {note}: {deletion}")

    _run(lambda: _with_admin_engine(urls, work))


@tenants.command("apply")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete the Keycloak realms of tenants with no manifest (only when PATHS are folders).",
)
def tenants_apply(paths: tuple[Path, ...], prune: bool) -> None:
    """Make the platform match the manifests (files or folders of *.yaml)."""
    _apply(paths, dry_run=False, prune=prune)


@tenants.command("plan")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def tenants_plan(paths: tuple[Path, ...]) -> None:
    """Print what `tenants apply` would change, changing nothing."""
    _apply(paths, dry_run=True)


@tenants.command("directory")
def tenants_directory() -> None:
    """List the tenant directory: each tenant's home region."""
    settings = get_settings()
    urls = _urls(settings)

    async def work(engine: Any) -> list[DirectoryEntry]:
        directory = _directory(settings, engine)
        try:
            return await directory.list()
        finally:
            await directory.aclose()

    for entry in _run(lambda: _with_admin_engine(urls, work)):
        click.echo(f"{entry.slug}\t{entry.home_region}\t{entry.tenant_id}")


@tenants.command("client-secret")
@click.argument("slug")
@click.argument("client_id")
def tenants_client_secret(slug: str, client_id: str) -> None:
    """Print the secret of a tenant's machine client (read from Keycloak; Firstmile keeps no copy; audited)."""
    from firstmile.sso.provisioning import KeycloakProvisioner, ProvisioningError
    from firstmile.tenancy.service import record_secret_read

    settings = get_settings()
    try:
        provisioner = KeycloakProvisioner.from_settings(settings)
        if provisioner is None:
            raise click.ClickException("FIRSTMILE_KEYCLOAK_URL and the Keycloak admin credentials are not set")
        secret = provisioner.client_secret(slug, client_id)
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from exc

    async def audit(engine: Any) -> bool:
        return await record_secret_read(engine, slug, client_id)

    if not _run(lambda: _with_admin_engine(_urls(settings), audit)):
        raise click.ClickException(f"no tenant {slug!r} in this region's database: the read cannot be audited")
    click.echo(secret)


@tenants.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def tenants_schema(output: Path | None) -> None:
    """Print the manifest's JSON Schema."""
    import json

    from firstmile.tenancy.manifest import json_schema

    doc = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if output:
        output.write_text(doc, encoding="utf-8")
    else:
        click.echo(doc, nl=False)


@main.group()
def keys() -> None:
    """Tenant API keys: create, list, revoke."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--scope", "scopes", multiple=True, required=True, help="Scope; repeat for several.")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
def keys_create(tenant: str, scopes: tuple[str, ...], name: str) -> None:
    """Create a key; it is printed once and only its keyed hash is stored."""
    from firstmile.tenancy.service import TenancyError, create_key

    settings = get_settings()
    urls = _urls(settings)
    pepper = resolve_pepper(settings)
    try:
        created = _run(lambda: _with_admin_engine(urls, lambda e: create_key(e, pepper, tenant, list(scopes), name)))
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(created.key)
    click.echo(
        f"key id {created.key_id} for tenant {created.tenant_slug} in {created.region}, "
        f"scopes {' '.join(created.scopes)} (shown once: store it now)",
        err=True,
    )


keys.add_command(rotate_key)
main.add_command(admin)
main.add_command(audit)
main.add_command(models)
main.add_command(stuck)
main.add_command(sso)


@keys.command("list")
@click.option("--tenant", required=True)
def keys_list(tenant: str) -> None:
    """List a tenant's keys (prefix, scopes, state); never the keys themselves."""
    from firstmile.tenancy.service import TenancyError, list_keys

    urls = _urls(get_settings())
    try:
        rows = _run(lambda: _with_admin_engine(urls, lambda e: list_keys(e, tenant)))
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in rows:
        state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
        click.echo(f"{r.id}  {r.prefix}…  {r.name}  {','.join(r.scopes)}  {r.region}  {state}")


@keys.command("revoke")
@click.option("--tenant", required=True)
@click.option("--key-id", required=True, type=click.UUID)
def keys_revoke(tenant: str, key_id: uuid.UUID) -> None:
    """Revoke a key; processes stop accepting it within the key cache TTL."""
    from firstmile.tenancy.service import TenancyError, revoke_key

    urls = _urls(get_settings())
    try:
        done = _run(lambda: _with_admin_engine(urls, lambda e: revoke_key(e, tenant, key_id)))
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    if not done:
        raise click.ClickException(f"no active key {key_id} for tenant {tenant}")
    click.echo(f"revoked {key_id}")


def _export_for_workers(urls: DatabaseUrls, pepper: bytes) -> None:
    """Pass the resolved embedded database, pepper and key files to worker processes."""
    if urls.embedded:
        from firstmile.kit.embedded import secret_file
        from firstmile.security.keys import KeyConfig, LocalKekProvider

        settings = get_settings()
        if settings.audit_signing_key_file is None:
            signing = secret_file(settings.data_dir, "audit_signing_key")
            os.environ["FIRSTMILE_AUDIT_SIGNING_KEY_FILE"] = str(signing)
        if settings.kek_file is None:
            kek = KeyConfig.from_settings(settings).kek_path
            LocalKekProvider(kek, create=True)  # generated once, before workers share it
            os.environ["FIRSTMILE_KEK_FILE"] = str(kek)
    os.environ["FIRSTMILE_DATABASE_URL"] = urls.app
    os.environ["FIRSTMILE_DATABASE_ADMIN_URL"] = urls.admin
    os.environ["FIRSTMILE_API_KEY_PEPPER"] = pepper.decode("utf-8")
    get_settings.cache_clear()


def _public_url(settings: Settings, port: int) -> str:
    """FIRSTMILE_PUBLIC_URL, or the address `dev`/`serve` listens on (exported, so workers agree)."""
    if "public_url" in settings.model_fields_set:
        return settings.public_url
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{port}"
    os.environ["FIRSTMILE_PUBLIC_URL"] = url
    get_settings.cache_clear()
    return url


def _serve(host: str, port: int, workers: int) -> None:
    import tempfile

    import uvicorn

    settings = get_settings()
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import atexit
        import shutil

        metrics_dir = tempfile.mkdtemp(prefix="firstmile-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    click.echo(f"serving region {settings.region} on http://{host}:{port} with {workers} worker(s)", err=True)
    uvicorn.run(
        "firstmile.app:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


@main.command()
@click.option("--host", default=None, help="Bind address (default from FIRSTMILE_HOST).")
@click.option("--port", default=None, type=int, help="Port (default from FIRSTMILE_PORT).")
@click.option("--workers", default=None, type=int, help="Worker processes (default from FIRSTMILE_WORKERS).")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the API. Embedded mode migrates the embedded database first."""
    settings = get_settings()
    urls = _urls(settings)
    if urls.embedded:
        migrate_database(settings, urls)
    _export_for_workers(urls, resolve_pepper(settings))
    _serve(host or settings.host, port or settings.port, workers or settings.workers)


@main.command()
@click.option(
    "--manifest", default=Path("tenants/demo.yaml"), type=click.Path(exists=True, path_type=Path), show_default=True
)
@click.option("--port", default=None, type=int)
def dev(manifest: Path, port: int | None) -> None:
    """What `make run` does: migrate, apply the demo manifest, print a demo key, serve."""
    from firstmile.tenancy.keys import hash_key
    from firstmile.tenancy.manifest import load_manifest
    from firstmile.tenancy.repository import resolve_key
    from firstmile.tenancy.service import apply_manifest, create_key

    settings = get_settings()
    urls = _urls(settings)
    migrate_database(settings, urls)
    spec = load_manifest(manifest)
    pepper = resolve_pepper(settings)

    async def setup(engine: Any) -> str:
        from firstmile.security.datakeys import DataKeyService, ManifestProviders
        from firstmile.security.keys import KeyConfig, ProviderRegistry

        # like `tenants apply`: the demo tenant's data keys are made with its rows, not at its first write
        registry = ProviderRegistry(KeyConfig.from_settings(settings))
        try:
            data_keys = DataKeyService(engine, ManifestProviders(registry), ttl_seconds=0)
            result = await apply_manifest(engine, spec, data_keys=data_keys)
        finally:
            registry.close()
        for change in result.changes:
            click.echo(f"tenant {result.slug}: {change}", err=True)
        stored = settings.data_dir / "secrets" / f"{spec.tenant.slug}_api_key"
        if stored.exists():
            key = stored.read_text(encoding="utf-8").strip()
            async with engine.connect() as conn:
                resolved = await resolve_key(conn, hash_key(pepper, key))
            if resolved is not None and not resolved.revoked:
                return key
            click.echo("stored demo key is no longer valid here; creating a new one", err=True)
        created = await create_key(
            engine,
            pepper,
            spec.tenant.slug,
            ["onboarding:write", "events:write", "analytics:read", "users:admin", "audit:read"],
            "demo",
        )
        stored.write_text(created.key, encoding="utf-8")
        stored.chmod(0o600)
        return created.key

    key = _run(lambda: _with_admin_engine(urls, setup))
    _seed_demo_analytics(settings, urls, spec.tenant.slug, users=2000, only_if_empty=True)
    ensure_demo_models(settings)
    listen_port = port or settings.port
    click.echo("")
    click.echo(f"Firstmile is starting on http://{settings.host}:{listen_port}  (region {settings.region})")
    click.echo(f"Demo API key for tenant {spec.tenant.slug}: {key}")
    click.echo(
        f"Try: curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        f'-d \'{{"user_id":"u1","traits":{{"persona":"developer"}}}}\' '
        f"http://{settings.host}:{listen_port}/v1/onboarding/start"
    )
    public_url = _public_url(settings, listen_port)
    if settings.keycloak_url is None:
        click.echo(
            f"Admin UI, one-time login as owner of {spec.tenant.slug} (15 min; "
            f"`firstmile admin login-link --tenant {spec.tenant.slug}` for another): "
            f"{login_link(public_url, pepper, spec.tenant.slug)}"
        )
    click.echo("")
    sys.stdout.flush()
    _export_for_workers(urls, pepper)
    _serve(settings.host, listen_port, settings.workers)


def _seed_demo_analytics(
    settings: Settings, urls: DatabaseUrls, slug: str, *, users: int, only_if_empty: bool, seed: int = 7
) -> int:
    """Synthetic history (8 weeks of starts, completions, activations, product events) for one tenant."""
    from firstmile.analytics.factory import open_analytics_store
    from firstmile.analytics.synthetic import seed_demo
    from firstmile.kit.db import authorise_tenant
    from firstmile.onboarding.domain import PathDef
    from firstmile.onboarding.repository import current_path_definitions

    async def paths(engine: Any) -> tuple[Any, list[PathDef]]:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT id FROM tenants WHERE slug = :s"), {"s": slug})).first()
            if row is None:
                raise click.ClickException(f"no tenant {slug!r}")
            tenant_id = authorise_tenant(row[0])
            found = await current_path_definitions(conn, tenant_id)
        return tenant_id, [PathDef.from_definition(k, v, d) for k, v, d in found]

    tenant_id, defs = _run(lambda: _with_admin_engine(urls, paths))
    store = open_analytics_store(settings)
    try:
        if only_if_empty:
            held = store.query("SELECT count() AS n FROM events WHERE tenant_id = {t:UUID}", {"t": str(tenant_id)})
            if int(held[0]["n"]) > 0:
                return 0
        click.echo(f"seeding synthetic analytics for {slug}: {users} users over 8 weeks …", err=True)
        inserted = seed_demo(store, tenant_id, defs, users=users, seed=seed)
        click.echo(f"seeded {inserted} events", err=True)
        return inserted
    finally:
        store.close()


@main.group()
def analytics() -> None:
    """The analytics store."""


@analytics.command("seed")
@click.option("--tenant", default="demo", show_default=True, help="Tenant slug.")
@click.option("--users", default=2000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--seed", default=7, show_default=True, help="Random seed; the same seed adds nothing twice.")
def analytics_seed(tenant: str, users: int, seed: int) -> None:
    """Add synthetic onboarding history for a tenant (demo data; never for a real tenant)."""
    settings = get_settings()
    _seed_demo_analytics(settings, _urls(settings), tenant, users=users, only_if_empty=False, seed=seed)


@main.group()
def embedded() -> None:
    """The embedded (pgserver) database of `make run`."""


@embedded.command("stop")
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL (it keeps running between `make run`s otherwise)."""
    from firstmile.kit.embedded import stop_embedded

    settings = get_settings()
    click.echo("stopped" if stop_embedded(settings.data_dir) else "not running")


def _relay_url(settings: Settings, urls: DatabaseUrls) -> str:
    return settings.relay_database_url.get_secret_value() if settings.relay_database_url else urls.admin


@main.command()
def relay() -> None:
    """Publish the outbox to Kafka (one active relay per region; others wait as standbys)."""
    from firstmile.events.runtime import run_relay
    from firstmile.kit import telemetry
    from firstmile.security.pii import RedactingFilter

    settings = get_settings()
    telemetry.configure_logging(settings.log_level, settings.log_format, filters=[RedactingFilter()])
    urls = _urls(settings)
    try:
        published = _run(lambda: run_relay(settings, _relay_url(settings, urls)))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"relay stopped after publishing {published} events", err=True)


@main.command()
@click.argument("names", nargs=-1, type=click.Choice(["analytics", "progress", "features"]))
def consume(names: tuple[str, ...]) -> None:
    """Run consumer groups of the region's event topic (default: all three)."""
    from firstmile.events.runtime import CONSUMER_NAMES, run_consumers
    from firstmile.kit import telemetry
    from firstmile.security.pii import RedactingFilter

    settings = get_settings()
    telemetry.configure_logging(settings.log_level, settings.log_format, filters=[RedactingFilter()])
    urls = _urls(settings)
    try:
        _run(lambda: run_consumers(settings, urls.app, names or CONSUMER_NAMES))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def events() -> None:
    """The event stream: dead-letter replay."""


@events.command("replay-dlq")
@click.option("--dry-run", is_flag=True, help="List the dead letters without replaying or committing.")
def events_replay_dlq(dry_run: bool) -> None:
    """Re-publish the region's dead letters onto its events topic (consumers are idempotent)."""
    from firstmile.events.runtime import replay_dead_letters

    settings = get_settings()
    try:
        letters = replay_dead_letters(settings, dry_run=dry_run)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    for letter in letters:
        click.echo(f"{letter['event_id'] or '-'}\t{letter['consumer']}\t{letter['reason']}")
    click.echo(f"{'would replay' if dry_run else 'replayed'} {len(letters)} dead letter(s)", err=True)


@main.group()
def webhooks() -> None:
    """Inbound webhooks (Segment)."""


@webhooks.command("secret")
@click.option("--tenant", required=True, help="Tenant slug.")
def webhooks_secret(tenant: str) -> None:
    """Set a new shared secret for the tenant's Segment webhook and print it once."""
    import secrets as secrets_mod

    settings = get_settings()
    urls = _urls(settings)
    secret = secrets_mod.token_urlsafe(32)

    async def work(engine: Any) -> bool:
        async with engine.begin() as conn:
            row = (await conn.execute(text("SELECT id FROM tenants WHERE slug = :s"), {"s": tenant})).first()
            if row is None:
                return False
            await conn.execute(
                text(
                    "INSERT INTO webhook_secrets (tenant_id, source, secret) VALUES (:t, 'segment', :s)"
                    " ON CONFLICT (tenant_id, source) DO UPDATE SET secret = excluded.secret, created_at = now()"
                ),
                {"t": row[0], "s": secret},
            )
            return True

    if not _run(lambda: _with_admin_engine(urls, work)):
        raise click.ClickException(f"no tenant {tenant!r}")
    click.echo(secret)
    click.echo(
        f"Set it as the shared secret of a Segment webhook to {settings.region} …/v1/webhooks/segment/{tenant}",
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
