"""The benchmarks live in ``benchmarks/`` at the repository root: the product neither imports nor ships them."""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path

import pytest

from tests.factories import ROOT

PRODUCT_ROOTS = (ROOT / "platform", ROOT / "inference")
BANNED = ("benchmarks", "firstmile.bench", "firstmile.bench_bare", "firstmile_inference.bench")


def _banned(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in BANNED)


def _imported_modules(path: Path, source_root: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    package = list(path.relative_to(source_root).parts[:-1])  # a module's package, or the package itself
    modules: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            modules.append(module)
            modules += [f"{module}.{alias.name}" for alias in node.names]
    return modules


def test_nothing_in_the_product_imports_the_benchmarks() -> None:
    offenders = []
    for source_root in PRODUCT_ROOTS:
        for path in sorted(source_root.rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _imported_modules(path, source_root) if _banned(m)]
    assert offenders == [], "the product must not import the benchmarks"


def test_the_old_benchmark_modules_are_gone() -> None:
    old = ["platform/firstmile/bench", "platform/firstmile/bench_bare.py", "inference/firstmile_inference/bench.py"]
    old += ["platform/firstmile/audit/bench.py", "platform/firstmile/security/bench.py"]
    old += ["platform/firstmile/security/pii_bench.py"]
    assert [p for p in old if (ROOT / p).exists()] == []


def test_the_wheel_does_not_ship_the_benchmarks() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    build = config["tool"]["hatch"]["build"]
    assert build["targets"]["wheel"]["packages"] == ["platform/firstmile", "inference/firstmile_inference"]
    assert "benchmarks" not in json.dumps(build)
    for package in build["targets"]["wheel"]["packages"]:
        assert not (ROOT / package / "benchmarks").exists()


def test_the_product_cli_has_no_bench_group() -> None:
    from firstmile.cli import main

    assert "bench" not in main.commands


@pytest.mark.parametrize(
    "name", ["admin", "analytics", "api", "audit", "crypto", "events", "inference", "pii", "planner"]
)
def test_python_m_benchmarks_has_every_benchmark(name: str) -> None:
    from benchmarks.__main__ import main

    assert name in main.commands
