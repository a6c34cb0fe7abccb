"""The destinations slice's public service: the manifest's section applied, credentials, state, status, replay.

Other slices call these (``tenants plan``/``apply`` calls :func:`sync_manifest`); the slice's own consumer and
delivery worker (``consumer.py``, ``worker.py``) use them too. Every change to a destination is audited (kind
``destination``, subject ``destination:<name>``): the manifest adding, removing or changing one, its credentials
set (never the secret), an operator enabling or disabling it, the worker disabling it after sustained failure,
and a replay of its dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from pydantic import TypeAdapter, ValidationError

from firstmile.audit import service as audit
from firstmile.destinations import repository as repo
from firstmile.destinations.policy import CREDENTIAL_FIELDS, check_credentials
from firstmile.destinations.registry import Credentials
from firstmile.kit.db import TenantTx
from firstmile.security.crypto import FieldContext
from firstmile.security.datakeys import TenantKeys
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import DestinationSpec, TenantManifest

AUDIT_KIND = "destination"
_SPECS: TypeAdapter[tuple[DestinationSpec, ...]] = TypeAdapter(tuple[DestinationSpec, ...])
_json = msgspec.json.Encoder()


class DestinationError(ValueError):
    """An operator's request that cannot be done as asked (the message says what to do)."""


def specs_of(manifest: Mapping[str, Any]) -> dict[str, DestinationSpec]:
    """The ``destinations:`` section of a stored manifest (validated when it was applied), by name."""
    raw = manifest.get("destinations")
    if not raw:
        return {}
    try:
        return {spec.name: spec for spec in _SPECS.validate_python(raw)}
    except ValidationError:
        return {}


@dataclass(frozen=True, slots=True)
class TenantDestinations:
    """A tenant's destinations as its applied manifest declares them, and its personal traits."""

    specs: dict[str, DestinationSpec]
    pii_traits: tuple[str, ...] = ()
    slug: str = ""

    @property
    def enabled(self) -> list[DestinationSpec]:
        return [s for s in self.specs.values() if s.enabled]


async def tenant_destinations(tx: TenantTx) -> TenantDestinations:
    manifest = await tenancy.manifest(tx)
    pii = manifest.get("pii_traits") or ()
    slug = str((manifest.get("tenant") or {}).get("slug", ""))
    return TenantDestinations(specs_of(manifest), tuple(str(t) for t in pii), slug)


# ------------------------------------------------------------------------------------------- the manifest


_COMPARED = ("kind", "enabled", "events", "traits", "url", "region", "host", "max_batch", "max_wait_seconds")


async def sync_manifest(
    tx: TenantTx, before: Mapping[str, Any], after: TenantManifest, *, actor: str, dry_run: bool
) -> tuple[list[str], list[str]]:
    """What applying ``after`` changes in the tenant's destinations (``before``: the stored manifest), and the notes
    a plan prints (a destination that cannot deliver yet). A removed destination's queue, state and credentials
    are deleted; each change is audited. With ``dry_run`` nothing is written."""
    old = specs_of(before)
    new = {spec.name: spec for spec in after.destinations or ()}
    changes: list[str] = []
    audits: list[tuple[str, dict[str, Any]]] = []
    stored = await repo.credentials(tx)
    for name, spec in new.items():
        previous = old.get(name)
        if previous is None:
            changes.append(f"destination {name}: add ({spec.kind}{'' if spec.enabled else ', disabled'})")
            audits.append((name, {"action": "destination.added", "kind": spec.kind, "enabled": spec.enabled}))
            continue
        changed = [f for f in _COMPARED if getattr(previous, f) != getattr(spec, f)]
        if changed:
            changes.append(f"destination {name}: change {', '.join(changed)}")
            audits.append((name, {"action": "destination.changed", "kind": spec.kind, "fields": changed}))
    for name, spec in old.items():
        if name in new:
            continue
        if dry_run:
            changes.append(f"destination {name}: remove ({spec.kind}; its queue and credentials are deleted)")
        else:
            deleted = await repo.delete_destination(tx, name)
            await repo.delete_credentials(tx, name)
            changes.append(f"destination {name}: remove ({spec.kind}; {deleted} queued events and its credentials "
                           "deleted)")  # fmt: skip
        audits.append((name, {"action": "destination.removed", "kind": spec.kind}))
    if not dry_run:
        for name, payload in audits:
            await audit.append(tx, AUDIT_KIND, actor, f"destination:{name}", {"destination": name, **payload})
    notes: list[str] = []
    states = await repo.states(tx)
    slug = after.tenant.slug
    for name, spec in new.items():
        if not spec.enabled:
            continue
        if name not in stored:
            notes.append(f"destination {name}: not ready: no credentials stored (firstmile destinations credentials "
                         f"set --tenant {slug} --name {name})")  # fmt: skip
        state = states.get(name)
        if state is not None and state.disabled_at is not None:
            since = state.disabled_at.isoformat(timespec="seconds")
            notes.append(f"destination {name}: disabled since {since}: {state.disabled_reason} (firstmile "
                         f"destinations enable --tenant {slug} --name {name})")  # fmt: skip
    return changes, notes


# ------------------------------------------------------------------------------------------- credentials


def _context(tx: TenantTx, name: str) -> FieldContext:
    return FieldContext(tx.tenant, "destination_credentials", "credentials", name)


async def _open(tx: TenantTx, keys: TenantKeys, name: str, sealed: str) -> dict[str, str]:
    document = msgspec.json.decode(await keys.decrypt(tx, sealed, _context(tx, name)))
    return {str(k): str(v) for k, v in document.items()} if isinstance(document, dict) else {}


async def read_credentials(tx: TenantTx, keys: TenantKeys, name: str, now: datetime) -> Credentials | None:
    """A destination's decrypted credentials (the previous ones only while their rotation lasts), or None."""
    row = (await repo.credentials(tx)).get(name)
    if row is None:
        return None
    previous = None
    if row.previous is not None and row.previous_until is not None and row.previous_until > now:
        previous = await _open(tx, keys, name, row.previous)
    return Credentials(await _open(tx, keys, name, row.sealed), previous, row.version)


@dataclass(frozen=True, slots=True)
class CredentialsSet:
    name: str
    kind: str
    version: int
    fields: tuple[str, ...]
    previous_until: datetime | None


async def set_credentials(
    tx: TenantTx,
    keys: TenantKeys,
    name: str,
    values: Mapping[str, str],
    *,
    actor: str,
    rotate: bool = False,
    rotation: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> CredentialsSet:
    """Store credentials of a destination of the applied manifest, encrypted with the tenant's data key.

    ``values`` are merged into the stored ones (set one field at a time). With ``rotate`` the credentials they
    replace stay valid for ``rotation`` (a webhook signs with both secrets meanwhile); without it they are
    forgotten at once. Audited with the field names, never a value. :class:`DestinationError` when the manifest
    has no such destination or the values do not fit its kind.
    """
    at = now or datetime.now(UTC)
    spec = (await tenant_destinations(tx)).specs.get(name)
    if spec is None:
        raise DestinationError(
            f"the tenant's manifest has no destination {name!r}: add it and apply the manifest first"
        )
    current = await read_credentials(tx, keys, name, at)
    rows = await repo.credentials(tx)
    merged = {**(current.values if current is not None else {}), **values}
    try:
        check_credentials(spec.kind, merged)
    except ValueError as exc:
        raise DestinationError(f"destination {name}: {exc}") from None
    if rotate and (current is None or rotation <= timedelta(0)):
        raise DestinationError(f"destination {name}: --rotate keeps the credentials it replaces, and it has none yet")
    sealed = await keys.encrypt(tx, _json.encode(merged), _context(tx, name))
    previous, until = (rows[name].sealed, at + rotation) if rotate else (None, None)
    version = await repo.put_credentials(tx, name, sealed, previous, until, actor)
    payload = {"action": "destination.credentials.set", "destination": name, "kind": spec.kind,
               "fields": sorted(values), "version": version, "rotated": rotate,
               "previous_valid_until": until.isoformat() if until else None}  # fmt: skip
    await audit.append(tx, AUDIT_KIND, actor, f"destination:{name}", payload)
    return CredentialsSet(name, spec.kind, version, tuple(sorted(values)), until)


# ------------------------------------------------------------------------------------------- operator actions


async def _known(tx: TenantTx, name: str) -> DestinationSpec:
    spec = (await tenant_destinations(tx)).specs.get(name)
    if spec is None:
        raise DestinationError(f"the tenant's manifest has no destination {name!r}")
    return spec


async def enable(tx: TenantTx, name: str, actor: str) -> bool:
    """Turn a disabled destination back on (its failure streak starts afresh); False when it was not disabled."""
    spec = await _known(tx, name)
    if not await repo.enable(tx, name):
        return False
    await audit.append(tx, AUDIT_KIND, actor, f"destination:{name}",
                       {"action": "destination.enabled", "destination": name, "kind": spec.kind})  # fmt: skip
    return True


async def disable(tx: TenantTx, name: str, reason: str, actor: str, now: datetime | None = None) -> bool:
    """Stop delivering to a destination (its events keep queueing); False when it was disabled already."""
    spec = await _known(tx, name)
    if not await repo.disable(tx, name, reason, now or datetime.now(UTC)):
        return False
    await audit.append(tx, AUDIT_KIND, actor, f"destination:{name}",
                       {"action": "destination.disabled", "destination": name, "kind": spec.kind,
                        "reason": reason[:500]})  # fmt: skip
    return True


async def replay(tx: TenantTx, name: str, since: datetime | None, actor: str) -> int:
    """Make the destination's dead letters (those that died at ``since`` or later) pending again; how many."""
    spec = await _known(tx, name)
    moved = await repo.replay(tx, name, since)
    await audit.append(tx, AUDIT_KIND, actor, f"destination:{name}",
                       {"action": "destination.replay", "destination": name, "kind": spec.kind, "events": moved,
                        "since": since.isoformat() if since else None})  # fmt: skip
    return moved


# ------------------------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """One destination as ``firstmile destinations status`` shows it."""

    name: str
    kind: str
    enabled: bool
    """The manifest's ``enabled``."""
    disabled_at: datetime | None
    disabled_reason: str | None
    credentials_version: int | None
    pending: int
    due: int
    dead: int
    delivered: int
    oldest_pending_age_s: float | None
    failing_since: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    last_success_at: datetime | None
    dead_letters: list[repo.FailedRow] = field(default_factory=list)

    @property
    def delivering(self) -> bool:
        return self.enabled and self.disabled_at is None and self.credentials_version is not None


async def status(tx: TenantTx, now: datetime | None = None, *, last_errors: int = 5) -> list[DestinationStatus]:
    """Every destination of the tenant's manifest: enabled, queue counts, oldest pending age, errors."""
    at = now or datetime.now(UTC)
    found = await tenant_destinations(tx)
    counts = await repo.counts(tx)
    states = await repo.states(tx)
    stored = await repo.credentials(tx)
    result = []
    for name, spec in found.specs.items():
        c = counts.get(name, repo.Counts())
        s = states.get(name, repo.StateRow())
        age = (at - c.oldest_pending).total_seconds() if c.oldest_pending is not None else None
        result.append(
            DestinationStatus(
                name, spec.kind, spec.enabled, s.disabled_at, s.disabled_reason,
                stored[name].version if name in stored else None, c.pending, c.due, c.dead, c.done, age,
                s.failing_since, s.last_error, s.last_error_at, s.last_success_at,
                await repo.last_errors(tx, name, last_errors) if last_errors else [],
            )
        )  # fmt: skip
    return result


@dataclass(frozen=True, slots=True)
class DisabledBy:
    """Who disabled a destination, from its latest ``destination.disabled`` audit entry."""

    actor: str
    automatic: bool
    at: datetime


async def disabled_by(tx: TenantTx, name: str, *, look_back: int = 50) -> DisabledBy | None:
    """Who disabled the destination last (an operator, an admin, or the worker after sustained failure), read from
    the audit log (the newest of its last ``look_back`` entries); None when no entry says (the log purged)."""
    for entry in await audit.latest_entries(tx, AUDIT_KIND, look_back, f"destination:{name}"):
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        if payload.get("action") == "destination.disabled":
            return DisabledBy(entry.actor, bool(payload.get("automatic")), entry.created_at)
    return None


async def queued(tx: TenantTx, name: str) -> list[dict[str, Any]]:
    """Every row of a destination's queue, oldest first (for operators and tests)."""
    return await repo.rows(tx, name)


__all__ = [
    "AUDIT_KIND",
    "CREDENTIAL_FIELDS",
    "CredentialsSet",
    "DestinationError",
    "DestinationStatus",
    "DisabledBy",
    "TenantDestinations",
    "disable",
    "disabled_by",
    "enable",
    "queued",
    "read_credentials",
    "replay",
    "set_credentials",
    "specs_of",
    "status",
    "sync_manifest",
    "tenant_destinations",
]
