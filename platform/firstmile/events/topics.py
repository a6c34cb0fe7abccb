"""The region's Kafka topics and the dead-letter replay (``tenants apply``, ``firstmile events replay-dlq``).

The long-running processes that use them (``firstmile relay`` and ``firstmile consume``)
are assembled by the wiring (:mod:`firstmile.wiring.workers`), since consumers come from
several slices.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from dataclasses import dataclass, field

from firstmile.events.bus import dead_letter_topic_for, topic_for
from firstmile.events.kafka import ensure_topics, missing_topics


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """The region's event stream: where Kafka is and how its topics are named and sized."""

    bootstrap_servers: str | None
    topic_prefix: str
    region: str
    partitions: int = 12
    batch_size: int = 2000
    client: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # the SASL password is one of them
    """librdkafka's connection properties besides bootstrap.servers (security.protocol, sasl.*, ssl.*)."""

    @property
    def bootstrap(self) -> str:
        if not self.bootstrap_servers:
            raise RuntimeError("FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS is not set (embedded mode relays in the API process)")
        return self.bootstrap_servers

    def connection(self) -> dict[str, str]:
        """bootstrap.servers and the security properties: what every client of the stream is made with."""
        return {"bootstrap.servers": self.bootstrap, **dict(self.client)}

    @property
    def topic(self) -> str:
        return topic_for(self.topic_prefix, self.region)

    @property
    def dead_letter_topic(self) -> str:
        return dead_letter_topic_for(self.topic_prefix, self.region)

    @property
    def group_prefix(self) -> str:
        """Consumer groups are ``<prefix>.<region>.<consumer>``."""
        return f"{self.topic_prefix}.{self.region}"


def stop_on_signals(stop: asyncio.Event, *, timeout_s: float | None = None) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (a relay or consumer then ends cleanly).

    With ``timeout_s`` (``FIRSTMILE_SHUTDOWN_TIMEOUT_SECONDS``), the signal also arms a watchdog: a process
    still running ``timeout_s`` later writes every thread's stack to stderr and exits with status 1
    (:func:`faulthandler.dump_traceback_later`, a C thread that needs neither the event loop nor the GIL to be
    free), so that a shutdown stuck on a call that never returns is both ended and explained.
    """
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        if timeout_s is not None and not stop.is_set():
            faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.stderr)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)


def region_topics(config: StreamConfig) -> dict[str, int]:
    """The region's topics and their partitions: the events topic and its dead-letter topic.

    Shared by every tenant homed in the region (records are keyed ``<tenant>:<user>``): a tenant has
    no topic of its own, so ``tenants apply`` ensures these once per run, not per tenant.
    """
    return {config.topic: config.partitions, config.dead_letter_topic: 1}


def reconcile_region_topics(config: StreamConfig, *, execute: bool) -> list[str]:
    """``tenants plan|apply``: the region's missing topics as changes, created when ``execute``."""
    missing = missing_topics(config.connection(), region_topics(config))
    if execute and missing:
        created = set(ensure_topics(config.connection(), missing))
        missing = {name: n for name, n in missing.items() if name in created}
    return [f"create topic {name} ({n} partition{'s' if n != 1 else ''})" for name, n in missing.items()]


def ensure_region_topics(config: StreamConfig) -> tuple[str, str]:
    ensure_topics(config.connection(), region_topics(config))
    return config.topic, config.dead_letter_topic


def replay_dead_letters(config: StreamConfig, *, dry_run: bool, idle_seconds: float = 3.0) -> list[dict[str, str]]:
    """Copy the dead-letter topic back onto the events topic (once per letter; see docs/events.md)."""
    from confluent_kafka import Consumer as KafkaConsumer
    from confluent_kafka import Producer, TopicPartition

    from firstmile.events.kafka import PRODUCER_DEFAULTS

    topic, dlq = ensure_region_topics(config)
    consumer = KafkaConsumer(
        {
            **config.connection(),
            "group.id": f"{config.group_prefix}.dlq-replay",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({**config.connection(), **PRODUCER_DEFAULTS})
    replayed: list[dict[str, str]] = []
    # Only the letters there when the replay starts: a letter that fails again is dead-lettered
    # again, and replaying up to a moving end would never stop.
    partitions = consumer.list_topics(dlq, timeout=10).topics[dlq].partitions
    ends = {p: consumer.get_watermark_offsets(TopicPartition(dlq, p), timeout=10)[1] for p in partitions}
    done: dict[int, int] = {}
    consumer.subscribe([dlq])
    try:
        while any(done.get(p, -1) + 1 < end for p, end in ends.items() if end > 0):
            batch = [m for m in consumer.consume(500, idle_seconds) if m.error() is None]
            if not batch:
                break
            for m in batch:
                partition, offset = m.partition(), m.offset()
                if partition is None or offset is None or offset >= ends.get(partition, 0):
                    continue
                raw_headers = m.headers() or []
                pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
                headers = {k: v.decode(errors="replace") if isinstance(v, bytes) else str(v or "") for k, v in pairs}
                replayed.append(
                    {
                        "event_id": headers.get("event_id", ""),
                        "consumer": headers.get("consumer", ""),
                        "reason": headers.get("reason", ""),
                    }
                )
                if not dry_run:
                    producer.produce(topic, m.value(), m.key(), headers=[("replayed_from", dlq.encode())])
                done[partition] = max(done.get(partition, -1), offset)
            if dry_run:
                continue
            while len(producer) > 0:
                producer.flush(1.0)
            consumer.commit(offsets=[TopicPartition(dlq, p, o + 1) for p, o in done.items()], asynchronous=False)
    finally:
        consumer.close()
    return replayed
