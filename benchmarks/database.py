"""Setting up the benchmarks' databases (one helper for all of them) and reading them back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from benchmarks.common import APP_ROLE, BENCH_DB, BYPASS_ROLE, PATH_KEY, STEP, TENANT, _log


def _url(url: str, driver: str, *, database: str | None = None, user: str | None = None) -> str:
    parsed = make_url(url).set(drivername=driver)
    if database is not None:
        parsed = parsed.set(database=database)
    if user is not None:
        parsed = parsed.set(username=user, password=None)
    return parsed.render_as_string(hide_password=False)


def _asyncpg_dsn(url: str, *, database: str | None = None, user: str | None = None) -> str:
    """A plain libpq URL for asyncpg."""
    return _url(url, "postgresql", database=database, user=user)


def _sqlalchemy_url(url: str, *, database: str | None = None, user: str | None = None) -> str:
    """The same server for SQLAlchemy with asyncpg."""
    return _url(url, "postgresql+asyncpg", database=database, user=user)


@dataclass(frozen=True)
class ServerInfo:
    version: str
    settings: dict[str, str]
    data_directory: str


async def _recreate_database(admin_dsn: str, name: str) -> ServerInfo:
    """Drop and create database ``name``; returns the server's version and settings."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        version = str(await conn.fetchval("SELECT version()"))
        settings = {
            setting: str(await conn.fetchval(f"SELECT current_setting('{setting}')"))
            for setting in ("server_version", "shared_buffers", "fsync", "synchronous_commit", "max_connections")
        }
        data_dir = str(await conn.fetchval("SELECT current_setting('data_directory')"))
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return ServerInfo(version, settings, data_dir)


@dataclass(frozen=True)
class BenchDatabase:
    """A benchmark's database, freshly recreated and migrated: its URLs and its server."""

    name: str
    server_url: str  # the superuser URL it was made from (any database of the server)
    admin_url: str  # SQLAlchemy URL of the superuser on this database
    admin_dsn: str  # the same for asyncpg
    server: ServerInfo
    postmaster: int | None

    def url(self, role: str) -> str:
        """SQLAlchemy URL of login role ``role`` (no password: the bench server trusts loopback) on this database."""
        return _sqlalchemy_url(self.server_url, database=self.name, user=role)

    def dsn(self, role: str) -> str:
        """The same for asyncpg."""
        return _asyncpg_dsn(self.server_url, database=self.name, user=role)

    @property
    def app_url(self) -> str:
        """SQLAlchemy URL of the application role (what the API servers use)."""
        return self.url(APP_ROLE)


def fresh_bench_database(admin: str, name: str = BENCH_DB) -> BenchDatabase:
    """Drop, create and migrate database ``name`` on the server of ``admin`` (a superuser URL).

    The one set-up of every benchmark that uses PostgreSQL: the migrations create the roles and
    grants, and the application role may log in afterwards (``app_url``).
    """
    _log(f"recreating database {name}")
    server = asyncio.run(_recreate_database(_asyncpg_dsn(admin), name))
    _log("migrating")
    from firstmile.wiring.migrate import upgrade

    admin_url = _sqlalchemy_url(admin, database=name)
    admin_dsn = _asyncpg_dsn(admin, database=name)
    upgrade(admin_url, APP_ROLE)
    asyncio.run(_execute(admin_dsn, f"ALTER ROLE {APP_ROLE} LOGIN"))
    return BenchDatabase(
        name=name,
        server_url=admin,
        admin_url=admin_url,
        admin_dsn=admin_dsn,
        server=server,
        postmaster=_postmaster_pid(server.data_directory),
    )


def _postmaster_pid(data_dir: str) -> int | None:
    """The PostgreSQL server's pid (readable when it runs on this machine), for CPU accounting."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(data_dir, "postmaster.pid").read_text(encoding="utf-8").splitlines()[0])
    return None


async def _provision(admin_url: str, pepper: bytes, manifest: Path) -> tuple[str, uuid.UUID]:
    """Apply the demo manifest, create a key, create the BYPASSRLS role."""
    from sqlalchemy import text

    from firstmile.controlplane.service import apply_manifest
    from firstmile.kit.db import create_engine
    from firstmile.tenancy.cli import create_key
    from firstmile.tenancy.manifest import load_manifest

    engine = create_engine(admin_url, pool_size=1, max_overflow=0, application_name="firstmile-bench")
    try:
        async with engine.begin() as conn:
            exists = (await conn.execute(text(f"SELECT 1 FROM pg_roles WHERE rolname = '{BYPASS_ROLE}'"))).first()
            if exists is None:
                await conn.execute(text(f"CREATE ROLE {BYPASS_ROLE} LOGIN BYPASSRLS"))
            await conn.execute(text(f"ALTER ROLE {BYPASS_ROLE} LOGIN BYPASSRLS"))
            await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {BYPASS_ROLE}"))
            await conn.execute(text(f"GRANT SELECT ON user_progress, step_completions TO {BYPASS_ROLE}"))
        applied = await apply_manifest(engine, load_manifest(manifest))
        created = await create_key(engine, pepper, TENANT, ["onboarding:write"], "bench")
    finally:
        await engine.dispose()
    return created.key, applied.tenant_id


async def _fetch_column(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


_UNCOMPLETED = (
    "SELECT p.user_id FROM user_progress p WHERE p.tenant_id = $1 AND p.path_key = $2 AND NOT EXISTS "
    "(SELECT 1 FROM step_completions c WHERE c.tenant_id = p.tenant_id AND c.user_id = p.user_id "
    "AND c.step_id = $3) ORDER BY p.started_at, p.user_id"
)


def _uncompleted(dsn: str, tenant_id: uuid.UUID) -> list[str]:
    return [str(u) for u in asyncio.run(_fetch_column(dsn, _UNCOMPLETED, tenant_id, PATH_KEY, STEP))]


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _count(dsn: str, sql: str, *args: Any) -> int:
    return int(asyncio.run(_fetch_column(dsn, sql, *args))[0])
