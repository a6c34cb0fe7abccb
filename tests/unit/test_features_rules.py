"""The online feature rules (docs/features.md), on the in-process store: no service needed.

The Redis store runs the same rules in Lua; test_features_contract.py shows the two
agree, and tests/integration/test_feature_store.py repeats the main cases on Redis.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest

from firstmile.events.envelope import Envelope
from firstmile.ml.consumer import FeatureHook
from firstmile.ml.feature_reader import ResilientFeatureReader
from firstmile.ml.feature_stores import FeatureStoreSink, InProcessFeatureStore
from firstmile.ml.features import (
    ERASED,
    RECENT_IDS,
    FeatureStoreUnavailable,
    OnlineFeatures,
    feature_event,
)
from firstmile.privacy.service import ERASED as PRIVACY_ERASED
from firstmile.wiring.adapters import open_feature_store
from firstmile_inference.schema import USER_FEATURES
from tests.conftest import make_settings
from tests.unit.features_support import T0, at, erased, onboarding, segment, step, track

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000002")


async def features_after(events: Sequence[Envelope], *batches: int, user: str = "u1") -> OnlineFeatures:
    """Apply ``events`` (in batches of the given sizes, else one batch) and read the user back."""
    store = InProcessFeatureStore()
    sizes = list(batches) or [len(events)]
    i = 0
    for size in sizes:
        await store.apply(events[i : i + size])
        i += size
    await store.apply(events[i:])
    found = await store.get(TENANT, user)
    assert found is not None
    return found


async def test_sessions_split_on_gaps_longer_than_30_minutes() -> None:
    minutes = [0, 10, 25, 55, 85.001, 90, 200]
    f = await features_after([track(TENANT, "u1", m) for m in minutes])
    # [0, 55] (gaps of 30 min exactly stay in the session), [85.001, 90], [200, 200]
    assert f.session_count == 3
    assert f.total_session_seconds == pytest.approx(55 * 60 + (90 - 85.001) * 60)
    assert f.avg_session_seconds == pytest.approx(f.total_session_seconds / 3)
    assert f.events_total == 7
    assert (f.first_seen, f.last_seen) == (at(0), at(200))


async def test_engagement_decays_with_a_three_day_half_life_into_a_saturating_score() -> None:
    f = await features_after([track(TENANT, "u1", 0)])
    assert f.engagement_at(at(0)) == 1
    assert f.engagement_at(at(3 * 24 * 60)) == pytest.approx(0.5)
    assert f.engagement_score(at(3 * 24 * 60)) == pytest.approx(100 * (1 - math.exp(-0.05)))
    ten = await features_after([track(TENANT, "u1", 0) for _ in range(10)])
    assert ten.engagement_score(at(0)) == pytest.approx(100 * (1 - math.exp(-1)))  # 63.2
    many = await features_after([track(TENANT, "u1", m) for m in range(200)])
    assert 99 < many.engagement_score(at(200)) < 100
    # An event three days before the last one weighs half of one at the end.
    spread = await features_after([track(TENANT, "u1", 0), track(TENANT, "u1", 3 * 24 * 60)])
    assert spread.engagement == pytest.approx(1.5)
    assert spread.engagement_at(at(0)) == spread.engagement  # a clock behind last_seen does not inflate it


async def test_time_since_signup_hours_since_last_activity_and_events_last_24h() -> None:
    f = await features_after([track(TENANT, "u1", 0), track(TENANT, "u1", 60)])
    now = at(5 * 60)
    assert f.hours_since_signup(now) == pytest.approx(5.0)
    assert f.hours_since_last_activity(now) == pytest.approx(4.0)
    assert f.events_last_24h(at(60)) == pytest.approx(1 + math.exp(-1 / 24))
    assert f.events_last_24h(at(60 + 24 * 60)) == pytest.approx((1 + math.exp(-1 / 24)) * math.exp(-1))


async def test_model_features_are_exactly_the_nine_of_the_schema() -> None:
    events = [
        onboarding(TENANT, "u1", "onboarding.started", 0, traits={"persona": "developer", "use_case": "reporting"}),
        track(TENANT, "u1", 5),
        step(TENANT, "u1", "create-api-key", 10),
    ]
    f = await features_after(events)
    model = f.as_model_features(at(120))
    assert list(model) == list(USER_FEATURES)
    assert model == {
        "user_persona": "developer",
        "signup_source": None,
        "company_size": None,
        "use_case": "reporting",
        "engagement_score": pytest.approx(100 * (1 - math.exp(-f.engagement_at(at(120)) / 10))),
        "time_since_signup": pytest.approx(2.0),
        "steps_completed": 1.0,
        "session_count": 1.0,
        "avg_session_duration": pytest.approx(600.0),
    }


async def test_steps_count_distinct_completions_and_derived_ones_are_not_activity() -> None:
    events = [
        track(TENANT, "u1", 0, event="API Key Created"),
        step(TENANT, "u1", "create-api-key", 0, source="event:abc"),  # completed by the event above
        step(TENANT, "u1", "install-sdk", 20),
        step(TENANT, "u1", "install-sdk", 21),  # a second completion event of the same step
        onboarding(TENANT, "u1", "onboarding.activated", 21, step_id="install-sdk"),
        onboarding(TENANT, "u1", "onboarding.completed", 21),
        step(TENANT, "u1", "early", 5),  # late: the step time is a max
    ]
    f = await features_after(events)
    assert f.steps_completed == 3
    assert f.last_step_completed_at == at(21)
    assert f.events_total == 4  # the track and the three API completions; derived/activated/completed are not
    assert feature_event(events[4]) is None and feature_event(events[5]) is None


async def test_a_step_time_is_the_payloads_occurred_at_not_the_outbox_write() -> None:
    late_write = onboarding(TENANT, "u1", "onboarding.step_completed", 10, written=50, step_id="s", source="event:x")
    f = await features_after([track(TENANT, "u1", 10), late_write])
    assert f.last_step_completed_at == at(10)
    assert f.last_seen == at(10)


async def test_traits_come_from_onboarding_starts_and_identify_and_the_latest_wins() -> None:
    events = [
        onboarding(
            TENANT, "u1", "onboarding.started", 0, traits={"persona": "analyst", "company_size": "11-50", "plan": "x"}
        ),
        segment(
            TENANT,
            "u1",
            "identify",
            30,
            traits={"persona": "developer", "signupSource": "referral", "useCase": "marketing", "role": "team_lead"},
        ),
        segment(TENANT, "u1", "identify", 20, traits={"persona": "executive", "companySize": 2000}),  # late
        segment(TENANT, "u1", "identify", 40, traits={"persona": None, "use_case": 7, "role": "  "}),  # unusable
    ]
    f = await features_after(events)
    assert (f.persona, f.signup_source, f.company_size, f.use_case, f.role) == (
        "developer",  # the identify at 30 beats the start at 0 and the late identify at 20
        "referral",
        "1001+",  # from the late identify: its company size is newer than the start's
        "marketing",
        "team_lead",
    )


@pytest.mark.parametrize(("employees", "bucket"), [(1, "1-10"), (10, "1-10"), (11, "11-50"), (1000, "201-1000")])
async def test_a_numeric_company_size_is_bucketed(employees: int, bucket: str) -> None:
    f = await features_after([segment(TENANT, "u1", "identify", 0, traits={"company_size": employees})])
    assert f.company_size == bucket


async def test_late_events_keep_times_and_counts_and_touch_sessions_as_documented() -> None:
    in_order = [track(TENANT, "u1", m) for m in (0, 5, 10, 100, 110)]
    base = await features_after(in_order)
    assert (base.session_count, base.total_session_seconds) == (2, 20 * 60)
    # Within 30 min before the latest session's start: it extends that session backwards.
    f = await features_after([*in_order, track(TENANT, "u1", 80)])
    assert (f.session_count, f.total_session_seconds, f.events_total) == (2, 40 * 60, 6)
    # Inside the latest session: nothing changes but the counts.
    f = await features_after([*in_order, track(TENANT, "u1", 105)])
    assert (f.session_count, f.total_session_seconds, f.events_total) == (2, 20 * 60, 6)
    # Older than that: an earlier session that is no longer tracked; sessions stay, times and counts move.
    f = await features_after([*in_order, track(TENANT, "u1", -120)])
    assert (f.session_count, f.total_session_seconds, f.events_total) == (2, 20 * 60, 6)
    assert f.first_seen == at(-120) and f.last_seen == at(110)
    # The decayed counts do not depend on the order.
    shuffled = in_order[:]
    random.Random(7).shuffle(shuffled)
    f = await features_after(shuffled, 1, 1, 1, 1)
    assert f.engagement == pytest.approx(base.engagement, rel=1e-12)
    assert f.recent_events == pytest.approx(base.recent_events, rel=1e-12)
    assert (f.first_seen, f.last_seen, f.events_total) == (base.first_seen, base.last_seen, 5)


async def test_duplicates_are_skipped_within_the_last_32_events_of_the_user() -> None:
    events = [track(TENANT, "u1", m) for m in range(5)]
    once = await features_after(events)
    twice = await features_after([*events, *events], 5)  # redelivered in a later batch
    same_batch = await features_after([*events, *events])
    assert once == twice == same_batch
    # The ring remembers the user's last 32 event ids: an older redelivery counts once more (documented).
    many = [track(TENANT, "u1", m) for m in range(RECENT_IDS + 1)]
    f = await features_after([*many, many[-1], many[0]])
    assert f.events_total == RECENT_IDS + 2


async def test_erasure_forgets_and_ignores_late_events_but_not_later_ones() -> None:
    store = InProcessFeatureStore()
    await store.apply([track(TENANT, "u1", 0), track(TENANT, "u2", 0)])
    await store.apply([erased(TENANT, "u1", 10)])
    assert await store.get(TENANT, "u1") is None
    assert await store.state(TENANT, "u1") == {"erased": str(int(at(10).timestamp() * 1000))}
    await store.apply([track(TENANT, "u1", 5)])  # happened before the erasure: stays forgotten
    assert await store.get(TENANT, "u1") is None
    await store.apply([track(TENANT, "u1", 20)])  # a new life after the erasure starts from nothing
    f = await store.get(TENANT, "u1")
    assert f is not None and f.events_total == 1 and f.first_seen == at(20)
    assert await store.get(TENANT, "u2") is not None
    await store.forget(TENANT, "u2", at=at(30))
    assert await store.get(TENANT, "u2") is None
    assert await store.get_many(TENANT, ["u1", "u2", "nobody"]) == {"u1": f}


async def test_tenants_do_not_share_a_user_id() -> None:
    store = InProcessFeatureStore()
    await store.apply([track(TENANT, "u1", 0), track(TENANT, "u1", 1), track(OTHER, "u1", 0)])
    mine, theirs = await store.get(TENANT, "u1"), await store.get(OTHER, "u1")
    assert mine is not None and theirs is not None
    assert (mine.events_total, theirs.events_total) == (2, 1)
    await store.apply([erased(OTHER, "u1", 5)])
    assert await store.get(TENANT, "u1") == mine


async def test_events_without_a_user_or_of_unknown_types_change_nothing() -> None:
    nobody = track(TENANT, "", 0)
    nobody.payload["userId"] = None
    odd = Envelope(uuid.uuid4(), TENANT, "billing.paid", T0, {"user_id": "u1"})
    bad_step = step(TENANT, "u1", "a,b", 0)
    assert [feature_event(e) for e in (nobody, odd, bad_step)] == [None, None, None]
    anonymous = segment(TENANT, "", "page", 0, userId=None, anonymousId="anon-1")
    f = await features_after([anonymous], user="anon-1")
    assert f.events_total == 1


async def test_the_in_process_store_is_bounded_and_expires() -> None:
    store = InProcessFeatureStore(max_users=3)
    await store.apply([track(TENANT, f"u{i}", 0) for i in range(3)])
    assert await store.get(TENANT, "u0") is not None  # u0 is now the most recently used
    await store.apply([track(TENANT, "u3", 0)])
    assert await store.get(TENANT, "u1") is None
    assert set(await store.get_many(TENANT, ["u0", "u1", "u2", "u3"])) == {"u0", "u2", "u3"}
    ttl = store.ttl_left(TENANT, "u3")
    assert ttl is not None and timedelta(days=89) < timedelta(seconds=ttl) <= timedelta(days=90)
    short = InProcessFeatureStore(ttl=timedelta(milliseconds=20))
    await short.apply([track(TENANT, "u1", 0)])
    await asyncio.sleep(0.05)
    assert await short.get(TENANT, "u1") is None


def test_the_erasure_event_type_is_the_privacy_slices() -> None:
    assert ERASED == PRIVACY_ERASED


def test_open_feature_store_is_in_process_without_redis_url() -> None:
    store = open_feature_store(make_settings(feature_ttl_days=7))
    assert isinstance(store, InProcessFeatureStore)
    assert store.ttl_seconds == 7 * 86_400


# ---- the consumer hook ----


class _FlakySink:
    def __init__(self) -> None:
        self.fail = True
        self.got: list[uuid.UUID] = []

    async def update(self, events: Sequence[Envelope]) -> None:
        if self.fail:
            self.fail = False
            raise ConnectionError("store down")
        self.got.extend(e.event_id for e in events)


async def test_the_hook_forgets_nothing_of_a_batch_its_sink_failed() -> None:
    sink = _FlakySink()
    hook = FeatureHook(sink)
    batch = [track(TENANT, "u1", m) for m in range(3)]
    with pytest.raises(ConnectionError):
        await hook.handle(batch)
    assert await hook.handle(batch) == []  # the retry delivers the whole batch
    assert sink.got == [e.event_id for e in batch]
    await hook.handle(batch)  # and a redelivery in this process is not passed on again
    assert len(sink.got) == 3


async def test_the_hook_feeds_the_store_through_the_sink() -> None:
    store = InProcessFeatureStore()
    await FeatureHook(FeatureStoreSink(store)).handle([track(TENANT, "u1", 0)])
    assert await store.get(TENANT, "u1") is not None


# ---- the resilient reader (the store's failures injected through the port) ----


class _Store(InProcessFeatureStore):
    """The in-process store, made to fail or hang on reads when told."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"

    async def get(self, tenant_id: uuid.UUID, user_id: str) -> OnlineFeatures | None:
        if self.mode == "fail":
            raise ConnectionError("connection refused")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return await super().get(tenant_id, user_id)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_reader_serves_fresh_then_cached_then_gives_up() -> None:
    store, clock = _Store(), _Clock()
    reader = ResilientFeatureReader(store, timeout_s=0.05, max_staleness_s=300, clock=clock)
    await store.apply([track(TENANT, "u1", 0)])
    fresh = await reader.read(TENANT, "u1")
    assert (fresh.source, fresh.stale, fresh.age_s) == ("fresh", False, 0.0)
    assert fresh.features is not None
    assert fresh.model_features(at(60)) == fresh.features.as_model_features(at(60))

    store.mode = "fail"
    clock.now += 299
    cached = await reader.read(str(TENANT), "u1")  # a tenant id as a string is accepted too
    assert (cached.source, cached.stale, cached.age_s, cached.features) == ("stale", True, 299, fresh.features)
    assert cached.error is not None and "connection refused" in cached.error

    store.mode = "hang"
    timed_out = await reader.read(TENANT, "u1")
    assert (timed_out.source, timed_out.error) == ("stale", "timeout")

    clock.now += 2  # 301 s since the last good read
    with pytest.raises(FeatureStoreUnavailable, match="301 s old"):
        await reader.read(TENANT, "u1")
    with pytest.raises(FeatureStoreUnavailable, match="no cached features"):
        await reader.read(TENANT, "never-read")


async def test_an_absent_user_is_not_an_error_and_drops_the_cached_read() -> None:
    store = _Store()
    reader = ResilientFeatureReader(store)
    absent = await reader.read(TENANT, "nobody")
    assert (absent.source, absent.features, absent.model_features(T0)) == ("absent", None, None)
    await store.apply([track(TENANT, "u1", 0)])
    assert (await reader.read(TENANT, "u1")).source == "fresh"
    await store.forget(TENANT, "u1", at=at(1))
    assert (await reader.read(TENANT, "u1")).source == "absent"
    store.mode = "fail"  # the erased user's old features are not served from the cache
    with pytest.raises(FeatureStoreUnavailable):
        await reader.read(TENANT, "u1")


async def test_the_reader_cache_is_bounded() -> None:
    store = _Store()
    reader = ResilientFeatureReader(store, max_entries=2)
    await store.apply([track(TENANT, u, 0) for u in ("a", "b", "c")])
    for u in ("a", "b", "c"):
        await reader.read(TENANT, u)
    store.mode = "fail"
    assert (await reader.read(TENANT, "c")).stale
    with pytest.raises(FeatureStoreUnavailable):
        await reader.read(TENANT, "a")


def test_now_before_first_seen_gives_zero_hours() -> None:
    f = OnlineFeatures(TENANT, "u1", None, None, None, None, None, at(10), at(10), 1, 0.0, 1, 1.0, 1.0, 0, None)
    early: datetime = at(0)
    assert (f.hours_since_signup(early), f.hours_since_last_activity(early)) == (0.0, 0.0)
