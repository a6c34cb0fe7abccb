"""The in-app channel on the real stack: decided, delivered by the worker, pulled, streamed live, seen, dismissed.

Each part is real: users started through the API, the executor deciding an in-app nudge, the delivery
worker recording it ``sent`` with its ``pg_notify`` in the same transaction, and an app served by
uvicorn on a loopback socket whose hub LISTENs on the test database, read by an HTTP client as a
browser's ``EventSource`` reads it (line by line, as the bytes arrive).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.events.relay import asyncpg_dsn
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges import repository as repo
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.inapp import InAppChannel, InAppHub, InAppInbox
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.schemas import InAppMessage
from firstmile.nudges.service import Decided, DeliveryWorker, NudgeExecutor
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, Database, TenantFixture, make_settings

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("worker:test-inapp")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None)
PATIENCE_S = 30.0
"""How long a wait for something that must happen may take before the test fails (never a timing assertion)."""


# ---- the app on a real socket ----


@dataclass
class Live:
    base: str
    app: Litestar

    @property
    def hub(self) -> InAppHub:
        hub = self.app.state.container.inapp_hub
        assert isinstance(hub, InAppHub)
        return hub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(database: Database, analytics_store: ChdbStore) -> Iterator[Live]:
    """An app with the in-app channel on (no periodic tasks: the tests run the worker), served by uvicorn."""
    port = _free_port()
    settings = make_settings(
        nudge_in_app="on",
        in_process_schedulers=False,  # no delivery loop, trigger scan or stuck scan of its own
        nudge_delivery_interval_seconds=0,
        nudge_stream_heartbeat_seconds=0.5,
        nudge_stream_seconds=2 * PATIENCE_S,
    )
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started, "uvicorn did not start"
    yield Live(f"http://127.0.0.1:{port}", app)
    server.should_exit = True
    thread.join(10)


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + PATIENCE_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"still not {what} after {PATIENCE_S} s"
        await asyncio.sleep(0.02)


@dataclass
class Event:
    """One Server-Sent Event as a client parses it (the fields of one block up to its blank line)."""

    id: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def message(self) -> dict[str, Any]:
        parsed = json.loads("\n".join(self.data))
        assert isinstance(parsed, dict)
        return parsed


class Stream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.last = Event()

    async def next(self) -> Event:
        event = Event()
        async with asyncio.timeout(PATIENCE_S):
            async for line in self.lines:
                if line == "":
                    return event
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    event.comments.append(value)
                elif name == "id":
                    event.id = value
                elif name == "data":
                    event.data.append(value)
                elif name == "retry":
                    event.retry = int(value)
        raise AssertionError("the stream ended")

    async def until_message(self) -> Event:
        """The next message (past heartbeats); fails after PATIENCE_S."""
        async with asyncio.timeout(PATIENCE_S):
            while not (event := await self.next()).data:
                pass
        return event

    async def until_comment(self, comment: str) -> list[Event]:
        """The messages before the comment ``comment`` (kept in ``last``); fails after PATIENCE_S."""
        seen: list[Event] = []
        async with asyncio.timeout(PATIENCE_S):
            while comment not in (event := await self.next()).comments:
                if event.data:
                    seen.append(event)
        self.last = event
        return seen


@asynccontextmanager
async def _stream(base: str, user_id: str, headers: dict[str, str]) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(PATIENCE_S)) as http,
        http.stream("GET", f"/v1/users/{user_id}/messages/stream", headers=headers) as response,
    ):
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


# ---- the nudge itself ----


def _executor() -> NudgeExecutor:
    return NudgeExecutor(OnboardingService(CatalogCache()), ["in_app"], ANYTIME, ThompsonSampler(random.Random(3)))


def _worker(app_engine: AsyncEngine) -> DeliveryWorker:
    return DeliveryWorker(app_engine, {"in_app": InAppChannel()}, None, rng=random.Random(5))


async def _started(client: Client, tenant: TenantFixture) -> tuple[str, str]:
    """A user who started (no e-mail address: in-app needs none); their id and current step."""
    user_id = f"ia-{uuid.uuid4().hex[:10]}"
    r = await client.post(
        "/v1/onboarding/start", json={"user_id": user_id, "traits": {"persona": "developer"}}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    return user_id, r.json()["current_step"]


async def _decide(app_engine: AsyncEngine, tenant: TenantFixture, user_id: str, step: str) -> Decided:
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        return await _executor().on_stuck(tx, user_id, step, datetime.now(UTC))


async def _deliver(app_engine: AsyncEngine, tenant: TenantFixture) -> list[str]:
    return [o.status for o in await _worker(app_engine).deliver_tenant(OPS.tenant(tenant.id))]


async def _events(admin_engine: AsyncEngine, tenant: TenantFixture, kind: str, send_id: uuid.UUID) -> int:
    async with admin_engine.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM outbox WHERE tenant_id = :t AND event_type = :k AND payload->>'send_id' = :s"),
            {"t": tenant.id, "k": kind, "s": str(send_id)},
        )
    return int(count or 0)


def _opened() -> float:
    return float(REGISTRY.get_sample_value("firstmile_nudge_outcomes_total", {"kind": "opened"}) or 0)


# ---- the tests ----


async def test_a_stream_connected_before_the_delivery_gets_the_nudge_live_and_the_pull_endpoint_lists_it(
    client: Client, live: Live, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    user_id, step = await _started(client, tenant)
    decided = await _decide(app_engine, tenant, user_id, step)
    assert decided.status == "scheduled" and decided.arm is not None and decided.arm.split("|")[1] == "in_app"
    async with httpx.AsyncClient(base_url=live.base, headers=tenant.headers, timeout=PATIENCE_S) as http:
        assert (await http.get(f"/v1/users/{user_id}/messages")).json() == {"user_id": user_id, "messages": []}
        async with _stream(live.base, user_id, tenant.headers) as stream:
            opening = await stream.until_comment("open")
            assert opening == []  # decided, not delivered yet: nothing pending
            assert stream.last.retry == 3000  # how long an EventSource waits before it reconnects
            await _until(lambda: live.hub.listening, "listening")
            connects = live.hub.connects
            assert await _deliver(app_engine, tenant) == ["sent"]
            event = await stream.until_message()
            [send] = await _sends(app_engine, tenant, user_id)
            assert event.id == str(send.send_id) == event.message["send_id"]
            assert event.message["subject"] == send.subject and event.message["body"] == send.body
            assert event.message["seen_at"] is None
            assert live.hub.connects == connects  # it came by NOTIFY, not by a resync after a reconnect
            # idle: heartbeats, and nothing else (the message is not sent twice)
            for _ in range(2):
                idle = await stream.next()
                assert idle.comments == ["keep-alive"] and idle.data == []
            assert live.hub.subscriptions == 1
        # the client went away: the stream ended and unsubscribed
        await _until(lambda: live.hub.subscriptions == 0, "unsubscribed")
        listed = (await http.get(f"/v1/users/{user_id}/messages")).json()
    assert [m["send_id"] for m in listed["messages"]] == [str(send.send_id)]
    assert listed["messages"][0]["body"] == send.body and listed["messages"][0]["seen_at"] is None
    assert send.status == "sent" and send.provider == "in_app" and send.channel == "in_app"
    assert await _events(admin_engine, tenant, "nudge.sent", send.send_id) == 1


async def _sends(app_engine: AsyncEngine, tenant: TenantFixture, user_id: str) -> list[repo.SendRow]:
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        return await repo.sends_for(tx, user_id)


async def test_a_pending_message_comes_first_then_seen_opens_it_once_and_dismiss_hides_it(
    client: Client, live: Live, tenant: TenantFixture, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    user_id, step = await _started(client, tenant)
    await _decide(app_engine, tenant, user_id, step)
    assert await _deliver(app_engine, tenant) == ["sent"]
    [send] = await _sends(app_engine, tenant, user_id)
    base = f"/v1/users/{user_id}/messages"
    # delivered before the stream connected: it is pending, and comes before the opening comment
    async with _stream(live.base, user_id, tenant.headers) as stream:
        [pending] = await stream.until_comment("open")
        assert pending.id == str(send.send_id)
    opened_before = _opened()
    for _ in range(2):  # idempotent: the first time records it
        r = await client.post(f"{base}/{send.send_id}/seen", headers=tenant.headers)
        assert r.status_code == 204, r.text
    assert await _events(admin_engine, tenant, "nudge.opened", send.send_id) == 1
    assert _opened() == opened_before + 1
    [listed] = (await client.get(base, headers=tenant.headers)).json()["messages"]
    assert listed["send_id"] == str(send.send_id) and listed["seen_at"] is not None
    # seen: listed still, but no longer pending for a new stream
    async with _stream(live.base, user_id, tenant.headers) as stream:
        assert await stream.until_comment("open") == []
    for _ in range(2):
        r = await client.post(f"{base}/{send.send_id}/dismiss", headers=tenant.headers)
        assert r.status_code == 204, r.text
    assert (await client.get(base, headers=tenant.headers)).json()["messages"] == []
    assert await _events(admin_engine, tenant, "nudge.opened", send.send_id) == 1


async def test_strangers_malformed_ids_other_tenants_and_read_only_keys_are_refused(
    client: Client, live: Live, tenant: TenantFixture, other_tenant: TenantFixture, app_engine: AsyncEngine,
    admin_engine: AsyncEngine,
) -> None:  # fmt: skip
    user_id, step = await _started(client, tenant)
    await _decide(app_engine, tenant, user_id, step)
    assert await _deliver(app_engine, tenant) == ["sent"]
    [send] = await _sends(app_engine, tenant, user_id)
    base = f"/v1/users/{user_id}/messages"

    def problem(r: httpx.Response, status: int, slug: str) -> None:
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"].endswith(f"/{slug}")

    # a user the tenant does not hold; a send that is not theirs; ids that are not ids
    problem(await client.get("/v1/users/nobody-here/messages", headers=tenant.headers), 404, "user-not-found")
    async with httpx.AsyncClient(base_url=live.base, headers=tenant.headers, timeout=PATIENCE_S) as http:
        problem(await http.get("/v1/users/nobody-here/messages/stream"), 404, "user-not-found")
    problem(await client.post(f"{base}/{uuid.uuid4()}/seen", headers=tenant.headers), 404, "message-not-found")
    problem(await client.post(f"{base}/{uuid.uuid4()}/dismiss", headers=tenant.headers), 404, "message-not-found")
    problem(await client.post(f"{base}/not-a-uuid/seen", headers=tenant.headers), 400, "validation-error")
    problem(await client.get(f"{base}?limit=0", headers=tenant.headers), 400, "validation-error")
    problem(await client.get("/v1/users/-bad/messages", headers=tenant.headers), 400, "validation-error")
    # another tenant's key: the user and the message do not exist there
    problem(await client.get(base, headers=other_tenant.headers), 404, "user-not-found")
    problem(await client.post(f"{base}/{send.send_id}/seen", headers=other_tenant.headers), 404, "message-not-found")
    problem(await client.post(f"{base}/{send.send_id}/dismiss", headers=other_tenant.headers), 404, "message-not-found")
    async with httpx.AsyncClient(base_url=live.base, headers=other_tenant.headers, timeout=PATIENCE_S) as http:
        problem(await http.get(f"{base}/stream"), 404, "user-not-found")
    # a read-only key reads, and cannot mark
    reader = await create_key(admin_engine, PEPPER, tenant.slug, ["onboarding:read"], "reader")
    read_only = {"Authorization": f"Bearer {reader.key}"}
    assert [m["send_id"] for m in (await client.get(base, headers=read_only)).json()["messages"]] == [str(send.send_id)]
    problem(await client.post(f"{base}/{send.send_id}/seen", headers=read_only), 403, "forbidden")
    problem(await client.post(f"{base}/{send.send_id}/dismiss", headers=read_only), 403, "forbidden")
    problem(await client.get(base), 401, "unauthenticated")
    # nothing changed for the owner
    [listed] = (await client.get(base, headers=tenant.headers)).json()["messages"]
    assert listed["seen_at"] is None
    assert await _events(admin_engine, tenant, "nudge.opened", send.send_id) == 0


async def test_the_in_app_send_counts_against_the_daily_budget(
    client: Client, tenant: TenantFixture, app_engine: AsyncEngine
) -> None:
    user_id, step = await _started(client, tenant)
    first = await _decide(app_engine, tenant, user_id, step)
    assert first.status == "scheduled" and await _deliver(app_engine, tenant) == ["sent"]
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:  # the same user stuck again today
        await tx.execute(
            text("UPDATE nudge_sends SET trigger_key = 'stuck:earlier' WHERE tenant_id = :t AND user_id = :u"),
            {"t": tenant.id, "u": user_id},
        )
    second = await _decide(app_engine, tenant, user_id, step)
    assert second.status == "scheduled" and second.send_at is not None and first.send_at is not None
    assert second.send_at.date() > first.send_at.date()  # the next calendar day (UTC: the user has no time zone)
    sends = {s.trigger_key: s for s in await _sends(app_engine, tenant, user_id)}
    later = sends[f"stuck:{step}"]
    assert sends["stuck:earlier"].status == "sent" and later.status == "scheduled"
    assert "fatigue-cap" in later.decision["policy"]["in_app"]["reasons"]
    assert await _deliver(app_engine, tenant) == []  # not due today


async def test_the_hub_reconnects_and_a_message_sent_while_nobody_listened_is_not_missed(
    client: Client,
    live: Live,
    tenant: TenantFixture,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    database: Database,
) -> None:
    # 1. the app's hub loses its connection (the backend is killed): it reconnects, and live delivery goes on
    user_id, step = await _started(client, tenant)
    await _decide(app_engine, tenant, user_id, step)
    async with _stream(live.base, user_id, tenant.headers) as stream:
        await stream.until_comment("open")
        await _until(lambda: live.hub.listening, "listening")
        connects = live.hub.connects
        async with admin_engine.connect() as conn:
            killed = await conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'firstmile-inapp' AND datname = current_database()"
                )
            )
        assert killed and killed >= 1
        await _until(lambda: live.hub.connects > connects and live.hub.listening, "reconnected")
        assert await _deliver(app_engine, tenant) == ["sent"]
        [send] = await _sends(app_engine, tenant, user_id)
        assert (await stream.until_message()).id == str(send.send_id)

    # 2. a hub that is not listening when the message is committed: the resync at connect reads it
    other, other_step = await _started(client, tenant)
    await _decide(app_engine, tenant, other, other_step)
    hub = InAppHub(asyncpg_dsn(database.app_url), application_name="firstmile-inapp-test")
    inbox = InAppInbox(hub, heartbeat_s=0.2, stream_s=PATIENCE_S)
    items = inbox.stream(UnitOfWork(app_engine, OPS.tenant(tenant.id)), other)
    assert await anext(items) == "open"  # subscribed, nothing pending, nobody listening
    assert await _deliver(app_engine, tenant) == ["sent"]  # its NOTIFY reaches no one
    [missed] = await _sends(app_engine, tenant, other)
    stop = asyncio.Event()
    runner = asyncio.create_task(hub.run(stop))
    try:
        got: list[InAppMessage] = []
        async with asyncio.timeout(PATIENCE_S):
            while not got:
                item = await anext(items)
                if isinstance(item, InAppMessage):
                    got.append(item)
        assert [m.send_id for m in got] == [missed.send_id] and hub.connects == 1
        # announced again, or read again at a resync: a stream sends a message once
        hub.deliver(json.dumps({"tenant": str(tenant.id), "user": other, "send": str(missed.send_id)}))
        assert await anext(items) == "keep-alive"
        hub.resync_all()
        assert await anext(items) == "keep-alive"
    finally:
        stop.set()
        await runner
    rest = [item async for item in items]  # the hub stopped: the stream ends
    assert all(isinstance(item, str) for item in rest)
    assert hub.subscriptions == 0
