"""The Redis adapter of the rate limiter: every API process of a region shares the limits.

One request is one ``EVALSHA`` of :data:`CHECK_LUA`, atomic in Redis: both policies' GCRA (the
TATs are stored only when both admit the request), then, for an admitted request, the abuse
detector's count and baseline and its per-credential cooldown. It repeats
:func:`firstmile.guardrail.policy.decide` and :func:`~firstmile.guardrail.policy.observe`
operation for operation. Without an injected clock the script reads the Redis server's
``TIME``, so API processes with skewed clocks still share one timeline.

Keys, all of one tenant in one cluster slot (the tenant id is the hash tag):
``fm:<region>:rl:{<tenant>}:k:<credential>:<q>/<w>`` and ``…:t:<q>/<w>`` (TATs, expiring
when they fall behind; a changed limit is a new key, so it starts with its whole quota),
``…:d:<credential>:<activity>`` (a detector hash, a week after its last request) and
``…:f:<credential>`` (the end of the flag's cooldown). Every time the script compares is a
value it stored, never a key's expiry, so an injected clock (the tests') is the only clock;
expiries only reclaim memory once a key can no longer matter.

No library serves this: the maintained Python limiters (``limits``, for one) check one
window per call and know nothing of a detector, so one request would cost three round
trips and the two limits could disagree about a refused request.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from firstmile.guardrail.limiter import Clock, LimiterUnavailableError, LimitRequest
from firstmile.guardrail.policy import (
    BUCKET_MS,
    DETECTOR_TTL_MS,
    AbuseFlag,
    DetectorPolicy,
    Limits,
    Standing,
    Verdict,
)

# KEYS: 1 the credential's TAT, 2 the tenant's TAT, 3 the detector hash, 4 the flag cooldown.
# ARGV: 1 now in ms ('' reads TIME), 2-3 the key policy's T and w (ms), 4-5 the tenant policy's,
# 6 watch (1/0), 7 minute ms, 8 alpha, 9 factor, 10 minimum count, 11 warm-up minutes,
# 12 cooldown ms, 13 detector ttl ms.
# Returns admitted, then per policy remaining, reset ms, retry ms, then flagged, count, baseline.
CHECK_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local function flt(x) return string.format('%.17g', x) end
local policies = {{KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])}, {KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5])}}
local admitted = true
for _, p in ipairs(policies) do
  local tat = tonumber(redis.call('GET', p[1]))
  local base = now
  if tat and tat > now then base = tat end
  p[4] = base
  p[5] = base + p[2]
  p[7] = math.min(p[2] / 2, 1.0)
  p[6] = p[5] - now <= p[3] + p[7]
  if not p[6] then admitted = false end
end
local out = {admitted and 1 or 0}
for _, p in ipairs(policies) do
  local emission, window, slack = p[2], p[3], p[7]
  local level, refused
  if admitted then
    level = p[5] - now
    refused = false
    redis.call('SET', p[1], flt(p[5]), 'PX', math.ceil(p[5] - now) + 1)
  else
    level = p[4] - now
    refused = not p[6]
  end
  local remaining = math.floor((window - level + slack) / emission)
  if remaining < 0 then remaining = 0 end
  local reset = (remaining + 1) * emission - (window - level) - slack
  out[#out + 1] = remaining
  out[#out + 1] = flt(reset)
  if refused then out[#out + 1] = flt(reset) else out[#out + 1] = '0' end
end
local flagged, count, ewma = 0, 0, 0
if admitted and ARGV[6] == '1' then
  local alpha = tonumber(ARGV[8])
  local minute = math.floor(now / tonumber(ARGV[7]))
  local h = redis.call('HMGET', KEYS[3], 'first', 'minute', 'count', 'ewma')
  local first = tonumber(h[1]) or minute
  local current = tonumber(h[2]) or minute
  count = tonumber(h[3]) or 0
  ewma = tonumber(h[4]) or 0
  if minute > current then
    ewma = alpha * count + (1 - alpha) * ewma
    local gap = minute - current - 1
    if gap > 0 then ewma = ewma * (1 - alpha) ^ gap end
    count = 0
    current = minute
  end
  count = count + 1
  redis.call('HSET', KEYS[3], 'first', string.format('%d', first), 'minute', string.format('%d', current),
    'count', string.format('%d', count), 'ewma', flt(ewma))
  redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[13])))
  if minute - first >= tonumber(ARGV[11]) and count >= tonumber(ARGV[10]) and count > tonumber(ARGV[9]) * ewma then
    local quiet = tonumber(redis.call('GET', KEYS[4]))
    if not quiet or quiet <= now then
      local cooldown = tonumber(ARGV[12])
      redis.call('SET', KEYS[4], flt(now + cooldown), 'PX', math.ceil(cooldown))
      flagged = 1
    end
  end
end
out[#out + 1] = flagged
out[#out + 1] = count
out[#out + 1] = flt(ewma)
return out
"""


class RedisLimiter:
    """The limits of a region in its Redis (see the module docstring)."""

    def __init__(
        self, client: aioredis.Redis, region: str, detector: DetectorPolicy | None, *, clock: Clock | None = None
    ) -> None:
        self._redis = client
        self._prefix = f"fm:{region}:rl:"
        self.detector = detector
        self._clock = clock
        self._check = client.register_script(CHECK_LUA)
        self._encoded: dict[tuple[Limits, bool], list[bytes]] = {}

    @classmethod
    def from_url(
        cls, url: str, region: str, detector: DetectorPolicy | None, *, timeout_s: float, clock: Clock | None = None
    ) -> RedisLimiter:
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, region, detector, clock=clock)

    def _policy_args(self, limits: Limits, watch: bool) -> list[bytes]:
        """ARGV 2-13 of one tenant's limits, encoded once (the request path encodes only keys and the time)."""
        cached = self._encoded.get((limits, watch))
        if cached is not None:
            return cached
        detector = self.detector or DetectorPolicy(1.0, 1, 1.0, 0, 1.0)
        key, per_tenant = limits.quotas
        values: list[object] = [
            repr(key.emission_ms),
            repr(key.window_ms),
            repr(per_tenant.emission_ms),
            repr(per_tenant.window_ms),
            "1" if watch else "0",
            repr(BUCKET_MS),
            repr(detector.alpha),
            repr(detector.factor),
            detector.min_count,
            detector.warmup_minutes,
            repr(detector.cooldown_ms),
            repr(DETECTOR_TTL_MS),
        ]
        encoded = [str(v).encode() for v in values]
        if len(self._encoded) >= 10_000:
            self._encoded.clear()
        self._encoded[(limits, watch)] = encoded
        return encoded

    async def check(self, request: LimitRequest) -> Verdict:
        tenant = f"{self._prefix}{{{request.tenant}}}"
        credential = request.credential
        watch = self.detector is not None and request.activity is not None
        key, per_tenant = request.limits.quotas
        keys = [
            f"{tenant}:k:{credential}:{key.shape}",
            f"{tenant}:t:{per_tenant.shape}",
            f"{tenant}:d:{credential}:{request.activity or ''}",
            f"{tenant}:f:{credential}",
        ]
        now = repr(self._clock()).encode() if self._clock is not None else b""
        args = [now, *self._policy_args(request.limits, watch)]
        try:
            raw = await self._check(keys=keys, args=args)
        except (RedisError, OSError) as exc:  # down, too slow, or refusing: the caller limits locally
            raise LimiterUnavailableError(f"the rate limiter's Redis: {exc}") from exc
        standings = tuple(
            Standing(quota, int(raw[1 + 3 * i]), float(raw[2 + 3 * i]), float(raw[3 + 3 * i]))
            for i, quota in enumerate(request.limits.quotas)
        )
        flag = AbuseFlag(request.activity or "", int(raw[8]), float(raw[9])) if int(raw[7]) else None
        return Verdict(bool(int(raw[0])), standings, flag, watched=watch and bool(int(raw[0])))

    async def close(self) -> None:
        await self._redis.aclose()


__all__ = ["CHECK_LUA", "RedisLimiter"]
