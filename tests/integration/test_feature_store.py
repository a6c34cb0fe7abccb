"""The online feature store on real Redis (and the in-process store beside it), the resilient
reader against a Redis server this test starts, stops and freezes, and the embedded app path.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.feature_reader import FeatureRead, ResilientFeatureReader
from firstmile.ml.feature_stores import InProcessFeatureStore, RedisFeatureStore
from firstmile.ml.features import FeatureStore, FeatureStoreUnavailable, OnlineFeatures
from firstmile.tenancy.cli import create_key
from firstmile.wiring.adapters import open_feature_store
from tests.conftest import PEPPER, REGION, EventsDatabase, TenantFixture, make_settings
from tests.factories import manifest_for
from tests.unit import features_contract as contract
from tests.unit.features_support import at, erased, onboarding, segment, step, track

SCOPES = ["onboarding:write", "events:write", "users:admin"]


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis_url: str, redis_region: str) -> AsyncIterator[FeatureStore]:
    if request.param == "memory":
        yield InProcessFeatureStore()
        return
    redis_store = RedisFeatureStore.from_url(redis_url, region=redis_region)
    yield redis_store
    await redis_store.close()


@pytest.fixture
async def redis_store(redis_url: str, redis_region: str) -> AsyncIterator[RedisFeatureStore]:
    s = RedisFeatureStore.from_url(redis_url, region=redis_region)
    yield s
    await s.close()


def tenant_id() -> uuid.UUID:
    return uuid.uuid4()


async def test_sessions_engagement_steps_and_traits_from_an_onboarding(store: FeatureStore) -> None:
    t = tenant_id()
    await store.apply(
        [
            onboarding(t, "u1", "onboarding.started", 0, traits={"persona": "developer", "company_size": "11-50"}),
            track(t, "u1", 5, event="API Key Created"),
            step(t, "u1", "create-api-key", 5, source="event:1"),
            track(t, "u1", 20),
            step(t, "u1", "install-sdk", 25),
        ]
    )
    await store.apply([segment(t, "u1", "page", 100), track(t, "u1", 110), track(t, "u1", 90)])
    f = await store.get(t, "u1")
    assert f is not None
    assert (f.persona, f.company_size, f.signup_source) == ("developer", "11-50", None)
    assert (f.first_seen, f.last_seen) == (at(0), at(110))
    assert (f.events_total, f.steps_completed, f.last_step_completed_at) == (7, 2, at(25))
    # [0, 25] and [90, 110] (the late event at 90 is within 30 min before the second session began)
    assert (f.session_count, f.total_session_seconds) == (2, (25 + 20) * 60)
    model = f.as_model_features(at(110 + 72 * 60))
    decayed = f.engagement * 0.5  # three days after the last event
    assert model["engagement_score"] == pytest.approx(100 * (1 - math.exp(-decayed / 10)))
    assert model["time_since_signup"] == pytest.approx((110 + 72 * 60) / 60)
    assert (model["session_count"], model["avg_session_duration"], model["steps_completed"]) == (2, 45 * 60 / 2, 2)


async def test_shuffled_and_redelivered_batches_give_what_order_gives(store: FeatureStore) -> None:
    t = tenant_id()
    events = [track(t, "u1", m) for m in (0, 3, 7, 12, 20, 26)]
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    await store.apply(events)
    await store.apply(events[3:])  # a consumer restarted and got the tail again
    await store.apply(shuffled)  # and everything, in another order
    reference = InProcessFeatureStore()
    await reference.apply(events)
    got, want = await store.get(t, "u1"), await reference.get(t, "u1")
    assert got == want
    assert got is not None and (got.events_total, got.session_count, got.total_session_seconds) == (6, 1, 26 * 60)


async def test_the_same_user_id_in_two_tenants_is_two_users(store: FeatureStore) -> None:
    a, b = tenant_id(), tenant_id()
    await store.apply([track(a, "same", 0), track(a, "same", 1), segment(b, "same", "identify", 0, traits={})])
    await store.apply([erased(b, "same", 5)])
    fa = await store.get(a, "same")
    assert fa is not None and fa.events_total == 2
    assert await store.get(b, "same") is None
    assert await store.get_many(b, ["same"]) == {}


async def test_user_erased_forgets_the_user_and_late_events_stay_forgotten(store: FeatureStore) -> None:
    t = tenant_id()
    await store.apply([track(t, "gone", 0), track(t, "kept", 0)])
    await store.apply([erased(t, "gone", 10), track(t, "gone", 9)])
    assert await store.get(t, "gone") is None
    assert set(await store.get_many(t, ["gone", "kept"])) == {"kept"}
    await store.forget(t, "kept")
    assert await store.get(t, "kept") is None


async def test_get_many_reads_in_pipelined_chunks(redis_store: RedisFeatureStore) -> None:
    t = tenant_id()
    redis_store.pipeline_size = 2
    await redis_store.apply([track(t, f"u{i}", i) for i in range(5)])
    found = await redis_store.get_many(t, [f"u{i}" for i in range(6)])
    assert sorted(found) == [f"u{i}" for i in range(5)]
    assert all(isinstance(f, OnlineFeatures) and f.events_total == 1 for f in found.values())


async def test_two_clients_updating_one_user_at_once_lose_nothing(redis_url: str, redis_region: str) -> None:
    t = tenant_id()
    one = RedisFeatureStore.from_url(redis_url, region=redis_region)
    two = RedisFeatureStore.from_url(redis_url, region=redis_region)
    batches = [[track(t, "hot", b * 10 + i) for i in range(10)] for b in range(60)]
    steps = [step(t, "hot", f"s{i}", i) for i in range(20)]
    work = [(one if i % 2 else two).apply(batch) for i, batch in enumerate(batches)]
    work += [(two if i % 2 else one).apply([s]) for i, s in enumerate(steps)]
    random.Random(5).shuffle(work)
    await asyncio.gather(*work)
    f = await one.get(t, "hot")
    assert f is not None
    assert (f.events_total, f.steps_completed) == (600 + 20, 20)
    assert (f.first_seen, f.last_seen) == (at(0), at(599))
    await one.close()
    await two.close()


async def test_every_write_sets_the_ttl(redis_store: RedisFeatureStore, redis_url: str) -> None:
    t = tenant_id()
    await redis_store.apply([track(t, "u1", 0), erased(t, "tomb", 0)])
    for user in ("u1", "tomb"):
        ttl = await redis_store.client.ttl(redis_store.key(t, user))
        assert 90 * 86_400 - 60 < ttl <= 90 * 86_400
    settings = make_settings(redis_url=redis_url, feature_ttl_days=2)
    configured = open_feature_store(settings)
    assert isinstance(configured, RedisFeatureStore)
    try:
        await configured.apply([track(t, "u2", 0)])
        key = configured.key(t, "u2")
        assert key == f"fm:{REGION}:feat:{t}:u2"
        assert 2 * 86_400 - 60 < await configured.client.ttl(key) <= 2 * 86_400
        await configured.client.expire(key, 5)
        await configured.apply([track(t, "u2", 1)])  # renewed by the next update
        assert await configured.client.ttl(key) > 86_400
    finally:
        await configured.client.delete(configured.key(t, "u2"))
        await configured.close()


# ---- the contract (tests/unit/features_contract.py) on Redis: the Lua script and its Python twin agree ----


@pytest.mark.parametrize("seed", range(25))
async def test_lua_and_python_agree_on_random_sequences(redis_store: RedisFeatureStore, seed: int) -> None:
    await contract.random_sequence(redis_store, seed)


async def test_lua_and_python_agree_on_the_boundaries(redis_store: RedisFeatureStore) -> None:
    await contract.the_boundaries(redis_store)


async def test_lua_and_python_agree_on_a_long_history(redis_store: RedisFeatureStore) -> None:
    await contract.a_long_history(redis_store)


async def test_lua_and_python_agree_on_forget(redis_store: RedisFeatureStore) -> None:
    await contract.forget(redis_store)


# ---- the reader against a Redis server of this test's own ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server on its own port, for this test alone: started, stopped, frozen at will."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = {"bind": "127.0.0.1", "port": str(self.port), "save": "", "appendonly": "no"}
        options |= {"dir": str(self.folder), "logfile": str(self.folder / "redis.log")}
        self.process = subprocess.Popen(["redis-server", *(x for k, v in options.items() for x in (f"--{k}", v))])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def freeze(self, frozen: bool) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.freeze(False)
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_reader_falls_back_to_recent_features_when_redis_stops(private_redis: PrivateRedis) -> None:
    t = tenant_id()
    store = RedisFeatureStore.from_url(private_redis.url, region=REGION, socket_timeout=1.0)
    clock = Clock()
    reader = ResilientFeatureReader(store, timeout_s=0.05, max_staleness_s=300, clock=clock)
    await store.apply([track(t, "u1", 0), track(t, "u1", 1)])

    fresh = await reader.read(t, "u1")
    assert fresh.source == "fresh" and fresh.features is not None and fresh.features.events_total == 2
    assert (await reader.read(t, "nobody")).source == "absent"

    private_redis.freeze(True)  # a hung server: the read times out
    try:
        clock.now = 10
        hung = await reader.read(t, "u1")
        assert (hung.source, hung.error, hung.age_s, hung.features) == ("stale", "timeout", 10, fresh.features)
    finally:
        private_redis.freeze(False)

    private_redis.stop()  # gone: connection refused
    clock.now = 299
    down = await reader.read(t, "u1")
    assert (down.source, down.age_s, down.features) == ("stale", 299, fresh.features)
    assert down.error is not None and "Connection" in down.error
    with pytest.raises(FeatureStoreUnavailable, match="no cached features"):
        await reader.read(t, "nobody")  # absent before, but nothing cached: unknown now
    clock.now = 301
    with pytest.raises(FeatureStoreUnavailable, match="301 s old"):
        await reader.read(t, "u1")

    private_redis.start()  # back, empty (no persistence), without the script: both recover
    assert (await reader.read(t, "u1")).source == "absent"
    await store.apply([track(t, "u1", 2)])
    again = await reader.read(t, "u1")
    assert again.source == "fresh" and again.features is not None and again.features.events_total == 1
    await store.close()


# ---- the embedded app: events reach app.state.container.features through the in-process relay ----


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {within} s")


async def _tenant(admin_url: str) -> TenantFixture:
    admin = create_async_engine(admin_url, pool_size=2)
    slug = f"f-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION)
    tenant = (await apply_manifest(admin, manifest)).tenant_id
    key = (await create_key(admin, PEPPER, slug, SCOPES, "test")).key
    await admin.dispose()
    return TenantFixture(tenant, slug, key, manifest)


def _track(user: str, event: str, timestamp: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": event}
    if timestamp:
        message["timestamp"] = timestamp
    return message


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_posted_events_reach_the_apps_feature_store_in_embedded_mode(
    events_database: EventsDatabase, analytics_store: ChdbStore, redis_url: str, backend: str
) -> None:
    tenant = await _tenant(events_database.admin_url)
    app = create_app(
        make_settings(**({"redis_url": redis_url} if backend == "redis" else {})),
        events_database.app_url,
        PEPPER,
        analytics=analytics_store,
        relay_database_url=events_database.relay_url,
    )
    h = tenant.headers
    try:
        async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
            features: FeatureStore = app.state.container.features
            assert isinstance(features, RedisFeatureStore if backend == "redis" else InProcessFeatureStore)

            async def on_app_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                """Run ``fn`` where the app and its relay run (the test client's thread and event loop)."""
                return await asyncio.to_thread(client.blocking_portal.call, fn, *args)

            async def get() -> OnlineFeatures | None:
                found: OnlineFeatures | None = await on_app_loop(features.get, tenant.id, "dev-1")
                return found

            started = await client.post(
                "/v1/onboarding/start",
                json={"user_id": "dev-1", "traits": {"persona": "developer", "use_case": "reporting"}},
                headers=h,
            )
            assert started.status_code == 201, started.text
            sent = await client.post(
                "/v1/events",
                json={"batch": [_track("dev-1", "Workspace Created"), _track("dev-1", "API Key Created")]},
                headers=h,
            )
            assert sent.status_code == 202, sent.text

            async def counted() -> bool:
                f = await get()
                return f is not None and f.events_total == 3 and f.steps_completed == 1

            # The start and the two tracked events; "API Key Created" completes the path's first
            # step, and that completion (derived from the event) counts as a step, not as activity.
            await eventually(counted, what="events and the auto-completed step in the feature store")
            f = await get()
            assert f is not None and (f.persona, f.use_case, f.session_count) == ("developer", "reporting", 1)
            read: FeatureRead = await on_app_loop(app.state.container.feature_reader.read, tenant.id, "dev-1")
            model = read.model_features(f.last_seen)
            assert read.source == "fresh" and model is not None and model["user_persona"] == "developer"

            assert (await client.delete("/v1/users/dev-1", headers=h)).status_code == 202

            async def forgotten() -> bool:
                return await get() is None

            await eventually(forgotten, what="user.erased in the feature store")
    finally:
        if backend == "redis":
            own = Redis.from_url(redis_url)
            keys = [k async for k in own.scan_iter(match=f"fm:{REGION}:feat:{tenant.id}:*")]
            if keys:
                await own.delete(*keys)
            await own.aclose()
