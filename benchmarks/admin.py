"""``python -m benchmarks admin``: what the admin UI's session authentication costs a request.

What one run does (``make bench-admin`` starts the PostgreSQL and the Redis it needs):

1. Recreates the database ``firstmile_bench`` on the server of
   ``FIRSTMILE_BENCH_ADMIN_URL``, migrates it, applies ``tenants/demo.yaml`` and creates
   an ``onboarding:write`` key for ``demo``, as an operator would.
2. Serves the real API (``firstmile serve --workers 1``) twice, side by side on loopback,
   on the same database: one process with admin sessions in-process (no Redis URL), one with
   ``FIRSTMILE_REDIS_URL`` = ``FIRSTMILE_BENCH_REDIS`` (sessions in Redis). Without
   ``FIRSTMILE_BENCH_REDIS`` only the in-process server runs.
3. On each server: one user is started, a bootstrap token (signed with the key derived
   from the server's pepper) is redeemed at ``POST /admin/bootstrap/redeem`` for a
   ``viewer`` session, every endpoint is checked once, then wrk drives, at a few
   connections for a fixed time, ``GET /v1/onboarding/{user}`` with the API key (the
   baseline), ``GET /admin/api/me`` and ``GET /admin/api/paths`` with the session cookie.
   Rounds interleave the servers and the endpoints, so every figure has its baseline from the
   same process, measured minutes apart at most.
4. Times the steps of those requests alone, in this process, one at a time: the API key
   check on a cache hit, a session load from each store, and the database work of each
   handler (one tenant transaction each).
5. Returns a markdown report (ratios against the baseline); progress goes to stderr.

Nothing here runs in the API or in the tests. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import MARKER, MARKER_BAD, TENANT, BenchError, _log, _secret, bench_tenant, demo_manifest
from benchmarks.cpu import CpuUse, _measure
from benchmarks.database import ServerInfo, fresh_bench_database
from benchmarks.planner import _provision
from benchmarks.report import _cli, _loadavg, _machine, _ratio, _run_header, _versions, _wrk_metric
from benchmarks.servers import Server, _free_port, _http_json, _start_server, _stop_server
from benchmarks.wrk import _LUA_COMMON, WrkResult, _find_wrk, _lua_str, _run_wrk

__all__ = ["AdminFacts", "AdminRun", "StepTiming", "run_admin_benchmark", "session_cookie"]

IN_PROCESS = "in-process"
REDIS = "Redis"
BASELINE = "baseline"
ME = "me"
PATHS = "paths"
ENDPOINTS = (BASELINE, ME, PATHS)
ROLE = "viewer"  # the least role that may read paths: what the guard checks is the same for every role
BENCH_USER = "bench-admin-user"
STEP_SAMPLES = 2000
DB_STEP_SAMPLES = 500


def endpoint_label(endpoint: str) -> str:
    return {
        BASELINE: f"`GET /v1/onboarding/{BENCH_USER}`, API key (baseline)",
        ME: "`GET /admin/api/me`, session cookie",
        PATHS: "`GET /admin/api/paths`, session cookie",
    }[endpoint]


@dataclass(frozen=True)
class AdminRun:
    """One measured wrk run of one endpoint on one server."""

    store: str  # IN_PROCESS or REDIS: where this server keeps admin sessions
    endpoint: str  # BASELINE, ME or PATHS
    round: int
    result: WrkResult
    cpu: CpuUse
    load1: float


@dataclass(frozen=True)
class StepTiming:
    """One step of a request, timed alone in the benchmark process (seconds per call)."""

    name: str
    samples: tuple[float, ...]

    def percentile_us(self, p: float) -> float:
        ordered = sorted(self.samples)
        if not ordered:
            return math.nan
        rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[rank] * 1e6


@dataclass(frozen=True)
class AdminFacts:
    started_at: datetime
    elapsed_s: float
    duration: int
    warmup: int
    connections: int
    rounds: int
    threads: int
    machine: dict[str, str]
    pg: ServerInfo
    redis: str | None
    """The Redis server's version, or None when the Redis server was not measured."""
    paths: int
    """How many current paths ``/admin/api/paths`` returns."""
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    command: str
    runs: list[AdminRun] = field(default_factory=list)
    steps: list[StepTiming] = field(default_factory=list)


# ---------------------------------------------------------------- parsing


def session_cookie(set_cookies: Iterable[str]) -> tuple[str, str]:
    """(name, value) of the admin session cookie among ``Set-Cookie`` header values; BenchError if none."""
    for header in set_cookies:
        pair = header.split(";", 1)[0].strip()
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip().strip('"')
        if sep and name.endswith("fm_admin") and value:
            return name, value
    raise BenchError("the bootstrap redeem set no admin session cookie")


# ---------------------------------------------------------------- HTTP


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _redeem(server: Server, token: str) -> tuple[str, str]:
    """POST the bootstrap token; the session cookie of the 303."""
    data = urllib.parse.urlencode({"token": token}).encode()
    request = urllib.request.Request(f"{server.base}/admin/bootstrap/redeem", data=data, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as resp:
            status, headers, body = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    if status != 303:
        raise BenchError(f"bootstrap redeem on {server.name} answered {status}: {body[:500]!r}")
    return session_cookie(headers.get_all("Set-Cookie") or [])


def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, method="GET", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")[:500]


_LUA_GET = """
local get_headers = {{{headers}}}
function request()
  return wrk.format("GET", {path}, get_headers)
end
"""


def _get_script(directory: Path, name: str, path: str, headers: dict[str, str]) -> Path:
    """A wrk script sending ``GET path`` with ``headers`` on every request (results as the other scripts)."""
    common = _LUA_COMMON.format(what=name, auth=_lua_str(""), marker=MARKER, marker_bad=MARKER_BAD)
    table = ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items())
    script = directory / f"{name}.lua"
    script.write_text(common + _LUA_GET.format(headers=table, path=_lua_str(path)), encoding="utf-8")
    return script


# ---------------------------------------------------------------- the steps alone


async def _time(n: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, ...]:
    for _ in range(min(50, n)):  # warm caches and prepared statements first
        await call()
    out: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        out.append(time.perf_counter() - began)
    return tuple(out)


async def _time_steps(
    app_url: str, pepper: bytes, key: str, tenant_id: uuid.UUID, redis_url: str | None
) -> list[StepTiming]:
    from firstmile.admin.paths import PathEditor
    from firstmile.admin.sessions import AdminSession, MemorySessionStore, RedisSessionStore, SessionStore
    from firstmile.auth.resolver import KeyResolver
    from firstmile.kit.db import create_engine
    from firstmile.kit.uow import UnitOfWork
    from firstmile.onboarding.catalog import CatalogCache
    from firstmile.onboarding.service import OnboardingService

    engine = create_engine(app_url, pool_size=1, max_overflow=0, application_name="firstmile-bench")
    uow = UnitOfWork(engine, bench_tenant(tenant_id))
    editor = PathEditor()
    now = time.time()
    session = AdminSession(
        tenant_id=str(tenant_id),
        tenant_slug=TENANT,
        subject=f"bootstrap-{ROLE}",
        name=f"Local {ROLE}",
        email="",
        roles=(ROLE,),
        origin="bootstrap",
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + 3600,
    )
    steps: list[StepTiming] = []
    try:
        resolver = KeyResolver(engine, pepper, "eu-west-1", ttl=300.0)
        authorization = f"Bearer {key}"
        steps.append(
            StepTiming(
                "API key check, cache hit (HMAC of the key, dict lookup)",
                await _time(STEP_SAMPLES, lambda: resolver.principal(authorization)),
            )
        )
        stores: list[tuple[str, SessionStore]] = [(IN_PROCESS, MemorySessionStore())]
        if redis_url:
            stores.append((REDIS, RedisSessionStore.from_url(redis_url)))
        for name, store in stores:
            session_id = secrets.token_urlsafe(32)
            await store.save(session_id, session, 1800)
            try:

                async def load(store: SessionStore = store, session_id: str = session_id, name: str = name) -> None:
                    if await store.load(session_id, 1800) is None:
                        raise BenchError(f"the {name} store lost the session")

                what = "SHA-256 of the id, dict" if name == IN_PROCESS else "SHA-256 of the id, GETEX, JSON decode"
                steps.append(StepTiming(f"session load, {name} ({what})", await _time(STEP_SAMPLES, load)))
            finally:
                await store.delete(session_id)
                await store.close()
        service = OnboardingService(CatalogCache())
        steps.append(
            StepTiming(
                "baseline's database work: progress read + cached path version (one tenant transaction)",
                await _time(
                    DB_STEP_SAMPLES,
                    lambda: uow.run(lambda tx: service.get(tx, BENCH_USER)),
                ),
            )
        )
        steps.append(
            StepTiming(
                "`/me`'s database work: the tenant's name (one tenant transaction)",
                await _time(DB_STEP_SAMPLES, lambda: uow.run(editor.tenant_name)),
            )
        )
        steps.append(
            StepTiming(
                "`/paths`'s database work: current path definitions, summarised (one tenant transaction)",
                await _time(DB_STEP_SAMPLES, lambda: uow.run(editor.list_paths)),
            )
        )
    finally:
        await engine.dispose()
    return steps


async def _redis_version(url: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        info: dict[str, Any] = await client.info("server")
        return str(info.get("redis_version", "?"))
    finally:
        await client.aclose()


# ---------------------------------------------------------------- the run


def _command(duration: int, connections: int, rounds: int) -> str:
    cli = _cli("admin", f"--duration {duration} --connections {connections} --rounds {rounds}")
    if os.environ.get("MAKELEVEL"):
        return f"make bench-admin   # runs: FIRSTMILE_BENCH_ADMIN_URL=… FIRSTMILE_BENCH_REDIS=… {cli}"
    return f"FIRSTMILE_BENCH_ADMIN_URL=… FIRSTMILE_BENCH_REDIS=… {cli}"


@dataclass
class _Target:
    store: str
    server: Server
    scripts: dict[str, Path]


def _prepare(server: Server, store: str, key: str, pepper: bytes, tmp: Path) -> tuple[_Target, int]:
    """Start the bench user, open a session, check every endpoint once; the wrk scripts and the path count."""
    from firstmile.admin.service import bootstrap_key, mint_bootstrap_token

    status, body = _http_json(
        f"{server.base}/v1/onboarding/start", key, {"user_id": BENCH_USER, "traits": {"persona": "developer"}}
    )
    if status not in (200, 201):
        raise BenchError(f"start on {server.name} answered {status}: {body}")
    token = mint_bootstrap_token(bootstrap_key(pepper), TENANT, ROLE, 900)
    name, value = _redeem(server, token)
    cookie = {"Cookie": f"{name}={value}"}
    api_key = {"Authorization": f"Bearer {key}"}
    plan = {
        BASELINE: (f"/v1/onboarding/{BENCH_USER}", api_key),
        ME: ("/admin/api/me", cookie),
        PATHS: ("/admin/api/paths", cookie),
    }
    paths = 0
    for endpoint, (path, headers) in plan.items():
        status, answer = _get(server.base + path, headers)
        if status != 200:
            raise BenchError(f"{path} on {server.name} answered {status}: {answer}")
        if endpoint == ME and (answer.get("tenant", {}).get("slug") != TENANT or answer.get("roles") != [ROLE]):
            raise BenchError(f"/admin/api/me on {server.name} is not the {ROLE} of {TENANT}: {answer}")
        if endpoint == PATHS:
            paths = len(answer)
    # a request without the cookie must be refused, or the session path is not what is measured
    status, _ = _get(server.base + "/admin/api/paths", {})
    if status != 401:
        raise BenchError(f"/admin/api/paths without a session answered {status} on {server.name}, not 401")
    tag = "ip" if store == IN_PROCESS else "rd"
    scripts = {e: _get_script(tmp, f"{tag}-{e}", path, headers) for e, (path, headers) in plan.items()}
    return _Target(store, server, scripts), paths


def run_admin_benchmark(*, duration: int = 10, connections: int = 4, rounds: int = 3) -> str:
    """Run the whole benchmark against ``FIRSTMILE_BENCH_ADMIN_URL`` (and ``FIRSTMILE_BENCH_REDIS``); the report."""
    if duration < 1 or connections < 1 or rounds < 1:
        raise BenchError("duration, connections and rounds must be at least 1")
    admin = os.environ.get("FIRSTMILE_BENCH_ADMIN_URL")
    if not admin:
        raise BenchError(
            "set FIRSTMILE_BENCH_ADMIN_URL to a PostgreSQL superuser URL, or run `make bench-admin`, which starts "
            "a local durable PostgreSQL (deploy/local/postgres.sh start bench) and Redis (deploy/local/redis.sh)"
        )
    redis_url = os.environ.get("FIRSTMILE_BENCH_REDIS") or None
    if redis_url is None:
        _log("FIRSTMILE_BENCH_REDIS is not set: only the in-process session store is measured")
    began, started_at, load_before = time.monotonic(), datetime.now(UTC), _loadavg()
    wrk = _find_wrk()
    machine = _machine()
    threads = max(1, min(connections, int(machine["cores"]) // 2))
    warmup = max(2, min(5, duration // 3))
    demo = demo_manifest()

    redis_version = asyncio.run(_redis_version(redis_url)) if redis_url else None
    _log(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {machine['cores']} cores")
    db = fresh_bench_database(admin)
    bench_admin_url, bench_admin_dsn, app_url = db.admin_url, db.admin_dsn, db.app_url
    pg, postmaster = db.server, db.postmaster
    pepper = secrets.token_hex(32)
    runs: list[AdminRun] = []
    paths = 0
    with tempfile.TemporaryDirectory(prefix="firstmile-bench-admin-") as tmp_name:
        tmp = Path(tmp_name)
        _log(f"applying {demo.name} as {TENANT} with an onboarding:write key")
        key, tenant_id = asyncio.run(_provision(bench_admin_url, pepper.encode(), {TENANT: demo}))[TENANT]
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        base_env = env | {
            "FIRSTMILE_DATABASE_URL": app_url,
            "FIRSTMILE_DATABASE_ADMIN_URL": bench_admin_url,
            "FIRSTMILE_API_KEY_PEPPER": pepper,
            "FIRSTMILE_REGION": "eu-west-1",
            "FIRSTMILE_LOG_LEVEL": "WARNING",
            "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": str(_secret(tmp / "audit_signing_key")),
            "FIRSTMILE_KEK_FILE": str(_secret(tmp / "kek")),
            "FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS": "0",
        }
        variants: list[tuple[str, dict[str, str]]] = [(IN_PROCESS, {})]
        if redis_url:
            variants.append((REDIS, {"FIRSTMILE_REDIS_URL": redis_url}))
        servers: list[Server] = []
        try:
            targets: list[_Target] = []
            for store, extra in variants:
                tag = "ip" if store == IN_PROCESS else "rd"
                port = _free_port()
                app_env = base_env | extra | {"FIRSTMILE_PORT": str(port), "FIRSTMILE_DATA_DIR": str(tmp / f"d-{tag}")}
                argv = [sys.executable, "-m", "firstmile.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
                argv += ["--workers", "1"]
                server = _start_server(f"API (sessions {store})", argv, app_env, port, tmp / f"api-{tag}.log")
                servers.append(server)
                target, paths = _prepare(server, store, key, pepper.encode(), tmp)
                targets.append(target)
            for target in targets:
                for endpoint in ENDPOINTS:
                    _log(f"{target.server.name}: warming up {endpoint} ({warmup}s, {connections} connections)")
                    _run_wrk(wrk, target.scripts[endpoint], target.server.base, threads, connections, warmup)
            for round_ in range(1, rounds + 1):
                for target in targets if round_ % 2 else reversed(targets):
                    for endpoint in ENDPOINTS:
                        _log(f"{target.server.name}: measuring {endpoint} ({duration}s, round {round_}/{rounds})")
                        result, cpu = _measure(
                            wrk,
                            target.scripts[endpoint],
                            target.server,
                            threads,
                            connections,
                            duration,
                            db=bench_admin_dsn,
                            postmaster=postmaster,
                        )
                        run = AdminRun(target.store, endpoint, round_, result, cpu, _loadavg()[0])
                        _log(
                            f"  {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                            f"errors {result.errors}; load {run.load1:.2f}"
                        )
                        runs.append(run)
        finally:
            for server in servers:
                _stop_server(server)
    _log("timing the steps alone")
    steps = asyncio.run(_time_steps(app_url, pepper.encode(), key, tenant_id, redis_url))
    _log("done")
    return _report(
        AdminFacts(
            started_at=started_at,
            elapsed_s=time.monotonic() - began,
            duration=duration,
            warmup=warmup,
            connections=connections,
            rounds=rounds,
            threads=threads,
            machine=machine,
            pg=pg,
            redis=redis_version,
            paths=paths,
            load_before=load_before,
            load_after=_loadavg(),
            command=_command(duration, connections, rounds),
            runs=runs,
            steps=steps,
        )
    )


# ---------------------------------------------------------------- the report


def _find(runs: Sequence[AdminRun], store: str, endpoint: str) -> list[AdminRun]:
    return [r for r in runs if r.store == store and r.endpoint == endpoint]


METRICS = ("req/s", "p50", "p99")


def _median(runs: Sequence[AdminRun], metric: str) -> float:
    return statistics.median(_wrk_metric(r.result, metric) for r in runs) if runs else math.nan


def _fmt(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if metric == "req/s" else f"{value:.2f} ms"


def _server_us(runs: Sequence[AdminRun]) -> float:
    """Median CPU microseconds of the API process per request."""
    return statistics.median(r.cpu.server_s * 1e6 / max(1, r.result.requests) for r in runs) if runs else math.nan


def _report(f: AdminFacts) -> str:
    stores = [IN_PROCESS] + ([REDIS] if f.redis is not None else [])
    redis = f"{f.redis} on 127.0.0.1, same machine" if f.redis else "not measured (no FIRSTMILE_BENCH_REDIS)"
    out = [
        "## Admin UI: session authentication vs the API key",
        "",
        *_run_header(f.started_at, f.elapsed_s, f.machine, f.load_before, f.load_after, f.pg),
        f"- Redis: {redis}",
        "- Servers: `firstmile serve --workers 1` (uvicorn), one with sessions in-process"
        + (" and one with `FIRSTMILE_REDIS_URL` (sessions in Redis), both up for the whole run" if f.redis else "")
        + f", log level WARNING, stuck scan off, tenant `{TENANT}` (`tenants/demo.yaml`, {f.paths} current paths), "
        f"a `{ROLE}` session opened by a bootstrap token; {_versions()}",
        f"- Load: wrk, {f.threads} thread(s), {f.connections} connections, {f.warmup} s warm-up per endpoint and "
        f"server, then {f.duration} s per run, {f.rounds} round(s) of every endpoint on every server, interleaved; "
        "wrk, the API servers, PostgreSQL and Redis share the same cores",
        f"- Command: `{f.command}`",
        "",
        "### Runs",
        "",
        "| sessions | endpoint | round | req/s | p50 ms | p95 ms | p99 ms | max ms | errors | server µs/req "
        "| PostgreSQL µs/req | other µs/req (Redis in it) | machine cores busy | load (1 min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in f.runs:
        w, c = r.result, r.cpu
        per = 1e6 / max(1, w.requests)
        out.append(
            f"| {r.store} | {endpoint_label(r.endpoint)} | {r.round} | {w.rps:,.0f} | {w.p50_ms:.2f} | {w.p95_ms:.2f} "
            f"| {w.p99_ms:.2f} | {w.max_ms:.1f} | {w.errors} | {c.server_s * per:.0f} | {c.postgres_s * per:.0f} "
            f"| {c.other_s * per:.0f} | {c.busy_s / max(c.wall_s, 1e-9):.2f} | {r.load1:.2f} |"
        )
    out += [
        "",
        "Server µs/req: CPU of the API process per request; other: CPU of everything but the API, PostgreSQL and "
        "wrk (the Redis server, the idle second API process, the rest of the machine). Errors: non-2xx responses "
        "plus socket errors and timeouts.",
        "",
        "### Ratios against the baseline on the same server",
        "",
        f"Medians over the {f.rounds} round(s). The baseline is `GET /v1/onboarding/{{user}}` with the API key, "
        "measured on the same server process as the session rows.",
        "",
        "| sessions | endpoint | metric | baseline | endpoint's | ÷ baseline |",
        "|---|---|---|---:|---:|---:|",
    ]
    for store in stores:
        base = _find(f.runs, store, BASELINE)
        for endpoint in (ME, PATHS):
            runs = _find(f.runs, store, endpoint)
            if not base or not runs:
                continue
            for metric in METRICS:
                b, v = _median(base, metric), _median(runs, metric)
                out.append(
                    f"| {store} | {endpoint_label(endpoint)} | {metric} | {_fmt(b, metric)} | {_fmt(v, metric)} "
                    f"| {_ratio(v, b)} |"
                )
            b_us, v_us = _server_us(base), _server_us(runs)
            out.append(
                f"| {store} | {endpoint_label(endpoint)} | server CPU per request | {b_us:,.0f} µs | {v_us:,.0f} µs "
                f"| {_ratio(v_us, b_us)} |"
            )
    if f.redis is not None:
        out += [
            "",
            "### Redis ÷ in-process",
            "",
            "Medians over the rounds, each server's own figures. The baseline row does not touch the session "
            "store: its ratio is the difference between the two server processes (and the noise), the yardstick "
            "for the others.",
            "",
            "| endpoint | metric | in-process | Redis | Redis ÷ in-process |",
            "|---|---|---:|---:|---:|",
        ]
        for endpoint in ENDPOINTS:
            mem, red = _find(f.runs, IN_PROCESS, endpoint), _find(f.runs, REDIS, endpoint)
            if not mem or not red:
                continue
            for metric in METRICS:
                a, b = _median(mem, metric), _median(red, metric)
                out.append(
                    f"| {endpoint_label(endpoint)} | {metric} | {_fmt(a, metric)} | {_fmt(b, metric)} "
                    f"| {_ratio(b, a)} |"
                )
            a_us, b_us = _server_us(mem), _server_us(red)
            out.append(
                f"| {endpoint_label(endpoint)} | server CPU per request | {a_us:,.0f} µs | {b_us:,.0f} µs "
                f"| {_ratio(b_us, a_us)} |"
            )
    if f.steps:
        out += [
            "",
            "### The steps alone",
            "",
            "Each step called one at a time in the benchmark process (asyncio, one PostgreSQL connection, one "
            "Redis connection), after the runs above, with the servers stopped: what a request pays for it "
            "without contention. Wall time per call.",
            "",
            "| step | calls | p50 µs | p95 µs |",
            "|---|---:|---:|---:|",
        ]
        for s in f.steps:
            out.append(f"| {s.name} | {len(s.samples):,} | {s.percentile_us(50):,.0f} | {s.percentile_us(95):,.0f} |")
    for r in f.runs:
        if r.result.first_bad:
            out += ["", f"First non-2xx response of {r.store} {r.endpoint} round {r.round}: `{r.result.first_bad}`"]
    out.append("")
    return "\n".join(out)
