"""The guardrail's rules on a clock the test moves: GCRA, the RateLimit fields, the abuse detector's
baseline, the manifest's limits block and the settings. No I/O; the adapters' contract is
tests/integration/test_rate_limiters.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from firstmile.guardrail.limiter import InProcessLimiter, LimitRequest
from firstmile.guardrail.middleware import header_fields, rate_limited
from firstmile.guardrail.policy import (
    Baseline,
    DetectorPolicy,
    Limits,
    Quota,
    Verdict,
    decide,
    limit_header,
    observe,
    policy_header,
)
from firstmile.guardrail.service import limits_of
from firstmile.settings import Settings
from firstmile.tenancy.manifest import LimitsSpec, TenantManifest
from tests.factories import demo_document

MINUTE = 60_000.0
T0 = 1_800_000_000_000.0  # a fixed instant (ms), on a minute boundary


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limits(key: tuple[int, int] = (3, 10), tenant: tuple[int, int] = (100, 10)) -> Limits:
    return Limits(Quota("key", *key), Quota("tenant", *tenant))


def request(credential: str = "api_key:a", tenant: str = "t1", lim: Limits | None = None) -> LimitRequest:
    return LimitRequest(tenant, credential, lim or limits(), "POST /v1/onboarding/start")


# ---------------------------------------------------------------- GCRA


def test_a_fresh_partition_spends_its_quota_at_once_then_one_request_per_emission_interval() -> None:
    quota = limits()  # key: 3 per 10 s, so one every 3333.3 ms
    tats: tuple[float | None, ...] = (None, None)
    remaining = []
    for _ in range(3):
        verdict, after = decide(tats, T0, quota)
        assert verdict.admitted
        remaining.append(verdict.standings[0].remaining)
        tats = after
    assert remaining == [2, 1, 0]
    refused, _ = decide(tats, T0, quota)
    assert not refused.admitted and refused.violated == ["key"]
    assert refused.standings[0].retry_ms == pytest.approx(10_000 / 3 - 1)  # less the 1 ms of slack
    assert refused.retry_after_seconds == 4  # rounded up: never earlier than the limit admits
    assert refused.standings[0].reset_seconds == 4  # t of the refusing policy equals Retry-After
    # one emission interval later (give or take the slack), one more request, not before
    assert not decide(tats, T0 + 10_000 / 3 - 2, quota)[0].admitted
    assert decide(tats, T0 + 10_000 / 3 - 1, quota)[0].admitted
    # a whole window later the partition is full again
    assert decide(tats, T0 + 10_000, quota)[0].standings[0].remaining == 2


def test_a_refusal_stores_nothing_and_the_other_policy_is_reported_as_it_stood() -> None:
    lim = limits(key=(5, 10), tenant=(2, 10))
    tats: tuple[float | None, ...] = (None, None)
    for _ in range(2):
        verdict, tats = decide(tats, T0, lim)
        assert verdict.admitted
    refused, _ = decide(tats, T0, lim)
    assert not refused.admitted and refused.violated == ["tenant"]
    key, tenant = refused.standings
    assert (key.remaining, key.retry_ms) == (3, 0.0)  # the key would have admitted it: 3 of 5 left
    assert tenant.remaining == 0 and tenant.retry_ms == pytest.approx(5_000 - 1)


def test_the_window_is_whole_despite_rounding() -> None:
    # 7 per second: seven emissions of 142.857… ms add up to the window only up to rounding
    lim = limits(key=(7, 1), tenant=(1000, 1))
    tats: tuple[float | None, ...] = (None, None)
    for _ in range(7):
        verdict, tats = decide(tats, T0, lim)
        assert verdict.admitted
    assert not decide(tats, T0, lim)[0].admitted


def test_the_header_fields_use_the_drafts_structured_field_syntax() -> None:
    lim = limits(key=(100, 1), tenant=(1000, 60))
    verdict, _ = decide((None, None), T0, lim)
    assert policy_header(lim.quotas) == '"key";q=100;w=1, "tenant";q=1000;w=60'
    assert limit_header(verdict.standings) == '"key";r=99;t=1, "tenant";r=999;t=1'
    assert header_fields(verdict) == {
        "RateLimit-Policy": '"key";q=100;w=1, "tenant";q=1000;w=60',
        "RateLimit": '"key";r=99;t=1, "tenant";r=999;t=1',
    }


def test_a_refusal_is_a_429_problem_with_retry_after_and_the_fields() -> None:
    lim = limits(key=(1, 30), tenant=(1, 30))
    tats = decide((None, None), T0, lim)[1]
    verdict, _ = decide(tats, T0 + 1000, lim)
    problem = rate_limited(verdict)
    assert (problem.status, problem.slug) == (429, "rate-limited")
    assert problem.extensions == {"violated_policies": ["key", "tenant"]}
    assert problem.headers["Retry-After"] == "29"
    assert problem.headers["RateLimit"] == '"key";r=0;t=29, "tenant";r=0;t=29'
    assert problem.headers["RateLimit-Policy"] == '"key";q=1;w=30, "tenant";q=1;w=30'


@pytest.mark.parametrize(("requests", "window"), [(0, 1), (1, 0)])
def test_a_quota_needs_a_request_and_a_second(requests: int, window: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Quota("key", requests, window)


# ---------------------------------------------------------------- the in-process limiter


async def test_the_in_process_limiter_keeps_keys_and_tenants_apart() -> None:
    clock = Clock()
    limiter = InProcessLimiter(None, clock=clock)
    lim = limits(key=(2, 10), tenant=(3, 10))
    assert [(await limiter.check(request("api_key:a", lim=lim))).admitted for _ in range(3)] == [True, True, False]
    b = await limiter.check(request("api_key:b", lim=lim))
    assert b.admitted  # another key of the tenant: its own quota, the tenant's third request
    refused = await limiter.check(request("api_key:b", lim=lim))
    assert refused.violated == ["tenant"]
    assert (await limiter.check(request("api_key:a", "t2", lim=lim))).admitted  # another tenant
    clock.now += 10_000 / 3 + 1  # the tenant refills one request
    assert (await limiter.check(request("api_key:b", lim=lim))).admitted


async def test_the_in_process_limiter_is_bounded() -> None:
    limiter = InProcessLimiter(None, clock=Clock(), max_partitions=4)
    for i in range(50):
        await limiter.check(request(f"api_key:{i}", tenant=f"t{i}"))
    assert len(limiter._tats) <= 4


# ---------------------------------------------------------------- the abuse detector

DETECTOR = DetectorPolicy(factor=10, min_count=50, half_life_minutes=10, warmup_minutes=30, cooldown_ms=3_600_000)


def steady(minutes: int, per_minute: int, start: float = T0) -> tuple[Baseline | None, float]:
    state: Baseline | None = None
    now = start
    for minute in range(minutes):
        for i in range(per_minute):
            now = start + minute * MINUTE + i
            state, anomalous = observe(state, now, DETECTOR)
            assert not anomalous
    return state, now


def test_the_baseline_is_the_moving_average_of_requests_per_minute() -> None:
    state, _ = steady(120, 10)
    assert state is not None and state.count == 10  # the current minute so far
    assert state.ewma == pytest.approx(10, rel=1e-3)  # 119 full minutes of 10, half-life 10 minutes
    # one minute of 20 moves it by alpha * 10
    alpha = DETECTOR.alpha
    assert alpha == pytest.approx(1 - 0.5 ** (1 / 10))
    after, _ = observe(state, T0 + 120 * MINUTE, DETECTOR)
    assert after.ewma == pytest.approx(alpha * 10 + (1 - alpha) * state.ewma)
    # silent minutes decay it: ten empty minutes halve it
    later, _ = observe(after, T0 + 131 * MINUTE, DETECTOR)
    assert later.ewma == pytest.approx((alpha * 1 + (1 - alpha) * after.ewma) * 0.5, rel=1e-9)


def test_a_burst_far_above_the_credentials_own_baseline_is_anomalous() -> None:
    state, _ = steady(60, 10)
    now = T0 + 60 * MINUTE
    flagged_at = None
    for i in range(200):
        state, anomalous = observe(state, now + i, DETECTOR)
        if anomalous and flagged_at is None:
            flagged_at = state.count
    # the first request of this minute beyond 10 times the baseline (about 10 a minute), and at least 50
    assert state is not None and 9.8 < state.ewma < 10
    assert flagged_at == int(10 * state.ewma) + 1


def test_a_busy_credential_doing_what_it_always_does_is_not_anomalous() -> None:
    state, _ = steady(60, 400)  # far above the minimum, but its own normal
    assert state is not None and state.ewma > 300


def test_a_new_credential_is_not_judged_before_its_warm_up() -> None:
    state: Baseline | None = None
    for i in range(500):
        state, anomalous = observe(state, T0 + i, DETECTOR)
        assert not anomalous  # no history: a launch, not abuse
    state, anomalous = observe(state, T0 + 30 * MINUTE, DETECTOR)
    assert not anomalous  # one request after the warm-up is below the minimum


async def test_a_credential_is_flagged_once_per_cooldown() -> None:
    clock = Clock()
    detector = DetectorPolicy(factor=2, min_count=3, half_life_minutes=10, warmup_minutes=0, cooldown_ms=600_000)
    limiter = InProcessLimiter(detector, clock=clock)
    lim = limits(key=(1000, 1), tenant=(1000, 1))
    flags = [(await limiter.check(request(lim=lim))).flag for _ in range(10)]
    assert [f is not None for f in flags] == [False, False, True] + [False] * 7
    flag = flags[2]
    assert flag is not None and (flag.activity, flag.count, flag.baseline) == ("POST /v1/onboarding/start", 3, 0.0)
    # another activity of the same credential inside the cooldown: still not flagged again
    other = LimitRequest("t1", "api_key:a", lim, "POST /v1/events")
    assert [(await limiter.check(other)).flag for _ in range(5)] == [None] * 5
    # another credential is judged on its own
    assert [(await limiter.check(request("api_key:b", lim=lim))).flag is not None for _ in range(3)][-1]
    clock.now += 600_001
    verdicts = [await limiter.check(request(lim=lim)) for _ in range(30)]
    assert any(v.flag is not None for v in verdicts)  # the cooldown is over
    assert all(v.watched for v in verdicts)


async def test_a_refused_request_is_not_counted_by_the_detector() -> None:
    clock = Clock()
    detector = DetectorPolicy(factor=2, min_count=3, half_life_minutes=10, warmup_minutes=0, cooldown_ms=600_000)
    limiter = InProcessLimiter(detector, clock=clock)
    lim = limits(key=(2, 60), tenant=(100, 60))
    verdicts = [await limiter.check(request(lim=lim)) for _ in range(5)]
    assert [v.admitted for v in verdicts] == [True, True, False, False, False]
    assert all(v.flag is None for v in verdicts)
    assert [v.watched for v in verdicts] == [True, True, False, False, False]


# ---------------------------------------------------------------- the manifest and the settings


def _manifest(limits_block: Any) -> TenantManifest:
    doc = demo_document()
    doc["limits"] = limits_block
    return TenantManifest.model_validate(doc)


def test_the_manifests_limits_override_the_defaults_one_by_one() -> None:
    defaults = limits(key=(1000, 1), tenant=(5000, 1))
    assert limits_of(None, defaults) == defaults
    spec = LimitsSpec.model_validate({"per_key": {"requests": 100}})
    assert limits_of(spec, defaults) == Limits(Quota("key", 100, 1), Quota("tenant", 5000, 1))
    spec = LimitsSpec.model_validate({"per_tenant": {"requests": 60000, "window_seconds": 60}})
    assert limits_of(spec, defaults) == Limits(Quota("key", 1000, 1), Quota("tenant", 60000, 60))


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"per_key": {"requests": 0}}, "greater than or equal to 1"),
        ({"per_key": {"requests": 10, "window_seconds": 0}}, "greater than or equal to 1"),
        ({"per_key": {"requests": 10, "window_seconds": 1.5}}, "valid integer"),
        ({"per_tenant": {"window_seconds": 60}}, "Field required"),
        ({"per_user": {"requests": 10}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_limits_are_refused_with_the_reason(block: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _manifest(block)


def test_limits_change_the_manifest_hash_only_when_set() -> None:
    without = TenantManifest.model_validate(demo_document())
    assert _manifest(None).content_hash() == without.content_hash()  # tenants applied before keep their revision
    assert _manifest({"per_key": {"requests": 10}}).content_hash() != without.content_hash()


def test_the_settings_have_the_documented_defaults_and_flat_names(monkeypatch: pytest.MonkeyPatch) -> None:
    section = Settings().guardrail
    assert (section.key_requests, section.key_window_seconds) == (1000, 1)
    assert (section.tenant_requests, section.tenant_window_seconds) == (5000, 1)
    assert section.rate_limit_enabled and section.abuse_detection_enabled
    monkeypatch.setenv("FIRSTMILE_RATE_LIMIT_KEY_REQUESTS", "60")
    monkeypatch.setenv("FIRSTMILE_ABUSE_FACTOR", "4")
    section = Settings().guardrail
    assert (section.key_requests, section.abuse_factor) == (60, 4)
    with pytest.raises(ValidationError):
        Settings(abuse_factor=1)  # type: ignore[call-arg]  # a factor of 1 would flag any busy minute


def test_a_verdict_without_standings_retries_after_a_second() -> None:
    assert Verdict(False, ()).retry_after_seconds == 1
