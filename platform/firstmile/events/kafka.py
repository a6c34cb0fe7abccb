"""Kafka adapter (confluent-kafka): the relay's and ingestion's publishers, consumer groups, the dead-letter topic.

Producer: idempotent (``enable.idempotence``), ``acks=all``, so retries neither
duplicate nor reorder a partition; the key is ``<tenant>:<user>``, so a user's
events share a partition. Consumers commit offsets only after their handler
finished the batch and any dead letters were acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from firstmile.events import envelope as env
from firstmile.events.bus import Consumer, DeadLetter, DeliveryError, Record, wait_for_stop
from firstmile.kit import telemetry

log = logging.getLogger("firstmile.kafka")

Connection: TypeAlias = str | Mapping[str, str]
"""Where Kafka is and how to connect: bootstrap servers, or librdkafka's connection properties
(``bootstrap.servers`` with ``security.protocol``, ``sasl.*``, ``ssl.ca.location``)."""


def connection_config(connection: Connection) -> dict[str, Any]:
    """librdkafka's connection properties of ``connection``."""
    if isinstance(connection, str):
        return {"bootstrap.servers": connection}
    if "bootstrap.servers" not in connection:
        raise ValueError("a Kafka connection needs bootstrap.servers")
    return dict(connection)


PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    "delivery.timeout.ms": 60000,
}


def missing_topics(bootstrap: Connection, topics: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
    """The topics of ``topics`` (name → partitions) the cluster does not have; creates nothing."""
    admin = AdminClient(connection_config(bootstrap))
    existing = set(admin.list_topics(timeout=timeout).topics)
    return {name: n for name, n in topics.items() if name not in existing}


def ensure_topics(bootstrap: Connection, topics: dict[str, int], timeout: float = 30.0) -> list[str]:
    """Create missing topics (name → partitions); existing ones are left alone. Returns those created here."""
    admin = AdminClient(connection_config(bootstrap))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=n, replication_factor=-1) for name, n in topics.items() if name not in existing
    ]
    created: list[str] = []
    if not wanted:
        return created
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            continue  # made by another process in the meantime
        created.append(name)
        log.info("created topic", extra={"fields": {"topic": name}})
    return created


class KafkaPublisher:
    """The relay's publisher: produce a batch, wait for every acknowledgement."""

    def __init__(self, bootstrap: Connection, topic: str, config: dict[str, Any] | None = None) -> None:
        self.topic = topic
        self.producer = Producer({**connection_config(bootstrap), **PRODUCER_DEFAULTS, **(config or {})})

    def _publish(self, records: Sequence[Record]) -> int:
        failed: list[int] = []
        delivered = 0

        def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, _msg: Message) -> None:
                nonlocal delivered
                if err is None:
                    delivered += 1
                else:
                    failed.append(index)

            return report

        for index, record in enumerate(records):
            while True:
                try:
                    self.producer.produce(
                        self.topic,
                        record.value,
                        record.key.encode(),
                        on_delivery=reporter(index),
                        headers=[
                            ("event_type", record.event_type.encode()),
                            ("tenant_id", str(record.tenant_id).encode()),
                        ],
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
        # Wait for every report: librdkafka retries (idempotently) until delivery.timeout.ms.
        while len(self.producer) > 0:
            self.producer.flush(1.0)
        if failed:
            log.warning("delivery failed", extra={"fields": {"failed": len(failed), "first": min(failed)}})
            return min(failed)
        return delivered

    async def publish(self, records: Sequence[Record]) -> int:
        return await asyncio.to_thread(self._publish, records)

    async def close(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10.0)


class _Delivery:
    """The acknowledgements of one direct delivery, counted on the poll thread, resolved on the loop."""

    __slots__ = ("failed", "first_error", "future", "lock", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.lock = threading.Lock()
        self.pending = count + 1  # one more, released once every record is produced
        self.failed = 0
        self.first_error: str | None = None

    def report(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            with self.lock:
                self.failed += 1
                self.first_error = self.first_error or str(err)
        self.done_one()

    def done_one(self) -> None:
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KafkaDirectPublisher:
    """Direct ingestion's publisher: produce on the event loop, await every ``acks=all`` acknowledgement.

    One idempotent producer per process, shared by concurrent requests; a thread of its own
    serves the delivery reports (``poll``), so a request awaits only its own records. A record
    not acknowledged within ``timeout_s`` fails its delivery (``delivery.timeout.ms``), and the
    caller falls back to the outbox; the broker may still have written it (at least once:
    consumers dedupe by event id).
    """

    def __init__(
        self, bootstrap: Connection, topic: str, *, timeout_s: float = 5.0, config: dict[str, Any] | None = None
    ) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self.producer = Producer(
            {
                **connection_config(bootstrap),
                **PRODUCER_DEFAULTS,
                "delivery.timeout.ms": max(1, int(timeout_s * 1000)),
                **(config or {}),
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="firstmile-ingest-producer", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    async def deliver(self, records: Sequence[Record]) -> None:
        if not records:
            return
        delivery = _Delivery(asyncio.get_running_loop(), len(records))
        report = delivery.report
        produce = self.producer.produce
        try:
            for record in records:
                headers: list[tuple[str, str | bytes | None]] = [
                    ("event_type", record.event_type.encode()),
                    ("tenant_id", str(record.tenant_id).encode()),
                ]
                while True:
                    try:
                        produce(self.topic, record.value, record.key.encode(), on_delivery=report, headers=headers)
                        break
                    except BufferError:  # the local queue is full: let the broker catch up
                        await asyncio.sleep(0.01)
        except KafkaException as exc:
            raise DeliveryError(f"produce failed: {exc}") from exc
        finally:
            delivery.done_one()  # every record is produced (or never will be)
        try:
            await asyncio.wait_for(asyncio.shield(delivery.future), self.timeout_s + 5.0)
        except TimeoutError:
            raise DeliveryError(f"no acknowledgement within {self.timeout_s + 5.0:.0f} s") from None
        if delivery.failed:
            raise DeliveryError(f"{delivery.failed} of {len(records)} not acknowledged: {delivery.first_error}")

    async def close(self) -> None:
        await asyncio.to_thread(self.producer.flush, self.timeout_s)
        self._stop.set()
        await asyncio.to_thread(self._poller.join, 5.0)
        await asyncio.to_thread(self.producer.close)  # librdkafka stops connecting now, not when collected


class KafkaConsumerRunner:
    """Runs one consumer group: poll a batch, handle it, dead-letter what fails, then commit."""

    def __init__(
        self,
        bootstrap: Connection,
        topic: str,
        dead_letter_topic: str,
        group_id: str,
        handler: Consumer,
        *,
        batch_size: int = 2000,
        poll_timeout: float = 0.1,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.handler = handler
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.consumer = KafkaConsumer(
            {
                **connection_config(bootstrap),
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 1000,
                **(config or {}),
            }
        )
        self.dead_letters = Producer({**connection_config(bootstrap), **PRODUCER_DEFAULTS})
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.consumer.subscribe([self.topic])
        try:
            while not stop.is_set():
                messages = await asyncio.to_thread(self.consumer.consume, self.batch_size, self.poll_timeout)
                if messages and not await self._process(messages, stop):
                    return  # stopped mid-retry: offsets stay uncommitted, the batch is redelivered
        finally:
            await asyncio.to_thread(self.consumer.close)

    async def _process(self, messages: list[Message], stop: asyncio.Event) -> bool:
        batch: list[env.Envelope] = []
        dead: list[tuple[DeadLetter, Message | None]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error", extra={"fields": {"error": str(error)}})
                continue
            raw = message.value() or b""
            try:
                batch.append(env.decode(raw))
            except (ValueError, TypeError) as exc:  # msgspec's DecodeError and ValidationError are ValueErrors
                dead.append((DeadLetter(None, raw, f"undecodable envelope: {exc}"), message))
        delay = 0.1
        while True:
            try:
                results = await self.handler.handle(batch)
                break
            except Exception as exc:
                if stop.is_set():
                    return False
                log.warning(
                    "consumer batch failed, retrying",
                    extra={"fields": {"consumer": self.handler.name, "error": repr(exc), "retry_in": delay}},
                )
                if await wait_for_stop(stop, delay):
                    return False
                delay = min(delay * 2, 5.0)
        dead.extend((d, None) for d in results)
        if dead:
            await asyncio.to_thread(self._dead_letter, dead)
        telemetry.CONSUMED.labels(self.handler.name, "ok").inc(len(batch) - len(results))
        await asyncio.to_thread(self._commit)
        self.handled += len(batch)
        return True

    def _dead_letter(self, dead: list[tuple[DeadLetter, Message | None]]) -> None:
        for letter, message in dead:
            headers: list[tuple[str, str | bytes | None]] = [
                ("reason", letter.reason.encode()[:1000]),
                ("consumer", self.handler.name.encode()),
            ]
            key = None
            if letter.envelope is not None:
                headers.append(("event_id", str(letter.envelope.event_id).encode()))
                key = letter.envelope.partition_key.encode() or None
            if message is not None:
                headers.append(("origin", f"{message.topic()}/{message.partition()}/{message.offset()}".encode()))
            raw = letter.raw or (env.encode(letter.envelope) if letter.envelope is not None else b"")
            self.dead_letters.produce(self.dead_letter_topic, raw, key, headers=headers)
            telemetry.DEAD_LETTERS.labels(self.handler.name).inc()
        deadline = time.monotonic() + 60
        while len(self.dead_letters) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("dead letters not acknowledged within 60 s")
            self.dead_letters.flush(1.0)

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise
