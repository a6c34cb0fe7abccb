"""The admin path editor and `tenants apply` share the source of truth without losing either side's change: a plan
lists a path edited in the UI, apply refuses to replace it (nothing changed), `--overwrite-ui-edits` replaces it,
`make run`'s apply keeps it, and `tenants export` writes the current paths into a manifest that applies cleanly."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.paths import PathEditor
from firstmile.controlplane.service import apply_manifest, export_manifest
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.onboarding import paths
from firstmile.tenancy.manifest import load_manifest
from firstmile.tenancy.service import TenancyError
from tests.conftest import REGION
from tests.factories import db_snapshot, manifest_for

KEY = "developer-quickstart"


async def _edit(app_engine: AsyncEngine, tenant_id: Any, changes: dict[str, Any]) -> int:
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant_id)) as tx:
        done = await PathEditor().edit(tx, KEY, changes, actor="admin:test")
    return int(done["version"])


async def _current(app_engine: AsyncEngine, tenant_id: Any) -> dict[str, tuple[int, dict[str, Any]]]:
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant_id), commit=False) as tx:
        return {k: (v, d) for k, v, d in await paths.current_paths(tx)}


async def test_apply_refuses_to_replace_an_edit_made_in_the_admin_ui_and_export_round_trips(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, tmp_path: Path
) -> None:
    slug = f"pd-{secrets.token_hex(4)}"
    manifest = manifest_for(slug, REGION)
    tenant = (await apply_manifest(admin_engine, manifest)).tenant_id
    edited = await _edit(app_engine, tenant, {"name": "Quickstart, edited in the UI"})
    assert edited == 2

    plan = await apply_manifest(admin_engine, manifest, dry_run=True)
    assert any(c.startswith(f"path {KEY}: version 2 was edited in the admin UI") for c in plan.changes), plan.changes
    before = await db_snapshot(admin_engine, tenant)
    with pytest.raises(TenancyError, match=f"{KEY} \\(version 2\\).*firstmile tenants export {slug}"):
        await apply_manifest(admin_engine, manifest)
    assert await db_snapshot(admin_engine, tenant) == before  # refused: nothing changed

    # a manifest that changes another path applies that, and keeps the edit (what make run does)
    document = manifest.model_dump(mode="json")
    other = next(p for p in document["paths"] if p["id"] == "product-analytics")
    other["name"] = "Product analytics, renamed in the manifest"
    changed = manifest_for(slug, REGION, document)
    kept = await apply_manifest(admin_engine, changed, ui_edits="keep")
    assert f"path {KEY}: keeps version 2, edited in the admin UI" in kept.changes
    current = await _current(app_engine, tenant)
    assert current[KEY][1]["name"] == "Quickstart, edited in the UI"
    assert current["product-analytics"][1]["name"] == "Product analytics, renamed in the manifest"

    # export: the manifest with the UI's version; applying it changes no path, and nothing is drift any more
    text = await export_manifest(admin_engine, slug)
    exported = tmp_path / "exported.yaml"
    exported.write_text(text, encoding="utf-8")
    roundtrip = load_manifest(exported)
    assert next(p for p in roundtrip.paths if p.id == KEY).name == "Quickstart, edited in the UI"
    again = await apply_manifest(admin_engine, roundtrip)
    assert not [c for c in again.changes if c.startswith("path ")], again.changes
    assert (await apply_manifest(admin_engine, roundtrip)).changes == []

    # overwrite: the manifest's version replaces a later UI edit, said so
    await _edit(app_engine, tenant, {"priority": 7})
    overwritten = await apply_manifest(admin_engine, manifest, ui_edits="overwrite")
    assert any(c.startswith(f"path {KEY}: replaces version") for c in overwritten.changes), overwritten.changes
    assert (await _current(app_engine, tenant))[KEY][1]["priority"] == next(
        p.priority for p in manifest.paths if p.id == KEY
    )


def test_tenants_export_and_apply_flags_are_in_the_cli() -> None:
    from firstmile.cli import main

    runner = CliRunner()
    exported = runner.invoke(main, ["tenants", "export", "--help"])
    assert exported.exit_code == 0 and "current paths" in exported.output
    applied = runner.invoke(main, ["tenants", "apply", "--help"])
    assert applied.exit_code == 0 and "--overwrite-ui-edits" in applied.output
