"""The process-level commands: ``serve``, ``dev`` (``make run``), ``migrate``, the workers, ``embedded``.

The workers are ``relay``, ``consume``, ``scheduler`` and ``sequencer`` (:mod:`firstmile.wiring.workers`).

They start or prepare whole processes, so they live with the wiring; every other command
belongs to its slice's group and only reaches the platform through :class:`OperatorServices`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import click

from firstmile.admin.cli import login_link
from firstmile.analytics.cli import seed_tenant, tenant_paths
from firstmile.controlplane.service import apply_manifest
from firstmile.embed.demo import DemoHost
from firstmile.experiments.demo import DEMO_EXPERIMENT, seed_demo_results, start_demo_experiment
from firstmile.kit import telemetry
from firstmile.kit.cli import run, services
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.ml.cli import ensure_demo_models
from firstmile.onboarding.domain import PathDef
from firstmile.security.keys import LocalKekProvider
from firstmile.security.pii import RedactingFilter
from firstmile.settings import Settings, get_settings
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.cli import create_key, create_publishable_key
from firstmile.tenancy.manifest import load_manifest
from firstmile.wiring import adapters
from firstmile.wiring.embedded import DatabaseUrls, stop_embedded
from firstmile.wiring.operator import OperatorServices, record_served_url
from firstmile.wiring.workers import CONSUMER_NAMES, run_consumers, run_relay, run_scheduler, run_sequencer

DEMO_SCOPES = [
    "onboarding:write", "events:write", "analytics:read", "users:admin", "audit:read", "reviews:read", "reviews:write",
]  # fmt: skip


def _services() -> OperatorServices:
    found: OperatorServices = services()
    return found


@click.command()
def migrate() -> None:
    """Apply database migrations (idempotent)."""
    _services().migrate()
    click.echo("database is at the latest migration")


def check_process_model(settings: Settings, workers: int) -> None:
    """Refuse (embedded mode) or warn about (external database) workers that would silently split state.

    Without Redis, admin sessions and one-time login links live in each worker (a login made
    in one is unknown to the others, a link is redeemable once per worker); chdb opens its data
    folder in one process only. Several workers need both moved out of the process. The embedded
    mode (``make run``) refuses; with an external database (a deployment that may serve only the
    API, or a benchmark) the same is said as a warning.
    """
    if workers <= 1:
        return
    missing = []
    if settings.redis.url is None:
        missing.append("FIRSTMILE_REDIS_URL (admin sessions and one-time login links are kept per worker without it)")
    if settings.analytics.backend == "chdb":
        missing.append("FIRSTMILE_ANALYTICS_BACKEND=clickhouse (chdb opens its data folder in one process only)")
    if not missing:
        return
    message = f"{workers} workers need " + " and ".join(missing) + "; run one worker (FIRSTMILE_WORKERS=1) or set them"
    if settings.embedded:
        raise click.ClickException(message)
    click.echo(f"warning: {message}", err=True)


def _export_for_workers(settings: Settings, urls: DatabaseUrls, pepper: bytes) -> None:
    """Pass the resolved embedded database, pepper and key files to worker processes."""
    if urls.embedded:
        from firstmile.kit.secrets import secret_file

        if settings.audit.signing_key_file is None:
            os.environ["FIRSTMILE_AUDIT_SIGNING_KEY_FILE"] = str(secret_file(settings.data_dir, "audit_signing_key"))
        if settings.keys.kek_file is None:
            kek = adapters.key_config(settings).kek_path
            LocalKekProvider(kek, create=True)  # generated once, before workers share it
            os.environ["FIRSTMILE_KEK_FILE"] = str(kek)
    os.environ["FIRSTMILE_DATABASE_URL"] = urls.app
    os.environ["FIRSTMILE_DATABASE_ADMIN_URL"] = urls.admin
    os.environ["FIRSTMILE_API_KEY_PEPPER"] = pepper.decode("utf-8")
    get_settings.cache_clear()


def _public_url(settings: Settings, port: int) -> str:
    """FIRSTMILE_PUBLIC_URL, or the address `dev`/`serve` listens on (exported, so workers agree)."""
    if settings.explicitly_set("public_url"):
        return settings.server.public_url
    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
    url = f"http://{host}:{port}"
    os.environ["FIRSTMILE_PUBLIC_URL"] = url
    get_settings.cache_clear()
    return url


def _serve(settings: Settings, host: str, port: int, workers: int) -> None:
    import uvicorn

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import atexit
        import shutil

        metrics_dir = tempfile.mkdtemp(prefix="firstmile-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    record_served_url(settings.data_dir, _public_url(settings, port))
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


@click.command()
@click.option("--host", default=None, help="Bind address (default from FIRSTMILE_HOST).")
@click.option("--port", default=None, type=int, help="Port (default from FIRSTMILE_PORT).")
@click.option("--workers", default=None, type=int, help="Worker processes (default from FIRSTMILE_WORKERS).")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the API. Embedded mode migrates the embedded database first."""
    ops = _services()
    settings = ops.settings
    count = workers or settings.server.workers
    check_process_model(settings, count)
    urls = ops.database_urls
    if urls.embedded:
        ops.migrate()
    _export_for_workers(settings, urls, ops.api_key_pepper())
    _serve(get_settings(), host or settings.server.host, port or settings.server.port, count)


async def _demo_key(ops: OperatorServices, manifest_path: Path) -> tuple[str, str]:
    """Apply the demo manifest (with its data keys) and return (tenant slug, a valid demo API key)."""
    spec = load_manifest(manifest_path)
    settings = ops.settings
    pepper = ops.api_key_pepper()
    async with ops.operator_engine() as engine:
        # like `tenants apply`: the demo tenant's data keys are made with its rows, not at its first write
        with ops.key_providers() as providers:
            result = await apply_manifest(engine, spec, key_providers=providers, ui_edits="keep")
        for change in result.changes:
            click.echo(f"tenant {result.slug}: {change}", err=True)
        stored = settings.data_dir / "secrets" / f"{spec.tenant.slug}_api_key"
        if stored.exists():
            key = stored.read_text(encoding="utf-8").strip()
            async with engine.connect() as conn:
                resolved = await tenancy.resolve_key(conn, keylib.hash_key(pepper, key))
            if resolved is not None and not resolved.revoked:
                return spec.tenant.slug, key
            click.echo("stored demo key is no longer valid here; creating a new one", err=True)
        created = await create_key(engine, pepper, spec.tenant.slug, DEMO_SCOPES, "demo")
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(created.key, encoding="utf-8")
        stored.chmod(0o600)
        return spec.tenant.slug, created.key


async def _demo_publishable_key(ops: OperatorServices, slug: str, origins: list[str]) -> tuple[str, str]:
    """A publishable key of the demo tenant for the demo host's ``origins``, kept between runs; (key, secret)."""
    pepper = ops.api_key_pepper()
    stored = ops.settings.data_dir / "secrets" / f"{slug}_publishable_key"
    async with ops.operator_engine() as engine:
        if stored.exists():
            key = stored.read_text(encoding="utf-8").strip()
            async with engine.connect() as conn:
                resolved = await tenancy.resolve_key(conn, keylib.hash_key(pepper, key))
            if resolved is not None and not resolved.revoked and set(origins) <= set(resolved.origins):
                return key, keylib.identity_secret(pepper, resolved.key_id)
        created = await create_publishable_key(engine, pepper, slug, origins, "demo-host")
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(created.key, encoding="utf-8")
    stored.chmod(0o600)
    assert created.identity_secret is not None
    return created.key, created.identity_secret


def _demo_host(ops: OperatorServices, slug: str, key: str, api_url: str, port: int) -> DemoHost | None:
    """The embed SDK's demo host page on ``port`` (docs/embed.md), or None if the port is taken."""
    origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    publishable, secret = run(_demo_publishable_key(ops, slug, origins))
    try:
        return DemoHost(api_url, key, publishable, secret, port=port).start()
    except OSError as exc:
        click.echo(f"embed demo host page not started: port {port}: {exc}", err=True)
        return None


OPERATOR_DEMO = OperatorContext("operator:demo")


@click.command()
@click.option(
    "--manifest", default=Path("tenants/demo.yaml"), type=click.Path(exists=True, path_type=Path), show_default=True
)
@click.option("--port", default=None, type=int)
@click.option(
    "--demo-host-port",
    default=None,
    type=int,
    help="Port of the embed SDK's demo host page (default: the API's port + 1; 0: no demo host).",
)
def dev(manifest: Path, port: int | None, demo_host_port: int | None) -> None:
    """What `make run` does: migrate, apply the demo manifest, print a demo key, serve (and the embed demo page)."""
    ops = _services()
    settings = ops.settings
    check_process_model(settings, settings.server.workers)
    ops.migrate()
    slug, key = run(_demo_key(ops, manifest))

    tenant_id, defs = run(_tenant_paths(ops, slug))
    began = run(_demo_experiment(ops, tenant_id))
    with ops.analytics_store() as store:
        seed_tenant(store, tenant_id, defs, slug, users=2000, only_if_empty=True)
        if began is not None:  # just started: its synthetic results, so its result page has a verdict
            seed_demo_results(store, tenant_id, began)
            click.echo(f"demo experiment {DEMO_EXPERIMENT}: running, with synthetic results", err=True)
    ensure_demo_models(ops.model_registry_uri())
    listen_port = port or settings.server.port
    host = settings.server.host
    click.echo("")
    click.echo(f"Firstmile is starting on http://{host}:{listen_port}  (region {settings.region})")
    click.echo(f"Demo API key for tenant {slug}: {key}")
    click.echo(
        f"Try: curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        f'-d \'{{"user_id":"u1","traits":{{"persona":"developer"}}}}\' '
        f"http://{host}:{listen_port}/v1/onboarding/start"
    )
    public_url = _public_url(settings, listen_port)
    if settings.sso.keycloak_url is None:
        click.echo(
            f"Admin UI, one-time login as owner of {slug} (15 min; "
            f"`firstmile admin login-link --tenant {slug}` for another): "
            f"{login_link(public_url, ops.api_key_pepper(), slug)}"
        )
    host_port = listen_port + 1 if demo_host_port is None else demo_host_port
    if host_port:
        demo_host = _demo_host(ops, slug, key, f"http://127.0.0.1:{listen_port}", host_port)
        if demo_host is not None:
            click.echo(f"Embed SDK demo (a tenant's page with the live checklist of demo-user): {demo_host.url}/")
    click.echo("")
    sys.stdout.flush()
    _export_for_workers(settings, ops.database_urls, ops.api_key_pepper())
    _serve(get_settings(), host, listen_port, settings.server.workers)


async def _demo_experiment(ops: OperatorServices, tenant_id: TenantId) -> datetime | None:
    """Start the demo tenant's demo experiment (docs/experiments.md); None when it exists already."""
    async with ops.operator_engine() as engine, tenant_transaction(engine, OPERATOR_DEMO.tenant(tenant_id)) as tx:
        return await start_demo_experiment(tx, datetime.now(UTC))


async def _tenant_paths(ops: OperatorServices, slug: str) -> tuple[TenantId, list[PathDef]]:
    async with ops.operator_engine() as engine:
        return await tenant_paths(engine, slug)


@click.group()
def embedded() -> None:
    """The embedded (pgserver) database of `make run`."""


@embedded.command("stop")
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL (it keeps running between `make run`s otherwise)."""
    click.echo("stopped" if stop_embedded(_services().settings.data_dir) else "not running")


def _relay_url(ops: OperatorServices) -> str:
    relay = ops.settings.events.relay_database_url
    return relay.get_secret_value() if relay is not None else ops.database_urls.admin


@click.command()
def relay() -> None:
    """Publish the outbox to Kafka (one active relay per region; others wait as standbys)."""
    ops = _services()
    settings = ops.settings
    telemetry.configure_logging(
        settings.telemetry.log_level, settings.telemetry.log_format, filters=[RedactingFilter()]
    )
    try:
        published = run(run_relay(settings, _relay_url(ops)))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"relay stopped after publishing {published} events", err=True)


@click.command()
@click.argument("names", nargs=-1, type=click.Choice(list(CONSUMER_NAMES)))
def consume(names: tuple[str, ...]) -> None:
    """Run consumer groups of the region's event topic (default: all three)."""
    ops = _services()
    settings = ops.settings
    telemetry.configure_logging(
        settings.telemetry.log_level, settings.telemetry.log_format, filters=[RedactingFilter()]
    )
    try:
        run(run_consumers(settings, ops.database_urls.app, names or CONSUMER_NAMES))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
def scheduler() -> None:
    """Run the periodic tasks (stuck scan, Keycloak event sync) without the API.

    For deployments whose API processes set FIRSTMILE_IN_PROCESS_SCHEDULERS=false (the Helm chart).
    More than one may run. Serves /health/live, /health/ready and /metrics on FIRSTMILE_PROBE_PORT.
    """
    ops = _services()
    settings = ops.settings
    telemetry.configure_logging(
        settings.telemetry.log_level, settings.telemetry.log_format, filters=[RedactingFilter()]
    )
    try:
        run(run_scheduler(settings, ops.database_urls.app, ops.api_key_pepper()))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("scheduler stopped", err=True)


@click.command()
def sequencer() -> None:
    """Sequence the audit log's queue into each tenant's chain and sign checkpoints, without the API.

    For deployments whose API processes set FIRSTMILE_IN_PROCESS_SEQUENCER=false (the Helm chart).
    More than one may run (each tenant is sequenced by one at a time). Serves /health/live,
    /health/ready and /metrics on FIRSTMILE_PROBE_PORT.
    """
    ops = _services()
    settings = ops.settings
    telemetry.configure_logging(
        settings.telemetry.log_level, settings.telemetry.log_format, filters=[RedactingFilter()]
    )
    try:
        run(run_sequencer(settings, ops.database_urls.app))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("sequencer stopped", err=True)


__all__ = [
    "check_process_model", "consume", "dev", "embedded", "migrate", "relay", "scheduler", "sequencer", "serve",
]  # fmt: skip
