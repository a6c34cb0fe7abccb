"""``python -m benchmarks planner``: start latency with the path model vs the targeting rules.

What one run does (``make bench-planner`` starts the PostgreSQL and the Ray Serve it needs):

1. Recreates the database ``firstmile_bench`` on the server of
   ``FIRSTMILE_BENCH_ADMIN_URL``, migrates it and applies two tenants, each with an
   ``onboarding:write`` key: ``demo`` (``tenants/demo.yaml`` as is: the planner asks
   ``path_classifier`` first) and ``demo-rules`` (the same manifest without its
   ``planner`` section: the targeting rules alone decide; the baseline).
2. Serves the real API (``firstmile serve --workers 1``) with the model registry and
   no inference URL (the model runs in-process), then, when an inference URL is
   given, a second API process that asks Ray Serve over HTTP. On each server: one
   start per tenant checks the decision (``selected_by`` must be ``model`` for the
   model tenant: the in-process models load in the background, so it polls), a
   warm-up per tenant, then ``POST /v1/onboarding/start`` (a new user per request)
   at a low fixed concurrency (latency) and at saturation (throughput), rules then
   model at each level, so every model figure has a rules baseline from the same
   server process, minutes apart.
3. Reads back from the database the decision of every measured user
   (``user_progress.decision->>'selected_by'``, ``->>'fallback_reason'``,
   ``->>'latency_ms'``): how many were decided by the model and why the others were not.
4. Returns a markdown report (ratios against the rules); progress goes to stderr.

Nothing here runs in the API or in the tests. Loopback only.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import UNLIMITED, BenchError, _log, _secret, demo_manifest
from benchmarks.cpu import CpuUse, _measure
from benchmarks.database import ServerInfo, fresh_bench_database
from benchmarks.report import _cli, _loadavg, _machine, _ratio, _run_header, _versions, _wrk_metric
from benchmarks.servers import Server, _free_port, _http_json, _start_server, _stop_server
from benchmarks.wrk import WrkResult, _find_wrk, _new_users_script, _run_wrk

__all__ = ["DecisionStats", "PlannerRun", "run_planner_benchmark"]

MODEL_TENANT = "demo"
RULES_TENANT = "demo-rules"
MODEL_READY_S = 120.0
"""How long a server may take before its first start is decided by the model."""

IN_PROCESS = "in-process"
RAY_SERVE = "Ray Serve"
RULES = "rules"


@dataclass(frozen=True)
class DecisionStats:
    """The decisions recorded for the users of one measured run."""

    counts: dict[str, int]
    """``selected_by``, with ``(fallback_reason)`` when there is one → users."""
    inference_p50_ms: float | None = None
    inference_p95_ms: float | None = None
    """The planner's own timing of the model call (``decision.latency_ms``), over the users the model decided."""

    @property
    def users(self) -> int:
        return sum(self.counts.values())

    @property
    def by_model(self) -> int:
        return self.counts.get("model", 0)

    @property
    def fallbacks(self) -> int:
        return sum(n for label, n in self.counts.items() if "(" in label)


@dataclass(frozen=True)
class PlannerRun:
    """One measured wrk run of ``POST /v1/onboarding/start``."""

    server: str  # IN_PROCESS or RAY_SERVE: which API process
    planner: str  # RULES or "model"
    connections: int
    result: WrkResult
    cpu: CpuUse
    decisions: DecisionStats
    load1: float
    """1-minute load average at the end of the run."""
    round: int = 1

    @property
    def label(self) -> str:
        if self.planner == RULES:
            return f"rules (on the {self.server} server)"
        return "model in-process" if self.server == IN_PROCESS else "model via Ray Serve"


@dataclass(frozen=True)
class PlannerFacts:
    started_at: datetime
    elapsed_s: float
    duration: int
    warmup: int
    low: int
    high: int
    rounds: int
    threads: int
    machine: dict[str, str]
    pg: ServerInfo
    registry: str
    model_version: str
    inference_url: str | None
    inference_timeout_ms: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    command: str
    runs: list[PlannerRun] = field(default_factory=list)


def _label(selected_by: str | None, reason: str | None) -> str:
    name = selected_by or "unknown"
    return f"{name} ({reason})" if reason else name


def _shares(stats: DecisionStats) -> str:
    """``model 99.9%, rules (timeout) 0.1%``: largest first, ties by name."""
    total = stats.users
    if total == 0:
        return "no users recorded"
    parts = sorted(stats.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{label} {n / total:.1%}" if n * 1000 >= total else f"{label} {n:,}" for label, n in parts)


_DECISIONS = (
    "SELECT decision->>'selected_by', decision->>'fallback_reason', count(*) FROM user_progress "
    "WHERE tenant_id = $1 AND user_id LIKE $2 GROUP BY 1, 2"
)
_INFERENCE_MS = (
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY (decision->>'latency_ms')::float8), "
    "percentile_cont(0.95) WITHIN GROUP (ORDER BY (decision->>'latency_ms')::float8) "
    "FROM user_progress WHERE tenant_id = $1 AND user_id LIKE $2 AND decision->>'selected_by' = 'model'"
)


async def _read_decisions(dsn: str, tenant_id: uuid.UUID, prefix: str) -> DecisionStats:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_DECISIONS, tenant_id, prefix + "%")
        timing = await conn.fetchrow(_INFERENCE_MS, tenant_id, prefix + "%")
    finally:
        await conn.close()
    counts: dict[str, int] = {}
    for selected_by, reason, n in rows:
        label = _label(selected_by, reason)
        counts[label] = counts.get(label, 0) + int(n)
    p50, p95 = (timing[0], timing[1]) if timing is not None else (None, None)
    return DecisionStats(counts, float(p50) if p50 is not None else None, float(p95) if p95 is not None else None)


async def _provision(admin_url: str, pepper: bytes, manifests: dict[str, Path]) -> dict[str, tuple[str, uuid.UUID]]:
    """Apply each manifest and create an ``onboarding:write`` key for its tenant."""
    from firstmile.controlplane.service import apply_manifest
    from firstmile.kit.db import create_engine
    from firstmile.tenancy.cli import create_key
    from firstmile.tenancy.manifest import load_manifest

    engine = create_engine(admin_url, pool_size=1, max_overflow=0, application_name="firstmile-bench")
    out: dict[str, tuple[str, uuid.UUID]] = {}
    try:
        for slug, path in manifests.items():
            applied = await apply_manifest(engine, load_manifest(path))
            created = await create_key(engine, pepper, slug, ["onboarding:write"], "bench-planner")
            out[slug] = (created.key, applied.tenant_id)
    finally:
        await engine.dispose()
    return out


def _rules_manifest(demo: Path, directory: Path) -> Path:
    """``demo``'s manifest without its ``planner`` section, as tenant ``demo-rules``."""
    raw: dict[str, Any] = yaml.safe_load(demo.read_text(encoding="utf-8"))
    if not isinstance(raw.get("planner"), dict) or not raw["planner"].get("model"):
        raise BenchError(f"{demo} has no planner model: nothing to compare the rules with")
    raw.pop("planner")
    raw["tenant"] = {**raw["tenant"], "slug": RULES_TENANT, "name": f"{raw['tenant']['name']} (rules only)"}
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _start(server: Server, key: str, user: str) -> dict[str, Any]:
    status, body = _http_json(
        f"{server.base}/v1/onboarding/start", key, {"user_id": user, "traits": {"persona": "developer"}}
    )
    if status != 201:
        raise BenchError(f"start on the {server.name} answered {status}: {body}")
    decision = body.get("decision")
    if not isinstance(decision, dict):
        raise BenchError(f"start on the {server.name} returned no decision: {body}")
    return decision


def _wait_for_model(server: Server, key: str, tag: str) -> dict[str, Any]:
    """Start users until one is decided by the model; the decision, or BenchError after MODEL_READY_S."""
    deadline = time.monotonic() + MODEL_READY_S
    for attempt in range(1, 100_000):
        decision = _start(server, key, f"check-{tag}-{attempt}")
        if decision.get("selected_by") == "model":
            _log(f"{server.name}: the model decided start #{attempt} ({decision.get('planner')})")
            return decision
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise BenchError(
        f"{server.name}: no start was decided by the model within {MODEL_READY_S:.0f}s; last decision: "
        f"selected_by={decision.get('selected_by')} fallback_reason={decision.get('fallback_reason')} "
        f"error={decision.get('error')}\n{server.log_tail()}"
    )


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s

    def need(self, seconds: float, what: str) -> None:
        if time.monotonic() + seconds > self.deadline:
            raise BenchError(f"out of time ({self.budget_s:.0f}s, --timeout) before {what}")


def _command(duration: int, low: int, high: int, rounds: int, registry: str, inference_url: str | None) -> str:
    options = f"--duration {duration} --low {low} --high {high} --rounds {rounds} --registry {registry}"
    if inference_url:
        options += f" --inference-url {inference_url}"
    cli = _cli("planner", options)
    if os.environ.get("MAKELEVEL"):
        return f"make bench-planner   # runs: FIRSTMILE_BENCH_ADMIN_URL=… {cli}"
    return f"FIRSTMILE_BENCH_ADMIN_URL=… {cli}"


def run_planner_benchmark(
    *,
    registry: str,
    inference_url: str | None,
    duration: int = 10,
    low: int = 4,
    high: int = 32,
    rounds: int = 2,
    timeout: float = 900.0,
) -> str:
    """Run the whole benchmark against ``FIRSTMILE_BENCH_ADMIN_URL``; return the markdown report."""
    if duration < 1 or low < 1 or high < low or rounds < 1:
        raise BenchError("duration, rounds and connections must be at least 1, and --high at least --low")
    admin = os.environ.get("FIRSTMILE_BENCH_ADMIN_URL")
    if not admin:
        raise BenchError(
            "set FIRSTMILE_BENCH_ADMIN_URL to a PostgreSQL superuser URL, or run `make bench-planner`, which "
            "starts a local durable PostgreSQL (deploy/local/postgres.sh start bench) and Ray Serve"
        )
    registry_path = Path(registry.removeprefix("file://")).resolve()
    if not (registry_path / "path_classifier" / "stages.json").exists():
        raise BenchError(
            f"no path_classifier in the registry {registry_path}: train one with "
            f"`firstmile models train --registry {registry_path} --promote production`"
        )
    registry_uri = registry_path.as_uri()
    clock = _Clock(timeout)
    began, started_at, load_before = time.monotonic(), datetime.now(UTC), _loadavg()
    wrk = _find_wrk()
    machine = _machine()
    threads = max(1, min(low, int(machine["cores"]) // 2))
    warmup = max(2, min(5, duration // 3))
    demo = demo_manifest()

    _log(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {machine['cores']} cores")
    db = fresh_bench_database(admin)
    bench_admin_url, bench_admin_dsn, app_url = db.admin_url, db.admin_dsn, db.app_url
    pg, postmaster = db.server, db.postmaster
    pepper = secrets.token_hex(32)
    runs: list[PlannerRun] = []
    model_version = "?"
    timeout_ms = os.environ.get("FIRSTMILE_INFERENCE_TIMEOUT_MS", "100 (default)")
    with tempfile.TemporaryDirectory(prefix="firstmile-bench-planner-") as tmp_name:
        tmp = Path(tmp_name)
        _log(f"applying {demo.name} as {MODEL_TENANT} (planner: path_classifier) and as {RULES_TENANT} (rules)")
        tenants = asyncio.run(
            _provision(
                bench_admin_url,
                pepper.encode(),
                {MODEL_TENANT: demo, RULES_TENANT: _rules_manifest(demo, tmp)},
            )
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        if "FIRSTMILE_INFERENCE_TIMEOUT_MS" in os.environ:
            env["FIRSTMILE_INFERENCE_TIMEOUT_MS"] = os.environ["FIRSTMILE_INFERENCE_TIMEOUT_MS"]
        env |= UNLIMITED
        base_env = env | {
            "FIRSTMILE_DATABASE_URL": app_url,
            "FIRSTMILE_DATABASE_ADMIN_URL": bench_admin_url,
            "FIRSTMILE_API_KEY_PEPPER": pepper,
            "FIRSTMILE_REGION": "eu-west-1",
            "FIRSTMILE_LOG_LEVEL": "WARNING",
            "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": str(_secret(tmp / "audit_signing_key")),
            "FIRSTMILE_KEK_FILE": str(_secret(tmp / "kek")),
            "FIRSTMILE_MODEL_REGISTRY_URI": registry_uri,
            # the stuck scan would ask the stuck model in the background during the measurement
            "FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS": "0",
        }
        servers: list[tuple[str, dict[str, str]]] = [(IN_PROCESS, {})]
        if inference_url:
            servers.append((RAY_SERVE, {"FIRSTMILE_INFERENCE_URL": inference_url}))
        else:
            _log("no --inference-url: the Ray Serve scenario is skipped")
        for kind, extra in servers:
            tag = "ip" if kind == IN_PROCESS else "rs"
            port = _free_port()
            app_env = base_env | extra | {"FIRSTMILE_PORT": str(port), "FIRSTMILE_DATA_DIR": str(tmp / f"data-{tag}")}
            argv = [sys.executable, "-m", "firstmile.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--workers", "1"]
            clock.need(MODEL_READY_S + 2 * warmup + 4 * rounds * duration, f"the {kind} server")
            server = _start_server(f"API ({kind} model)", argv, app_env, port, tmp / f"api-{tag}.log")
            try:
                rules_key, rules_tenant = tenants[RULES_TENANT]
                model_key, model_tenant = tenants[MODEL_TENANT]
                checked = _start(server, rules_key, f"check-{tag}-rules")
                if checked.get("selected_by") != "rules" or checked.get("model") is not None:
                    raise BenchError(f"{RULES_TENANT} was not decided by the rules alone: {checked}")
                decision = _wait_for_model(server, model_key, tag)
                model_version = str(decision.get("model_version", model_version))
                plan = ((RULES, rules_key, rules_tenant), ("model", model_key, model_tenant))
                for planner, key, _ in plan:
                    script = _new_users_script(tmp, f"{tag}-{planner}-warmup", key, "/v1/onboarding/start", f"w{tag}-")
                    _log(f"{kind} server: warming up {planner} ({warmup}s, {high} connections)")
                    _run_wrk(wrk, script, server.base, threads, high, warmup)
                levels = [(n, c, p) for n in range(1, rounds + 1) for c in (low, high) for p in plan]
                for round_, connections, (planner, key, tenant_id) in levels:
                    what = f"measuring {planner} at {connections} connections"
                    if planner == RULES:
                        clock.need(duration + 30, what)
                    else:  # a saturated run may have left the breaker open (30 s): measure the model, not its fallback
                        clock.need(MODEL_READY_S + duration + 30, what)
                        _wait_for_model(server, key, f"{tag}-{connections}-{round_}")
                    prefix = f"{tag}-{planner[0]}{connections}-{round_}-"
                    script = _new_users_script(tmp, prefix.rstrip("-"), key, "/v1/onboarding/start", prefix)
                    _log(f"{kind} server: {what} ({duration}s, round {round_}/{rounds})")
                    result, cpu = _measure(
                        wrk, script, server, threads, connections, duration, db=bench_admin_dsn, postmaster=postmaster
                    )
                    stats = asyncio.run(_read_decisions(bench_admin_dsn, tenant_id, prefix))
                    run = PlannerRun(kind, planner, connections, result, cpu, stats, _loadavg()[0], round_)
                    _log(
                        f"  {result.rps:,.0f} req/s, p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms, "
                        f"p99 {result.p99_ms:.1f} ms, errors {result.errors}; {_shares(stats)}; load {run.load1:.2f}"
                    )
                    runs.append(run)
            finally:
                _stop_server(server)
    _log("done")
    return _report(
        PlannerFacts(
            started_at=started_at,
            elapsed_s=time.monotonic() - began,
            duration=duration,
            warmup=warmup,
            low=low,
            high=high,
            rounds=rounds,
            threads=threads,
            machine=machine,
            pg=pg,
            registry=registry_uri,
            model_version=model_version,
            inference_url=inference_url,
            inference_timeout_ms=timeout_ms,
            load_before=load_before,
            load_after=_loadavg(),
            command=_command(duration, low, high, rounds, registry, inference_url),
            runs=runs,
        )
    )


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "—"


def _find(runs: list[PlannerRun], server: str, planner: str, connections: int) -> list[PlannerRun]:
    return [r for r in runs if r.server == server and r.planner == planner and r.connections == connections]


SHARE_FLOOR = 0.9
"""Below this share of decisions by the model, a "model" run mostly measured its fallback."""


def _report(f: PlannerFacts) -> str:
    out = [
        "## Path planner: start latency with the model vs the rules",
        "",
        *_run_header(f.started_at, f.elapsed_s, f.machine, f.load_before, f.load_after, f.pg),
        f"- Server: `firstmile serve --workers 1` (uvicorn), log level WARNING, stuck scan off; {_versions()}",
        f"- Model: path_classifier {f.model_version} (production) from `{f.registry}`; "
        f"inference timeout {f.inference_timeout_ms} ms"
        + (f"; Ray Serve at {f.inference_url}" if f.inference_url else "; Ray Serve not measured (no --inference-url)"),
        f"- Load: wrk, {f.threads} thread(s), `POST /v1/onboarding/start` with a new user each request "
        f'(`{{"persona": "developer"}}`), {f.warmup} s warm-up per tenant and server, then {f.duration} s per run '
        f"at {f.low} connections (latency) and {f.high} (saturation); rules then model at each level; "
        "client, server, PostgreSQL and Ray share the same cores",
        f"- Command: `{f.command}`",
        "",
        "### Runs",
        "",
        "| planner | connections | round | req/s | p50 ms | p95 ms | p99 ms | max ms | errors | decided by (database) "
        "| model call p50 / p95 ms | server µs/req | machine cores busy | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in f.runs:
        w = r.result
        per = 1e6 / max(1, w.requests)
        call = (
            f"{_ms(r.decisions.inference_p50_ms)} / {_ms(r.decisions.inference_p95_ms)}"
            if r.decisions.inference_p50_ms is not None
            else "—"
        )
        out.append(
            f"| {r.label} | {r.connections} | {r.round} | {w.rps:,.0f} | {w.p50_ms:.2f} | {w.p95_ms:.2f} "
            f"| {w.p99_ms:.2f} | {w.max_ms:.1f} | {w.errors} "
            f"| {_shares(r.decisions)} ({r.decisions.users:,} users) | {call} "
            f"| {r.cpu.server_s * per:.0f} | {r.cpu.busy_s / max(r.cpu.wall_s, 1e-9):.2f} | {r.load1:.2f} |"
        )
    out += [
        "",
        "Decided by: every measured user's `user_progress.decision` (`selected_by`, with `fallback_reason` when "
        "the model was asked and not used). Model call: the planner's own timing of the inference call "
        "(`decision.latency_ms`). Server µs/req: CPU of the API process per request (Ray's processes are not "
        "in it). Errors: non-2xx responses plus socket errors and timeouts.",
        "",
        "### Ratios against the rules on the same server",
        "",
        f"Medians over the {f.rounds} round(s) of each metric; model share and fallbacks over all the model's "
        f"measured users at that level. A row whose model share is under {SHARE_FLOOR:.0%} measured mostly the "
        "fallback (the rules), not the model: it is marked and is no figure for the model.",
        "",
        "| model | metric | rules | model | model ÷ rules | model share | fallbacks |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for server in (IN_PROCESS, RAY_SERVE):
        for connections, metrics in ((f.low, ("p50", "p95", "p99")), (f.high, ("req/s", "p95"))):
            base, model = _find(f.runs, server, RULES, connections), _find(f.runs, server, "model", connections)
            if not base or not model:
                continue
            users = sum(r.decisions.users for r in model)
            share = sum(r.decisions.by_model for r in model) / max(1, users)
            fallbacks = sum(r.decisions.fallbacks for r in model) / max(1, users)
            flag = "" if share >= SHARE_FLOOR else " ⚠ mostly fallbacks"
            for metric in metrics:
                b = statistics.median(_wrk_metric(r.result, metric) for r in base)
                v = statistics.median(_wrk_metric(r.result, metric) for r in model)
                unit = "" if metric == "req/s" else " ms"
                out.append(
                    f"| {model[0].label}{flag} | {metric} at {connections} connections | {b:,.2f}{unit} "
                    f"| {v:,.2f}{unit} | {_ratio(v, b)} | {share:.1%} | {fallbacks:.1%} |"
                )
    for r in f.runs:
        if r.result.first_bad:
            out += ["", f"First non-2xx response of {r.label} at {r.connections} connections: `{r.result.first_bad}`"]
    out.append("")
    return "\n".join(out)
