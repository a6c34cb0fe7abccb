"""Personal data end to end on the real PostgreSQL: encrypted at rest and in events, looked up by
blind index, exported, erased (crypto-shredding), and refused when the key provider is down."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.kit.uow import UnitOfWork
from firstmile.security.crypto import FieldContext
from firstmile.security.datakeys import DataKeyService, UserKeyMissingError
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION, EventsDatabase, TenantFixture, make_settings, sequenced
from tests.factories import db_snapshot, demo_document, manifest_for
from tests.support.vault_transit import VaultTransitStandIn

Client = AsyncTestClient[Litestar]
SCOPES = ("onboarding:write", "events:write", "users:admin", "audit:read")
EMAIL = "Ada.Lovelace@example.com"
NAME = "Ada Lovelace"
PHONE = "+44 20 7946 0958"
SHOE = "size-38-secret"  # a tenant-declared PII trait


async def _tenant(admin_engine: AsyncEngine, document: dict[str, Any] | None = None) -> TenantFixture:
    slug = f"p-{secrets.token_hex(5)}"
    doc = document if document is not None else demo_document()
    doc.setdefault("pii_traits", ["shoe_size"])
    manifest = manifest_for(slug, REGION, doc)
    tenant_id = (await apply_manifest(admin_engine, manifest)).tenant_id
    key = (await create_key(admin_engine, PEPPER, slug, list(SCOPES), "test")).key
    return TenantFixture(tenant_id, slug, key, manifest)


async def _all_text(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> str:
    """Every row the tenant owns, in every table, as text."""
    async with admin_engine.connect() as conn:
        tables = (
            (
                await conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.columns WHERE column_name = 'tenant_id'"
                        " AND table_schema = 'public'"
                    )
                )
            )
            .scalars()
            .all()
        )
        dump: list[str] = []
        for table in tables:
            rows = await conn.execute(text(f"SELECT t::text FROM {table} t WHERE tenant_id = :t"), {"t": tenant_id})
            dump.extend(r[0] for r in rows)
    return "\n".join(dump)


def _leaks(blob: str) -> list[str]:
    # The phone's subscriber digits, as written and normalised (E.164): long enough not to turn up by
    # chance in the hashes, UUIDs and base64 of a tenant's rows, as the four digits "7946" once did.
    lowered = blob.lower()
    return [v for v in (EMAIL.lower(), NAME.lower(), "lovelace", "7946 0958", "79460958", SHOE) if v in lowered]


async def _start(client: Client, tenant: TenantFixture, user: str = "ada") -> Any:
    return await client.post(
        "/v1/onboarding/start",
        json={
            "user_id": user,
            "traits": {"persona": "developer", "email": EMAIL, "name": NAME, "phone": PHONE, "shoe_size": SHOE},
        },
        headers=tenant.headers,
    )


async def test_personal_traits_are_never_stored_or_logged_in_clear(
    client: Client, admin_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tenant = await _tenant(admin_engine)
    resp = await _start(client, tenant)
    assert resp.status_code == 201, resp.text
    assert resp.json()["path"]["id"] == "developer-quickstart"  # the planner still saw the traits
    identify = {
        "type": "identify",
        "messageId": "m-1",
        "userId": "ada",
        "traits": {"email": EMAIL, "firstName": "Ada", "lastName": "Lovelace", "plan": "pro"},
        "context": {"ip": "203.0.113.7", "traits": {"name": NAME}},
    }
    sent = await client.post("/v1/events", json={"batch": [identify]}, headers=tenant.headers)
    assert sent.status_code == 202, sent.text
    stored = await _all_text(admin_engine, tenant.id)
    assert "fm1:" in stored  # the ciphertexts are there …
    assert _leaks(stored) == []  # … and no clear value anywhere, outbox payloads included
    assert "203.0.113.7" not in stored
    async with admin_engine.connect() as conn:
        traits, pii = (
            await conn.execute(
                text("SELECT traits, pii FROM end_users WHERE tenant_id = :t AND user_id = 'ada'"), {"t": tenant.id}
            )
        ).one()
        payload = (
            await conn.execute(
                text("SELECT payload FROM outbox WHERE tenant_id = :t AND event_type = 'identify'"), {"t": tenant.id}
            )
        ).scalar_one()
    assert traits == {"persona": "developer"}
    assert pii.startswith("fm1:")
    assert payload["traits"] == {"plan": "pro"} and payload["pii"].startswith("fm1:")
    assert _leaks(caplog.text) == []


async def test_lookup_export_and_the_audited_decision(client: Client, admin_engine: AsyncEngine) -> None:
    tenant = await _tenant(admin_engine)
    await _start(client, tenant)
    found = await client.get("/v1/users/", params={"email": "  ada.lovelace@EXAMPLE.com "}, headers=tenant.headers)
    assert found.status_code == 200, found.text
    assert found.json() == {"user_ids": ["ada"]}
    nobody = await client.get("/v1/users/", params={"email": "grace@example.com"}, headers=tenant.headers)
    assert nobody.json() == {"user_ids": []}
    exported = await client.get("/v1/users/ada/export", headers=tenant.headers)
    assert exported.status_code == 200, exported.text
    doc = exported.json()
    assert doc["profile"]["personal"] == {"email": EMAIL, "name": NAME, "phone": PHONE, "shoe_size": SHOE}
    assert doc["onboarding"]["path_id"] == "developer-quickstart"
    decisions = [d for d in doc["decisions"] if d["kind"] == "decision"]
    assert decisions[0]["payload"]["decision"] == "path_selection"
    assert decisions[0]["payload"]["inputs"]["personal_traits"] == ["email", "name", "phone", "shoe_size"]
    await sequenced(admin_engine, tenant.id)
    entries = await client.get("/v1/audit/entries", params={"subject": "ada"}, headers=tenant.headers)
    assert [e["kind"] for e in entries.json()["entries"]] == ["decision", "admin"]  # the export is audited too
    bad = await client.get("/v1/users/", params={"email": "not-an-email"}, headers=tenant.headers)
    assert bad.status_code == 400


async def test_erasure_shreds_the_key_deletes_the_rows_and_is_audited(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine, app: Litestar
) -> None:
    tenant = await _tenant(admin_engine)
    await _start(client, tenant)
    await client.post(
        "/v1/events",
        json={"batch": [{"type": "identify", "messageId": "m-2", "userId": "ada", "traits": {"email": EMAIL}}]},
        headers=tenant.headers,
    )
    erased = await client.delete("/v1/users/ada", headers=tenant.headers)
    assert erased.status_code == 202, erased.text
    body = erased.json()
    assert body["key_destroyed"] is True
    assert body["rows_deleted"] == {
        "end_users": 1, "user_progress": 1, "step_completions": 0, "onboarding_reviews": 0, "onboarding_overrides": 0,
        "nudge_sends": 0, "nudge_consents": 0, "nudge_suppressions": 0, "nudge_push_subscriptions": 0,
        "experiment_exposures": 0,
    }  # fmt: skip
    async with admin_engine.connect() as conn:
        users = await conn.execute(text("SELECT count(*) FROM end_users WHERE tenant_id = :t"), {"t": tenant.id})
        assert users.scalar_one() == 0
        rows = (
            await conn.execute(
                text("SELECT event_id, event_type, payload FROM outbox WHERE tenant_id = :t ORDER BY id"),
                {"t": tenant.id},
            )
        ).all()
    assert rows[-1][1] == "user.erased"
    identify = next(r for r in rows if r[1] == "identify")
    keyring: DataKeyService = app.state.container.keyring
    scope = OPERATOR_CLI.tenant(tenant.id)
    keys = await keyring.keys(UnitOfWork(app_engine, scope))
    async with tenant_transaction(app_engine, scope) as tx:
        with pytest.raises(UserKeyMissingError):  # the copy in flight can never be read again
            key = await keys.user_key(tx, "ada")
            key.decrypt(identify[2]["pii"], FieldContext(tenant.id, "events", "pii", str(identify[0])))
    assert (await client.get("/v1/users/ada/export", headers=tenant.headers)).status_code == 404
    assert (await client.get("/v1/onboarding/ada", headers=tenant.headers)).status_code == 404
    found = await client.get("/v1/users/", params={"email": EMAIL}, headers=tenant.headers)
    assert found.json() == {"user_ids": []}
    pending = await client.get(f"/v1/audit/entries/{body['audit_entry_id']}/proof", headers=tenant.headers)
    assert pending.status_code == 202 and pending.json()["kind"] == "erasure"  # queued, leaf hash known
    await sequenced(admin_engine, tenant.id)
    entries = (await client.get("/v1/audit/entries", params={"kind": "erasure"}, headers=tenant.headers)).json()
    assert [(e["subject"], e["id"]) for e in entries["entries"]] == [("ada", body["audit_entry_id"])]
    again = await client.delete("/v1/users/ada", headers=tenant.headers)
    assert again.status_code == 404


async def test_data_subject_endpoints_need_the_users_admin_scope(client: Client, tenant: TenantFixture) -> None:
    for method, url in (("DELETE", "/v1/users/x"), ("GET", "/v1/users/x/export"), ("GET", "/v1/users/?email=a@b.co")):
        resp = await client.request(method, url, headers=tenant.headers)
        assert resp.status_code == 403, (method, url)


@pytest.fixture(scope="module")
def vault() -> Iterator[VaultTransitStandIn]:
    with VaultTransitStandIn() as server:
        yield server


async def test_key_provider_down_refuses_personal_data_and_writes_nothing(
    client: Client, admin_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path
) -> None:
    role_id, secret_id = vault.add_role()
    secret_file = tmp_path / "secret_id"
    secret_file.write_text(secret_id, encoding="utf-8")
    document = demo_document()
    document["keys"] = {
        "provider": "vault",
        "address": vault.url,
        "approle": {"role_id": role_id, "secret_id_file": str(secret_file)},
    }
    tenant = await _tenant(admin_engine, document)
    vault.stop()
    try:
        before = await db_snapshot(admin_engine, tenant.id)
        down = await _start(client, tenant, "first")
        assert down.status_code == 503, down.text
        assert down.json()["type"].endswith("/key-provider-unavailable")
        assert down.headers["retry-after"] == "5"
        assert await db_snapshot(admin_engine, tenant.id) == before  # nothing, and nothing in clear
        plain = await client.post(
            "/v1/onboarding/start",
            json={"user_id": "no-pii", "traits": {"persona": "developer"}},
            headers=tenant.headers,
        )
        assert plain.status_code == 201  # writes that need no key go on
    finally:
        vault.start()
    ok = await _start(client, tenant, "first")
    assert ok.status_code == 201, ok.text  # through the tenant's own Vault, once it is back
    vault.stop()
    try:  # the unwrapped tenant data key is cached (TTL, max uses): new users' keys need no provider call
        cached = await _start(client, tenant, "second")
        assert cached.status_code == 201, cached.text
    finally:
        vault.start()


async def _until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    for _ in range(int(within / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)


async def _both(rows: Callable[[str], Awaitable[int]]) -> bool:
    return await rows("ada") > 0 and await rows("bob") > 0


async def _none(rows: Callable[[str], Awaitable[int]], user: str) -> bool:
    return await rows(user) == 0


async def test_erasure_reaches_analytics_through_the_event_stream(
    events_database: EventsDatabase, analytics_store: ChdbStore
) -> None:
    admin = create_async_engine(events_database.admin_url, pool_size=2)
    tenant = await _tenant(admin)
    app = create_app(
        make_settings(),
        events_database.app_url,
        PEPPER,
        analytics=analytics_store,
        relay_database_url=events_database.relay_url,
    )

    async def rows(user: str) -> int:
        found = await asyncio.to_thread(
            analytics_store.dangerous_raw_sql,
            "SELECT count() AS n FROM events WHERE tenant_id = {t:UUID} AND user_id = {u:String}",
            {"t": str(tenant.id), "u": user},
        )
        return int(found[0]["n"])

    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        await _start(client, tenant, "ada")
        await _start(client, tenant, "bob")
        await _until(lambda: _both(rows))
        assert await rows("ada") == 1
        assert (await client.delete("/v1/users/ada", headers=tenant.headers)).status_code == 202
        await _until(lambda: _none(rows, "ada"))
        assert await rows("ada") == 0
        assert await rows("bob") == 1  # only the erased user is forgotten
    await admin.dispose()
