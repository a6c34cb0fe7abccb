"""The per-process path catalog keeps a bounded number of tenants and path versions.

A process that serves many tenants (or a tenant whose paths change often) grew its catalog cache
forever; it is LRU-bounded now, and a tenant evicted is simply read again.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.onboarding.catalog import CatalogCache
from tests.conftest import new_tenant

READER = OperatorContext("worker:test")


async def test_the_catalog_cache_is_bounded_and_reloads_what_it_dropped(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenants = [READER.tenant((await new_tenant(admin_engine)).id) for _ in range(4)]
    cache = CatalogCache(max_tenants=2, max_versions=5)
    for tenant in tenants:
        async with tenant_transaction(app_engine, tenant) as tx:
            catalog = await cache.catalog(tx, revision=1)
            assert len(catalog.current) >= 3  # the demo manifest's paths
            for path in catalog.current:
                await cache.version(tx, path.key, path.version)
    assert len(cache._catalogs) == 2 and len(cache._versions) == 5
    assert cache.cached(tenants[0], 1) is None  # the least recently used tenant was dropped
    assert cache.cached(tenants[-1], 1) is not None
    async with tenant_transaction(app_engine, tenants[0]) as tx:
        again = await cache.catalog(tx, revision=1)  # read again from PostgreSQL
    assert again.current and cache.cached(tenants[0], 1) is again
    assert len(cache._catalogs) == 2
