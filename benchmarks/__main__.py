"""``python -m benchmarks NAME``: the benchmarks (see benchmarks/README.md and docs/benchmarks.md).

Run from the repository root (``make bench-*`` does); each benchmark writes a markdown report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from firstmile.settings import get_settings


@click.group()
def main() -> None:
    """Firstmile's benchmarks (see benchmarks/README.md and docs/benchmarks.md)."""


@main.command("events")
@click.option(
    "--messages", default=200_000, show_default=True, help="Outbox rows per relay run (relay vs bare producer)."
)
@click.option("--events", default=200_000, show_default=True, help="Events per ingestion and end-to-end run.")
@click.option(
    "--relay-batch",
    "relay_batch_sizes",
    multiple=True,
    type=int,
    default=(2000, 10000),
    show_default=True,
    help="Relay batch size to measure (repeat for several).",
)
@click.option("--connections", default=4, show_default=True, help="Load generator connections.")
@click.option("--workers", default=1, show_default=True, help="`firstmile serve` workers in the Kafka runs.")
@click.option("--freshness", "freshness_samples", default=50, show_default=True, help="Single-event probes per mode.")
@click.option("--repeat", default=3, show_default=True, help="Rounds of the relay-vs-bare runs.")
@click.option(
    "--kafka",
    default="127.0.0.1:59192",
    envvar="FIRSTMILE_BENCH_KAFKA",
    show_default=True,
    help="Kafka bootstrap servers (deploy/local/kafka.sh start bench).",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds each measured run may take.")
@click.option(
    "--phase",
    "phases",
    multiple=True,
    type=click.Choice(["relay", "kafka", "direct", "embedded"]),
    help="Run only this phase (repeat for several; default: all). kafka: ingestion through the outbox; "
    "direct: the API produces to Kafka.",
)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the markdown report here.")
def bench_events(
    messages: int,
    events: int,
    relay_batch_sizes: tuple[int, ...],
    connections: int,
    workers: int,
    freshness_samples: int,
    repeat: int,
    kafka: str,
    timeout: float,
    phases: tuple[str, ...],
    output: Path | None,
) -> None:
    """Event path: relay vs a bare producer, end-to-end throughput (Kafka, embedded), freshness."""
    from benchmarks.common import BenchError
    from benchmarks.events import run_events_benchmark

    try:
        report = run_events_benchmark(
            messages=messages,
            events=events,
            relay_batch_sizes=relay_batch_sizes,
            connections=connections,
            workers=workers,
            freshness_samples=freshness_samples,
            repeat=repeat,
            kafka=kafka,
            timeout=timeout,
            phases=phases or ("relay", "kafka", "direct", "embedded"),
            argv=sys.argv[1:],
        )
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report)
    if output:
        output.write_text(report, encoding="utf-8")


@main.command("analytics")
@click.option("--events", default=10_000_000, show_default=True, type=click.IntRange(10_000, 100_000_000))
@click.option("--tenants", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--weeks", default=26, show_default=True, type=click.IntRange(1, 104))
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--keep", is_flag=True, help="Keep the chdb folder under the data dir.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def bench_analytics(events: int, tenants: int, weeks: int, runs: int, keep: bool, output: Path | None) -> None:
    """Analytics queries over N synthetic events (chdb), against scans in the same run."""
    from benchmarks.analytics import run_analytics_benchmark

    report = run_analytics_benchmark(
        events=events, tenants=tenants, weeks=weeks, runs=runs, data_dir=get_settings().data_dir, keep=keep
    )
    text = report.markdown(f"python -m benchmarks analytics --events {events}")
    _emit(text, output)


@main.command("experiments")
@click.option("--users", default=200_000, show_default=True, type=click.IntRange(1_000, 10_000_000))
@click.option("--exposures", default=10_000_000, show_default=True, type=click.IntRange(1_000, 100_000_000))
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def bench_experiments(users: int, exposures: int, runs: int, output: Path | None) -> None:
    """Allocations per second against hashing alone; the analysis query over N exposures against a scan (chdb)."""
    from benchmarks.experiments import run_experiments_benchmark

    report = run_experiments_benchmark(users=users, exposures=exposures, runs=runs, data_dir=get_settings().data_dir)
    text = report.markdown(f"python -m benchmarks experiments --users {users} --exposures {exposures}")
    _emit(text, output)


@main.command(
    "inference",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_inference(args: tuple[str, ...]) -> None:
    """Path classifier in-process vs Ray Serve over HTTP (its options: python -m benchmarks inference --help)."""
    from benchmarks.inference import main as run_inference

    raise SystemExit(run_inference(list(args)))


def _bench_admin_url() -> str:
    url = os.environ.get("FIRSTMILE_BENCH_ADMIN_URL")
    if not url:
        raise click.ClickException(
            "FIRSTMILE_BENCH_ADMIN_URL is not set: `make bench-security` starts the bench PostgreSQL and sets it"
        )
    return url


def _emit(text_: str, output: Path | None) -> None:
    """A report on stdout, and in ``output`` when given (its folder made)."""
    _emit(text_, output)


@main.command("audit")
@click.option("--entries", default=1_000_000, show_default=True, type=click.IntRange(2, 100_000_000))
@click.option("--appends", default=2000, show_default=True, type=click.IntRange(100, 1_000_000))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def bench_audit(entries: int, appends: int, output: Path | None) -> None:
    """Audit append rate, proof generation and verification at N entries (needs the bench PostgreSQL)."""
    from benchmarks.audit import run_audit_benchmark

    _emit(run_audit_benchmark(_bench_admin_url(), entries=entries, appends=appends), output)


@main.command("crypto")
@click.option("--records", default=5000, show_default=True, type=click.IntRange(1000, 1_000_000))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def bench_crypto(records: int, output: Path | None) -> None:
    """Field encryption with cached and uncached data keys; provider calls per 1,000 records written."""
    from benchmarks.crypto import run_crypto_benchmark

    _emit(run_crypto_benchmark(os.environ.get("FIRSTMILE_BENCH_ADMIN_URL"), records=records), output)


@main.command("pii")
@click.option("--lines", default=1000, show_default=True, type=click.IntRange(10, 1_000_000))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def bench_pii(lines: int, output: Path | None) -> None:
    """PII redaction throughput on log lines, against a single email-regex pass."""
    from benchmarks.pii import bench_redaction

    _emit(bench_redaction(n_lines=lines), output)


@main.command("api")
@click.option("--duration", default=10, show_default=True, help="Seconds per measured run.")
@click.option("--connections", default=32, show_default=True, help="Concurrent clients.")
@click.option("--workers", default=2, show_default=True, help="Server worker processes.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the markdown report here.")
def bench_api(duration: int, connections: int, workers: int, output: Path | None) -> None:
    """API throughput and latency vs a bare Litestar endpoint, and RLS vs BYPASSRLS."""
    from benchmarks.api import BenchError, run_api_benchmark

    try:
        report = run_api_benchmark(duration=duration, connections=connections, workers=workers)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report)
    if output:
        output.write_text(report, encoding="utf-8")


@main.command("planner")
@click.option(
    "--registry",
    required=True,
    help="Model registry (file:///dir or a dir) with a production path_classifier (make bench-planner trains one).",
)
@click.option(
    "--inference-url",
    default=None,
    help="Ray Serve base URL (deploy/local/ray.sh url bench); without it only the in-process model is measured.",
)
@click.option("--duration", default=10, show_default=True, type=click.IntRange(1, 300), help="Seconds per run.")
@click.option("--low", default=4, show_default=True, type=click.IntRange(1, 1024), help="Connections for latency.")
@click.option("--high", default=32, show_default=True, type=click.IntRange(1, 1024), help="Connections at saturation.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 10), help="Rules/model pairs per level.")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds the whole run may take.")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report file (default: stdout)."
)
def bench_planner(
    registry: str,
    inference_url: str | None,
    duration: int,
    low: int,
    high: int,
    rounds: int,
    timeout: float,
    output: Path | None,
) -> None:
    """Start latency and throughput with the path model (in-process, Ray Serve) vs the rules (bench PostgreSQL)."""
    from benchmarks.common import BenchError
    from benchmarks.planner import run_planner_benchmark

    try:
        report = run_planner_benchmark(
            registry=registry,
            inference_url=inference_url,
            duration=duration,
            low=low,
            high=high,
            rounds=rounds,
            timeout=timeout,
        )
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        click.echo(report)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report, encoding="utf-8")


@main.command("admin")
@click.option("--duration", default=10, show_default=True, type=click.IntRange(1, 120), help="Seconds per run.")
@click.option("--connections", default=4, show_default=True, type=click.IntRange(1, 64), help="wrk connections.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 10), help="Runs of each endpoint.")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report file (default: stdout)."
)
def bench_admin(duration: int, connections: int, rounds: int, output: Path | None) -> None:
    """Admin UI session authentication (in-process, Redis) vs the API key (bench PostgreSQL and Redis)."""
    from benchmarks.admin import run_admin_benchmark
    from benchmarks.common import BenchError

    try:
        report = run_admin_benchmark(duration=duration, connections=connections, rounds=rounds)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    if output is None:
        click.echo(report)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report, encoding="utf-8")


@main.command("nudges")
@click.option("--decisions", default=2000, show_default=True, type=click.IntRange(10, 100_000), help="Per round.")
@click.option(
    "--concurrency", multiple=True, type=click.IntRange(1, 64), default=(1, 16), show_default=True,
    help="Decisions in flight at once (repeat for several rounds).",
)  # fmt: skip
@click.option("--chain", default=100, show_default=True, type=click.IntRange(5, 5000), help="Stuck → delivered users.")
@click.option("--rounds", default=20_000, show_default=True, type=click.IntRange(100, 10_000_000), help="Core loops.")
@click.option("--admin", envvar="FIRSTMILE_BENCH_ADMIN_URL", required=True, help="The bench PostgreSQL (superuser).")
@click.option("--smtp", envvar="FIRSTMILE_BENCH_MAILPIT_SMTP", required=True, help="Mailpit's SMTP URL.")
@click.option("--api", envvar="FIRSTMILE_BENCH_MAILPIT_API", required=True, help="Mailpit's HTTP API base URL.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report file.")
def bench_nudges(
    decisions: int, concurrency: tuple[int, ...], chain: int, rounds: int, admin: str, smtp: str, api: str,
    output: Path | None,
) -> None:  # fmt: skip
    """Nudge decisions per second and stuck → delivered into Mailpit, each against a baseline (docs/benchmarks.md)."""
    from benchmarks.common import BenchError
    from benchmarks.nudges import run_nudges_benchmark

    try:
        report = run_nudges_benchmark(
            admin, smtp, api, decisions=decisions, concurrency=concurrency, chain=chain, rounds=rounds
        )
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(report, output)


@main.command("destinations")
@click.option("--events", default=10_000, show_default=True, type=click.IntRange(100, 1_000_000), help="Per type, run.")
@click.option(
    "--kind", "kinds", multiple=True, type=click.Choice(["segment", "mixpanel", "amplitude", "intercom", "webhook"]),
    help="Measure only this destination type (repeat for several; default: all).",
)  # fmt: skip
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 10), help="Runs per type (best kept).")
@click.option("--admin", envvar="FIRSTMILE_BENCH_ADMIN_URL", required=True, help="The bench PostgreSQL (superuser).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report file.")
def bench_destinations(events: int, kinds: tuple[str, ...], rounds: int, admin: str, output: Path | None) -> None:
    """Events delivered per second per destination type (queue + worker) vs the bare official client (loopback)."""
    from benchmarks.common import BenchError
    from benchmarks.destinations import KINDS, run_destinations_benchmark

    try:
        report = run_destinations_benchmark(admin, events=events, kinds=kinds or KINDS, rounds=rounds)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(report, output)


@main.command("tenant-training")
@click.option("--decisions", default=100_000, show_default=True, type=click.IntRange(1_000, 2_000_000))
@click.option("--admin", envvar="FIRSTMILE_BENCH_ADMIN_URL", required=True, help="The bench PostgreSQL (superuser).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Report file.")
@click.option("--ray", "ray_address", envvar="FIRSTMILE_BENCH_RAY_ADDRESS", default=None,
              help="Also train on this Ray cluster (deploy/local/ray.sh start bench: 127.0.0.1:57200).")  # fmt: skip
def bench_tenant_training(decisions: int, admin: str, output: Path | None, ray_address: str | None) -> None:
    """`models train --tenant` end to end (read, build, train, report, register) per 100k logged decisions vs the
    same training in memory; with --ray, training as a Ray task too."""
    from benchmarks.common import BenchError
    from benchmarks.tenant_training import run_tenant_training_benchmark

    try:
        report = run_tenant_training_benchmark(admin, decisions=decisions, ray_address=ray_address)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(report, output)


@main.command("cost")
@click.option("--prices", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--usage", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None)
@click.option("--write", is_flag=True, help="Also replace the generated part of docs/cost.md.")
@click.option("--check", is_flag=True, help="Fail when docs/cost.md's generated part differs from the tables.")
def bench_cost(prices: Path | None, usage: Path | None, write: bool, check: bool) -> None:
    """Cost per user, per 1k events and per 1k inferences from deploy/cost/*.yaml (docs/cost.md); measures nothing."""
    from benchmarks.cost import DOC, PRICES, USAGE, CostModelError, generated_part, run_cost

    try:
        text = run_cost(prices or PRICES, usage or USAGE, DOC, write=write)
        if check and generated_part(DOC.read_text(encoding="utf-8")) != text:
            raise CostModelError("docs/cost.md differs from deploy/cost/*.yaml: run `make cost` and commit the page")
    except CostModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(text, nl=False)


if __name__ == "__main__":
    main(prog_name="python -m benchmarks")
