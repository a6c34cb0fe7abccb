"""The adaptive planner's recovery rules and the inference guard, without services.

The model client here is a test double of the platform's own port (the Ray Serve
and in-process adapters are exercised in tests/integration/test_ml_*.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from firstmile.ml.inference import (
    CircuitBreaker,
    GuardedInference,
    InferenceError,
    Prediction,
    Stage,
    StageInfo,
    in_canary,
)
from firstmile.ml.planner import AdaptivePlanner, FeatureReading, FeatureStoreUnavailable, model_instance
from firstmile.onboarding.catalog import PathCatalog
from firstmile.onboarding.domain import PathDef

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _path(key: str, priority: int = 0, targeting: tuple[Mapping[str, Any], ...] = ()) -> PathDef:
    return PathDef.from_definition(
        key,
        1,
        {
            "name": key,
            "priority": priority,
            "targeting": list(targeting),
            "activation_step": "a",
            "steps": [{"id": "a", "title": "A", "completion": {"event": "A"}}],
        },
    )


CATALOG = PathCatalog(
    revision=1,
    default_key="generic",
    current=(
        _path("developer-quickstart", 100, ({"field": "persona", "op": "eq", "value": "developer"},)),
        _path("analyst-reports", 90, ({"field": "persona", "op": "eq", "value": "analyst"},)),
        _path("generic"),
    ),
    planner_model="path_classifier",
)


class FakeClient:
    """Answers with a fixed path, or fails/hangs as told; records what it was asked."""

    kind = "fake"

    def __init__(self, path: str = "analyst-reports", *, fail: str | None = None, delay: float = 0.0) -> None:
        self.path = path
        self.fail = fail
        self.delay = delay
        self.calls: list[tuple[str, Stage, list[Mapping[str, Any]]]] = []

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction:
        self.calls.append((model, stage, list(instances)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise InferenceError("unavailable", self.fail)
        path = self.path if stage != "shadow" else "generic"
        preds = [{"path": path, "confidence": 0.8, "scores": {path: 0.8, "generic": 0.3}} for _ in instances]
        return Prediction(model, "2.0.0" if stage == "shadow" else "1.0.0", stage, preds)

    async def close(self) -> None:
        return None


class FixedStages:
    def __init__(self, info: StageInfo | None) -> None:
        self.info = info

    def stages(self, model: str) -> StageInfo | None:
        return self.info


class Features:
    def __init__(self, reading: FeatureReading | None = None, *, down: bool = False) -> None:
        self.reading = reading or FeatureReading(None, "absent")
        self.down = down

    async def read(self, tenant_id: str, user_id: str, now: datetime) -> FeatureReading:
        if self.down:
            raise FeatureStoreUnavailable("redis down, nothing cached")
        return self.reading


PRODUCTION = StageInfo("1.0.0", None, 0.0, None)


def planner(client: FakeClient, *, stages: StageInfo | None = PRODUCTION, features: Features | None = None,
            timeout_s: float = 0.1, rng: random.Random | None = None) -> AdaptivePlanner:  # fmt: skip
    guarded = GuardedInference(client, timeout_s=timeout_s, failures=3, reset_s=60)
    return AdaptivePlanner(guarded, FixedStages(stages), features or Features(), rng)  # type: ignore[arg-type]


async def test_model_decides_and_the_record_says_so() -> None:
    client = FakeClient("analyst-reports")
    decision = await planner(client).plan("t", "u1", CATALOG, {"persona": "developer"}, NOW)
    assert (decision.selected_by, decision.path_key) == ("model", "analyst-reports")
    record = decision.as_record()
    assert record["model"] == "path_classifier"
    assert record["model_version"] == "1.0.0"
    assert record["confidence"] == 0.8
    assert record["fallback"] is None
    assert record["features"]["user_persona"] == "developer"
    # the model only chooses among the tenant's current paths
    assert client.calls[0][2][0]["candidates"] == ["developer-quickstart", "analyst-reports", "generic"]


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (FakeClient(fail="connection refused"), "unavailable"),
        (FakeClient(delay=0.5), "timeout"),
        (FakeClient("no-such-path"), "invalid_prediction"),
    ],
)
async def test_model_failure_falls_back_to_rules(client: FakeClient, reason: str) -> None:
    decision = await planner(client, timeout_s=0.05).plan("t", "u1", CATALOG, {"persona": "developer"}, NOW)
    assert (decision.selected_by, decision.path_key) == ("rules", "developer-quickstart")
    record = decision.as_record()
    assert record["fallback"] == "rules"
    assert record["fallback_reason"] == reason
    assert record["model"] == "path_classifier"


async def test_rules_then_default_path() -> None:
    decision = await planner(FakeClient(fail="down")).plan("t", "u1", CATALOG, {"persona": "marketer"}, NOW)
    assert (decision.selected_by, decision.path_key) == ("default", "generic")
    assert decision.as_record()["fallback"] == "default_path"
    assert decision.fallback_reason == "unavailable"


async def test_feature_store_down_without_cache_means_rules() -> None:
    client = FakeClient()
    decision = await planner(client, features=Features(down=True)).plan("t", "u", CATALOG, {"persona": "analyst"}, NOW)
    assert decision.fallback_reason == "feature_store_unavailable"
    assert decision.selected_by == "rules"
    assert client.calls == []  # the model is not asked without features


async def test_stale_features_are_used_and_marked() -> None:
    stored = {"user_persona": "analyst", "engagement_score": 55.0, "session_count": 3}
    client = FakeClient()
    features = Features(FeatureReading(stored, "stale", age_s=120))
    decision = await planner(client, features=features).plan("t", "u", CATALOG, {}, NOW)
    assert decision.selected_by == "model"
    assert decision.details["feature_source"] == "stale"
    sent = client.calls[0][2][0]
    assert sent["user_persona"] == "analyst"
    assert sent["engagement_score"] == 55.0
    assert sent["session_count"] == 3.0


async def test_tenant_without_a_model_uses_rules_and_asks_nothing() -> None:
    client = FakeClient()
    rules_only = PathCatalog(1, "generic", CATALOG.current, planner_model=None)
    decision = await planner(client).plan("t", "u", rules_only, {"persona": "developer"}, NOW)
    assert decision.selected_by == "rules"
    assert decision.as_record()["fallback"] is None
    assert "model" not in decision.as_record()
    assert client.calls == []


async def test_breaker_opens_after_consecutive_failures() -> None:
    client = FakeClient(fail="down")
    p = planner(client)
    reasons = [(await p.plan("t", f"u{i}", CATALOG, {}, NOW)).fallback_reason for i in range(5)]
    assert reasons == ["unavailable"] * 3 + ["circuit_open"] * 2
    assert len(client.calls) == 3  # an open breaker sends nothing to the model


async def test_shadow_is_recorded_but_never_chosen() -> None:
    client = FakeClient("analyst-reports")
    p = planner(client, stages=StageInfo("1.0.0", None, 0.0, "2.0.0"))
    decision = await p.plan("t", "u", CATALOG, {}, NOW)
    assert decision.path_key == "analyst-reports"
    assert decision.details["shadow"] == {"version": "2.0.0", "path": "generic", "confidence": 0.8}
    assert sorted(c[1] for c in client.calls) == ["production", "shadow"]


async def test_canary_slice_is_deterministic() -> None:
    client = FakeClient()
    p = planner(client, stages=StageInfo("1.0.0", "1.1.0", 0.5, None))
    users = [f"user-{i}" for i in range(200)]
    first = [(await p.plan("t", u, CATALOG, {}, NOW)).details["stage"] for u in users]
    again = [(await p.plan("t", u, CATALOG, {}, NOW)).details["stage"] for u in users]
    assert first == again
    share = first.count("canary") / len(first)
    assert 0.35 < share < 0.65
    assert all(in_canary(1.0, "t", u) for u in users)
    assert not any(in_canary(0.0, "t", u) for u in users)


def test_breaker_half_opens_after_the_reset_time() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.allow()  # one trial
    assert not breaker.allow()  # and only one
    breaker.failure()  # the trial failed: open again
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"


def test_model_instance_prefers_request_traits() -> None:
    reading = FeatureReading({"user_persona": "analyst", "use_case": "marketing", "session_count": 4}, "fresh")
    instance = model_instance({"persona": "developer", "company_size": "1-10"}, reading)
    assert instance["user_persona"] == "developer"
    assert instance["use_case"] == "marketing"
    assert instance["company_size"] == "1-10"
    assert instance["session_count"] == 4.0
    assert instance["avg_session_duration"] is None  # unknown, not zero
    assert model_instance({}, None)["engagement_score"] is None
    assert set(instance) == {
        "user_persona",
        "signup_source",
        "company_size",
        "use_case",
        "engagement_score",
        "time_since_signup",
        "steps_completed",
        "session_count",
        "avg_session_duration",
    }


class BlockingClient(FakeClient):
    """Computes on the event loop without yielding (as the in-process client does for small batches)."""

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction:
        time.sleep(self.delay)  # noqa: ASYNC251 (blocking on purpose: that is the case under test)
        return await FakeClient(self.path).predict(model, instances, stage=stage)


async def test_an_answer_computed_past_the_timeout_is_discarded() -> None:
    slow = await planner(BlockingClient(delay=0.08), timeout_s=0.03).plan(
        "t", "u", CATALOG, {"persona": "developer"}, NOW
    )
    assert (slow.selected_by, slow.fallback_reason) == ("rules", "timeout")
    fast = await planner(BlockingClient(delay=0.0), timeout_s=0.03).plan(
        "t", "u", CATALOG, {"persona": "developer"}, NOW
    )
    assert (fast.selected_by, fast.fallback_reason) == ("model", None)


# ---- exploration around the model's choice (docs/models.md#exploration-and-propensities)


async def test_model_decisions_without_exploration_have_propensity_one() -> None:
    p = planner(FakeClient("analyst-reports"), timeout_s=10)
    decision = await p.plan("t", "u", CATALOG, {"persona": "developer"}, NOW)
    assert decision.selected_by == "model"
    assert (decision.details["propensity"], decision.details["exploration"]) == (1.0, None)
    fallback = await planner(FakeClient(fail="down")).plan("t", "u", CATALOG, {"persona": "developer"}, NOW)
    assert (fallback.selected_by, fallback.details["propensity"]) == ("rules", 1.0)


async def test_exploration_around_the_model_records_the_propensity_of_the_path_taken() -> None:
    epsilon, n = 0.4, 1500
    exploring = replace(CATALOG, exploration=epsilon)
    p = planner(FakeClient("analyst-reports"), rng=random.Random(11), timeout_s=10)  # no timeouts on a busy box
    # the model chooses analyst-reports for a developer: outside targeting, yet the greedy choice stays eligible
    decisions = [await p.plan("t", f"u{i}", exploring, {"persona": "developer"}, NOW) for i in range(n)]
    greedy, other = 1 - epsilon + epsilon / 3, epsilon / 3
    expected = {"analyst-reports": greedy, "developer-quickstart": other, "generic": other}
    counts = Counter(d.path_key for d in decisions)
    for key, share in expected.items():
        assert counts[key] / n == pytest.approx(share, abs=3.5 * (share * (1 - share) / n) ** 0.5), key
    for d in decisions:
        record = d.as_record()
        assert record["propensity"] == pytest.approx(expected[d.path_key])
        assert record["exploration"]["eligible"] == ["developer-quickstart", "analyst-reports", "generic"]
        assert record["exploration"]["greedy"] == "analyst-reports"
        assert (record["model"], record["model_version"]) == ("path_classifier", "1.0.0")
        assert record["features"]["user_persona"] == "developer"  # what the model saw stays on the record
        if d.path_key == "analyst-reports":
            assert (d.selected_by, d.confidence) == ("model", 0.8)
        else:  # not the model's choice: never counted as a model decision (drift, review sampling)
            assert (d.selected_by, d.confidence, record["fallback"]) == ("exploration", None, None)
            assert record["exploration"]["explored"]


async def test_exploration_after_a_model_failure_explores_around_the_rules() -> None:
    exploring = replace(CATALOG, exploration=0.5)
    p = planner(FakeClient(fail="down"), rng=random.Random(5))
    decisions = [await p.plan("t", f"u{i}", exploring, {"persona": "analyst"}, NOW) for i in range(60)]
    assert {d.fallback_reason for d in decisions} == {"unavailable", "circuit_open"}
    taken = {(d.path_key, d.selected_by, round(d.details["propensity"], 4)) for d in decisions}
    assert taken == {("analyst-reports", "rules", 0.75), ("generic", "exploration", 0.25)}
    assert all(d.as_record()["fallback"] == "rules" for d in decisions)  # the model's failure is still said
