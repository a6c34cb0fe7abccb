"""The reliability harness's figures, printed at the end of the run (issue 14: "its figures … are printed").

A harness test (the OpenAPI fuzzing, the isolation soak) adds what it measured with :func:`add`: one
JSON file per test and xdist worker under ``.firstmile/harness/<tag>``, so the figures survive the
worker processes; ``tests/conftest.py`` clears the folder when the run starts and prints
:func:`summary` in the terminal summary of the controller (or of the only process without xdist).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from tests.factories import ROOT

FOLDER = ROOT / ".firstmile" / "harness" / (os.environ.get("FIRSTMILE_TEST_DB_TAG", "") or "default")


def clear() -> None:
    shutil.rmtree(FOLDER, ignore_errors=True)


def add(harness: str, worker: str, figures: Mapping[str, int | str]) -> None:
    """Record ``figures`` of ``harness`` measured on ``worker`` (numbers add up across workers)."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    path = FOLDER / f"{harness}.{worker}.json"
    path.write_text(json.dumps(dict(figures)), encoding="utf-8")


def _load(path: Path) -> dict[str, int | str]:
    data: dict[str, int | str] = json.loads(path.read_text(encoding="utf-8"))
    return data


def summary() -> list[str]:
    """One line per harness: its figures, numbers summed over the workers that ran it."""
    totals: dict[str, dict[str, int | str]] = {}
    for path in sorted(FOLDER.glob("*.json")) if FOLDER.is_dir() else []:
        harness = path.name.split(".", 1)[0]
        merged = totals.setdefault(harness, {})
        for key, value in _load(path).items():
            previous = merged.get(key)
            if isinstance(value, int) and isinstance(previous, int):
                merged[key] = previous + value
            elif previous is None:
                merged[key] = value
    return [f"{harness}: " + ", ".join(f"{k} {v}" for k, v in figures.items()) for harness, figures in totals.items()]
