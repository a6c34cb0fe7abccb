"""``firstmile events replay-dlq`` and ``firstmile webhooks secret``: the event path's operator commands.

``firstmile relay`` and ``firstmile consume`` are assembled by the wiring
(:mod:`firstmile.wiring.workers`), since their consumers come from several slices.
"""

from __future__ import annotations

import secrets as secrets_mod
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import click
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.events.topics import StreamConfig, replay_dead_letters
from firstmile.kit.cli import run, services
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.tenancy import service as tenancy

_SET_SECRET = text(
    "INSERT INTO webhook_secrets (tenant_id, source, secret) VALUES (:t, 'segment', :s)"
    " ON CONFLICT (tenant_id, source) DO UPDATE SET secret = excluded.secret, created_at = now()"
)


class EventCommandDeps(Protocol):
    """What the event commands need from the platform (the wiring provides it)."""

    def stream_config(self) -> StreamConfig:
        """The region's Kafka settings."""
        ...

    def operator_engine(self) -> AbstractAsyncContextManager[AsyncEngine]:
        """An engine of the schema owner."""
        ...

    @property
    def region(self) -> str: ...


@click.group()
def events() -> None:
    """The event stream: dead-letter replay."""


@events.command("replay-dlq")
@click.option("--dry-run", is_flag=True, help="List the dead letters without replaying or committing.")
def events_replay_dlq(dry_run: bool) -> None:
    """Re-publish the region's dead letters onto its events topic (consumers are idempotent)."""
    deps: EventCommandDeps = services()
    try:
        letters = replay_dead_letters(deps.stream_config(), dry_run=dry_run)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    for letter in letters:
        click.echo(f"{letter['event_id'] or '-'}\t{letter['consumer']}\t{letter['reason']}")
    click.echo(f"{'would replay' if dry_run else 'replayed'} {len(letters)} dead letter(s)", err=True)


@click.group()
def webhooks() -> None:
    """Inbound webhooks (Segment)."""


async def set_webhook_secret(engine: AsyncEngine, slug: str, secret: str) -> bool:
    """Store ``secret`` as the tenant's Segment webhook secret; False when there is no such tenant.

    The change is audited in the same transaction (``admin`` entry, action ``webhooks.secret``; never the secret).
    """
    async with engine.connect() as conn:
        found = await tenancy.find_tenant(conn, slug)
    if found is None:
        return False
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(found.id)) as tx:
        await tx.execute(_SET_SECRET, {"t": tx.tenant, "s": secret})
        await audit.append(tx, "admin", OPERATOR_CLI.actor, "webhook:segment", {"action": "webhooks.secret"})
    return True


@webhooks.command("secret")
@click.option("--tenant", required=True, help="Tenant slug.")
def webhooks_secret(tenant: str) -> None:
    """Set a new shared secret for the tenant's Segment webhook and print it once (audited)."""
    deps: EventCommandDeps = services()
    secret = secrets_mod.token_urlsafe(32)

    async def work() -> bool:
        async with deps.operator_engine() as engine:
            return await set_webhook_secret(engine, tenant, secret)

    if not run(work()):
        raise click.ClickException(f"no tenant {tenant!r}")
    click.echo(secret)
    click.echo(
        f"Set it as the shared secret of a Segment webhook to {deps.region} …/v1/webhooks/segment/{tenant}",
        err=True,
    )
