"""Versioning of a tenant's onboarding paths: `tenants apply` and the admin path editor.

A path whose definition changed becomes a new version; users already on the old
version stay on it (their progress names the version). A path that left the
manifest is retired: no new users, existing ones keep it. Version numbers are
never reused. Changes to one path are serialised per tenant and path (a transaction
advisory lock), so two concurrent edits make two versions one after the other instead
of racing for the same number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.onboarding import repository as repo
from firstmile.tenancy.manifest import PathSpec

EDITABLE = ("name", "description", "priority")
"""What the admin path editor may change: display and selection fields, never the steps."""


async def sync_paths(tx: TenantTx, paths: Sequence[PathSpec]) -> list[str]:
    """Make the tenant's current paths match ``paths``; returns what changed, in words."""
    changes: list[str] = []
    wanted = {p.id: p for p in paths}
    current = await repo.current_path_hashes(tx)
    for key in sorted(set(wanted) | set(current)):
        await repo.lock_path(tx, key)
    current = await repo.current_path_hashes(tx)  # as of the locks
    latest = await repo.latest_versions(tx)
    for key, path in wanted.items():
        digest = path.content_hash()
        if key in current and current[key][1] == digest:
            continue
        version = latest.get(key, 0) + 1
        if key in current:
            await repo.retire_path(tx, key)
            changes.append(f"path {key}: new version {version} (was {current[key][0]})")
        else:
            changes.append(f"path {key}: create version {version}")
        await repo.insert_path_version(tx, key, version, path.model_dump(mode="json"), digest)
    for key in sorted(set(current) - set(wanted)):
        await repo.retire_path(tx, key)
        changes.append(f"path {key}: retire version {current[key][0]}")
    return changes


async def current_paths(tx: TenantTx) -> list[tuple[str, int, dict[str, Any]]]:
    """``(key, version, definition)`` of the tenant's current paths."""
    return await repo.current_path_definitions(tx)


@dataclass(frozen=True, slots=True)
class PathEdit:
    """The outcome of an edit: the version edited and the one made (equal when nothing changed)."""

    key: str
    from_version: int
    to_version: int
    before: dict[str, Any]
    after: dict[str, Any]

    @property
    def changed(self) -> bool:
        return self.to_version != self.from_version


async def edit_path(tx: TenantTx, key: str, changes: Mapping[str, Any]) -> PathEdit:
    """Apply ``changes`` (of :data:`EDITABLE` fields) to the current version of path ``key``.

    A new immutable version when something changed; 404 for an unknown path, 400 when the
    result is not a valid path. Waits for any other change to the same path to commit first.
    """
    unknown = sorted(set(changes) - set(EDITABLE))
    if unknown or not changes:
        raise ProblemError(400, "validation-error", f"nothing to change: send one of {', '.join(EDITABLE)}")
    await repo.lock_path(tx, key)
    current = {k: (v, d) for k, v, d in await repo.current_path_definitions(tx)}
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
    if spec.content_hash() == PathSpec.model_validate(definition).content_hash():
        return PathEdit(key, version, version, definition, edited)  # nothing changed: no version
    latest = (await repo.latest_versions(tx))[key]
    await repo.retire_path(tx, key)
    await repo.insert_path_version(tx, key, latest + 1, edited, spec.content_hash())
    return PathEdit(key, version, latest + 1, definition, edited)


async def adopt_path(tx: TenantTx, key: str, source_key: str) -> PathEdit:
    """A new version of path ``key`` that starts users on the steps of path ``source_key`` (its name, description,
    steps and activation step), keeping ``key``'s id, targeting and priority: an experiment's winning path
    promoted to the audience of its control. 404 for an unknown path; no version when nothing would change."""
    await repo.lock_path(tx, key)
    current = {k: (v, d) for k, v, d in await repo.current_path_definitions(tx)}
    for name in (key, source_key):
        if name not in current:
            raise ProblemError(404, "path-not-found", f"the tenant has no current path {name!r}")
    version, definition = current[key]
    source = current[source_key][1]
    taken: dict[str, Any] = {f: source[f] for f in ("name", "description", "steps", "activation_step") if f in source}
    adopted: dict[str, Any] = {**definition, **taken}
    spec = PathSpec.model_validate(adopted)
    if spec.content_hash() == PathSpec.model_validate(definition).content_hash():
        return PathEdit(key, version, version, definition, definition)
    latest = (await repo.latest_versions(tx))[key]
    await repo.retire_path(tx, key)
    await repo.insert_path_version(tx, key, latest + 1, spec.model_dump(mode="json"), spec.content_hash())
    return PathEdit(key, version, latest + 1, definition, spec.model_dump(mode="json"))
