"""docs/operations.md's metrics table lists every metric the platform defines, and only those."""

from __future__ import annotations

import re
from pathlib import Path

from tests.factories import ROOT
from tests.unit.test_readme import section

DEFINITION = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"(firstmile_[a-z0-9_]+)\"")
ROW = re.compile(r"^\| `(firstmile_[a-z0-9_]+)` \|", re.MULTILINE)


def defined_metrics(source_root: Path) -> set[str]:
    return {name for path in source_root.rglob("*.py") for name in DEFINITION.findall(path.read_text("utf-8"))}


def table_problems(doc: str, defined: set[str]) -> list[str]:
    listed = ROW.findall(section(doc, "Metrics"))
    problems = [f"{name} is defined but not in the table" for name in sorted(defined - set(listed))]
    problems += [f"{name} is in the table but no code defines it" for name in sorted(set(listed) - defined)]
    problems += [f"{name} is listed twice" for name in sorted({n for n in listed if listed.count(n) > 1})]
    return problems


def test_every_metric_is_documented_once() -> None:
    defined = defined_metrics(ROOT / "platform" / "firstmile")
    assert len(defined) >= 15, defined  # the scan finds the definitions
    assert table_problems((ROOT / "docs" / "operations.md").read_text("utf-8"), defined) == []


def test_the_check_sees_a_missing_a_stale_and_a_repeated_row() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text("utf-8")
    defined = defined_metrics(ROOT / "platform" / "firstmile")
    row = "| `firstmile_relay_backlog` | gauge |"
    assert row in doc
    problems = table_problems(doc.replace(row, "| `firstmile_relay_backlogs` | gauge |", 1), defined)
    assert "firstmile_relay_backlog is defined but not in the table" in problems
    assert "firstmile_relay_backlogs is in the table but no code defines it" in problems
    doubled = doc.replace(row, row + " x |\n" + row, 1)
    assert "firstmile_relay_backlog is listed twice" in table_problems(doubled, defined)
