"""The worker processes as Kubernetes runs them: `firstmile scheduler` and `firstmile relay`, started as
real processes with a probe port, observed through /health/live, /health/ready and /metrics, and
stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import uuid

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from tests.conftest import PEPPER, REGION, Database, EventsDatabase, make_settings, new_tenant

UNREACHABLE = "postgresql+asyncpg://nobody@127.0.0.1:9/nothing"  # the discard port: nothing listens


async def test_api_processes_can_leave_the_periodic_tasks_to_the_scheduler(
    database: Database, analytics_store: ChdbStore
) -> None:
    app = create_app(
        make_settings(in_process_schedulers=False, in_process_sequencer=False, stuck_scan_interval_seconds=60),
        database.app_url,
        PEPPER,
        analytics=analytics_store,
    )
    async with AsyncTestClient(app=app) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        # no stuck scan, no sequencer: the scheduler and sequencer run them; only the live streams' listener
        assert ready.json()["tasks"] == {"live-listener": "ok"}


async def test_the_scheduler_runs_the_periodic_tasks_and_serves_its_probes(
    database: Database, start_worker: object
) -> None:
    worker = start_worker(  # type: ignore[operator]
        ["scheduler"], database, FIRSTMILE_STUCK_SCAN_INTERVAL_SECONDS="30"
    )
    assert json.loads(worker.wait_for("/health/live", 200)) == {"status": "ok"}
    ready = json.loads(worker.wait_for("/health/ready", 200))
    assert ready["checks"] == {"database": "ok"}
    # the audit log is the sequencer's; no live-listener: the scheduler streams nothing
    assert ready["tasks"] == {
        "stuck-scan": "ok", "experiment-review": "ok", "dropoff-alerts": "ok", "review-queue": "ok",
        "destination-delivery": "ok",
    }  # fmt: skip
    status, metrics = worker.get("/metrics")
    assert status == 200 and "firstmile_stuck_detected_total" in metrics
    for _ in range(100):  # the review queue's first check sets its gauges
        if 'firstmile_review_queue_length{kind="step"}' in metrics:
            break
        await asyncio.sleep(0.1)
        metrics = worker.get("/metrics")[1]
    assert 'firstmile_review_queue_length{kind="step"}' in metrics
    code, output = worker.stop()
    assert code == 0, output[-3000:]
    assert "scheduler stopped" in output


async def _audit_counts(admin_engine: AsyncEngine, tenant: uuid.UUID) -> tuple[int, int, int]:
    """(entries queued, entries in the log, checkpoints) of the tenant."""
    async with admin_engine.connect() as conn:
        counts = []
        for table in ("audit_queue", "audit_entries", "audit_checkpoints"):
            counts.append(
                int(await conn.scalar(text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t"), {"t": tenant}))
            )
    return counts[0], counts[1], counts[2]


async def test_the_sequencer_places_queued_entries_signs_checkpoints_and_serves_its_probes(
    database: Database, admin_engine: AsyncEngine, start_worker: object
) -> None:
    tenant = await new_tenant(admin_engine)  # its manifest and key are audited: queued entries
    queued, placed, signed = await _audit_counts(admin_engine, tenant.id)
    assert queued >= 2 and placed == 0 and signed == 0
    worker = start_worker(  # type: ignore[operator]
        ["sequencer"], database, FIRSTMILE_AUDIT_CHECKPOINT_EVERY_SECONDS="0.5"
    )
    assert json.loads(worker.wait_for("/health/live", 200)) == {"status": "ok"}
    ready = json.loads(worker.wait_for("/health/ready", 200))
    assert ready["checks"] == {"database": "ok"}
    assert ready["tasks"] == {"audit-checkpointer": "ok", "audit-sequencer": "ok"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (await _audit_counts(admin_engine, tenant.id))[2] == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    assert await _audit_counts(admin_engine, tenant.id) == (0, queued, 1)
    status, metrics = worker.get("/metrics")
    assert status == 200
    assert "firstmile_audit_merge_delay_seconds_count" in metrics
    assert "firstmile_audit_queue_oldest_seconds" in metrics
    code, output = worker.stop()
    assert code == 0, output[-3000:]
    assert "sequencer stopped" in output


async def test_a_sequencer_killed_mid_batch_loses_and_duplicates_nothing(
    database: Database, admin_engine: AsyncEngine, app_engine: AsyncEngine, start_worker: object
) -> None:
    """SIGKILL while the sequencer's batch has inserted its entries and moved the head, and waits to
    dequeue (a row of its batch is locked by the test): its transaction dies with it, every entry stays
    queued, and the next sequencer places each exactly once, in one verifiable chain."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firstmile.audit.service import append
    from firstmile.audit.verify import verify_tenant
    from firstmile.kit.db import tenant_transaction
    from firstmile.kit.scope import OPERATOR_CLI
    from tests.conftest import sequenced, unaudited_tenant

    fixture = await unaudited_tenant(admin_engine)
    tenant = OPERATOR_CLI.tenant(fixture.id)
    for start in range(0, 300, 100):
        async with tenant_transaction(app_engine, tenant) as tx:
            for i in range(start, start + 100):
                await append(tx, "decision", "agent:planner", f"user:{i}", {"i": i})
    async with admin_engine.connect() as watch, admin_engine.connect() as blocker:
        # lock the last queued row: the sequencer's batch stops at its dequeue, with its writes done
        await blocker.execute(
            text("SELECT entry_id FROM audit_queue WHERE tenant_id = :t ORDER BY created_at DESC LIMIT 1 FOR UPDATE"),
            {"t": fixture.id},
        )
        worker = start_worker(["sequencer"], database)  # type: ignore[operator]
        deadline = time.monotonic() + 60
        waiting = 0
        while time.monotonic() < deadline and not waiting:
            waiting = int(
                await watch.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'firstmile-sequencer' "
                        "AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL"
                    )
                )
            )
            await watch.commit()
            await asyncio.sleep(0.05)
        assert waiting == 1, "the sequencer never reached its dequeue"
        assert await _audit_counts(admin_engine, fixture.id) == (300, 0, 0)  # its inserts are uncommitted
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=30)
        await blocker.rollback()
        deadline = time.monotonic() + 30  # the orphaned backend finds its client gone and rolls back
        while time.monotonic() < deadline:
            left = await watch.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'firstmile-sequencer'")
            )
            await watch.commit()
            if not left:
                break
            await asyncio.sleep(0.05)
        assert not left, "the killed sequencer's backend is still there"
    assert await _audit_counts(admin_engine, fixture.id) == (300, 0, 0)
    assert await sequenced(app_engine, fixture.id) == 300
    assert await _audit_counts(admin_engine, fixture.id) == (0, 300, 0)
    async with admin_engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT seq, (payload->>'i')::int FROM audit_entries WHERE tenant_id = :t ORDER BY seq"),
                {"t": fixture.id},
            )
        ).all()
    assert [r[0] for r in rows] == list(range(300))
    assert [r[1] for r in rows] == list(range(300))  # every entry once, in the order written
    signer_key = Ed25519PrivateKey.generate().public_key()
    report = await verify_tenant(admin_engine, tenant, [signer_key])
    assert report.ok, report.summary()


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
