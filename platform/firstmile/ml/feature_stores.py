"""The adapters of the feature store port: Redis (production) and a bounded dict (embedded mode).

Both run the update rule of :mod:`firstmile.ml.features`: the dict store calls
:func:`~firstmile.ml.features.apply_event`, the Redis store runs :data:`APPLY_LUA`,
its line-for-line twin, inside Redis, so each user's update is atomic however
many consumers write at once. ``tests/unit/test_features_contract.py`` runs the
same event sequences through both and compares the stored state.

Redis layout: one hash per user, ``fm:{region}:feat:{tenant_id}:{user_id}``,
its fields the state map, with a TTL renewed on every write.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from redis.asyncio import Redis

from firstmile.events.envelope import Envelope
from firstmile.ml.features import (
    ENGAGEMENT_HALF_LIFE_MS,
    ID_CHARS,
    RECENT_IDS,
    RECENT_TAU_MS,
    SESSION_GAP_MS,
    FeatureEvent,
    FeatureStore,
    OnlineFeatures,
    apply_event,
    feature_events,
    to_ms,
)

log = logging.getLogger("firstmile.features")
DEFAULT_TTL = timedelta(days=90)

# KEYS[1]: the user's hash. ARGV: ttl seconds, session gap ms, engagement half-life ms,
# 24 h time constant ms, ring size, id length, then 10 values per event:
# kind ('e' event, 'x' erase), time ms, ref, activity ('1'/'0'), step id, the five traits.
# Mirrors firstmile.ml.features.apply_event; returns 1 when the hash changed.
APPLY_LUA = """
local key = KEYS[1]
local ttl = tonumber(ARGV[1])
local gap = tonumber(ARGV[2])
local half = tonumber(ARGV[3])
local tau = tonumber(ARGV[4])
local ring = tonumber(ARGV[5])
local idlen = tonumber(ARGV[6])
local traits = {'persona', 'signup_source', 'company_size', 'use_case', 'role'}
local function int(x) return string.format('%d', x) end
local function flt(x) return string.format('%.17g', x) end
local function seen(ids, ref)
  for i = 1, #ids, idlen do
    if string.sub(ids, i, i + idlen - 1) == ref then return true end
  end
  return false
end
local h = {}
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
local changed = false
for i = 7, #ARGV, 10 do
  local t = tonumber(ARGV[i + 1])
  local ref = ARGV[i + 2]
  local step = ARGV[i + 4]
  if ARGV[i] == 'x' then
    local erased = t
    if h['erased'] and tonumber(h['erased']) > t then erased = tonumber(h['erased']) end
    h = {erased = int(erased)}
    changed = true
  else
    local skip = false
    if h['erased'] then
      if t <= tonumber(h['erased']) then skip = true else h = {} end
    end
    if not skip and seen(h['ids'] or '', ref) then skip = true end
    if not skip then
      changed = true
      local ids = (h['ids'] or '') .. ref
      if #ids > ring * idlen then ids = string.sub(ids, #ids - ring * idlen + 1) end
      h['ids'] = ids
      for j = 1, 5 do
        local value = ARGV[i + 4 + j]
        if value ~= '' then
          local at = traits[j] .. '_at'
          if not h[at] or t >= tonumber(h[at]) then
            h[traits[j]] = value
            h[at] = int(t)
          end
        end
      end
      if step ~= '' then
        local steps = h['steps'] or ''
        if not string.find(',' .. steps, ',' .. step .. ',', 1, true) then
          h['steps'] = steps .. step .. ','
          h['sn'] = int((tonumber(h['sn']) or 0) + 1)
        end
        if not h['stepat'] or t > tonumber(h['stepat']) then h['stepat'] = int(t) end
      end
      if ARGV[i + 3] == '1' then
        if not h['first'] then
          h['first'] = int(t); h['last'] = int(t); h['n'] = '1'; h['sc'] = '1'
          h['ss'] = int(t); h['se'] = int(t); h['sd'] = '0'; h['eng'] = '1'; h['act'] = '1'
        else
          local last = tonumber(h['last'])
          local eng = tonumber(h['eng'])
          local act = tonumber(h['act'])
          h['n'] = int(tonumber(h['n']) + 1)
          if t < tonumber(h['first']) then h['first'] = int(t) end
          if t >= last then
            eng = eng * 2 ^ (-(t - last) / half) + 1
            act = act * math.exp(-(t - last) / tau) + 1
            h['last'] = int(t)
          else
            eng = eng + 2 ^ (-(last - t) / half)
            act = act + math.exp(-(last - t) / tau)
          end
          h['eng'] = flt(eng)
          h['act'] = flt(act)
          local ss, se, sd = tonumber(h['ss']), tonumber(h['se']), tonumber(h['sd'])
          if t > se + gap then
            h['sc'] = int(tonumber(h['sc']) + 1)
            h['ss'] = int(t); h['se'] = int(t)
          elseif t > se then
            h['sd'] = int(sd + (t - se))
            h['se'] = int(t)
          elseif t >= ss then
            -- inside the latest session: nothing to do
          elseif t >= ss - gap then
            h['sd'] = int(sd + (ss - t))
            h['ss'] = int(t)
          end
        end
      end
    end
  end
end
if changed then
  local args = {}
  for f, v in pairs(h) do
    args[#args + 1] = f
    args[#args + 1] = v
  end
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(args))
  redis.call('EXPIRE', key, ttl)
  return 1
end
return 0
"""


def _lua_args(events: Sequence[FeatureEvent]) -> list[str | int]:
    args: list[str | int] = []
    for ev in events:
        args += ["x" if ev.kind == "erase" else "e", ev.at_ms, ev.ref, "1" if ev.activity else "0", ev.step_id]
        args += list(ev.traits)
    return args


class RedisFeatureStore:
    """Online features in Redis: one hash per user, updated by :data:`APPLY_LUA` (EVALSHA), pipelined."""

    def __init__(self, client: Redis, *, region: str, ttl: timedelta = DEFAULT_TTL, pipeline_size: int = 500) -> None:
        self.client = client
        self.region = region
        self.ttl_seconds = max(1, int(ttl.total_seconds()))
        self.pipeline_size = pipeline_size
        self._apply = client.register_script(APPLY_LUA)
        self._head = [self.ttl_seconds, SESSION_GAP_MS, ENGAGEMENT_HALF_LIFE_MS, RECENT_TAU_MS, RECENT_IDS, ID_CHARS]

    @classmethod
    def from_url(
        cls, url: str, *, region: str, ttl: timedelta = DEFAULT_TTL, socket_timeout: float = 5.0
    ) -> RedisFeatureStore:
        """Connects lazily: nothing is contacted until the first command."""
        client: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
        return cls(client, region=region, ttl=ttl)

    def key(self, tenant_id: uuid.UUID, user_id: str) -> str:
        return f"fm:{self.region}:feat:{tenant_id}:{user_id}"

    async def get(self, tenant_id: uuid.UUID, user_id: str) -> OnlineFeatures | None:
        state = cast(dict[str, str], await self.client.hgetall(self.key(tenant_id, user_id)))
        return OnlineFeatures.from_state(tenant_id, user_id, state)

    async def get_many(self, tenant_id: uuid.UUID, user_ids: Sequence[str]) -> dict[str, OnlineFeatures]:
        found: dict[str, OnlineFeatures] = {}
        for start in range(0, len(user_ids), self.pipeline_size):
            chunk = user_ids[start : start + self.pipeline_size]
            async with self.client.pipeline(transaction=False) as pipe:
                for user_id in chunk:
                    pipe.hgetall(self.key(tenant_id, user_id))
                states: list[dict[str, str]] = await pipe.execute()
            for user_id, state in zip(chunk, states, strict=True):
                features = OnlineFeatures.from_state(tenant_id, user_id, state)
                if features is not None:
                    found[user_id] = features
        return found

    async def _run(self, updates: Sequence[tuple[str, Sequence[FeatureEvent]]]) -> None:
        for start in range(0, len(updates), self.pipeline_size):
            async with self.client.pipeline(transaction=False) as pipe:
                for key, events in updates[start : start + self.pipeline_size]:
                    await self._apply(keys=[key], args=[*self._head, *_lua_args(events)], client=pipe)
                await pipe.execute()

    async def apply(self, events: Sequence[Envelope]) -> None:
        grouped = feature_events(events)
        await self._run([(self.key(tenant, user), evs) for (tenant, user), evs in grouped.items()])

    async def forget(self, tenant_id: uuid.UUID, user_id: str, *, at: datetime | None = None) -> None:
        erase = FeatureEvent(tenant_id, user_id, "erase", to_ms(at or datetime.now(UTC)), "", activity=False)
        await self._run([(self.key(tenant_id, user_id), [erase])])

    async def state(self, tenant_id: uuid.UUID, user_id: str) -> dict[str, str]:
        """The raw stored state (for tests and operators)."""
        return cast(dict[str, str], await self.client.hgetall(self.key(tenant_id, user_id)))

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


class InProcessFeatureStore:
    """The same features in a bounded dict (least recently used users go first), for embedded mode.

    Shared by the in-process consumers and the API of one process; nothing survives a restart.
    """

    def __init__(self, *, max_users: int = 100_000, ttl: timedelta = DEFAULT_TTL) -> None:
        self.max_users = max_users
        self.ttl_seconds = ttl.total_seconds()
        self._users: OrderedDict[tuple[uuid.UUID, str], tuple[float, dict[str, str]]] = OrderedDict()

    def _live(self, key: tuple[uuid.UUID, str]) -> dict[str, str] | None:
        entry = self._users.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._users[key]
            return None
        self._users.move_to_end(key)
        return entry[1]

    async def get(self, tenant_id: uuid.UUID, user_id: str) -> OnlineFeatures | None:
        state = self._live((tenant_id, user_id))
        return None if state is None else OnlineFeatures.from_state(tenant_id, user_id, state)

    async def get_many(self, tenant_id: uuid.UUID, user_ids: Sequence[str]) -> dict[str, OnlineFeatures]:
        found: dict[str, OnlineFeatures] = {}
        for user_id in user_ids:
            features = await self.get(tenant_id, user_id)
            if features is not None:
                found[user_id] = features
        return found

    def _update(self, key: tuple[uuid.UUID, str], events: Sequence[FeatureEvent]) -> None:
        state = dict(self._live(key) or {})
        changed = False
        for ev in events:
            changed = apply_event(state, ev) or changed
        if changed:
            self._users[key] = (time.monotonic() + self.ttl_seconds, state)
            self._users.move_to_end(key)
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)

    async def apply(self, events: Sequence[Envelope]) -> None:
        for key, evs in feature_events(events).items():
            self._update(key, evs)

    async def forget(self, tenant_id: uuid.UUID, user_id: str, *, at: datetime | None = None) -> None:
        erase = FeatureEvent(tenant_id, user_id, "erase", to_ms(at or datetime.now(UTC)), "", activity=False)
        self._update((tenant_id, user_id), [erase])

    async def state(self, tenant_id: uuid.UUID, user_id: str) -> dict[str, str]:
        return dict(self._live((tenant_id, user_id)) or {})

    def ttl_left(self, tenant_id: uuid.UUID, user_id: str) -> float | None:
        entry = self._users.get((tenant_id, user_id))
        return None if entry is None else entry[0] - time.monotonic()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._users.clear()


class FeatureStoreSink:
    """The :class:`~firstmile.ml.consumer.FeatureSink` that feeds a feature store.

    A store failure propagates: the consumer retries the batch (Kafka) or leaves it
    in the outbox (embedded), and the update rules make the retry harmless.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    async def update(self, events: Sequence[Envelope]) -> None:
        await self.store.apply(events)
