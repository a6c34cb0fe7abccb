"""The online-features consumer: feeds the event stream to the feature store, once per event id."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from firstmile.events.bus import DeadLetter
from firstmile.events.envelope import Envelope


class FeatureSink(Protocol):
    """Receives events for online features (:class:`~firstmile.ml.feature_stores.FeatureStoreSink`)."""

    async def update(self, events: Sequence[Envelope]) -> None: ...


class FeatureHook:
    """Feeds events to the online feature store, once per event id (per process)."""

    name = "features"

    def __init__(self, sink: FeatureSink | None = None, remember: int = 100_000) -> None:
        self.sink = sink
        self.remember = remember
        self._seen: OrderedDict[Any, None] = OrderedDict()

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        fresh = [e for e in events if e.event_id not in self._seen]
        if fresh and self.sink is not None:
            await self.sink.update(fresh)  # a failure retries the batch: remember nothing of it yet
        for e in fresh:
            self._seen[e.event_id] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return []
