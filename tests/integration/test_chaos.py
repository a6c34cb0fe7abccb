"""Reliability harness: the chaos test (issue 14, item 5b).

The platform runs in its production shape, each part its own process: ``firstmile serve`` (the API, with
``FIRSTMILE_IN_PROCESS_SEQUENCER=false``), ``firstmile relay``, ``firstmile consume analytics progress
features`` and ``firstmile sequencer``, on a PostgreSQL cluster, a Redis, a Kafka broker and a Ray Serve
node of this test's own (``tests/support/chaos.py``: the suite's shared ``test`` instances are never
touched). A few clients drive onboarding journeys through the API the whole time (start a user, complete
the step the answer names, send a batch of Segment events, one of which completes the next step through
the event stream) while the test kills with SIGKILL, in turn, and restarts each of: PostgreSQL, Redis,
the Kafka broker, the relay, the consumers, the audit log's sequencer and the Ray Serve model replica
(Serve's controller restarts that one). A client retries a refused write after its ``Retry-After``, as
the API tells it to. A worker that ends on its own meanwhile is restarted, as Kubernetes would, and named
in the figures.

Afterwards, with everything drained:

- every acknowledged write is there exactly once: each started user (``user_progress``, its
  ``path_selection`` audit entry, its ``onboarding.started`` event in analytics), each completed step
  (``step_completions`` and its ``onboarding.step_completed`` event), each accepted Segment message (its
  event in analytics, by ``uuid5(tenant, messageId)``), and the consumers' effect: the step an event
  completed, with its ``step_completion`` audit entry and event; no event id is in analytics twice;
- during every outage the API answered only what it documents: the success, or ``503`` problem+json
  with ``Retry-After`` (``429`` with it would be documented too), never a 500, never a connection
  error (the API itself is never killed) and never no answer within the client's timeout; while Ray
  Serve is down starts still succeed and the rules decide (``fallback: rules``), while Redis is down
  the rate limits fall back to the process (``firstmile_rate_limit_fallbacks_total`` rises) and
  nothing is refused.

The figures (faults injected, requests, answers, writes checked) are printed at the end of the run
(``tests/support/figures.py``). The test runs with the Ray Serve tests' xdist group, so that only one
Ray node runs at a time on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import TopicPartition
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from firstmile.controlplane.service import apply_manifest
from firstmile.events.bus import topic_for
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.manifest import TenantManifest
from firstmile.wiring.migrate import upgrade
from tests.conftest import PEPPER, REGION
from tests.factories import demo_document, manifest_for, recreate_database
from tests.support import figures
from tests.support.chaos import (
    FIRSTMILE,
    KafkaBroker,
    PostgresCluster,
    RayServe,
    RedisServer,
    ServiceError,
    Spawned,
    Stack,
    free_ports,
    secret_file,
    stack,
)

pytestmark = pytest.mark.xdist_group("ray")

CLIENTS = 4
"""Journeys in flight at once."""
PAUSE_S = 0.25
"""Each client's pause between two journeys: bounded load on a shared 2-core machine (the restarts need CPU too)."""
CLIENT_TIMEOUT_S = 10.0
"""An answer must come within this; none is a hang, a failure of the test."""
RETRY_FOR_S = 60.0
"""How long a client keeps retrying a write the API refused with 503 and Retry-After."""
OUTAGE_S = 3.0
"""How long each killed part stays down before it is started again."""
RECOVERY_S = 90.0
"""How long the platform may take to show it recovered from one fault."""
DRAIN_S = 120.0
RELAY_LOGIN = "firstmile_relay_chaos"
PROBLEM = "application/problem+json"
FALLBACK_REASONS = frozenset(
    {"timeout", "circuit_open", "unavailable", "not_deployed", "bad_response", "invalid_prediction",
     "feature_store_unavailable"}
)  # fmt: skip
"""Why the rules decided instead of the model (docs/api.md, POST /v1/onboarding/start)."""
TICK = "Chaos Tick"
"""A tracked event no step completes on."""


# ------------------------------------------------------------------------------------ the platform

_BEGAN = [time.monotonic()]


def _log(message: str) -> None:
    """A line with the time since the platform began to start: shown with a failure (``pytest -s``: live)."""
    print(f"[chaos {time.monotonic() - _BEGAN[0]:6.1f} s] {message}", flush=True)


@dataclass
class Platform:
    work: Path
    pg: PostgresCluster
    redis: RedisServer
    kafka: KafkaBroker
    ray: RayServe
    ray_starting: asyncio.Task[None]
    """Ray Serve starts beside the first faults; the Ray Serve fault waits for it."""
    api: Spawned
    relay: Spawned
    consumers: Spawned
    sequencer: Spawned
    base: str
    key: str
    tenant_id: uuid.UUID
    manifest: TenantManifest
    admin_url: str
    prefix: str
    analytics_path: Path
    phase: str = "warm-up"
    held_down: set[str] = field(default_factory=set)
    """The parts a fault has killed and not restarted yet."""
    restarted: Counter[str] = field(default_factory=Counter)
    """Workers restarted by :meth:`supervise` after they ended on their own."""

    def processes(self) -> list[Spawned]:
        return [self.api, self.relay, self.consumers, self.sequencer]

    def supervise(self, phase: str) -> None:
        """Restart a worker that ended on its own, as Kubernetes would (a consumer ends when it fails);
        the API must never end, and a part the test holds down stays down."""
        assert self.api.running, f"the API process ended\n{self.logs()}"
        for process in self.processes():
            if process.name not in self.held_down and not process.running:
                last = [line for line in process.tail(4000).splitlines() if line.strip()][-3:]
                _log(
                    f"{process.name} ended on its own ({phase}; exit status {process.returncode}): restarted; "
                    + " | ".join(last)
                )
                self.restarted[f"{process.name} ended on its own ({phase})"] += 1
                process.start()

    def logs(self) -> str:
        """The tails of the platform's logs, for a failure's message."""
        parts = [f"--- {p.name} ({p.log})\n{p.tail(1500)}" for p in self.processes()]
        return f"work folder {self.work}\n" + "\n".join(parts)


def _train_tiny(registry: Path) -> None:
    """A path classifier good enough to answer (seconds to train), staged as production."""
    from firstmile_inference.registry import Registry
    from firstmile_inference.schema import MODEL_NAMES
    from firstmile_inference.simulate import generate
    from firstmile_inference.train import Hyper, register_all, train_all

    hyper: dict[str, Hyper] = {name: Hyper(epochs=1, batch_size=256, hidden=(16,)) for name in MODEL_NAMES}
    trained = train_all(generate(400, seed=14), seed=14, hyper=hyper, threads=1)
    register_all(Registry(registry), trained, promote_to="production")


def _environment(**settings: str) -> dict[str, str]:
    """The process environment without the caller's Firstmile settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return env | {f"FIRSTMILE_{name.upper()}": value for name, value in settings.items()}


async def _ready(process: Spawned, url: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if not process.running:
                raise ServiceError(f"{process.name} exited:\n{process.tail()}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{process.name} not ready within {within:.0f} s:\n{process.tail()}")
            await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
async def platform(request: pytest.FixtureRequest, worker_id: str) -> AsyncIterator[Platform]:
    _BEGAN[0] = time.monotonic()
    tag = os.environ.get("FIRSTMILE_TEST_DB_TAG", "")
    work = Path(tempfile.mkdtemp(prefix=f"fm-chaos-{tag}{worker_id}-"))  # short: PostgreSQL's socket lives here
    os.chmod(work, 0o755)  # the postgres user runs the cluster below it
    failures = request.session.testsfailed
    with stack() as started:
        built = await _build(work, started)
        try:
            yield built
        finally:
            with contextlib.suppress(BaseException):
                await built.ray_starting  # stopped below only once it has started: nothing is left behind
    if request.session.testsfailed == failures:  # kept with their logs for inspection when the test failed
        built.ray.forget()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Backing:
    """The services under the platform, and what provisioning made in them."""

    pg: PostgresCluster
    redis: RedisServer
    kafka: KafkaBroker
    ray: RayServe
    registry: Path
    admin_url: str = ""
    app_url: str = ""
    relay_url: str = ""
    key: str = ""
    tenant_id: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    manifest: TenantManifest | None = None


async def _build(work: Path, started: Stack) -> Platform:
    pg_port, redis_port, api_port, *kafka_ports = free_ports(6)
    backing = Backing(
        PostgresCluster(work / "pg", pg_port),
        RedisServer(work / "redis", redis_port),
        KafkaBroker(work / "kafka", kafka_ports),
        RayServe(work.name, work / "registry"),
        work / "registry",
    )
    # Ray Serve is the slow part (about a minute on 2 cores): it starts first and goes on while the platform
    # starts and the test runs the faults that do not need it; it deploys once the models are trained.
    trained = threading.Event()
    started.started(backing.ray.stop)
    ray_starting = asyncio.create_task(asyncio.to_thread(backing.ray.start, trained.wait))
    try:
        training = asyncio.create_task(asyncio.to_thread(_train_tiny, backing.registry))
        try:
            await _provision(backing, started)
            await training
        finally:
            trained.set()  # a failed training fails the deploy: nothing waits for ever
            with contextlib.suppress(BaseException):
                await training
        return await _start_platform(work, backing, api_port, ray_starting, started)
    except BaseException:
        with contextlib.suppress(BaseException):
            await ray_starting
        raise


async def _provision(backing: Backing, started: Stack) -> None:
    """Start PostgreSQL, Redis and Kafka; create and migrate the database, the relay's login, a tenant and its key."""
    for service in (backing.pg, backing.redis, backing.kafka):
        started.started(service.stop)
        await asyncio.to_thread(service.start)
    _log("PostgreSQL, Redis and Kafka are up")
    backing.admin_url = await asyncio.to_thread(recreate_database, make_url(backing.pg.url()), "firstmile")
    await asyncio.to_thread(upgrade, backing.admin_url, "firstmile_app")
    backing.app_url = backing.pg.url("firstmile_app", "firstmile")
    backing.relay_url = backing.pg.url(RELAY_LOGIN, "firstmile")
    slug = f"chaos-{secrets.token_hex(4)}"
    backing.manifest = manifest_for(slug, REGION, demo_document(planner=True))
    engine = create_async_engine(backing.admin_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER ROLE firstmile_app LOGIN"))
            await conn.execute(text(f"CREATE ROLE {RELAY_LOGIN} LOGIN IN ROLE firstmile_relay"))
        backing.tenant_id = (await apply_manifest(engine, backing.manifest)).tenant_id
        backing.key = (await create_key(engine, PEPPER, slug, ["onboarding:write", "events:write"], "chaos")).key
    finally:
        await engine.dispose()


async def _start_platform(
    work: Path, backing: Backing, api_port: int, ray_starting: asyncio.Task[None], started: Stack
) -> Platform:
    """The platform's processes in their production shape: the API, the relay, the consumers, the sequencer."""
    prefix = f"chaos{secrets.token_hex(3)}"
    data = work / "data"
    data.mkdir()
    common = _environment(
        region=REGION,
        data_dir=str(data),
        database_url=backing.app_url,
        database_admin_url=backing.admin_url,
        relay_database_url=backing.relay_url,
        api_key_pepper=PEPPER.decode(),
        audit_signing_key_file=secret_file(work / "audit_signing_key"),
        kek_file=secret_file(work / "kek"),
        kafka_bootstrap_servers=backing.kafka.bootstrap,
        kafka_topic_prefix=prefix,
        kafka_partitions="3",
        relay_batch_size="200",
        redis_url=backing.redis.url,
        model_registry_uri=str(backing.registry),
        inference_url=backing.ray.url,
        inference_timeout_ms="300",
        inference_breaker_reset_seconds="1",
        rate_limit_key_requests="1000000",
        rate_limit_tenant_requests="1000000",
        rate_limit_fallback_seconds="1",
        stuck_scan_interval_seconds="0",
        in_process_schedulers="false",
        in_process_sequencer="false",
        log_level="WARNING",
        log_format="json",
    )
    consumers_chdb = work / "chdb-consumers"
    relay = Spawned("relay", [str(FIRSTMILE), "relay"], common, work / "relay.log")
    consumers = Spawned(
        "consumers",
        [str(FIRSTMILE), "consume", "analytics", "progress", "features"],
        common | {"FIRSTMILE_ANALYTICS_PATH": str(consumers_chdb)},
        work / "consumers.log",
    )
    sequencer = Spawned("sequencer", [str(FIRSTMILE), "sequencer"], common, work / "sequencer.log")
    api = Spawned(
        "api",
        [str(FIRSTMILE), "serve", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"],
        common | {"FIRSTMILE_ANALYTICS_PATH": str(work / "chdb-api")},
        work / "api.log",
    )
    for process in (relay, consumers, sequencer, api):
        started.started(process.stop)
        process.start()
    base = f"http://127.0.0.1:{api_port}"
    await _ready(api, f"{base}/health/ready")
    _log("the platform is up")
    assert backing.manifest is not None
    return Platform(
        work, backing.pg, backing.redis, backing.kafka, backing.ray, ray_starting, api, relay, consumers, sequencer,
        base, backing.key, backing.tenant_id, backing.manifest, backing.admin_url, prefix, consumers_chdb,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the load


def _properties_for(step: Any) -> dict[str, Any] | None:
    """Properties that meet a step's completion predicates, or None when this test cannot make them."""
    props: dict[str, Any] = {}
    for predicate in step.completion.where:
        if predicate.op in ("eq", "gte", "lte", "contains"):
            props[predicate.field] = predicate.value
        elif predicate.op == "in":
            props[predicate.field] = predicate.value[0]
        elif predicate.op == "exists" and predicate.value is True:
            props[predicate.field] = "yes"
        else:
            return None
    return props


@dataclass
class Load:
    """Clients driving onboarding journeys; what the API acknowledged, and every answer it gave, by phase."""

    platform: Platform
    run: str = field(default_factory=lambda: f"c{secrets.token_hex(3)}")
    stopping: bool = False
    paused: bool = False
    """Clients start no journey while set."""
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(phase, "<op> <answer>") -> count; op is start, complete or events, the answer a status or a failure's name."""
    violations: list[str] = field(default_factory=list)
    slowest: dict[str, float] = field(default_factory=dict)
    """phase -> the longest a request of it waited for its answer (seconds; a figure, never asserted)"""
    started: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Acknowledged starts: user -> {path, phase, selected_by, fallback, fallback_reason, at}."""
    attempted: set[str] = field(default_factory=set)
    completed: dict[tuple[str, str], str] = field(default_factory=dict)
    """Acknowledged step completions: (user, step) -> phase."""
    messages: dict[str, str] = field(default_factory=dict)
    """Acknowledged Segment messages: messageId -> user."""
    by_event: dict[tuple[str, str], uuid.UUID] = field(default_factory=dict)
    """Steps an acknowledged event should complete through the stream: (user, step) -> event id."""
    gave_up: int = 0
    counter: int = 0

    def __post_init__(self) -> None:
        self.paths = {p.id: p for p in self.platform.manifest.paths}

    @property
    def phase(self) -> str:
        """What the test is doing now ("warm-up", "<fault> down", "<fault> restarting", "<fault> back")."""
        return self.platform.phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.platform.phase = value

    async def send(
        self, client: httpx.AsyncClient, op: str, method: str, path: str, ok: set[int], body: Any = None
    ) -> Any:
        """Send until the API acknowledges (returns the body) or answers what it should not (returns None)."""
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            phase = self.phase
            sent = time.monotonic()
            try:
                response = await client.request(method, path, json=body)
                self.slowest[phase] = max(self.slowest.get(phase, 0.0), time.monotonic() - sent)
            except httpx.TimeoutException:
                self._violation(phase, f"{op} timeout", f"{op}: no answer within {CLIENT_TIMEOUT_S:.0f} s")
                return None
            except httpx.TransportError as exc:
                self._violation(phase, f"{op} transport", f"{op}: {type(exc).__name__}: {exc}")
                return None
            status = response.status_code
            self.answers[(phase, f"{op} {status}")] += 1
            if status in ok:
                return response.json()
            retry_after = response.headers.get("retry-after", "")
            documented = (
                status in (503, 429)
                and response.headers.get("content-type", "").startswith(PROBLEM)
                and retry_after.isdigit()
                and response.json().get("status") == status
            )
            if not documented:
                self._violation(phase, f"{op} {status}", f"{op} {method} {path}: {status} {response.text[:400]}")
                return None
            if self.stopping:  # the end of the run: this write stays unacknowledged (checked: at most once)
                return None
            if time.monotonic() > deadline:
                self.gave_up += 1
                return None
            await asyncio.sleep(min(float(retry_after), 1.0))

    def _violation(self, phase: str, answer: str, what: str) -> None:
        self.answers[(phase, answer)] += 1
        self.violations.append(f"[{phase}] {what}")

    async def journey(self, client: httpx.AsyncClient) -> None:
        self.counter += 1
        user = f"{self.run}-{self.counter}"
        rng = random.Random(user)
        traits = {
            "persona": rng.choice(["developer", "analyst", "admin", "marketer"]),
            "company_size": rng.choice(["1-10", "11-50", "201-1000"]),
        }
        self.attempted.add(user)
        state = await self.send(
            client, "start", "POST", "/v1/onboarding/start", {200, 201}, {"user_id": user, "traits": traits}
        )
        if state is None:
            return
        decision = state["decision"]
        self.started[user] = {
            "path": state["path"]["id"],
            "phase": self.phase,
            "selected_by": decision["selected_by"],
            "fallback": decision.get("fallback"),
            "fallback_reason": decision.get("fallback_reason"),
            "at": time.monotonic(),
        }
        first = state["current_step"]
        done = await self.send(client, "complete", "POST", f"/v1/onboarding/{user}/steps/{first}/complete", {200})
        if done is None:
            return
        self.completed[(user, first)] = self.phase
        batch: list[dict[str, Any]] = []
        path = self.paths[state["path"]["id"]]
        available = [s["id"] for s in done["steps"] if s["available"]]
        step = next((s for s in path.steps if available and s.id == available[0]), None)
        properties = _properties_for(step) if step is not None else None
        event_step: tuple[str, str, str] | None = None
        if step is not None and properties is not None:
            message = uuid.uuid4().hex
            batch.append(
                {"type": "track", "messageId": message, "userId": user, "event": step.completion.event,
                 "properties": properties}
            )  # fmt: skip
            event_step = (user, step.id, message)
        batch.append({"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": TICK})
        batch.append({"type": "identify", "messageId": uuid.uuid4().hex, "userId": user, "traits": {"plan": "pro"}})
        accepted = await self.send(client, "events", "POST", "/v1/events", {202}, {"batch": batch})
        if accepted is None:
            return
        if accepted["rejected"] or accepted["accepted"] + accepted["duplicates"] != len(batch):
            self.violations.append(f"[{self.phase}] events: {accepted}")
            return
        for sent in batch:
            self.messages[sent["messageId"]] = user
        if event_step is not None:
            owner, step_id, message_id = event_step
            self.by_event[(owner, step_id)] = uuid.uuid5(self.platform.tenant_id, message_id)

    async def client(self) -> None:
        headers = {"Authorization": f"Bearer {self.platform.key}"}
        async with httpx.AsyncClient(base_url=self.platform.base, headers=headers, timeout=CLIENT_TIMEOUT_S) as c:
            while not self.stopping:
                if not self.paused:
                    await self.journey(c)
                await asyncio.sleep(PAUSE_S)

    def acked_since(self, since: float, selected_by: str | None = None) -> int:
        return sum(
            1
            for s in self.started.values()
            if s["at"] >= since and (selected_by is None or s["selected_by"] == selected_by)
        )


# ------------------------------------------------------------------------------------- observations


async def _scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


def _committed(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(the group's committed offsets summed, the lag behind the partitions' ends)."""
    consumer = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        total = lag = 0
        for tp in committed:
            high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
            total += max(tp.offset, 0)
            lag += high - max(tp.offset, 0)
        return total, lag
    finally:
        consumer.close()


def _metric(text_: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text_.splitlines() if line.startswith((f"{name} ", f"{name}{{")))


async def _api_metric(platform: Platform, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        return _metric((await client.get(f"{platform.base}/metrics")).text, name)


def _analytics_counts(path: Path, tenant_id: uuid.UUID) -> tuple[list[dict[str, Any]], int]:
    """Rows per event id of the merged view (FINAL: the ReplacingMergeTree folds a redelivered event's copies, which
    carry the same sorting key), and every stored row, copies included; read from the consumers' chdb folder by a
    process of its own (chdb opens one folder a process)."""
    code = (
        "import json, sys\n"
        "from firstmile.analytics.chdb_store import ChdbStore\n"
        "s = ChdbStore(sys.argv[1])\n"
        "t = {'t': sys.argv[2]}\n"
        "rows = s.dangerous_raw_sql('SELECT toString(event_id) AS id, any(event_type) AS type, any(user_id) AS user,"
        " any(step_id) AS step, count() AS n FROM events FINAL WHERE tenant_id = {t:UUID} GROUP BY event_id', t)\n"
        "stored = s.dangerous_raw_sql('SELECT count() AS n FROM events WHERE tenant_id = {t:UUID}', t)[0]['n']\n"
        "print(json.dumps({'rows': rows, 'stored': int(stored)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tenant_id)], check=True, capture_output=True, timeout=120
    )
    found: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return found["rows"], found["stored"]


# ------------------------------------------------------------------------------------------ the faults


@dataclass
class Fault:
    name: str
    kill: Callable[[], None]
    restart: Callable[[], None]
    recovered: Callable[[Restart], Awaitable[bool]]
    """Has the platform shown, since the restart, that it works again?"""
    ready: Callable[[], Awaitable[None]] | None = None
    """What to wait for before the kill (Ray Serve starts beside the first faults)."""


@dataclass(frozen=True)
class Restart:
    at: float
    """time.monotonic() when the part was started again"""
    db_at: datetime
    """PostgreSQL's clock then"""


def _faults(platform: Platform, load: Load, engine: AsyncEngine) -> list[Fault]:
    topic = topic_for(platform.prefix, REGION)
    group = f"{platform.prefix}.{REGION}.analytics"

    async def serving(since: Restart) -> bool:
        return load.acked_since(since.at) > 0

    async def outbox_drained(since: Restart) -> bool:
        """Serving, and every row the outbox held at the restart has left it (the relay published it)."""
        left = await _scalar(engine, "SELECT count(*) FROM outbox WHERE enqueued_at <= :t", t=since.db_at)
        return left == 0 and await serving(since)

    async def queue_drained(since: Restart) -> bool:
        """Serving, and every audit entry queued before the restart is in the log (the sequencer placed it)."""
        left = await _scalar(engine, "SELECT count(*) FROM audit_queue WHERE created_at <= :t", t=since.db_at)
        return left == 0 and await serving(since)

    consumed_at_restart: list[int] = []

    def restart_consumers() -> None:
        consumed_at_restart.append(_committed(platform.kafka.bootstrap, topic, group)[0])
        platform.consumers.start()

    async def consuming(since: Restart) -> bool:
        committed, _ = await asyncio.to_thread(_committed, platform.kafka.bootstrap, topic, group)
        return committed > consumed_at_restart[-1]

    async def model_decides(since: Restart) -> bool:
        return await asyncio.to_thread(platform.ray.predicts) and load.acked_since(since.at, "model") > 0

    def replica_restarts() -> None:
        """Serve's controller starts a new replica of its own accord: nothing to do but wait for it."""

    async def ray_serving() -> None:
        load.paused = True  # the machine's CPUs go to Ray's start meanwhile
        try:
            await platform.ray_starting
        finally:
            load.paused = False
        up = time.monotonic()
        _log("Ray Serve is up")
        await _wait("a start decided by the model", lambda: _at_least_one(load, up, "model"), RECOVERY_S, platform)

    return [
        Fault("postgres", platform.pg.kill, platform.pg.start, serving),
        Fault("redis", platform.redis.kill, platform.redis.start, serving),
        Fault("kafka", platform.kafka.kill, platform.kafka.start, outbox_drained),
        Fault("relay", platform.relay.kill, platform.relay.start, outbox_drained),
        Fault("consumers", platform.consumers.kill, restart_consumers, consuming),
        Fault("sequencer", platform.sequencer.kill, platform.sequencer.start, queue_drained),
        Fault("ray serve", platform.ray.kill, replica_restarts, model_decides, ray_serving),
    ]


async def _wait(what: str, check: Callable[[], Awaitable[bool]], within: float, platform: Platform) -> float:
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > within:
            raise AssertionError(f"{what}: not within {within:.0f} s\n{platform.logs()}")
        platform.supervise(platform.phase)
        await asyncio.sleep(0.3)
    return time.monotonic() - began


async def _drain(platform: Platform, engine: AsyncEngine) -> None:
    """Until the outbox and the audit queue are empty and both consumer groups of the stream have nothing left
    (twice in a row: the progress consumer's completions write new events to the outbox)."""
    topic = topic_for(platform.prefix, REGION)
    quiet = 0

    async def settled() -> bool:
        nonlocal quiet
        left = await _scalar(engine, "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM audit_queue)")
        lags = [
            (await asyncio.to_thread(_committed, platform.kafka.bootstrap, topic, f"{platform.prefix}.{REGION}.{g}"))[1]
            for g in ("analytics", "progress")
        ]
        quiet = quiet + 1 if left == 0 and lags == [0, 0] else 0
        return quiet >= 2

    await _wait("the outbox, the audit queue and the consumer groups drained", settled, DRAIN_S, platform)


# ------------------------------------------------------------------------------------------ the test


async def test_killed_dependencies_lose_nothing_and_the_api_answers_only_documented_errors(
    platform: Platform, worker_id: str
) -> None:
    began = time.monotonic()
    engine = create_async_engine(platform.admin_url, pool_size=2, pool_pre_ping=True)
    load = Load(platform)
    clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]
    outages: dict[str, str] = {}
    try:
        await _wait("a first journey", lambda: _at_least_one(load, began), 60, platform)
        for fault in _faults(platform, load, engine):
            if fault.ready is not None:
                await fault.ready()
            fallbacks = await _api_metric(platform, "firstmile_rate_limit_fallbacks_total")
            _log(f"killing {fault.name}")
            load.phase = f"{fault.name} down"
            platform.held_down.add(fault.name)
            await asyncio.to_thread(fault.kill)
            await asyncio.sleep(OUTAGE_S)
            load.phase = f"{fault.name} restarting"
            await asyncio.to_thread(fault.restart)
            platform.held_down.discard(fault.name)
            restarted = Restart(time.monotonic(), await _scalar(engine, "SELECT now()"))
            load.phase = f"{fault.name} back"
            took = await _wait(f"recovery from the {fault.name} fault", partial(fault.recovered, restarted),
                               RECOVERY_S, platform)  # fmt: skip
            down = Counter[str]()
            for (p, a), n in load.answers.items():
                if p.startswith(f"{fault.name} "):  # down, restarting and back
                    down[a] += n
            slowest = max((v for p, v in load.slowest.items() if p.startswith(f"{fault.name} ")), default=0.0)
            _log(f"{fault.name} recovered in {took:.1f} s")
            outages[fault.name] = (
                ", ".join(f"{a} x{n}" for a, n in sorted(down.items()))
                + f"; slowest answer {slowest:.1f} s; back in {took:.0f} s"
            )
            if fault.name == "redis":
                after = await _api_metric(platform, "firstmile_rate_limit_fallbacks_total")
                assert after > fallbacks, "the rate limiter never fell back to the process while Redis was down"
    finally:
        load.stopping = True
        await asyncio.gather(*clients, return_exceptions=True)
    try:
        assert load.violations == [], "undocumented answers:\n" + "\n".join(load.violations[:30])
        assert load.gave_up == 0, f"{load.gave_up} writes were still refused after {RETRY_FOR_S:.0f} s"
        # every start was decided by the model or, with the reason api.md documents, by the rules or the default
        undocumented = [
            (user, s["selected_by"], s["fallback_reason"])
            for user, s in load.started.items()
            if not (s["selected_by"] == "model" or s["fallback_reason"] in FALLBACK_REASONS)
        ]
        assert undocumented == [], f"decisions without a documented fallback: {undocumented[:10]}"
        # while the model replica was down, starts succeeded and the rules decided because it was
        ray_phases = {"ray serve down", "ray serve restarting", "ray serve back"}
        fell_back = [
            s
            for s in load.started.values()
            if s["phase"] in ray_phases and s["fallback_reason"] in ("unavailable", "timeout", "circuit_open")
        ]
        assert fell_back, "no start fell back to the rules while Ray Serve was down"
        pg_refusals = sum(n for (p, a), n in load.answers.items() if p.startswith("postgres ") and a.endswith(" 503"))
        assert pg_refusals > 0, "the API never answered 503 while PostgreSQL was down: was it killed?"

        await _drain(platform, engine)
        _log("drained")
        platform.held_down.add("consumers")
        platform.consumers.stop()  # chdb opens its folder in one process only
        checked = await _check_database(platform, load, engine)
        in_analytics, copies = await asyncio.to_thread(_check_analytics, platform, load)
        checked += in_analytics
    finally:
        await engine.dispose()

    requests = sum(n for (_, a), n in load.answers.items())
    by_status = Counter[str]()
    for (_, answer), n in load.answers.items():
        by_status[answer] += n
    figures.add(
        "chaos",
        worker_id,
        {
            "faults injected": len(outages),
            "requests": requests,
            **{f"answers {a}": n for a, n in sorted(by_status.items())},
            "starts acknowledged": len(load.started),
            "completions acknowledged": len(load.completed),
            "messages acknowledged": len(load.messages),
            "completions through the stream": len(load.by_event),
            "writes checked": checked,
            "violations": len(load.violations),
            "redelivered copies in analytics": copies,
            "starts decided while ray serve was down": ", ".join(
                f"{reason or 'model'} x{n}"
                for reason, n in sorted(
                    Counter(s["fallback_reason"] for s in load.started.values() if s["phase"] in ray_phases).items(),
                    key=lambda item: str(item[0]),
                )
            ),
            **dict(sorted(platform.restarted.items())),
            **{f"{name} outage": summary for name, summary in outages.items()},
            "seconds": str(round(time.monotonic() - began)),
        },
    )


async def _at_least_one(load: Load, since: float, selected_by: str | None = None) -> bool:
    return load.acked_since(since, selected_by) > 0


async def _check_database(platform: Platform, load: Load, engine: AsyncEngine) -> int:
    """Each acknowledged start, completion and event-driven completion is in PostgreSQL exactly once."""

    async def rows(sql: str) -> list[Any]:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql), {"t": platform.tenant_id})).all())

    progress: dict[str, int] = dict(
        await rows("SELECT user_id, count(*) FROM user_progress WHERE tenant_id = :t GROUP BY 1")
    )
    completions = {
        (u, step): (n, source)
        for u, step, n, source in await rows(
            "SELECT user_id, step_id, count(*), min(source) FROM step_completions WHERE tenant_id = :t GROUP BY 1, 2"
        )
    }
    audit = Counter[tuple[str, str, str]]()
    for subject, decision, step, n in await rows(
        "SELECT subject, payload->>'decision', coalesce(payload->'output'->>'step_id', ''), count(*) "
        "FROM audit_entries WHERE tenant_id = :t AND kind = 'decision' GROUP BY 1, 2, 3"
    ):
        audit[(subject, decision, step)] += n
    [(outbox, queued)] = await rows(
        "SELECT (SELECT count(*) FROM outbox WHERE tenant_id = :t), "
        "(SELECT count(*) FROM audit_queue WHERE tenant_id = :t)"
    )
    assert (outbox, queued) == (0, 0)
    wrong: list[str] = []
    for user in load.started:
        if progress.get(user) != 1:
            wrong.append(f"start of {user}: {progress.get(user, 0)} rows in user_progress")
        if audit[(user, "path_selection", "")] != 1:
            wrong.append(f"start of {user}: {audit[(user, 'path_selection', '')]} path_selection audit entries")
    wrong += [f"{user} in user_progress, never started" for user in sorted(set(progress) - load.attempted)]
    for user in load.attempted - set(load.started):  # not acknowledged (the run ended): there at most once
        if audit[(user, "path_selection", "")] > 1:
            wrong.append(f"unacknowledged start of {user}: {audit[(user, 'path_selection', '')]} audit entries")
    for user, step in load.completed:
        count, _ = completions.get((user, step), (0, ""))
        if count != 1:
            wrong.append(f"completion of {user}/{step}: {count} rows")
    for (user, step), event_id in load.by_event.items():
        count, source = completions.get((user, step), (0, ""))
        if (count, source) != (1, f"event:{event_id}"):
            wrong.append(f"{user}/{step} by event {event_id}: {count} rows, source {source!r}")
        if audit[(user, "step_completion", step)] != 1:
            wrong.append(f"{user}/{step} by event: {audit[(user, 'step_completion', step)]} audit entries")
    assert wrong == [], f"{len(wrong)} acknowledged writes wrong in PostgreSQL:\n" + "\n".join(wrong[:30])
    return 2 * len(load.started) + len(load.completed) + 2 * len(load.by_event)


def _check_analytics(platform: Platform, load: Load) -> tuple[int, int]:
    """Each acknowledged write's event is in the analytics store exactly once, and no event twice (in the merged
    view); returns the writes checked and the redelivered copies stored (folded by the next merge)."""
    rows, stored = _analytics_counts(platform.analytics_path, platform.tenant_id)
    by_id = {uuid.UUID(r["id"]): int(r["n"]) for r in rows}
    started = Counter(r["user"] for r in rows if r["type"] == "onboarding.started")
    step_events = Counter((r["user"], r["step"]) for r in rows if r["type"] == "onboarding.step_completed")
    wrong = [f"event {i} stored {n} times" for i, n in by_id.items() if n != 1]
    for message, user in load.messages.items():
        n = by_id.get(uuid.uuid5(platform.tenant_id, message), 0)
        if n != 1:
            wrong.append(f"message {message} of {user}: {n} rows")
    wrong += [f"onboarding.started of {u}: {started[u]} rows" for u in load.started if started[u] != 1]
    for user, step in [*load.completed, *load.by_event]:
        if step_events[(user, step)] != 1:
            wrong.append(f"onboarding.step_completed of {user}/{step}: {step_events[(user, step)]} rows")
    assert wrong == [], f"{len(wrong)} events wrong in analytics:\n" + "\n".join(wrong[:30])
    checked = len(load.messages) + len(load.started) + len(load.completed) + len(load.by_event)
    return checked, stored - len(rows)
