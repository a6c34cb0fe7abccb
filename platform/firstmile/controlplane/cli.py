"""``firstmile tenants plan|apply|directory|client-secret|schema``: the control plane at the command line."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path
from typing import Protocol

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import (
    UiEdits,
    apply_manifest,
    export_manifest,
    record_provisioning,
    record_secret_read,
)
from firstmile.events.topics import StreamConfig, reconcile_region_topics
from firstmile.kit.cli import run, services
from firstmile.security.datakeys import ProviderSource
from firstmile.security.keys import KeyProviderError
from firstmile.sso.provisioning import KeycloakProvisioner, ProvisioningError
from firstmile.tenancy.directory import DirectoryEntry, TenantDirectory
from firstmile.tenancy.manifest import ManifestError, TenantManifest, json_schema, load_manifest
from firstmile.tenancy.service import TenancyError


class TenantCommandDeps(Protocol):
    """What ``firstmile tenants`` needs from the platform (the wiring provides it)."""

    def operator_engine(self) -> AbstractAsyncContextManager[AsyncEngine]:
        """An engine of the schema owner."""
        ...

    def tenant_directory(self, engine: AsyncEngine) -> TenantDirectory:
        """The global directory (``FIRSTMILE_DIRECTORY_URL``), else this region's own tenants."""
        ...

    def key_providers(self) -> AbstractContextManager[ProviderSource]:
        """Each tenant's key provider (its manifest's, else the platform's), closed afterwards."""
        ...

    def keycloak_provisioner(self) -> KeycloakProvisioner | None:
        """The SSO provisioner, or None without Keycloak admin credentials (a ClickException if misconfigured)."""
        ...

    def stream_config(self) -> StreamConfig:
        """The region's Kafka settings (``bootstrap_servers`` None in embedded mode)."""
        ...


def _deps() -> TenantCommandDeps:
    found: TenantCommandDeps = services()
    return found


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


@click.group()
def tenants() -> None:
    """Tenant manifests: plan, apply, schema."""


def _region_topics(config: StreamConfig, dry_run: bool) -> None:
    """Plan or create the region's Kafka topics (shared by its tenants); skipped without Kafka."""
    if not config.bootstrap_servers:
        click.echo("kafka: skipped (FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS unset: events are relayed in-process)")
        return
    try:
        created = reconcile_region_topics(config, execute=not dry_run)
    except Exception as exc:  # confluent-kafka raises KafkaException or its own errors: say which
        raise click.ClickException(f"kafka: {type(exc).__name__}: {exc}") from exc
    for change in created:
        click.echo(f"kafka: {'would change' if dry_run else 'changed'}: {change}")
    if not created:
        click.echo("kafka: up to date")


def _apply(paths: tuple[Path, ...], dry_run: bool, prune: bool = False, ui_edits: UiEdits = "refuse") -> None:
    try:
        manifests = [load_manifest(f) for f in _manifest_files(paths)]
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from exc
    deps = _deps()
    try:
        provisioner = deps.keycloak_provisioner()
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from exc
    # deletions only when the arguments are folders: a single file is not the whole set of tenants
    whole_set = all(path.is_dir() for path in paths)

    async def work() -> None:
        async with deps.operator_engine() as engine:
            directory = deps.tenant_directory(engine)
            try:
                with deps.key_providers() as providers:
                    if not dry_run:
                        await directory.ensure_schema()
                    await asyncio.to_thread(_region_topics, deps.stream_config(), dry_run)
                    await _reconcile_all(engine, directory, providers, provisioner, manifests, dry_run=dry_run,
                                         ui_edits=ui_edits)  # fmt: skip
                    if provisioner is not None and whole_set:
                        await _prune(engine, provisioner, {m.tenant.slug for m in manifests}, dry_run, prune)
            finally:
                await directory.aclose()

    run(work())


async def _reconcile_all(
    engine: AsyncEngine,
    directory: TenantDirectory,
    providers: ProviderSource,
    provisioner: KeycloakProvisioner | None,
    manifests: list[TenantManifest],
    *,
    dry_run: bool,
    ui_edits: UiEdits = "refuse",
) -> None:
    verb = "would change" if dry_run else "changed"
    for manifest in manifests:
        try:
            result = await apply_manifest(engine, manifest, dry_run=dry_run, key_providers=providers, ui_edits=ui_edits)
        except TenancyError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyProviderError as exc:
            raise click.ClickException(f"tenant {manifest.tenant.slug}: data key: {exc}") from exc
        if not result.changes:
            click.echo(f"tenant {result.slug}: up to date")
        for change in result.changes:
            click.echo(f"tenant {result.slug}: {verb}: {change}")
        for note in result.notes:
            click.echo(f"tenant {result.slug}: note: {note}")
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


async def _prune(
    engine: AsyncEngine, provisioner: KeycloakProvisioner, slugs: set[str], dry_run: bool, prune: bool
) -> None:
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


@tenants.command("apply")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete the Keycloak realms of tenants with no manifest (only when PATHS are folders).",
)
@click.option(
    "--overwrite-ui-edits",
    is_flag=True,
    help="Replace paths edited in the admin UI with the manifest's (refused without it; `tenants export` first).",
)
def tenants_apply(paths: tuple[Path, ...], prune: bool, overwrite_ui_edits: bool) -> None:
    """Make the platform match the manifests (files or folders of *.yaml)."""
    _apply(paths, dry_run=False, prune=prune, ui_edits="overwrite" if overwrite_ui_edits else "refuse")


@tenants.command("export")
@click.argument("slug")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here (default: stdout).")
def tenants_export(slug: str, output: Path | None) -> None:
    """Write the tenant's manifest with its current paths (the admin UI's edits included) as YAML."""
    deps = _deps()

    async def work() -> str:
        async with deps.operator_engine() as engine:
            try:
                return await export_manifest(engine, slug)
            except TenancyError as exc:
                raise click.ClickException(str(exc)) from exc

    text = run(work())
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"tenant {slug}: manifest written to {output}", err=True)


@tenants.command("plan")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def tenants_plan(paths: tuple[Path, ...]) -> None:
    """Print what `tenants apply` would change, changing nothing."""
    _apply(paths, dry_run=True)


@tenants.command("directory")
def tenants_directory() -> None:
    """List the tenant directory: each tenant's home region."""
    deps = _deps()

    async def work() -> list[DirectoryEntry]:
        async with deps.operator_engine() as engine:
            directory = deps.tenant_directory(engine)
            try:
                return await directory.list()
            finally:
                await directory.aclose()

    for entry in run(work()):
        click.echo(f"{entry.slug}\t{entry.home_region}\t{entry.tenant_id}")


@tenants.command("client-secret")
@click.argument("slug")
@click.argument("client_id")
def tenants_client_secret(slug: str, client_id: str) -> None:
    """Print the secret of a tenant's machine client (read from Keycloak; Firstmile keeps no copy; audited)."""
    deps = _deps()
    try:
        provisioner = deps.keycloak_provisioner()
        if provisioner is None:
            raise click.ClickException("FIRSTMILE_KEYCLOAK_URL and the Keycloak admin credentials are not set")
        secret = provisioner.client_secret(slug, client_id)
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from exc

    async def audit() -> bool:
        async with deps.operator_engine() as engine:
            return await record_secret_read(engine, slug, client_id)

    if not run(audit()):
        raise click.ClickException(f"no tenant {slug!r} in this region's database: the read cannot be audited")
    click.echo(secret)


@tenants.command("schema")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write to this file instead of stdout.")
def tenants_schema(output: Path | None) -> None:
    """Print the manifest's JSON Schema."""
    doc = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if output:
        output.write_text(doc, encoding="utf-8")
    else:
        click.echo(doc, nl=False)
