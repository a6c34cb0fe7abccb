"""Fault tests, bounded in time: broker stopped and restarted mid-stream, relay and consumer
killed with SIGKILL mid-stream and restarted, with ingestion through the outbox and with direct
delivery to Kafka. Afterwards analytics holds every event exactly once.

They run on a broker of their own (``deploy/local/kafka.sh start fault``), so stopping it
cannot disturb the tests running beside them, and the relay and consumer run as the real
``firstmile relay`` / ``firstmile consume`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import TopicPartition
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.events.bus import dead_letter_topic_for, topic_for
from firstmile.events.kafka import ensure_topics
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION, EventsDatabase, make_settings
from tests.factories import ROOT, manifest_for

KAFKA_SH = ROOT / "deploy" / "local" / "kafka.sh"
FIRSTMILE = Path(sys.executable).with_name("firstmile")
FAULT_BROKER = f"127.0.0.1:{os.environ.get('FIRSTMILE_FAULT_KAFKA_PORT', '29292')}"


@pytest.fixture(scope="module")
def fault_broker(kafka_bootstrap: str) -> Iterator[str]:
    subprocess.run([str(KAFKA_SH), "start", "fault"], check=True, timeout=180)
    yield FAULT_BROKER
    subprocess.run([str(KAFKA_SH), "stop", "fault"], check=False, timeout=60)


def _spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(FIRSTMILE), command, *(["analytics"] if command == "consume" else [])],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _lag(bootstrap: str, topic: str, group: str) -> int:
    consumer = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        committed = consumer.committed(tps, timeout=10)
        lag = 0
        for tp in committed:
            high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
            lag += high - max(tp.offset, 0)
        return lag
    finally:
        consumer.close()


def _count_in_chdb(path: Path, tenant_id: uuid.UUID) -> dict[str, Any]:
    """Count in a separate process: chdb admits one data folder per process.

    ``n``: rows once redelivered copies are folded (FINAL; a second, different row for one
    event would count twice); ``u``: distinct event ids, what the analytics queries count.
    """
    code = (
        "import json, sys, uuid\n"
        "from firstmile.analytics.chdb_store import ChdbStore\n"
        "s = ChdbStore(sys.argv[1])\n"
        "r = s.dangerous_raw_sql('SELECT count() AS n, uniqExact(event_id) AS u FROM events FINAL"
        " WHERE tenant_id = {t:UUID}', {'t': sys.argv[2]})\n"
        "print(json.dumps(r[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tenant_id)], check=True, capture_output=True, timeout=120
    )
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def _delivered(path: str) -> float:
    return REGISTRY.get_sample_value("firstmile_events_delivered_total", {"path": path}) or 0.0


@pytest.mark.parametrize("delivery", ["outbox", "kafka"])
async def test_broker_outage_and_killed_processes_lose_and_duplicate_nothing(
    events_database: EventsDatabase, fault_broker: str, analytics_store: ChdbStore, tmp_path: Path, delivery: str
) -> None:
    """outbox: the API writes the outbox, the relay publishes. kafka (FIRSTMILE_INGEST_DELIVERY=kafka): the API
    produces itself, and while the broker is down its batches go to the outbox, which the relay drains later."""
    prefix = f"fault{secrets.token_hex(4)}"
    work = ROOT / ".firstmile" / "test-faults" / prefix
    work.mkdir(parents=True)
    env = {
        **os.environ,
        "FIRSTMILE_REGION": REGION,
        "FIRSTMILE_DATA_DIR": str(work),
        "FIRSTMILE_DATABASE_URL": events_database.app_url,
        "FIRSTMILE_DATABASE_ADMIN_URL": events_database.admin_url,
        "FIRSTMILE_RELAY_DATABASE_URL": events_database.relay_url,
        "FIRSTMILE_API_KEY_PEPPER": PEPPER.decode(),
        "FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS": fault_broker,
        "FIRSTMILE_KAFKA_TOPIC_PREFIX": prefix,
        "FIRSTMILE_KAFKA_PARTITIONS": "3",
        "FIRSTMILE_ANALYTICS_PATH": str(work / "chdb"),
        "FIRSTMILE_RELAY_BATCH_SIZE": "50",
        "FIRSTMILE_LOG_LEVEL": "WARNING",
    }
    admin = create_async_engine(events_database.admin_url, pool_size=2)
    slug = f"t-{secrets.token_hex(5)}"
    tenant_id = (await apply_manifest(admin, manifest_for(slug, REGION))).tenant_id
    key = (await create_key(admin, PEPPER, slug, ["events:write"], "test")).key
    direct = {
        "kafka_bootstrap_servers": fault_broker,
        "kafka_topic_prefix": prefix,
        "ingest_kafka_timeout_ms": 1000,
        "ingest_kafka_retry_seconds": 1,
    }
    await asyncio.to_thread(
        ensure_topics, fault_broker, {topic_for(prefix, REGION): 3, dead_letter_topic_for(prefix, REGION): 1}
    )
    settings = make_settings(**direct) if delivery == "kafka" else make_settings()
    app = create_app(settings, events_database.app_url, PEPPER, analytics=analytics_store)
    paths_before = {path: _delivered(path) for path in ("kafka", "outbox")}
    relay = _spawn("relay", env, work / "relay.log")
    consumer = _spawn("consume", env, work / "consumer.log")
    batches, per_batch = 40, 50
    sent = 0
    after_restart = 0.0

    def tick(i: int) -> list[dict[str, Any]]:
        return [
            {
                "type": "track",
                "messageId": uuid.uuid4().hex,
                "userId": f"u{j % 17}",
                "event": "Tick",
                "properties": {"batch": i, "j": j},
            }
            for j in range(per_batch)
        ]

    try:
        async with AsyncTestClient(app=app) as client:

            async def post(i: int) -> int:
                resp = await client.post(
                    "/v1/events", json={"batch": tick(i)}, headers={"Authorization": f"Bearer {key}"}
                )
                assert resp.status_code == 202, resp.text
                return int(resp.json()["accepted"])

            for i in range(batches):
                sent += await post(i)
                if i == 8:
                    await asyncio.to_thread(subprocess.run, [str(KAFKA_SH), "stop", "fault"], check=True, timeout=60)
                if i == 14:
                    await asyncio.to_thread(subprocess.run, [str(KAFKA_SH), "start", "fault"], check=True, timeout=120)
                    after_restart = _delivered("kafka")
                if i == 20:
                    relay.send_signal(signal.SIGKILL)
                    relay.wait(10)
                    relay = _spawn("relay", env, work / "relay.log")
                if i == 28:
                    consumer.send_signal(signal.SIGKILL)
                    consumer.wait(10)
                    consumer = _spawn("consume", env, work / "consumer.log")
                await asyncio.sleep(0.05)
            assert sent == batches * per_batch
            resumed = time.monotonic() + 30
            while delivery == "kafka" and _delivered("kafka") == after_restart:  # direct delivery comes back
                assert time.monotonic() < resumed, "direct delivery did not resume after the broker came back"
                sent += await post(batches)
                await asyncio.sleep(0.5)
        paths = {path: _delivered(path) - paths_before[path] for path in ("kafka", "outbox")}
        if delivery == "kafka":  # straight to the broker before and after the outage, the outbox during it
            assert paths["kafka"] > 0 and paths["outbox"] > 0 and sum(paths.values()) == sent, paths
        else:
            assert paths == {"kafka": 0, "outbox": sent}

        deadline = time.monotonic() + 120
        while True:
            async with admin.connect() as conn:
                left = (
                    await conn.execute(text("SELECT count(*) FROM outbox WHERE tenant_id = :t"), {"t": tenant_id})
                ).scalar_one()
            topic = topic_for(prefix, REGION)
            lag = await asyncio.to_thread(_lag, fault_broker, topic, f"{prefix}.{REGION}.analytics") if not left else -1
            if left == 0 and lag == 0:
                break
            assert time.monotonic() < deadline, f"not drained: outbox {left}, lag {lag}; see {work}"
            assert relay.poll() is None and consumer.poll() is None, f"a process died; see {work}"
            await asyncio.sleep(0.5)
    finally:
        _stop(consumer)
        _stop(relay)
        await admin.dispose()
    counted = await asyncio.to_thread(_count_in_chdb, work / "chdb", tenant_id)
    assert (int(counted["n"]), int(counted["u"])) == (sent, sent)
    shutil.rmtree(work, ignore_errors=True)  # kept for inspection when the test fails
