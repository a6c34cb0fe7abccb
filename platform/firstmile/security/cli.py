"""``firstmile keys rotate --tenant X``: a new provider key version, every data key rewrapped.

Add to the ``keys`` group with ``keys.add_command(rotate)``. Runs as the schema owner
(``FIRSTMILE_DATABASE_ADMIN_URL``, or the embedded superuser), in one transaction.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click
from sqlalchemy import text

from firstmile.audit import service as audit
from firstmile.security.datakeys import ManifestProviders, rotate_tenant
from firstmile.security.keys import KeyConfig, KeyProviderError, ProviderRegistry
from firstmile.settings import Settings, get_settings


class KeyRotationError(ValueError):
    """The rotation cannot start (unknown tenant); the message says why."""


async def rotate_tenant_keys(
    admin_url: str,
    tenant_slug: str,
    settings: Settings,
    *,
    new_data_key: bool = False,
    config: KeyConfig | None = None,
) -> dict[str, Any]:
    """Rotate ``tenant_slug``'s provider key and rewrap its data keys; returns what changed.

    Field ciphertexts and per-user keys are never rewritten
    (``field_ciphertexts_reencrypted`` is always 0). ``new_data_key`` also starts a
    new tenant data key version for new writes. Raises :class:`KeyRotationError`
    or :class:`~firstmile.security.keys.KeyProviderError`; on any error nothing changes.
    """
    from firstmile.kit.db import authorise_tenant, create_engine, set_tenant

    registry = ProviderRegistry(config or KeyConfig.from_settings(settings))
    engine = create_engine(admin_url, pool_size=1, max_overflow=0, application_name="firstmile-cli")
    try:
        async with engine.connect() as conn, conn.begin():
            row = (await conn.execute(text("SELECT id FROM tenants WHERE slug = :s"), {"s": tenant_slug})).first()
            if row is None:
                raise KeyRotationError(f"no tenant {tenant_slug!r}; apply its manifest first (firstmile tenants apply)")
            tenant = authorise_tenant(row[0])
            await set_tenant(conn, tenant)
            result = await rotate_tenant(conn, tenant, ManifestProviders(registry), new_data_key=new_data_key)
            await audit.append(
                conn, tenant, "key", "operator:cli", tenant_slug, {"action": "keys.rotate", **result.as_dict()}
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
    from firstmile.kit.embedded import resolve_database

    settings = get_settings()
    try:
        admin_url = resolve_database(settings).admin
    except Exception as exc:
        raise click.ClickException(f"database: {exc}") from exc
    try:
        result = asyncio.run(rotate_tenant_keys(admin_url, tenant, settings, new_data_key=new_data_key))
    except (KeyRotationError, KeyProviderError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result, indent=2, sort_keys=True))
