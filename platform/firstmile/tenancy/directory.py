"""The global tenant directory: which region is home for which tenant.

Each region keeps its tenants' data in its own database; the directory holds only
``slug -> (tenant id, home region)``, so a process can tell a client of a tenant
homed elsewhere where to go (421 with ``home_region``) without holding any of its data.

Two adapters of :class:`TenantDirectory`: :class:`PostgresTenantDirectory`, a table in a
*global* database (``FIRSTMILE_DIRECTORY_URL``, created by :meth:`~PostgresTenantDirectory.ensure_schema`,
not by the regional migrations), and :class:`RegionalTenantDirectory`, the embedded default,
which reads this region's own ``tenants`` table (so it knows only this region's tenants).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.cache import MISS, TtlCache
from firstmile.kit.db import create_engine, retry_transient


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    slug: str
    tenant_id: uuid.UUID
    home_region: str


class TenantDirectory(Protocol):
    """Where each tenant is homed."""

    async def ensure_schema(self) -> None:
        """Create what the directory keeps its entries in, if missing (idempotent)."""
        ...

    async def home_region(self, slug: str) -> str | None:
        """The tenant's home region, or None when no region knows it."""
        ...

    async def register(self, slug: str, tenant_id: uuid.UUID, home_region: str) -> bool:
        """Record the tenant's home region (idempotent); True when something changed."""
        ...

    async def remove(self, slug: str) -> bool:
        """Forget the tenant (idempotent); True when it was there."""
        ...

    async def list(self) -> list[DirectoryEntry]:
        """Every entry, by slug."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tenant_directory (
        slug text PRIMARY KEY,
        tenant_id uuid NOT NULL,
        home_region text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
)


class PostgresTenantDirectory:
    """The directory as one table of a global PostgreSQL database."""

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False):
        self.engine = engine
        self._owns_engine = owns_engine

    @classmethod
    def from_url(cls, url: str) -> PostgresTenantDirectory:
        engine = create_engine(url, pool_size=2, max_overflow=2, application_name="firstmile-directory")
        return cls(engine, owns_engine=True)

    async def ensure_schema(self) -> None:
        async with self.engine.begin() as conn:
            for statement in _SCHEMA:
                await conn.execute(text(statement))

    async def home_region(self, slug: str) -> str | None:
        async def lookup() -> str | None:
            async with self.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                row = (
                    await conn.execute(text("SELECT home_region FROM tenant_directory WHERE slug = :s"), {"s": slug})
                ).first()
            return None if row is None else str(row[0])

        return await retry_transient(lookup)

    async def register(self, slug: str, tenant_id: uuid.UUID, home_region: str) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO tenant_directory (slug, tenant_id, home_region) VALUES (:s, :t, :r) "
                        "ON CONFLICT (slug) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, "
                        "home_region = EXCLUDED.home_region, updated_at = now() "
                        "WHERE (tenant_directory.tenant_id, tenant_directory.home_region) "
                        "IS DISTINCT FROM (EXCLUDED.tenant_id, EXCLUDED.home_region) "
                        "RETURNING slug"
                    ),
                    {"s": slug, "t": tenant_id, "r": home_region},
                )
            ).first()
        return row is not None

    async def remove(self, slug: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text("DELETE FROM tenant_directory WHERE slug = :s RETURNING slug"), {"s": slug}
            )
            return result.first() is not None

    async def list(self) -> list[DirectoryEntry]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT slug, tenant_id, home_region FROM tenant_directory ORDER BY slug"))
            return [DirectoryEntry(r[0], r[1], r[2]) for r in rows]

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()


class CachedTenantDirectory:
    """A directory that remembers its answers for ``ttl`` seconds, misses included.

    Every request with an unknown tenant (a made-up slug in a token or a login URL) asks the
    directory, and the directory is one global database for every region: without a cache of
    misses, a client sending made-up slugs sends one cross-region query per request. Entries are
    kept in a bounded LRU (``max_entries``), so made-up slugs only evict each other's entries and
    memory stays bounded. ``register`` and ``remove`` through this object drop the slug's entry; a
    change made elsewhere is seen within ``ttl``.
    """

    def __init__(self, inner: TenantDirectory, ttl: float, max_entries: int = 10_000) -> None:
        self.inner = inner
        self._answers: TtlCache[str, str | None] = TtlCache(ttl, max_entries)

    async def ensure_schema(self) -> None:
        await self.inner.ensure_schema()

    async def home_region(self, slug: str) -> str | None:
        hit = self._answers.get(slug)
        if hit is not MISS:
            return hit
        home = await self.inner.home_region(slug)
        self._answers.put(slug, home)
        return home

    async def register(self, slug: str, tenant_id: uuid.UUID, home_region: str) -> bool:
        self._answers.drop(slug)
        return await self.inner.register(slug, tenant_id, home_region)

    async def remove(self, slug: str) -> bool:
        self._answers.drop(slug)
        return await self.inner.remove(slug)

    async def list(self) -> list[DirectoryEntry]:
        return await self.inner.list()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RegionalTenantDirectory:
    """The embedded default: this region's ``tenants`` table is the directory.

    ``home_region`` goes through ``firstmile_resolve_tenant(text)`` (the SECURITY DEFINER
    function the application role may call); ``register`` and ``remove`` change nothing,
    ``tenants apply`` already wrote the row. ``list`` reads the table, so it needs the
    schema owner's engine (the CLI's).
    """

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def ensure_schema(self) -> None:
        return None  # the regional migrations own the tenants table

    async def home_region(self, slug: str) -> str | None:
        async def lookup() -> str | None:
            async with self.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                row = (
                    await conn.execute(text("SELECT home_region FROM firstmile_resolve_tenant(:s)"), {"s": slug})
                ).first()
            return None if row is None else str(row[0])

        return await retry_transient(lookup)

    async def register(self, slug: str, tenant_id: uuid.UUID, home_region: str) -> bool:
        return False

    async def remove(self, slug: str) -> bool:
        return False

    async def list(self) -> list[DirectoryEntry]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT slug, id, home_region FROM tenants ORDER BY slug"))
            return [DirectoryEntry(r[0], r[1], r[2]) for r in rows]

    async def aclose(self) -> None:
        return None
