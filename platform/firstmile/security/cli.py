"""``firstmile keys rotate --tenant X``: a new provider key version, every data key rewrapped.

The root command adds it to the ``keys`` group. Runs as the schema owner
(``FIRSTMILE_DATABASE_ADMIN_URL``, or the embedded superuser); see
:func:`firstmile.security.datakeys.rotate_tenant` for how it keeps provider calls out of
the database transaction and still changes all keys or none.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import click

from firstmile.kit.cli import run, services
from firstmile.kit.db import create_engine
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.security.datakeys import ManifestProviders, rotate_tenant
from firstmile.security.keys import KeyConfig, KeyProviderError, ProviderRegistry
from firstmile.tenancy import service as tenancy


class KeyRotationError(ValueError):
    """The rotation cannot start (unknown tenant); the message says why."""


class KeyCommandDeps(Protocol):
    """What ``firstmile keys rotate`` needs from the platform (the wiring provides it)."""

    def operator_database_url(self) -> str:
        """The schema owner's URL (a ClickException when the database cannot be resolved)."""
        ...

    def key_config(self) -> KeyConfig:
        """The platform's key-provider settings."""
        ...


async def rotate_tenant_keys(
    admin_url: str, tenant_slug: str, config: KeyConfig, *, new_data_key: bool = False
) -> dict[str, Any]:
    """Rotate ``tenant_slug``'s provider key and rewrap its data keys; returns what changed.

    Field ciphertexts and per-user keys are never rewritten
    (``field_ciphertexts_reencrypted`` is always 0). ``new_data_key`` also starts a
    new tenant data key version for new writes. Raises :class:`KeyRotationError`
    or :class:`~firstmile.security.keys.KeyProviderError`; on any error nothing changes.
    """
    registry = ProviderRegistry(config)
    engine = create_engine(admin_url, pool_size=1, max_overflow=0, application_name="firstmile-cli")
    try:
        async with engine.connect() as conn:
            found = await tenancy.find_tenant(conn, tenant_slug)
        if found is None:
            raise KeyRotationError(f"no tenant {tenant_slug!r}; apply its manifest first (firstmile tenants apply)")
        result = await rotate_tenant(
            engine,
            OPERATOR_CLI.tenant(found.id),
            ManifestProviders(registry),
            new_data_key=new_data_key,
            actor=OPERATOR_CLI.actor,
            subject=tenant_slug,
        )
    finally:
        await engine.dispose()
        registry.close()
    return {"tenant": tenant_slug, **result.as_dict()}


@click.command("rotate")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option(
    "--new-data-key",
    is_flag=True,
    help="Also start a new tenant data key version for new writes (old versions stay readable).",
)
def rotate(tenant: str, new_data_key: bool) -> None:
    """Rotate a tenant's key-encryption key and rewrap its data keys (no data is re-encrypted)."""
    deps: KeyCommandDeps = services()
    admin_url = deps.operator_database_url()
    try:
        result = run(rotate_tenant_keys(admin_url, tenant, deps.key_config(), new_data_key=new_data_key))
    except (KeyRotationError, KeyProviderError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2, sort_keys=True))
