"""Operator actions land in the tenant's audit log, in the same transaction as the change."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit.repository import EntryFilter, list_entries
from firstmile.controlplane.service import apply_manifest
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.tenancy.cli import list_keys, revoke_key
from tests.conftest import new_tenant, sequenced


async def _actions(app_engine: AsyncEngine, tenant_id: uuid.UUID) -> list[tuple[str, str, str]]:
    await sequenced(app_engine, tenant_id)
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant_id)) as tx:
        entries = await list_entries(tx, EntryFilter(), 100)
    return [(e.kind, e.actor, e.payload.get("action", "")) for e in entries]


async def test_apply_key_creation_and_revocation_are_audited(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await new_tenant(admin_engine)
    assert await _actions(app_engine, tenant.id) == [
        ("admin", "operator:cli", "tenants.apply"),
        ("admin", "operator:cli", "keys.create"),
    ]
    unchanged = await apply_manifest(admin_engine, tenant.manifest)
    assert not unchanged.changes
    assert len(await _actions(app_engine, tenant.id)) == 2  # applying again changes nothing, audits nothing
    renamed = tenant.manifest.model_copy(
        update={"tenant": tenant.manifest.tenant.model_copy(update={"name": "Renamed Inc"})}
    )
    planned = await apply_manifest(admin_engine, renamed, dry_run=True)
    assert planned.changes  # a plan sees the change …
    assert len(await _actions(app_engine, tenant.id)) == 2  # … and audits nothing, since nothing changed
    key_id = (await list_keys(admin_engine, tenant.slug))[0].id
    assert await revoke_key(admin_engine, tenant.slug, key_id)
    assert (await _actions(app_engine, tenant.id))[-1] == ("admin", "operator:cli", "keys.revoke")
