"""``firstmile audit``: checkpoint, verify (exit status, first bad entry), public-key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import repository as repo
from firstmile.audit.schemas import checkpoint_out
from firstmile.audit.service import append
from firstmile.audit.signing import AuditSigner
from firstmile.cli import main
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.settings import get_settings
from tests.conftest import Database, TenantFixture, sequenced, unaudited_tenant


@pytest.fixture
def env(database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The operator's environment; yields the signing key file."""
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()  # the commands read these, not what an earlier test cached
    key_file = tmp_path / "audit_signing_key"
    key_file.write_text(bytes(range(32)).hex())
    yield key_file
    get_settings.cache_clear()


async def _log(
    app_engine: AsyncEngine, admin_engine: AsyncEngine, count: int, *, sequence: bool = True
) -> TenantFixture:
    tenant = await unaudited_tenant(admin_engine)
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        for i in range(count):
            await append(tx, "admin", "operator", f"thing:{i}", {"i": i})
    if sequence:
        await sequenced(app_engine, tenant.id)
    return tenant


def _invoke(*args: str) -> tuple[int, str, str]:
    """``firstmile audit ARGS``: through the root command, which puts the operator services on the context."""
    result = CliRunner().invoke(main, ["audit", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


async def _cli(*args: str) -> tuple[int, str, str]:
    """The command runs its own event loop (asyncio.run): off this test's loop, in a thread."""
    return await asyncio.to_thread(_invoke, *args)


async def test_checkpoint_verify_and_tamper(env: Path, app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _log(app_engine, admin_engine, 12)
    code, out, _ = await _cli("checkpoint", "--tenant", tenant.slug, "--key-file", str(env))
    assert code == 0 and out.startswith("checkpoint 12 root ")
    code, out, _ = await _cli("checkpoint", "--tenant", str(tenant.id), "--key-file", str(env))
    assert code == 0 and "nothing to sign" in out

    code, out, err = await _cli("verify", "--tenant", tenant.slug, "--key-file", str(env))
    assert code == 0, out
    assert "OK" in out and "verified 12/12 entries" in err
    async with tenant_transaction(admin_engine, OPERATOR_CLI.tenant(tenant.id), commit=False) as tx:
        saved = [msgspec.to_builtins(checkpoint_out(c)) for c in await repo.list_checkpoints(tx)]
    kept = env.parent / "checkpoints.json"
    kept.write_text(json.dumps({"checkpoints": saved}))
    code, out, _ = await _cli("verify", "--tenant", tenant.slug, "--key-file", str(env), "--checkpoint", str(kept))
    assert code == 0, out
    kept.write_text("{}")
    code, _, err = await _cli("verify", "--tenant", tenant.slug, "--key-file", str(env), "--checkpoint", str(kept))
    assert code == 1 and "not a checkpoint" in err

    pem = AuditSigner.from_file(env).public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = env.parent / "audit.pub"
    public.write_bytes(pem)
    async with admin_engine.begin() as conn:
        await conn.execute(text("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_immutable"))
        await conn.execute(
            text("UPDATE audit_entries SET payload = '{\"i\": 99}' WHERE tenant_id = :t AND seq = 5"), {"t": tenant.id}
        )
        await conn.execute(text("ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_immutable"))
    code, out, _ = await _cli("verify", "--tenant", tenant.slug, "--public-key", str(public))
    assert code == 1
    assert "first bad entry is seq 5: content-mismatch" in out
    code, out, _ = await _cli("verify", "--tenant", tenant.slug, "--public-key", str(public), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert (doc["first_bad_seq"], doc["first_bad_reason"]) == (5, "content-mismatch")
    code, out, _ = await _cli("checkpoint", "--tenant", tenant.slug, "--key-file", str(env))
    assert code == 0 and "nothing to sign" in out  # no new entries: nothing to re-check


async def test_checkpoint_refuses_a_broken_chain(env: Path, app_engine: AsyncEngine, admin_engine: AsyncEngine) -> None:
    tenant = await _log(app_engine, admin_engine, 4)
    async with admin_engine.begin() as conn:
        await conn.execute(text("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_immutable"))
        await conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq = 2"), {"t": tenant.id})
        await conn.execute(text("ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_immutable"))
    code, _, err = await _cli("checkpoint", "--tenant", tenant.slug, "--key-file", str(env))
    assert code == 1
    assert "not signed: entry 2 is missing" in err


async def test_checkpoint_sequences_the_queue_first(
    env: Path, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tenant = await _log(app_engine, admin_engine, 3, sequence=False)
    code, out, err = await _cli("checkpoint", "--tenant", tenant.slug, "--key-file", str(env))
    assert code == 0, err
    assert "sequenced 3 queued entries" in err and out.startswith("checkpoint 3 root ")


def test_public_key_and_unknown_tenant(env: Path) -> None:
    code, out, err = _invoke("public-key", "--key-file", str(env))
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----")
    assert f"key id {AuditSigner.from_file(env).key_id}" in err
    code, _, err = _invoke("verify", "--tenant", "no-such-tenant", "--key-file", str(env))
    assert code == 1 and "no tenant 'no-such-tenant'" in err


def test_external_database_needs_a_key_file(env: Path) -> None:
    code, _, err = _invoke("public-key")
    assert code == 1 and "FIRSTMILE_AUDIT_SIGNING_KEY_FILE" in err
