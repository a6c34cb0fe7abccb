"""``firstmile destinations …`` and ``tenants plan`` as an operator runs them, on the test database: the secret
only from stdin or the environment, audited without it; a test event the endpoint verifies; status, enable and
disable."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from firstmile.cli import main
from firstmile.controlplane.service import apply_manifest
from firstmile.destinations.policy import new_webhook_secret
from firstmile.settings import get_settings
from tests.conftest import PEPPER, REGION, Database
from tests.factories import demo_document, manifest_for, provisioned_kek
from tests.support.webhook_receiver import WebhookReceiver


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: Database) -> Iterator[None]:
    """The operator's environment: the test database, a provisioned KEK, nothing else of the caller's."""
    for name in list(os.environ):
        if name.startswith("FIRSTMILE_") and not name.startswith("FIRSTMILE_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_REGION", REGION)
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.app_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_API_KEY_PEPPER", PEPPER.decode())
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(provisioned_kek(tmp_path / "kek")))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


async def firstmile(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    """One command, in a thread (each command runs its own event loop)."""
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, list(args), input=stdin, env=env, catch_exceptions=False)
    get_settings.cache_clear()
    return result


async def audit_payloads(admin: AsyncEngine, tenant_id: Any) -> list[dict[str, Any]]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM audit_queue WHERE tenant_id = :t AND kind = 'destination' ORDER BY created_at"),
            {"t": tenant_id},
        )
        return [json.loads(r[0]) for r in rows]


async def test_an_operator_sets_credentials_tests_and_toggles_a_destination(
    environment: None, admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    with WebhookReceiver() as receiver:
        slug = f"t-{secrets.token_hex(5)}"
        doc = demo_document() | {"destinations": [{"name": "hooks", "kind": "webhook", "url": receiver.url}]}
        path = tmp_path / f"{slug}.yaml"
        manifest = manifest_for(slug, REGION, doc)
        path.write_text(yaml.safe_dump(manifest.model_dump(mode="json", exclude_none=True)), encoding="utf-8")
        tenant_id = (await apply_manifest(admin_engine, manifest)).tenant_id

        planned = await firstmile("tenants", "plan", str(path))
        assert planned.exit_code == 0, planned.output
        assert "destination hooks: add" not in planned.output  # applied already: no change, a note
        assert (f"tenant {slug}: note: destination hooks: not ready: no credentials stored (firstmile destinations "
                f"credentials set --tenant {slug} --name hooks)") in planned.output  # fmt: skip

        # the secret: from stdin, then from the environment, then generated; never an argument
        first, second = new_webhook_secret(), new_webhook_secret()
        result = await firstmile("destinations", "credentials", "set", "--tenant", slug, "--name", "hooks",
                                 stdin=first + "\n")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "destination hooks: credentials set (secret; version 1)" in result.output
        result = await firstmile("destinations", "credentials", "set", "--tenant", slug, "--name", "hooks",
                                 "--from-env", "HD_HOOK_SECRET", env={"HD_HOOK_SECRET": second})  # fmt: skip
        assert result.exit_code == 0 and "version 2" in result.output, result.output
        result = await firstmile("destinations", "credentials", "set", "--tenant", slug, "--name", "hooks",
                                 "--generate", "--rotate")  # fmt: skip
        assert result.exit_code == 0, result.output
        generated = result.stdout.strip().splitlines()[-1]
        assert generated.startswith("whsec_") and "the previous ones stay valid until" in result.output
        for refused, message in [
            (("--secret", first), "No such option '--secret'"),
            (("--field", "write_key"), "credential fields are secret"),
            (("--from-env", "HD_UNSET"), "HD_UNSET is not set"),
        ]:
            result = await firstmile("destinations", "credentials", "set", "--tenant", slug, "--name", "hooks",
                                     *refused)  # fmt: skip
            assert result.exit_code != 0 and message in result.output, result.output
        result = await firstmile("destinations", "credentials", "set", "--tenant", slug, "--name", "ghost",
                                 stdin=first)  # fmt: skip
        assert result.exit_code == 1 and "has no destination 'ghost'" in result.output

        # a test event, signed with the generated secret and the one it replaced (the rotation)
        receiver.secrets = [generated, second]
        result = await firstmile("destinations", "test", "--tenant", slug, "--name", "hooks")
        assert result.exit_code == 0, result.output
        assert "destination hooks (webhook): delivered" in result.output
        [delivery] = receiver.deliveries
        assert delivery.verified_by == (0, 1)
        Webhook(generated).verify(receiver.requests[0].body, receiver.requests[0].headers)
        receiver.respond(410, body="gone")
        result = await firstmile("destinations", "test", "--tenant", slug, "--name", "hooks")
        assert result.exit_code == 1 and "rejected: the endpoint answered 410: gone" in result.output

        result = await firstmile("destinations", "disable", "--tenant", slug, "--name", "hooks", "--reason", "maint")
        assert result.exit_code == 0 and "destination hooks: disabled" in result.output
        result = await firstmile("destinations", "status", "--tenant", slug, "--json")
        [status] = json.loads(result.stdout)
        assert status["name"] == "hooks" and status["credentials_version"] == 3 and status["disabled_reason"] == "maint"
        assert status["pending"] == status["dead"] == 0 and not status["delivering"]
        result = await firstmile("destinations", "status", "--tenant", slug)
        assert "hooks\twebhook\tdisabled\t0\t0\t-" in result.output
        for expected in ("enabled", "was not disabled"):
            result = await firstmile("destinations", "enable", "--tenant", slug, "--name", "hooks")
            assert result.exit_code == 0 and f"destination hooks: {expected}" in result.output
        result = await firstmile("destinations", "replay", "--tenant", slug, "--name", "hooks", "--since",
                                 "2026-01-01T00:00:00")  # fmt: skip
        assert result.exit_code == 0 and "0 dead letters queued again" in result.output
        result = await firstmile("destinations", "replay", "--tenant", slug, "--name", "hooks", "--since", "soon")
        assert result.exit_code == 2 and "is not an ISO-8601 time" in result.output

    payloads = await audit_payloads(admin_engine, tenant_id)
    actions = [p["action"] for p in payloads]
    assert actions.count("destination.credentials.set") == 3
    assert {"destination.added", "destination.disabled", "destination.enabled", "destination.replay"} <= set(actions)
    assert not any(s in json.dumps(payloads) for s in (first, second, generated))  # never a secret in the log
