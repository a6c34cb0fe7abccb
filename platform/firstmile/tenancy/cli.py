"""``firstmile keys create|list|revoke|identity-secret``: tenant API keys (``keys rotate`` is the security slice's)."""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.cli import run, services
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import service
from firstmile.tenancy.service import CreatedKey, KeyRow, TenancyError


class KeyCommandDeps(Protocol):
    """What ``firstmile keys`` needs from the platform (the wiring provides it)."""

    def operator_engine(self) -> AbstractAsyncContextManager[AsyncEngine]:
        """An engine of the schema owner."""
        ...

    def api_key_pepper(self) -> bytes:
        """The secret API keys are stored under (HMAC)."""
        ...


async def _tenant(engine: AsyncEngine, slug: str) -> service.TenantRow:
    async with engine.connect() as conn:
        found = await service.find_tenant(conn, slug)
    if found is None:
        raise TenancyError(f"no tenant {slug!r}; apply its manifest first (firstmile tenants apply)")
    return found


async def create_key(
    engine: AsyncEngine, pepper: bytes, tenant_slug: str, scopes: list[str], name: str = "default"
) -> CreatedKey:
    """Create a key bound to the tenant and its home region (one transaction, audited); the plaintext once."""
    tenant = await _tenant(engine, tenant_slug)
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        return await service.create_key(tx, tenant, pepper, scopes, name, actor=OPERATOR_CLI.actor)


async def create_publishable_key(
    engine: AsyncEngine, pepper: bytes, tenant_slug: str, origins: list[str], name: str = "web"
) -> CreatedKey:
    """Create a publishable key for ``origins`` (one transaction, audited); the key and its identity secret once."""
    tenant = await _tenant(engine, tenant_slug)
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        return await service.create_publishable_key(tx, tenant, pepper, origins, name, actor=OPERATOR_CLI.actor)


async def revoke_key(engine: AsyncEngine, tenant_slug: str, key_id: uuid.UUID) -> bool:
    tenant = await _tenant(engine, tenant_slug)
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        return await service.revoke_key(tx, key_id, actor=OPERATOR_CLI.actor)


async def list_keys(engine: AsyncEngine, tenant_slug: str) -> list[KeyRow]:
    tenant = await _tenant(engine, tenant_slug)
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        return await service.list_keys(tx)


def _deps() -> KeyCommandDeps:
    found: KeyCommandDeps = services()
    return found


@click.group()
def keys() -> None:
    """Tenant API keys: create, list, revoke, rotate."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--scope", "scopes", multiple=True, help="Scope of a secret key; repeat for several.")
@click.option("--name", default=None, help="A label for the key.  [default: default, or web for a publishable key]")
@click.option(
    "--publishable",
    is_flag=True,
    help="A publishable fmpk_ key for the embed SDK (one user's checklist and in-app messages, from --origin only).",
)
@click.option("--origin", "origins", multiple=True, help="A web origin a publishable key may be used from; repeat.")
def keys_create(
    tenant: str, scopes: tuple[str, ...], name: str | None, publishable: bool, origins: tuple[str, ...]
) -> None:
    """Create a key; it is printed once and only its keyed hash is stored.

    A secret key (fm_, --scope …) is for servers. A publishable key (--publishable --origin https://app.example.com)
    is for the embed SDK in a web page; its identity secret, printed with it, stays on the tenant's backend,
    which signs identity tokens with it (docs/embed.md).
    """
    deps = _deps()
    if publishable and scopes:
        raise click.UsageError("a publishable key has one fixed scope (embed): leave out --scope")
    if not publishable and origins:
        raise click.UsageError("--origin is for publishable keys: add --publishable")
    if not publishable and not scopes:
        raise click.UsageError("a secret key needs at least one --scope")

    async def work() -> CreatedKey:
        async with deps.operator_engine() as engine:
            if publishable:
                return await create_publishable_key(engine, deps.api_key_pepper(), tenant, list(origins), name or "web")
            return await create_key(engine, deps.api_key_pepper(), tenant, list(scopes), name or "default")

    try:
        created = run(work())
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(created.key)
    if created.identity_secret is not None:
        click.echo(f"identity secret: {created.identity_secret}")
        click.echo(
            f"publishable key id {created.key_id} for tenant {created.tenant_slug} in {created.region}, origins "
            f"{' '.join(created.origins)}. The key goes in the page; the identity secret stays on your backend, "
            "which signs each user's identity token with it (docs/embed.md).",
            err=True,
        )
        return
    click.echo(
        f"key id {created.key_id} for tenant {created.tenant_slug} in {created.region}, "
        f"scopes {' '.join(created.scopes)} (shown once: store it now)",
        err=True,
    )


@keys.command("identity-secret")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--key-id", required=True, type=click.UUID, help="The publishable key's id (firstmile keys list).")
def keys_identity_secret(tenant: str, key_id: uuid.UUID) -> None:
    """Print a publishable key's identity secret again (it is derived from the key id and the server's pepper)."""
    deps = _deps()

    async def work() -> list[KeyRow]:
        async with deps.operator_engine() as engine:
            return await list_keys(engine, tenant)

    try:
        rows = run(work())
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    found = next((r for r in rows if r.id == key_id and r.kind == "publishable" and r.revoked_at is None), None)
    if found is None:
        raise click.ClickException(f"no active publishable key {key_id} for tenant {tenant}")
    click.echo(keylib.identity_secret(deps.api_key_pepper(), key_id))


@keys.command("list")
@click.option("--tenant", required=True)
def keys_list(tenant: str) -> None:
    """List a tenant's keys (prefix, scopes, state); never the keys themselves."""
    deps = _deps()

    async def work() -> list[KeyRow]:
        async with deps.operator_engine() as engine:
            return await list_keys(engine, tenant)

    try:
        rows = run(work())
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in rows:
        state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
        origins = f"  origins {' '.join(r.origins)}" if r.kind == "publishable" else ""
        click.echo(f"{r.id}  {r.prefix}…  {r.name}  {r.kind}  {','.join(r.scopes)}  {r.region}  {state}{origins}")


@keys.command("revoke")
@click.option("--tenant", required=True)
@click.option("--key-id", required=True, type=click.UUID)
def keys_revoke(tenant: str, key_id: uuid.UUID) -> None:
    """Revoke a key; processes stop accepting it within the key cache TTL."""
    deps = _deps()

    async def work() -> bool:
        async with deps.operator_engine() as engine:
            return await revoke_key(engine, tenant, key_id)

    try:
        done = run(work())
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    if not done:
        raise click.ClickException(f"no active key {key_id} for tenant {tenant}")
    click.echo(f"revoked {key_id}")
