"""``firstmile analytics``: ``seed`` (synthetic onboarding history for a demo tenant, never for a real one),
``rebuild-experiments`` (recompute ``experiment_users`` from the stored events) and ``check-dropoff`` (the drop-off
alerts' check, once)."""

from __future__ import annotations

import time
import uuid
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import UTC, datetime
from typing import Protocol

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.alerting import DropoffWatch, TenantCheck
from firstmile.analytics.alerts import windows
from firstmile.analytics.queries import build_event_count
from firstmile.analytics.store import AnalyticsStore, AnalyticsStoreError
from firstmile.analytics.synthetic import seed_demo
from firstmile.kit.cli import run, services
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.paths import current_paths
from firstmile.tenancy import service as tenancy


class AnalyticsCommandDeps(Protocol):
    """What ``firstmile analytics`` needs from the platform (the wiring provides it)."""

    def operator_engine(self) -> AbstractAsyncContextManager[AsyncEngine]:
        """An engine of the schema owner."""
        ...

    def analytics_store(self) -> AbstractContextManager[AnalyticsStore]:
        """The configured analytics store, closed afterwards."""
        ...

    def dropoff_watch(self) -> AbstractAsyncContextManager[DropoffWatch]:
        """The drop-off check as the scheduler runs it (the application role, the configured store and e-mail
        channel), closed afterwards."""
        ...


async def tenant_paths(engine: AsyncEngine, slug: str) -> tuple[TenantId, list[PathDef]]:
    """The tenant's id and current path definitions; a ClickException when there is no such tenant."""
    async with engine.connect() as conn:
        found = await tenancy.find_tenant(conn, slug)
    if found is None:
        raise click.ClickException(f"no tenant {slug!r}; apply its manifest first (firstmile tenants apply)")
    tenant = OPERATOR_CLI.tenant(found.id)
    async with tenant_transaction(engine, tenant) as tx:
        rows = await current_paths(tx)
    return tenant, [PathDef.from_definition(k, v, d) for k, v, d in rows]


def seed_tenant(
    store: AnalyticsStore,
    tenant: TenantId,
    paths: list[PathDef],
    slug: str,
    *,
    users: int,
    only_if_empty: bool,
    seed: int = 7,
) -> int:
    """Synthetic history (8 weeks of starts, completions, activations, product events) for one tenant."""
    if only_if_empty:
        held = store.run(tenant, build_event_count(tenant))
        if int(held[0]["n"]) > 0:
            return 0
    click.echo(f"seeding synthetic analytics for {slug}: {users} users over 8 weeks …", err=True)
    inserted = seed_demo(store, tenant, paths, users=users, seed=seed)
    click.echo(f"seeded {inserted} events", err=True)
    return inserted


def rebuild_experiments(store: AnalyticsStore, tenant: uuid.UUID | None) -> int:
    """Recompute ``experiment_users`` from the events of one tenant or every tenant; progress on stderr."""
    scope = f"tenant {tenant}" if tenant is not None else "every tenant"
    click.echo(f"rebuilding experiment_users from the events of {scope} …", err=True)
    began = time.perf_counter()
    try:
        pairs = store.rebuild_experiment_users(tenant)
    except AnalyticsStoreError as exc:
        hint = (
            ""
            if tenant is not None
            else " (on ClickHouse, every tenant at once needs a user the row policy does not bind; or rebuild one "
            "tenant at a time with --tenant)"
        )
        raise click.ClickException(f"{exc}{hint}") from exc
    click.echo(f"rebuilt in {time.perf_counter() - began:.1f} s: {pairs:,} exposed (experiment, user) pairs", err=True)
    return pairs


@click.group()
def analytics() -> None:
    """The analytics store."""


@analytics.command("seed")
@click.option("--tenant", default="demo", show_default=True, help="Tenant slug.")
@click.option("--users", default=2000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--seed", default=7, show_default=True, help="Random seed; the same seed adds nothing twice.")
def analytics_seed(tenant: str, users: int, seed: int) -> None:
    """Add synthetic onboarding history for a tenant (demo data; never for a real tenant)."""
    deps: AnalyticsCommandDeps = services()

    async def paths() -> tuple[TenantId, list[PathDef]]:
        async with deps.operator_engine() as engine:
            return await tenant_paths(engine, tenant)

    tenant_id, defs = run(paths())
    with deps.analytics_store() as store:
        seed_tenant(store, tenant_id, defs, tenant, users=users, only_if_empty=False, seed=seed)


@analytics.command("rebuild-experiments")
@click.option("--tenant", type=click.UUID, default=None, help="Tenant id (default: every tenant).")
def analytics_rebuild_experiments(tenant: uuid.UUID | None) -> None:
    """Recompute what the experiment analysis reads (experiment_users) from the stored events; idempotent.

    For an upgrade that could not rebuild on its own (a row policy on ClickHouse), or after an outcome was
    inserted before its user's exposure (docs/analytics.md, "Experiment users")."""
    deps: AnalyticsCommandDeps = services()
    with deps.analytics_store() as store:
        rebuild_experiments(store, tenant)


def report(check: TenantCheck, name: str) -> None:
    """One tenant's check on stderr: each path version, each alert raised, the deliveries."""
    if check.outcome != "checked":
        click.echo(f"{name}: {check.outcome}: {check.reason}", err=True)
    for path in check.paths:
        alerting = [s for s in path.shifts if s.alert]
        click.echo(
            f"{name}: {path.path_key} v{path.path_version}: {path.started_recent} recent starts, "
            f"{path.started_baseline} baseline; {len(alerting)} step(s) shifted",
            err=True,
        )
    for alert in check.raised:
        click.echo(
            f"{name}: ALERT {alert.path_key} v{alert.path_version} step {alert.step_id}: drop-off {alert.direction} "
            f"from {alert.baseline_rate:.1%} to {alert.recent_rate:.1%} (p = {alert.p_value:.2g})",
            err=True,
        )
    if check.delivered or check.failed_deliveries:
        click.echo(
            f"{name}: {check.delivered} delivered, {check.failed_deliveries} failed (retried next run)", err=True
        )


@analytics.command("check-dropoff")
@click.option("--tenant", default=None, help="Tenant slug (default: every tenant whose alerts are enabled).")
def analytics_check_dropoff(tenant: str | None) -> None:
    """Check each step's drop-off against its baseline once, store and deliver the alerts (docs/alerts.md).

    What the scheduler does every FIRSTMILE_DROPOFF_ALERT_SECONDS; exit status 1 when a tenant could not be checked
    (the analytics store failed: nothing was stored for it)."""
    deps: AnalyticsCommandDeps = services()

    async def check() -> list[tuple[str, TenantCheck]]:
        async with deps.dropoff_watch() as watch:
            now = datetime.now(UTC)
            w = windows(now, watch.rule)
            click.echo(
                f"recent window: starts {w.recent_start:%Y-%m-%d %H:%M} to {w.recent_end:%Y-%m-%d %H:%M} UTC; "
                f"baseline: {w.baseline_start:%Y-%m-%d %H:%M} to {w.recent_start:%Y-%m-%d %H:%M} UTC",
                err=True,
            )
            if tenant is not None:
                async with deps.operator_engine() as engine, engine.connect() as conn:
                    found = await tenancy.find_tenant(conn, tenant)
                if found is None:
                    raise click.ClickException(
                        f"no tenant {tenant!r}; apply its manifest first (firstmile tenants apply)"
                    )
                named = [(tenant, OPERATOR_CLI.tenant(found.id))]
            else:
                named = [(str(t), t) for t in await watch.tenants()]
                click.echo(f"checking {len(named)} tenant(s) …", err=True)
            done: list[tuple[str, TenantCheck]] = []
            for name, tenant_id in named:
                result = await watch.check_tenant(tenant_id, now)
                shown = result.slug or name
                report(result, shown)
                done.append((shown, result))
            return done

    checks = run(check())
    raised = sum(len(c.raised) for _, c in checks)
    unchecked = [name for name, c in checks if c.outcome != "checked"]
    click.echo(f"{len(checks) - len(unchecked)} of {len(checks)} tenant(s) checked, {raised} alert(s) raised")
    if unchecked:
        raise click.ClickException(f"not checked: {', '.join(unchecked)} (see above; the next run tries again)")
