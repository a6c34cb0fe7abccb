"""The admin UI's path editor: a tenant's current paths, edits that make a new version, versions, revert.

An edit changes any field of a path but its id (name, description, priority, targeting,
activation step, steps with their order, prerequisites, optional flag and completion
criteria), checked by the manifest's own rules; like `tenants apply`, it adds a new
immutable version, retires the old one (users on it stay there) and bumps the tenant's
revision so every process reloads its catalog. Edits of one path are serialised (the
onboarding slice locks the path for the transaction), so two admins editing at once make
two versions, one after the other. A revert publishes an earlier version's definition as
a new version. Each edit and revert is an audit entry with the fields before and after.

Who wins against the manifest: a path edited here differs from the tenant's applied
manifest, and `tenants plan` reports it; `tenants apply` refuses to replace it unless told
to (`--overwrite-ui-edits`), and `firstmile tenants export` writes the current paths back
to a manifest (docs/admin-ui.md, "The path editor").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.onboarding import domain, paths
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

    async def definition(self, tx: TenantTx, key: str, version: int | None = None) -> dict[str, Any]:
        """The definition of the current version (None) or of a stored one, with its version and summary."""
        if version is None:
            current = {k: (v, d) for k, v, d in await paths.current_paths(tx)}
            if key not in current:
                await paths.versions(tx, key)  # 404 for a path the tenant never had
                raise ProblemError(409, "path-retired", f"path {key!r} has no current version (it was retired)")
            version, found = current[key]
        else:
            found = await paths.definition_of(tx, key, version)
        return {"key": key, "version": version, "definition": found}

    async def validate(self, tx: TenantTx, key: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``changes`` to path ``key`` as an edit would, without publishing; the checklist a new user would
        see (400 with every error otherwise)."""
        current = await self.definition(tx, key)
        spec = paths.validated(key, {**current["definition"], **changes})
        return {"valid": True, "preview": preview(spec.model_dump(mode="json"))}

    async def versions(self, tx: TenantTx, key: str) -> list[dict[str, Any]]:
        manifest_hash = (await _manifest_hashes(tx)).get(key)
        found = await paths.versions(tx, key)
        return [{"version": v.version, "current": v.current, "created_at": v.created_at.isoformat(),
                 "matches_manifest": v.content_hash == manifest_hash} for v in found]  # fmt: skip

    async def diff(self, tx: TenantTx, key: str, first: int, second: int) -> dict[str, Any]:
        before = await paths.definition_of(tx, key, first)
        after = await paths.definition_of(tx, key, second)
        return {"key": key, "from": first, "to": second} | paths.diff(before, after)

    async def revert(self, tx: TenantTx, key: str, version: int, *, actor: str) -> dict[str, Any]:
        """Publish version ``version``'s definition as a new version (audited as ``path.revert``)."""
        edit = await paths.revert_path(tx, key, version)
        manifest_hash = (await _manifest_hashes(tx)).get(key)
        if edit.changed:
            await tenancy.bump_revision(tx)
            await audit.append(tx, "path.revert", actor, f"path:{key}",
                               {"from_version": edit.from_version, "to_version": edit.to_version,
                                "definition_of": version})  # fmt: skip
        return _summary(key, edit.to_version, edit.after, manifest_hash)


def preview(definition: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The checklist a user starting on this definition sees: each step, whether it is open at once or locked
    behind which steps (the same rules as the onboarding service)."""
    path = domain.PathDef.from_definition(str(definition.get("id", "")), 0, definition)
    return [{"id": s.id, "title": s.title, "description": s.description, "optional": s.optional,
             "activation": s.id == path.activation_step, "available": domain.is_available(s, {}),
             "waits_for": list(s.prerequisites)} for s in path.steps]  # fmt: skip
