"""Applying a tenant manifest to this region's database and key provider, and auditing operator actions.

These are operator tasks (the CLI runs them as the schema owner): each owns its transaction,
as a request's unit of work does. Provider calls (a new tenant's data key) happen before the
transaction opens, so a provider that is down or misconfigured fails the apply with nothing
written, and no lock is held while it answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.destinations import service as destinations
from firstmile.experiments import service as experiments
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from firstmile.onboarding.paths import current_paths, edited_here, sync_paths
from firstmile.security.datakeys import (
    NewTenantKeys,
    ProviderSource,
    as_source,
    has_tenant_keys,
    new_tenant_keys,
    store_tenant_keys,
)
from firstmile.security.keys import KeyProvider
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import PathSpec, TenantManifest
from firstmile.tenancy.service import TenancyError

OPERATOR = OPERATOR_CLI.actor
"""The actor of audit entries written by operator commands (a person at the CLI, as the schema owner)."""

__all__ = ["OPERATOR", "ApplyResult", "TenancyError", "apply_manifest", "record_provisioning", "record_secret_read"]


UiEdits = Literal["refuse", "overwrite", "keep"]
"""What `tenants apply` does with paths edited in the admin UI that the manifest would replace."""


@dataclass
class ApplyResult:
    tenant_id: TenantId
    slug: str
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What a plan points out without it being a change (a destination with no credentials yet)."""

    @property
    def changed(self) -> bool:
        return bool(self.changes)


async def apply_manifest(
    engine: AsyncEngine,
    manifest: TenantManifest,
    *,
    dry_run: bool = False,
    key_providers: KeyProvider | ProviderSource | None = None,
    ui_edits: UiEdits = "refuse",
) -> ApplyResult:
    """Make the database match ``manifest``; idempotent (paths: :func:`~firstmile.onboarding.paths.sync_paths`).

    ``dry_run`` does all the database work and rolls it back: the changes are what `plan` prints.
    With ``key_providers`` (``tenants apply``), a tenant without data keys gets its provider key and
    first data and index keys (``create data key``): made by the provider first, stored in the
    apply's transaction. A plan only looks (it never calls the provider, which for Vault would
    create the key).

    ``ui_edits``: what to do with a path whose current version was made outside the manifest (the admin path
    editor, a revert, an experiment's promotion) when the manifest would replace it: ``refuse`` (the default:
    :class:`TenancyError` naming the paths; a plan lists them and goes on), ``overwrite``, or ``keep`` them as
    they are and apply the rest (``make run`` re-applying the demo manifest).
    """
    spec = manifest.tenant
    async with engine.connect() as conn:
        existing = await tenancy.find_tenant(conn, spec.slug)
    if existing is not None and existing.home_region != spec.home_region:
        raise TenancyError(
            f"tenant {spec.slug} is homed in {existing.home_region}; moving it to "
            f"{spec.home_region} is a data migration, not a manifest change"
        )
    tenant_id = OPERATOR_CLI.tenant(existing.id if existing is not None else uuid.uuid4())
    needs_keys = False
    if key_providers is not None:
        if existing is None:
            needs_keys = True
        else:
            async with tenant_transaction(engine, tenant_id) as tx:
                needs_keys = not await has_tenant_keys(tx)
    material: NewTenantKeys | None = None
    if needs_keys and not dry_run:
        assert key_providers is not None
        provider = as_source(key_providers).for_spec(manifest.keys)
        material = await new_tenant_keys(provider, tenant_id)  # network, before the transaction

    result = ApplyResult(tenant_id, spec.slug)
    async with tenant_transaction(engine, tenant_id, commit=not dry_run) as tx:
        if existing is None:
            await tenancy.create_tenant(tx, manifest)
            result.changes.append(f"create tenant {spec.slug} in {spec.home_region}")
        edited: dict[str, int] = {}
        if existing is not None:
            applied = [PathSpec.model_validate(p) for p in (await tenancy.manifest(tx)).get("paths", [])]
            edited = await edited_here(tx, applied, manifest.paths)
        for key, version in edited.items():
            if ui_edits == "refuse" and dry_run:
                result.changes.append(f"path {key}: version {version} was edited in the admin UI and this manifest "
                                      "would replace it: apply refuses (firstmile tenants export writes the current "
                                      "paths to a manifest; --overwrite-ui-edits replaces them)")  # fmt: skip
            elif ui_edits == "overwrite":
                result.changes.append(f"path {key}: replaces version {version}, edited in the admin UI")
            elif ui_edits == "keep":
                result.changes.append(f"path {key}: keeps version {version}, edited in the admin UI")
        if edited and ui_edits == "refuse" and not dry_run:
            listed = ", ".join(f"{k} (version {v})" for k, v in edited.items())
            raise TenancyError(f"tenant {spec.slug}: paths edited in the admin UI would be replaced: {listed}. Write "
                               f"them into the manifest with `firstmile tenants export {spec.slug}`, or apply with "
                               "--overwrite-ui-edits")  # fmt: skip
        keep = frozenset(edited) if ui_edits == "keep" else frozenset()
        result.changes.extend(await sync_paths(tx, manifest.paths, keep))
        try:
            result.changes.extend(await experiments.sync_manifest(tx, manifest.experiments, OPERATOR, manifest.nudges))
        except experiments.ExperimentError as exc:  # a running experiment's allocation may not change
            raise TenancyError(exc.detail) from exc
        if needs_keys and (material is None or await store_tenant_keys(tx, material)):
            where = (
                f"keys.provider {manifest.keys.provider}"
                if manifest.keys is not None
                else "the platform's key provider"
            )
            result.changes.append(f"create data key ({where})")
        before = await tenancy.manifest(tx) if existing is not None else {}
        changed, notes = await destinations.sync_manifest(tx, before, manifest, actor=OPERATOR, dry_run=dry_run)
        result.changes.extend(changed)
        result.notes.extend(notes)
        manifest_hash = manifest.content_hash()
        # the paths are part of the manifest: any change above also changed its hash
        if existing is not None and existing.manifest_hash != manifest_hash:
            if existing.name != spec.name:
                result.changes.append(f"tenant {spec.slug}: rename to {spec.name!r}")
            if not result.changes:
                result.changes.append(f"tenant {spec.slug}: manifest settings updated")
            await tenancy.update_tenant(tx, manifest)
        if result.changes and not dry_run:
            await audit.append(
                tx,
                "admin",
                OPERATOR,
                spec.slug,
                {"action": "tenants.apply", "changes": result.changes, "manifest_hash": manifest_hash},
            )
    return result


async def record_provisioning(engine: AsyncEngine, slug: str, changes: list[str]) -> bool:
    """Audit SSO provisioning changes made for ``slug`` (one entry); False when the tenant has no row."""
    if not changes:
        return False
    return await _operator_entry(engine, slug, f"sso:{slug}", {"action": "sso.provision", "changes": changes})


async def record_secret_read(engine: AsyncEngine, slug: str, client_id: str) -> bool:
    """Audit that an operator read the secret of machine client ``client_id`` (never the secret itself).

    False when the tenant has no row here: the caller then withholds the secret, so no read goes unaudited.
    """
    return await _operator_entry(engine, slug, f"client:{client_id}", {"action": "sso.client_secret.read"})


async def _operator_entry(engine: AsyncEngine, slug: str, subject: str, payload: dict[str, object]) -> bool:
    async with engine.connect() as conn:
        found = await tenancy.find_tenant(conn, slug)
    if found is None:
        return False
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(found.id)) as tx:
        await audit.append(tx, "admin", OPERATOR, subject, payload)
    return True


async def export_manifest(engine: AsyncEngine, slug: str) -> str:
    """The tenant's applied manifest with its paths as they are now (edits made in the admin UI, reverts and
    promotions included), as YAML; applying it changes no path. :class:`TenancyError` for an unknown tenant."""
    async with engine.connect() as conn:
        found = await tenancy.find_tenant(conn, slug)
    if found is None:
        raise TenancyError(f"no tenant {slug!r}")
    async with tenant_transaction(engine, OPERATOR_CLI.tenant(found.id), commit=False) as tx:
        document = dict(await tenancy.manifest(tx))
        current = {key: definition for key, _, definition in await current_paths(tx)}
    order = [p["id"] for p in document.get("paths", []) if p.get("id") in current]
    order += sorted(set(current) - set(order))
    document["paths"] = [{"id": key, **{k: v for k, v in current[key].items() if k != "id"}} for key in order]
    TenantManifest.model_validate(document)  # what is written applies
    header = f"# tenant {slug}: exported {datetime.now(UTC).isoformat(timespec='seconds')} with its current paths\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
