"""The rules of the rate limits and the abuse detector, with no I/O (both limiter adapters apply them).

**Rate limits: GCRA.** A quota of ``q`` requests per ``w`` seconds is the generic cell rate
algorithm with emission interval ``T = w/q`` and tolerance ``w - T``: a partition keeps one
number, its theoretical arrival time (TAT); a request at ``now`` is admitted when
``max(TAT, now) + T - now <= w`` (give or take a millisecond, so that float rounding never
decides the ``q``-th request), which moves the TAT on by ``T``. A fresh partition may spend the whole
quota at once, then gets one request every ``T``. A refused request changes nothing. Times
are milliseconds since the epoch as floats; the Redis adapter's Lua script repeats these
formulas operation for operation, so both adapters give the same answers to the same clock.

**Headers** (draft-ietf-httpapi-ratelimit-headers-11): ``RateLimit-Policy`` lists the policies,
``"key";q=1000;w=1, "tenant";q=5000;w=1``, and ``RateLimit`` their service limits after this
request, ``"key";r=998;t=1, "tenant";r=4990;t=1``: ``r`` is how many more requests would be
admitted right now, ``t`` the seconds (rounded up) until one more is available, so within
``t`` the client can use no more than ``r``. On a refusal ``t`` of the refusing policy equals
``Retry-After``.

**Abuse detector.** Per credential and kind of request (``POST /v1/onboarding/start``), the
admitted requests are counted per minute; the baseline is an exponentially weighted moving
average of those counts. The current minute is anomalous when its count is at least the
minimum and more than ``factor`` times the baseline, once the credential has ``warmup``
minutes of history; a credential is flagged at most once per cooldown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_FLOOR_SLACK = 1e-9
BUCKET_MS = 60_000.0
"""The detector counts requests per minute."""
DETECTOR_TTL_MS = 7 * 86_400_000.0
"""A credential's baseline is forgotten after a week without requests."""


@dataclass(frozen=True, slots=True)
class Quota:
    """One quota policy: ``requests`` per ``window_seconds`` for one partition (a credential, a tenant)."""

    name: str
    requests: int
    window_seconds: int

    def __post_init__(self) -> None:
        if self.requests < 1 or self.window_seconds < 1:
            raise ValueError(f"quota {self.name}: requests and window_seconds must be at least 1")

    @property
    def window_ms(self) -> float:
        return self.window_seconds * 1000.0

    @property
    def emission_ms(self) -> float:
        """``T``: one request's share of the window."""
        return self.window_ms / self.requests

    @property
    def shape(self) -> str:
        """``<q>/<w>``: part of the partition's name, so a changed limit starts afresh (a TAT is only
        meaningful under the emission interval it was counted with)."""
        return f"{self.requests}/{self.window_seconds}"

    @property
    def slack_ms(self) -> float:
        """How early a request may come: 1 ms (or ``T/2`` if less), so float rounding never refuses the
        ``q``-th request of a burst (times since the epoch in ms carry about 0.0002 ms of rounding)."""
        return min(self.emission_ms / 2, 1.0)


@dataclass(frozen=True, slots=True)
class Limits:
    """The two policies every tenant-app request is checked against."""

    per_key: Quota
    per_tenant: Quota

    @property
    def quotas(self) -> tuple[Quota, Quota]:
        return (self.per_key, self.per_tenant)


@dataclass(frozen=True, slots=True)
class Standing:
    """The service limit of one policy after a request: the RateLimit item."""

    quota: Quota
    remaining: int
    reset_ms: float
    retry_ms: float

    @property
    def refused(self) -> bool:
        return self.retry_ms > 0

    @property
    def reset_seconds(self) -> int:
        return max(1, math.ceil(self.reset_ms / 1000 - _FLOOR_SLACK))


@dataclass(frozen=True, slots=True)
class AbuseFlag:
    """An anomalous minute of one credential's requests of one kind."""

    activity: str
    count: int
    """Requests this minute, this one included."""
    baseline: float
    """The credential's usual requests per minute of this kind (the moving average)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one request: admitted or not, each policy's standing, and an abuse flag if one was raised."""

    admitted: bool
    standings: tuple[Standing, ...]
    flag: AbuseFlag | None = None
    watched: bool = False
    """Whether the abuse detector saw the request (False when it was unavailable or not asked)."""

    @property
    def violated(self) -> list[str]:
        return [s.quota.name for s in self.standings if s.refused]

    @property
    def retry_after_seconds(self) -> int:
        """``Retry-After``: whole seconds until every refusing policy admits the request (at least 1)."""
        longest = max((s.retry_ms for s in self.standings), default=0.0)
        return max(1, math.ceil(longest / 1000 - _FLOOR_SLACK))


def _standing(quota: Quota, level: float, refused: bool) -> Standing:
    """The standing of a partition whose TAT is ``level`` ms ahead of now."""
    emission, window = quota.emission_ms, quota.window_ms
    slack = quota.slack_ms
    remaining = max(0, math.floor((window - level + slack) / emission))
    reset = (remaining + 1) * emission - (window - level) - slack
    return Standing(quota, remaining, reset, reset if refused else 0.0)


def decide(tats: tuple[float | None, ...], now: float, limits: Limits) -> tuple[Verdict, tuple[float, ...]]:
    """Check one request at ``now`` (ms) against each policy, whose partitions' TATs are ``tats`` (None:
    never seen, or expired). Returns the verdict and the TATs to store, which only an admitted request stores."""
    quotas = limits.quotas
    bases = [tat if tat is not None and tat > now else now for tat in tats]
    afters = tuple(base + quota.emission_ms for base, quota in zip(bases, quotas, strict=True))
    admits = [after - now <= quota.window_ms + quota.slack_ms for after, quota in zip(afters, quotas, strict=True)]
    admitted = all(admits)
    standings = []
    for quota, base, after, admits_it in zip(quotas, bases, afters, admits, strict=True):
        if admitted:
            standings.append(_standing(quota, after - now, False))
        else:  # nothing is stored: each policy stands where it stood before the request
            standings.append(_standing(quota, base - now, not admits_it))
    return Verdict(admitted, tuple(standings)), afters


def policy_header(quotas: tuple[Quota, ...]) -> str:
    """The ``RateLimit-Policy`` field value (a Structured Fields list)."""
    return ", ".join(f'"{q.name}";q={q.requests};w={q.window_seconds}' for q in quotas)


def limit_header(standings: tuple[Standing, ...]) -> str:
    """The ``RateLimit`` field value (a Structured Fields list)."""
    return ", ".join(f'"{s.quota.name}";r={s.remaining};t={s.reset_seconds}' for s in standings)


# ---------------------------------------------------------------- the abuse detector


@dataclass(frozen=True, slots=True)
class DetectorPolicy:
    """When a credential's minute is anomalous (see the module docstring)."""

    factor: float
    min_count: int
    half_life_minutes: float
    warmup_minutes: int
    cooldown_ms: float

    @property
    def alpha(self) -> float:
        """The weight of the last full minute in the moving average."""
        return 1.0 - math.pow(0.5, 1.0 / self.half_life_minutes)


@dataclass(frozen=True, slots=True)
class Baseline:
    """The detector's state for one credential and kind of request."""

    first: int
    """The minute it was first seen (minutes since the epoch)."""
    minute: int
    """The minute ``count`` belongs to."""
    count: int
    ewma: float


def observe(state: Baseline | None, now: float, policy: DetectorPolicy) -> tuple[Baseline, bool]:
    """Count one admitted request at ``now`` (ms); whether its minute is anomalous (before the cooldown)."""
    minute = math.floor(now / BUCKET_MS)
    if state is None:
        state = Baseline(minute, minute, 0, 0.0)
    count, ewma, current = state.count, state.ewma, state.minute
    if minute > current:
        alpha = policy.alpha
        ewma = alpha * count + (1 - alpha) * ewma
        gap = minute - current - 1
        if gap > 0:
            ewma = ewma * math.pow(1 - alpha, gap)
        count, current = 0, minute
    count += 1
    after = Baseline(state.first, current, count, ewma)
    anomalous = (
        minute - state.first >= policy.warmup_minutes and count >= policy.min_count and count > policy.factor * ewma
    )
    return after, anomalous


__all__ = [
    "BUCKET_MS",
    "DETECTOR_TTL_MS",
    "AbuseFlag",
    "Baseline",
    "DetectorPolicy",
    "Limits",
    "Quota",
    "Standing",
    "Verdict",
    "decide",
    "limit_header",
    "observe",
    "policy_header",
]
