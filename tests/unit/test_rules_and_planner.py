"""Pure logic: predicates, the rule-based planner (and its exploration) and the progress state machine."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from firstmile.onboarding import domain, planner
from firstmile.onboarding.catalog import PathCatalog
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.rules import matches
from tests.factories import manifest_for


@pytest.mark.parametrize(
    ("op", "expected", "data", "result"),
    [
        ("eq", "developer", {"persona": "developer"}, True),
        ("eq", "developer", {"persona": "analyst"}, False),
        ("ne", "developer", {"persona": "analyst"}, True),
        ("in", ["a", "b"], {"persona": "b"}, True),
        ("not_in", ["a", "b"], {"persona": "b"}, False),
        ("gte", 3, {"persona": 3}, True),
        ("gt", 3, {"persona": 3}, False),
        ("lt", 3, {"persona": "2"}, False),  # no cross-type ordering
        ("gte", 1, {"persona": True}, False),  # booleans are not numbers here
        ("exists", True, {"persona": None}, True),
        ("exists", False, {}, True),
        ("contains", "sql", {"persona": "nosql"}, True),
        ("eq", "x", {}, False),
    ],
)
def test_predicates(op: str, expected: Any, data: dict[str, Any], result: bool) -> None:
    assert matches("persona", op, expected, data) is result


def test_nested_fields_are_addressed_with_dots() -> None:
    assert matches("context.page.path", "eq", "/", {"context": {"page": {"path": "/"}}})
    assert not matches("context.page.path", "eq", "/", {"context": {"page": "flat"}})


def _paths() -> tuple[list[PathDef], str]:
    manifest = manifest_for("unit", "eu-west-1")
    paths = [PathDef.from_definition(p.id, 1, p.model_dump(mode="json")) for p in manifest.paths]
    return paths, manifest.default_path


def test_planner_picks_the_highest_priority_match() -> None:
    paths, default = _paths()
    # matches enterprise-rollout (200) and developer-quickstart (100): the higher priority wins
    traits = {"persona": "developer", "company_size": "1001+", "role": "it_admin"}
    decision = planner.plan(paths, default, traits)
    assert decision.path_key == "enterprise-rollout"
    assert decision.selected_by == "rules"
    assert decision.rule is not None and "company_size in" in decision.rule
    # the same input always gives the same answer, whatever the order of the catalogue
    assert planner.plan(list(reversed(paths)), default, traits) == decision


def test_planner_persona_beats_use_case_and_falls_back_to_default() -> None:
    paths, default = _paths()
    assert planner.plan(paths, default, {"persona": "analyst", "use_case": "marketing"}).path_key == "analyst-reports"
    assert planner.plan(paths, default, {"use_case": "marketing"}).path_key == "marketing-campaigns"
    fallback = planner.plan(paths, default, {"persona": "astronaut"})
    assert (fallback.path_key, fallback.selected_by, fallback.rule) == ("generic", "default", None)
    assert fallback.as_record()["fallback"] == "default_path"


def test_planner_without_a_default_path_is_an_error() -> None:
    paths, _ = _paths()
    with pytest.raises(LookupError):
        planner.plan([p for p in paths if p.key != "generic"], "generic", {})


def test_progress_follows_order_and_prerequisites() -> None:
    paths, _ = _paths()
    dev = next(p for p in paths if p.key == "developer-quickstart")
    # omitted prerequisites mean "the previous required step"
    assert dev.step("install-sdk") is not None
    assert dev.step("install-sdk").prerequisites == ("create-api-key",)  # type: ignore[union-attr]
    assert dev.step("invite-teammate").prerequisites == ()  # type: ignore[union-attr]
    start = domain.evaluate(dev, ())
    assert (start.current_step, start.status, start.required) == ("create-api-key", "in_progress", 4)
    assert domain.missing_prerequisites(dev, "send-first-event", ["create-api-key"]) == ["install-sdk"]
    # optional steps never block and never become the current step
    done = ["create-api-key", "install-sdk", "send-first-event", "view-live-events"]
    final = domain.evaluate(dev, done)
    assert (final.current_step, final.status, final.percent) == (None, "completed", 100)


def test_optional_step_does_not_become_an_implicit_prerequisite() -> None:
    paths, _ = _paths()
    analyst = next(p for p in paths if p.key == "analyst-reports")
    # schedule-export is optional and last; marketing's import-contacts is optional in the middle
    marketing = next(p for p in paths if p.key == "marketing-campaigns")
    assert marketing.step("create-segment").prerequisites == ("connect-ad-accounts",)  # type: ignore[union-attr]
    assert analyst.step("schedule-export").prerequisites == ("share-dashboard",)  # type: ignore[union-attr]


# ---- exploration and propensities (docs/models.md#exploration-and-propensities)


def _catalog(epsilon: float) -> PathCatalog:
    paths, default = _paths()
    return PathCatalog(revision=1, default_key=default, current=tuple(paths), exploration=epsilon)


NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DEVELOPER_MARKETER = {"persona": "developer", "use_case": "marketing"}  # targeted by two paths


async def test_without_exploration_a_rules_decision_is_deterministic_with_propensity_one() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    decision = await planner.RulesPlanner(rng).plan("t", "u", _catalog(0.0), DEVELOPER_MARKETER, NOW)
    assert (decision.path_key, decision.selected_by) == ("developer-quickstart", "rules")
    record = decision.as_record()
    assert (record["propensity"], record["exploration"]) == (1.0, None)
    assert rng.getstate() == state  # nothing is drawn when exploration is off


def test_eligible_paths_are_the_targeted_matches_the_default_and_the_greedy_choice() -> None:
    paths, default = _paths()
    keys = [p.key for p in planner.eligible_paths(paths, default, DEVELOPER_MARKETER, "developer-quickstart")]
    assert keys == ["developer-quickstart", "marketing-campaigns", "generic"]
    # a greedy choice outside targeting (the model may make one) is among them, nothing else is added
    keys = [p.key for p in planner.eligible_paths(paths, default, {"persona": "developer"}, "analyst-reports")]
    assert keys == ["developer-quickstart", "analyst-reports", "generic"]
    assert [p.key for p in planner.eligible_paths(paths, default, {}, "generic")] == ["generic"]


async def test_epsilon_greedy_stays_within_targeting_and_records_true_propensities() -> None:
    epsilon, n = 0.3, 3000
    rules, catalog = planner.RulesPlanner(random.Random(7)), _catalog(epsilon)
    decisions = [await rules.plan("t", f"u{i}", catalog, DEVELOPER_MARKETER, NOW) for i in range(n)]
    eligible = ["developer-quickstart", "marketing-campaigns", "generic"]
    expected = {"developer-quickstart": 1 - epsilon + epsilon / 3, "marketing-campaigns": epsilon / 3,
                "generic": epsilon / 3}  # fmt: skip
    counts = Counter(d.path_key for d in decisions)
    assert set(counts) == set(eligible)  # never outside targeting (enterprise-rollout, analyst-reports, …)
    for d in decisions:
        record = d.as_record()
        assert record["propensity"] == pytest.approx(expected[d.path_key])
        exploration = record["exploration"]
        assert exploration["policy"] == "epsilon_greedy" and exploration["epsilon"] == epsilon
        assert exploration["eligible"] == eligible and exploration["greedy"] == "developer-quickstart"
        if d.path_key != "developer-quickstart":
            assert exploration["explored"]
            assert (d.selected_by, d.rule, d.priority, record["fallback"]) == ("exploration", None, None, None)
        else:
            assert (d.selected_by, d.rule) == ("rules", "developer-quickstart: persona eq 'developer'")
    # the recorded propensities are the frequencies the paths are really chosen with
    for key, p in expected.items():
        assert counts[key] / n == pytest.approx(p, abs=3.5 * (p * (1 - p) / n) ** 0.5), key
    explored = sum(d.details["exploration"]["explored"] for d in decisions) / n
    assert explored == pytest.approx(epsilon, abs=3.5 * (epsilon * (1 - epsilon) / n) ** 0.5)
    # the same seed draws the same decisions
    again = planner.RulesPlanner(random.Random(7))
    assert [await again.plan("t", f"u{i}", catalog, DEVELOPER_MARKETER, NOW) for i in range(50)] == decisions[:50]


async def test_a_user_with_one_eligible_path_always_gets_it_with_propensity_one() -> None:
    rules, catalog = planner.RulesPlanner(random.Random(3)), _catalog(0.5)
    decisions = [await rules.plan("t", "u", catalog, {"persona": "astronaut"}, NOW) for _ in range(40)]
    assert {(d.path_key, d.selected_by, d.details["propensity"]) for d in decisions} == {("generic", "default", 1.0)}
    assert any(d.details["exploration"]["explored"] for d in decisions)  # drawn, and landed on the only path


def test_explore_refuses_an_epsilon_that_is_not_a_probability() -> None:
    paths, default = _paths()
    decision = planner.plan(paths, default, {})
    with pytest.raises(ValueError, match="not a probability"):
        planner.explore(decision, paths, default, {}, 1.5, random.Random(1))
