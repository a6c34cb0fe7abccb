"""Tenant provisioning from manifests and API key management (operator side).

These run as the schema owner (``firstmile migrate``'s role) from the CLI; the
API never calls them. Each function is one transaction: all or nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit.db import TenantId, authorise_tenant, set_tenant
from firstmile.onboarding.paths import sync_paths
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import repository as repo
from firstmile.tenancy.manifest import TenantManifest

if TYPE_CHECKING:
    from firstmile.security.datakeys import DataKeyService

OPERATOR = "operator:cli"
"""The actor of audit entries written by operator commands (a person at the CLI, as the schema owner)."""


class TenancyError(ValueError):
    """An operator request that cannot be carried out; the message says why."""


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
    data_keys: DataKeyService | None = None,
) -> ApplyResult:
    """Make the database match ``manifest``; idempotent (paths: :func:`sync_paths`).

    ``dry_run`` does all the work and rolls it back: the changes are what `plan` prints.
    With ``data_keys`` (``tenants apply``), the tenant's key-encryption key and first data and index
    keys are made in the same transaction if it has none (``create data key``), so a provider that is
    down or misconfigured fails the apply instead of the tenant's first write; a plan only looks
    (it never calls the provider, which for Vault would create the key).
    """
    spec = manifest.tenant
    manifest_doc = manifest.model_dump(mode="json")
    manifest_hash = manifest.content_hash()
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            existing = await repo.tenant_by_slug(conn, spec.slug)
            if existing is None:
                tenant_id = authorise_tenant(uuid.uuid4())
                await set_tenant(conn, tenant_id)
                await repo.insert_tenant(
                    conn, tenant_id, spec.slug, spec.name, spec.home_region, manifest_doc, manifest_hash
                )
                result = ApplyResult(tenant_id, spec.slug, [f"create tenant {spec.slug} in {spec.home_region}"])
            else:
                tenant_id = existing.id
                await set_tenant(conn, tenant_id)
                if existing.home_region != spec.home_region:
                    raise TenancyError(
                        f"tenant {spec.slug} is homed in {existing.home_region}; moving it to "
                        f"{spec.home_region} is a data migration, not a manifest change"
                    )
                result = ApplyResult(tenant_id, spec.slug)
            result.changes.extend(await sync_paths(conn, tenant_id, manifest.paths))
            if data_keys is not None:
                result.changes.extend(await _data_key(conn, tenant_id, manifest, data_keys, dry_run=dry_run))
            # the paths are part of the manifest: any change above also changed its hash
            if existing is not None and existing.manifest_hash != manifest_hash:
                if existing.name != spec.name:
                    result.changes.append(f"tenant {spec.slug}: rename to {spec.name!r}")
                if not result.changes:
                    result.changes.append(f"tenant {spec.slug}: manifest settings updated")
                await repo.update_tenant(conn, tenant_id, spec.name, manifest_doc, manifest_hash)
            if result.changes and not dry_run:
                await audit.append(
                    conn,
                    tenant_id,
                    "admin",
                    OPERATOR,
                    spec.slug,
                    {"action": "tenants.apply", "changes": result.changes, "manifest_hash": manifest_hash},
                )
        except BaseException:
            await transaction.rollback()
            raise
        if dry_run:
            await transaction.rollback()
        else:
            await transaction.commit()
    return result


async def _data_key(
    conn: AsyncConnection, tenant_id: TenantId, manifest: TenantManifest, data_keys: DataKeyService, *, dry_run: bool
) -> list[str]:
    """``create data key`` when the tenant has none yet; made here unless ``dry_run``."""
    if await data_keys.has_tenant_keys(conn, tenant_id):
        return []
    if not dry_run and not await data_keys.ensure_tenant_keys(conn, tenant_id):
        return []  # another apply made it first
    where = f"keys.provider {manifest.keys.provider}" if manifest.keys is not None else "the platform's key provider"
    return [f"create data key ({where})"]


@dataclass(frozen=True)
class CreatedKey:
    key: str
    key_id: uuid.UUID
    tenant_slug: str
    scopes: tuple[str, ...]
    region: str


async def _tenant(conn: AsyncConnection, slug: str) -> repo.TenantRow:
    row = await repo.tenant_by_slug(conn, slug)
    if row is None:
        raise TenancyError(f"no tenant {slug!r}; apply its manifest first (firstmile tenants apply)")
    return row


async def create_key(
    engine: AsyncEngine, pepper: bytes, tenant_slug: str, scopes: list[str], name: str = "default"
) -> CreatedKey:
    """Create a key bound to the tenant and its home region; returns the plaintext once."""
    try:
        valid = keylib.validate_scopes(scopes)
    except ValueError as exc:
        raise TenancyError(str(exc)) from exc
    key = keylib.generate_key()
    async with engine.begin() as conn:
        tenant = await _tenant(conn, tenant_slug)
        await set_tenant(conn, tenant.id)
        key_id = await repo.insert_key(
            conn, tenant.id, name, keylib.display_prefix(key), keylib.hash_key(pepper, key), valid, tenant.home_region
        )
        await audit.append(
            conn,
            tenant.id,
            "admin",
            OPERATOR,
            f"api_key:{key_id}",
            {"action": "keys.create", "name": name, "scopes": list(valid), "region": tenant.home_region},
        )
    return CreatedKey(key, key_id, tenant_slug, valid, tenant.home_region)


async def revoke_key(engine: AsyncEngine, tenant_slug: str, key_id: uuid.UUID) -> bool:
    async with engine.begin() as conn:
        tenant = await _tenant(conn, tenant_slug)
        await set_tenant(conn, tenant.id)
        revoked = await repo.revoke_key(conn, tenant.id, key_id)
        if revoked:
            await audit.append(conn, tenant.id, "admin", OPERATOR, f"api_key:{key_id}", {"action": "keys.revoke"})
        return revoked


async def list_keys(engine: AsyncEngine, tenant_slug: str) -> list[repo.KeyRow]:
    async with engine.begin() as conn:
        tenant = await _tenant(conn, tenant_slug)
        await set_tenant(conn, tenant.id)
        return await repo.list_keys(conn, tenant.id)


async def path_settings(conn: AsyncConnection, tenant_id: TenantId) -> tuple[str, int, tuple[str, ...], str | None]:
    """The tenant's default path, manifest revision, PII trait names and path model, for the onboarding catalog."""
    return await repo.path_settings(conn, tenant_id)


async def record_provisioning(engine: AsyncEngine, slug: str, changes: list[str]) -> bool:
    """Audit SSO provisioning changes made for ``slug`` (one entry); False when the tenant has no row."""
    if not changes:
        return False
    async with engine.begin() as conn:
        tenant = await repo.tenant_by_slug(conn, slug)
        if tenant is None:
            return False
        await set_tenant(conn, tenant.id)
        await audit.append(
            conn, tenant.id, "admin", OPERATOR, f"sso:{slug}", {"action": "sso.provision", "changes": changes}
        )
    return True


async def record_secret_read(engine: AsyncEngine, slug: str, client_id: str) -> bool:
    """Audit that an operator read the secret of machine client ``client_id`` (never the secret itself).

    False when the tenant has no row here: the caller then withholds the secret, so no read goes unaudited.
    """
    async with engine.begin() as conn:
        tenant = await repo.tenant_by_slug(conn, slug)
        if tenant is None:
            return False
        await set_tenant(conn, tenant.id)
        await audit.append(
            conn, tenant.id, "admin", OPERATOR, f"client:{client_id}", {"action": "sso.client_secret.read"}
        )
    return True
