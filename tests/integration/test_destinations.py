"""The destinations pipeline on the real stack: the manifest applied, the lifecycle events queued by the
``destinations`` consumer (fed from the outbox as the in-process dispatcher feeds it, and through Kafka), the
delivery worker sending them to a webhook endpoint on 127.0.0.1 that verifies every request with
``standardwebhooks``' own ``Webhook.verify``, and PostgreSQL holding the queue, the credentials and the state.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.destinations import service
from firstmile.destinations.consumer import DestinationFeed
from firstmile.destinations.policy import RetryPolicy, new_webhook_secret
from firstmile.destinations.registry import OfficialAdapters
from firstmile.destinations.worker import DestinationDelivery
from firstmile.events.envelope import Envelope
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.tenancy.cli import create_key
from firstmile.wiring import adapters
from tests.conftest import PEPPER, REGION, TenantFixture, make_settings
from tests.factories import demo_document, manifest_for
from tests.support.analytics_standins import SegmentStandIn
from tests.support.webhook_receiver import WebhookReceiver

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("worker:test-destinations")
STEPS = ("create-api-key", "install-sdk", "send-first-event", "view-live-events", "invite-teammate")


@dataclass
class Stack:
    client: Client
    admin: AsyncEngine
    app: AsyncEngine
    keyring: DataKeyService
    cursor: dict[uuid.UUID, int]
    workers: list[DestinationDelivery]

    async def tenant(self, destinations: list[dict[str, Any]], **extra: Any) -> TenantFixture:
        slug = f"t-{secrets.token_hex(5)}"
        doc = demo_document() | {"destinations": destinations} | extra
        manifest = manifest_for(slug, REGION, doc)
        result = await apply_manifest(self.admin, manifest)
        created = await create_key(self.admin, PEPPER, slug, ["onboarding:write", "users:admin"], "test")
        return TenantFixture(result.tenant_id, slug, created.key, manifest)

    def uow(self, tenant: TenantFixture) -> UnitOfWork:
        return UnitOfWork(self.app, OPS.tenant(tenant.id))

    async def credentials(
        self, tenant: TenantFixture, name: str, values: dict[str, str], *, rotate: bool = False,
        rotation: timedelta = timedelta(hours=1),
    ) -> service.CredentialsSet:  # fmt: skip
        async def store(tx: Any, keys: TenantKeys) -> service.CredentialsSet:
            return await service.set_credentials(
                tx, keys, name, values, actor="operator:test", rotate=rotate, rotation=rotation
            )

        return await self.keyring.run_with_keys(self.uow(tenant), store)

    async def start(self, tenant: TenantFixture, user: str, **traits: Any) -> None:
        body = {"user_id": user, "traits": {"persona": "developer", **traits}}
        response = await self.client.post("/v1/onboarding/start", json=body, headers=tenant.headers)
        assert response.status_code == 201, response.text

    async def complete(self, tenant: TenantFixture, user: str, *steps: str) -> None:
        for step in steps:
            response = await self.client.post(f"/v1/onboarding/{user}/steps/{step}/complete", headers=tenant.headers)
            assert response.status_code == 200, response.text

    async def outbox(self, tenant: TenantFixture) -> list[Envelope]:
        """The tenant's outbox rows not read yet, as envelopes (what the relay hands the consumers)."""
        async with self.admin.connect() as conn:
            rows = list(
                await conn.execute(
                    text(
                        "SELECT id, event_id, tenant_id, event_type, occurred_at, payload, partition_key FROM outbox"
                        " WHERE tenant_id = :t AND id > :after ORDER BY id"
                    ),
                    {"t": tenant.id, "after": self.cursor.get(tenant.id, 0)},
                )
            )
        if rows:
            self.cursor[tenant.id] = int(rows[-1][0])
        return [Envelope(r[1], r[2], r[3], r[4], dict(r[5]), r[6]) for r in rows]

    async def feed(self, tenant: TenantFixture, consumer: DestinationFeed | None = None) -> list[Envelope]:
        events = await self.outbox(tenant)
        await (consumer or DestinationFeed(self.app, self.keyring, config_ttl=0)).handle(events)
        return events

    def worker(self, **options: Any) -> DestinationDelivery:
        values: dict[str, Any] = {"policy": RetryPolicy(0.05, 0.2, 5), "skip_s": 0, "purge_every_s": 3600}
        worker = DestinationDelivery(self.app, self.keyring, OfficialAdapters(timeout_s=2), **(values | options))
        self.workers.append(worker)  # closed (its adapters' HTTP clients) after the test
        return worker

    async def queue(self, tenant: TenantFixture, name: str) -> list[dict[str, Any]]:
        return await self.uow(tenant).run(lambda tx: service.queued(tx, name))

    async def audit(self, tenant: TenantFixture, kind: str) -> list[dict[str, Any]]:
        async with self.admin.connect() as conn:
            rows = await conn.execute(
                text("SELECT actor, subject, payload::text FROM audit_queue WHERE tenant_id = :t AND kind = :k"
                     " UNION ALL SELECT actor, subject, payload::text FROM audit_entries"
                     " WHERE tenant_id = :t AND kind = :k"),
                {"t": tenant.id, "k": kind},
            )  # fmt: skip
            return [{"actor": r[0], "subject": r[1], "payload": json.loads(r[2])} for r in rows]


@pytest.fixture
async def stack(client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine) -> AsyncIterator[Stack]:
    keyring = DataKeyService.from_config(app_engine, adapters.key_config(make_settings()))  # the app's KEK
    found = Stack(client, admin_engine, app_engine, keyring, {}, [])
    yield found
    for worker in found.workers:
        await worker.close()


def hook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "webhook", "url": url} | extra


async def until(check: Callable[[], Awaitable[bool]], within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {within} s"
        await asyncio.sleep(0.05)


def counted(metric: str, kind: str = "webhook") -> float:
    return REGISTRY.get_sample_value(metric, {"kind": kind}) or 0.0


def in_order(receiver: WebhookReceiver, user: str) -> list[str]:
    """The events of ``user`` as the deduplicating receiver kept them, in arrival order: their names."""
    return [p["data"]["event"] for p in receiver.unique().values() if p["data"].get("user_id") == user]


# ------------------------------------------------------------------ the lifecycle, end to end


async def test_lifecycle_events_reach_the_webhook_signed_in_order_with_only_the_allowed_traits(stack: Stack) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver, WebhookReceiver(secret) as second:
        tenant = await stack.tenant(
            [hook("hooks", receiver.url + "/firstmile", traits=["persona", "plan", "email"]),
             hook("activations", second.url + "/activated", events=["onboarding.activated"])],
            pii_traits=["nickname"],
        )  # fmt: skip
        await stack.credentials(tenant, "hooks", {"secret": secret})
        await stack.credentials(tenant, "activations", {"secret": secret})
        await stack.start(tenant, "ada", email="ada@acme.example", plan="pro", nickname="Ada", seat_count=3)
        await stack.complete(tenant, "ada", *STEPS[:3])
        await stack.start(tenant, "bob", plan="free")
        events = await stack.feed(tenant)
        await DestinationFeed(stack.app, stack.keyring).handle(events)  # the batch redelivered: queued once
        queue = await stack.queue(tenant, "hooks")
        assert [(r["user_id"], r["name"]) for r in queue] == [
            ("ada", "identify"), ("ada", "Onboarding Started"), ("ada", "Onboarding Step Completed"),
            ("ada", "Onboarding Step Completed"), ("ada", "Onboarding Step Completed"), ("ada", "Onboarding Activated"),
            ("bob", "identify"), ("bob", "Onboarding Started"),
        ]  # fmt: skip
        assert [r["name"] for r in await stack.queue(tenant, "activations")] == ["Onboarding Activated"]
        async with stack.admin.connect() as conn:  # the personal trait is queued sealed, never in clear
            query = "SELECT string_agg(payload::text || coalesce(sealed, ''), '') FROM destination_queue"
            query += " WHERE tenant_id = :t"
            raw = (await conn.execute(text(query), {"t": tenant.id})).scalar_one()
        assert "ada@acme.example" not in raw and "Ada" not in raw

        done = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert (done.sent, done.retried, done.dead) == (8, 0, 0)
        await stack.worker().deliver_destination(OPS.tenant(tenant.id), "activations")

    assert receiver.refused == [] and second.refused == []  # every request verified with the library
    assert len(receiver.ids) == len(set(receiver.ids)) == 8
    assert in_order(receiver, "ada") == [
        "identify", "Onboarding Started", "Onboarding Step Completed", "Onboarding Step Completed",
        "Onboarding Step Completed", "Onboarding Activated",
    ]  # fmt: skip
    # the same event at two destinations has the same idempotency key: its event id
    [activated] = second.deliveries
    assert activated.payload["type"] == "onboarding.activated" and activated.webhook_id in receiver.ids
    identify = next(p for p in receiver.unique().values() if p["type"] == "user.identified" and
                    p["data"]["user_id"] == "ada")  # fmt: skip
    # the allow-list: persona and plan in clear, email (named) from the sealed profile; nickname and seat_count not
    assert identify["data"]["traits"] == {"persona": "developer", "plan": "pro", "email": "ada@acme.example"}
    by_id = {r["event_id"].hex: r for r in queue}
    assert set(by_id) <= set(receiver.ids)  # webhook-id is the event's idempotency key
    assert {r["status"] for r in await stack.queue(tenant, "hooks")} == {"done"}
    assert {r.path for r in receiver.requests} == {"/firstmile"} and {r.path for r in second.requests} == {"/activated"}


async def test_the_kafka_consumer_group_queues_what_the_relay_publishes(stack: Stack, kafka_bootstrap: str) -> None:
    from firstmile.events.bus import Record, dead_letter_topic_for, topic_for
    from firstmile.events.envelope import encode
    from firstmile.events.kafka import KafkaConsumerRunner, KafkaPublisher, ensure_topics

    prefix = f"dest{secrets.token_hex(4)}"
    topic, dlq = topic_for(prefix, REGION), dead_letter_topic_for(prefix, REGION)
    await asyncio.to_thread(ensure_topics, kafka_bootstrap, {topic: 3, dlq: 1})
    tenant = await stack.tenant([hook("hooks", "https://hooks.acme.example/in")])
    for user in ("k1", "k2"):
        await stack.start(tenant, user)
        await stack.complete(tenant, user, "create-api-key")
    events = await stack.outbox(tenant)
    publisher = KafkaPublisher(kafka_bootstrap, topic)
    records = [Record(i, e.event_id, e.tenant_id, e.event_type, e.partition_key, encode(e)) for i, e in
               enumerate(events + events[:3])]  # fmt: skip  # three delivered twice
    assert await publisher.publish(records) == len(records)
    await publisher.close()
    feed = DestinationFeed(stack.app, stack.keyring)
    runner = KafkaConsumerRunner(kafka_bootstrap, topic, dlq, f"{prefix}.{feed.name}", feed, poll_timeout=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:

        async def queued() -> bool:
            return len(await stack.queue(tenant, "hooks")) == 6

        await until(queued, what="six rows queued from Kafka")
        await asyncio.sleep(0.5)  # the redelivered copies are in the topic after the first ones
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    rows = await stack.queue(tenant, "hooks")
    assert len(rows) == 6 and len({(r["event_id"], r["name"]) for r in rows}) == 6
    assert [r["name"] for r in rows if r["user_id"] == "k1"] == ["identify", "Onboarding Started",
                                                                 "Onboarding Step Completed"]  # fmt: skip


async def test_a_vendor_destination_is_built_from_the_manifest_and_its_sealed_credentials(stack: Stack) -> None:
    """The registry builds Segment's adapter (the official client) from the manifest's ``host`` and the stored
    write key; the stand-in keeps messages by ``messageId``, the idempotency key."""
    with SegmentStandIn(write_key="wk-live") as segment:
        tenant = await stack.tenant([{"name": "segment", "kind": "segment", "host": segment.url}])
        await stack.credentials(tenant, "segment", {"write_key": "wk-live"})
        await stack.start(tenant, "s1", plan="pro")
        await stack.complete(tenant, "s1", "create-api-key")
        await stack.feed(tenant)
        done = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "segment")
        assert (done.kind, done.sent, done.dead) == ("segment", 3, 0)
    queue = await stack.queue(tenant, "segment")
    assert set(segment.messages) == {r["event_id"].hex for r in queue}
    identify = segment.messages[queue[0]["event_id"].hex]
    assert identify["type"] == "identify" and identify["userId"] == "s1"
    assert identify["traits"]["plan"] == "pro" and identify["traits"]["persona"] == "developer"
    assert [segment.messages[r["event_id"].hex].get("event") for r in queue[1:]] == [
        "Onboarding Started", "Onboarding Step Completed"]  # fmt: skip


# ------------------------------------------------------------------ failures, retries, dead letters


async def test_a_batch_is_at_most_max_batch_events_oldest_first(stack: Stack) -> None:
    """One claim takes one batch (a regression: an ``IN (… LIMIT … FOR UPDATE)`` claim took every due row)."""
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url, max_batch=4)])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        for user in ("b1", "b2", "b3"):
            await stack.start(tenant, user)
        await stack.feed(tenant)
        done = await stack.worker(max_batches=1).deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert (done.batches, done.sent) == (1, 4)
        rows = await stack.queue(tenant, "hooks")
        assert [r["status"] for r in rows] == ["done"] * 4 + ["pending"] * 2
        assert {r["attempts"] for r in rows[4:]} == {0}  # not claimed at all
        done = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert (done.batches, done.sent) == (1, 2)  # the rest (then an empty claim ends the task)


async def _claims(stack: Stack, tenant: TenantFixture, name: str) -> list[set[tuple[str, str]]]:
    """The destination's claims now, oldest first: each one's rows as ``(user, event name)``."""
    async with stack.admin.connect() as conn:
        rows = await conn.execute(
            text("SELECT claim_id, user_id, name FROM destination_queue WHERE tenant_id = :t AND destination = :d"
                 " AND claim_id IS NOT NULL AND status = 'pending' ORDER BY id"),
            {"t": tenant.id, "d": name},
        )  # fmt: skip
        found: dict[str, set[tuple[str, str]]] = {}
        for claim_id, user, event in rows:
            found.setdefault(str(claim_id), set()).add((str(user), str(event)))
        return list(found.values())


async def test_the_next_batch_is_claimed_while_one_is_sent_and_each_users_events_stay_in_order(stack: Stack) -> None:
    """While a batch is sent the worker records the previous one and claims the next, which may hold later events of
    the users in flight (sent after them); a user whose event the vendor did not take has their later events held
    back, unsent; a batch that fails whole stops the pass and gives the batch claimed after it back, its attempt
    uncounted; in the end every event arrived once, each user's in order."""
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url, max_batch=2)])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        users = [f"q{i}" for i in range(5)]
        for user in users:  # three rows each, queued user after user: a user's rows span two batches of two
            await stack.start(tenant, user)
            await stack.complete(tenant, user, STEPS[0])
        await stack.feed(tenant)
        receiver.hold(after=1)  # q0's identify is answered; every later request is held until the client's 2 s
        worker = stack.worker()
        delivering = asyncio.create_task(worker.deliver_destination(OPS.tenant(tenant.id), "hooks"))
        identify, started, step = "identify", "Onboarding Started", "Onboarding Step Completed"

        async def claimed(*expected: set[tuple[str, str]]) -> bool:
            return await _claims(stack, tenant, "hooks") == list(expected)

        # q0's batch in flight (its start held); the next claimed meanwhile: q0's step (sent after q0's batch) first
        first, ahead = {("q0", identify), ("q0", started)}, {("q0", step), ("q1", identify)}
        await until(lambda: claimed(first, ahead), what="the next batch claimed while q0's is sent")
        # q0's start timed out (a retry): q0's step is held back, unsent; q1's identify is sent (held), and the
        # batch after it claimed meanwhile, without q0
        await until(lambda: claimed(ahead, {("q1", started), ("q1", step)}), what="the third batch claimed")
        done = await delivering
        assert (done.batches, done.sent, done.retried) == (2, 1, 2)  # q1's batch failed whole: the pass stopped
        rows = {(r["user_id"], r["name"]): r for r in await stack.queue(tenant, "hooks")}
        assert {k: (r["status"], r["attempts"]) for k, r in rows.items() if k[0] in ("q0", "q1")} == {
            ("q0", identify): ("done", 1),
            ("q0", started): ("pending", 1),  # the retry
            ("q0", step): ("pending", 0),  # held back behind it, unsent: the attempt is not counted
            ("q1", identify): ("pending", 1),  # the retry of the batch that failed whole
            ("q1", started): ("pending", 0),  # claimed ahead, given back
            ("q1", step): ("pending", 0),
        }
        assert await _claims(stack, tenant, "hooks") == []
        assert [d.payload["data"]["user_id"] for d in receiver.deliveries] == ["q0", "q0", "q1"]  # nothing of q0's step
        receiver.recover()

        async def delivered() -> bool:
            await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
            return {r["status"] for r in await stack.queue(tenant, "hooks")} == {"done"}

        await until(delivered, what="every event delivered")
    assert len(receiver.unique()) == 3 * len(users)
    for user in users:
        assert in_order(receiver, user) == [identify, started, step]


async def test_a_failing_destination_holds_back_neither_another_destination_nor_its_other_events(
    stack: Stack,
) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as up, WebhookReceiver(secret) as slow:
        tenant = await stack.tenant(
            [hook("up", up.url), hook("slow", slow.url), hook("nowhere", "http://127.0.0.1:9/")]
        )
        for name in ("up", "slow", "nowhere"):
            await stack.credentials(tenant, name, {"secret": secret})
        for user in ("u1", "u2", "u3"):
            await stack.start(tenant, user)
        await stack.feed(tenant)
        for _ in range(20):
            slow.hang()  # the slow endpoint holds every request past the adapter's timeout
        worker = stack.worker(policy=RetryPolicy(30, 60, 5))
        began = time.monotonic()
        passes = {p.destination: p for p in await worker.run_once() if p.tenant == tenant.id}
        assert passes["up"].sent == 6 and passes["nowhere"].retried == 6
        assert passes["slow"].retried == 6 and passes["slow"].sent == 0
        assert time.monotonic() - began < 15
        assert len(up.unique()) == 6
        status = {s.name: s for s in await stack.uow(tenant).run(service.status)}
        assert status["up"].pending == 0 and status["up"].failing_since is None
        assert status["nowhere"].pending == 6 and status["nowhere"].failing_since is not None
        assert "could not be reached" in (status["nowhere"].last_error or "")
        # the failed events wait their backoff; nothing is due at once
        assert status["nowhere"].due == 0


async def test_stopping_cancels_a_delivery_stuck_past_the_grace_and_keeps_its_events(stack: Stack) -> None:
    """SIGTERM while a vendor holds a request: the loop ends within its grace, not the call's timeout, and the
    events stay queued under their claim, to be delivered again when the lease ends."""
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as stuck:
        tenant = await stack.tenant([hook("stuck", stuck.url)])
        await stack.credentials(tenant, "stuck", {"secret": secret})
        await stack.start(tenant, "u1")
        await stack.feed(tenant)
        stuck.hang()
        worker = DestinationDelivery(
            stack.app, stack.keyring, OfficialAdapters(timeout_s=60), poll_s=0.05, stop_grace_s=0.5, skip_s=0
        )
        stop = asyncio.Event()
        loop = asyncio.create_task(worker.run(stop))
        await until(lambda: _requested(stuck), what="the stuck request")
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(loop, 10)
        assert time.monotonic() - began < 5  # the grace (0.5 s), not the call's 60 s timeout
        rows = await stack.queue(tenant, "stuck")
        # claimed once (the claim counts the attempt), no result recorded: pending until the lease ends
        assert rows and all(r["status"] == "pending" and r["attempts"] == 1 and r["last_error"] is None
                            for r in rows)  # fmt: skip
        assert not worker._in_flight and not worker._adapters  # cancelled, and the adapters closed


async def _requested(receiver: WebhookReceiver) -> bool:
    return bool(receiver.requests)


@pytest.mark.parametrize("batch", [None, 4], ids=["one-batch", "batches-of-4"])
async def test_an_outage_then_recovery_delivers_everything_once_and_in_order_per_user(
    stack: Stack, batch: int | None
) -> None:
    """In batches of 4 a user's six events span batches, the next claimed while one is sent."""
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url, **({"max_batch": batch} if batch else {}))])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        users = [f"o{i}" for i in range(4)]
        for user in users:
            await stack.start(tenant, user)
            await stack.complete(tenant, user, *STEPS[:3])
        await stack.feed(tenant)
        for _ in range(30):  # the endpoint is down: 30 answers of 503, some naming a Retry-After
            receiver.respond(503, {"Retry-After": "0"} if _ % 3 == 0 else {}, "unavailable")
        worker = stack.worker(policy=RetryPolicy(0.05, 0.1, 50))
        total = len(await stack.queue(tenant, "hooks"))

        async def delivered() -> bool:
            await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
            rows = await stack.queue(tenant, "hooks")
            return all(r["status"] == "done" for r in rows)

        await until(delivered, what="every event delivered after the outage")
    assert total == 4 * 6
    assert len(receiver.unique()) == total  # each once, by webhook-id (a copy would be deduplicated anyway)
    for user in users:
        assert in_order(receiver, user) == ["identify", "Onboarding Started", "Onboarding Step Completed",
                                            "Onboarding Step Completed", "Onboarding Step Completed",
                                            "Onboarding Activated"]  # fmt: skip
    rows = await stack.queue(tenant, "hooks")
    assert max(r["attempts"] for r in rows) > 1


async def test_a_refused_event_is_dead_lettered_alone_then_replayed(stack: Stack) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url)])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        await stack.start(tenant, "r1")
        await stack.complete(tenant, "r1", "create-api-key")
        await stack.feed(tenant)
        receiver.respond(422, body="unknown event type")  # the identify, the user's first
        done = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert (done.sent, done.dead) == (2, 1)
        rows = await stack.queue(tenant, "hooks")
        assert [(r["name"], r["status"]) for r in rows] == [("identify", "dead"), ("Onboarding Started", "done"),
                                                            ("Onboarding Step Completed", "done")]  # fmt: skip
        assert rows[0]["last_error"] == "the endpoint answered 422: unknown event type"
        [found] = await stack.uow(tenant).run(service.status)
        assert found.dead == 1 and found.dead_letters[0].error.endswith("unknown event type")
        moved = await stack.uow(tenant).run(lambda tx: service.replay(tx, "hooks", None, "operator:test"))
        assert moved == 1
        again = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert again.sent == 1
    assert {r["status"] for r in await stack.queue(tenant, "hooks")} == {"done"}
    assert in_order(receiver, "r1")[-1] == "identify"  # sent again by replay, with its own idempotency key
    [replayed] = [a for a in await stack.audit(tenant, "destination") if a["payload"]["action"] ==
                  "destination.replay"]  # fmt: skip
    assert replayed["payload"]["events"] == 1 and replayed["subject"] == "destination:hooks"


async def test_an_event_out_of_attempts_is_dead(stack: Stack) -> None:
    tenant = await stack.tenant([hook("nowhere", "http://127.0.0.1:9/")])
    await stack.credentials(tenant, "nowhere", {"secret": new_webhook_secret()})
    await stack.start(tenant, "d1")
    await stack.feed(tenant)
    worker = stack.worker(policy=RetryPolicy(0.01, 0.02, 2))
    before = counted("firstmile_destination_dead_total")
    await worker.deliver_destination(OPS.tenant(tenant.id), "nowhere")
    await asyncio.sleep(0.1)
    await worker.deliver_destination(OPS.tenant(tenant.id), "nowhere")
    rows = await stack.queue(tenant, "nowhere")
    assert [r["status"] for r in rows] == ["dead", "dead"] and {r["attempts"] for r in rows} == {2}
    assert rows[0]["last_error"].startswith("gave up after 2 attempts: the endpoint could not be reached")
    assert counted("firstmile_destination_dead_total") - before == 2


async def test_sustained_failure_disables_the_destination_until_an_operator_enables_it(stack: Stack) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url)])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        await stack.start(tenant, "f1")
        await stack.feed(tenant)
        for _ in range(10):
            receiver.respond(503)
        worker = stack.worker(disable_after=timedelta(seconds=0.3), policy=RetryPolicy(0.01, 0.02, 50))
        before = counted("firstmile_destination_disabled_total")
        first = await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert not first.disabled
        await asyncio.sleep(0.4)
        second = await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert second.disabled
        assert counted("firstmile_destination_disabled_total") - before == 1
        third = await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert third.skipped is not None and third.skipped.startswith("disabled: every attempt failed since")
        [disabled] = [a for a in await stack.audit(tenant, "destination") if a["payload"]["action"] ==
                      "destination.disabled"]  # fmt: skip
        assert disabled["payload"]["automatic"] is True and disabled["actor"] == "worker:destinations"
        plan = await apply_manifest(stack.admin, tenant.manifest, dry_run=True)
        assert any("disabled since" in note for note in plan.notes)
        # events keep queueing while it is disabled
        await stack.complete(tenant, "f1", "create-api-key")
        await stack.feed(tenant)
        assert len(await stack.queue(tenant, "hooks")) == 3
        assert await stack.uow(tenant).run(lambda tx: service.enable(tx, "hooks", "operator:test"))
        receiver.recover()  # the endpoint is back
        done = await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert done.sent == 3
    assert in_order(receiver, "f1") == ["identify", "Onboarding Started", "Onboarding Step Completed"]
    actions = [a["payload"]["action"] for a in await stack.audit(tenant, "destination")]
    assert "destination.enabled" in actions


# ------------------------------------------------------------------ data protection


async def test_credentials_are_sealed_audited_without_the_secret_and_rotated_with_two_valid_secrets(
    stack: Stack,
) -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    with WebhookReceiver(old) as only_old, WebhookReceiver(new) as only_new:
        tenant = await stack.tenant([hook("old", only_old.url), hook("new", only_new.url)])
        for name in ("old", "new"):
            await stack.credentials(tenant, name, {"secret": old})
            stored = await stack.credentials(tenant, name, {"secret": new}, rotate=True,
                                             rotation=timedelta(seconds=1.5))  # fmt: skip
            assert stored.version == 2 and stored.previous_until is not None
        async with stack.admin.connect() as conn:
            query = "SELECT string_agg(sealed || coalesce(previous, ''), '') FROM destination_credentials"
            query += " WHERE tenant_id = :t"
            raw = (await conn.execute(text(query), {"t": tenant.id})).scalar_one()
        assert old.removeprefix("whsec_") not in raw and new.removeprefix("whsec_") not in raw
        await stack.start(tenant, "c1")
        await stack.feed(tenant)
        worker = stack.worker()
        for name in ("old", "new"):
            assert (await worker.deliver_destination(OPS.tenant(tenant.id), name)).sent == 2
        # during the rotation a receiver that knows either secret verifies every request
        assert len(only_old.ids) == len(only_new.ids) == 2 and not only_old.refused and not only_new.refused
        assert all(len(d.signature.split(" ")) == 2 for d in only_old.deliveries)
        await asyncio.sleep(1.6)  # the rotation is over: only the new secret signs
        await stack.complete(tenant, "c1", "create-api-key")
        await stack.feed(tenant)
        for name in ("old", "new"):
            await worker.deliver_destination(OPS.tenant(tenant.id), name)
        assert len(only_new.ids) == 3 and only_new.deliveries[-1].signature.count(" ") == 0
        assert len(only_old.refused) == 1  # the old secret no longer verifies
        await worker.close()
    entries = [a for a in await stack.audit(tenant, "destination") if a["payload"]["action"] ==
               "destination.credentials.set"]  # fmt: skip
    assert len(entries) == 4 and {e["payload"]["fields"][0] for e in entries} == {"secret"}
    assert all(old not in str(e) and new not in str(e) for e in entries)
    rotated = [e["payload"] for e in entries if e["payload"]["rotated"]]
    assert len(rotated) == 2 and all(p["previous_valid_until"] and p["version"] == 2 for p in rotated)
    with pytest.raises(service.DestinationError, match="whsec_"):
        await stack.credentials(tenant, "new", {"secret": "hunter2"})
    with pytest.raises(service.DestinationError, match="has no destination 'ghost'"):
        await stack.credentials(tenant, "ghost", {"secret": new})


async def test_an_erasure_deletes_the_users_queue_and_is_forwarded_and_recorded(stack: Stack) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url), hook("off", receiver.url, enabled=False)])
        await stack.credentials(tenant, "hooks", {"secret": secret})
        for user in ("gone", "stays"):
            await stack.start(tenant, user, email=f"{user}@acme.example")
        await stack.complete(tenant, "gone", "create-api-key")
        await stack.feed(tenant)
        assert {r["user_id"] for r in await stack.queue(tenant, "hooks")} == {"gone", "stays"}
        response = await stack.client.delete("/v1/users/gone", headers=tenant.headers)
        assert response.status_code == 202, response.text
        await stack.feed(tenant)
        await stack.feed(tenant, None)  # nothing new: a no-op
        rows = await stack.queue(tenant, "hooks")
        assert [(r["user_id"], r["name"]) for r in rows if r["user_id"] == "gone"] == [("gone", "erase")]
        assert await stack.queue(tenant, "off") == []  # nothing for a disabled destination, no erasure either
        done = await stack.worker().deliver_destination(OPS.tenant(tenant.id), "hooks")
        assert done.erased == 1 and done.sent == 2
    [erased] = [d for d in receiver.deliveries if d.payload["type"] == "user.erased"]
    assert erased.payload["data"] == {"user_id": "gone"}
    assert not any(p["data"].get("user_id") == "gone" and p["type"] != "user.erased"
                   for p in receiver.unique().values())  # fmt: skip
    [row] = [r for r in await stack.queue(tenant, "hooks") if r["user_id"] == "gone"]
    assert row["status"] == "done" and row["outcome"] == {
        "supported": True, "done": True, "detail": "the endpoint took the user.erased message"}  # fmt: skip
    forwarded = [a for a in await stack.audit(tenant, "erasure") if a["payload"].get("action") ==
                 "destination.erasure"]  # fmt: skip
    assert forwarded and forwarded[0]["subject"] == "gone" and forwarded[0]["payload"]["destination"] == "hooks"


async def test_an_erasure_deletes_what_waits_at_a_destination_the_manifest_turned_off(stack: Stack) -> None:
    tenant = await stack.tenant([hook("hooks", "https://hooks.acme.example/in")])
    await stack.start(tenant, "paused", email="paused@acme.example")
    await stack.feed(tenant)
    assert len(await stack.queue(tenant, "hooks")) == 2
    off = manifest_for(tenant.slug, REGION, demo_document() | {"destinations": [
        hook("hooks", "https://hooks.acme.example/in", enabled=False)]})  # fmt: skip
    assert (await apply_manifest(stack.admin, off)).changes == ["destination hooks: change enabled"]
    response = await stack.client.delete("/v1/users/paused", headers=tenant.headers)
    assert response.status_code == 202, response.text
    await stack.feed(tenant)
    assert await stack.queue(tenant, "hooks") == []  # nothing about the user is left, and nothing is forwarded


# ------------------------------------------------------------------ the manifest: plan and apply


async def test_plan_says_what_is_not_ready_and_apply_audits_every_destination_change(stack: Stack) -> None:
    slug = f"t-{secrets.token_hex(5)}"
    doc = demo_document() | {"destinations": [hook("hooks", "https://h.acme.example/in"),
                                              {"name": "product", "kind": "mixpanel", "region": "eu"}]}  # fmt: skip
    manifest = manifest_for(slug, REGION, doc)
    planned = await apply_manifest(stack.admin, manifest, dry_run=True)
    assert "destination hooks: add (webhook)" in planned.changes
    assert "destination product: add (mixpanel)" in planned.changes
    assert f"destination hooks: not ready: no credentials stored (firstmile destinations credentials set --tenant "\
           f"{slug} --name hooks)" in planned.notes  # fmt: skip
    applied = await apply_manifest(stack.admin, manifest)
    tenant = TenantFixture(applied.tenant_id, slug, "", manifest)
    assert (await apply_manifest(stack.admin, manifest)).changes == []  # up to date
    await stack.credentials(tenant, "hooks", {"secret": new_webhook_secret()})
    await stack.credentials(tenant, "product", {"project_token": "tok"})
    assert (await apply_manifest(stack.admin, manifest, dry_run=True)).notes == []
    await stack.uow(tenant).run(lambda tx: service.disable(tx, "hooks", "maintenance", "operator:test"))
    changed = manifest_for(slug, REGION, demo_document() | {"destinations": [
        hook("hooks", "https://h.acme.example/v2", events=["onboarding.activated"])]})  # fmt: skip
    result = await apply_manifest(stack.admin, changed)
    assert result.changes == [
        "destination hooks: change events, url",
        "destination product: remove (mixpanel; 0 queued events and its credentials deleted)",
    ]
    assert result.notes and "disabled since" in result.notes[0]
    actions = [(a["subject"], a["payload"]["action"]) for a in await stack.audit(tenant, "destination")]
    for expected in [("destination:hooks", "destination.added"), ("destination:product", "destination.added"),
                     ("destination:hooks", "destination.changed"), ("destination:product", "destination.removed"),
                     ("destination:hooks", "destination.disabled")]:  # fmt: skip
        assert expected in actions
    async with stack.admin.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM destination_credentials WHERE tenant_id = :t"),
                                   {"t": tenant.id})).scalar_one()  # fmt: skip
    assert left == 1  # the removed destination's credentials are gone


async def test_the_operator_test_command_reports_the_endpoints_answer(stack: Stack) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        tenant = await stack.tenant([hook("hooks", receiver.url)])
        with pytest.raises(ValueError, match="no credentials"):
            await stack.worker().test(OPS.tenant(tenant.id), "hooks")
        await stack.credentials(tenant, "hooks", {"secret": secret})
        answer = await stack.worker().test(OPS.tenant(tenant.id), "hooks")
        assert (answer.kind, answer.outcome) == ("webhook", "delivered")
        receiver.respond(503, {"Retry-After": "7"}, "maintenance")
        answer = await stack.worker().test(OPS.tenant(tenant.id), "hooks")
        assert (
            answer.outcome == "failed" and answer.detail == "the endpoint answered 503: maintenance (retry after 7 s)"
        )
    [test] = receiver.deliveries
    assert test.payload["type"] == "destination.test" and test.payload["data"]["properties"] == {"test": True}
    assert await stack.queue(tenant, "hooks") == []  # a test is not queued
