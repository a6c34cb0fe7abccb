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
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.onboarding import repository as repo
from firstmile.tenancy.manifest import PathSpec

EDITABLE = ("name", "description", "priority", "targeting", "activation_step", "steps")
"""What the admin path editor may change: everything but the path's id."""


class PathInvalidError(ProblemError):
    """A path edit that breaks the manifest's rules: 400 with every error, each at its field (``steps.2.title``)."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        first = errors[0]
        super().__init__(400, "validation-error", f"{first['message']} (at {first['key']})", errors=errors)
        self.errors = errors


def validated(key: str, definition: Mapping[str, Any]) -> PathSpec:
    """``definition`` as a path of id ``key`` under the manifest's rules, or :class:`PathInvalidError`."""
    try:
        return PathSpec.model_validate({**definition, "id": key})
    except ValidationError as exc:
        errors = [
            {"key": ".".join(str(p) for p in e["loc"]) or "path",
             "message": e["msg"].removeprefix("Value error, "), "source": "body"}
            for e in exc.errors()
        ]  # fmt: skip
        raise PathInvalidError(errors) from None


async def edited_here(tx: TenantTx, applied: Sequence[PathSpec], wanted: Sequence[PathSpec]) -> dict[str, int]:
    """Current versions made outside the manifest (the admin path editor, a revert, an experiment's promotion) that
    a manifest of ``wanted`` paths would replace or retire, by path key: their current version. ``applied``: the
    paths of the manifest applied last (what `tenants apply` made)."""
    current = await repo.current_path_hashes(tx)
    made = {p.id: p.content_hash() for p in applied}
    asked = {p.id: p.content_hash() for p in wanted}
    return {key: version for key, (version, digest) in sorted(current.items())
            if made.get(key) != digest and asked.get(key) != digest}  # fmt: skip


async def sync_paths(tx: TenantTx, paths: Sequence[PathSpec], keep: frozenset[str] = frozenset()) -> list[str]:
    """Make the tenant's current paths match ``paths``; returns what changed, in words. Paths in ``keep`` stay as
    they are (edits made in the admin UI that the caller chose to keep)."""
    changes: list[str] = []
    wanted = {p.id: p for p in paths if p.id not in keep}
    current = {k: v for k, v in (await repo.current_path_hashes(tx)).items() if k not in keep}
    for key in sorted(set(wanted) | set(current)):
        await repo.lock_path(tx, key)
    current = {k: v for k, v in (await repo.current_path_hashes(tx)).items() if k not in keep}  # as of the locks
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
    spec = validated(key, {**definition, **changes})
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


@dataclass(frozen=True, slots=True)
class PathVersion:
    """One stored version of a path."""

    version: int
    current: bool
    created_at: datetime
    content_hash: str


async def versions(tx: TenantTx, key: str) -> list[PathVersion]:
    """Every version of path ``key``, newest first (404 when the tenant never had it)."""
    found = [PathVersion(*row) for row in await repo.path_versions(tx, key)]
    if not found:
        raise ProblemError(404, "path-not-found", f"the tenant has no path {key!r}")
    return found


async def definition_of(tx: TenantTx, key: str, version: int) -> dict[str, Any]:
    """The definition of one stored version (404 when there is none)."""
    if version not in {v.version for v in await versions(tx, key)}:
        raise ProblemError(404, "path-version-not-found", f"path {key!r} has no version {version}")
    return await repo.path_definition(tx, key, version)


async def revert_path(tx: TenantTx, key: str, version: int) -> PathEdit:
    """Make the definition of an earlier ``version`` current again, as a new version (numbers are never reused;
    users stay pinned to theirs). 404 for an unknown path or version; no version when it is current already."""
    earlier = await definition_of(tx, key, version)
    return await edit_path(tx, key, {f: earlier[f] for f in EDITABLE if f in earlier})


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from one definition to another: the path's own fields, steps added and removed, steps changed
    (field by field), and whether the order of the steps both have changed."""
    fields = {f: {"from": before.get(f), "to": after.get(f)} for f in EDITABLE if f != "steps"
              and before.get(f) != after.get(f)}  # fmt: skip
    old = {s["id"]: s for s in before.get("steps", [])}
    new = {s["id"]: s for s in after.get("steps", [])}
    changed = [
        {"id": sid, "fields": {f: {"from": old[sid].get(f), "to": new[sid].get(f)}
                               for f in sorted(set(old[sid]) | set(new[sid])) if old[sid].get(f) != new[sid].get(f)}}
        for sid in new if sid in old and old[sid] != new[sid]
    ]  # fmt: skip
    kept_old = [s for s in old if s in new]
    kept_new = [s for s in new if s in old]
    return {
        "fields": fields,
        "steps_added": [s for s in new if s not in old],
        "steps_removed": [s for s in old if s not in new],
        "steps_changed": changed,
        "order_changed": kept_old != kept_new,
    }
