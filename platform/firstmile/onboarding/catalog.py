"""Per-process cache of each tenant's path definitions, keyed by tenant revision.

``firstmile tenants apply`` bumps the tenant's revision whenever a path
changes; the revision arrives with the resolved API key, so a new revision
reloads the catalog. Old path versions stay immutable and are loaded on demand
for users still on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import TenantId
from firstmile.onboarding import repository as repo
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.pii import BUILTIN_PII_TRAITS
from firstmile.tenancy.service import path_settings


@dataclass(frozen=True, slots=True)
class PathCatalog:
    revision: int
    default_key: str
    current: tuple[PathDef, ...]
    pii_traits: frozenset[str] = frozenset()
    planner_model: str | None = None  # the registry model the planner asks first; None: rules only


class CatalogCache:
    """Catalogs and path versions for all tenants this process has served."""

    def __init__(self) -> None:
        self._catalogs: dict[TenantId, PathCatalog] = {}
        self._versions: dict[tuple[TenantId, str, int], PathDef] = {}

    async def catalog(self, conn: AsyncConnection, tenant_id: TenantId, revision: int) -> PathCatalog:
        cached = self._catalogs.get(tenant_id)
        if cached is not None and cached.revision >= revision:
            return cached
        return await self.reload(conn, tenant_id)

    async def reload(self, conn: AsyncConnection, tenant_id: TenantId) -> PathCatalog:
        """Read the tenant's current catalog (for callers that do not know the revision)."""
        default_key, tenant_revision, pii_traits, planner_model = await path_settings(conn, tenant_id)
        rows = await repo.current_path_definitions(conn, tenant_id)
        current = tuple(PathDef.from_definition(key, version, definition) for key, version, definition in rows)
        for path in current:
            self._versions[(tenant_id, path.key, path.version)] = path
        catalog = PathCatalog(
            revision=tenant_revision,
            default_key=default_key,
            current=current,
            pii_traits=BUILTIN_PII_TRAITS | frozenset(pii_traits),
            planner_model=planner_model,
        )
        self._catalogs[tenant_id] = catalog
        return catalog

    async def version(self, conn: AsyncConnection, tenant_id: TenantId, key: str, version: int) -> PathDef:
        cached = self._versions.get((tenant_id, key, version))
        if cached is not None:
            return cached
        path = PathDef.from_definition(key, version, await repo.path_definition(conn, tenant_id, key, version))
        self._versions[(tenant_id, key, version)] = path
        return path
