"""A bounded, expiring in-process cache: the resolution caches of the request path share it.

Entries expire ``ttl`` seconds after they were put (a monotonic clock) and the least recently
used go first once ``max_entries`` are held, so a flood of made-up keys only evicts its own
kind and memory stays bounded. ``ttl <= 0`` disables it: nothing is kept. A cached ``None`` is
an answer like any other (:data:`MISS` tells "not cached" apart).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from enum import Enum
from typing import Final, Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Miss(Enum):
    MISS = "miss"


MISS: Final = _Miss.MISS
"""What :meth:`TtlCache.get` answers for a key it does not hold (or holds expired)."""


class TtlCache(Generic[K, V]):
    """Values by key for ``ttl`` seconds, at most ``max_entries`` of them (least recently used out first)."""

    def __init__(self, ttl: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("a cache needs room for at least one entry")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | Literal[_Miss.MISS]:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return MISS
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["MISS", "TtlCache"]
