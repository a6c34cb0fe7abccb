"""Test data: manifests and database snapshots, always for an explicit tenant."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.tenancy.manifest import TenantManifest
from firstmile.wiring.schema import TENANT_OWNED_TABLES

ROOT = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = ROOT / "tenants" / "demo.yaml"


def demo_document(*, planner: bool = False, sso: bool = False) -> dict[str, Any]:
    """The demo manifest; without its ``planner`` section unless asked, so the rules alone decide
    (the adaptive planner's tests ask for it), and without its ``sso`` section unless asked, so tests
    that provision realms name exactly the groups and clients they check (the machine-client tests ask)."""
    doc: dict[str, Any] = yaml.safe_load(DEMO_MANIFEST.read_text(encoding="utf-8"))
    if not planner:
        doc.pop("planner", None)
    if not sso:
        doc.pop("sso", None)
    return doc


def provisioned_kek(path: Path) -> Path:
    """A local KEK file as an operator provisions one (32 random bytes, hex, 0600): with an external
    database nothing generates it, and ``tenants apply`` needs it to make a new tenant's data key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def manifest_for(slug: str, region: str, document: dict[str, Any] | None = None) -> TenantManifest:
    """The demo manifest's paths under another tenant identity."""
    doc = document if document is not None else demo_document()
    doc["tenant"] = {"slug": slug, "name": f"Tenant {slug}", "home_region": region}
    return TenantManifest.model_validate(doc)


async def db_snapshot(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> dict[str, str]:
    """A digest of every row the tenant owns, per table: equal snapshots mean nothing changed."""
    snapshot: dict[str, str] = {}
    async with admin_engine.connect() as conn:
        for table in (*TENANT_OWNED_TABLES, "tenants"):
            column = "id" if table == "tenants" else "tenant_id"
            row = (
                await conn.execute(
                    text(
                        f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                        f"FROM {table} t WHERE {column} = :tid"
                    ),
                    {"tid": tenant_id},
                )
            ).one()
            snapshot[table] = f"{row[0]}:{row[1]}"
    return snapshot


def recreate_database(server: URL, name: str) -> str:
    """Drop and create database ``name`` on ``server``; returns its URL (blocking)."""
    import asyncio

    async def run() -> None:
        engine = create_async_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()

    asyncio.run(run())
    return server.set(database=name).render_as_string(hide_password=False)
