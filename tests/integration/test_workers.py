"""The worker processes as Kubernetes runs them: `firstmile scheduler` and `firstmile relay`, started as
real processes with a probe port, observed through /health/live, /health/ready and /metrics, and
stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from tests.conftest import PEPPER, REGION, Database, EventsDatabase, make_settings, new_tenant

UNREACHABLE = "postgresql+asyncpg://nobody@127.0.0.1:9/nothing"  # the discard port: nothing listens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(path: Path) -> str:
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32), encoding="ascii")
    return str(path)


@dataclass
class Worker:
    process: subprocess.Popen[str]
    base: str
    log: Path
    handle: IO[str]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for(self, path: str, status: int, within: float = 60.0) -> str:
        deadline = time.monotonic() + within
        last: tuple[int, str] | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                last = self.get(path)
                if last[0] == status:
                    return last[1]
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        pytest.fail(f"{path} never answered {status} (last: {last}):\n{self.log.read_text()[-3000:]}")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as Kubernetes stops a pod; the exit status and what the process wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail("the worker did not stop within 30 s of SIGTERM")
        self.handle.close()
        return self.process.returncode, self.log.read_text()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[object]:
    started: list[Worker] = []

    def start(command: list[str], database: Database, **extra: str) -> Worker:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") or k.startswith("FIRSTMILE_TEST")}
        env |= {
            "FIRSTMILE_DATABASE_URL": database.app_url,
            "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
            "FIRSTMILE_API_KEY_PEPPER": PEPPER.decode(),
            "FIRSTMILE_REGION": REGION,
            "FIRSTMILE_DATA_DIR": str(tmp_path / "data"),
            "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": _key(tmp_path / "audit_signing_key"),
            "FIRSTMILE_KEK_FILE": _key(tmp_path / "kek"),
            "FIRSTMILE_MODEL_REGISTRY_URI": str(tmp_path / "no-models"),
            "FIRSTMILE_PROBE_HOST": "127.0.0.1",
            "FIRSTMILE_PROBE_PORT": str(port),
            "FIRSTMILE_LOG_LEVEL": "INFO",
        }
        env |= extra
        log = tmp_path / f"{command[0]}-{len(started)}.log"
        handle = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "firstmile.cli", *command],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker = Worker(process, f"http://127.0.0.1:{port}", log, handle)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        worker.handle.close()


async def test_api_processes_can_leave_the_periodic_tasks_to_the_scheduler(
    database: Database, analytics_store: ChdbStore
) -> None:
    app = create_app(
        make_settings(in_process_schedulers=False, stuck_scan_interval_seconds=60),
        database.app_url,
        PEPPER,
        analytics=analytics_store,
    )
    async with AsyncTestClient(app=app) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["tasks"] == {}  # no stuck scan, no checkpointer: the scheduler runs them


async def test_the_scheduler_runs_the_periodic_tasks_and_serves_its_probes(
    database: Database, admin_engine: AsyncEngine, start_worker: object
) -> None:
    tenant = await new_tenant(admin_engine)  # its manifest and key are audited: entries to checkpoint
    async with admin_engine.connect() as conn:
        before = await conn.scalar(
            text("SELECT count(*) FROM audit_checkpoints WHERE tenant_id = :t"), {"t": tenant.id}
        )
    assert before == 0
    worker = start_worker(  # type: ignore[operator]
        ["scheduler"],
        database,
        FIRSTMILE_AUDIT_CHECKPOINT_EVERY_SECONDS="0.5",
        FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS="30",
    )
    assert json.loads(worker.wait_for("/health/live", 200)) == {"status": "ok"}
    ready = json.loads(worker.wait_for("/health/ready", 200))
    assert ready["checks"] == {"database": "ok"}
    assert ready["tasks"] == {"audit-checkpointer": "ok", "stuck-scan": "ok"}
    status, metrics = worker.get("/metrics")
    assert status == 200 and "firstmile_stuck_detected_total" in metrics
    deadline = time.monotonic() + 30
    signed = 0
    while time.monotonic() < deadline and not signed:
        async with admin_engine.connect() as conn:
            signed = await conn.scalar(
                text("SELECT count(*) FROM audit_checkpoints WHERE tenant_id = :t"), {"t": tenant.id}
            )
        await asyncio.sleep(0.2)
    assert signed, "the scheduler's checkpointer signed no checkpoint for the tenant's entries"
    code, output = worker.stop()
    assert code == 0, output[-3000:]
    assert "scheduler stopped" in output


def test_a_relay_that_cannot_reach_its_database_is_alive_but_not_ready(
    database: Database, kafka_bootstrap: str, start_worker: object
) -> None:
    worker = start_worker(  # type: ignore[operator]
        ["relay"],
        database,
        FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        FIRSTMILE_KAFKA_TOPIC_PREFIX=f"fm-probe-{secrets.token_hex(4)}",
        FIRSTMILE_RELAY_DATABASE_URL=UNREACHABLE,
    )
    assert worker.wait_for("/health/live", 200)
    body = json.loads(worker.wait_for("/health/ready", 503))  # failing after three attempts in a row
    assert body["detail"] == "background task failing: outbox-relay"
    assert body["tasks"]["outbox-relay"].startswith("failing: ")
    code, output = worker.stop()
    assert code == 0, output[-3000:]


def test_a_relay_that_publishes_is_ready_and_reports_its_lag(
    events_database: EventsDatabase, kafka_bootstrap: str, start_worker: object
) -> None:
    worker = start_worker(  # type: ignore[operator]
        ["relay"],
        events_database,
        FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        FIRSTMILE_KAFKA_TOPIC_PREFIX=f"fm-probe-{secrets.token_hex(4)}",
        FIRSTMILE_RELAY_DATABASE_URL=events_database.relay_url,
    )
    ready = json.loads(worker.wait_for("/health/ready", 200))
    assert ready["tasks"] == {"outbox-relay": "ok"}
    deadline = time.monotonic() + 30
    metrics = ""
    while time.monotonic() < deadline and "\nfirstmile_relay_lag_seconds " not in metrics:
        metrics = worker.get("/metrics")[1]  # the relay measures its backlog every 5 s
        time.sleep(0.2)
    assert "\nfirstmile_relay_lag_seconds " in metrics and "\nfirstmile_relay_backlog " in metrics
    code, output = worker.stop()
    assert code == 0, output[-3000:]
    assert "relay stopped after publishing" in output


def _scram_user(bootstrap: str) -> tuple[str, str]:
    """A SCRAM-SHA-512 user made through the broker's PLAINTEXT listener, as MSK's secret association would."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    user, password = f"fm-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    upsert = UserScramCredentialUpsertion(
        user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), password.encode()
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the futures resolve
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(10)
    return user, password


def test_a_relay_publishes_over_sasl_scram_and_a_wrong_password_is_refused(
    events_database: EventsDatabase, kafka_bootstrap: str, kafka_sasl_bootstrap: str, start_worker: object
) -> None:
    from confluent_kafka import KafkaException
    from sqlalchemy.ext.asyncio import create_async_engine

    from firstmile.events.kafka import missing_topics
    from tests.integration.test_event_pipeline import read_topic

    user, password = _scram_user(kafka_bootstrap)
    sasl = {
        "FIRSTMILE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "FIRSTMILE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FIRSTMILE_KAFKA_SASL_USERNAME": user,
    }
    # Authentication is enforced: the same listener refuses a wrong password.
    wrong = {"bootstrap.servers": kafka_sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT"}
    wrong |= {"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": user, "sasl.password": "not-" + password}
    with pytest.raises(KafkaException):
        missing_topics(wrong, {"anything": 1}, timeout=5)

    prefix = f"fm-sasl-{secrets.token_hex(4)}"
    topic = f"{prefix}.{REGION}.events"

    async def outbox_row() -> uuid.UUID:
        engine = create_async_engine(events_database.admin_url)
        try:
            tenant = await new_tenant(engine)
            event_id = uuid.uuid4()
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO outbox (event_id, tenant_id, event_type, partition_key, payload)"
                        " VALUES (:e, :t, 'onboarding.started', :k, '{\"user_id\": \"sasl\"}'::jsonb)"
                    ),
                    {"e": event_id, "t": tenant.id, "k": f"{tenant.id}:sasl"},
                )
            return event_id
        finally:
            await engine.dispose()

    event_id = asyncio.run(outbox_row())
    worker = start_worker(  # type: ignore[operator]
        ["relay"],
        events_database,
        FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS=kafka_sasl_bootstrap,
        FIRSTMILE_KAFKA_SASL_PASSWORD=password,
        FIRSTMILE_KAFKA_TOPIC_PREFIX=prefix,
        FIRSTMILE_RELAY_DATABASE_URL=events_database.relay_url,
        **sasl,
    )
    assert json.loads(worker.wait_for("/health/ready", 200))["tasks"] == {"outbox-relay": "ok"}
    # the relay made the region's topics over SASL, then published the row there
    assert missing_topics(kafka_bootstrap, {topic: 12, f"{topic}.dlq": 1}) == {}
    published = read_topic(kafka_bootstrap, topic, 1)
    assert any(str(event_id).encode() in (m.value() or b"") for m in published), [m.value() for m in published]
    code, output = worker.stop()
    assert code == 0, output[-3000:]
    assert password not in output  # the secret never reaches the log
