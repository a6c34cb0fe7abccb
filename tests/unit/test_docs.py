"""Docs that must not drift from the code."""

from __future__ import annotations

from firstmile.settings import environment_names
from tests.factories import ROOT


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [name for name in environment_names() if f"`{name}`" not in doc]
    assert missing == [], f"document these in docs/configuration.md: {missing}"


def test_readme_opens_with_the_two_commands() -> None:
    opening = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40])
    assert "make run" in opening
    assert "make test" in opening
