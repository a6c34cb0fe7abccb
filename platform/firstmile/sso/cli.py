"""``firstmile sso``: SSO chores run from a scheduler or by hand."""

from __future__ import annotations

import asyncio

import click

from firstmile.settings import get_settings


@click.group()
def sso() -> None:
    """SSO: Keycloak tenant realms (docs/sso.md)."""


@sso.command("sync-events")
def sync_events() -> None:
    """Copy failed logins (Keycloak *_ERROR events) of every tenant realm into its audit log, once.

    The API process does the same every FIRSTMILE_SSO_EVENT_SYNC_SECONDS; running both is safe
    (each realm's cursor is locked while it is copied, and nothing is copied twice).
    """
    from firstmile.cli import _urls
    from firstmile.kit.db import create_engine
    from firstmile.sso.events import EventSyncError, KeycloakEventSync
    from firstmile.sso.provisioning import ProvisioningError

    settings = get_settings()
    if not (settings.keycloak_url and settings.keycloak_admin_user and settings.keycloak_admin_password_file):
        raise click.ClickException(
            "FIRSTMILE_KEYCLOAK_URL, FIRSTMILE_KEYCLOAK_ADMIN_USER and FIRSTMILE_KEYCLOAK_ADMIN_PASSWORD_FILE "
            "must all be set"
        )

    async def run() -> int:
        engine = create_engine(_urls(settings).app, pool_size=1, max_overflow=0, application_name="firstmile-sso")
        try:
            try:
                sync = KeycloakEventSync.from_settings(settings, engine)
            except ProvisioningError as exc:
                raise click.ClickException(str(exc)) from exc
            assert sync is not None  # the settings were checked above
            try:
                return await sync.run_once()
            except EventSyncError as exc:
                raise click.ClickException(str(exc)) from exc
        finally:
            await engine.dispose()

    written = asyncio.run(run())
    click.echo(f"sso events: {written} failed login(s) audited")
