"""``python -m benchmarks events``: throughput and freshness of the event path, each against a baseline.

What one run does (PostgreSQL from ``FIRSTMILE_BENCH_ADMIN_URL``, Kafka from
``--kafka``; ``deploy/local/postgres.sh start bench`` and ``deploy/local/kafka.sh
start bench`` start local ones):

1. Recreates the database ``firstmile_bench_events``, migrates it, applies
   ``tenants/demo.yaml``, creates an ``events:write`` key and a login role
   granted ``firstmile_relay`` (what ``firstmile relay`` runs as).
2. **Relay vs bare producer**: fills the outbox with M ``track`` rows (one
   ``INSERT … SELECT generate_series``), turns them into envelope bytes with
   :func:`firstmile.events.relay.to_record`, and sends them with a bare
   confluent-kafka ``Producer`` (``PRODUCER_DEFAULTS``) to a fresh topic until all
   are acknowledged; then refills the outbox and runs :class:`OutboxRelay` with a
   :class:`KafkaPublisher` until it is empty, once per batch size. msgs/s each.
3. **Through Kafka**, in two shapes (phases ``kafka``: ``FIRSTMILE_INGEST_DELIVERY=outbox``,
   the API writes the outbox and the relay publishes it; ``direct``: ``…=kafka``, the API
   produces each batch itself and answers once it is acknowledged): ``firstmile serve`` and
   ``firstmile relay`` as subprocesses, the analytics consumer (:class:`KafkaConsumerRunner` +
   :class:`AnalyticsSink` on a :class:`ChdbStore`) in this process; a load
   generator subprocess posts Segment batches of unique-messageId ``track``
   events to ``/v1/batch``. Three runs: *ingestion only* (the API alone, its
   accept rate is the baseline), *backlog drain* (relay and consumer started on
   what that run left in the outbox or the topic), *end to end* (everything running: events
   over the time from the first POST to the moment all of them can be counted
   in the analytics store; then rows and distinct event ids are checked against
   the accepted count: nothing lost, nothing duplicated).
4. **Embedded**: the same three runs with ``create_app`` and no Kafka (the API
   alone without ``relay_database_url``, then with it: in-process relay and the
   three consumers), served by uvicorn in a thread of this process.
5. **Freshness** after each end-to-end run: single-event batches posted one at
   a time, the analytics store polled every 10 ms until the event is there.

Before each measured run of steps 3 and 4 the outbox and the receipts are vacuumed and a
checkpoint is taken, so PostgreSQL's CPU column holds that run's work (and the autovacuum it
starts itself) rather than the dead rows of an earlier one. The analytics consumer and the
in-process API freeze the bench process's heap once started, as ``firstmile consume`` and
``firstmile serve``/``dev`` do (:mod:`firstmile.kit.heap`).

Returns a markdown report; progress goes to stderr. Every wait has a timeout and
every process and thread started here is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from benchmarks.common import READY_TIMEOUT_S, STOP_TIMEOUT_S, TENANT, UNLIMITED, BenchError, _log
from benchmarks.cpu import _busy_seconds, _proc_table, _tree
from benchmarks.database import ServerInfo, fresh_bench_database
from benchmarks.report import _machine
from benchmarks.servers import Server, _free_port, _start_server, _stop_server

if TYPE_CHECKING:
    from firstmile.analytics.chdb_store import ChdbStore
    from firstmile.events.bus import Record

__all__ = ["run_events_benchmark"]

EVENTS_DB = "firstmile_bench_events"
RELAY_ROLE = "firstmile_bench_relay"
REGION = "eu-west-1"
PARTITIONS = 12
USERS = 5000
EVENT_NAME = "Dashboard Viewed"  # completes no step of the demo paths: the progress consumer checks and skips it
SEGMENT_BATCH = 500
WARMUP_EVENTS = 1000
FRESHNESS_TIMEOUT_S = 30.0
WARMUP_TIMEOUT_S = 120.0
LOADGEN_MARKER = "FIRSTMILE_EVENTS_LOADGEN "
CONTEXT: dict[str, Any] = {
    "library": {"name": "analytics-python", "version": "2.3.3"},
    "ip": "203.0.113.7",
    "locale": "en-GB",
    "page": {"path": "/dashboards", "title": "Dashboards", "referrer": "https://app.example.com/home"},
    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
}
_SEALED_CONTEXT = {k: v for k, v in CONTEXT.items() if k != "ip"}
_Headers = list[tuple[str, str | bytes | None]]
_COUNT = "SELECT count() AS n FROM events WHERE tenant_id = {t:UUID}"
_STORED = "SELECT count() AS n, uniqExact(event_id) AS u FROM events WHERE tenant_id = {t:UUID}"
_ONE = "SELECT count() AS n FROM events WHERE tenant_id = {t:UUID} AND event_id = {e:UUID}"


# ---- the events -------------------------------------------------------------------------------


def _segment_event(prefix: str, i: int, timestamp: str) -> dict[str, Any]:
    """One Segment ``track`` message as a client library sends it."""
    return {
        "type": "track",
        "messageId": f"{prefix}-{i}",
        "userId": f"user-{i % USERS}",
        "event": EVENT_NAME,
        "properties": {"dashboard_id": f"d-{i % 97}", "widgets": i % 12, "source": "sidebar", "plan": "team"},
        "context": CONTEXT,
        "timestamp": timestamp,
    }


# The same message as ingestion writes it to the outbox (firstmile.events.segment._message, then the
# personal-data sealing of firstmile.events.api: context.ip moves into an encrypted "pii" field).
_FILL_OUTBOX = """
INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload, occurred_at)
SELECT gen_random_uuid(), $1::uuid, 'track', $1::text || ':user-' || (g % $5::int),
  jsonb_build_object(
    'type', 'track', 'messageId', $2::text || '-' || g, 'userId', 'user-' || (g % $5::int), 'anonymousId', NULL,
    'timestamp', $4::text, 'receivedAt', $4::text, 'context', $6::jsonb, 'event', $7::text,
    'pii', 'fm1:' || substr(md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text), 1, 82),
    'properties', jsonb_build_object('dashboard_id', 'd-' || (g % 97), 'widgets', g % 12, 'source', 'sidebar',
                                     'plan', 'team')),
  now()
FROM generate_series(1, $3::int) AS g
"""
_ALL_ROWS = (
    "SELECT id, event_id, tenant_id, event_type, partition_key, payload::text, occurred_at FROM outbox ORDER BY id"
)


# ---- the load generator (runs as a subprocess: python -c "…_loadgen_main()" CONFIG) ----------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise RuntimeError("chunked responses are not supported by the load generator")
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _drive(
    host: str, port: int, key: str, bodies: list[bytes], connections: int, limit_s: float
) -> dict[str, Any]:
    """Post every body once over ``connections`` keep-alive connections; timings on the system-wide monotonic clock."""
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()
    pending = iter(range(len(bodies)))
    sends: list[float] = []
    dones: list[float] = []
    latencies: list[float] = []
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "non2xx": 0}
    first_bad: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index in pending:
                body = bodies[index]
                began = time.monotonic()
                writer.write(head + str(len(body)).encode() + b"\r\n\r\n")
                writer.write(body)
                await writer.drain()
                status, answer = await _read_response(reader)
                done = time.monotonic()
                sends.append(began)
                dones.append(done)
                latencies.append(done - began)
                if 200 <= status < 300:
                    doc = msgspec.json.decode(answer)
                    totals["accepted"] += int(doc["accepted"])
                    totals["duplicates"] += int(doc["duplicates"])
                    totals["rejected"] += len(doc["rejected"])
                else:
                    totals["non2xx"] += 1
                    if not first_bad:
                        first_bad.append(f"{status} {answer[:300].decode('utf-8', 'replace')}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    cpu0 = time.process_time()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))), limit_s)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(q / 100 * len(latencies)) - 1)] if latencies else 0.0

    return {
        "requests": len(dones),
        "first_send": min(sends) if sends else 0.0,
        "last_done": max(dones) if dones else 0.0,
        "p50_s": pct(50),
        "p95_s": pct(95),
        "max_s": latencies[-1] if latencies else 0.0,
        "cpu_s": time.process_time() - cpu0,
        "first_bad": first_bad[0] if first_bad else "",
        **totals,
    }


def _loadgen_main() -> None:
    """Entry point of the load generator subprocess: build the bodies, say READY, wait for GO, post, report."""
    cfg = json.loads(sys.argv[1])
    stamp = datetime.now(UTC).isoformat()
    encoder = msgspec.json.Encoder()
    total, size, prefix = int(cfg["events"]), int(cfg["batch"]), str(cfg["prefix"])
    bodies = [
        encoder.encode({"batch": [_segment_event(prefix, i, stamp) for i in range(start, min(start + size, total))]})
        for start in range(0, total, size)
    ]
    sys.stdout.write(f"READY {sum(len(b) for b in bodies)}\n")
    sys.stdout.flush()
    if not sys.stdin.readline().startswith("GO"):
        return
    result = asyncio.run(
        _drive(cfg["host"], int(cfg["port"]), cfg["key"], bodies, int(cfg["connections"]), float(cfg["timeout"]))
    )
    result["events"] = total
    result["body_bytes"] = sum(len(b) for b in bodies)
    sys.stdout.write(LOADGEN_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class LoadResult:
    events: int
    requests: int
    accepted: int
    duplicates: int
    rejected: int
    non2xx: int
    first_bad: str
    first_send: float
    last_done: float
    p50_s: float
    p95_s: float
    max_s: float
    cpu_s: float
    body_bytes: int

    @property
    def ingest_s(self) -> float:
        return self.last_done - self.first_send

    @property
    def ingest_rate(self) -> float:
        return self.accepted / self.ingest_s if self.ingest_s > 0 else 0.0


class _LoadGen:
    """The load generator subprocess: bodies built before the clock starts, then GO."""

    def __init__(self, port: int, key: str, events: int, connections: int, prefix: str, timeout: float, log: Path):
        cfg = {
            "host": "127.0.0.1",
            "port": port,
            "key": key,
            "events": events,
            "batch": SEGMENT_BATCH,
            "connections": connections,
            "prefix": prefix,
            "timeout": timeout,
        }
        argv = [sys.executable, "-c", "from benchmarks.events import _loadgen_main; _loadgen_main()"]
        self.log = log
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [*argv, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=sink,
                start_new_session=True,
            )
        self.result: LoadResult | None = None

    def _tail(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY"):
            raise BenchError(f"the load generator did not get ready within {timeout:.0f}s:\n{self._tail()}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")
        self.proc.stdin.flush()

    def finished(self) -> bool:
        """True once it exited (and its result was read); raises when it failed."""
        if self.proc.poll() is None:
            return False
        if self.result is None:
            out = self.proc.stdout.read().decode() if self.proc.stdout is not None else ""
            line = next((ln for ln in out.splitlines() if ln.startswith(LOADGEN_MARKER)), None)
            if self.proc.returncode != 0 or line is None:
                raise BenchError(f"the load generator failed ({self.proc.returncode}):\n{out[-1000:]}{self._tail()}")
            data = json.loads(line[len(LOADGEN_MARKER) :])
            self.result = LoadResult(**{k: data[k] for k in LoadResult.__dataclass_fields__})
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# ---- database ---------------------------------------------------------------------------------


async def _provision(admin_url: str, pepper: bytes, manifest: Path) -> tuple[str, uuid.UUID]:
    """Create the relay's login role, apply the manifest, create an events key."""
    from sqlalchemy import text

    from firstmile.controlplane.service import apply_manifest
    from firstmile.kit.db import create_engine
    from firstmile.tenancy.cli import create_key
    from firstmile.tenancy.manifest import load_manifest

    engine = create_engine(admin_url, pool_size=1, max_overflow=0, application_name="firstmile-bench")
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{RELAY_ROLE}') THEN "
                    f"CREATE ROLE {RELAY_ROLE} LOGIN; END IF; END $$"
                )
            )
            await conn.execute(text(f"ALTER ROLE {RELAY_ROLE} LOGIN NOBYPASSRLS"))
            await conn.execute(text(f"GRANT firstmile_relay TO {RELAY_ROLE}"))
        applied = await apply_manifest(engine, load_manifest(manifest))
        created = await create_key(engine, pepper, TENANT, ["events:write", "analytics:read"], "bench-events")
    finally:
        await engine.dispose()
    return created.key, applied.tenant_id


async def _fill_outbox(dsn: str, tenant_id: uuid.UUID, prefix: str, rows: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        began = time.monotonic()
        stamp = datetime.now(UTC).isoformat()
        await conn.execute(
            _FILL_OUTBOX, tenant_id, prefix, rows, stamp, USERS, json.dumps(_SEALED_CONTEXT), EVENT_NAME, timeout=600
        )
        await conn.execute("ANALYZE outbox")
        return time.monotonic() - began
    finally:
        await conn.close()


_SETTLE = ("VACUUM (ANALYZE) outbox", "VACUUM (ANALYZE) event_receipts", "CHECKPOINT")


def _settle(dsn: str) -> None:
    """Before a measured run: vacuum what earlier runs left dead in the outbox and receipts, and checkpoint,
    so PostgreSQL's column holds the run's own work (and the autovacuum it starts), not an earlier run's."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in _SETTLE:
                await conn.execute(statement, timeout=300)
        finally:
            await conn.close()

    asyncio.run(run())


async def _scalar(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args, timeout=60)
    finally:
        await conn.close()


async def _outbox_records(dsn: str) -> list[Record]:
    from firstmile.events.relay import to_record

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_ALL_ROWS, timeout=300)
    finally:
        await conn.close()
    return [to_record(r) for r in rows]


# ---- CPU accounting -------------------------------------------------------------------------------


def _listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (the Kafka broker), from /proc."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # Java listens on IPv6 sockets (IPv4-mapped)
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(table).read_text(encoding="utf-8").splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inode = parts[9]
                    break
        if inode is not None:
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        return int(entry.name)
    return None


@dataclass
class CpuMeter:
    """CPU seconds by component between :meth:`start` and :meth:`stop` (process trees from /proc)."""

    roots: dict[str, int | None]
    """name → root pid of a process tree (the bench process itself is measured on its own, as "bench")."""
    wall_s: float = 0.0
    busy_s: float = 0.0
    spent: dict[str, float] = field(default_factory=dict)
    others: list[tuple[str, float]] = field(default_factory=list)
    """The busiest processes outside the measured ones: (name, CPU seconds), largest first."""
    _before: dict[int, tuple[int, float]] = field(default_factory=dict)
    _busy0: float = 0.0
    _self0: float = 0.0
    _t0: float = 0.0

    def start(self) -> None:
        self._before, self._busy0 = _proc_table(), _busy_seconds()
        self._self0, self._t0 = time.process_time(), time.monotonic()

    def stop(self) -> None:
        after = _proc_table()
        self.wall_s = time.monotonic() - self._t0
        self.busy_s = _busy_seconds() - self._busy0
        self.spent = {"bench process": time.process_time() - self._self0}
        measured = {os.getpid()}
        for name, root in self.roots.items():
            tree = _tree(after, root)
            measured |= tree
            gone = _tree(self._before, root) - set(after)
            alive = sum(after[p][1] - self._before.get(p, (0, 0.0))[1] for p in tree)
            self.spent[name] = alive - sum(self._before[p][1] for p in gone)
        unmeasured = [(after[p][1] - self._before.get(p, (0, 0.0))[1], p) for p in set(after) - measured]
        for seconds, pid in sorted(unmeasured, reverse=True)[:3]:
            if seconds >= 0.05 * self.wall_s:
                with contextlib.suppress(OSError):
                    comm = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    self.others.append((f"{pid} {comm.strip()[:80]}", seconds))

    def cores(self, name: str) -> float:
        return self.spent.get(name, 0.0) / self.wall_s if self.wall_s else 0.0

    @property
    def other_s(self) -> float:
        """Busy CPU seconds of the machine not spent by the measured processes (other work on the machine)."""
        return max(0.0, self.busy_s - sum(self.spent.values()))


# ---- Kafka helpers -------------------------------------------------------------------------------


def _topic_size(bootstrap: str, topic: str) -> int:
    """Messages in ``topic`` (sum of the partitions' high watermarks; the topic is fresh)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-watermarks-{secrets.token_hex(4)}"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        total = 0
        for partition in meta.topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += int(high)
        return total
    finally:
        consumer.close()


@dataclass(frozen=True)
class ProduceRun:
    name: str
    batch_size: int | None
    messages: int
    seconds: float
    in_topic: int
    cpu: CpuMeter
    publish_s: float = 0.0
    """Relay only: time inside the publisher (produce + wait for every ack), the rest is fetch, encode, delete."""
    batches: int = 0
    gaps_s: tuple[float, ...] = ()
    """Relay only: between consecutive publishes (delete of one batch, fetch and to_record of the next)."""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


_Message = tuple[bytes, bytes, _Headers]


def _wire_messages(records: Sequence[Record]) -> list[_Message]:
    """What KafkaPublisher sends for each record: value, key, headers (built before the bare producer's clock)."""
    return [
        (r.value, r.key.encode(), [("event_type", r.event_type.encode()), ("tenant_id", str(r.tenant_id).encode())])
        for r in records
    ]


def _bare_produce(
    bootstrap: str, topic: str, messages: Sequence[_Message], timeout: float, cpu: CpuMeter, name: str
) -> ProduceRun:
    """A bare confluent-kafka Producer with the relay's configuration: produce everything, wait for every ack."""
    from confluent_kafka import KafkaError, Message, Producer

    from firstmile.events.kafka import PRODUCER_DEFAULTS

    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    producer.list_topics(topic, timeout=10)  # connected, metadata known: as the relay's producer after a batch
    counts = {"ok": 0, "failed": 0}

    def report(err: KafkaError | None, _msg: Message) -> None:
        counts["ok" if err is None else "failed"] += 1

    deadline = time.monotonic() + timeout
    cpu.start()
    began = time.monotonic()
    for value, key, headers in messages:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    raise BenchError(f"bare producer: the queue did not drain within {timeout:.0f}s") from None
    while len(producer) > 0:
        producer.flush(1.0)
        if time.monotonic() > deadline:
            raise BenchError(f"bare producer: {len(producer)} messages unacknowledged after {timeout:.0f}s")
    seconds = time.monotonic() - began
    cpu.stop()
    if counts["failed"] or counts["ok"] != len(messages):
        raise BenchError(f"bare producer: {counts['ok']} delivered, {counts['failed']} failed of {len(messages)}")
    return ProduceRun(name, None, len(messages), seconds, _topic_size(bootstrap, topic), cpu)


class _TimedPublisher:
    """Wraps the relay's publisher to time its share of each batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[float, float]] = []
        """(start, end) of each publish call."""

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end in self.calls)

    def gaps(self) -> list[float]:
        """Time between one publish's end and the next one's start: delete, fetch and to_record of a batch."""
        return [b[0] - a[1] for a, b in itertools.pairwise(self.calls)]

    async def publish(self, records: Sequence[Record]) -> int:
        began = time.monotonic()
        try:
            acked: int = await self.inner.publish(records)
            return acked
        finally:
            self.calls.append((began, time.monotonic()))

    async def close(self) -> None:
        await self.inner.close()


async def _relay_run(
    relay_url: str, bootstrap: str, topic: str, batch_size: int, expect: int, limit_s: float, cpu: CpuMeter, name: str
) -> ProduceRun:
    from firstmile.events.kafka import KafkaPublisher
    from firstmile.events.relay import OutboxRelay

    kafka = KafkaPublisher(bootstrap, topic)
    await asyncio.to_thread(kafka.producer.list_topics, topic, 10)
    publisher = _TimedPublisher(kafka)
    relay = OutboxRelay(relay_url, publisher, batch_size=batch_size)
    stop = asyncio.Event()
    cpu.start()
    began = time.monotonic()
    task = asyncio.create_task(relay.run(stop), name="bench-relay")
    try:
        while relay.published < expect:
            if task.done():
                task.result()
                raise BenchError(f"the relay stopped after {relay.published} of {expect} rows")
            if time.monotonic() - began > limit_s:
                raise BenchError(f"the relay published {relay.published} of {expect} rows in {limit_s:.0f}s")
            await asyncio.sleep(0.002)
        seconds = time.monotonic() - began
        cpu.stop()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(publisher.close(), STOP_TIMEOUT_S)
    return ProduceRun(
        name,
        batch_size,
        relay.published,
        seconds,
        await asyncio.to_thread(_topic_size, bootstrap, topic),
        cpu,
        publish_s=publisher.seconds,
        batches=len(publisher.calls),
        gaps_s=tuple(publisher.gaps()),
    )


# ---- the servers under test ----------------------------------------------------------------------


class _ConsumerThread:
    """The analytics consumer group (KafkaConsumerRunner + AnalyticsSink) on its own event loop and thread."""

    def __init__(self, bootstrap: str, topic: str, dlq: str, group: str, store: ChdbStore, batch_size: int) -> None:
        self.args = (bootstrap, topic, dlq, group, store, batch_size)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="bench-analytics-consumer", daemon=True)

    def _main(self) -> None:
        from firstmile.analytics.sink import AnalyticsSink
        from firstmile.events.kafka import KafkaConsumerRunner
        from firstmile.kit.heap import freeze_startup_heap

        bootstrap, topic, dlq, group, store, batch_size = self.args

        async def body() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            runner = KafkaConsumerRunner(bootstrap, topic, dlq, group, AnalyticsSink(store), batch_size=batch_size)
            freeze_startup_heap()  # as `firstmile consume` does once its consumers are built
            self.ready.set()
            await runner.run(self.stop_event)

        try:
            asyncio.run(body())
        except BaseException as exc:  # reported by check(); the thread must not die silently
            self.error = exc
        finally:
            self.ready.set()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(30):
            raise BenchError("the analytics consumer did not start within 30s")
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"the analytics consumer failed: {self.error!r}")

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None and self.thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        if self.thread.is_alive():
            _log("warning: the analytics consumer thread did not stop within 30s")


class _InProcessServer:
    """uvicorn serving an app object in a thread of this process (embedded mode shares our chdb store)."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.port = port
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        _log(f"starting the embedded-mode API in this process on {self.base}")
        self.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise BenchError("the in-process API exited during start-up")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.base}/health/live", timeout=2) as resp,
            ):
                if resp.status == 200:
                    from firstmile.kit.heap import freeze_startup_heap

                    freeze_startup_heap()  # as `firstmile dev` and `serve` do after startup (app_factory)
                    return
            time.sleep(0.2)
        raise BenchError(f"the in-process API was not ready within {READY_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        _log("stopping the embedded-mode API")
        self.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(STOP_TIMEOUT_S)


def _post(base: str, key: str, messages: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{base}/v1/batch", data=msgspec.json.encode({"batch": messages}), method="POST")
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode("utf-8", "replace")[:500]}


def _visible(store: ChdbStore, tenant_id: uuid.UUID) -> int:
    return int(store.dangerous_raw_sql(_COUNT, {"t": str(tenant_id)})[0]["n"])


def _stored(store: ChdbStore, tenant_id: uuid.UUID) -> tuple[int, int]:
    """Rows and distinct event ids of the tenant (a redelivered copy is a row until a merge folds it)."""
    row = store.dangerous_raw_sql(_STORED, {"t": str(tenant_id)})[0]
    return int(row["n"]), int(row["u"])


def _warm_up(
    base: str, key: str, store: ChdbStore, tenant_id: uuid.UUID, prefix: str, check: Callable[[], None]
) -> None:
    """Post WARMUP_EVENTS events and wait until analytics has them (consumer group joined, pools open)."""
    before = _visible(store, tenant_id)
    stamp = datetime.now(UTC).isoformat()
    for start in range(0, WARMUP_EVENTS, SEGMENT_BATCH):
        batch = [_segment_event(prefix, i, stamp) for i in range(start, start + SEGMENT_BATCH)]
        status, body = _post(base, key, batch)
        if status != 200 or body.get("accepted") != SEGMENT_BATCH:
            raise BenchError(f"warm-up batch answered {status}: {body}")
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    while _visible(store, tenant_id) - before < WARMUP_EVENTS:
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up events not in analytics after {WARMUP_TIMEOUT_S:.0f}s")
        time.sleep(0.1)


@dataclass(frozen=True)
class EndToEnd:
    mode: str
    load: LoadResult
    expected: int
    e2e_s: float
    outbox_peak: int
    api_done_to_outbox_empty_s: float | None
    outbox_empty_to_visible_s: float | None
    cpu: CpuMeter
    timeline: list[tuple[float, int, int]]
    """(seconds since the first POST, outbox rows, analytics rows) about once a second."""
    rows: int
    """Rows the run added to analytics, counted once all were there (more than ``expected``: duplicates)."""
    distinct: int
    """Distinct event ids the run added (fewer than ``expected``: events lost)."""

    @property
    def rate(self) -> float:
        return self.expected / self.e2e_s if self.e2e_s > 0 else 0.0


async def _watch(
    mode: str,
    gen: _LoadGen,
    store: ChdbStore,
    tenant_id: uuid.UUID,
    events: int,
    admin_dsn: str,
    limit_s: float,
    cpu: CpuMeter,
    check: Callable[[], None],
) -> EndToEnd:
    """From GO until every accepted event is in analytics: the moment that happens, and a coarse timeline."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        before = _visible(store, tenant_id)
        stored_before = _stored(store, tenant_id)
        target = events
        cpu.start()
        gen.go()
        began = time.monotonic()
        visible_at: float | None = None
        api_done_at: float | None = None
        outbox_empty_at: float | None = None
        timeline: list[tuple[float, int, int]] = []
        next_sample, next_log = began, began + 5
        outbox_peak = outbox = 0
        while True:
            n = _visible(store, tenant_id) - before
            now = time.monotonic()
            if gen.finished() and gen.result is not None and api_done_at is None:
                api_done_at = gen.result.last_done
                target = gen.result.accepted
                if gen.result.accepted < events:
                    _log(f"{mode}: only {gen.result.accepted:,} of {events:,} events accepted: {gen.result.first_bad}")
            if visible_at is None and n >= target and api_done_at is not None:
                visible_at = now
                cpu.stop()
            if now >= next_sample or visible_at is not None:
                outbox = int(await conn.fetchval("SELECT count(*) FROM outbox", timeout=30))
                outbox_peak = max(outbox_peak, outbox)
                timeline.append((now, outbox, n))
                if outbox == 0 and api_done_at is not None and outbox_empty_at is None:
                    outbox_empty_at = time.monotonic()
                next_sample = now + 1.0
            if now >= next_log:
                _log(f"{mode}: {now - began:5.1f}s  outbox {outbox:,}  in analytics {n:,}/{events:,}")
                next_log = now + 5
            if visible_at is not None:
                break
            check()
            if now - began > limit_s:
                raise BenchError(f"{mode}: {n:,} of {target:,} events in analytics after {limit_s:.0f}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    await asyncio.sleep(1.0)  # anything more (a duplicate) would arrive now
    stored = _stored(store, tenant_id)
    load = gen.result
    assert load is not None and visible_at is not None and api_done_at is not None
    first = load.first_send
    return EndToEnd(
        mode=mode,
        load=load,
        expected=target,
        e2e_s=visible_at - first,
        outbox_peak=outbox_peak,
        api_done_to_outbox_empty_s=(outbox_empty_at - api_done_at) if outbox_empty_at is not None else None,
        outbox_empty_to_visible_s=(visible_at - outbox_empty_at) if outbox_empty_at is not None else None,
        cpu=cpu,
        timeline=[(t - first, o, v) for t, o, v in timeline],
        rows=stored[0] - stored_before[0],
        distinct=stored[1] - stored_before[1],
    )


def _throughput(ctx: _Ctx, mode: str, port: int, cpu: CpuMeter, check: Callable[[], None]) -> EndToEnd:
    events, connections = ctx.facts.events, ctx.facts.connections
    gen = _LoadGen(
        port, ctx.key, events, connections, f"{mode}-{ctx.run_id}", ctx.timeout, ctx.tmp / f"loadgen-{mode}.log"
    )
    try:
        gen.wait_ready(120)
        _settle(ctx.db_admin_dsn)
        _log(f"{mode}: end to end, {events:,} events in batches of {SEGMENT_BATCH} over {connections} connections")
        result = asyncio.run(
            _watch(mode, gen, ctx.store, ctx.tenant_id, events, ctx.db_admin_dsn, ctx.timeout, cpu, check)
        )
    finally:
        gen.stop()
    cpu.spent["load generator"] = result.load.cpu_s
    _log(
        f"{mode}: {result.expected:,} events in analytics {result.e2e_s:.1f}s after the first POST "
        f"({result.rate:,.0f}/s; API accepted them at {result.load.ingest_rate:,.0f}/s)"
    )
    return result


@dataclass(frozen=True)
class Freshness:
    mode: str
    latencies_s: list[float]
    post_s: list[float]

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def _freshness(
    mode: str, base: str, key: str, store: ChdbStore, tenant_id: uuid.UUID, samples: int, check: Callable[[], None]
) -> Freshness:
    from firstmile.events.segment import event_id_for

    _log(f"{mode}: freshness, {samples} single-event batches one at a time")
    prefix = f"{mode}-fresh-{secrets.token_hex(3)}"
    rng = random.Random(7)
    latencies: list[float] = []
    posts: list[float] = []
    for i in range(samples):
        time.sleep(rng.uniform(0.02, 0.12))  # so the probes do not phase-lock with the relay's idle polling
        event_id = str(event_id_for(tenant_id, f"{prefix}-{i}"))
        message = _segment_event(prefix, i, datetime.now(UTC).isoformat())
        began = time.monotonic()
        status, body = _post(base, key, [message])
        posted = time.monotonic()
        if status != 200 or body.get("accepted") != 1:
            raise BenchError(f"{mode}: freshness probe answered {status}: {body}")
        while True:
            if int(store.dangerous_raw_sql(_ONE, {"t": str(tenant_id), "e": event_id})[0]["n"]):
                latencies.append(time.monotonic() - began)
                posts.append(posted - began)
                break
            if time.monotonic() - began > FRESHNESS_TIMEOUT_S:
                raise BenchError(f"{mode}: probe {i} not in analytics after {FRESHNESS_TIMEOUT_S:.0f}s")
            check()
            time.sleep(0.01)
    result = Freshness(mode, latencies, posts)
    _log(f"{mode}: freshness p50 {result.pct(50) * 1000:.0f} ms, p95 {result.pct(95) * 1000:.0f} ms")
    return result


# ---- the run ---------------------------------------------------------------------------------------


@dataclass
class Facts:
    started_at: datetime
    machine: dict[str, str]
    pg: ServerInfo
    kafka: str
    messages: int
    events: int
    connections: int
    workers: int
    command: str
    code: str
    idle_load: float
    produce: list[ProduceRun] = field(default_factory=list)
    fill_s: list[float] = field(default_factory=list)
    encode_us: float = 0.0
    ingest_only: dict[str, tuple[LoadResult, CpuMeter]] = field(default_factory=dict)
    drain: dict[str, Drain] = field(default_factory=dict)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    freshness: list[Freshness] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for candidate in (here.parents[1], Path.cwd()):
        if (candidate / "tenants" / "demo.yaml").exists():
            return candidate
    raise BenchError("tenants/demo.yaml not found (run from the repository root)")


def _kafka_version(root: Path) -> str:
    with contextlib.suppress(OSError):
        for line in (root / "deploy" / "local" / "kafka" / "pom.xml").read_text(encoding="utf-8").splitlines():
            if "<kafka.version>" in line:
                return "Apache Kafka " + line.split(">")[1].split("<")[0]
    return "Kafka"


def _code_state(root: Path) -> str:
    """The commit and whether the working tree differs from it (the numbers belong to the code as it was)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "platform"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"commit {head or '?'}" + (
        f" plus uncommitted changes in {len(dirty)} path(s) under platform/" if dirty else ""
    )


def _command(argv: Sequence[str] | None) -> str:
    if argv:
        return "FIRSTMILE_BENCH_ADMIN_URL=… python -m benchmarks " + shlex.join(argv)
    return "FIRSTMILE_BENCH_ADMIN_URL=… python -m benchmarks events"


def _subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without any FIRSTMILE_ setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return env | UNLIMITED | extra


def run_events_benchmark(
    *,
    messages: int = 200_000,
    events: int = 200_000,
    relay_batch_sizes: Sequence[int] = (2000, 10000),
    connections: int = 4,
    workers: int = 1,
    freshness_samples: int = 50,
    repeat: int = 3,
    kafka: str = "127.0.0.1:59192",
    timeout: float = 600.0,
    phases: Sequence[str] = ("relay", "kafka", "direct", "embedded"),
    argv: Sequence[str] | None = None,
) -> str:
    """Run the event-path benchmark against ``FIRSTMILE_BENCH_ADMIN_URL`` and ``kafka``; the markdown report.

    ``repeat``: rounds of the relay-vs-bare runs; ``timeout`` bounds each measured run (seconds);
    ``argv`` is the CLI's arguments, for the report.
    """
    if min(messages, connections, workers, freshness_samples, repeat) < 1 or events < SEGMENT_BATCH:
        raise BenchError(f"events must be ≥ {SEGMENT_BATCH}; messages, connections, workers, samples, repeat ≥ 1")
    if any(not 1 <= size <= 50_000 for size in relay_batch_sizes):
        raise BenchError("relay batch sizes must be between 1 and 50,000 (FIRSTMILE_RELAY_BATCH_SIZE's range)")
    unknown = set(phases) - {"relay", "kafka", "direct", "embedded"}
    if unknown or not phases:
        raise BenchError(f"phases are relay, kafka, direct and embedded; got {', '.join(sorted(unknown)) or 'none'}")
    admin = os.environ.get("FIRSTMILE_BENCH_ADMIN_URL")
    if not admin:
        raise BenchError(
            "set FIRSTMILE_BENCH_ADMIN_URL to a PostgreSQL superuser URL (deploy/local/postgres.sh start bench; "
            "deploy/local/postgres.sh url bench prints it)"
        )
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=10)
    except Exception as exc:
        raise BenchError(f"Kafka at {kafka} does not answer ({exc}); deploy/local/kafka.sh start bench") from exc

    busy0 = _busy_seconds()
    time.sleep(2.0)
    idle_load = (_busy_seconds() - busy0) / 2.0
    if idle_load > 0.3:
        _log(f"warning: the machine is already busy ({idle_load:.2f} cores) before the run; the numbers will suffer")
    began, started_at = time.monotonic(), datetime.now(UTC)
    root = _repo_root()
    run_id = secrets.token_hex(3)
    kafka_port = int(kafka.split(",")[0].rsplit(":", 1)[1])

    db = fresh_bench_database(admin, EVENTS_DB)
    pg = db.server
    db_admin_url, db_admin_dsn, app_url, relay_url = db.admin_url, db.admin_dsn, db.app_url, db.url(RELAY_ROLE)
    roots: dict[str, int | None] = {
        "PostgreSQL": db.postmaster,
        "Kafka broker": _listener_pid(kafka_port),
    }
    pepper = secrets.token_hex(32)
    _log(f"applying tenants/demo.yaml, creating an events:write key and the {RELAY_ROLE} login role")
    key, tenant_id = asyncio.run(_provision(db_admin_url, pepper.encode(), root / "tenants" / "demo.yaml"))
    facts = Facts(
        started_at=started_at,
        machine=_machine(),
        pg=pg,
        kafka=f"{_kafka_version(root)}, single KRaft node on {kafka}",
        messages=messages,
        events=events,
        connections=connections,
        workers=workers,
        command=_command(argv),
        code=_code_state(root),
        idle_load=idle_load,
    )
    try:
        if "relay" in phases:
            _relay_phase(
                facts, kafka, db_admin_dsn, relay_url, tenant_id, run_id, relay_batch_sizes, repeat, timeout, roots
            )
        if {"kafka", "direct", "embedded"} & set(phases):
            _end_to_end_phases(
                facts,
                phases,
                kafka,
                db_admin_url,
                db_admin_dsn,
                app_url,
                relay_url,
                pepper,
                key,
                tenant_id,
                run_id,
                timeout,
                freshness_samples,
                roots,
            )
    finally:
        with contextlib.suppress(Exception):  # the relay's login exists for the run only
            asyncio.run(_scalar(db_admin_dsn, f"ALTER ROLE {RELAY_ROLE} NOLOGIN"))
    facts.elapsed_s = time.monotonic() - began
    _log("done")
    return _report(facts)


def _relay_phase(
    facts: Facts,
    kafka: str,
    db_admin_dsn: str,
    relay_url: str,
    tenant_id: uuid.UUID,
    run_id: str,
    batch_sizes: Sequence[int],
    repeat: int,
    timeout: float,
    roots: dict[str, int | None],
) -> None:
    """Rounds of: bare producer, then the relay at each batch size (the outbox refilled before each)."""
    from firstmile.events.kafka import ensure_topics

    m = facts.messages
    names = ["warmup"] + [f"bare-{r}" for r in range(repeat)]
    names += [f"relay-{size}-{r}" for size in batch_sizes for r in range(repeat)]
    ensure_topics(kafka, {f"bench-{run_id}.{name}": PARTITIONS for name in names})
    fills = itertools.count()

    def fill() -> None:
        _log(f"relay: filling the outbox with {m:,} track rows")
        facts.fill_s.append(asyncio.run(_fill_outbox(db_admin_dsn, tenant_id, f"bench-{run_id}-{next(fills)}", m)))

    fill()
    encode_began = time.monotonic()
    records = asyncio.run(_outbox_records(db_admin_dsn))
    facts.encode_us = (time.monotonic() - encode_began) / max(1, len(records)) * 1e6
    size = sum(len(r.value) for r in records) / max(1, len(records))
    facts.notes.append(f"envelope: {size:.0f} bytes on average (value), key `<tenant>:user-N`, two headers")
    messages = _wire_messages(records)
    del records
    _log(f"relay: warming the broker up ({min(m, 50_000):,} messages to a scratch topic, not measured)")
    _bare_produce(kafka, f"bench-{run_id}.warmup", messages[:50_000], timeout, CpuMeter({}), "warm-up")
    outbox_full = True
    for r in range(repeat):
        _log(f"relay: round {r + 1}/{repeat}: bare producer, {m:,} messages of ~{size:.0f} bytes")
        run = _bare_produce(
            kafka, f"bench-{run_id}.bare-{r}", messages, timeout, CpuMeter(dict(roots)), f"bare producer #{r + 1}"
        )
        facts.produce.append(run)
        _log(f"relay: bare producer {run.rate:,.0f} msgs/s (other load {run.cpu.other_s / run.cpu.wall_s:.2f} cores)")
        for batch_size in batch_sizes:
            if not outbox_full:
                fill()
            _log(f"relay: round {r + 1}/{repeat}: OutboxRelay batch {batch_size:,} as {RELAY_ROLE}")
            topic = f"bench-{run_id}.relay-{batch_size}-{r}"
            name = f"relay, batch {batch_size:,} #{r + 1}"
            run = asyncio.run(_relay_run(relay_url, kafka, topic, batch_size, m, timeout, CpuMeter(dict(roots)), name))
            outbox_full = False
            left = int(asyncio.run(_scalar(db_admin_dsn, "SELECT count(*) FROM outbox")))
            if left:
                raise BenchError(f"the relay left {left} rows in the outbox")
            facts.produce.append(run)
            _log(f"relay: {run.rate:,.0f} msgs/s (other load {run.cpu.other_s / run.cpu.wall_s:.2f} cores)")


@dataclass(frozen=True)
class _Ctx:
    """What the end-to-end phases share."""

    facts: Facts
    kafka: str
    db_admin_url: str
    db_admin_dsn: str
    app_url: str
    relay_url: str
    pepper: str
    key: str
    tenant_id: uuid.UUID
    run_id: str
    timeout: float
    samples: int
    roots: dict[str, int | None]
    store: ChdbStore
    tmp: Path
    signing_key: Path
    """A throwaway audit signing key (the API refuses to start on an external database without one)."""
    kek_file: Path
    """A throwaway local KEK keyring shared by every API process of the run (tenant data keys)."""


def _end_to_end_phases(
    facts: Facts,
    phases: Sequence[str],
    kafka: str,
    db_admin_url: str,
    db_admin_dsn: str,
    app_url: str,
    relay_url: str,
    pepper: str,
    key: str,
    tenant_id: uuid.UUID,
    run_id: str,
    timeout: float,
    samples: int,
    roots: dict[str, int | None],
) -> None:
    from firstmile.analytics.chdb_store import ChdbStore

    with tempfile.TemporaryDirectory(prefix="firstmile-bench-events-") as tmp_name:
        tmp = Path(tmp_name)
        store = ChdbStore(tmp / "analytics")
        signing_key, kek_file = tmp / "audit_signing_key", tmp / "kek"
        for secret in (signing_key, kek_file):
            secret.touch(mode=0o600)
            secret.write_text(secrets.token_hex(32), encoding="ascii")
        try:
            store.ensure_schema()
            ctx = _Ctx(
                facts,
                kafka,
                db_admin_url,
                db_admin_dsn,
                app_url,
                relay_url,
                pepper,
                key,
                tenant_id,
                run_id,
                timeout,
                samples,
                roots,
                store,
                tmp,
                signing_key,
                kek_file,
            )
            if "kafka" in phases:
                _kafka_phase(ctx, "kafka")
            if "direct" in phases:
                _kafka_phase(ctx, "direct")
            if "embedded" in phases:
                _embedded_phase(ctx)
        finally:
            store.close()


@dataclass(frozen=True)
class Drain:
    """The pipeline catching up with a backlog the API wrote while nothing consumed it."""

    events: int
    startup_s: float
    """From starting the pipeline to the first event in analytics."""
    seconds: float
    """From the first event in analytics to the last."""
    steady_events: int
    cpu: CpuMeter

    @property
    def rate(self) -> float:
        return self.steady_events / self.seconds if self.seconds > 0 else 0.0


def _ingest_only(ctx: _Ctx, mode: str, port: int, cpu: CpuMeter) -> LoadResult:
    """The API alone (nothing relays or consumes): the accept rate, the baseline of the end-to-end ratio."""
    events, connections = ctx.facts.events, ctx.facts.connections
    gen = _LoadGen(
        port,
        ctx.key,
        events,
        connections,
        f"{mode}-ingest-{ctx.run_id}",
        ctx.timeout,
        ctx.tmp / f"loadgen-{mode}-ingest.log",
    )
    try:
        gen.wait_ready(120)
        _settle(ctx.db_admin_dsn)
        _log(f"{mode}: ingestion only, {events:,} events in batches of {SEGMENT_BATCH} over {connections} connections")
        cpu.start()
        gen.go()
        deadline = time.monotonic() + ctx.timeout
        while not gen.finished():
            if time.monotonic() > deadline:
                raise BenchError(f"{mode}: ingestion of {events:,} events did not finish in {ctx.timeout:.0f}s")
            time.sleep(0.05)
        cpu.stop()
    finally:
        gen.stop()
    load = gen.result
    assert load is not None
    cpu.spent["load generator"] = load.cpu_s
    if load.accepted != events:
        raise BenchError(f"{mode}: {load.accepted:,} of {events:,} accepted ({load.non2xx} non-2xx): {load.first_bad}")
    _log(f"{mode}: the API alone accepted {load.accepted:,} events at {load.ingest_rate:,.0f}/s")
    return load


def _drain(
    ctx: _Ctx, mode: str, before: int, expected: int, began: float, cpu: CpuMeter, check: Callable[[], None]
) -> Drain:
    """Wait until the backlog is in analytics; the steady rate counts from the first event seen there."""
    cpu_started = False
    first_at, first_n = 0.0, 0
    deadline = began + ctx.timeout
    next_log = time.monotonic() + 5
    while True:
        n = _visible(ctx.store, ctx.tenant_id) - before
        now = time.monotonic()
        if n > 0 and not cpu_started:
            first_at, first_n, cpu_started = now, n, True
            cpu.start()
        if n >= expected:
            cpu.stop()
            break
        check()
        if now > deadline:
            raise BenchError(f"{mode}: {n:,} of the {expected:,} backlog events in analytics after {ctx.timeout:.0f}s")
        if now >= next_log:
            _log(f"{mode}: draining the backlog, {n:,}/{expected:,} in analytics")
            next_log = now + 5
        time.sleep(0.05)
    drain = Drain(expected, first_at - began, now - first_at, n - first_n, cpu)
    _log(f"{mode}: backlog drained at {drain.rate:,.0f} events/s (first event after {drain.startup_s:.1f}s)")
    return drain


def _kafka_phase(ctx: _Ctx, mode: str) -> None:
    """``kafka``: ingestion through the outbox and the relay (FIRSTMILE_INGEST_DELIVERY=outbox); ``direct``: the
    API produces to Kafka itself (FIRSTMILE_INGEST_DELIVERY=kafka), the relay runs but has nothing to do."""
    from firstmile.events.bus import dead_letter_topic_for, topic_for
    from firstmile.events.kafka import ensure_topics
    from firstmile.settings import EventsSettings

    facts, tmp = ctx.facts, ctx.tmp / mode
    tmp.mkdir()
    prefix = f"bench-{ctx.run_id}-{mode}"
    topic, dlq = topic_for(prefix, REGION), dead_letter_topic_for(prefix, REGION)
    ensure_topics(ctx.kafka, {topic: PARTITIONS, dlq: 1})
    batch_size = EventsSettings.model_fields["relay_batch_size"].default
    port = _free_port()
    env = _subprocess_env(
        {
            "FIRSTMILE_DATABASE_URL": ctx.app_url,
            "FIRSTMILE_DATABASE_ADMIN_URL": ctx.db_admin_url,
            "FIRSTMILE_API_KEY_PEPPER": ctx.pepper,
            "FIRSTMILE_REGION": REGION,
            "FIRSTMILE_LOG_LEVEL": "WARNING",
            "FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS": ctx.kafka,
            "FIRSTMILE_KAFKA_TOPIC_PREFIX": prefix,
            "FIRSTMILE_RELAY_DATABASE_URL": ctx.relay_url,
            "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": str(ctx.signing_key),
            "FIRSTMILE_KEK_FILE": str(ctx.kek_file),
            "FIRSTMILE_INGEST_DELIVERY": "kafka" if mode == "direct" else "outbox",
        }
    )
    servers: list[Server] = []
    consumer: _ConsumerThread | None = None

    def check() -> None:
        if consumer is not None:
            consumer.check()
        for server in servers:
            if server.proc.poll() is not None:
                raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")

    try:
        api_argv = [sys.executable, "-m", "firstmile.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        api_argv += ["--workers", str(facts.workers)]
        api_env = env | {"FIRSTMILE_DATA_DIR": str(tmp / "api")}
        servers.append(_start_server(f"firstmile API ({mode})", api_argv, api_env, port, tmp / "api.log"))
        api_pid = servers[0].proc.pid
        before = _visible(ctx.store, ctx.tenant_id)
        meter = CpuMeter(dict(ctx.roots) | {"API (uvicorn)": api_pid})
        load = _ingest_only(ctx, mode, port, meter)
        facts.ingest_only[mode] = (load, meter)

        _settle(ctx.db_admin_dsn)
        _log(f"{mode}: starting the analytics consumer and the relay on the backlog")
        began = time.monotonic()
        consumer = _ConsumerThread(ctx.kafka, topic, dlq, f"{prefix}.{REGION}.analytics", ctx.store, batch_size)
        consumer.start()
        relay_argv = [sys.executable, "-c", "from firstmile.cli import main; main()", "relay"]
        _log(f"starting firstmile relay: {shlex.join(relay_argv)}")
        with (tmp / "relay.log").open("wb") as sink:
            relay_proc = subprocess.Popen(
                relay_argv,
                env=env | {"FIRSTMILE_DATA_DIR": str(tmp / "relay")},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        servers.append(Server("firstmile relay", relay_proc, 0, tmp / "relay.log"))
        pipeline = dict(ctx.roots) | {"API (uvicorn)": api_pid, "relay": relay_proc.pid}
        facts.drain[mode] = _drain(ctx, mode, before, load.accepted, began, CpuMeter(dict(pipeline)), check)

        base = f"http://127.0.0.1:{port}"
        _log(f"{mode}: warming up")
        _warm_up(base, ctx.key, ctx.store, ctx.tenant_id, f"{mode}-warm-{ctx.run_id}", check)
        facts.end_to_end.append(_throughput(ctx, mode, port, CpuMeter(dict(pipeline)), check))
        facts.freshness.append(_freshness(mode, base, ctx.key, ctx.store, ctx.tenant_id, ctx.samples, check))
    finally:
        for server in reversed(servers):
            _stop_server(server)
        if consumer is not None:
            consumer.stop()


def _embedded_phase(ctx: _Ctx) -> None:
    from firstmile.app import create_app
    from firstmile.settings import Settings

    facts = ctx.facts
    # the flat names (FIRSTMILE_* without the prefix): they win over the environment, as keyword arguments do
    flat: dict[str, Any] = {
        "log_level": "WARNING",
        "kafka_bootstrap_servers": None,
        "otel_exporter": "none",
        "audit_signing_key_file": ctx.signing_key,
        "kek_file": ctx.kek_file,
    }
    settings = Settings(region=REGION, data_dir=ctx.tmp / "embedded", **flat)
    pepper = ctx.pepper.encode()
    # the API alone first: no relay_database_url, so no in-process relay
    port = _free_port()
    server = _InProcessServer(create_app(settings, ctx.app_url, pepper, analytics=ctx.store), port)
    before = _visible(ctx.store, ctx.tenant_id)
    try:
        server.start()
        meter = CpuMeter(dict(ctx.roots))
        load = _ingest_only(ctx, "embedded", port, meter)
        facts.ingest_only["embedded"] = (load, meter)
    finally:
        server.stop()

    port = _free_port()
    app = create_app(settings, ctx.app_url, pepper, analytics=ctx.store, relay_database_url=ctx.relay_url)
    server = _InProcessServer(app, port)

    def check() -> None:
        if not server.thread.is_alive():
            raise BenchError("the in-process API stopped")

    try:
        _settle(ctx.db_admin_dsn)
        _log("embedded: starting the API with its in-process relay on the backlog")
        began = time.monotonic()
        server.start()
        facts.drain["embedded"] = _drain(
            ctx, "embedded", before, load.accepted, began, CpuMeter(dict(ctx.roots)), check
        )
        _log("embedded: warming up")
        _warm_up(server.base, ctx.key, ctx.store, ctx.tenant_id, f"embedded-warm-{ctx.run_id}", check)
        facts.end_to_end.append(_throughput(ctx, "embedded", port, CpuMeter(dict(ctx.roots)), check))
        facts.freshness.append(
            _freshness("embedded", server.base, ctx.key, ctx.store, ctx.tenant_id, ctx.samples, check)
        )
    finally:
        server.stop()


# ---- the report ------------------------------------------------------------------------------------


DISTURBED_CORES = 0.25
"""A run during which the rest of the machine used more than this many cores was disturbed."""


def _produce_summary(runs: Sequence[ProduceRun]) -> list[tuple[str, int, float, str]]:
    """(label, batch size or 0, median msgs/s, which runs) for the bare producer first, then each relay batch size.

    The median is over the undisturbed runs of a configuration when it has any, else over all of them.
    """
    if not runs:
        return []
    out: list[tuple[str, int, float, str]] = []
    sizes = sorted({r.batch_size for r in runs if r.batch_size})
    for size in [0, *sizes]:
        group = [r for r in runs if (r.batch_size or 0) == size]
        calm = [r for r in group if r.cpu.wall_s and r.cpu.other_s / r.cpu.wall_s <= DISTURBED_CORES]
        used = calm or group
        note = f"{len(used)} of {len(group)}" + ("" if calm else " (all disturbed)")
        label = "bare producer" if not size else f"relay, batch {size:,}"
        out.append((label, size, statistics.median(r.rate for r in used), note))
    return out


def _others(cpu: CpuMeter) -> str:
    """The busiest unmeasured processes of a run, for the report."""
    if not cpu.others:
        return "no single process stands out"
    return ", ".join(f"`{name}` {seconds / cpu.wall_s:.2f} cores" for name, seconds in cpu.others)


def _whole(run: EndToEnd) -> bool:
    return run.rows == run.distinct == run.expected


def _losses(run: EndToEnd) -> str:
    if _whole(run):
        return "none lost, none duplicated"
    lost, extra = run.expected - run.distinct, run.rows - run.distinct
    return f"**{lost:,} lost, {extra:,} duplicate rows**"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _gap_cell(gaps: Sequence[float]) -> str:
    """Median gap of the first and of the last few batches: ``first → last``."""
    if not gaps:
        return "—"
    k = max(1, min(5, len(gaps) // 3))
    return f"{statistics.median(gaps[:k]) * 1000:.0f} → {statistics.median(gaps[-k:]) * 1000:.0f}"


def _cpu_cells(cpu: CpuMeter, names: Sequence[str]) -> str:
    return " | ".join(f"{cpu.cores(n):.2f}" for n in names)


def _report(f: Facts) -> str:
    m = f.machine
    out = [
        "## Event path benchmark",
        "",
        f"- Date: {f.started_at:%Y-%m-%d %H:%M} UTC (run took {f.elapsed_s:.0f} s)",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory']} RAM, {m['os']}, Python {m['python']}",
        f"- PostgreSQL: {f.pg.settings.get('server_version', '?')} on 127.0.0.1, same machine "
        f"(shared_buffers {f.pg.settings.get('shared_buffers', '?')}, fsync {f.pg.settings.get('fsync', '?')}, "
        f"synchronous_commit {f.pg.settings.get('synchronous_commit', '?')})",
        f"- Kafka: {f.kafka}; topics of {PARTITIONS} partitions, fresh for each run",
        f"- Command: `{f.command}`",
        f"- Code: {f.code}",
        f"- Machine load before the run (2 s, nothing of the bench running): {f.idle_load:.2f} cores busy",
        "- Everything (load generator, API, relay, consumers, chdb, PostgreSQL, Kafka) shares the same cores.",
        "",
    ]
    rows = ["bench process", "PostgreSQL", "Kafka broker"]
    summary = _produce_summary(f.produce)
    if f.produce:
        bare_rate = summary[0][2]
        out += [
            "### Relay vs bare producer",
            "",
            f"{f.messages:,} `track` envelopes per run ({'; '.join(f.notes)}). Bare: a confluent-kafka `Producer` "
            "with `PRODUCER_DEFAULTS`, the same keys, values and headers, produce all then wait for every ack. "
            "Relay: `OutboxRelay` + `KafkaPublisher` in the bench process as a login role granted "
            "`firstmile_relay`, until the outbox is empty. Before them, 50,000 unmeasured messages warm the "
            "broker up. Messages in the topic are counted from its watermarks afterwards. Cores: CPU seconds per "
            "second of the run, by process (the bench process is the producer or the relay; other: the rest of "
            f"the machine's busy time). Runs with more than {DISTURBED_CORES} other cores were disturbed by other "
            "work on the machine and are left out of the medians below when undisturbed runs exist. ÷ bare: to "
            "the median bare rate.",
            "",
            "| run | msgs/s | ÷ bare | seconds | in topic | publish share | batches | between batches ms | "
            + " | ".join(f"{n} cores" for n in rows)
            + " | other cores | machine cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(rows) + "---:|---:|",
        ]
        for r in f.produce:
            share = f"{r.publish_s / r.seconds:.0%}" if r.batch_size else "—"
            out.append(
                f"| {r.name} | {r.rate:,.0f} | {r.rate / bare_rate:.1%} | {r.seconds:.2f} | {r.in_topic:,} | "
                f"{share} | {r.batches or '—'} | {_gap_cell(r.gaps_s)} | {_cpu_cells(r.cpu, rows)} | "
                f"{r.cpu.other_s / r.cpu.wall_s if r.cpu.wall_s else 0:.2f} | "
                f"{r.cpu.busy_s / r.cpu.wall_s if r.cpu.wall_s else 0:.2f} |"
            )
        out += [
            "",
            f"Filling the outbox (`INSERT … SELECT generate_series`, then `ANALYZE`): "
            f"{', '.join(f'{s:.1f}' for s in f.fill_s)} s. `to_record` plus the fetch of all rows: "
            f"{f.encode_us:.1f} µs a row. Publish share: time inside `KafkaPublisher.publish` (produce and wait "
            "for every acknowledgement of the batch); the rest is the fetch, `to_record` and the delete. Between "
            "batches: from one publish's end to the next one's start (the delete of a batch, the fetch and "
            "`to_record` of the next), median of the first few batches → of the last few.",
            "",
            *(
                f"Disturbed: {r.name} ({_others(r.cpu)})."
                for r in f.produce
                if r.cpu.wall_s and r.cpu.other_s / r.cpu.wall_s > DISTURBED_CORES
            ),
            "",
            "| configuration | median msgs/s | ÷ bare | runs in the median |",
            "|---|---:|---:|---|",
            *(f"| {label} | {rate:,.0f} | {rate / bare_rate:.1%} | {used} |" for label, _size, rate, used in summary),
            "",
        ]
    for run in f.end_to_end:
        names = ["bench process", "PostgreSQL", "Kafka broker", "load generator"]
        if run.mode in ("kafka", "direct"):
            names = ["API (uvicorn)", "relay", *names]
            title = (
                "### End to end through Kafka, outbox delivery: API → outbox → relay → Kafka → analytics"
                if run.mode == "kafka"
                else "### End to end through Kafka, direct delivery: API → Kafka → analytics"
            )
            where = (
                f"`firstmile serve --workers {f.workers}` and `firstmile relay` as subprocesses; the analytics "
                "consumer (`KafkaConsumerRunner` + `AnalyticsSink` on `ChdbStore`, batches of 2,000) in the bench "
                "process (so its CPU column is the consumer, chdb and the bench's own polling). "
                + (
                    "`FIRSTMILE_INGEST_DELIVERY=outbox`: the API writes receipts and outbox rows, the relay "
                    "publishes them"
                    if run.mode == "kafka"
                    else "`FIRSTMILE_INGEST_DELIVERY=kafka`: the API produces each batch (`acks=all`) and answers "
                    "once the broker acknowledged it; no receipts, no outbox rows (the relay runs, idle)"
                )
            )
        else:
            title = "### Embedded end to end: API → outbox → in-process relay → consumers → analytics"
            where = (
                "`create_app(…, analytics=store, relay_database_url=…)` without Kafka, served by uvicorn (one "
                "worker) in a thread of the bench process: relay and the analytics, progress and features "
                "consumers in-process (so the bench process column is all of these plus chdb)"
            )
        load = run.load
        alone = f.ingest_only.get(run.mode)
        drain = f.drain.get(run.mode)
        baseline = alone[0].ingest_rate if alone else math.nan
        out += [
            title,
            "",
            f"{where}. Load: {load.events:,} unique `track` events of {USERS:,} users (a Segment `context` with "
            f"`ip`, which ingestion drops: data minimisation) in {load.requests:,} `POST /v1/batch` of "
            f"{SEGMENT_BATCH} ({load.body_bytes / max(1, load.requests) / 1024:.0f} KB each) over "
            f"{f.connections} keep-alive connections from a load generator subprocess. Three runs in this order: "
            "**ingestion only** (the API alone, nothing relays or consumes: its accept rate is the baseline), "
            "**backlog drain** (the relay and consumers started on the backlog that run left: their rate from "
            "the first event in analytics to the last), then, after a warm-up, **end to end** (everything "
            "running; from the first POST to the moment all accepted events are counted in the analytics store, "
            "polled every 50 ms).",
            "",
            "| measure | value |",
            "|---|---:|",
        ]
        if alone:
            out.append(
                f"| ingestion only: API accept rate (baseline) | {baseline:,.0f} events/s "
                f"(POST p50 {alone[0].p50_s * 1000:.0f} ms, p95 {alone[0].p95_s * 1000:.0f} ms) |"
            )
        if drain:
            out.append(
                f"| backlog drain: pipeline alone | {drain.rate:,.0f} events/s ({drain.events:,} events; first in "
                f"analytics {drain.startup_s:.1f} s after the start) |"
            )
        out += [
            f"| **end to end** (events ÷ first POST to all in analytics) | **{run.rate:,.0f} events/s** |",
            f"| end to end ÷ ingestion only | {run.rate / baseline if baseline else math.nan:.1%} |",
            f"| API accept rate during the end-to-end run | {load.ingest_rate:,.0f} events/s |",
            f"| accepted / duplicates / rejected / non-2xx | {load.accepted:,} / {load.duplicates:,} / "
            f"{load.rejected:,} / {load.non2xx:,} |",
            f"| POST latency p50 / p95 / max | {load.p50_s * 1000:.0f} / {load.p95_s * 1000:.0f} / "
            f"{load.max_s * 1000:.0f} ms |",
            f"| first POST to last answer / to all in analytics | {load.ingest_s:.1f} s / {run.e2e_s:.1f} s |",
            f"| in analytics: rows / distinct event ids (expected {run.expected:,}) | {run.rows:,} / "
            f"{run.distinct:,} ({_losses(run)}) |",
            f"| outbox rows at most (sampled each second) | {run.outbox_peak:,} |",
            "| last answer → outbox empty | "
            + (f"{run.api_done_to_outbox_empty_s:.1f} s |" if run.api_done_to_outbox_empty_s is not None else "— |"),
            "",
            "CPU by process: cores used (CPU seconds ÷ wall seconds) and CPU per event, for each run "
            "(other: the rest of the machine's busy time).",
            "",
            "| run | " + " | ".join(names) + " | other | machine |",
            "|---|" + "---:|" * (len(names) + 2),
        ]
        runs: list[tuple[str, CpuMeter, int]] = []
        if alone:
            runs.append(("ingestion only", alone[1], alone[0].accepted))
        if drain:
            runs.append(("backlog drain", drain.cpu, drain.steady_events))
        runs.append(("end to end", run.cpu, run.expected))
        for label, cpu, count in runs:
            wall = cpu.wall_s or math.nan
            out.append(
                f"| {label}, cores | "
                + " | ".join(f"{cpu.cores(n):.2f}" for n in names)
                + f" | {cpu.other_s / wall:.2f} | {cpu.busy_s / wall:.2f} |"
            )
            out.append(
                f"| {label}, µs/event | "
                + " | ".join(f"{cpu.spent.get(n, 0.0) / max(1, count) * 1e6:.0f}" for n in names)
                + f" | {cpu.other_s / max(1, count) * 1e6:.0f} | {cpu.busy_s / max(1, count) * 1e6:.0f} |"
            )
        disturbed = [
            f"{label} ({_others(cpu)})"
            for label, cpu, _ in runs
            if cpu.wall_s and cpu.other_s / cpu.wall_s > DISTURBED_CORES
        ]
        if disturbed:
            out += [
                "",
                f"**Disturbed:** other work on the machine used more than {DISTURBED_CORES} cores during: "
                + "; ".join(disturbed)
                + ".",
            ]
        out += [
            "",
            "<details><summary>End-to-end timeline (seconds since the first POST: outbox rows, rows in "
            "analytics)</summary>",
            "",
            "```",
            *(f"{t:6.1f}s  outbox {o:>9,}  analytics {v:>9,}" for t, o, v in run.timeline),
            "```",
            "",
            "</details>",
            "",
        ]
    if f.freshness:
        out += [
            "### Freshness: ingest to queryable",
            "",
            "After each end-to-end run, single-event batches posted one at a time (20 to 120 ms apart); latency from "
            "just before the POST until the event is counted in the analytics store (polled every 10 ms).",
            "",
            "| mode | samples | p50 ms | p95 ms | max ms | POST p50 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for fr in f.freshness:
            posts = sorted(fr.post_s)
            out.append(
                f"| {fr.mode} | {len(fr.latencies_s)} | {fr.pct(50) * 1000:.0f} | {fr.pct(95) * 1000:.0f} | "
                f"{max(fr.latencies_s) * 1000:.0f} | {posts[len(posts) // 2] * 1000:.0f} |"
            )
        out.append("")
    out += ["### Targets", "", "| target | measured | |", "|---|---:|---|"]
    for _label, size, rate, _used in summary[1:]:
        ratio = rate / summary[0][2]
        out.append(f"| relay (batch {size:,}) ≥ 20% of bare (medians) | {ratio:.1%} | {_verdict(ratio >= 0.2)} |")
    for run in f.end_to_end:
        if run.mode in ("kafka", "direct"):
            how = "outbox" if run.mode == "kafka" else "direct"
            out.append(
                f"| end to end through Kafka ({how} delivery) ≥ 10,000 events/s, nothing lost or duplicated | "
                f"{run.rate:,.0f} /s, {_losses(run)} | {_verdict(run.rate >= 10_000 and _whole(run))} |"
            )
    for fr in f.freshness:
        limit = 1.0 if fr.mode == "embedded" else 5.0
        out.append(
            f"| freshness {fr.mode} p95 < {limit:.0f} s | {fr.pct(95) * 1000:,.0f} ms (max "
            f"{max(fr.latencies_s) * 1000:,.0f} ms) | {_verdict(fr.pct(95) < limit)} |"
        )
    out.append("")
    return "\n".join(out)
