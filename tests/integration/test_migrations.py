"""Migrations: models and migrations agree, and the chain goes down and up again."""

from __future__ import annotations

import asyncio

from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.kit.migrate import alembic_config, check, upgrade
from tests.conftest import Database


def test_models_match_migrations(database: Database) -> None:
    check(database.admin_url)  # raises if autogenerate would produce any operation


def test_downgrade_and_upgrade_roundtrip(database: Database) -> None:
    scratch = f"{database.name}_scratch"
    server = make_url(database.admin_url)

    async def recreate() -> None:
        engine = create_async_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{scratch}"'))
        await engine.dispose()

    asyncio.run(recreate())
    url = server.set(database=scratch).render_as_string(hide_password=False)
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    upgrade(url)
    upgrade(url)  # idempotent: already at head
    check(url)
