"""The embed API on the real stack: publishable keys, origins, identity tokens, CORS, limits, the live checklist.

An app served by uvicorn on a loopback socket, with the outbox relay in process (embedded mode), on a
database of its own; requests made as the embed SDK makes them (``Origin``, ``Authorization: Bearer
fmpk_…``, ``X-Firstmile-Identity``). The stream test completes a step through the tenant API with a
secret key and waits for the checklist event the relay's announcement brings.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.tenancy import keys as keylib
from firstmile.tenancy.cli import create_key, create_publishable_key, revoke_key
from tests.conftest import PEPPER, REGION, EventsDatabase, make_settings, sequenced
from tests.factories import manifest_for
from tests.support.serving import served

ORIGIN = "http://localhost:5173"
PATIENCE_S = 30.0
"""How long a wait for something that must happen may take before the test fails (never a timing assertion)."""
EMBED_QUOTA = 12


@dataclass
class World:
    base: str
    admin_url: str
    tenant_id: uuid.UUID
    slug: str
    secret: str
    publishable: str
    publishable_id: uuid.UUID
    identity_secret: str

    def token(self, user_id: str, *, lifetime_s: int = 600, secret: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": user_id, "iat": now, "exp": now + lifetime_s, **claims}
        return jwt.encode(body, secret or self.identity_secret, algorithm="HS256")

    def embed_headers(self, user_id: str, *, origin: str | None = ORIGIN, token: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.publishable}", "X-Firstmile-Identity": token or self.token(user_id)}
        if origin is not None:
            headers["Origin"] = origin
        return headers

    @property
    def server_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


@pytest.fixture(scope="module")
def world(events_database: EventsDatabase, analytics_store: ChdbStore) -> Iterator[World]:
    slug = f"emb-{uuid.uuid4().hex[:8]}"

    async def setup() -> tuple[uuid.UUID, str, Any]:
        admin = create_async_engine(events_database.admin_url, pool_size=2)
        try:
            applied = await apply_manifest(admin, manifest_for(slug, REGION))
            secret = (await create_key(admin, PEPPER, slug, ["onboarding:write"], "backend")).key
            publishable = await create_publishable_key(admin, PEPPER, slug, [ORIGIN, "https://app.example.com"])
        finally:
            await admin.dispose()
        return applied.tenant_id, secret, publishable

    tenant_id, secret, publishable = asyncio.run(setup())
    assert publishable.identity_secret is not None
    settings = make_settings(
        in_process_schedulers=False,
        nudge_stream_heartbeat_seconds=0.5,
        nudge_stream_seconds=2 * PATIENCE_S,
        rate_limit_embed_user_requests=EMBED_QUOTA,
        rate_limit_embed_user_window_seconds=3600,
    )
    app = create_app(
        settings,
        events_database.app_url,
        PEPPER,
        analytics=analytics_store,
        relay_database_url=events_database.relay_url,
    )
    with served(app) as base:
        yield World(
            base,
            events_database.admin_url,
            tenant_id,
            slug,
            secret,
            publishable.key,
            publishable.key_id,
            publishable.identity_secret,
        )


@pytest.fixture
async def admin(world: World) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(world.admin_url, pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture
async def http(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=world.base, timeout=httpx.Timeout(PATIENCE_S)) as client:
        yield client


async def _start(http: httpx.AsyncClient, world: World, prefix: str = "em") -> tuple[str, dict[str, Any]]:
    user_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    r = await http.post("/v1/onboarding/start", json={"user_id": user_id, "traits": {}}, headers=world.server_headers)
    assert r.status_code == 201, r.text
    state = r.json()
    assert isinstance(state, dict)
    return user_id, state


def _problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"].endswith("/" + kind), body
    assert isinstance(body, dict)
    return body


async def _refusals(world: World, admin: AsyncEngine) -> list[dict[str, Any]]:
    await sequenced(admin, world.tenant_id)
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT payload FROM audit_entries WHERE tenant_id = :t AND kind = 'auth.key_refused' "
                "AND subject = :s ORDER BY seq"
            ),
            {"t": world.tenant_id, "s": f"api_key:{world.publishable_id}"},
        )
        return [r[0] for r in rows]


def _expected_statuses(state: dict[str, Any]) -> dict[str, str]:
    return {
        s["id"]: "completed" if s["completed"] else "available" if s["available"] else "locked" for s in state["steps"]
    }


# ---- reading the checklist ----


async def test_a_publishable_key_reads_the_checklist_of_the_user_its_identity_token_names(
    world: World, http: httpx.AsyncClient
) -> None:
    user_id, state = await _start(http, world)
    r = await http.get("/v1/embed/checklist", headers=world.embed_headers(user_id))
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    body = r.json()
    assert body["user_id"] == user_id
    assert body["path"] == {
        "id": state["path"]["id"],
        "name": state["path"]["name"],
        "version": state["path"]["version"],
    }
    assert {s["id"]: s["status"] for s in body["steps"]} == _expected_statuses(state)
    assert "locked" in {s["status"] for s in body["steps"]}, "the demo path has steps behind prerequisites"
    for step in body["steps"]:
        prereqs = next(s["prerequisites"] for s in state["steps"] if s["id"] == step["id"])
        assert step["waiting_for"] == [
            p for p in prereqs if p not in {s["id"] for s in state["steps"] if s["completed"]}
        ]
    assert body["progress"] == state["progress"]
    assert "decision" not in body and "traits" not in body  # the planner's internals stay on the server
    messages = await http.get("/v1/embed/messages", headers=world.embed_headers(user_id))
    assert messages.status_code == 200 and messages.json() == {"user_id": user_id, "messages": []}


async def test_the_identity_token_decides_the_user_and_a_stranger_is_not_found(
    world: World, http: httpx.AsyncClient
) -> None:
    await _start(http, world)  # someone else's onboarding exists; a token for a stranger must not reach it
    r = await http.get("/v1/embed/checklist", headers=world.embed_headers("never-started"))
    _problem(r, 404, "user-not-found")
    stream = await http.get("/v1/embed/stream", headers=world.embed_headers("never-started"))
    _problem(stream, 404, "user-not-found")


async def test_a_listed_second_origin_works_and_https_origins_are_matched_exactly(
    world: World, http: httpx.AsyncClient
) -> None:
    user_id, _ = await _start(http, world)
    ok = await http.get("/v1/embed/checklist", headers=world.embed_headers(user_id, origin="https://app.example.com"))
    assert ok.status_code == 200, ok.text
    for origin in ("https://app.example.com:8443", "http://app.example.com", "https://evil.example.com"):
        r = await http.get("/v1/embed/checklist", headers=world.embed_headers(user_id, origin=origin))
        _problem(r, 403, "origin-not-allowed")


# ---- refusals, each audited ----


async def test_unlisted_origin_missing_origin_and_bad_tokens_are_refused_and_audited(
    world: World, http: httpx.AsyncClient, admin: AsyncEngine
) -> None:
    user_id, _ = await _start(http, world)
    before = len(await _refusals(world, admin))
    cases: list[tuple[dict[str, str], int, str, str | None]] = [
        (world.embed_headers(user_id, origin="https://evil.example.com"), 403, "origin-not-allowed", None),
        (world.embed_headers(user_id, origin=None), 403, "origin-not-allowed", None),
        (world.embed_headers(user_id, token=world.token(user_id, secret="fmid_" + "A" * 43)), 401,
         "invalid-identity", "bad-signature"),
        (world.embed_headers(user_id, token=world.token(user_id, lifetime_s=-120)), 401, "invalid-identity",
         "expired"),
        (world.embed_headers(user_id, token=world.token(user_id, lifetime_s=7 * 86_400)), 401, "invalid-identity",
         "lifetime-too-long"),
        (world.embed_headers(user_id, token=jwt.encode({"sub": user_id, "exp": int(time.time()) + 60}, "",
                                                       algorithm="none")), 401, "invalid-identity", "malformed"),
        ({k: v for k, v in world.embed_headers(user_id).items() if k != "X-Firstmile-Identity"}, 401,
         "invalid-identity", "missing"),
    ]  # fmt: skip
    for headers, status, kind, reason in cases:
        body = _problem(await http.get("/v1/embed/checklist", headers=headers), status, kind)
        if reason is not None:
            assert body["reason"] == reason
    audited = (await _refusals(world, admin))[before:]
    assert [(e["reason"], e.get("origin")) for e in audited][:2] == [
        ("origin-not-allowed", "https://evil.example.com"),
        ("origin-not-allowed", None),
    ]
    assert [(e["reason"], e["identity"]) for e in audited[2:]] == [
        ("invalid-identity", reason) for _, _, _, reason in cases[2:]
    ]
    assert isinstance(audited[0]["not_audited_before"], int)


async def test_a_token_signed_with_another_keys_secret_is_forged(world: World, http: httpx.AsyncClient) -> None:
    user_id, _ = await _start(http, world)
    other_secret = keylib.identity_secret(PEPPER, uuid.uuid4())
    r = await http.get(
        "/v1/embed/checklist", headers=world.embed_headers(user_id, token=world.token(user_id, secret=other_secret))
    )
    assert _problem(r, 401, "invalid-identity")["reason"] == "bad-signature"


async def test_secret_keys_are_refused_from_a_browser_and_publishable_keys_reach_nothing_else(
    world: World, http: httpx.AsyncClient
) -> None:
    user_id, _ = await _start(http, world)
    for browser in ({"Origin": ORIGIN}, {"Sec-Fetch-Site": "cross-site"}):
        r = await http.get(f"/v1/onboarding/{user_id}", headers={**world.server_headers, **browser})
        _problem(r, 403, "secret-key-in-browser")
    assert (await http.get(f"/v1/onboarding/{user_id}", headers=world.server_headers)).status_code == 200
    embed = world.embed_headers(user_id)
    _problem(await http.get(f"/v1/onboarding/{user_id}", headers=embed), 403, "forbidden")
    start = await http.post("/v1/onboarding/start", json={"user_id": "by-browser", "traits": {}}, headers=embed)
    _problem(start, 403, "forbidden")
    _problem(await http.get(f"/v1/users/{user_id}/messages", headers=embed), 403, "forbidden")
    # a secret key on the embed API has no user: refused by scope
    _problem(await http.get("/v1/embed/checklist", headers=world.server_headers), 403, "forbidden")


async def test_a_revoked_publishable_key_is_unauthenticated(
    world: World, http: httpx.AsyncClient, admin: AsyncEngine
) -> None:
    created = await create_publishable_key(admin, PEPPER, world.slug, [ORIGIN], "to-revoke")
    assert await revoke_key(admin, world.slug, created.key_id)  # before its first use: never cached
    assert created.identity_secret is not None
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, created.identity_secret, algorithm="HS256")
    r = await http.get(
        "/v1/embed/checklist",
        headers={"Authorization": f"Bearer {created.key}", "X-Firstmile-Identity": token, "Origin": ORIGIN},
    )
    _problem(r, 401, "unauthenticated")


# ---- CORS and limits ----


async def test_preflight_allows_the_sdks_headers_and_answers_carry_the_origin(
    world: World, http: httpx.AsyncClient
) -> None:
    r = await http.options(
        "/v1/embed/checklist",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-firstmile-identity",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert {"authorization", "x-firstmile-identity"} <= {
        h.strip() for h in r.headers["access-control-allow-headers"].split(",")
    }
    assert set(r.headers["access-control-allow-methods"].replace(" ", "").split(",")) == {"GET", "POST"}
    # other routes get no CORS at all
    other = await http.options(
        "/v1/onboarding/start", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


async def test_each_browser_user_has_a_quota_of_its_own(world: World, http: httpx.AsyncClient) -> None:
    first, _ = await _start(http, world, "rl")
    second, _ = await _start(http, world, "rl")
    for i in range(EMBED_QUOTA):
        r = await http.get("/v1/embed/checklist", headers=world.embed_headers(first))
        assert r.status_code == 200, (i, r.text)
    refused = await http.get("/v1/embed/checklist", headers=world.embed_headers(first))
    _problem(refused, 429, "rate-limited")
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # the SDK can read why
    assert (await http.get("/v1/embed/checklist", headers=world.embed_headers(second))).status_code == 200


# ---- live ----


@asynccontextmanager
async def _stream(http: httpx.AsyncClient, headers: dict[str, str]) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
    async with http.stream("GET", "/v1/embed/stream", headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["access-control-allow-origin"] == ORIGIN

        async def events() -> AsyncIterator[tuple[str, str]]:
            name, data = "message", list[str]()
            async for line in response.aiter_lines():
                if line == "":
                    if data:
                        yield name, "\n".join(data)
                    name, data = "message", list[str]()
                elif line.startswith("event:"):
                    name = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data.append(line.partition(":")[2].removeprefix(" "))

        yield events()


async def test_the_stream_sends_the_checklist_and_again_when_a_step_is_completed_through_the_api(
    world: World, http: httpx.AsyncClient
) -> None:
    user_id, state = await _start(http, world)
    step = state["current_step"]
    async with _stream(http, world.embed_headers(user_id)) as events:
        async with asyncio.timeout(PATIENCE_S):
            name, data = await anext(events)
        assert name == "checklist"
        first = json.loads(data)
        assert {s["id"]: s["status"] for s in first["steps"]}[step] == "available"
        done = await http.post(f"/v1/onboarding/{user_id}/steps/{step}/complete", headers=world.server_headers)
        assert done.status_code == 200, done.text
        async with asyncio.timeout(PATIENCE_S):
            while True:
                name, data = await anext(events)
                if name == "checklist":
                    break
        second = json.loads(data)
        assert {s["id"]: s["status"] for s in second["steps"]} == _expected_statuses(done.json())
        assert {s["id"]: s["status"] for s in second["steps"]}[step] == "completed"
        assert second["progress"] == done.json()["progress"]


async def test_the_sdk_bundle_is_served_to_any_page(world: World, http: httpx.AsyncClient) -> None:
    r = await http.get("/embed/v1/firstmile.js")
    assert r.status_code == 200, "the SDK bundle is built by `make web` before the tests"
    assert r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cross-origin-resource-policy"] == "cross-origin"
    assert b"firstmile" in r.content.lower()
