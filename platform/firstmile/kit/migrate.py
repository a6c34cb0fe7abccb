"""Programmatic Alembic: ``firstmile migrate`` and the test fixtures use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

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
