"""The Lua update script and its Python twin agree: the same event sequences give the same stored state.

Random sequences (seeded) mix every kind of update: in-order and late events,
redeliveries, identify traits, onboarding starts and steps, erasures and new
lives after them, several users and two tenants. The Python side applies them one
event at a time; Redis gets them in random batch sizes (one script call per user
and batch), so grouping does not matter either. Needs the test Redis.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from firstmile.events.envelope import Envelope
from firstmile.ml.feature_stores import InProcessFeatureStore, RedisFeatureStore
from tests.unit.features_support import erased, onboarding, segment, step, track

TENANTS = (uuid.UUID("00000000-0000-4000-8000-00000000000a"), uuid.UUID("00000000-0000-4000-8000-00000000000b"))
USERS = ("ada", "bob", "cy:with:colons")
FLOATS = {"eng", "act"}
PERSONAS = ("developer", "analyst", "admin", "custom persona ✓")


def random_events(seed: int, count: int = 120) -> list[Envelope]:
    rng = random.Random(seed)
    clock = 0.0
    sent: list[Envelope] = []
    for _ in range(count):
        tenant, user = rng.choice(TENANTS), rng.choice(USERS)
        roll = rng.random()
        if sent and roll < 0.08:
            sent.append(rng.choice(sent[-40:]))  # a redelivery, sometimes older than the dedupe ring
            continue
        # Steps of exactly 0 (ties) and 30 minutes (the session gap) hit the rules' boundaries.
        clock += rng.choice((0, 0.5, 3, 12, 30, 31, 45, 240, 3 * 24 * 60))
        minutes = clock - rng.choice((0, 0, 0, 0, 5, 20, 30, 40, 600)) if rng.random() < 0.3 else clock
        if roll < 0.5:
            sent.append(track(tenant, user, minutes))
        elif roll < 0.6:
            sent.append(segment(tenant, user, "page", minutes))
        elif roll < 0.7:
            traits = {"persona": rng.choice(PERSONAS), "companySize": rng.choice((3, 40, "51-200", None))}
            if rng.random() < 0.5:
                traits |= {"role": rng.choice(("individual", "it_admin")), "use_case": "reporting"}
            sent.append(segment(tenant, user, "identify", minutes, traits=traits))
        elif roll < 0.75:
            traits = {"persona": rng.choice(PERSONAS), "signup_source": "organic"}
            sent.append(onboarding(tenant, user, "onboarding.started", minutes, traits=traits))
        elif roll < 0.9:
            source = rng.choice(("api", "event:x"))
            sent.append(step(tenant, user, rng.choice(("a", "b", "c", "install-sdk")), minutes, source=source))
        elif roll < 0.95:
            sent.append(onboarding(tenant, user, "onboarding.activated", minutes, step_id="a"))
        else:
            sent.append(erased(tenant, user, minutes))
    return sent


@pytest.fixture
async def redis_store(redis_url: str, redis_region: str) -> AsyncIterator[RedisFeatureStore]:
    store = RedisFeatureStore.from_url(redis_url, region=redis_region)
    yield store
    await store.close()


def assert_same_state(lua: dict[str, str], python: dict[str, str]) -> None:
    assert set(lua) == set(python)
    for field, value in python.items():
        if field in FLOATS:  # the same IEEE operations; a different libm could differ in the last bit
            assert math.isclose(float(lua[field]), float(value), rel_tol=1e-12), field
        else:
            assert lua[field] == value, field


async def run_both(redis_store: RedisFeatureStore, events: Sequence[Envelope], rng: random.Random) -> None:
    memory = InProcessFeatureStore()
    for event in events:
        await memory.apply([event])
    i = 0
    while i < len(events):
        size = rng.choice((1, 2, 7, 30))
        await redis_store.apply(events[i : i + size])
        i += size
    for tenant in TENANTS:
        for user in USERS:
            assert_same_state(await redis_store.state(tenant, user), await memory.state(tenant, user))
            assert await redis_store.get(tenant, user) == await memory.get(tenant, user)


@pytest.mark.parametrize("seed", range(25))
async def test_lua_and_python_agree_on_random_sequences(redis_store: RedisFeatureStore, seed: int) -> None:
    await run_both(redis_store, random_events(seed), random.Random(seed))


def boundary_events() -> list[Envelope]:
    """Every rule's boundary: the session gap both ways, trait and erasure ties, ring eviction."""
    t = TENANTS[0]
    return [
        track(t, "ada", 0),
        track(t, "ada", 30),  # exactly the gap after: same session
        track(t, "ada", 100),  # new session [100, 100]
        track(t, "ada", 70),  # exactly the gap before its start: extends it backwards
        track(t, "ada", 39.999),  # just over the gap before [70, 100]: an older session, left alone
        segment(t, "ada", "identify", 100, traits={"persona": "analyst"}),
        segment(t, "ada", "identify", 100, traits={"persona": "developer"}),  # a tie: the later one applied wins
        track(t, "bob", 100),
        erased(t, "bob", 200),
        track(t, "bob", 200),  # at the erasure time: ignored
        erased(t, "cy:with:colons", 200),
        track(t, "cy:with:colons", 200.001),  # just after: a new life
        *(track(t, "cy:with:colons", 300 + i) for i in range(40)),  # more than the ring holds
    ]


async def test_lua_and_python_agree_on_the_boundaries(redis_store: RedisFeatureStore) -> None:
    events = boundary_events()
    await run_both(redis_store, [*events, events[12], events[-1]], random.Random(0))


async def test_lua_and_python_agree_on_a_long_history(redis_store: RedisFeatureStore) -> None:
    await run_both(redis_store, random_events(1234, count=1500), random.Random(1))


async def test_forget_agrees(redis_store: RedisFeatureStore) -> None:
    memory = InProcessFeatureStore()
    events = random_events(99, count=40)
    await memory.apply(events)
    await redis_store.apply(events)
    for store in (memory, redis_store):
        await store.forget(TENANTS[0], "ada", at=events[-1].occurred_at)
    assert_same_state(await redis_store.state(TENANTS[0], "ada"), await memory.state(TENANTS[0], "ada"))
    assert await redis_store.get(TENANTS[0], "ada") is None
