"""The admin UI's path editor: a tenant's current paths, and edits that make a new version.

An edit changes the display and selection fields of a path (name, description,
priority); like `tenants apply`, it adds a new immutable version, retires the old
one (users on it stay there) and bumps the tenant's revision so every process
reloads its catalog. The manifest stays the source of truth: the next
`tenants apply` of a manifest that still says otherwise makes its own version, and
`tenants plan` shows that as a change. Each edit is an audit entry with the fields
before and after.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit.db import TenantId, run_in_tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding import repository as repo
from firstmile.tenancy.manifest import PathSpec
from firstmile.tenancy.models import tenants

EDITABLE = ("name", "description", "priority")


async def tenant_name(engine: AsyncEngine, tenant_id: TenantId) -> str:
    async def work(conn: AsyncConnection) -> str:
        return str((await conn.execute(select(tenants.c.name).where(tenants.c.id == tenant_id))).scalar_one())

    return await run_in_tenant_transaction(engine, tenant_id, work)


def _summary(key: str, version: int, definition: dict[str, Any], manifest_hash: str | None = None) -> dict[str, Any]:
    """A path for the UI; ``matches_manifest`` is False when its current version is not the one the
    tenant's applied manifest describes (an edit made here, which the next `tenants apply` replaces)."""
    return {
        "key": key,
        "version": version,
        "name": definition.get("name", key),
        "description": definition.get("description", ""),
        "priority": definition.get("priority", 0),
        "steps": [step.get("id") for step in definition.get("steps", [])],
        "activation_step": definition.get("activation_step"),
        "matches_manifest": manifest_hash is not None
        and PathSpec.model_validate(definition).content_hash() == manifest_hash,
    }


async def _manifest_hashes(conn: AsyncConnection, tenant_id: TenantId) -> dict[str, str]:
    """Content hash of each path as the tenant's applied manifest defines it."""
    manifest = (await conn.execute(select(tenants.c.manifest).where(tenants.c.id == tenant_id))).scalar_one()
    hashes: dict[str, str] = {}
    for raw in (manifest or {}).get("paths", []):
        spec = PathSpec.model_validate(raw)
        hashes[spec.id] = spec.content_hash()
    return hashes


async def list_paths(engine: AsyncEngine, tenant_id: TenantId) -> list[dict[str, Any]]:
    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        rows = await repo.current_path_definitions(conn, tenant_id)
        manifest = await _manifest_hashes(conn, tenant_id)
        return sorted((_summary(k, v, d, manifest.get(k)) for k, v, d in rows), key=lambda p: str(p["key"]))

    return await run_in_tenant_transaction(engine, tenant_id, work)


async def edit_path(
    engine: AsyncEngine, tenant_id: TenantId, key: str, changes: dict[str, Any], *, actor: str
) -> dict[str, Any]:
    """Apply ``changes`` to the current version of path ``key``; 404, 400 (validation) or the new summary."""
    if not changes:
        raise ProblemError(400, "validation-error", f"nothing to change: send one of {', '.join(EDITABLE)}")

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        current = {k: (v, d) for k, v, d in await repo.current_path_definitions(conn, tenant_id)}
        if key not in current:
            raise ProblemError(404, "path-not-found", f"the tenant has no current path {key!r}")
        version, definition = current[key]
        try:
            spec = PathSpec.model_validate({**definition, **changes})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ProblemError(400, "validation-error", f"{first['msg']} (at {where})") from None
        edited = spec.model_dump(mode="json")
        manifest_hash = (await _manifest_hashes(conn, tenant_id)).get(key)
        if spec.content_hash() == PathSpec.model_validate(definition).content_hash():
            return _summary(key, version, edited, manifest_hash)  # nothing changed: no version, no entry
        latest = (await repo.latest_versions(conn, tenant_id))[key]
        await repo.retire_path(conn, tenant_id, key)
        await repo.insert_path_version(conn, tenant_id, key, latest + 1, edited, spec.content_hash())
        await conn.execute(
            update(tenants)
            .where(tenants.c.id == tenant_id)
            .values(revision=tenants.c.revision + 1, updated_at=func.now())
        )
        before = {f: definition.get(f) for f in changes}
        await audit.append(
            conn,
            tenant_id,
            "path.edit",
            actor,
            f"path:{key}",
            {"from_version": version, "to_version": latest + 1, "before": before, "after": changes},
        )
        return _summary(key, latest + 1, edited, manifest_hash)

    return await run_in_tenant_transaction(engine, tenant_id, work)
