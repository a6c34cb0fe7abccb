"""Migrations: models and migrations agree, and the chain goes down and up again."""

from __future__ import annotations

from alembic import command
from sqlalchemy.engine import make_url

from firstmile.wiring.migrate import alembic_config, check, upgrade
from tests.conftest import Database
from tests.factories import recreate_database


def test_models_match_migrations(database: Database) -> None:
    check(database.admin_url)  # raises if autogenerate would produce any operation


def test_downgrade_and_upgrade_roundtrip(database: Database) -> None:
    scratch = f"{database.name}_scratch"
    server = make_url(database.admin_url)

    url = recreate_database(server, scratch)
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    upgrade(url)
    upgrade(url)  # idempotent: already at head
    check(url)
