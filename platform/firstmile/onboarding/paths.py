"""Versioning of a tenant's onboarding paths, as `tenants apply` asks for it.

A path whose definition changed becomes a new version; users already on the old
version stay on it (their progress names the version). A path that left the
manifest is retired: no new users, existing ones keep it. Version numbers are
never reused.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import TenantId
from firstmile.onboarding import repository as repo
from firstmile.tenancy.manifest import PathSpec


async def sync_paths(conn: AsyncConnection, tenant_id: TenantId, paths: Sequence[PathSpec]) -> list[str]:
    """Make the tenant's current paths match ``paths``; returns what changed, in words."""
    changes: list[str] = []
    current = await repo.current_path_hashes(conn, tenant_id)
    latest = await repo.latest_versions(conn, tenant_id)
    wanted = {p.id: p for p in paths}
    for key, path in wanted.items():
        digest = path.content_hash()
        if key in current and current[key][1] == digest:
            continue
        version = latest.get(key, 0) + 1
        if key in current:
            await repo.retire_path(conn, tenant_id, key)
            changes.append(f"path {key}: new version {version} (was {current[key][0]})")
        else:
            changes.append(f"path {key}: create version {version}")
        await repo.insert_path_version(conn, tenant_id, key, version, path.model_dump(mode="json"), digest)
    for key in sorted(set(current) - set(wanted)):
        await repo.retire_path(conn, tenant_id, key)
        changes.append(f"path {key}: retire version {current[key][0]}")
    return changes
