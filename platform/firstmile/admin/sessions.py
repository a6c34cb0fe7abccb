"""Server-side admin sessions and one-time login state: Redis, or in-process (embedded).

The browser holds only a random session id in a cookie; the store is keyed by its
SHA-256, so a dump of Redis hands out no cookies. A session ends at the first of:
its absolute lifetime, ``idle`` seconds without a request, logout, or Keycloak's
back-channel logout of the realm session it came from (indexed by ``sid`` and by
subject). Login states are one-time: taking one leaves a tombstone, so a replayed
``state`` is told apart from an unknown one (and audited for its tenant).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from firstmile.kit.errors import DependencyUnavailableError

Origin = Literal["sso", "bootstrap"]


@dataclass(frozen=True, slots=True)
class AdminSession:
    """One admin's login to one tenant."""

    tenant_id: str
    tenant_slug: str
    subject: str
    name: str
    email: str
    roles: tuple[str, ...]
    origin: Origin
    csrf_token: str
    created_at: float
    expires_at: float
    realm_session: str | None = None  # Keycloak's sid, for back-channel logout
    id_token: str | None = None  # the id_token_hint of RP-initiated logout

    @property
    def authenticated_tenant(self) -> uuid.UUID:
        """The tenant this session signed in to: an authenticated principal's tenant."""
        return uuid.UUID(self.tenant_id)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> AdminSession:
        data: dict[str, Any] = json.loads(raw)
        data["roles"] = tuple(data["roles"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class LoginState:
    """What the callback needs to finish a login it started: kept server-side under the ``state``."""

    tenant_slug: str
    tenant_id: str
    verifier: str  # PKCE code verifier
    nonce: str
    browser: str  # SHA-256 of the login cookie that binds the state to the browser that started it
    next_path: str
    created_at: float = field(default_factory=time.time)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> LoginState:
        return cls(**json.loads(raw))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SessionStore(Protocol):
    async def save(self, session_id: str, session: AdminSession, idle: float) -> None: ...

    async def load(self, session_id: str, idle: float) -> AdminSession | None:
        """The live session (its idle timer restarted), or None."""
        ...

    async def delete(self, session_id: str) -> AdminSession | None: ...

    async def end_realm_session(self, tenant_slug: str, sid: str | None, subject: str | None) -> list[AdminSession]:
        """End the sessions of one Keycloak session (``sid``) or, without it, of one subject."""
        ...

    async def put_state(self, state: str, login: LoginState, ttl: float) -> None: ...

    async def take_state(self, state: str) -> tuple[LoginState | None, bool]:
        """(the login state, False) the first time; (the spent state, True) on a replay; (None, False) if unknown."""
        ...

    async def claim(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is claimed within ``ttl``: one-time tokens, logout-token ids."""
        ...

    async def close(self) -> None: ...


class MemorySessionStore:
    """In-process store for the embedded mode (one process); bounded, expired entries dropped lazily."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[float, AdminSession]] = OrderedDict()
        self._states: dict[str, tuple[float, LoginState, bool]] = {}
        self._claims: dict[str, float] = {}

    def _bound(self, table: dict[str, Any]) -> None:
        now = self._clock()
        if len(table) >= self.max_entries:
            for key in [k for k, v in table.items() if (v[0] if isinstance(v, tuple) else v) <= now]:
                del table[key]
        while len(table) >= self.max_entries:
            del table[next(iter(table))]

    async def save(self, session_id: str, session: AdminSession, idle: float) -> None:
        self._bound(self._sessions)
        self._sessions[digest(session_id)] = (min(self._clock() + idle, session.expires_at), session)

    async def load(self, session_id: str, idle: float) -> AdminSession | None:
        key = digest(session_id)
        hit = self._sessions.get(key)
        now = self._clock()
        if hit is None:
            return None
        if hit[0] <= now or hit[1].expires_at <= now:
            del self._sessions[key]
            return None
        self._sessions[key] = (min(now + idle, hit[1].expires_at), hit[1])
        return hit[1]

    async def delete(self, session_id: str) -> AdminSession | None:
        hit = self._sessions.pop(digest(session_id), None)
        return hit[1] if hit is not None else None

    async def end_realm_session(self, tenant_slug: str, sid: str | None, subject: str | None) -> list[AdminSession]:
        ended: list[AdminSession] = []
        for key, (_, session) in list(self._sessions.items()):
            if session.tenant_slug != tenant_slug:
                continue
            if (sid is not None and session.realm_session == sid) or (sid is None and session.subject == subject):
                del self._sessions[key]
                ended.append(session)
        return ended

    async def put_state(self, state: str, login: LoginState, ttl: float) -> None:
        self._bound(self._states)
        self._states[digest(state)] = (self._clock() + ttl, login, False)

    async def take_state(self, state: str) -> tuple[LoginState | None, bool]:
        key = digest(state)
        hit = self._states.get(key)
        if hit is None or hit[0] <= self._clock():
            self._states.pop(key, None)
            return None, False
        expires, login, spent = hit
        if spent:
            return login, True
        self._states[key] = (expires, login, True)
        return login, False

    async def claim(self, key: str, ttl: float) -> bool:
        now = self._clock()
        until = self._claims.get(key)
        if until is not None and until > now:
            return False
        self._bound(self._claims)
        self._claims[key] = now + ttl
        return True

    async def close(self) -> None:
        return None


_PREFIX = "fm:admin:"


@asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """Redis down or too slow: the request answers 503 (no session can be read or kept without it)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise DependencyUnavailableError("the admin session store (Redis)") from exc


class RedisSessionStore:
    """Sessions shared by every API process of a region; Redis expires them (idle) besides our checks."""

    def __init__(self, client: aioredis.Redis, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._clock = clock

    @classmethod
    def from_url(cls, url: str) -> RedisSessionStore:
        return cls(aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0))

    @staticmethod
    def _session_key(session_id: str) -> str:
        return f"{_PREFIX}s:{digest(session_id)}"

    @staticmethod
    def _index_keys(session: AdminSession) -> list[str]:
        keys = [f"{_PREFIX}sub:{session.tenant_slug}:{digest(session.subject)}"]
        if session.realm_session:
            keys.append(f"{_PREFIX}sid:{session.tenant_slug}:{digest(session.realm_session)}")
        return keys

    async def save(self, session_id: str, session: AdminSession, idle: float) -> None:
        async with _reachable():
            key = self._session_key(session_id)
            lifetime = max(1, int(session.expires_at - self._clock()) + 1)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key, session.dumps(), ex=max(1, min(int(idle), lifetime)))
                for index in self._index_keys(session):
                    pipe.sadd(index, key)
                    pipe.expire(index, lifetime)
                await pipe.execute()

    async def load(self, session_id: str, idle: float) -> AdminSession | None:
        async with _reachable():
            key = self._session_key(session_id)
            raw = await self._redis.getex(key, ex=max(1, int(idle)))
            if raw is None:
                return None
            session = AdminSession.loads(raw)
            if session.expires_at <= self._clock():
                await self._redis.delete(key)
                return None
            return session

    async def delete(self, session_id: str) -> AdminSession | None:
        async with _reachable():
            raw = await self._redis.getdel(self._session_key(session_id))
            return AdminSession.loads(raw) if raw is not None else None

    async def end_realm_session(self, tenant_slug: str, sid: str | None, subject: str | None) -> list[AdminSession]:
        async with _reachable():
            if sid is not None:
                index = f"{_PREFIX}sid:{tenant_slug}:{digest(sid)}"
            elif subject is not None:
                index = f"{_PREFIX}sub:{tenant_slug}:{digest(subject)}"
            else:
                return []
            ended: list[AdminSession] = []
            for key in await self._redis.smembers(index):
                raw = await self._redis.getdel(key)
                if raw is not None:
                    ended.append(AdminSession.loads(raw))
            await self._redis.delete(index)
            return ended

    async def put_state(self, state: str, login: LoginState, ttl: float) -> None:
        async with _reachable():
            await self._redis.set(f"{_PREFIX}st:{digest(state)}", login.dumps(), ex=max(1, int(ttl)))

    async def take_state(self, state: str) -> tuple[LoginState | None, bool]:
        async with _reachable():
            key = f"{_PREFIX}st:{digest(state)}"
            spent_key = f"{_PREFIX}st-spent:{digest(state)}"
            raw = await self._redis.getdel(key)
            if raw is not None:
                login = LoginState.loads(raw)
                await self._redis.set(spent_key, raw, ex=3600)
                return login, False
            spent = await self._redis.get(spent_key)
            return (LoginState.loads(spent), True) if spent is not None else (None, False)

    async def claim(self, key: str, ttl: float) -> bool:
        async with _reachable():
            return bool(await self._redis.set(f"{_PREFIX}claim:{digest(key)}", "1", ex=max(1, int(ttl)), nx=True))

    async def close(self) -> None:
        await self._redis.aclose()
