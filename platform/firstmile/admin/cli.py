"""``firstmile admin``: one-time admin UI login links for the embedded mode (no Keycloak)."""

from __future__ import annotations

from typing import Protocol

import click

from firstmile.admin.service import BOOTSTRAP_TTL, bootstrap_key, mint_bootstrap_token
from firstmile.kit.cli import services
from firstmile.tenancy.manifest import ADMIN_ROLES


class AdminCommandDeps(Protocol):
    """What ``firstmile admin`` needs from the platform (the wiring provides it)."""

    @property
    def sso_configured(self) -> bool:
        """Whether a Keycloak is configured (then admins sign in through SSO, never with links)."""
        ...

    def public_url(self) -> str:
        """Where browsers reach this region.

        ``FIRSTMILE_PUBLIC_URL``, else the URL a running ``serve`` or ``dev`` recorded in ``<data_dir>/run/serving``,
        else ``FIRSTMILE_HOST`` and ``FIRSTMILE_PORT``.
        """
        ...

    def api_key_pepper(self) -> bytes:
        """This installation's secret, from which the link signing key is derived."""
        ...


def login_link(public_url: str, pepper: bytes, slug: str, role: str = "owner", ttl: float = BOOTSTRAP_TTL) -> str:
    """A one-time link to the admin UI for ``slug`` with ``role``, signed with this installation's pepper."""
    token = mint_bootstrap_token(bootstrap_key(pepper), slug, role, ttl)
    return f"{public_url.rstrip('/')}/admin/bootstrap?token={token}"


@click.group()
def admin() -> None:
    """The admin UI: login links for the embedded mode."""


@admin.command("login-link")
@click.option("--tenant", "slug", required=True, help="Tenant slug.")
@click.option("--role", type=click.Choice(ADMIN_ROLES), default="owner", show_default=True)
@click.option("--minutes", type=click.IntRange(1, 60), default=15, show_default=True, help="Validity.")
def login_link_command(slug: str, role: str, minutes: int) -> None:
    """Print a one-time admin UI login link (only without Keycloak: with SSO, admins log in through it).

    The link points at FIRSTMILE_PUBLIC_URL, else at the URL a running `firstmile serve` or `firstmile dev`
    recorded in <data_dir>/run/serving, else at FIRSTMILE_HOST and FIRSTMILE_PORT.
    """
    deps: AdminCommandDeps = services()
    if deps.sso_configured:
        raise click.ClickException("FIRSTMILE_KEYCLOAK_URL is set: admins sign in through SSO at /admin/signin")
    click.echo(login_link(deps.public_url(), deps.api_key_pepper(), slug, role, minutes * 60.0))
