"""Benchmark: the path classifier in-process against the same model behind Ray Serve's HTTP API.

    python -m benchmarks inference --registry DIR --num-gpus 0|1 --output FILE.md|FILE.json
        [--start-ray | --url http://127.0.0.1:58200] [--train]

For each batch size (1, 2, 4, ... 64) it measures p50/p95/p99 latency and
throughput (instances/s) of

- **in-process**: ``load_predictor(registry version, device).predict(batch)``,
  one call after another;
- **serve**: ``POST /v1/models/path_classifier/predict`` carrying the batch, one
  request after another, over loopback on one keep-alive connection (HAProxy,
  or Serve's HTTP proxy with ``--ingress proxy``, → the model's replica, the ingress of its own application → dynamic
  batch queue → the same predictor code on the same device);

and reports Ray Serve's overhead at p50 (serve p50 - in-process p50, in ms and
as a ratio). A concurrency run then keeps many single-instance requests in
flight and reads the replica's batch counters, to show dynamic batching at work.
Every point warms up first and is bounded in time and count.

``--start-ray`` starts a private Ray head on loopback and deploys the application
(one path_classifier replica) itself, so the benchmark runs as one command on a
machine with torch and ray but no running cluster; ``--url`` measures an
application already running (``deploy/local/ray.sh deploy bench``; ``make
bench-inference``). ``--train`` first trains and promotes a path classifier when
the registry has none in production. Imports: torch, numpy, ray[serve], httpx
and firstmile_inference only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from firstmile_inference.models import load_predictor
from firstmile_inference.predictor import Predictor
from firstmile_inference.registry import Registry

MODEL = "path_classifier"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONCURRENCY = (1, 16, 64)


@dataclass
class Point:
    """One measured series: latencies of calls that each carried ``batch`` instances."""

    mode: str
    batch: int
    calls: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    instances_per_s: float
    in_flight: int = 1
    batching: dict[str, Any] = field(default_factory=dict)


def summarise(mode: str, batch: int, latencies_s: Sequence[float], wall_s: float, in_flight: int = 1) -> Point:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = (float(v) for v in np.percentile(ms, [50, 95, 99]))
    return Point(
        mode=mode,
        batch=batch,
        calls=len(latencies_s),
        seconds=round(wall_s, 3),
        p50_ms=round(p50, 3),
        p95_ms=round(p95, 3),
        p99_ms=round(p99, 3),
        mean_ms=round(float(ms.mean()), 3),
        instances_per_s=round(batch * len(latencies_s) / wall_s, 1) if wall_s > 0 else 0.0,
        in_flight=in_flight,
    )


def measure(call: Callable[[], object], *, warmup: int, seconds: float, max_calls: int) -> tuple[list[float], float]:
    """Warm up, then call until ``seconds`` or ``max_calls`` (at least 5 calls); latencies and wall time."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    while len(latencies) < max_calls and (time.perf_counter() < deadline or len(latencies) < 5):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return latencies, time.perf_counter() - started


# ---------------------------------------------------------------- inputs and the model


def instances(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """Realistic path-classifier instances (the simulator's users)."""
    from firstmile_inference.simulate import generate

    return [dict(row) for row in generate(max(n, 64), seed=seed).user_rows()[:n]]


def ensure_model(registry: Registry, train: bool, say: Callable[[str], None]) -> str:
    mv = registry.resolve(MODEL, "production")
    if mv is not None:
        return mv.version
    if not train:
        raise SystemExit(f"{registry.root} has no production {MODEL}: train one (--train) or promote one")
    from firstmile_inference.simulate import generate
    from firstmile_inference.train import register_all, train_all

    say(f"training a {MODEL} into {registry.root} (20k simulated sessions)")
    trained = train_all(generate(20_000, seed=7), seed=7, models=(MODEL,))
    return register_all(registry, trained, promote_to="production")[MODEL].version


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def bench_in_process(
    predictor: Predictor, pool: Sequence[dict[str, Any]], args: argparse.Namespace, say: Callable[[str], None]
) -> list[Point]:
    points = []
    for b in args.batch_sizes:
        batch = list(pool[:b])

        def call(batch: list[dict[str, Any]] = batch) -> None:
            if len(predictor.predict(batch)) != len(batch):
                raise RuntimeError("wrong number of predictions")

        latencies, wall = measure(call, warmup=args.warmup, seconds=args.seconds, max_calls=args.max_calls)
        point = summarise("in-process", b, latencies, wall)
        say(f"in-process batch {b:>3}: p50 {point.p50_ms:8.3f} ms  {point.instances_per_s:10.1f} inst/s")
        points.append(point)
    return points


# ---------------------------------------------------------------- over HTTP


def batching_counters(client: httpx.Client) -> dict[str, Any]:
    response = client.get(f"/v1/models/{MODEL}")
    response.raise_for_status()
    batching: dict[str, Any] = response.json()["batching"]
    return batching


def bench_serve(
    client: httpx.Client,
    pool: Sequence[dict[str, Any]],
    version: str,
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> list[Point]:
    points = []
    url = f"/v1/models/{MODEL}/predict"
    for b in args.batch_sizes:
        body = json.dumps({"instances": list(pool[:b]), "version": version}).encode()

        def call(body: bytes = body, b: int = b) -> None:
            response = client.post(url, content=body, headers={"content-type": "application/json"})
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            if len(response.json()["predictions"]) != b:
                raise RuntimeError("wrong number of predictions")

        before = batching_counters(client)
        latencies, wall = measure(call, warmup=args.warmup, seconds=args.seconds, max_calls=args.max_calls)
        point = summarise("serve", b, latencies, wall)
        point.batching = _delta(before, batching_counters(client))
        say(f"serve      batch {b:>3}: p50 {point.p50_ms:8.3f} ms  {point.instances_per_s:10.1f} inst/s")
        points.append(point)
    return points


async def _concurrent(
    base_url: str, pool: Sequence[dict[str, Any]], version: str, in_flight: int, args: argparse.Namespace
) -> tuple[list[float], float]:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        url = f"/v1/models/{MODEL}/predict"
        bodies = [json.dumps({"instances": [row], "version": version}).encode() for row in pool]
        headers = {"content-type": "application/json"}
        latencies: list[float] = []
        counter = 0

        async def one() -> float:
            nonlocal counter
            body = bodies[counter % len(bodies)]
            counter += 1
            t0 = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            return time.perf_counter() - t0

        async def worker(deadline: float, budget: list[int], record: bool) -> None:
            while budget[0] > 0 and time.perf_counter() < deadline:
                budget[0] -= 1
                latency = await one()
                if record:
                    latencies.append(latency)

        warm = [in_flight * 4]
        await asyncio.gather(*(worker(time.perf_counter() + 10, warm, False) for _ in range(in_flight)))
        budget = [max(args.max_calls * 4, in_flight * 8)]
        started = time.perf_counter()
        deadline = started + args.seconds * 2
        await asyncio.gather(*(worker(deadline, budget, True) for _ in range(in_flight)))
        return latencies, time.perf_counter() - started


def bench_concurrency(
    client: httpx.Client,
    base_url: str,
    pool: Sequence[dict[str, Any]],
    version: str,
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> list[Point]:
    points = []
    for in_flight in args.concurrency:
        before = batching_counters(client)
        latencies, wall = asyncio.run(_concurrent(base_url, pool, version, in_flight, args))
        point = summarise("serve-concurrent", 1, latencies, wall, in_flight=in_flight)
        point.batching = _delta(before, batching_counters(client))
        say(
            f"serve      {in_flight:>3} in flight: p50 {point.p50_ms:8.3f} ms  {point.instances_per_s:10.1f} inst/s"
            f"  mean batch {point.batching.get('mean_batch_size', 0):.2f}"
        )
        points.append(point)
    return points


def _delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Batch counters over one measurement (warm-up included), from the replica that answered."""
    batches = int(after["batches"]) - int(before["batches"])
    inst = int(after["instances"]) - int(before["instances"])
    # the largest batch of this measurement, as the smallest histogram bound holding every batch
    bounds = sorted(int(k.removeprefix("le_")) for k in after["histogram"])
    cumulative = {b: int(after["histogram"][f"le_{b}"]) - int(before["histogram"][f"le_{b}"]) for b in bounds}
    largest = next((b for b in bounds if cumulative[b] == batches), None) if batches else 0
    return {
        "batches": batches,
        "instances": inst,
        "mean_batch_size": round(inst / batches, 2) if batches else 0.0,
        "largest_batch_at_most": largest,
        "max_batch_size_seen": int(after["max_batch_size_seen"]),
        "max_batch_size": int(after["max_batch_size"]),
        "batch_wait_timeout_s": float(after["batch_wait_timeout_s"]),
    }


# ---------------------------------------------------------------- a private Ray


class PrivateServe:
    """A Ray head on loopback with the application deployed (``--start-ray``); shut down on exit."""

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.args = args
        self.say = say
        self.url = f"http://127.0.0.1:{args.port}"
        self.startup_s = 0.0
        self.temp_dir = Path("/nonexistent")
        self.haproxy_dir = Path("/nonexistent")

    def __enter__(self) -> PrivateServe:
        # Loopback: Ray on Linux otherwise binds its services to the machine's address (see ray.sh).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Token authentication with a token of this run (Ray would otherwise write ~/.ray/auth_token,
        # which every later `ray start` of the user picks up).
        self.temp_dir = temp_dir = Path(f"/tmp/fm-ray-bench-{os.getpid()}")
        temp_dir.mkdir(parents=True, exist_ok=True)
        token = temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))
        from firstmile_inference.serve import applications, ingress_environment

        # Set before ray.init: the node's processes (controller, proxies, replicas) inherit it.
        # HAProxy's unix sockets go in <dir>/<56-character node id>/ and HAProxy allows 97 bytes
        # for a socket path: a short folder of its own, not one below temp_dir.
        self.haproxy_dir = haproxy_dir = Path(f"/tmp/fmhp-{os.getpid()}")
        haproxy_dir.mkdir(exist_ok=True)
        for key, value in ingress_environment(self.args.ingress, self.args.port, str(haproxy_dir)).items():
            os.environ.setdefault(key, value)
        import ray
        from ray import serve

        started = time.perf_counter()
        try:
            self._start(ray, serve, applications)
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.perf_counter() - started
        self.say(f"private Ray + Serve up in {self.startup_s:.1f} s at {self.url}")
        return self

    def _start(self, ray: Any, serve: Any, applications: Callable[[dict[str, Any]], list[Any]]) -> None:
        ray.init(
            address="local",
            num_cpus=self.args.ray_num_cpus,
            num_gpus=self.args.num_gpus,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            _temp_dir=str(self.temp_dir),
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.args.port})
        specs = applications(
            {
                "registry_uri": str(self.args.registry),
                "models": MODEL,
                "num_gpus": self.args.num_gpus,
                "num_cpus": self.args.replica_num_cpus,
                "max_batch_size": self.args.max_batch_size,
                "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                "min_replicas": 1,
                "max_replicas": 1,
            }
        )
        for spec in specs:  # the model's application and the index
            serve.run(spec.app, name=spec.name, route_prefix=spec.route_prefix)

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        # both untyped in ray
        shutdown_serve: Callable[[], None] = serve.shutdown
        shutdown_ray: Callable[[], None] = ray.shutdown
        try:
            shutdown_serve()
        finally:
            shutdown_ray()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            shutil.rmtree(self.haproxy_dir, ignore_errors=True)


# ---------------------------------------------------------------- report


def environment(device: str, args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads_in_process": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        pass
    return env


def overhead(in_process: Sequence[Point], serve: Sequence[Point]) -> list[dict[str, Any]]:
    by_batch = {p.batch: p for p in in_process}
    rows = []
    for s in serve:
        base = by_batch.get(s.batch)
        if base is None:
            continue
        rows.append(
            {
                "batch": s.batch,
                "in_process_p50_ms": base.p50_ms,
                "serve_p50_ms": s.p50_ms,
                "overhead_p50_ms": round(s.p50_ms - base.p50_ms, 3),
                "ratio_p50": round(s.p50_ms / base.p50_ms, 2) if base.p50_ms > 0 else None,
            }
        )
    return rows


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Inference benchmark: {MODEL} in-process vs Ray Serve ({env['device']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {MODEL} {report['version']}; device {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; torch {env['torch']}, ray {env.get('ray', '?')}, Python {env['python']}, {env['cpu_count']} CPUs; "
        f"in-process torch threads {env['torch_threads_in_process']}.  ",
        f"Serve: {report['serve']['description']}.  ",
        f"Each point: {report['settings']['warmup']} warm-up calls, then up to {report['settings']['max_calls']} calls "
        f"or {report['settings']['seconds']} s.",
        "",
        "## One caller, one call after another",
        "",
        "| batch | in-process p50 / p95 / p99 ms | in-process inst/s | serve p50 / p95 / p99 ms | serve inst/s "
        "| overhead p50 ms | serve / in-process p50 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ip = {p["batch"]: p for p in report["in_process"]}
    ov = {o["batch"]: o for o in report["overhead"]}
    for s in report["serve_batches"]:
        i = ip[s["batch"]]
        o = ov[s["batch"]]
        lines.append(
            f"| {s['batch']} | {i['p50_ms']:.3f} / {i['p95_ms']:.3f} / {i['p99_ms']:.3f} | {i['instances_per_s']:.0f} "
            f"| {s['p50_ms']:.2f} / {s['p95_ms']:.2f} / {s['p99_ms']:.2f} | {s['instances_per_s']:.0f} "
            f"| {o['overhead_p50_ms']:.2f} | {o['ratio_p50']}x |"
        )
    lines += [
        "",
        "## Dynamic batching: single-instance requests in flight together",
        "",
        "| in flight | requests | p50 / p95 / p99 ms | inst/s | batches | mean batch | largest batch (bucket) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in report["serve_concurrent"]:
        b = c["batching"]
        lines.append(
            f"| {c['in_flight']} | {c['calls']} | {c['p50_ms']:.2f} / {c['p95_ms']:.2f} / {c['p99_ms']:.2f} "
            f"| {c['instances_per_s']:.0f} | {b['batches']} | {b['mean_batch_size']} "
            f"| <= {b['largest_batch_at_most']} |"
        )
    lines += [
        "",
        "Batch counters come from the replica (`GET /v1/models/path_classifier`) and include the warm-up; "
        "the largest batch is the smallest histogram bucket (1, 2, 4, ... 256) that holds every batch of the run.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks inference", description=__doc__.split("\n")[0])
    p.add_argument("--registry", required=True, type=Path, help="model registry directory")
    p.add_argument("--num-gpus", type=float, default=0, help="0: CPU; 1: the model on cuda in both modes")
    p.add_argument("--output", type=Path, help="write the report here (.md or .json)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--start-ray", action="store_true", help="start a private Ray + Serve on loopback")
    where.add_argument("--url", help="an application already running, e.g. http://127.0.0.1:58200")
    p.add_argument("--train", action="store_true", help="train and promote a path classifier if none is in production")
    p.add_argument("--port", type=int, default=58300, help="HTTP port with --start-ray")
    p.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="haproxy",
        help="with --start-ray: haproxy (Serve's direct ingress behind HAProxy) or proxy (Serve's Python HTTP proxy)",
    )
    p.add_argument("--ray-num-cpus", type=int, default=4, help="logical CPUs of the private Ray")
    p.add_argument("--replica-num-cpus", type=float, default=1.0, help="num_cpus of the model replica")
    p.add_argument("--max-batch-size", type=int, default=64, help="with --start-ray")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.0, help="with --start-ray")
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process (a replica with 1 CPU has 1)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCH_SIZES))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=list(CONCURRENCY))
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per point")
    p.add_argument("--seconds", type=float, default=2.0, help="time bound per point")
    p.add_argument("--max-calls", type=int, default=400, help="count bound per point")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be on loopback")
    registry = Registry(args.registry)
    version = ensure_model(registry, args.train, say)
    device = device_for(args.num_gpus)
    if args.num_gpus > 0 and device == "cpu":
        say("--num-gpus > 0 but CUDA is not available: measuring on cpu")
    torch.set_num_threads(max(1, args.threads))
    pool = instances(max([*args.batch_sizes, 64]))

    mv = registry.get(MODEL, version)
    predictor = load_predictor(mv, device=device)
    say(f"{MODEL} {version} on {device}")
    in_process = bench_in_process(predictor, pool, args, say)

    private = PrivateServe(args, say) if args.start_ray else None
    base_url = private.url if private else str(args.url).rstrip("/")
    with ExitStack() as stack:
        if private:
            stack.enter_context(private)
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=60))
        described = client.get(f"/v1/models/{MODEL}").json()
        if version not in [v["version"] for v in described["versions"]]:
            raise SystemExit(f"{base_url} does not serve {MODEL} {version}: {described.get('stages')}")
        served_on = {v["version"]: v["device"] for v in described["versions"]}[version]
        serve_batches = bench_serve(client, pool, version, args, say)
        concurrent = bench_concurrency(client, base_url, pool, version, args, say)
        batching = described["batching"]

    report: dict[str, Any] = {
        "command": "python -m benchmarks inference " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": MODEL,
        "version": version,
        "environment": environment(device, args),
        "settings": {
            "warmup": args.warmup,
            "seconds": args.seconds,
            "max_calls": args.max_calls,
            "batch_sizes": args.batch_sizes,
            "concurrency": args.concurrency,
        },
        "serve": {
            "url": base_url,
            "started_here": bool(private),
            "startup_s": round(private.startup_s, 1) if private else None,
            "device": served_on,
            "max_batch_size": batching["max_batch_size"],
            "batch_wait_timeout_s": batching["batch_wait_timeout_s"],
            "description": (
                f"one {MODEL} replica on {served_on}, max_batch_size {batching['max_batch_size']}, "
                f"batch_wait_timeout_s {batching['batch_wait_timeout_s']}, HTTP over loopback, "
                + (
                    f"ingress {args.ingress} (started here)"
                    if private
                    else "ingress as the running instance has it (ray.sh: FIRSTMILE_RAY_INGRESS, default haproxy)"
                )
            ),
        },
        "in_process": [asdict(p) for p in in_process],
        "serve_batches": [asdict(p) for p in serve_batches],
        "serve_concurrent": [asdict(p) for p in concurrent],
        "overhead": overhead(in_process, serve_batches),
    }
    if args.output is None:
        sys.stdout.write(markdown(report))
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # a .md report gets its .json twin beside it (the numbers, unrounded by the table)
    json_path = args.output if args.output.suffix == ".json" else args.output.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if args.output.suffix != ".json":
        args.output.write_text(markdown(report))
    say(markdown(report))
    say(f"written to {args.output}" + (f" and {json_path}" if json_path != args.output else ""))
    return 0
