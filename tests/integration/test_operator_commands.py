"""Operator commands say what to do instead of failing obscurely, and the process model refuses what
would silently split state between workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from firstmile.cli import main
from firstmile.settings import Settings, get_settings
from firstmile.wiring.commands import check_process_model
from firstmile.wiring.operator import record_served_url
from tests.conftest import _TAG
from tests.factories import recreate_database


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean FIRSTMILE_* environment with its own data folder; the settings are read afresh."""
    for name in list(os.environ):
        if name.startswith("FIRSTMILE_") and not name.startswith("FIRSTMILE_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    get_settings.cache_clear()
    return result


def test_several_embedded_workers_are_refused_before_anything_starts(environment: pytest.MonkeyPatch) -> None:
    result = _run("serve", "--workers", "2")
    assert result.exit_code == 1
    assert "2 workers need FIRSTMILE_REDIS_URL" in result.output
    assert "FIRSTMILE_ANALYTICS_BACKEND=clickhouse" in result.output
    assert not (Path(os.environ["FIRSTMILE_DATA_DIR"]) / "pg").exists()  # no embedded database was started


def test_several_workers_are_fine_once_their_state_is_shared(capsys: pytest.CaptureFixture[str]) -> None:
    check_process_model(Settings(), 1)
    shared = Settings(redis_url="redis://127.0.0.1:6379/0", analytics_backend="clickhouse")  # type: ignore[call-arg]
    check_process_model(shared, 4)
    with pytest.raises(Exception, match="FIRSTMILE_ANALYTICS_BACKEND"):
        check_process_model(Settings(redis_url="redis://127.0.0.1:6379/0"), 2)  # type: ignore[call-arg]
    assert capsys.readouterr().err == ""
    # with an external database (a deployment serving only the API, a benchmark) it is a warning
    external = Settings(database_url="postgresql+asyncpg://app@db/firstmile")  # type: ignore[call-arg]
    check_process_model(external, 2)
    assert capsys.readouterr().err.startswith("warning: 2 workers need FIRSTMILE_REDIS_URL")


@pytest.fixture
def empty_database(worker_id: str) -> str:
    server = make_url(os.environ["FIRSTMILE_TEST_ADMIN_URL"])
    return recreate_database(server, f"firstmile_test_{_TAG}{worker_id}_empty")


def test_a_command_on_a_database_never_migrated_says_to_migrate(
    environment: pytest.MonkeyPatch, empty_database: str
) -> None:
    environment.setenv("FIRSTMILE_DATABASE_URL", empty_database)
    environment.setenv("FIRSTMILE_DATABASE_ADMIN_URL", empty_database)
    environment.setenv("FIRSTMILE_API_KEY_PEPPER", "p" * 32)
    # commands on a slice's engine, and those that open their own from the schema owner's URL
    for command in (
        ("keys", "create", "--tenant", "demo", "--scope", "onboarding:write"),
        ("keys", "rotate", "--tenant", "demo"),
    ):
        result = _run(*command)
        assert result.exit_code == 1, command
        assert "not migrated to this version of Firstmile: run `firstmile migrate`" in result.output
        assert "Traceback" not in result.output and "relation" not in result.output


def test_login_links_point_where_the_server_listens(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("FIRSTMILE_PORT", "8124")
    link = _run("admin", "login-link", "--tenant", "demo")
    assert link.exit_code == 0, link.output
    assert link.output.startswith("http://127.0.0.1:8124/admin/bootstrap?token=")  # it said :8000 whatever the port
    record_served_url(tmp_path, "http://127.0.0.1:8125")  # a `firstmile serve --port 8125` on this data folder
    served = _run("admin", "login-link", "--tenant", "demo")
    assert served.output.startswith("http://127.0.0.1:8125/admin/bootstrap?token="), served.output
    environment.setenv("FIRSTMILE_PUBLIC_URL", "https://admin.example.com")
    public = _run("admin", "login-link", "--tenant", "demo", "--role", "viewer")
    assert public.output.startswith("https://admin.example.com/admin/bootstrap?token="), public.output
