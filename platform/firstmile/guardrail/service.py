"""The guardrail of the tenant API: each request's limits, the fallback while Redis is down, abuse flags.

:meth:`Guardrail.admit` runs once per request of a tenant app, after authentication:

1. the tenant's limits: its manifest's ``limits:`` section over the platform's defaults, read
   once per tenant revision (a manifest change bumps the revision, which comes with the key);
2. one check of the limiter (one Redis round trip, or in-process);
3. an abuse flag raised by that check goes to the tenant's audit log
   (``guardrail.abuse_flagged``: the credential, the kind of request, its rate and baseline;
   nothing about end users), in a short transaction of its own, at most once per credential
   per cooldown. A failed write is logged and never refuses the request.

**Redis down.** The limiter's Redis failing (refused, too slow, erroring) does not fail the
request: the process limits on its own with an in-process limiter for ``fallback_seconds``,
then tries Redis again. Each process then enforces the limits by itself, so a region of ``n``
processes admits up to ``n`` times the quota meanwhile (fail open, bounded). The abuse
detector is unavailable then; as the design's guardrail rule says, each such request is
logged (``abuse check skipped``) and allowed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.guardrail.limiter import LimiterUnavailableError, LimitRequest, RateLimiter
from firstmile.guardrail.policy import AbuseFlag, DetectorPolicy, Limits, Quota, Verdict
from firstmile.kit.auth import Principal
from firstmile.kit.db import TenantTx
from firstmile.kit.uow import UnitOfWork
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import LimitsSpec, QuotaSpec

log = logging.getLogger("firstmile.guardrail")

RATE_LIMITED = Counter(
    "firstmile_rate_limited_total",
    "Requests refused with 429 rate-limited, by the limit that refused them (key, tenant).",
    ["limit"],
)
ABUSE_FLAGS = Counter(
    "firstmile_abuse_flags_total", "Credentials flagged by the abuse detector (guardrail.abuse_flagged entries)."
)
LIMITER_FALLBACKS = Counter(
    "firstmile_rate_limit_fallbacks_total",
    "Requests limited in-process because the limiter's Redis failed (the abuse detector did not see them).",
)

ABUSE_FLAGGED = "guardrail.abuse_flagged"
"""The audit entry kind of an abuse flag; its actor is :data:`ACTOR`, its subject the credential."""
ACTOR = "guardrail"


def limits_of(spec: LimitsSpec | None, defaults: Limits) -> Limits:
    """The manifest's limits where it has them, the platform's elsewhere."""

    def quota(given: QuotaSpec | None, default: Quota) -> Quota:
        return default if given is None else Quota(default.name, given.requests, given.window_seconds)

    if spec is None:
        return defaults
    return Limits(quota(spec.per_key, defaults.per_key), quota(spec.per_tenant, defaults.per_tenant))


class Guardrail:
    """Rate limits and abuse detection for one API process (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        limiter: RateLimiter,
        defaults: Limits,
        *,
        detector: DetectorPolicy | None,
        fallback: RateLimiter | None = None,
        fallback_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_tenants: int = 10_000,
        per_embed_user: Quota | None = None,
    ) -> None:
        self.engine = engine
        self.limiter = limiter
        self.defaults = defaults
        self.detector = detector
        self.fallback = fallback
        self.fallback_seconds = fallback_seconds
        self.per_embed_user = per_embed_user or Quota("user", 120, 60)
        """A publishable key's quota per user (a browser), in place of the per-key quota; the tenant's still applies."""
        self._clock = clock
        self.max_tenants = max_tenants
        self._limits: OrderedDict[uuid.UUID, tuple[int, Limits]] = OrderedDict()
        self._local_until = 0.0

    async def admit(self, principal: Principal, activity: str) -> Verdict:
        """Check one request of ``principal`` (``activity``: its method and route, ``POST /v1/…``)."""
        limits = await self.limits(principal)
        if principal.user_id is not None:
            limits = Limits(self.per_embed_user, limits.per_tenant)
        request = LimitRequest(str(principal.authenticated_tenant), principal.rate_partition, limits, activity)
        verdict = await self._check(request)
        if verdict.flag is not None:
            await self._flag(principal, verdict.flag)
        if not verdict.admitted:
            for name in verdict.violated:
                RATE_LIMITED.labels(name).inc()
        return verdict

    async def limits(self, principal: Principal) -> Limits:
        """The tenant's limits at the principal's revision (from this process's cache when it has them)."""
        tenant = principal.authenticated_tenant
        cached = self._limits.get(tenant)
        if cached is not None and cached[0] >= principal.tenant_revision:
            self._limits.move_to_end(tenant)
            return cached[1]

        async def read(tx: TenantTx) -> LimitsSpec | None:
            return await tenancy.limits_spec(tx)

        limits = limits_of(await UnitOfWork(self.engine, principal.tenant_id).run(read), self.defaults)
        self._limits[tenant] = (principal.tenant_revision, limits)
        self._limits.move_to_end(tenant)
        while len(self._limits) > self.max_tenants:
            self._limits.popitem(last=False)
        return limits

    async def _check(self, request: LimitRequest) -> Verdict:
        if self.fallback is None:
            return await self.limiter.check(request)
        if self._local_until > self._clock():
            return await self._locally(request)
        try:
            return await self.limiter.check(request)
        except LimiterUnavailableError as exc:
            self._local_until = self._clock() + self.fallback_seconds
            log.warning(
                "rate limiter unavailable: limiting in this process for %s s; the abuse detector is off meanwhile",
                self.fallback_seconds,
                extra={"fields": {"error": str(exc)}},
            )
            return await self._locally(request)

    async def _locally(self, request: LimitRequest) -> Verdict:
        assert self.fallback is not None
        LIMITER_FALLBACKS.inc()
        verdict = await self.fallback.check(LimitRequest(request.tenant, request.credential, request.limits, None))
        if verdict.admitted and self.detector is not None:
            log.info(
                "abuse check skipped: the detector is unavailable; request allowed",
                extra={"fields": {"credential": request.credential, "activity": request.activity}},
            )
        return verdict

    async def _flag(self, principal: Principal, flag: AbuseFlag) -> None:
        ABUSE_FLAGS.inc()
        detector = self.detector
        payload = {
            "activity": flag.activity,
            "requests_this_minute": flag.count,
            "baseline_per_minute": round(flag.baseline, 3),
            "factor": detector.factor if detector is not None else None,
            "min_requests_per_minute": detector.min_count if detector is not None else None,
        }
        log.warning("abuse flagged", extra={"fields": {"credential": principal.actor, **payload}})

        async def work(tx: TenantTx) -> None:
            await audit.append(tx, ABUSE_FLAGGED, ACTOR, principal.actor, payload)

        try:
            await UnitOfWork(self.engine, principal.tenant_id).run(work)
        except Exception:
            log.exception("could not audit an abuse flag")


__all__ = ["ABUSE_FLAGGED", "ACTOR", "Guardrail", "limits_of"]
