"""All SQL of the tenancy slice.

Tenant-scoped functions take a :class:`~firstmile.kit.db.TenantTx`; the few that work across
tenants (key resolution through the SECURITY DEFINER resolver, the operator's lookup by slug)
take a plain connection and say so. Other slices call :mod:`firstmile.tenancy.service`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import TenantTx
from firstmile.tenancy.models import api_keys, tenants


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    key_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_slug: str
    home_region: str
    tenant_revision: int
    scopes: tuple[str, ...]
    key_region: str
    revoked: bool
    kind: str = "secret"
    origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantRow:
    id: uuid.UUID
    slug: str
    name: str
    home_region: str
    manifest_hash: str
    revision: int
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: uuid.UUID
    name: str
    prefix: str
    scopes: tuple[str, ...]
    region: str
    created_at: datetime
    revoked_at: datetime | None
    kind: str = "secret"
    origins: tuple[str, ...] = ()


_RESOLVE = text(
    "SELECT key_id, tenant_id, tenant_slug, home_region, tenant_revision, scopes, key_region, revoked, kind, origins "
    "FROM firstmile_resolve_api_key(:h)"
)


async def resolve_key(conn: AsyncConnection, key_hash: bytes) -> ResolvedKey | None:
    """Look a key up by hash through the SECURITY DEFINER resolver (no tenant context needed)."""
    row = (await conn.execute(_RESOLVE, {"h": key_hash})).first()
    if row is None:
        return None
    return ResolvedKey(row[0], row[1], row[2], row[3], row[4], tuple(row[5]), row[6], row[7], row[8], tuple(row[9]))


@dataclass(frozen=True, slots=True)
class ResolvedTenant:
    """A tenant as authentication sees it (through the SECURITY DEFINER resolver)."""

    tenant_id: uuid.UUID
    tenant_slug: str
    home_region: str
    tenant_revision: int


_RESOLVE_TENANT = text(
    "SELECT tenant_id, tenant_slug, home_region, tenant_revision FROM firstmile_resolve_tenant(:slug)"
)


async def resolve_tenant(conn: AsyncConnection, slug: str) -> ResolvedTenant | None:
    """A tenant by slug through the SECURITY DEFINER resolver (no tenant context needed)."""
    row = (await conn.execute(_RESOLVE_TENANT, {"slug": slug})).first()
    return None if row is None else ResolvedTenant(row[0], row[1], row[2], row[3])


async def tenant_by_slug(conn: AsyncConnection, slug: str, tenant_id: uuid.UUID | None = None) -> TenantRow | None:
    """The tenant of ``slug`` (or of id ``tenant_id``): the operator's lookup, before it knows the tenant."""
    where = tenants.c.slug == slug if tenant_id is None else (tenants.c.slug == slug) | (tenants.c.id == tenant_id)
    row = (await conn.execute(select(tenants).where(where))).mappings().first()
    if row is None:
        return None
    return TenantRow(
        row["id"],
        row["slug"],
        row["name"],
        row["home_region"],
        row["manifest_hash"],
        row["revision"],
        row["manifest"],
    )


async def insert_tenant(
    tx: TenantTx,
    slug: str,
    name: str,
    region: str,
    manifest: dict[str, Any],
    manifest_hash: str,
) -> None:
    await tx.execute(
        insert(tenants).values(
            id=tx.tenant,
            slug=slug,
            name=name,
            home_region=region,
            manifest=manifest,
            manifest_hash=manifest_hash,
            revision=1,
        )
    )


async def update_tenant(tx: TenantTx, name: str, manifest: dict[str, Any], manifest_hash: str) -> None:
    await tx.execute(
        update(tenants)
        .where(tenants.c.id == tx.tenant)
        .values(
            name=name,
            manifest=manifest,
            manifest_hash=manifest_hash,
            revision=tenants.c.revision + 1,
            updated_at=func.now(),
        )
    )


async def insert_key(
    tx: TenantTx,
    name: str,
    prefix: str,
    key_hash: bytes,
    scopes: tuple[str, ...],
    region: str,
    *,
    kind: str = "secret",
    origins: tuple[str, ...] = (),
    key_id: uuid.UUID | None = None,
) -> uuid.UUID:
    key_id = key_id or uuid.uuid4()
    await tx.execute(
        insert(api_keys).values(
            id=key_id,
            tenant_id=tx.tenant,
            name=name,
            prefix=prefix,
            key_hash=key_hash,
            scopes=list(scopes),
            region=region,
            kind=kind,
            origins=list(origins),
        )
    )
    return key_id


async def list_keys(tx: TenantTx) -> list[KeyRow]:
    rows = await tx.execute(
        select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.prefix,
            api_keys.c.scopes,
            api_keys.c.region,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
            api_keys.c.kind,
            api_keys.c.origins,
        )
        .where(api_keys.c.tenant_id == tx.tenant)
        .order_by(api_keys.c.created_at)
    )
    return [KeyRow(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], r[6], r[7], tuple(r[8])) for r in rows]


async def revoke_key(tx: TenantTx, key_id: uuid.UUID) -> bool:
    result = await tx.execute(
        update(api_keys)
        .where(api_keys.c.tenant_id == tx.tenant, api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return bool(result.rowcount)


async def revision(tx: TenantTx) -> int:
    """The tenant's revision (bumped by every manifest change and experiment lifecycle change)."""
    return int((await tx.execute(select(tenants.c.revision).where(tenants.c.id == tx.tenant))).scalar_one())


async def path_settings(tx: TenantTx) -> tuple[str, int, tuple[str, ...], str | None, float]:
    """The tenant's default path key, its revision (bumped by every manifest change), its PII traits,
    the path model its planner asks first (``None``: rules only) and its planner's exploration share."""
    row = (
        await tx.execute(
            select(
                tenants.c.manifest["default_path"].astext,
                tenants.c.revision,
                tenants.c.manifest["pii_traits"],
                tenants.c.manifest["planner"]["model"].astext,
                tenants.c.manifest["planner"]["exploration"]["epsilon"].astext,
            ).where(tenants.c.id == tx.tenant)
        )
    ).one()
    return str(row[0]), int(row[1]), tuple(row[2] or ()), row[3], float(row[4] or 0.0)


async def tenant_name(tx: TenantTx) -> str:
    return str((await tx.execute(select(tenants.c.name).where(tenants.c.id == tx.tenant))).scalar_one())


async def manifest(tx: TenantTx) -> dict[str, Any]:
    """The applied manifest (as stored at the last ``tenants apply``)."""
    found = (await tx.execute(select(tenants.c.manifest).where(tenants.c.id == tx.tenant))).scalar_one()
    return dict(found or {})


async def manifest_section(tx: TenantTx, section: str) -> Any:
    """One top-level section of the applied manifest (``keys``, ``sso``, …), or None."""
    return (await tx.execute(select(tenants.c.manifest[section]).where(tenants.c.id == tx.tenant))).scalar_one_or_none()


async def bump_revision(tx: TenantTx) -> int:
    """Add one to the tenant's revision (every process reloads what it cached of the tenant)."""
    result = await tx.execute(
        update(tenants)
        .where(tenants.c.id == tx.tenant)
        .values(revision=tenants.c.revision + 1, updated_at=func.now())
        .returning(tenants.c.revision)
    )
    return int(result.scalar_one())


_TRAINING_TENANTS = text(
    "SELECT id, slug, manifest -> 'planner' FROM tenants"
    " WHERE jsonb_typeof(manifest -> 'planner' -> 'training') = 'object' ORDER BY slug"
)


async def training_tenants(conn: AsyncConnection) -> list[tuple[uuid.UUID, str, dict[str, Any]]]:
    """Across tenants (as the schema owner): those whose manifest asks for scheduled training, with their
    ``planner`` section."""
    rows = (await conn.execute(_TRAINING_TENANTS)).all()
    return [(r[0], str(r[1]), r[2] if isinstance(r[2], dict) else {}) for r in rows]
