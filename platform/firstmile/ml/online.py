"""Adapters from the online feature store to the agents that read it.

The path planner reads one user through :class:`ResilientFeatureReader` (timeout,
cached features ≤ 5 min old when the store is down); the stuck scan reads a batch
of users straight from the store (a failure there means progress times alone).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from firstmile.ml.feature_reader import ResilientFeatureReader
from firstmile.ml.features import FeatureStore
from firstmile.ml.planner import FeatureReading
from firstmile.onboarding.stuck import UserActivity


class PlannerFeatures:
    """The planner's :class:`~firstmile.ml.planner.FeatureReader` over the resilient reader."""

    def __init__(self, reader: ResilientFeatureReader) -> None:
        self.reader = reader

    async def read(self, tenant_id: str, user_id: str, now: datetime) -> FeatureReading:
        found = await self.reader.read(tenant_id, user_id)
        features = found.model_features(now)
        return FeatureReading(dict(features) if features is not None else None, found.source, found.age_s)


class StoreActivity:
    """The stuck scan's :class:`~firstmile.onboarding.stuck.ActivitySource` over the store."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    async def activity(self, tenant_id: str, user_ids: Sequence[str], now: datetime) -> dict[str, UserActivity]:
        found = await self.store.get_many(uuid.UUID(tenant_id), user_ids)
        return {
            user_id: UserActivity(
                features=dict(f.as_model_features(now)),
                hours_since_last_activity=f.hours_since_last_activity(now),
                events_last_24h=f.events_last_24h(now),
            )
            for user_id, f in found.items()
        }
