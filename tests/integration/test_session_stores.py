"""One contract for the SessionStore port, run against both adapters: Redis (production, shared by every
process of a region) and the in-process store (embedded mode). Like the analytics, feature and key
provider contract suites: both must behave the same, or the embedded mode tests nothing."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from firstmile.admin.sessions import AdminSession, LoginState, MemorySessionStore, RedisSessionStore, SessionStore


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[SessionStore]:
    adapter: SessionStore = (
        MemorySessionStore() if request.param == "memory" else RedisSessionStore(Redis.from_url(redis_url))
    )
    yield adapter
    await adapter.close()


def _session(tenant: str, *, subject: str = "sub-1", sid: str | None = None, lifetime: float = 3600) -> AdminSession:
    now = time.time()
    return AdminSession(
        tenant_id="00000000-0000-0000-0000-000000000001",
        tenant_slug=tenant,
        subject=subject,
        name="Ada",
        email="ada@example.com",
        roles=("owner",),
        origin="sso",
        csrf_token=secrets.token_urlsafe(16),
        created_at=now,
        expires_at=now + lifetime,
        realm_session=sid,
    )


def _id() -> str:
    return secrets.token_urlsafe(24)


def _tenant() -> str:
    return f"t-{secrets.token_hex(5)}"


async def test_a_saved_session_loads_until_deleted(store: SessionStore) -> None:
    session_id, session = _id(), _session(_tenant())
    await store.save(session_id, session, idle=60)
    assert await store.load(session_id, idle=60) == session
    assert await store.load(_id(), idle=60) is None
    assert await store.delete(session_id) == session
    assert await store.load(session_id, idle=60) is None
    assert await store.delete(session_id) is None


async def test_a_session_ends_when_idle_and_a_request_restarts_its_idle_timer(store: SessionStore) -> None:
    kept, dropped = _id(), _id()
    tenant = _tenant()
    await store.save(kept, _session(tenant), idle=1)
    await store.save(dropped, _session(tenant), idle=1)
    await asyncio.sleep(0.6)
    assert await store.load(kept, idle=1) is not None  # a request: the idle timer starts again
    await asyncio.sleep(0.6)
    assert await store.load(kept, idle=1) is not None
    await asyncio.sleep(1.3)
    assert await store.load(kept, idle=1) is None
    assert await store.load(dropped, idle=1) is None


async def test_a_session_ends_at_its_absolute_lifetime(store: SessionStore) -> None:
    session_id = _id()
    await store.save(session_id, _session(_tenant(), lifetime=1), idle=60)
    assert await store.load(session_id, idle=60) is not None
    await asyncio.sleep(1.3)
    assert await store.load(session_id, idle=60) is None  # however recently it was used


async def test_back_channel_logout_ends_the_sessions_of_one_realm_session_or_subject(store: SessionStore) -> None:
    tenant, elsewhere = _tenant(), _tenant()
    a, b, c, d = _id(), _id(), _id(), _id()
    await store.save(a, _session(tenant, subject="ada", sid="sid-1"), idle=60)
    await store.save(b, _session(tenant, subject="ada", sid="sid-2"), idle=60)
    await store.save(c, _session(elsewhere, subject="ada", sid="sid-1"), idle=60)
    await store.save(d, _session(tenant, subject="bob", sid="sid-3"), idle=60)
    ended = await store.end_realm_session(tenant, "sid-1", None)
    assert [s.realm_session for s in ended] == ["sid-1"]
    assert await store.load(a, idle=60) is None
    assert await store.load(b, idle=60) is not None  # another Keycloak session of the same person
    assert await store.load(c, idle=60) is not None  # the same sid in another tenant's realm
    by_subject = await store.end_realm_session(tenant, None, "ada")
    assert [s.realm_session for s in by_subject] == ["sid-2"]
    assert await store.load(d, idle=60) is not None
    assert await store.end_realm_session(tenant, None, None) == []


async def test_a_login_state_is_taken_once_and_a_replay_is_told_apart(store: SessionStore) -> None:
    state = _id()
    login = LoginState(tenant_slug=_tenant(), tenant_id="x", verifier="v", nonce="n", browser="b", next_path="/admin/")
    await store.put_state(state, login, ttl=60)
    assert await store.take_state(state) == (login, False)
    assert await store.take_state(state) == (login, True)  # replayed: audited for its tenant
    assert await store.take_state(_id()) == (None, False)  # never started
    expiring = _id()
    await store.put_state(expiring, login, ttl=1)
    await asyncio.sleep(1.3)
    assert await store.take_state(expiring) == (None, False)


async def test_a_claim_is_granted_once_within_its_ttl(store: SessionStore) -> None:
    key = f"test-claim:{_id()}"
    assert await store.claim(key, ttl=1) is True
    assert await store.claim(key, ttl=1) is False
    await asyncio.sleep(1.3)
    assert await store.claim(key, ttl=1) is True
