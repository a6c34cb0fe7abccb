"""The global tenant directory: the PostgreSQL adapter on a second database of the test
server, the regional fallback on this region's database, `tenants apply` registering,
and a client-credentials token of a tenant known only to the directory getting 421."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from litestar.testing import AsyncTestClient
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.auth.resolver import KeyResolver
from firstmile.cli import main
from firstmile.settings import get_settings
from firstmile.sso.tokens import RealmNaming
from firstmile.tenancy import keys as keylib
from firstmile.tenancy.directory import (
    CachedTenantDirectory,
    DirectoryEntry,
    PostgresTenantDirectory,
    RegionalTenantDirectory,
)
from tests.conftest import PEPPER, REGION, Database, make_settings, new_tenant
from tests.factories import demo_document, provisioned_kek, recreate_database
from tests.support.keycloak import client, client_credentials_token, client_scope, mappers, server


@pytest.fixture(scope="module")
def directory_url(database: Database, worker_id: str) -> str:
    """A second database on the test server, standing in for the global directory."""
    # named after this run's database, so that concurrent runs (FIRSTMILE_TEST_DB_TAG) keep apart
    return recreate_database(make_url(database.admin_url), f"{database.name}_directory")


@pytest.fixture
async def directory(directory_url: str) -> AsyncIterator[PostgresTenantDirectory]:
    found = PostgresTenantDirectory.from_url(directory_url)
    await found.ensure_schema()
    await found.ensure_schema()  # idempotent
    try:
        yield found
    finally:
        await found.aclose()


async def test_register_list_remove_are_idempotent(directory: PostgresTenantDirectory) -> None:
    slug, tenant_id = f"d-{secrets.token_hex(4)}", uuid.uuid4()
    assert await directory.home_region(slug) is None
    assert await directory.register(slug, tenant_id, "us-east-1") is True
    assert await directory.register(slug, tenant_id, "us-east-1") is False
    assert await directory.home_region(slug) == "us-east-1"
    assert DirectoryEntry(slug, tenant_id, "us-east-1") in await directory.list()
    assert await directory.register(slug, tenant_id, "eu-central-1") is True  # the directory follows a move
    assert await directory.home_region(slug) == "eu-central-1"
    assert await directory.remove(slug) is True
    assert await directory.remove(slug) is False
    assert await directory.home_region(slug) is None
    assert all(entry.slug != slug for entry in await directory.list())


async def test_the_cache_remembers_misses_and_answers_for_its_ttl_and_forgets_what_it_changes(
    directory: PostgresTenantDirectory,
) -> None:
    cached = CachedTenantDirectory(directory, ttl=300, max_entries=2)
    made_up, other = f"d-{secrets.token_hex(4)}", f"d-{secrets.token_hex(4)}"
    assert await cached.home_region(made_up) is None
    # registered behind the cache's back (another region's `tenants apply`): the miss is remembered
    await directory.register(made_up, uuid.uuid4(), "us-east-1")
    assert await cached.home_region(made_up) is None
    assert await CachedTenantDirectory(directory, ttl=0).home_region(made_up) == "us-east-1"  # ttl 0: no cache
    # a change made through the cache drops the entry at once
    assert await cached.register(made_up, uuid.uuid4(), "eu-central-1") is True
    assert await cached.home_region(made_up) == "eu-central-1"
    await directory.register(made_up, uuid.uuid4(), "ap-south-1")
    assert await cached.home_region(made_up) == "eu-central-1"  # a hit is cached too
    assert await cached.remove(made_up) is True
    assert await cached.home_region(made_up) is None
    # bounded: two more slugs evict the oldest entry, which is then read afresh
    await directory.register(made_up, uuid.uuid4(), "us-east-1")
    assert await cached.home_region(other) is None
    assert await cached.home_region(f"d-{secrets.token_hex(4)}") is None
    assert await cached.home_region(made_up) == "us-east-1"
    await directory.remove(made_up)


async def test_the_regional_fallback_is_this_regions_tenants(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    here = await new_tenant(admin_engine)
    abroad = await new_tenant(admin_engine, region="us-east-1")
    # the application role reads it through firstmile_resolve_tenant (it cannot read the table)
    regional = RegionalTenantDirectory(app_engine)
    assert await regional.home_region(here.slug) == REGION
    assert await regional.home_region(abroad.slug) == "us-east-1"
    assert await regional.home_region(f"n-{secrets.token_hex(4)}") is None
    await regional.ensure_schema()
    # register and remove change nothing: `tenants apply` owns the rows
    assert await regional.register(here.slug, uuid.uuid4(), "us-east-1") is False
    assert await regional.remove(here.slug) is False
    assert await regional.home_region(here.slug) == REGION
    listed = {e.slug: e for e in await RegionalTenantDirectory(admin_engine).list()}
    assert listed[here.slug] == DirectoryEntry(here.slug, here.id, REGION)
    assert listed[abroad.slug].home_region == "us-east-1"


@pytest.fixture
def cli_env(database: Database, directory_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(provisioned_kek(tmp_path / "kek")))  # apply makes data keys
    monkeypatch.setenv("FIRSTMILE_DIRECTORY_URL", directory_url)
    monkeypatch.delenv("FIRSTMILE_KEYCLOAK_URL", raising=False)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["tenants", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


async def test_apply_registers_the_home_region(
    cli_env: None, directory: PostgresTenantDirectory, tmp_path: Path
) -> None:
    slug = f"a-{secrets.token_hex(4)}"
    doc = demo_document()
    doc["tenant"] = {"slug": slug, "name": f"Tenant {slug}", "home_region": REGION}
    path = tmp_path / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    code, out = await asyncio.to_thread(_invoke, "plan", str(path))
    assert code == 0, out
    assert await directory.home_region(slug) is None  # plan changes nothing
    code, out = await asyncio.to_thread(_invoke, "apply", str(path))
    assert code == 0, out
    assert f"tenant {slug}: directory: home region {REGION}" in out
    assert await directory.home_region(slug) == REGION
    code, out = await asyncio.to_thread(_invoke, "apply", str(path))
    assert code == 0 and "directory" not in out  # idempotent
    assert next(e for e in await directory.list() if e.slug == slug).home_region == REGION
    code, out = await asyncio.to_thread(_invoke, "directory")
    assert code == 0 and f"{slug}\t{REGION}\t" in out


async def test_a_token_of_a_tenant_homed_only_elsewhere_gets_421(
    keycloak_url: str,
    database: Database,
    directory_url: str,
    directory: PostgresTenantDirectory,
    analytics_store: ChdbStore,
) -> None:
    """The tenant is in no table of this region, only in the directory: 421 with its home region,
    before any JWKS is fetched; a tenant unknown everywhere stays 401."""
    srv = server(keycloak_url)
    naming = RealmNaming(srv.base)
    slug, nowhere = f"g-{secrets.token_hex(4)}", f"g-{secrets.token_hex(4)}"
    await directory.register(slug, uuid.uuid4(), "us-east-1")
    tokens: dict[str, str] = {}
    try:
        for name in (slug, nowhere):
            srv.admin.create_realm({"realm": naming.realm(name), "enabled": True})
            srv.admin.change_current_realm(naming.realm(name))
            for scope in keylib.SCOPES:
                srv.admin.create_client_scope(client_scope(scope))
            secret = secrets.token_urlsafe(24)
            srv.admin.create_client(
                client("app", secret, mappers(name, audience=True), default_scopes=["onboarding:write"])
            )
            srv.admin.change_current_realm("master")
            tokens[name] = client_credentials_token(srv.base, naming.realm(name), "app", secret)
        app = create_app(
            make_settings(keycloak_url=srv.base, directory_url=directory_url),
            database.app_url,
            PEPPER,
            analytics=analytics_store,
        )
        async with AsyncTestClient(app=app, raise_server_exceptions=False) as api:
            moved = await api.post(
                "/v1/onboarding/start", json={"user_id": "dir-1"}, headers={"Authorization": f"Bearer {tokens[slug]}"}
            )
            assert moved.status_code == 421, moved.text
            body = moved.json()
            assert body["type"].endswith("/wrong-region") and body["home_region"] == "us-east-1"
            unknown = await api.post(
                "/v1/onboarding/start",
                json={"user_id": "dir-2"},
                headers={"Authorization": f"Bearer {tokens[nowhere]}"},
            )
            assert unknown.status_code == 401 and unknown.json()["reason"] == "wrong_tenant"
            resolver: KeyResolver = app.state.container.key_resolver
            assert resolver.tokens is not None and resolver.tokens.jwks.fetches == 0
    finally:
        srv.admin.change_current_realm("master")
        existing = {r["realm"] for r in srv.admin.get_realms()}
        for name in (slug, nowhere):
            if naming.realm(name) in existing:
                srv.admin.delete_realm(naming.realm(name))
