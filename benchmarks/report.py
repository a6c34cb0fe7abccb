"""The markdown report."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchmarks.ceiling import Ceiling
from benchmarks.common import BYPASS_ROLE, RLS_ROUND, STEP
from benchmarks.cpu import CpuUse
from benchmarks.database import ServerInfo
from benchmarks.rls import RlsResult, _pct
from benchmarks.wrk import WrkResult


def _machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return {
        "cores": str(cores),
        "cpu": model,
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _cli(name: str, options: str) -> str:
    """This run as a command: ``python -m benchmarks NAME`` with its arguments, else with ``options``."""
    if len(sys.argv) > 1 and Path(sys.argv[0]).parent.name == "benchmarks" and sys.argv[1] == name:
        return "python -m benchmarks " + shlex.join(sys.argv[1:])
    return f"python -m benchmarks {name} {options}"


def _command(duration: int, connections: int, workers: int, tuning: dict[str, str]) -> str:
    cli = _cli("api", f"--duration {duration} --connections {connections} --workers {workers}")
    env = "".join(f"{k}={v} " for k, v in tuning.items())
    if os.environ.get("MAKELEVEL"):
        return f"{env}make bench   # runs: FIRSTMILE_BENCH_ADMIN_URL=… {cli}"
    return f"FIRSTMILE_BENCH_ADMIN_URL=… {env}{cli}"


def _pool_description(tuning: dict[str, str]) -> str:
    from firstmile.settings import DatabaseSettings

    fields = DatabaseSettings.model_fields
    size = tuning.get("FIRSTMILE_DATABASE_POOL_SIZE", str(fields["pool_size"].default))
    overflow = tuning.get("FIRSTMILE_DATABASE_MAX_OVERFLOW", str(fields["max_overflow"].default))
    source = "from the environment" if tuning else "the defaults"
    return f"{size} + {overflow} overflow ({source})"


def _versions() -> str:
    from importlib.metadata import version

    parts = []
    for dist in ("litestar", "uvicorn", "uvloop", "httptools", "sqlalchemy", "asyncpg", "msgspec"):
        with contextlib.suppress(Exception):
            parts.append(f"{dist} {version(dist)}")
    return ", ".join(parts)


def _row(name: str, r: WrkResult) -> str:
    return (
        f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} "
        f"| {r.requests:,} | {r.errors} |"
    )


def _cpu_row(name: str, cpu: CpuUse, r: WrkResult) -> str:
    per = 1e6 / max(1, r.requests)
    return (
        f"| {name} | {cpu.busy_s / cpu.wall_s:.2f} | {cpu.server_s / cpu.wall_s:.2f} | "
        f"{cpu.postgres_s / cpu.wall_s:.2f} | {cpu.wrk_s / cpu.wall_s:.2f} | {cpu.other_s / cpu.wall_s:.2f} | "
        f"{cpu.server_s * per:.0f} | {cpu.postgres_s * per:.0f} | {cpu.new_sessions} | "
        f"{' / '.join(f'{c / cpu.wall_s:.2f}' for c in cpu.server_split)} |"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


@dataclass(frozen=True)
class MergeDelay:
    """How long the audited start run's decisions waited in the audit queue (``sequenced_at - created_at``)."""

    expected: int
    sequenced: int
    delays_s: list[float]

    def pct(self, q: float) -> float:
        if not self.delays_s:
            return math.nan
        ordered = sorted(self.delays_s)
        return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Production:
    """Start in the production shape: the API alone, relay, consumers and sequencer in processes of their own."""

    start: WrkResult
    cpu: CpuUse
    merge: MergeDelay


@dataclass(frozen=True)
class AuditPair:
    """One start run of the audited build and one of the build without the audit append, back to back."""

    audited: WrkResult
    audited_cpu: CpuUse
    plain: WrkResult
    plain_cpu: CpuUse

    @property
    def by_throughput(self) -> float:
        return self.audited.rps / self.plain.rps if self.plain.rps else math.nan

    @property
    def by_cpu(self) -> float:
        """Server and PostgreSQL CPU per start of the build without the append over the audited build's."""
        audited = _per_request_us(self.audited_cpu, self.audited)
        plain = _per_request_us(self.plain_cpu, self.plain)
        return plain / audited if audited > 0 else math.nan


def _per_request_us(cpu: CpuUse, run: WrkResult) -> float:
    return (cpu.server_s + cpu.postgres_s) / run.requests * 1e6 if run.requests else math.nan


def _median(values: list[float]) -> float:
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class RunFacts:
    started_at: datetime
    duration: int
    warmup: int
    connections: int
    workers: int
    threads: int
    machine: dict[str, str]
    pg: ServerInfo
    bare: WrkResult
    start: WrkResult
    complete: WrkResult
    unaudited: WrkResult
    merge: MergeDelay
    production: Production | None
    audit_pairs: list[AuditPair]
    ceiling: Ceiling
    cpu: dict[str, CpuUse]
    started_in_db: int
    completed_in_db: int
    complete_pool: int
    topped_up: int
    rls: RlsResult
    command: str
    elapsed_s: float
    pool: str


def _production_rows(f: RunFacts) -> list[str]:
    p = f.production
    assert p is not None
    ratio = p.start.rps / f.bare.rps if f.bare.rps else math.nan
    p99 = p.merge.pct(99)
    return [
        f"| production shape: start req/s ÷ bare req/s | {ratio:.1%} | ≥ 25% | {_verdict(ratio >= 0.25)} |",
        f"| production shape: start p95 | {p.start.p95_ms:.1f} ms | ≤ 25 ms | {_verdict(p.start.p95_ms <= 25)} |",
        f"| production shape: maximum merge delay (p99, `firstmile sequencer`, {p.merge.sequenced:,} of "
        f"{p.merge.expected:,}) | {p99 * 1000:.0f} ms (p50 {p.merge.pct(50) * 1000:.0f} ms) | ≤ 1 s | "
        f"{_verdict(p99 <= 1.0 and p.merge.sequenced >= p.merge.expected)} |",
    ]


def _pairs_section(f: RunFacts) -> list[str]:
    """Each interleaved pair of start runs, with and without the audit append."""
    out = [
        "### The audit append's price: interleaved pairs",
        "",
        "The single runs above are minutes apart, and on two cores their difference is within what drifts "
        "between runs (the tables grow, autovacuum runs, uvicorn's workers split wrk's connections unevenly). "
        "So the build with the append and the build without it also run alternately, a fresh server each time, "
        "2 s warm-up then the measured run; a pair's ratio compares neighbours in time.",
        "",
        "| pair | audited req/s | p95 ms | µs/start (server + PostgreSQL) | without req/s | p95 ms | µs/start "
        "| by throughput | by CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(f.audit_pairs, 1):
        out.append(
            f"| {i} | {p.audited.rps:,.0f} | {p.audited.p95_ms:.1f} | {_per_request_us(p.audited_cpu, p.audited):,.0f} "
            f"| {p.plain.rps:,.0f} | {p.plain.p95_ms:.1f} | {_per_request_us(p.plain_cpu, p.plain):,.0f} "
            f"| {p.by_throughput:.1%} | {p.by_cpu:.1%} |"
        )
    return [*out, ""]


def _ceiling_section(f: RunFacts) -> list[str]:
    """The start's own transaction through pgbench, and what it says about the targets."""
    c = f.ceiling
    target = 0.25 * f.bare.rps
    cores = float(f.machine["cores"])
    pg_only = cores * 1e6 / c.postgres_us if c.postgres_us > 0 else math.nan
    return [
        "### What PostgreSQL alone can do: the start's transaction through pgbench",
        "",
        "The start's write transaction as the API sends it (`set_config`, `_START` of the onboarding repository, "
        "`_QUEUE` of the audit repository, prepared, as `firstmile_app` through row-level security), driven by "
        f"pgbench on {f.connections} connections for {f.duration} s with no application at all "
        "(`benchmarks/ceiling.py`). The relay's delete of the outbox row and the sequencer's move of the entry "
        "come on top of it in the real system, so no build of the API can do better than this on this machine.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| transactions/s | {c.tps:,.0f} ({c.transactions:,} committed, {c.failed:,} failed) |",
        f"| latency p50 / p95 | {c.p50_ms:.1f} ms / {c.p95_ms:.1f} ms |",
        f"| PostgreSQL CPU per transaction | {c.postgres_us:,.0f} µs (pgbench {c.pgbench_us:,.0f} µs) |",
        f"| starts/s if {cores:.0f} cores did nothing but PostgreSQL's share of a start | {pg_only:,.0f} |",
        f"| the start target, 25% of bare | {target:,.0f} req/s: {c.tps / target:.0%} of it is reached by "
        "PostgreSQL alone |",
        f"| transactions/s ÷ bare req/s | {c.tps / f.bare.rps if f.bare.rps else math.nan:.1%} |",
        "",
    ]


def _report(f: RunFacts) -> str:
    ratio = f.start.rps / f.bare.rps if f.bare.rps else math.nan
    complete_ratio = f.complete.rps / f.bare.rps if f.bare.rps else math.nan
    audit_ratio = f.start.rps / f.unaudited.rps if f.unaudited.rps else math.nan
    merge_p99 = f.merge.pct(99)
    rls, byp = f.rls.sides["firstmile_app (RLS)"], f.rls.sides[f"{BYPASS_ROLE} (BYPASSRLS)"]
    rls_p95, byp_p95 = _pct(rls.query_s, 95), _pct(byp.query_s, 95)
    rls_ratio = rls_p95 / byp_p95 if byp_p95 else math.nan
    m = f.machine
    out = [
        "## API benchmark",
        "",
        f"- Date: {f.started_at:%Y-%m-%d %H:%M} UTC (run took {f.elapsed_s:.0f} s)",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory']} RAM, {m['os']}, Python {m['python']}",
        f"- PostgreSQL: {f.pg.settings.get('server_version', '?')} on 127.0.0.1, same machine "
        f"(shared_buffers {f.pg.settings.get('shared_buffers', '?')}, fsync {f.pg.settings.get('fsync', '?')}, "
        f"synchronous_commit {f.pg.settings.get('synchronous_commit', '?')})",
        f"- Server: uvicorn, {f.workers} worker process(es), access log off, log level WARNING, "
        f"database pool {f.pool} per worker; {_versions()}",
        f"- Load: wrk, {f.threads} thread(s), {f.connections} connections, {f.warmup} s warm-up then "
        f"{f.duration} s measured per endpoint; client, server and PostgreSQL share the same cores",
        f"- Command: `{f.command}`",
        "",
        "### HTTP throughput and latency",
        "",
        "| endpoint | req/s | p50 ms | p95 ms | p99 ms | max ms | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        _row("bare Litestar `POST /v1/bare/start` (baseline)", f.bare),
        _row("`POST /v1/onboarding/start` (new user each)", f.start),
        _row(f"`POST /v1/onboarding/{{user}}/steps/{STEP}/complete`", f.complete),
        _row("`POST /v1/onboarding/start`, the same build without the audit append", f.unaudited),
        *(
            [
                _row(
                    "`POST /v1/onboarding/start`, production shape (Kafka; relay, consumers, sequencer apart)",
                    f.production.start,
                )
            ]
            if f.production
            else []
        ),
        "",
        "Errors are non-2xx responses plus socket errors and timeouts.",
        f"Users created by the measured start run (counted in the database): {f.started_in_db:,}. "
        f"The complete run drew on {f.complete_pool:,} started, not yet completed users"
        + (f" ({f.topped_up:,} of them started by an unmeasured top-up run)" if f.topped_up else "")
        + f"; first completions recorded in the database: {f.completed_in_db:,}; "
        f"repeated (idempotent) completions sent: {f.complete.repeats:,}.",
        "",
    ]
    for name, r in (("bare", f.bare), ("start", f.start), ("complete", f.complete), ("unaudited", f.unaudited)):
        if r.first_bad:
            out += [f"First non-2xx response of {name}: `{r.first_bad[:300]}`", ""]
    out += [
        "| ratio | value | target | |",
        "|---|---:|---:|---|",
        f"| start req/s ÷ bare req/s | {ratio:.1%} | ≥ 25% | {_verdict(ratio >= 0.25)} |",
        f"| start req/s ÷ start without the audit append (the two single runs above) | {audit_ratio:.1%} | ≥ 90% | "
        "see the pairs |",
        f"| start ÷ start without the audit append, median of {len(f.audit_pairs)} interleaved pairs, by throughput "
        f"| {_median([p.by_throughput for p in f.audit_pairs]):.1%} | ≥ 90% | "
        f"{_verdict(_median([p.by_throughput for p in f.audit_pairs]) >= 0.9)} |",
        f"| the same pairs by CPU (server + PostgreSQL µs per start, without ÷ with) "
        f"| {_median([p.by_cpu for p in f.audit_pairs]):.1%} | ≥ 90% | "
        f"{_verdict(_median([p.by_cpu for p in f.audit_pairs]) >= 0.9)} |",
        f"| maximum merge delay (p99 of the audited start run's decisions, {f.merge.sequenced:,} of "
        f"{f.merge.expected:,} sequenced) | {merge_p99 * 1000:.0f} ms (p50 {f.merge.pct(50) * 1000:.0f} ms, max "
        f"{f.merge.pct(100) * 1000:.0f} ms) | ≤ 1 s | "
        f"{_verdict(merge_p99 <= 1.0 and f.merge.sequenced >= f.merge.expected)} |",
        *(_production_rows(f) if f.production else ["| production shape | not run (no FIRSTMILE_BENCH_KAFKA) | | |"]),
        f"| complete req/s ÷ bare req/s | {complete_ratio:.1%} | — | |",
        f"| start p95 at {f.connections} connections | {f.start.p95_ms:.1f} ms | ≤ 25 ms | "
        f"{_verdict(f.start.p95_ms <= 25) if f.connections == 32 else '(target is for 32 connections)'} |",
        "",
        *_pairs_section(f),
        *_ceiling_section(f),
        "### Where the CPU went (during each measured run)",
        "",
        "Cores busy on average (whole machine, then by process tree: the uvicorn processes, the PostgreSQL "
        "server, wrk, anything else), CPU microseconds per request, and PostgreSQL sessions opened during the "
        "run (from `pg_stat_database.sessions`; a pool that is big enough opens none). The last column splits "
        "the server's cores by process: uvicorn's workers share one listening socket and wrk keeps its "
        "connections open, so how the connections were spread over the workers at the start stays for the run.",
        "",
        "| run | machine | server | PostgreSQL | wrk | other | server µs/req | PostgreSQL µs/req | new sessions "
        "| server cores by process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        _cpu_row("bare", f.cpu["bare"], f.bare),
        _cpu_row("start", f.cpu["start"], f.start),
        _cpu_row("complete", f.cpu["complete"], f.complete),
        _cpu_row("start without audit", f.cpu["start without audit"], f.unaudited),
        *([_cpu_row("start, production shape", f.production.cpu, f.production.start)] if f.production else []),
        "",
        "### Row-level security: the progress read",
        "",
        f"The query of `GET /v1/onboarding/{{user}}` and of complete (`_GET` in "
        f"`firstmile/onboarding/repository.py`), prepared, run {f.rls.iterations:,} times per role on "
        f"{f.rls.users:,} distinct existing users, interleaved in rounds of {RLS_ROUND}, each in its own "
        "transaction after `set_config('firstmile.tenant_id', …, true)`; asyncpg, one connection per role. "
        "Query = the statement's round trip; transaction = BEGIN, set_config, query, COMMIT.",
        "",
        "| role | query p50 µs | query p95 µs | query p99 µs | transaction p50 µs | transaction p95 µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side in (rls, byp):
        out.append(
            f"| {side.role} | {_pct(side.query_s, 50) * 1e6:.0f} | {_pct(side.query_s, 95) * 1e6:.0f} | "
            f"{_pct(side.query_s, 99) * 1e6:.0f} | {_pct(side.txn_s, 50) * 1e6:.0f} | "
            f"{_pct(side.txn_s, 95) * 1e6:.0f} |"
        )
    rls_p50_ratio = _pct(rls.query_s, 50) / _pct(byp.query_s, 50)
    out += [
        "",
        f"RLS ÷ BYPASSRLS: p50 {rls_p50_ratio:.2f}x, p95 {rls_ratio:.2f}x (target ≤ 1.2x on p95: "
        f"{_verdict(rls_ratio <= 1.2)}). Rows of `user_progress` visible without a tenant set: "
        + ", ".join(f"{k} {v:,}" for k, v in f.rls.visible_without_tenant.items())
        + ".",
        "",
    ]
    for side in (rls, byp):
        out += [
            "<details><summary>EXPLAIN ANALYZE as " + side.role + "</summary>",
            "",
            "```",
            side.explain,
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(out)


def _loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where /proc/loadavg cannot be read)."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        return (math.nan, math.nan, math.nan)


def _ratio(value: float, base: float) -> str:
    """``value ÷ base`` as ``1.23x``, or a dash when either is missing."""
    return f"{value / base:.2f}x" if base > 0 and math.isfinite(value) and math.isfinite(base) else "—"


def _wrk_metric(result: WrkResult, metric: str) -> float:
    """``req/s`` or a latency percentile (``p50``, ``p99`` …) of one wrk run, in ms."""
    return result.rps if metric == "req/s" else float(getattr(result, f"{metric}_ms"))


def _run_header(
    started_at: datetime,
    elapsed_s: float,
    machine: dict[str, str],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    pg: ServerInfo,
) -> list[str]:
    """The date, machine and PostgreSQL lines every benchmark report opens with."""
    m, lb, la = machine, load_before, load_after
    return [
        f"- Date: {started_at:%Y-%m-%d %H:%M} UTC (run took {elapsed_s:.0f} s)",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory']} RAM, {m['os']}, Python {m['python']}; "
        f"load average {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f} (1 / 5 / 15 min) before the run, "
        f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} after",
        f"- PostgreSQL: {pg.settings.get('server_version', '?')} on 127.0.0.1, same machine "
        f"(fsync {pg.settings.get('fsync', '?')}, synchronous_commit {pg.settings.get('synchronous_commit', '?')})",
    ]
