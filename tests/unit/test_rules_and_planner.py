"""Pure logic: predicates, the rule-based planner and the progress state machine."""

from __future__ import annotations

from typing import Any

import pytest

from firstmile.onboarding import domain, planner
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
