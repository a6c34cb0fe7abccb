"""``make bench-nudges``: how fast the nudge executor decides, and how long stuck → delivered takes.

Three measurements on the bench PostgreSQL and the bench Mailpit, each with its baseline in the
same run (docs/benchmarks.md, issue 15):

1. **Decision core** (policy for two channels, the bandit over the arms, the chosen template
   rendered; no I/O), against rendering the same template alone.
2. **Decisions** (``NudgeExecutor.on_stuck`` in its own transaction: the user's progress and path,
   the tenant's nudge section, the policy's inputs under their deadline, the arm counts, the send
   and the audit entry written), one at a time and with ``concurrency`` tasks on one process,
   against a transaction that only reads the user's progress (the decision's first statement).
3. **Stuck → delivered** (the trigger consumer decides from an ``onboarding.stuck`` event, the
   delivery worker decrypts the address and sends over SMTP, the mail is visible in Mailpit's API),
   against an SMTP send of a message of the same size straight to Mailpit until it is visible,
   interleaved. What it leaves out: the relay's delay from the outbox to the consumer
   (``make bench-events``) and the wait for the delivery worker's next pass (half of
   ``FIRSTMILE_NUDGE_DELIVERY_INTERVAL_SECONDS`` on average).
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.common import BenchError, _log, bench_tenant, demo_manifest
from benchmarks.database import _execute, _provision, fresh_bench_database

PEPPER = b"bench-nudges-pepper-0123456789abcdef"
STEP = "create-api-key"


@dataclass(frozen=True)
class Rate:
    label: str
    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Latencies:
    label: str
    samples: tuple[float, ...]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class NudgeFacts:
    core: Rate
    render: Rate
    decisions: list[tuple[int, Rate, Rate]]
    """(concurrency, decisions, baseline transactions)."""
    chain: Latencies
    smtp: Latencies
    postgres: str
    mailpit: str
    command: str


def _settings(data_dir: Path) -> Any:
    from firstmile.settings import Settings

    return Settings(  # type: ignore[call-arg]
        region="eu-west-1",
        api_key_cache_ttl_seconds=0,
        log_level="WARNING",
        model_registry_uri=str(data_dir / "no-models"),
        stuck_scan_interval_seconds=0,
        nudge_delivery_interval_seconds=0,
        nudge_trigger_scan_seconds=0,
        in_process_sequencer=False,
        data_dir=data_dir,
    )


def _core(rounds: int) -> tuple[Rate, Rate]:
    """The decision's pure part against rendering its template alone."""
    from firstmile.kit.templates import render
    from firstmile.nudges.bandit import ArmStats, ThompsonSampler
    from firstmile.nudges.content import STUCK_VARIANTS
    from firstmile.nudges.policy import Audience, NudgePolicy, evaluate

    policy, audience, sampler = NudgePolicy(), Audience("Europe/Berlin"), ThompsonSampler(random.Random(7))
    now = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    sent = [datetime(2026, 12, 5, 9, 0, tzinfo=UTC)]
    context = {"link": "https://example.invalid/l/x", "step": {"title": "Create an API key", "description": "Keys"},
               "path": {"name": "Developer quickstart"}, "tenant": {"name": "Acme"}}  # fmt: skip
    arms = [ArmStats(f"{v}|{c}|policy", 3, 7) for v in STUCK_VARIANTS for c in ("email", "in_app")]
    template = STUCK_VARIANTS["short"]["email"]

    def decide() -> None:
        for channel in ("email", "in_app"):
            evaluate(policy, audience, channel, "onboarding", now, sent)
        choice = sampler.choose(arms)
        chosen = STUCK_VARIANTS[choice.arm.split("|")[0]][choice.arm.split("|")[1]]
        render(chosen.subject or "", context)
        render(chosen.body, context)

    def render_only() -> None:
        render(template.subject or "", context)
        render(template.body, context)

    results = []
    for label, call in (("decision core", decide), ("render alone", render_only)):
        call()
        started = time.perf_counter()
        for _ in range(rounds):
            call()
        results.append(Rate(label, rounds, time.perf_counter() - started))
    return results[0], results[1]


async def _timed_pool(users: Sequence[str], concurrency: int, call: Callable[[str], Awaitable[Any]]) -> float:
    queue = list(users)

    async def worker() -> None:
        while queue:
            await call(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _mail_visible(http: httpx.AsyncClient, address: str, deadline_s: float = 10.0) -> None:
    until = time.perf_counter() + deadline_s
    while time.perf_counter() < until:
        found = (await http.get("/api/v1/search", params={"query": f"to:{address}"})).raise_for_status().json()
        if found["messages_count"] or found.get("total", 0):
            return
        await asyncio.sleep(0.002)
    raise BenchError(f"mail to {address} not in Mailpit after {deadline_s} s")


async def _measure(
    db: Any, key: str, tenant_id: uuid.UUID, smtp: str, api: str, decisions: int, concurrency: Sequence[int],
    chain: int, data_dir: Path,
) -> tuple[list[tuple[int, Rate, Rate]], Latencies, Latencies, str]:  # fmt: skip
    from litestar.testing import AsyncTestClient

    from firstmile.analytics.chdb_store import ChdbStore
    from firstmile.app import create_app
    from firstmile.events.envelope import Envelope
    from firstmile.kit.db import create_engine, tenant_transaction
    from firstmile.kit.uow import UnitOfWork
    from firstmile.nudges.bandit import ThompsonSampler
    from firstmile.nudges.channels import OutboundMessage
    from firstmile.nudges.consumer import NudgeTriggers
    from firstmile.nudges.email_smtp import SmtpChannel
    from firstmile.nudges.policy import NudgePolicy
    from firstmile.nudges.service import DeliveryWorker, NudgeExecutor
    from firstmile.onboarding.catalog import CatalogCache
    from firstmile.onboarding.service import OnboardingService

    store = ChdbStore(data_dir / "chdb")
    store.ensure_schema()
    app = create_app(_settings(data_dir), db.app_url, PEPPER, analytics=store)
    tenant = bench_tenant(tenant_id)
    headers = {"Authorization": f"Bearer {key}"}
    run = uuid.uuid4().hex[:6]
    total = decisions * len(concurrency) + chain
    users = [f"nb-{run}-{i:06d}" for i in range(total)]
    async with AsyncTestClient(app=app) as client:
        _log(f"starting {total} users")
        for i, user in enumerate(users):
            traits = {"persona": "developer", "email": f"{user}@bench.invalid", "timezone": "UTC"}
            r = await client.post("/v1/onboarding/start", json={"user_id": user, "traits": traits}, headers=headers)
            if r.status_code != 201:
                raise BenchError(f"start {user}: {r.status_code} {r.text}")
            if i and i % 1000 == 0:
                _log(f"  {i} started")
        container = app.state.container
        engine = create_engine(db.app_url, pool_size=max(concurrency) + 2, max_overflow=0, application_name="bench")
        anytime = NudgePolicy(quiet_start=None, quiet_end=None)
        executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email", "in_app"], anytime,
                                 ThompsonSampler(random.Random(1)), links=container.link_signer,
                                 setup_ttl=30.0)  # as the platform wires it  # fmt: skip
        try:
            measured: list[tuple[int, Rate, Rate]] = []
            for round_, n in enumerate(concurrency):
                batch = users[round_ * decisions : (round_ + 1) * decisions]

                async def decide(user: str) -> None:
                    uow = UnitOfWork(engine, tenant)
                    await uow.run(lambda tx: executor.on_stuck(tx, user, STEP, datetime.now(UTC)))

                async def read(user: str) -> None:
                    async with tenant_transaction(engine, tenant, commit=False) as tx:
                        await executor.onboarding.progress(tx, user)

                await _timed_pool(batch[:50], n, read)  # warm the pool and the plans
                baseline = Rate(f"progress read, {n} at a time", len(batch), await _timed_pool(batch, n, read))
                _log(f"deciding {len(batch)} nudges, {n} at a time")
                rate = Rate(f"decision, {n} at a time", len(batch), await _timed_pool(batch, n, decide))
                measured.append((n, rate, baseline))
            # the decision rounds' sends are not part of the chain: set them aside so the worker sees only the chain's
            await _execute(db.admin_dsn, "UPDATE nudge_sends SET status = 'dead' WHERE status = 'scheduled'")
            executor = NudgeExecutor(OnboardingService(CatalogCache()), ["email"], anytime,
                                     ThompsonSampler(random.Random(2)), links=container.link_signer)  # fmt: skip
            chained = users[-chain:]
            host, port = urlsplit(smtp).hostname or "127.0.0.1", urlsplit(smtp).port or 25
            channel = SmtpChannel(host, port, "nudges@bench.invalid")
            worker = DeliveryWorker(engine, {"email": channel}, container.keyring, links=container.link_signer)
            triggers = NudgeTriggers(engine, executor, worker.outcome_window)
            chain_s: list[float] = []
            smtp_s: list[float] = []
            async with httpx.AsyncClient(base_url=api, timeout=10) as http:
                version = (await http.get("/api/v1/info")).raise_for_status().json().get("Version", "?")
                for user in chained:
                    event = Envelope(uuid.uuid4(), tenant_id, "onboarding.stuck", datetime.now(UTC),
                                     {"user_id": user, "step_id": STEP})  # fmt: skip
                    started = time.perf_counter()
                    await triggers.handle([event])
                    outcomes = await worker.deliver_tenant(tenant)
                    if [o.status for o in outcomes] != ["sent"]:
                        raise BenchError(f"delivery of {user}'s nudge: {outcomes}")
                    await _mail_visible(http, f"{user}@bench.invalid")
                    chain_s.append(time.perf_counter() - started)
                    direct = f"direct-{user}@bench.invalid"
                    started = time.perf_counter()
                    await channel.send(OutboundMessage("email", direct, "x" * 600, uuid.uuid4().hex,
                                                       subject="Your next step: Create an API key"))  # fmt: skip
                    await _mail_visible(http, direct)
                    smtp_s.append(time.perf_counter() - started)
        finally:
            await engine.dispose()
    store.close()
    return (
        measured,
        Latencies("stuck → delivered", tuple(chain_s)),
        Latencies("SMTP send → visible", tuple(smtp_s)),
        (str(version)),
    )


def run_nudges_benchmark(
    admin: str, smtp: str, api: str, *, decisions: int, concurrency: Sequence[int], chain: int, rounds: int
) -> str:
    """Run the three measurements (see the module docstring); the markdown report."""
    db = fresh_bench_database(admin)
    key, tenant_id = asyncio.run(_provision(db.admin_url, PEPPER, demo_manifest()))
    _log("decision core")
    core, render_only = _core(rounds)
    with tempfile.TemporaryDirectory(prefix="firstmile-bench-nudges-") as tmp:
        measured, chain_l, smtp_l, mailpit = asyncio.run(
            _measure(db, key, tenant_id, smtp, api, decisions, concurrency, chain, Path(tmp))
        )
    facts = NudgeFacts(
        core, render_only, measured, chain_l, smtp_l, db.server.settings.get("server_version", "?"), mailpit,
        f"make bench-nudges  # python -m benchmarks nudges --decisions {decisions} "
        f"{' '.join(f'--concurrency {n}' for n in concurrency)} --chain {chain}",
    )  # fmt: skip
    return report(facts)


def report(f: NudgeFacts) -> str:
    ms = 1000
    lines = [
        "# Nudges: decisions and stuck → delivered",
        "",
        f"Command: `{f.command}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs; PostgreSQL "
        f"{f.postgres}; Mailpit {f.mailpit}; everything on this machine.",
        "",
        "| measurement | rate | baseline (same run) | ratio |",
        "| --- | --- | --- | --- |",
        f"| decision core (policy for 2 channels, bandit, render) | {f.core.per_second:,.0f}/s | "
        f"{f.render.per_second:,.0f}/s rendering the template alone | {f.core.per_second / f.render.per_second:.2f} |",
    ]
    for n, rate, base in f.decisions:
        lines.append(
            f"| decisions with PostgreSQL, {n} at a time | {rate.per_second:,.0f}/s ({rate.count:,}) | "
            f"{base.per_second:,.0f}/s progress-read transactions | {rate.per_second / base.per_second:.2f} |"
        )
    lines += [
        "",
        "| latency | p50 | p95 | max | baseline p50 | baseline p95 | p95 ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| stuck → delivered into Mailpit ({len(f.chain.samples)} users) | {f.chain.percentile(50) * ms:.1f} ms | "
        f"{f.chain.percentile(95) * ms:.1f} ms | {max(f.chain.samples) * ms:.1f} ms | "
        f"{f.smtp.percentile(50) * ms:.1f} ms | {f.smtp.percentile(95) * ms:.1f} ms | "
        f"{f.chain.percentile(95) / f.smtp.percentile(95):.2f} |",
        "",
        f"Stuck → delivered median over the SMTP baseline's: {statistics.median(f.chain.samples) * ms:.1f} ms "
        f"against {statistics.median(f.smtp.samples) * ms:.1f} ms. Left out: the relay's delay (make bench-events) "
        "and the wait for the delivery worker's next pass (half the interval on average).",
        "",
    ]
    return "\n".join(lines)
