"""Embedded defaults: a pgserver PostgreSQL under ``<data_dir>/pg`` and generated secrets.

Called by the CLI when no external database is configured, never at import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from firstmile.kit.secrets import secret_file
from firstmile.settings import Settings

log = logging.getLogger("firstmile.embedded")
EMBEDDED_DB = "firstmile"


@dataclass(frozen=True)
class DatabaseUrls:
    app: str
    admin: str
    embedded: bool


def resolve_database(settings: Settings) -> DatabaseUrls:
    """The URLs the API and the operator commands use; starts pgserver if embedded."""
    if settings.database.url is not None:
        app = settings.database.url.get_secret_value()
        admin = settings.database.admin_url.get_secret_value() if settings.database.admin_url else app
        return DatabaseUrls(app=app, admin=admin, embedded=False)
    import pgserver  # imported lazily: only embedded mode needs it

    pg_dir = settings.data_dir / "pg"
    pg_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pg_dir, cleanup_mode=None)  # type: ignore[attr-defined]
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DB}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DB};")
        log.info("created embedded database", extra={"fields": {"dir": str(pg_dir)}})
    host = f"?host={pg_dir}"
    return DatabaseUrls(
        app=f"postgresql+asyncpg://{settings.database.app_role}@/{EMBEDDED_DB}{host}",
        admin=f"postgresql+asyncpg://postgres@/{EMBEDDED_DB}{host}",
        embedded=True,
    )


def resolve_pepper(settings: Settings) -> bytes:
    """The API key pepper: configured, or generated once into the data dir (embedded only)."""
    if settings.tenancy.api_key_pepper is not None:
        return settings.tenancy.api_key_pepper.get_secret_value().encode("utf-8")
    if settings.database.url is not None:
        raise RuntimeError("FIRSTMILE_API_KEY_PEPPER must be set when FIRSTMILE_DATABASE_URL is")
    path = secret_file(settings.data_dir, "api_key_pepper")
    return path.read_text(encoding="utf-8").strip().encode("utf-8")


def stop_embedded(data_dir: Path, timeout: float = 30.0) -> bool:
    """Fast-stop the embedded PostgreSQL under ``data_dir`` if it runs; True if one was stopped.

    Uses PostgreSQL's own contract (the first line of ``postmaster.pid`` is the
    postmaster's pid; SIGINT is a fast shutdown) rather than pgserver internals.
    """
    import os
    import signal
    import time

    pid_file = data_dir / "pg" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    raise TimeoutError(f"embedded PostgreSQL (pid {pid}) did not stop within {timeout}s")
