"""One contract for the RateLimiter port, run against both adapters: Redis (production, one Lua script per
request, shared by every process of a region) and the in-process limiter (embedded mode, and the fallback
while Redis is down). Both run on a clock the test moves, and one scenario run through both must give the
same answers, or the embedded mode tests nothing. Redis is the real server (deploy/local/redis.sh)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from firstmile.guardrail.limiter import InProcessLimiter, LimiterUnavailableError, LimitRequest, RateLimiter
from firstmile.guardrail.policy import DetectorPolicy, Limits, Quota, Verdict
from firstmile.guardrail.redis_limiter import RedisLimiter

T0 = 1_800_000_000_000.0
MINUTE = 60_000.0
DETECTOR = DetectorPolicy(factor=3, min_count=5, half_life_minutes=5, warmup_minutes=2, cooldown_ms=10 * MINUTE)
START = "POST /v1/onboarding/start"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(kind: str, clock: Clock, redis_url: str, region: str, detector: DetectorPolicy | None) -> RateLimiter:
    if kind == "memory":
        return InProcessLimiter(detector, clock=clock)
    return RedisLimiter(Redis.from_url(redis_url), region, detector, clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def limiter(
    request: pytest.FixtureRequest, clock: Clock, redis_url: str, redis_region: str
) -> AsyncIterator[RateLimiter]:
    adapter = make(request.param, clock, redis_url, redis_region, DETECTOR)
    yield adapter
    await adapter.close()


def limits(key: int = 3, tenant: int = 5, window: int = 60) -> Limits:
    return Limits(Quota("key", key, window), Quota("tenant", tenant, window))


def ask(credential: str, tenant: str = "t-1", lim: Limits | None = None, activity: str | None = START) -> LimitRequest:
    return LimitRequest(tenant, credential, lim or limits(), activity)


def summary(verdict: Verdict) -> tuple[bool, list[tuple[int, int]], list[str]]:
    return verdict.admitted, [(s.remaining, s.reset_seconds) for s in verdict.standings], verdict.violated


async def test_a_key_spends_its_quota_then_is_refused_until_it_refills(limiter: RateLimiter, clock: Clock) -> None:
    answers = [summary(await limiter.check(ask("api_key:a"))) for _ in range(4)]
    assert answers == [
        (True, [(2, 20), (4, 12)], []),
        (True, [(1, 20), (3, 12)], []),
        (True, [(0, 20), (2, 12)], []),
        (False, [(0, 20), (2, 12)], ["key"]),
    ]
    refused = await limiter.check(ask("api_key:a"))
    assert refused.retry_after_seconds == 20
    clock.now += 20_000  # one emission interval (60 s / 3)
    assert (await limiter.check(ask("api_key:a"))).admitted
    assert not (await limiter.check(ask("api_key:a"))).admitted


async def test_a_refused_request_changes_nothing(limiter: RateLimiter, clock: Clock) -> None:
    lim = limits(key=2, tenant=3)
    for _ in range(2):
        assert (await limiter.check(ask("api_key:a", lim=lim))).admitted
    for _ in range(20):  # hammering while refused neither consumes the tenant's quota nor delays the key's refill
        assert not (await limiter.check(ask("api_key:a", lim=lim))).admitted
    other = await limiter.check(ask("api_key:b", lim=lim))
    assert other.admitted and other.standings[1].remaining == 0
    clock.now += 30_000  # one emission interval of the key (and more than one of the tenant)
    again = await limiter.check(ask("api_key:a", lim=lim))
    assert again.admitted  # the twenty refusals took nothing from either


async def test_keys_and_tenants_are_limited_apart(limiter: RateLimiter) -> None:
    lim = limits(key=2, tenant=3)
    assert [(await limiter.check(ask("api_key:a", lim=lim))).admitted for _ in range(3)] == [True, True, False]
    assert (await limiter.check(ask("client:backend", lim=lim))).admitted  # its own key quota; the tenant's third
    tenant_full = await limiter.check(ask("client:backend", lim=lim))
    assert not tenant_full.admitted and tenant_full.violated == ["tenant"]
    elsewhere = await limiter.check(ask("api_key:a", "t-2", lim=lim))  # the same key id in another tenant
    assert elsewhere.admitted and [s.remaining for s in elsewhere.standings] == [1, 2]


async def test_the_detector_flags_a_burst_over_the_credentials_baseline_once_per_cooldown(
    limiter: RateLimiter, clock: Clock
) -> None:
    lim = limits(key=10_000, tenant=10_000)
    for minute in range(3):  # a baseline of 2 a minute, past the warm-up
        clock.now = T0 + minute * MINUTE
        for _ in range(2):
            verdict = await limiter.check(ask("api_key:a", lim=lim))
            assert verdict.watched and verdict.flag is None
    clock.now = T0 + 3 * MINUTE
    flags = []
    for _ in range(12):
        clock.now += 1
        flags.append((await limiter.check(ask("api_key:a", lim=lim))).flag)
    raised = [(i, f) for i, f in enumerate(flags) if f is not None]
    assert len(raised) == 1  # once, though every later request of the minute is as anomalous
    index, flag = raised[0]
    # the baseline after three minutes of 2 (half-life 5 minutes); flagged above 3 times it, at 5 at least
    assert flag.baseline == pytest.approx(2 * (1 - 0.5 ** (3 / 5)))
    assert flag.count == index + 1 == max(5, int(3 * flag.baseline) + 1)
    assert flag.activity == START
    # another credential is judged on its own baseline; this one stays quiet until the cooldown ends
    assert (await limiter.check(ask("api_key:b", lim=lim))).flag is None
    clock.now = T0 + 14 * MINUTE
    burst = [(await limiter.check(ask("api_key:a", lim=lim))).flag for _ in range(40)]
    assert sum(f is not None for f in burst) == 1


async def test_an_unwatched_request_is_limited_but_not_counted(limiter: RateLimiter) -> None:
    verdict = await limiter.check(ask("api_key:a", activity=None))
    assert verdict.admitted and not verdict.watched and verdict.flag is None


async def test_concurrent_requests_never_overspend(limiter: RateLimiter) -> None:
    lim = limits(key=10, tenant=1000)
    verdicts = await asyncio.gather(*(limiter.check(ask("api_key:a", lim=lim)) for _ in range(40)))
    assert sum(v.admitted for v in verdicts) == 10


async def test_both_adapters_answer_a_scenario_alike(redis_url: str, redis_region: str) -> None:
    """A mixed scenario (two tenants, three credentials, two activities, time passing) through both adapters."""
    memory_clock, redis_clock = Clock(), Clock()
    memory = make("memory", memory_clock, redis_url, redis_region, DETECTOR)
    redis = make("redis", redis_clock, redis_url, redis_region, DETECTOR)
    lim = Limits(Quota("key", 7, 10), Quota("tenant", 11, 30))
    steps = []
    for i in range(400):
        credential = ("api_key:a", "api_key:b", "client:c")[i % 3 if i % 5 else 0]
        tenant = "t-1" if i % 7 else "t-2"
        activity = (START, "POST /v1/events")[i % 2] if i % 11 else None
        steps.append((i * 397.0 % 1500.0, ask(credential, tenant, lim, activity)))
    try:
        for advance, request in steps:
            memory_clock.now += advance
            redis_clock.now += advance
            a, b = await memory.check(request), await redis.check(request)
            assert summary(a) == summary(b), request
            assert [s.reset_ms for s in a.standings] == pytest.approx([s.reset_ms for s in b.standings])
            assert (a.watched, a.flag is None) == (b.watched, b.flag is None), request
            if a.flag is not None and b.flag is not None:
                assert (a.flag.count, a.flag.activity) == (b.flag.count, b.flag.activity)
                assert a.flag.baseline == pytest.approx(b.flag.baseline)
    finally:
        await memory.close()
        await redis.close()


async def test_redis_keys_expire_once_they_no_longer_matter(redis_url: str, redis_region: str, clock: Clock) -> None:
    limiter = make("redis", clock, redis_url, redis_region, DETECTOR)
    client = Redis.from_url(redis_url)
    try:
        await limiter.check(ask("api_key:a", lim=limits(key=3, tenant=5, window=60)))
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"fm:{redis_region}:rl:*")])
        assert keys == [
            f"fm:{redis_region}:rl:{{t-1}}:d:api_key:a:{START}",
            f"fm:{redis_region}:rl:{{t-1}}:k:api_key:a:3/60",
            f"fm:{redis_region}:rl:{{t-1}}:t:5/60",
        ]
        assert 0 < await client.pttl(keys[1]) <= 20_001  # the key's TAT: one emission interval ahead
        assert 0 < await client.pttl(keys[2]) <= 12_001
        assert 6 * 86_400_000 < await client.pttl(keys[0]) <= 7 * 86_400_000  # the baseline: a week
    finally:
        await client.aclose()
        await limiter.close()


async def test_redis_on_its_own_clock(redis_url: str, redis_region: str) -> None:
    """Without an injected clock the script reads Redis's TIME (API processes may disagree on the time)."""
    limiter = RedisLimiter(Redis.from_url(redis_url), redis_region, None)
    try:
        lim = limits(key=2, tenant=10, window=3600)
        verdicts = [await limiter.check(ask("api_key:a", lim=lim)) for _ in range(3)]
        assert [v.admitted for v in verdicts] == [True, True, False]
        assert 1799 <= verdicts[2].retry_after_seconds <= 1800
    finally:
        await limiter.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_redis_down_is_reported_as_unavailable(redis_region: str) -> None:
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{_closed_port()}/0", redis_region, DETECTOR, timeout_s=0.5)
    try:
        with pytest.raises(LimiterUnavailableError):
            await limiter.check(ask("api_key:a"))
    finally:
        await limiter.close()
