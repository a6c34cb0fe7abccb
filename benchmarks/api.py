"""``python -m benchmarks api``: HTTP throughput and latency, and the cost of row-level security.

What one run does (``make bench`` starts the durable PostgreSQL it needs):

1. Recreates the database ``firstmile_bench`` on the server of
   ``FIRSTMILE_BENCH_ADMIN_URL``, migrates it, applies ``tenants/demo.yaml`` and
   creates an ``onboarding:write`` key, as an operator would.
2. Serves a bare Litestar app (:mod:`benchmarks.bare`) and then the real
   API (``firstmile serve --workers N``) as subprocesses, and drives each with
   ``wrk`` through generated Lua scripts: the bare JSON endpoint, then
   ``POST /v1/onboarding/start`` (a new user per request) and
   ``POST /v1/onboarding/{user}/steps/create-api-key/complete`` (a first
   completion per request, on users started before).
   Then serves the same build again with the audit append switched off (a
   ``sitecustomize`` in a temporary folder replaces ``firstmile.audit.service.append``
   with a no-op in every process of that server, and nowhere else) and measures
   start on it, and reads the maximum merge delay of the audited start run from the
   entries' ``sequenced_at - created_at``.
3. Times the progress read of GET/complete (``_GET`` of the onboarding
   repository) as ``firstmile_app`` through RLS and as a BYPASSRLS role.
4. Returns a markdown report; progress goes to stderr.

Nothing here runs in the API or in the tests.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.ceiling import run_ceiling
from benchmarks.common import (
    APP_ROLE,
    BYPASS_ROLE,
    PASS_THROUGH,
    PATH_KEY,
    RLS_ITERATIONS,
    STEP,
    UNLIMITED,
    BenchError,
    _log,
    _secret,
    demo_manifest,
)
from benchmarks.cpu import CpuUse, _measure
from benchmarks.database import (
    _count,
    _execute,
    _fetch_column,
    _provision,
    _uncompleted,
    fresh_bench_database,
)
from benchmarks.report import (
    AuditPair,
    MergeDelay,
    Production,
    RunFacts,
    _command,
    _machine,
    _pool_description,
    _report,
)
from benchmarks.rls import _measure_rls
from benchmarks.servers import Server, _free_port, _http_json, _start_server, _stop_server
from benchmarks.wrk import WrkResult, _complete_script, _find_wrk, _new_users_script, _run_wrk

__all__ = ["BenchError", "run_api_benchmark"]

AUDIT_PAIRS = 3
"""Interleaved pairs of start runs with and without the audit append (each half the measured duration)."""

_NO_AUDIT_HOOK = """\
# Written by benchmarks/api.py for one benchmark server: the same build, without the audit append.
import os

if os.environ.get("FIRSTMILE_BENCH_NO_AUDIT") == "1":
    import firstmile.audit.service as _audit

    async def _no_append(tx, kind, actor, subject, payload):
        return None

    _audit.append = _no_append
"""


def _production_start(
    wrk: str,
    tmp: Path,
    app_env: dict[str, str],
    app_argv: list[str],
    key: str,
    tenant_id: object,
    kafka: str,
    dsn: str,
    postmaster: int | None,
    threads: int,
    connections: int,
    duration: int,
    warmup: int,
    workers: int,
) -> Production:
    """Start measured as deployed: the API with Kafka configured and no in-process relay, consumers, periodic
    tasks or sequencer; ``firstmile relay``, ``firstmile consume`` and ``firstmile sequencer`` beside it."""
    env = app_env | {
        "FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "FIRSTMILE_KAFKA_TOPIC_PREFIX": f"fm-bench-{secrets.token_hex(4)}",
        "FIRSTMILE_IN_PROCESS_SEQUENCER": "false",
        "FIRSTMILE_IN_PROCESS_SCHEDULERS": "false",
    }
    side: list[Server] = []
    try:
        for name, argv in (
            ("relay", ["relay"]),
            ("consumers", ["consume"]),
            ("sequencer", ["sequencer"]),
        ):
            probe = _free_port()
            worker_env = env | {"FIRSTMILE_PROBE_PORT": str(probe), "FIRSTMILE_PROBE_HOST": "127.0.0.1"}
            command = [sys.executable, "-m", "firstmile.cli", *argv]
            side.append(_start_server(f"firstmile {name}", command, worker_env, probe, tmp / f"prod-{name}.log"))
        port = _free_port()
        argv = [*app_argv[:-4], "--port", str(port), "--workers", str(workers)]
        server = _start_server("firstmile API (production shape)", argv, env | {"FIRSTMILE_PORT": str(port)}, port,
                               tmp / "prod-api.log")  # fmt: skip
        side.append(server)
        script = _new_users_script(tmp, "prod-warmup", key, "/v1/onboarding/start", "pw-")
        _log(f"warming up start, production shape ({warmup}s)")
        _run_wrk(wrk, script, server.base, threads, connections, warmup)
        script = _new_users_script(tmp, "prod", key, "/v1/onboarding/start", "p-")
        _log(f"measuring start, production shape ({duration}s, {connections} connections)")
        result, cpu = _measure(wrk, script, server, threads, connections, duration, db=dsn, postmaster=postmaster)
        started = _count(dsn, "SELECT count(*) FROM end_users WHERE tenant_id = $1 AND user_id LIKE 'p-%'", tenant_id)
        merge = _merge_delay(dsn, tenant_id, "p-%", started)
        return Production(result, cpu, merge)
    finally:
        for server in reversed(side):
            _stop_server(server)


def _merge_delay(dsn: str, tenant_id: object, pattern: str, expected: int) -> MergeDelay:
    """The merge delay (``sequenced_at - created_at``) of the entries about users matching ``pattern``,
    once all ``expected`` are sequenced (waits up to 60 s for the in-process sequencer)."""
    deadline = time.monotonic() + 60
    placed = 0
    while time.monotonic() < deadline:
        placed = _count(
            dsn,
            "SELECT count(*) FROM audit_entries WHERE tenant_id = $1 AND subject LIKE $2 AND kind = 'decision'",
            tenant_id,
            pattern,
        )
        if placed >= expected:
            break
        time.sleep(0.2)
    rows = asyncio.run(
        _fetch_column(
            dsn,
            "SELECT extract(epoch FROM sequenced_at - created_at)::float8 FROM audit_entries "
            "WHERE tenant_id = $1 AND subject LIKE $2 AND kind = 'decision' ORDER BY 1",
            tenant_id,
            pattern,
        )
    )
    delays = [float(r) for r in rows]
    return MergeDelay(expected=expected, sequenced=placed, delays_s=delays)


def _audit_pairs(
    wrk: str,
    tmp: Path,
    audited_env: dict[str, str],
    plain_env: dict[str, str],
    app_argv: list[str],
    key: str,
    dsn: str,
    postmaster: int | None,
    threads: int,
    connections: int,
    seconds: int,
    workers: int,
    rounds: int,
) -> list[AuditPair]:
    """Start with and without the audit append, alternately, ``rounds`` times: each pair's two runs are
    next to each other in time, so what drifts over a run (the tables growing, autovacuum, how uvicorn's
    workers happened to share the connections) falls on both sides of a pair, not on one build."""
    pairs: list[AuditPair] = []
    for i in range(1, rounds + 1):
        measured: dict[bool, tuple[WrkResult, CpuUse]] = {}
        for audited in (True, False):
            port = _free_port()
            env = (audited_env if audited else plain_env) | {"FIRSTMILE_PORT": str(port)}
            argv = [*app_argv[:-4], "--port", str(port), "--workers", str(workers)]
            label = "audited" if audited else "no-audit"
            server = _start_server(f"firstmile API ({label}, pair {i})", argv, env, port, tmp / f"pair-{label}-{i}.log")
            try:
                warm = _new_users_script(tmp, f"pair-{label}-{i}-w", key, "/v1/onboarding/start", f"p{i}{label[0]}w-")
                _run_wrk(wrk, warm, server.base, threads, connections, 2)
                script = _new_users_script(tmp, f"pair-{label}-{i}", key, "/v1/onboarding/start", f"p{i}{label[0]}-")
                _log(f"pair {i}/{rounds}: measuring start, {label} ({seconds}s)")
                measured[audited] = _measure(
                    wrk, script, server, threads, connections, seconds, db=dsn, postmaster=postmaster
                )
            finally:
                _stop_server(server)
        pairs.append(AuditPair(*measured[True], *measured[False]))
    return pairs


def run_api_benchmark(duration: int, connections: int, workers: int) -> str:
    """Run the whole benchmark against ``FIRSTMILE_BENCH_ADMIN_URL``; return the markdown report."""
    if duration < 1 or connections < 1 or workers < 1:
        raise BenchError("duration, connections and workers must be at least 1")
    admin = os.environ.get("FIRSTMILE_BENCH_ADMIN_URL")
    if not admin:
        raise BenchError(
            "set FIRSTMILE_BENCH_ADMIN_URL to a PostgreSQL superuser URL, or run `make bench`, "
            "which starts a local durable PostgreSQL (deploy/local/postgres.sh start bench)"
        )
    began, started_at = time.monotonic(), datetime.now(UTC)
    wrk = _find_wrk()
    machine = _machine()
    threads = max(1, min(connections, int(machine["cores"]) // 2))
    warmup = max(2, min(5, duration // 3))
    manifest = demo_manifest()

    db = fresh_bench_database(admin)
    bench_admin_url, bench_admin_dsn, app_url = db.admin_url, db.admin_dsn, db.app_url
    pg, postmaster = db.server, db.postmaster
    pepper = secrets.token_hex(32)
    _log(f"applying {manifest.name}, creating an API key and the {BYPASS_ROLE} role")
    key, tenant_id = asyncio.run(_provision(bench_admin_url, pepper.encode(), manifest))

    cpu: dict[str, CpuUse] = {}
    with tempfile.TemporaryDirectory(prefix="firstmile-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        tuning = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}

        # -- baseline: the bare Litestar app
        port = _free_port()
        bare_argv = [sys.executable, "-m", "uvicorn", "benchmarks.bare:app", "--host", "127.0.0.1"]
        bare_argv += ["--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
        server = _start_server("bare Litestar app", bare_argv, env, port, tmp / "bare.log")
        try:
            script = _new_users_script(tmp, "bare", key, "/v1/bare/start", "bare-")
            _log(f"warming up bare ({warmup}s)")
            _run_wrk(wrk, script, server.base, threads, connections, warmup)
            _log(f"measuring bare ({duration}s, {connections} connections)")
            bare, cpu["bare"] = _measure(
                wrk, script, server, threads, connections, duration, db=bench_admin_dsn, postmaster=postmaster
            )
        finally:
            _stop_server(server)

        # -- the real API
        port = _free_port()
        app_env = (
            env
            | {
                "FIRSTMILE_DATABASE_URL": app_url,
                "FIRSTMILE_DATABASE_ADMIN_URL": bench_admin_url,
                "FIRSTMILE_API_KEY_PEPPER": pepper,
                "FIRSTMILE_REGION": "eu-west-1",
                "FIRSTMILE_LOG_LEVEL": "WARNING",
                "FIRSTMILE_PORT": str(port),
                "FIRSTMILE_DATA_DIR": str(tmp / "data"),
                # an external database needs provisioned key files (only embedded mode generates them)
                "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": str(_secret(tmp / "audit_signing_key")),
                "FIRSTMILE_KEK_FILE": str(_secret(tmp / "kek")),
            }
            | UNLIMITED
            | tuning
        )
        if workers > 1:
            (tmp / "metrics").mkdir()
            app_env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
        app_argv = [sys.executable, "-m", "firstmile.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        app_argv += ["--workers", str(workers)]
        server = _start_server("firstmile API", app_argv, app_env, port, tmp / "api.log")
        try:
            _log("checking start and complete once")
            status, body = _http_json(
                f"{server.base}/v1/onboarding/start",
                key,
                {"user_id": "bench-check", "traits": {"persona": "developer"}},
            )
            if status != 201 or body.get("path", {}).get("id") != PATH_KEY:
                raise BenchError(f"start answered {status}: {body}")
            status, body = _http_json(f"{server.base}/v1/onboarding/bench-check/steps/{STEP}/complete", key, None)
            if status != 200:
                raise BenchError(f"complete answered {status}: {body}")

            start_script = _new_users_script(tmp, "start-warmup", key, "/v1/onboarding/start", "w-")
            _log(f"warming up start ({warmup}s)")
            _run_wrk(wrk, start_script, server.base, threads, connections, warmup)
            start_script = _new_users_script(tmp, "start", key, "/v1/onboarding/start", "s-")
            _log(f"measuring start ({duration}s, {connections} connections)")
            start, cpu["start"] = _measure(
                wrk, start_script, server, threads, connections, duration, db=bench_admin_dsn, postmaster=postmaster
            )
            started_in_db = _count(
                bench_admin_dsn, "SELECT count(*) FROM end_users WHERE tenant_id = $1 AND user_id LIKE 's-%'", tenant_id
            )
            merge = _merge_delay(bench_admin_dsn, tenant_id, "s-%", started_in_db)

            pool = _uncompleted(bench_admin_dsn, tenant_id)
            script = _complete_script(tmp, "complete-warmup", key, pool, threads)
            _log(f"warming up complete ({warmup}s, {len(pool):,} users to draw on)")
            warm = _run_wrk(wrk, script, server.base, threads, connections, warmup)
            pool = _uncompleted(bench_admin_dsn, tenant_id)
            needed = int(warm.rps * duration * 1.5) + 1000
            topped_up = 0
            if len(pool) < needed and start.rps > 0:
                seconds = min(10 * duration, math.ceil((needed - len(pool)) / start.rps * 1.3) + 1)
                _log(f"starting more users for the complete run ({seconds}s, unmeasured)")
                script = _new_users_script(tmp, "top-up", key, "/v1/onboarding/start", "t-")
                _run_wrk(wrk, script, server.base, threads, connections, seconds)
                before = len(pool)
                pool = _uncompleted(bench_admin_dsn, tenant_id)
                topped_up = len(pool) - before
            script = _complete_script(tmp, "complete", key, pool, threads)
            done_before = _count(bench_admin_dsn, "SELECT count(*) FROM step_completions WHERE step_id = $1", STEP)
            _log(f"measuring complete ({duration}s, {connections} connections, {len(pool):,} users to draw on)")
            complete, cpu["complete"] = _measure(
                wrk, script, server, threads, connections, duration, db=bench_admin_dsn, postmaster=postmaster
            )
            completed_in_db = (
                _count(bench_admin_dsn, "SELECT count(*) FROM step_completions WHERE step_id = $1", STEP) - done_before
            )
        finally:
            _stop_server(server)

        # -- the same build with the audit append switched off: start only
        port = _free_port()
        hook = tmp / "no-audit"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_NO_AUDIT_HOOK, encoding="utf-8")
        plain_env = app_env | {
            "FIRSTMILE_PORT": str(port),
            "FIRSTMILE_BENCH_NO_AUDIT": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p),
        }
        plain_argv = [*app_argv[:-4], "--port", str(port), "--workers", str(workers)]
        server = _start_server("firstmile API without the audit append", plain_argv, plain_env, port, tmp / "plain.log")
        try:
            script = _new_users_script(tmp, "plain-warmup", key, "/v1/onboarding/start", "nw-")
            _log(f"warming up start without the audit append ({warmup}s)")
            _run_wrk(wrk, script, server.base, threads, connections, warmup)
            script = _new_users_script(tmp, "plain", key, "/v1/onboarding/start", "n-")
            _log(f"measuring start without the audit append ({duration}s, {connections} connections)")
            unaudited, cpu["start without audit"] = _measure(
                wrk, script, server, threads, connections, duration, db=bench_admin_dsn, postmaster=postmaster
            )
            leaked = _count(
                bench_admin_dsn,
                "SELECT count(*) FROM audit_entries WHERE tenant_id = $1 AND subject LIKE 'n-%'",
                tenant_id,
            ) + _count(
                bench_admin_dsn,
                "SELECT count(*) FROM audit_queue WHERE tenant_id = $1 AND subject LIKE 'n-%'",
                tenant_id,
            )
            if leaked:
                raise BenchError(f"the server without the audit append wrote {leaked} audit entries")
        finally:
            _stop_server(server)

        # -- the audit append's price, measured in interleaved pairs
        audit_pairs = _audit_pairs(
            wrk, tmp, app_env, plain_env, app_argv, key, bench_admin_dsn, postmaster, threads, connections,
            max(3, duration // 2), workers, AUDIT_PAIRS,
        )  # fmt: skip

        # -- the production shape: API processes alone, relay, consumers and sequencer in their own processes
        production: Production | None = None
        kafka = os.environ.get("FIRSTMILE_BENCH_KAFKA")
        if kafka:
            production = _production_start(
                wrk, tmp, app_env, app_argv, key, tenant_id, kafka, bench_admin_dsn, postmaster, threads, connections,
                duration, warmup, workers,
            )  # fmt: skip
            cpu["start, production shape"] = production.cpu

    _log(f"timing the progress read through RLS and as {BYPASS_ROLE} ({RLS_ITERATIONS} iterations each)")
    users = asyncio.run(
        _fetch_column(
            bench_admin_dsn,
            "SELECT user_id FROM user_progress WHERE tenant_id = $1 AND path_key = $2",
            tenant_id,
            PATH_KEY,
        )
    )
    dsns = {
        "firstmile_app (RLS)": db.dsn(APP_ROLE),
        f"{BYPASS_ROLE} (BYPASSRLS)": db.dsn(BYPASS_ROLE),
    }
    try:
        rls = asyncio.run(_measure_rls(dsns, tenant_id, [str(u) for u in users], RLS_ITERATIONS))
    finally:  # the BYPASSRLS role exists for this measurement only: it may not log in afterwards
        asyncio.run(_execute(bench_admin_dsn, f"ALTER ROLE {BYPASS_ROLE} NOLOGIN"))
    # -- the ceiling, last: its queued audit entries carry a made-up leaf hash, which a sequencer would rightly
    # refuse as tampered and stop the tenant's log at, so it runs when no server of this benchmark is left
    ceiling = run_ceiling(db.dsn(APP_ROLE), tenant_id, postmaster, connections, duration)
    _log("done")
    return _report(
        RunFacts(
            started_at=started_at,
            duration=duration,
            warmup=warmup,
            connections=connections,
            workers=workers,
            threads=threads,
            machine=machine,
            pg=pg,
            bare=bare,
            start=start,
            complete=complete,
            unaudited=unaudited,
            merge=merge,
            production=production,
            audit_pairs=audit_pairs,
            ceiling=ceiling,
            cpu=cpu,
            started_in_db=started_in_db,
            completed_in_db=completed_in_db,
            complete_pool=len(pool),
            topped_up=topped_up,
            rls=rls,
            command=_command(duration, connections, workers, tuning),
            elapsed_s=time.monotonic() - began,
            pool=_pool_description(tuning),
        )
    )
