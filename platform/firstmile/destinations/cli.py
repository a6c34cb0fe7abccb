"""``firstmile destinations``: credentials, status, a test event, replay of dead letters, enable and disable.

Every command names the tenant (``--tenant``, slug or id) and, but ``status``, the destination (``--name``, as the
manifest's ``destinations:`` section has it). Runs as the schema owner, like ``tenants apply``; each change is
audited. A secret never travels on the command line: ``credentials set`` reads it from standard input (a prompt
without echo on a terminal) or from the environment variable ``--from-env`` names.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.destinations import service
from firstmile.destinations.policy import CREDENTIAL_FIELDS, new_webhook_secret
from firstmile.destinations.worker import DestinationDelivery, ProbeAnswer
from firstmile.kit.cli import run, services
from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.security.datakeys import TenantKeys
from firstmile.security.keys import KeyProviderError


class DestinationCommandDeps(Protocol):
    """What ``firstmile destinations`` needs from the platform (the wiring provides it)."""

    def destination_delivery(self) -> AbstractAsyncContextManager[DestinationDelivery]:
        """The delivery worker on the schema owner's engine, with the tenants' key providers (closed afterwards)."""
        ...

    async def operator_tenant(self, engine: AsyncEngine, name: str) -> TenantId:
        """A tenant named by slug or id (a ClickException when there is none)."""
        ...

    def destination_rotation(self) -> timedelta:
        """How long a rotated credential stays valid (``FIRSTMILE_DESTINATION_ROTATION_HOURS``)."""
        ...


def _deps() -> DestinationCommandDeps:
    found: DestinationCommandDeps = services()
    return found


TENANT = click.option("--tenant", "tenant_name", required=True, help="The tenant (slug or id).")
NAME = click.option("--name", required=True, help="The destination's name in the manifest's destinations section.")


@click.group()
def destinations() -> None:
    """Destinations: the tenants' lifecycle events out to Segment, Mixpanel, Amplitude, Intercom and webhooks."""


@destinations.group("credentials")
def credentials() -> None:
    """A destination's credentials, stored encrypted with the tenant's data key."""


def _secret(from_env: str | None, field: str) -> str:
    if from_env is not None:
        value = os.environ.get(from_env, "")
        if not value.strip():
            raise click.ClickException(f"the environment variable {from_env} is not set (or empty)")
        return value.strip()
    if sys.stdin.isatty():
        return str(click.prompt(f"{field}", hide_input=True)).strip()
    value = sys.stdin.read().strip()
    if not value:
        raise click.ClickException(f"no {field} on standard input (pipe it in, or use --from-env)")
    return value


@credentials.command("set")
@TENANT
@NAME
@click.option("--field", help="Which credential field (default: the kind's main one: write_key, project_token, "
              "api_key, access_token or secret).")  # fmt: skip
@click.option("--from-env", metavar="VAR", help="Read the value from this environment variable (else stdin).")
@click.option("--rotate", is_flag=True, help="Keep the replaced credentials valid for a while (a webhook signs with "
              "both secrets: FIRSTMILE_DESTINATION_ROTATION_HOURS).")  # fmt: skip
@click.option("--generate", is_flag=True, help="A webhook: generate a new signing secret and print it once.")
def credentials_set(
    tenant_name: str, name: str, field: str | None, from_env: str | None, rotate: bool, generate: bool
) -> None:
    """Set a destination's credential from stdin or --from-env (never from the command line); audited."""
    deps = _deps()

    async def work() -> tuple[service.CredentialsSet, str | None]:
        async with deps.destination_delivery() as delivery:
            tenant = await deps.operator_tenant(delivery.engine, tenant_name)
            uow = UnitOfWork(delivery.engine, tenant)
            spec = (await uow.run(service.tenant_destinations)).specs.get(name)
            if spec is None:
                raise click.ClickException(
                    f"tenant {tenant_name} has no destination {name!r} in its applied manifest: add it to the "
                    "destinations section and run `firstmile tenants apply` first"
                )
            fields = CREDENTIAL_FIELDS[spec.kind]
            chosen = field or fields[0]
            if chosen not in fields:
                raise click.ClickException(f"a {spec.kind} destination's credential fields are {', '.join(fields)}")
            generated = None
            if generate:
                if spec.kind != "webhook" or chosen != "secret":
                    raise click.ClickException("--generate makes a webhook signing secret only")
                generated = value = new_webhook_secret()
            else:
                value = _secret(from_env, chosen)

            async def store(tx: TenantTx, keys: TenantKeys) -> service.CredentialsSet:
                return await service.set_credentials(
                    tx, keys, name, {chosen: value}, actor=OPERATOR_CLI.actor, rotate=rotate,
                    rotation=deps.destination_rotation(),
                )  # fmt: skip

            try:
                return await delivery.keyring.run_with_keys(uow, store), generated
            except service.DestinationError as exc:
                raise click.ClickException(str(exc)) from exc
            except KeyProviderError as exc:
                raise click.ClickException(f"tenant {tenant_name}: data key: {exc}") from exc

    stored, generated = run(work())
    note = f"; the previous ones stay valid until {stored.previous_until.isoformat()}" if stored.previous_until else ""
    click.echo(f"destination {name}: credentials set ({', '.join(stored.fields)}; version {stored.version}){note}",
               err=True)  # fmt: skip
    if generated is not None:
        click.echo(generated)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _as_json(found: service.DestinationStatus) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "name": found.name, "kind": found.kind, "enabled": found.enabled, "delivering": found.delivering,
        "disabled_at": iso(found.disabled_at), "disabled_reason": found.disabled_reason,
        "credentials_version": found.credentials_version, "pending": found.pending, "due": found.due,
        "dead": found.dead, "delivered": found.delivered, "oldest_pending_age_seconds": found.oldest_pending_age_s,
        "failing_since": iso(found.failing_since), "last_error": found.last_error,
        "last_error_at": iso(found.last_error_at), "last_success_at": iso(found.last_success_at),
        "dead_letters": [
            {"event_id": str(d.event_id), "kind": d.kind, "name": d.name, "status": d.status, "attempts": d.attempts,
             "error": d.error, "at": iso(d.at)}
            for d in found.dead_letters
        ],
    }  # fmt: skip


@destinations.command("status")
@TENANT
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def destinations_status(tenant_name: str, as_json: bool) -> None:
    """Each destination: enabled, pending, dead, the oldest pending event's age, the last error."""
    deps = _deps()

    async def work() -> list[service.DestinationStatus]:
        async with deps.destination_delivery() as delivery:
            tenant = await deps.operator_tenant(delivery.engine, tenant_name)
            return await UnitOfWork(delivery.engine, tenant).run(service.status)

    found = run(work())
    if as_json:
        click.echo(json.dumps([_as_json(f) for f in found], indent=2))
        return
    if not found:
        click.echo(f"tenant {tenant_name}: no destinations in its manifest")
        return
    click.echo("name\tkind\tstate\tpending\tdead\toldest\tlast error")
    for f in found:
        state = (
            "disabled (manifest)" if not f.enabled else "disabled" if f.disabled_at is not None
            else "no credentials" if f.credentials_version is None else "failing" if f.failing_since is not None
            else "ok"
        )  # fmt: skip
        error = f"{f.last_error} ({f.last_error_at.isoformat(timespec='seconds')})" if f.last_error and \
            f.last_error_at else "-"  # fmt: skip
        click.echo(f"{f.name}\t{f.kind}\t{state}\t{f.pending}\t{f.dead}\t{_age(f.oldest_pending_age_s)}\t{error}")


@destinations.command("test")
@TENANT
@NAME
def destinations_test(tenant_name: str, name: str) -> None:
    """Send one test event to a destination now and print its answer (exit 1 unless it was delivered)."""
    deps = _deps()

    async def work() -> ProbeAnswer:
        async with deps.destination_delivery() as delivery:
            tenant = await deps.operator_tenant(delivery.engine, tenant_name)
            try:
                return await delivery.test(tenant, name)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc

    answer = run(work())
    click.echo(f"destination {name} ({answer.kind}): {answer.outcome}: {answer.detail}")
    if answer.outcome != "delivered":
        raise SystemExit(1)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint="--since") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@destinations.command("replay")
@TENANT
@NAME
@click.option("--since", help="Only dead letters that died at this ISO-8601 time or later (UTC unless it says).")
def destinations_replay(tenant_name: str, name: str, since: str | None) -> None:
    """Move a destination's dead letters back to its queue (they are sent again, with their idempotency keys)."""
    deps = _deps()
    when = _since(since)

    async def work() -> int:
        async with deps.destination_delivery() as delivery:
            tenant = await deps.operator_tenant(delivery.engine, tenant_name)
            try:
                return await UnitOfWork(delivery.engine, tenant).run(
                    lambda tx: service.replay(tx, name, when, OPERATOR_CLI.actor)
                )
            except service.DestinationError as exc:
                raise click.ClickException(str(exc)) from exc

    click.echo(f"destination {name}: {run(work())} dead letters queued again")


def _toggle(tenant_name: str, name: str, on: bool, reason: str) -> bool:
    deps = _deps()

    async def work() -> bool:
        async with deps.destination_delivery() as delivery:
            tenant = await deps.operator_tenant(delivery.engine, tenant_name)
            uow = UnitOfWork(delivery.engine, tenant)
            try:
                if on:
                    return await uow.run(lambda tx: service.enable(tx, name, OPERATOR_CLI.actor))
                return await uow.run(lambda tx: service.disable(tx, name, reason, OPERATOR_CLI.actor))
            except service.DestinationError as exc:
                raise click.ClickException(str(exc)) from exc

    return run(work())


@destinations.command("enable")
@TENANT
@NAME
def destinations_enable(tenant_name: str, name: str) -> None:
    """Turn a disabled destination back on (its waiting events are delivered)."""
    changed = _toggle(tenant_name, name, True, "")
    click.echo(f"destination {name}: {'enabled' if changed else 'was not disabled'}")


@destinations.command("disable")
@TENANT
@NAME
@click.option("--reason", default="disabled by an operator", show_default=True, help="Recorded and audited.")
def destinations_disable(tenant_name: str, name: str, reason: str) -> None:
    """Stop delivering to a destination (its events keep queueing until it is enabled)."""
    changed = _toggle(tenant_name, name, False, reason)
    click.echo(f"destination {name}: {'disabled' if changed else 'was disabled already'}")
