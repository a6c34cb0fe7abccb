"""``firstmile sso``: SSO chores run from a scheduler or by hand."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import click

from firstmile.kit.cli import run, services
from firstmile.sso.events import EventSyncError, KeycloakEventSync


class SsoCommandDeps(Protocol):
    """What ``firstmile sso`` needs from the platform (the wiring provides it)."""

    def keycloak_event_sync(self) -> AbstractAsyncContextManager[KeycloakEventSync]:
        """The failed-login sync on the application role's engine (a ClickException without Keycloak admin)."""
        ...


@click.group()
def sso() -> None:
    """SSO: Keycloak tenant realms (docs/sso.md)."""


@sso.command("sync-events")
def sync_events() -> None:
    """Copy failed logins (Keycloak *_ERROR events) of every tenant realm into its audit log, once.

    The API process does the same every FIRSTMILE_SSO_EVENT_SYNC_SECONDS; running both is safe
    (each realm's cursor is locked while it is copied, and nothing is copied twice).
    """
    deps: SsoCommandDeps = services()

    async def once() -> int:
        async with deps.keycloak_event_sync() as sync:
            try:
                return await sync.run_once()
            except EventSyncError as exc:
                raise click.ClickException(str(exc)) from exc

    written = run(once())
    click.echo(f"sso events: {written} failed login(s) audited")
