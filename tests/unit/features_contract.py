"""The online feature stores' contract: fed events in batches of any size, a store ends in the state the
Python rules reach applying the same events one at a time (an in-process store is that reference).

Random sequences (seeded) mix every kind of update: in-order and late events,
redeliveries, identify traits, onboarding starts and steps, erasures and new
lives after them, several users and two tenants. The store under test gets them in
random batch sizes (for Redis, one script call per user and batch), so grouping does
not matter either.

Run against the in-process store by tests/unit/test_features_contract.py (no services) and
against Redis by tests/integration/test_feature_store.py, where it shows the Lua update
script and its Python twin agree.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence

from firstmile.events.envelope import Envelope
from firstmile.ml.feature_stores import InProcessFeatureStore, RedisFeatureStore
from tests.unit.features_support import erased, onboarding, segment, step, track

Store = InProcessFeatureStore | RedisFeatureStore

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


def assert_same_state(tested: dict[str, str], reference: dict[str, str]) -> None:
    assert set(tested) == set(reference)
    for field, value in reference.items():
        if field in FLOATS:  # the same IEEE operations; a different libm could differ in the last bit
            assert math.isclose(float(tested[field]), float(value), rel_tol=1e-12), field
        else:
            assert tested[field] == value, field


async def assert_agrees_with_one_at_a_time(store: Store, events: Sequence[Envelope], rng: random.Random) -> None:
    reference = InProcessFeatureStore()
    for event in events:
        await reference.apply([event])
    i = 0
    while i < len(events):
        size = rng.choice((1, 2, 7, 30))
        await store.apply(events[i : i + size])
        i += size
    for tenant in TENANTS:
        for user in USERS:
            assert_same_state(await store.state(tenant, user), await reference.state(tenant, user))
            assert await store.get(tenant, user) == await reference.get(tenant, user)


# ---- the contract's cases, each run by both test modules


async def random_sequence(store: Store, seed: int) -> None:
    await assert_agrees_with_one_at_a_time(store, random_events(seed), random.Random(seed))


async def the_boundaries(store: Store) -> None:
    events = boundary_events()
    await assert_agrees_with_one_at_a_time(store, [*events, events[12], events[-1]], random.Random(0))


async def a_long_history(store: Store) -> None:
    await assert_agrees_with_one_at_a_time(store, random_events(1234, count=1500), random.Random(1))


async def forget(store: Store) -> None:
    reference = InProcessFeatureStore()
    events = random_events(99, count=40)
    await reference.apply(events)
    await store.apply(events)
    for each in (reference, store):
        await each.forget(TENANTS[0], "ada", at=events[-1].occurred_at)
    assert_same_state(await store.state(TENANTS[0], "ada"), await reference.state(TENANTS[0], "ada"))
    assert await store.get(TENANTS[0], "ada") is None
