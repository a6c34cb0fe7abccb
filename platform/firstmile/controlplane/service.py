"""Applying a tenant manifest to this region's database and key provider, and auditing operator actions.

These are operator tasks (the CLI runs them as the schema owner): each owns its transaction,
as a request's unit of work does. Provider calls (a new tenant's data key) happen before the
transaction opens, so a provider that is down or misconfigured fails the apply with nothing
written, and no lock is held while it answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.experiments import service as experiments
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from firstmile.onboarding.paths import sync_paths
from firstmile.security.datakeys import (
    NewTenantKeys,
    ProviderSource,
    as_source,
    has_tenant_keys,
    new_tenant_keys,
    store_tenant_keys,
)
from firstmile.security.keys import KeyProvider
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import TenantManifest
from firstmile.tenancy.service import TenancyError

OPERATOR = OPERATOR_CLI.actor
"""The actor of audit entries written by operator commands (a person at the CLI, as the schema owner)."""

__all__ = ["OPERATOR", "ApplyResult", "TenancyError", "apply_manifest", "record_provisioning", "record_secret_read"]


@dataclass
class ApplyResult:
    tenant_id: TenantId
    slug: str
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


async def apply_manifest(
    engine: AsyncEngine,
    manifest: TenantManifest,
    *,
    dry_run: bool = False,
    key_providers: KeyProvider | ProviderSource | None = None,
) -> ApplyResult:
    """Make the database match ``manifest``; idempotent (paths: :func:`~firstmile.onboarding.paths.sync_paths`).

    ``dry_run`` does all the database work and rolls it back: the changes are what `plan` prints.
    With ``key_providers`` (``tenants apply``), a tenant without data keys gets its provider key and
    first data and index keys (``create data key``): made by the provider first, stored in the
    apply's transaction. A plan only looks (it never calls the provider, which for Vault would
    create the key).
    """
    spec = manifest.tenant
    async with engine.connect() as conn:
        existing = await tenancy.find_tenant(conn, spec.slug)
    if existing is not None and existing.home_region != spec.home_region:
        raise TenancyError(
            f"tenant {spec.slug} is homed in {existing.home_region}; moving it to "
            f"{spec.home_region} is a data migration, not a manifest change"
        )
    tenant_id = OPERATOR_CLI.tenant(existing.id if existing is not None else uuid.uuid4())
    needs_keys = False
    if key_providers is not None:
        if existing is None:
            needs_keys = True
        else:
            async with tenant_transaction(engine, tenant_id) as tx:
                needs_keys = not await has_tenant_keys(tx)
    material: NewTenantKeys | None = None
    if needs_keys and not dry_run:
        assert key_providers is not None
        provider = as_source(key_providers).for_spec(manifest.keys)
        material = await new_tenant_keys(provider, tenant_id)  # network, before the transaction

    result = ApplyResult(tenant_id, spec.slug)
    async with tenant_transaction(engine, tenant_id, commit=not dry_run) as tx:
        if existing is None:
            await tenancy.create_tenant(tx, manifest)
            result.changes.append(f"create tenant {spec.slug} in {spec.home_region}")
        result.changes.extend(await sync_paths(tx, manifest.paths))
        try:
            result.changes.extend(await experiments.sync_manifest(tx, manifest.experiments, OPERATOR, manifest.nudges))
        except experiments.ExperimentError as exc:  # a running experiment's allocation may not change
            raise TenancyError(exc.detail) from exc
        if needs_keys and (material is None or await store_tenant_keys(tx, material)):
            where = (
                f"keys.provider {manifest.keys.provider}"
                if manifest.keys is not None
                else "the platform's key provider"
            )
            result.changes.append(f"create data key ({where})")
        manifest_hash = manifest.content_hash()
        # the paths are part of the manifest: any change above also changed its hash
        if existing is not None and existing.manifest_hash != manifest_hash:
            if existing.name != spec.name:
                result.changes.append(f"tenant {spec.slug}: rename to {spec.name!r}")
            if not result.changes:
                result.changes.append(f"tenant {spec.slug}: manifest settings updated")
            await tenancy.update_tenant(tx, manifest)
        if result.changes and not dry_run:
            await audit.append(
                tx,
                "admin",
                OPERATOR,
                spec.slug,
                {"action": "tenants.apply", "changes": result.changes, "manifest_hash": manifest_hash},
            )
    return result


async def record_provisioning(engine: AsyncEngine, slug: str, changes: list[str]) -> bool:
    """Audit SSO provisioning changes made for ``slug`` (one entry); False when the tenant has no row."""
    if not changes:
        return False
    return await _operator_entry(engine, slug, f"sso:{slug}", {"action": "sso.provision", "changes": changes})


async def record_secret_read(engine: AsyncEngine, slug: str, client_id: str) -> bool:
    """Audit that an operator read the secret of machine client ``client_id`` (never the secret itself).

    False when the tenant has no row here: the caller then withholds the secret, so no read goes unaudited.
    """
    return await _operator_entry(engine, slug, f"client:{client_id}", {"action": "sso.client_secret.read"})


async def _operator_entry(engine: AsyncEngine, slug: str, subject: str, payload: dict[str, object]) -> bool:
    async with engine.connect() as conn:
        found = await tenancy.find_tenant(conn, slug)
    if found is None:
        return False
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(found.id)) as tx:
        await audit.append(tx, "admin", OPERATOR, subject, payload)
    return True
