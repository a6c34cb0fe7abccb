"""kit.cache.TtlCache: expiry, least-recently-used eviction, cached None, and ttl 0 keeping nothing."""

from __future__ import annotations

import pytest

from firstmile.kit.cache import MISS, TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_for_its_ttl() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(5, clock=clock)
    assert cache.get("a") is MISS
    cache.put("a", 1)
    clock.now += 4.9
    assert cache.get("a") == 1
    clock.now += 0.1
    assert cache.get("a") is MISS


def test_a_cached_none_is_an_answer() -> None:
    cache: TtlCache[str, str | None] = TtlCache(5, clock=Clock())
    cache.put("unknown", None)
    assert cache.get("unknown") is None
    cache.drop("unknown")
    assert cache.get("unknown") is MISS


def test_the_least_recently_used_goes_first() -> None:
    cache: TtlCache[str, int] = TtlCache(5, max_entries=2, clock=Clock())
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now b is the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, MISS, 3, 2)


def test_ttl_zero_keeps_nothing_and_a_cache_needs_room() -> None:
    cache: TtlCache[str, int] = TtlCache(0, clock=Clock())
    cache.put("a", 1)
    assert cache.get("a") is MISS and len(cache) == 0
    with pytest.raises(ValueError, match="at least one entry"):
        TtlCache(5, max_entries=0)
