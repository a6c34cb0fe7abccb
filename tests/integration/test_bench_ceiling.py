"""`make bench`'s ceiling runs the start's own transaction through pgbench (``benchmarks/ceiling.py``).

The script is built from the repositories' statements, so it follows them when they change; run here once
on the test database, it must do what a start's transaction does, as the application role, through RLS.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.ceiling import find_pgbench, pgbench_command, pgbench_script
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from tests.conftest import Database, TenantFixture


async def test_the_ceiling_script_writes_what_a_start_writes(
    database: Database, admin_engine: AsyncEngine, tenant: TenantFixture, tmp_path: Path
) -> None:
    script = tmp_path / "start.sql"
    script.write_text(pgbench_script(), encoding="utf-8")
    dsn = make_url(database.app_url).set(drivername="postgresql").render_as_string(hide_password=False)
    done = await asyncio.to_thread(
        subprocess.run,
        [*pgbench_command(find_pgbench(), script, tenant.id), "-c", "1", "-t", "3", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "number of failed transactions: 0" in done.stdout
    async with tenant_transaction(admin_engine, OPERATOR_CLI.tenant(tenant.id), commit=False) as tx:
        counts = (
            await tx.execute(
                text(
                    "SELECT (SELECT count(*) FROM end_users WHERE tenant_id = :t AND user_id LIKE 'ceiling-%'),"
                    " (SELECT count(*) FROM user_progress WHERE tenant_id = :t AND user_id LIKE 'ceiling-%'),"
                    " (SELECT count(*) FROM audit_queue WHERE tenant_id = :t AND subject LIKE 'ceiling-%')"
                ),
                {"t": tenant.id},
            )
        ).one()
    # (the outbox row is written by the same statement; the session's in-process relay may have sent it already)
    assert tuple(counts) == (3, 3, 3)
