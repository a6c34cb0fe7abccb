"""The admin UI's path editor: a tenant's current paths, and edits that make a new version.

An edit changes the display and selection fields of a path (name, description,
priority); like `tenants apply`, it adds a new immutable version, retires the old
one (users on it stay there) and bumps the tenant's revision so every process
reloads its catalog. Edits of one path are serialised (the onboarding slice locks the
path for the transaction), so two admins editing at once make two versions, one after
the other. The manifest stays the source of truth: the next `tenants apply` of a
manifest that still says otherwise makes its own version, and `tenants plan` shows that
as a change. Each edit is an audit entry with the fields before and after.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx
from firstmile.onboarding import paths
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import PathSpec

EDITABLE = paths.EDITABLE


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


async def _manifest_hashes(tx: TenantTx) -> dict[str, str]:
    """Content hash of each path as the tenant's applied manifest defines it."""
    hashes: dict[str, str] = {}
    for raw in (await tenancy.manifest(tx)).get("paths", []):
        spec = PathSpec.model_validate(raw)
        hashes[spec.id] = spec.content_hash()
    return hashes


class PathEditor:
    """Read and edit the tenant's paths in the caller's transaction; never commits."""

    async def tenant_name(self, tx: TenantTx) -> str:
        return await tenancy.tenant_name(tx)

    async def list_paths(self, tx: TenantTx) -> list[dict[str, Any]]:
        rows = await paths.current_paths(tx)
        manifest = await _manifest_hashes(tx)
        return sorted((_summary(k, v, d, manifest.get(k)) for k, v, d in rows), key=lambda p: str(p["key"]))

    async def edit(self, tx: TenantTx, key: str, changes: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        """Apply ``changes`` to the current version of path ``key``; 404, 400 (validation) or the new summary."""
        edit = await paths.edit_path(tx, key, changes)
        manifest_hash = (await _manifest_hashes(tx)).get(key)
        if not edit.changed:
            return _summary(key, edit.to_version, edit.after, manifest_hash)  # nothing changed: no entry
        await tenancy.bump_revision(tx)
        before = {f: edit.before.get(f) for f in changes}
        await audit.append(
            tx,
            "path.edit",
            actor,
            f"path:{key}",
            {
                "from_version": edit.from_version,
                "to_version": edit.to_version,
                "before": before,
                "after": dict(changes),
            },
        )
        return _summary(key, edit.to_version, edit.after, manifest_hash)
