"""``firstmile admin``: one-time admin UI login links for the embedded mode (no Keycloak)."""

from __future__ import annotations

import click

from firstmile.admin.service import BOOTSTRAP_TTL, bootstrap_key, mint_bootstrap_token
from firstmile.settings import get_settings
from firstmile.tenancy.manifest import ADMIN_ROLES


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
    """Print a one-time admin UI login link (only without Keycloak: with SSO, admins log in through it)."""
    from firstmile.kit.embedded import resolve_pepper

    settings = get_settings()
    if settings.keycloak_url is not None:
        raise click.ClickException("FIRSTMILE_KEYCLOAK_URL is set: admins sign in through SSO at /admin/signin")
    click.echo(login_link(settings.public_url, resolve_pepper(settings), slug, role, minutes * 60.0))
