"""Predicates over traits and event properties (pure: no I/O).

Used by the path planner (targeting rules over a user's traits) and by the
progress evaluator (a step's completion criteria over an event's properties).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_MISSING = object()


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; a sentinel when any part is absent."""
    current: Any = data
    for part in dotted.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _ordered(left: Any, right: Any) -> bool:
    numeric = (int, float)
    both_numbers = isinstance(left, numeric) and isinstance(right, numeric)
    both_strings = isinstance(left, str) and isinstance(right, str)
    return (both_numbers or both_strings) and not isinstance(left, bool) and not isinstance(right, bool)


def matches(field: str, op: str, expected: Any, data: Mapping[str, Any]) -> bool:
    """Whether ``data[field] <op> expected`` holds. Absent fields never match (but ``exists: false``)."""
    actual = lookup(data, field)
    if op == "exists":
        return (actual is not _MISSING) == bool(expected)
    if actual is _MISSING:
        return False
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if op == "in":
        return isinstance(expected, Sequence) and actual in expected
    if op == "not_in":
        return isinstance(expected, Sequence) and actual not in expected
    if op == "contains":
        if isinstance(actual, str) and isinstance(expected, str):
            return expected in actual
        return isinstance(actual, list) and expected in actual
    if op in ("gt", "gte", "lt", "lte"):
        if not _ordered(actual, expected):
            return False
        if op == "gt":
            return bool(actual > expected)
        if op == "gte":
            return bool(actual >= expected)
        if op == "lt":
            return bool(actual < expected)
        return bool(actual <= expected)
    raise ValueError(f"unknown operator {op!r}")


def describe(field: str, op: str, expected: Any) -> str:
    """A human-readable form of one predicate, as it appears in decision records."""
    return f"{field} {op} {expected!r}"
