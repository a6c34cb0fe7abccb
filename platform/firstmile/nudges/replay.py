"""Where the API processes remember the providers' webhook requests they already acted on.

:mod:`firstmile.nudges.webhooks` verifies a request and names it by its ``replay_key`` (a hash of what
was signed); :class:`~firstmile.nudges.service.NudgeWebhooks` then asks a :class:`SharedReplayGuard`
whether that key is new. Behind several API replicas the guard must be shared, or a replay that lands
on another replica is applied again: :class:`RedisReplayGuard` keeps each key in Redis
(``SET fm:<region>:wh:<key> 1 NX PX <ttl>``: atomic, so of two replicas receiving the same request at
once exactly one acts), the region's Redis being the one the feature store and the rate limits use.

When Redis cannot answer (down, a timeout), the guard falls back to this process's memory
(:class:`~firstmile.nudges.webhooks.MemoryReplayGuard`) and logs it, rather than refusing the provider's
report: a replay let through changes nothing, since each report is recorded once per send and status,
while a refused report would be retried by the provider and might be lost. :class:`LocalReplayGuard`
is the in-process guard alone (no Redis configured: one API process, ``make run``).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from firstmile.nudges.webhooks import MemoryReplayGuard

log = logging.getLogger("firstmile.nudges.webhooks")


class SharedReplayGuard(Protocol):
    """Remembers the webhook requests already acted on, for every process that asks it."""

    async def first_seen(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; True when it was not already recorded."""
        ...


class LocalReplayGuard:
    """The in-process guard, behind the shared guard's interface."""

    def __init__(self, memory: MemoryReplayGuard | None = None) -> None:
        self.memory = memory or MemoryReplayGuard()

    async def first_seen(self, key: str, ttl_s: float) -> bool:
        return self.memory.first_seen(key, ttl_s)


class RedisReplayGuard:
    """Keys in Redis under ``fm:<region>:wh:``, each for its time to live; this process's memory when Redis fails."""

    def __init__(self, client: aioredis.Redis, region: str, *, fallback: MemoryReplayGuard | None = None) -> None:
        self._redis = client
        self.prefix = f"fm:{region}:wh:"
        self.fallback = fallback or MemoryReplayGuard()

    @classmethod
    def from_url(cls, url: str, region: str, *, timeout_s: float = 0.5) -> RedisReplayGuard:
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, region)

    def redis_key(self, key: str) -> str:
        """The Redis key of a replay key (hashed again: a fixed length whatever the provider's key looks like)."""
        return self.prefix + hashlib.sha256(key.encode()).hexdigest()

    async def first_seen(self, key: str, ttl_s: float) -> bool:
        try:
            created = await self._redis.set(self.redis_key(key), b"1", nx=True, px=max(1, int(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            log.warning("webhook replay guard: Redis unavailable, this process's memory instead: %s", exc)
            return self.fallback.first_seen(key, ttl_s)
        self.fallback.first_seen(key, ttl_s)  # remembered here too, for a later Redis outage
        return bool(created)

    async def close(self) -> None:
        await self._redis.aclose()
