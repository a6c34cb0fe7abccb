"""Programmatic Alembic: ``firstmile migrate``, the operator commands' check and the test fixtures use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str, app_role: str = "firstmile_app") -> Config:
    """An Alembic config for the schema owner's ``url``; no ini file needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    cfg.attributes["app_role"] = app_role
    return cfg


def upgrade(url: str, app_role: str = "firstmile_app", revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (blocking; call from a thread in async code)."""
    command.upgrade(alembic_config(url, app_role), revision)


def check(url: str, app_role: str = "firstmile_app") -> None:
    """Raise if the table models and the migrations disagree (``alembic check``)."""
    command.check(alembic_config(url, app_role))


def heads() -> set[str]:
    """The head revisions of the migrations shipped with this code."""
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return set(ScriptDirectory.from_config(cfg).get_heads())


async def at_head(conn: AsyncConnection) -> bool:
    """Whether the database on ``conn`` is migrated to this code's head revisions (False when never migrated)."""
    exists = (await conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))).scalar_one()
    if not exists:
        return False
    applied = {r[0] for r in await conn.execute(text("SELECT version_num FROM alembic_version"))}
    return applied == heads()
