"""The rules of docs/architecture.md that import-linter cannot see: who mints a tenant scope, who reads
``app.state``, who runs raw analytics SQL, and whose tables a slice's SQL may name.

import-linter (``make lint``) checks the layers and that a slice's models and repository stay its own;
these tests read the source for what is not an import.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.factories import ROOT

PACKAGE = ROOT / "platform" / "firstmile"


@cache
def _parsed() -> tuple[tuple[Path, ast.Module], ...]:
    return tuple(
        (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    )


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    yield from _parsed()


def _slice(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _calls(tree: ast.Module, name: str) -> list[int]:
    """Lines that call ``name(...)`` (as a bare name or an attribute)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if called == name:
                found.append(node.lineno)
    return found


def _where(name: str, allowed: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}"
        for path, tree in _modules()
        for line in _calls(tree, name)
        if str(path.relative_to(PACKAGE)) not in allowed
    ]


def test_a_tenant_scope_is_minted_in_kit_scope_only() -> None:
    """``TenantId(...)`` appears in exactly the two doors of kit/scope.py: an authenticated principal,
    an operator context. Anything else would let an unchecked UUID reach the repositories."""
    assert _where("TenantId", {"kit/scope.py"}) == []
    scope = (PACKAGE / "kit" / "scope.py").read_text(encoding="utf-8")
    assert len(_calls(ast.parse(scope), "TenantId")) == 2


def test_a_tenant_transaction_is_made_by_kit_db_only() -> None:
    """A ``TenantTx`` is made by ``tenant_transaction``/``bind_tenant``, which set the tenant in PostgreSQL."""
    assert _where("TenantTx", {"kit/db.py"}) == []


def test_principals_are_made_where_credentials_are_checked() -> None:
    """A request's principal comes from the auth slice (keys and tokens) or the admin slice (sessions)."""
    assert _where("Principal", {"auth/resolver.py"}) == []
    assert _where("AdminSession", {"admin/service.py", "admin/sessions.py"}) == []


def test_no_request_handler_makes_an_operator_context() -> None:
    """Operator contexts are for the CLI and workers: a handler's tenant comes from its principal."""
    handlers = [path for path, _ in _modules() if path.name in ("api.py", "pages.py")]
    assert len(handlers) >= 7  # the six API slices and the admin UI's pages
    offenders = [
        f"{path.relative_to(ROOT)}: {word}"
        for path in handlers
        for word in ("OperatorContext", "OPERATOR_CLI", "WORKER.tenant")
        if word in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_no_handler_reads_services_from_app_state() -> None:
    """Handlers get services by dependency injection; only app.py keeps the container on the state."""
    offenders = []
    for path, tree in _modules():
        if path.relative_to(PACKAGE).as_posix() == "app.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "state":
                value = node.value
                if isinstance(value, ast.Attribute) and value.attr == "app":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_raw_analytics_sql_is_used_by_no_request_path() -> None:
    """``dangerous_raw_sql`` is defined by the stores and called only by them (to run a built query)."""
    stores = {"analytics/store.py", "analytics/chdb_store.py", "analytics/clickhouse_store.py", "analytics/lazy.py"}
    assert _where("dangerous_raw_sql", stores) == []


def _table_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for match in re.finditer(r'^\w+ = Table\(\s*"(\w+)"', path.read_text(encoding="utf-8"), re.M):
            owners[match.group(1)] = _slice(path)
    return owners


def test_every_table_is_named_in_sql_only_by_its_own_slice() -> None:
    """A slice reaches another slice's data through that slice's service, never its tables.

    The outbox is the platform's (``kit``): every slice that emits events may write it. The wiring
    and the migrations see every table.
    """
    owners = _table_owners()
    assert {"tenants", "user_progress", "audit_entries", "outbox"} <= set(owners)  # the check sees the tables
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = _slice(path)
        if where in ("wiring", "migrations"):
            continue
        text = path.read_text(encoding="utf-8")
        for table, owner in owners.items():
            if owner in (where, "kit"):
                continue
            for match in re.finditer(rf"\b(FROM|JOIN|INTO|UPDATE|TABLE)\s+{table}\b", text):
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)} (a table of {owner})")
    assert offenders == []


@pytest.mark.parametrize("needle", ["authorise_tenant", "run_in_tenant_transaction", "set_tenant("])
def test_the_old_ways_around_the_unit_of_work_are_gone(needle: str) -> None:
    assert [p for p, _ in _modules() if needle in p.read_text(encoding="utf-8")] == []


def test_only_the_wiring_reads_the_settings() -> None:
    """Slices get values, never the settings object: they stay testable without the environment."""
    wiring = {"wiring", "app", "cli", "settings"}
    offenders = [
        f"{path.relative_to(ROOT)}"
        for path, tree in _modules()
        if _slice(path) not in wiring
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "firstmile.settings"
    ]
    assert offenders == []
