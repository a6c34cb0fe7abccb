"""The rate limiter port, and its in-process adapter (the embedded default, and the fallback while Redis is down).

A :class:`RateLimiter` checks one request against its tenant's two policies and, when asked,
counts it for the abuse detector, all in one step: the Redis adapter does it in one Lua
script (one round trip, atomic), this one in plain Python between two awaits (atomic on one
event loop). Both apply :mod:`firstmile.guardrail.policy`, and
``tests/integration/test_rate_limiters.py`` runs one contract against both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from firstmile.guardrail.policy import (
    DETECTOR_TTL_MS,
    AbuseFlag,
    Baseline,
    DetectorPolicy,
    Limits,
    Verdict,
    decide,
    observe,
)

Clock = Callable[[], float]
"""Milliseconds since the epoch."""


def wall_clock_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True, slots=True)
class LimitRequest:
    """One request to check: whose it is, the tenant's limits, and its kind for the abuse detector."""

    tenant: str
    """The tenant's partition (its id)."""
    credential: str
    """The credential's partition: ``api_key:<key id>`` or ``client:<client id>``."""
    limits: Limits
    activity: str | None
    """The kind of request (``POST /v1/onboarding/start``) the detector counts; None: not watched."""


class LimiterUnavailableError(RuntimeError):
    """The limiter's store cannot be reached (Redis down or too slow): the caller falls back."""


class RateLimiter(Protocol):
    async def check(self, request: LimitRequest) -> Verdict:
        """Admit or refuse the request (a refusal changes nothing); count an admitted one for the detector.

        Raises :class:`LimiterUnavailableError` when the store cannot answer.
        """
        ...

    async def close(self) -> None: ...


class InProcessLimiter:
    """Limits kept in this process: bounded (least recently used partitions go first), expired lazily."""

    def __init__(
        self, detector: DetectorPolicy | None, *, clock: Clock = wall_clock_ms, max_partitions: int = 100_000
    ) -> None:
        if max_partitions < 2:
            raise ValueError("the limiter needs room for at least two partitions")
        self.detector = detector
        self.max_partitions = max_partitions
        self._clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._baselines: OrderedDict[tuple[str, str, str], tuple[float, Baseline]] = OrderedDict()
        self._flagged: dict[tuple[str, str], float] = {}

    def _tat(self, partition: str, now: float) -> float | None:
        tat = self._tats.get(partition)
        if tat is None or tat <= now:
            return None
        return tat

    def _store(self, partition: str, tat: float) -> None:
        self._tats[partition] = tat
        self._tats.move_to_end(partition)
        while len(self._tats) > self.max_partitions:
            self._tats.popitem(last=False)

    async def check(self, request: LimitRequest) -> Verdict:
        now = self._clock()
        key, per_tenant = request.limits.quotas
        partitions = (f"{request.tenant}:k:{request.credential}:{key.shape}", f"{request.tenant}:t:{per_tenant.shape}")
        verdict, tats = decide(tuple(self._tat(p, now) for p in partitions), now, request.limits)
        if not verdict.admitted:
            return verdict
        for partition, tat in zip(partitions, tats, strict=True):
            self._store(partition, tat)
        if self.detector is None or request.activity is None:
            return verdict
        flag = self._observe(request, request.activity, now, self.detector)
        return Verdict(verdict.admitted, verdict.standings, flag, watched=True)

    def _observe(self, request: LimitRequest, activity: str, now: float, policy: DetectorPolicy) -> AbuseFlag | None:
        key = (request.tenant, request.credential, activity)
        held = self._baselines.get(key)
        state = held[1] if held is not None and held[0] > now else None
        baseline, anomalous = observe(state, now, policy)
        self._baselines[key] = (now + DETECTOR_TTL_MS, baseline)
        self._baselines.move_to_end(key)
        while len(self._baselines) > self.max_partitions:
            self._baselines.popitem(last=False)
        if not anomalous:
            return None
        who = (request.tenant, request.credential)
        until = self._flagged.get(who)
        if until is not None and until > now:
            return None
        if len(self._flagged) >= self.max_partitions:
            self._flagged = {k: v for k, v in self._flagged.items() if v > now}
            while len(self._flagged) >= self.max_partitions:
                del self._flagged[next(iter(self._flagged))]
        self._flagged[who] = now + policy.cooldown_ms
        return AbuseFlag(activity, baseline.count, baseline.ewma)

    async def close(self) -> None:
        return None


__all__ = ["Clock", "InProcessLimiter", "LimitRequest", "LimiterUnavailableError", "RateLimiter", "wall_clock_ms"]
