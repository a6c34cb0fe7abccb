"""The report of ``python -m benchmarks planner``: decision shares and ratios against the rules."""

from __future__ import annotations

from datetime import UTC, datetime

from benchmarks.cpu import CpuUse
from benchmarks.database import ServerInfo
from benchmarks.planner import (
    IN_PROCESS,
    RAY_SERVE,
    RULES,
    DecisionStats,
    PlannerFacts,
    PlannerRun,
    _label,
    _report,
    _shares,
)
from benchmarks.wrk import WrkResult


def _wrk(requests: int, p50: float, p95: float, p99: float) -> WrkResult:
    return WrkResult(requests, 10.0, 0, 0, 0, 0, 0, 0, p50, p95, p99, p99 * 2, p50, "")


def _run(
    server: str, planner: str, connections: int, result: WrkResult, stats: DecisionStats, round_: int = 1
) -> PlannerRun:
    return PlannerRun(server, planner, connections, result, CpuUse(10.0, 8.0, 4.0, 1.0, 18.0), stats, 2.5, round_)


def test_label_names_the_fallback_reason() -> None:
    assert _label("model", None) == "model"
    assert _label("rules", "timeout") == "rules (timeout)"
    assert _label(None, None) == "unknown"


def test_shares_largest_first_and_tiny_counts_as_numbers() -> None:
    stats = DecisionStats({"rules (timeout)": 30, "model": 9_969, "rules (circuit_open)": 1})
    assert stats.users == 10_000 and stats.by_model == 9_969 and stats.fallbacks == 31
    assert _shares(stats) == "model 99.7%, rules (timeout) 0.3%, rules (circuit_open) 1"
    assert _shares(DecisionStats({})) == "no users recorded"


def test_report_ratios_are_medians_against_the_rules_of_the_same_server() -> None:
    rules = DecisionStats({"rules": 1000})
    model = DecisionStats({"model": 990, "rules (timeout)": 10}, inference_p50_ms=1.5, inference_p95_ms=3.0)
    breaker = DecisionStats({"model": 10, "rules (circuit_open)": 990})
    runs = [
        _run(IN_PROCESS, RULES, 4, _wrk(1000, 4.0, 8.0, 10.0), rules),
        _run(IN_PROCESS, "model", 4, _wrk(800, 5.0, 10.0, 20.0), model),
        _run(IN_PROCESS, RULES, 4, _wrk(1000, 2.0, 8.0, 10.0), rules, 2),
        _run(IN_PROCESS, "model", 4, _wrk(800, 4.0, 10.0, 20.0), model, 2),
        _run(IN_PROCESS, RULES, 4, _wrk(1000, 6.0, 8.0, 10.0), rules, 3),
        _run(IN_PROCESS, "model", 4, _wrk(800, 9.0, 10.0, 20.0), model, 3),
        _run(IN_PROCESS, RULES, 32, _wrk(2000, 30.0, 40.0, 50.0), rules),
        _run(IN_PROCESS, "model", 32, _wrk(1500, 40.0, 50.0, 60.0), model),
        _run(RAY_SERVE, RULES, 4, _wrk(500, 8.0, 16.0, 20.0), rules),
        _run(RAY_SERVE, "model", 4, _wrk(250, 16.0, 24.0, 30.0), breaker),
    ]
    facts = PlannerFacts(
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        elapsed_s=100.0,
        duration=10,
        warmup=3,
        low=4,
        high=32,
        rounds=3,
        threads=1,
        machine={"cores": "2", "cpu": "x", "memory": "8 GiB", "os": "Linux", "python": "3.11"},
        pg=ServerInfo("16", {"server_version": "16"}, "/tmp"),
        registry="file:///r",
        model_version="1.0.0",
        inference_url="http://127.0.0.1:58200",
        inference_timeout_ms="100 (default)",
        load_before=(1.0, 2.0, 3.0),
        load_after=(4.0, 5.0, 6.0),
        command="make bench-planner",
        runs=runs,
    )
    text = _report(facts)
    assert text.startswith("## Path planner: start latency with the model vs the rules")
    assert "load average 1.00 / 2.00 / 3.00 (1 / 5 / 15 min) before the run" in text
    assert "| model in-process | p50 at 4 connections | 4.00 ms | 5.00 ms | 1.25x | 99.0% | 1.0% |" in text
    assert "| model in-process | req/s at 32 connections | 200.00 | 150.00 | 0.75x | 99.0% | 1.0% |" in text
    # the Ray Serve model is compared with the rules measured on the Ray Serve server, not the other one;
    # a run the breaker kept on the rules is flagged
    assert (
        "| model via Ray Serve ⚠ mostly fallbacks | p50 at 4 connections | 8.00 ms | 16.00 ms | 2.00x | 1.0% | 99.0% |"
        in text
    )
    assert "model via Ray Serve | req/s at 32" not in text  # not measured: no row
    assert "| 1.50 / 3.00 |" in text
