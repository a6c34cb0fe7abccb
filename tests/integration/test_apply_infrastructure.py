"""What `tenants plan|apply` makes besides rows and realms: the tenant's data key and the region's Kafka topics.

Real PostgreSQL and the test Kafka (deploy/local/kafka.sh). Each Kafka test uses a topic prefix of its
own, so the region's topics are new to it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.cli import main
from firstmile.controlplane.service import apply_manifest
from firstmile.events.kafka import missing_topics
from firstmile.events.topics import reconcile_region_topics, region_topics
from firstmile.security.datakeys import ManifestProviders
from firstmile.security.keys import KeyConfig, KeyProviderError, LocalKekProvider, ProviderRegistry
from firstmile.settings import get_settings
from firstmile.tenancy.manifest import TenantManifest
from firstmile.wiring.workers import stream_config
from tests.conftest import REGION, Database, make_settings
from tests.factories import demo_document, manifest_for, provisioned_kek


def _slug() -> str:
    return f"i-{secrets.token_hex(4)}"


async def _data_keys(admin_engine: AsyncEngine, slug: str) -> list[tuple[str, int]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT k.purpose, k.version FROM tenant_data_keys k JOIN tenants t ON t.id = k.tenant_id "
                "WHERE t.slug = :s ORDER BY k.purpose"
            ),
            {"s": slug},
        )
        return [(str(r.purpose), int(r.version)) for r in rows]


async def test_apply_makes_the_tenants_data_key_and_plan_only_says_so(
    admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    provider = LocalKekProvider(provisioned_kek(tmp_path / "kek"), create=False)
    slug = _slug()
    manifest = manifest_for(slug, REGION)

    planned = await apply_manifest(admin_engine, manifest, dry_run=True, key_providers=provider)
    assert "create data key (the platform's key provider)" in planned.changes
    assert await _data_keys(admin_engine, slug) == []  # plan wrote nothing (and never asked the provider)
    assert sum(provider.calls.values()) == 0

    applied = await apply_manifest(admin_engine, manifest, key_providers=provider)
    assert applied.changes == planned.changes
    assert await _data_keys(admin_engine, slug) == [("data", 1), ("index", 1)]
    # the key made at apply is the one the API uses: it unwraps with the same KEK
    async with admin_engine.connect() as conn:
        wrapped = (
            await conn.execute(
                text("SELECT wrapped_key FROM tenant_data_keys WHERE tenant_id = :t AND purpose = 'data'"),
                {"t": applied.tenant_id},
            )
        ).scalar_one()
    assert len(provider.unwrap(applied.tenant_id, wrapped)) == 32

    again = await apply_manifest(admin_engine, manifest, key_providers=provider)
    assert again.changes == []  # idempotent
    assert (await apply_manifest(admin_engine, manifest, dry_run=True, key_providers=provider)).changes == []

    # an existing tenant that never had a key (applied before this step existed) gets one at the next apply
    older = _slug()
    await apply_manifest(admin_engine, manifest_for(older, REGION))
    assert await _data_keys(admin_engine, older) == []
    late = await apply_manifest(admin_engine, manifest_for(older, REGION), key_providers=provider)
    assert late.changes == ["create data key (the platform's key provider)"]


async def test_a_key_provider_that_cannot_make_the_key_fails_the_apply_and_nothing_is_written(
    admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    slug = _slug()
    doc = demo_document()
    doc["keys"] = {
        "provider": "vault",
        "address": "http://127.0.0.1:9",  # nothing listens on the discard port
        "approle": {"role_id": "firstmile", "secret_id_file": str(tmp_path / "secret-id")},
    }
    (tmp_path / "secret-id").write_text("not-a-real-secret\n")
    manifest = manifest_for(slug, REGION, doc)
    registry = ProviderRegistry(KeyConfig(data_dir=tmp_path, kek_file=provisioned_kek(tmp_path / "kek")))
    providers = ManifestProviders(registry)
    try:
        planned = await apply_manifest(admin_engine, manifest, dry_run=True, key_providers=providers)
        assert "create data key (keys.provider vault)" in planned.changes
        with pytest.raises(KeyProviderError):
            await apply_manifest(admin_engine, manifest, key_providers=providers)
    finally:
        registry.close()
    async with admin_engine.connect() as conn:
        tenant = await conn.execute(text("SELECT 1 FROM tenants WHERE slug = :s"), {"s": slug})
        assert tenant.first() is None  # one transaction: no tenant without its key


def test_region_topics_are_planned_then_created_once(kafka_bootstrap: str) -> None:
    settings = make_settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topic_prefix=f"fm{secrets.token_hex(4)}")
    config = stream_config(settings)
    wanted = region_topics(config)
    events, dlq = wanted
    assert events == f"{settings.events.kafka_topic_prefix}.{REGION}.events" and dlq == f"{events}.dlq"

    planned = reconcile_region_topics(config, execute=False)
    assert planned == [
        f"create topic {events} ({settings.events.kafka_partitions} partitions)",
        f"create topic {dlq} (1 partition)",
    ]
    assert missing_topics(kafka_bootstrap, wanted) == wanted  # plan created nothing
    assert reconcile_region_topics(config, execute=True) == planned
    # KRaft publishes a new topic to the broker's metadata a moment after CreateTopics answers: wait for it
    deadline = time.monotonic() + 15
    while missing_topics(kafka_bootstrap, wanted) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert missing_topics(kafka_bootstrap, wanted) == {}
    assert reconcile_region_topics(config, execute=False) == []
    assert reconcile_region_topics(config, execute=True) == []


@pytest.fixture
def cli_env(database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("FIRSTMILE_DATABASE_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATABASE_ADMIN_URL", database.admin_url)
    monkeypatch.setenv("FIRSTMILE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(provisioned_kek(tmp_path / "kek")))
    monkeypatch.setenv("FIRSTMILE_REGION", REGION)
    monkeypatch.delenv("FIRSTMILE_KEYCLOAK_URL", raising=False)
    monkeypatch.delenv("FIRSTMILE_DIRECTORY_URL", raising=False)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["tenants", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _write(folder: Path, manifest: TenantManifest) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{manifest.tenant.slug}.yaml"
    path.write_text(yaml.safe_dump(manifest.model_dump(mode="json", exclude_none=True)), encoding="utf-8")
    return path


async def test_cli_plans_and_applies_topics_and_the_data_key(
    cli_env: None, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    prefix = f"fm{secrets.token_hex(4)}"
    monkeypatch.setenv("FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("FIRSTMILE_KAFKA_TOPIC_PREFIX", prefix)
    get_settings.cache_clear()
    slug = _slug()
    path = _write(tmp_path / "tenants", manifest_for(slug, REGION))
    events = f"{prefix}.{REGION}.events"

    code, out = await asyncio.to_thread(_invoke, "plan", str(path))
    assert code == 0, out
    assert f"kafka: would change: create topic {events} (" in out
    assert f"kafka: would change: create topic {events}.dlq (1 partition)" in out
    assert f"tenant {slug}: would change: create data key (the platform's key provider)" in out
    assert await _data_keys(admin_engine, slug) == []

    code, out = await asyncio.to_thread(_invoke, "apply", str(path))
    assert code == 0, out
    assert f"kafka: changed: create topic {events} (" in out
    assert f"tenant {slug}: changed: create data key (the platform's key provider)" in out
    assert await _data_keys(admin_engine, slug) == [("data", 1), ("index", 1)]

    code, out = await asyncio.to_thread(_invoke, "apply", str(path))
    assert code == 0, out
    assert "kafka: up to date" in out and f"tenant {slug}: up to date" in out


async def test_cli_without_kafka_says_topics_are_skipped(cli_env: None, tmp_path: Path) -> None:
    path = _write(tmp_path / "tenants", manifest_for(_slug(), REGION))
    code, out = await asyncio.to_thread(_invoke, "plan", str(path))
    assert code == 0, out
    assert "kafka: skipped (FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS unset" in out


async def test_cli_apply_without_the_kek_fails_with_the_reason(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, admin_engine: AsyncEngine, tmp_path: Path
) -> None:
    monkeypatch.setenv("FIRSTMILE_KEK_FILE", str(tmp_path / "nowhere" / "kek"))
    get_settings.cache_clear()
    slug = _slug()
    path = _write(tmp_path / "tenants", manifest_for(slug, REGION))
    code, out = await asyncio.to_thread(_invoke, "plan", str(path))
    assert code == 0, out  # a plan needs no key provider
    code, out = await asyncio.to_thread(_invoke, "apply", str(path))
    assert code == 1 and f"tenant {slug}: data key: KEK file" in out and "does not exist" in out
    async with admin_engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1 FROM tenants WHERE slug = :s"), {"s": slug})).first() is None
