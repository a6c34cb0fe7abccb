"""Segment-spec ingestion against the real PostgreSQL: dedupe, limits, refusals, the official client."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import os
import secrets
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.events.segment import event_id_for
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant, sequenced
from tests.factories import db_snapshot

Client = AsyncTestClient[Litestar]
PROBLEM = "https://firstmile.dev/problems/"
SCOPES = ("onboarding:write", "events:write")


@pytest.fixture
async def events_tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine, scopes=SCOPES)


def track(user: str = "u1", event: str = "Report Created", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": event, **extra}


async def stored(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_id, event_type, partition_key, payload FROM outbox WHERE tenant_id = :t ORDER BY id"),
            {"t": tenant_id},
        )
        return [{"event_id": r[0], "type": r[1], "key": r[2], "payload": r[3]} for r in rows]


async def test_a_batch_is_accepted_and_written_to_the_outbox_in_order(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    when = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    batch = [
        track("u1", "Report Created", properties={"kind": "bar"}, timestamp=when.isoformat()),
        {"type": "identify", "messageId": "m-identify", "userId": "u1", "traits": {"plan": "pro"}},
        {"type": "page", "messageId": "m-page", "anonymousId": "anon-7", "name": "Pricing", "properties": {}},
    ]
    resp = await client.post("/v1/events", json={"batch": batch}, headers=events_tenant.headers)
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"accepted": 3, "duplicates": 0, "rejected": []}
    rows = await stored(admin_engine, events_tenant.id)
    assert [r["type"] for r in rows] == ["track", "identify", "page"]
    assert rows[0]["event_id"] == event_id_for(events_tenant.id, batch[0]["messageId"])
    assert rows[0]["key"] == f"{events_tenant.id}:u1"
    assert rows[2]["key"] == f"{events_tenant.id}:anon-7"
    assert rows[0]["payload"]["timestamp"] == when.isoformat()
    assert rows[0]["payload"]["properties"] == {"kind": "bar"}
    assert rows[1]["payload"]["traits"] == {"plan": "pro"}


async def test_messages_are_deduplicated_per_tenant_by_message_id(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    other = await new_tenant(admin_engine, scopes=SCOPES)
    batch = [track("u1"), track("u2")]
    first = await client.post("/v1/events", json={"batch": batch}, headers=events_tenant.headers)
    assert first.json()["accepted"] == 2
    again = await client.post("/v1/events", json={"batch": [*batch, batch[0]]}, headers=events_tenant.headers)
    assert again.status_code == 202
    assert again.json() == {"accepted": 0, "duplicates": 3, "rejected": []}
    assert len(await stored(admin_engine, events_tenant.id)) == 2
    elsewhere = await client.post("/v1/events", json={"batch": batch}, headers=other.headers)
    assert elsewhere.json()["accepted"] == 2  # another tenant's messageIds are its own


async def test_each_bad_message_is_rejected_with_its_reason_and_the_rest_accepted(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    batch: list[Any] = [
        track("ok-user"),
        {"type": "track", "userId": "u", "event": "E"},
        {"type": "track", "messageId": "m2", "event": "E"},
        {"type": "track", "messageId": "m3", "userId": "u", "event": "E", "properties": ["not", "an", "object"]},
        {"type": "alias", "messageId": "m4", "userId": "u"},
        {"type": "track", "messageId": "m5", "userId": "u"},
        {"type": "track", "messageId": "m6", "userId": "u", "event": "E", "timestamp": future},
        {"type": "track", "messageId": "m7", "userId": "u", "event": "E", "properties": {"x": "y" * 33_000}},
        {"type": "track", "messageId": "m8", "userId": {"id": 1}, "event": "E"},
        {"type": "identify", "messageId": "m9", "userId": "u", "timestamp": "yesterday"},
        "not a message",
        {"type": "track", "messageId": "m11", "userId": "u\n", "event": "E"},  # was accepted: re.match's $
    ]
    resp = await client.post("/v1/events", json={"batch": batch}, headers=events_tenant.headers)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == 1
    reasons = {r["index"]: (r["field"], r["reason"]) for r in body["rejected"]}
    assert reasons[1] == ("messageId", "messageId is required: a non-empty string")
    assert reasons[2] == ("userId", "userId or anonymousId is required")
    assert reasons[3] == ("properties", "properties must be an object, got list")
    assert reasons[4] == ("previousId", "alias needs a previousId")
    assert reasons[5] == ("event", "track needs an event name: a non-empty string")
    assert reasons[6] == ("timestamp", "timestamp is more than 5 minutes in the future")
    assert reasons[7][0] == "" and "32 KB" in reasons[7][1]
    assert reasons[8] == ("userId", "userId must be a string, got dict")
    assert reasons[9][0] == "timestamp" and "ISO-8601" in reasons[9][1]
    assert reasons[10][1] == "a message must be an object, got str"
    assert reasons[11][0] == "userId"
    rows = await stored(admin_engine, events_tenant.id)
    assert [r["payload"]["userId"] for r in rows] == ["ok-user"]


@pytest.mark.parametrize(
    ("body", "status", "problem"),
    [
        (b'{"batch": [', 400, "malformed-json"),
        (b'{"events": []}', 400, "validation-error"),
        (b'{"batch": []}', 400, "validation-error"),
        (b'{"batch": "track"}', 400, "validation-error"),
        (b'{"batch": [{"type": "track"}, {"type": "page", "messageId": 5}]}', 400, "invalid-events"),
        (
            b'{"batch": [' + b",".join([b'{"type":"track","messageId":"m","userId":"u","event":"E"}'] * 9000) + b"]}",
            413,
            "payload-too-large",
        ),
    ],
    ids=["malformed", "no-batch", "empty", "wrong-type", "all-invalid", "oversize"],
)
async def test_bad_batches_are_refused_and_nothing_is_stored(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine, body: bytes, status: int, problem: str
) -> None:
    before = await db_snapshot(admin_engine, events_tenant.id)
    resp = await client.post(
        "/v1/events", content=body, headers={**events_tenant.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["type"] == PROBLEM + problem
    if problem == "invalid-events":
        assert [r["field"] for r in resp.json()["rejected"]] == ["messageId", "messageId"]
    assert await db_snapshot(admin_engine, events_tenant.id) == before


async def test_ingestion_needs_the_events_scope(client: Client, tenant: TenantFixture) -> None:
    resp = await client.post("/v1/events", json={"batch": [track()]}, headers=tenant.headers)
    assert resp.status_code == 403
    assert resp.json()["required_scope"] == "events:write"


async def test_gzip_and_segment_basic_auth_are_accepted(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    basic = base64.b64encode(f"{events_tenant.key}:".encode()).decode()
    body = gzip.compress(msgspec.json.encode({"batch": [track("gz-user")]}))
    resp = await client.post(
        "/v1/batch",
        content=body,
        headers={"Authorization": f"Basic {basic}", "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text  # /v1/batch answers as Segment's tracking API
    assert resp.json()["success"] is True
    assert [r["payload"]["userId"] for r in await stored(admin_engine, events_tenant.id)] == ["gz-user"]
    wrong = base64.b64encode(b"fm_not-a-key:").decode()
    refused = await client.post("/v1/batch", json={"batch": [track()]}, headers={"Authorization": f"Basic {wrong}"})
    assert refused.status_code == 401


# ---- the official Segment client, over real HTTP ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http_base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    """The app on a real loopback socket (its own instance, with its own pool on the server's loop)."""
    port = _free_port()
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=analytics_store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("use_gzip", [False, True], ids=["plain", "gzip"])
async def test_the_official_segment_client_delivers_unchanged(
    client: Client, http_base: str, events_tenant: TenantFixture, admin_engine: AsyncEngine, use_gzip: bool
) -> None:
    from segment.analytics import Client as SegmentClient

    errors: list[Any] = []
    segment = SegmentClient(
        write_key=events_tenant.key,
        host=http_base,
        sync_mode=True,
        gzip=use_gzip,
        on_error=lambda exc, batch: errors.append(exc),
        max_retries=0,
    )

    def send() -> None:
        segment.identify("seg-user", {"persona": "developer", "plan": "pro"})
        segment.track("seg-user", "Report Created", {"kind": "funnel", "count": 3})
        segment.page("seg-user", "Docs", "Quickstart", {"path": "/docs"})
        segment.track(anonymous_id="anon-1", event="Signed Up")

    await asyncio.to_thread(send)
    assert errors == []
    rows = await stored(admin_engine, events_tenant.id)
    assert [r["type"] for r in rows] == ["identify", "track", "page", "track"]
    assert rows[1]["payload"]["properties"] == {"kind": "funnel", "count": 3}
    assert rows[1]["payload"]["context"]["library"]["name"] == "analytics-python"
    assert rows[2]["payload"]["name"] == "Quickstart"
    assert rows[3]["key"] == f"{events_tenant.id}:anon-1"


# ---- Segment webhook ----


async def _set_secret(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> str:
    secret = secrets.token_urlsafe(24)
    async with admin_engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO webhook_secrets (tenant_id, source, secret) VALUES (:t, 'segment', :s)"),
            {"t": tenant_id, "s": secret},
        )
    return secret


async def test_the_segment_webhook_accepts_signed_messages_only(
    client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    secret = await _set_secret(admin_engine, events_tenant.id)
    url = f"/v1/webhooks/segment/{events_tenant.slug}"
    body = msgspec.json.encode(track("hook-user", "SDK Installed"))
    good = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    before = await db_snapshot(admin_engine, events_tenant.id)
    for signature in (None, "0" * 40, hmac.new(b"other", body, hashlib.sha1).hexdigest()):
        headers = {"Content-Type": "application/json"} | ({"X-Signature": signature} if signature else {})
        refused = await client.post(url, content=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["type"] == PROBLEM + "invalid-signature"
    unknown = await client.post("/v1/webhooks/segment/no-such-tenant", content=body, headers={"X-Signature": good})
    assert unknown.status_code == 401
    assert await db_snapshot(admin_engine, events_tenant.id) == before
    ok = await client.post(url, content=body, headers={"X-Signature": good, "Content-Type": "application/json"})
    assert ok.status_code == 202, ok.text
    assert ok.json()["accepted"] == 1
    assert [r["payload"]["userId"] for r in await stored(admin_engine, events_tenant.id)] == ["hook-user"]
    bad_message = msgspec.json.encode({"type": "track", "messageId": "x"})
    signed = hmac.new(secret.encode(), bad_message, hashlib.sha1).hexdigest()
    invalid = await client.post(url, content=bad_message, headers={"X-Signature": signed})
    assert invalid.status_code == 400
    assert invalid.json()["rejected"][0]["field"] == "userId"


async def test_the_webhook_secret_command_replaces_the_secret_and_audits_it(
    database: Database, client: Client, events_tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    old = await _set_secret(admin_engine, events_tenant.id)
    env = os.environ | {
        "FIRSTMILE_DATABASE_URL": database.app_url,
        "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
        "FIRSTMILE_API_KEY_PEPPER": PEPPER.decode(),
    }
    command = [sys.executable, "-m", "firstmile.cli", "webhooks", "secret", "--tenant"]

    def secret_command(slug: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, slug], capture_output=True, text=True, env=env, timeout=60, check=False)

    done = await asyncio.to_thread(secret_command, events_tenant.slug)
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert new and new != old and new not in done.stderr
    assert f"/v1/webhooks/segment/{events_tenant.slug}" in done.stderr
    url = f"/v1/webhooks/segment/{events_tenant.slug}"
    body = msgspec.json.encode(track("rotated", "SDK Installed"))
    stale = await client.post(
        url, content=body, headers={"X-Signature": hmac.new(old.encode(), body, "sha1").hexdigest()}
    )
    assert stale.status_code == 401
    fresh = await client.post(
        url, content=body, headers={"X-Signature": hmac.new(new.encode(), body, "sha1").hexdigest()}
    )
    assert fresh.status_code == 202, fresh.text
    await sequenced(admin_engine, events_tenant.id)
    async with admin_engine.connect() as conn:
        entries = (
            await conn.execute(
                text("SELECT actor, subject, payload::text FROM audit_entries WHERE tenant_id = :t AND kind = 'admin'"),
                {"t": events_tenant.id},
            )
        ).all()
    hooks = [e for e in entries if e[1] == "webhook:segment"]  # the others record the tenant and its key
    assert [e[0] for e in hooks] == ["operator:cli"]
    assert "webhooks.secret" in hooks[0][2] and new not in hooks[0][2]
    unknown = await asyncio.to_thread(secret_command, "nobody-here")
    assert unknown.returncode != 0 and "no tenant 'nobody-here'" in unknown.stderr
