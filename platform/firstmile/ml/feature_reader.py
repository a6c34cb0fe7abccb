"""Reading features for a decision: a hard timeout, and the last good read when the store is down.

The path planner's recovery rule: feature store down → cached features if they
are less than 5 minutes old. :class:`ResilientFeatureReader` is that rule; what
to do when it raises :class:`~firstmile.ml.features.FeatureStoreUnavailable`
(plan without online features) is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from prometheus_client import Counter

from firstmile.ml.features import FeatureStore, FeatureStoreUnavailable, OnlineFeatures
from firstmile_inference.schema import UserFeatures

log = logging.getLogger("firstmile.features")
FEATURE_READS = Counter(
    "firstmile_feature_reads_total",
    "Online feature reads for decisions, by outcome (fresh, stale, absent, unavailable).",
    ["outcome"],
)

Freshness = Literal["fresh", "stale", "absent"]


@dataclass(frozen=True, slots=True)
class FeatureRead:
    """What a read found.

    ``fresh``: the store answered with features. ``absent``: the store answered, and
    holds nothing for the user (no event of theirs yet, or erased): not an error.
    ``stale``: the store failed or timed out, and these are the features of the last
    good read, ``age_s`` seconds old; ``error`` says what failed.
    """

    source: Freshness
    features: OnlineFeatures | None
    age_s: float = 0.0
    error: str | None = None

    @property
    def stale(self) -> bool:
        return self.source == "stale"

    def model_features(self, now: datetime) -> UserFeatures | None:
        """The nine model features as of ``now``; None when absent."""
        return None if self.features is None else self.features.as_model_features(now)


class ResilientFeatureReader:
    """Wraps :meth:`FeatureStore.get` with a timeout and a bounded cache of last good reads."""

    def __init__(
        self,
        store: FeatureStore,
        *,
        timeout_s: float = 0.05,
        max_staleness_s: float = 300.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.max_staleness_s = max_staleness_s
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[tuple[uuid.UUID, str], tuple[float, OnlineFeatures]] = OrderedDict()

    async def read(self, tenant_id: uuid.UUID | str, user_id: str) -> FeatureRead:
        """Fresh or absent from the store; else stale from the cache; else :class:`FeatureStoreUnavailable`."""
        if not isinstance(tenant_id, uuid.UUID):
            tenant_id = uuid.UUID(tenant_id)
        key = (tenant_id, user_id)
        try:
            async with asyncio.timeout(self.timeout_s):
                features = await self.store.get(tenant_id, user_id)
        except Exception as exc:  # the store's errors are its adapter's (redis, OS, timeout): all mean "down"
            error = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            cached = self._cache.get(key)
            age = self.clock() - cached[0] if cached is not None else None
            if cached is not None and age is not None and age <= self.max_staleness_s:
                FEATURE_READS.labels("stale").inc()
                log.warning(
                    "feature store failed; using cached features",
                    extra={"fields": {"error": error, "age_seconds": round(age, 3)}},
                )
                return FeatureRead("stale", cached[1], age, error)
            FEATURE_READS.labels("unavailable").inc()
            detail = "no cached features" if cached is None else f"cached features are {age:.0f} s old"
            raise FeatureStoreUnavailable(f"feature store failed ({error}) and {detail}") from exc
        if features is None:
            self._cache.pop(key, None)
            FEATURE_READS.labels("absent").inc()
            return FeatureRead("absent", None)
        self._cache[key] = (self.clock(), features)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        FEATURE_READS.labels("fresh").inc()
        return FeatureRead("fresh", features)
