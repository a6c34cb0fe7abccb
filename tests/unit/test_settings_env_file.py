"""FIRSTMILE_ENV_FILE: the secrets a Vault Agent renders into a file reach the settings, the
environment still wins, and a promised file that is not there stops the process."""

from __future__ import annotations

from pathlib import Path

import pytest

from firstmile.settings import Settings

URL = "postgresql+asyncpg://app:s3cret@db.internal:5432/firstmile"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("FIRSTMILE_DATABASE_URL", "FIRSTMILE_REGION", "FIRSTMILE_PORT", "FIRSTMILE_API_KEY_PEPPER"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_come_from_the_named_file_and_the_environment_wins(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    rendered = tmp_path / "firstmile.env"
    rendered.write_text(
        f'FIRSTMILE_DATABASE_URL="{URL}"\n'
        "FIRSTMILE_REGION=us-east-1\n"
        "FIRSTMILE_PORT=9001\n"
        "FIRSTMILE_NOT_A_SETTING=1\n"
        "PATH=/nowhere\n",
        encoding="utf-8",
    )
    clean_env.setenv("FIRSTMILE_ENV_FILE", str(rendered))
    clean_env.setenv("FIRSTMILE_PORT", "9002")
    settings = Settings()
    assert settings.database.url is not None and settings.database.url.get_secret_value() == URL
    assert settings.region == "us-east-1"
    assert settings.server.port == 9002  # the process environment wins over the file
    assert not settings.embedded


def test_without_the_variable_no_file_is_read(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.delenv("FIRSTMILE_ENV_FILE", raising=False)
    clean_env.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"FIRSTMILE_DATABASE_URL={URL}\n", encoding="utf-8")
    assert Settings().database.url is None


def test_a_named_file_that_is_missing_stops_the_process(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "not-rendered-yet.env"
    clean_env.setenv("FIRSTMILE_ENV_FILE", str(missing))
    with pytest.raises(ValueError, match=f"FIRSTMILE_ENV_FILE={missing}: cannot read it"):
        Settings()


def test_values_in_the_file_are_validated_like_the_environment(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    rendered = tmp_path / "firstmile.env"
    rendered.write_text("FIRSTMILE_PORT=not-a-port\n", encoding="utf-8")
    clean_env.setenv("FIRSTMILE_ENV_FILE", str(rendered))
    with pytest.raises(ValueError, match="port"):
        Settings()
