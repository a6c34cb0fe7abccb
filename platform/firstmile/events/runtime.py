"""Long-running event processes: the relay and the consumer groups (``firstmile relay|consume``).

Both stop cleanly on SIGTERM or SIGINT: the relay after its current batch, a
consumer before committing a batch it has not finished (so it is redelivered).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta

from firstmile.events.bus import Consumer, dead_letter_topic_for, topic_for
from firstmile.events.kafka import KafkaConsumerRunner, KafkaPublisher, ensure_topics, missing_topics
from firstmile.events.relay import OutboxRelay
from firstmile.settings import Settings

log = logging.getLogger("firstmile.events")
CONSUMER_NAMES: tuple[str, ...] = ("analytics", "progress", "features")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _kafka(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise RuntimeError("FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS is not set (embedded mode relays in the API process)")
    return settings.kafka_bootstrap_servers


def region_topics(settings: Settings) -> dict[str, int]:
    """The region's topics and their partitions: the events topic and its dead-letter topic.

    Shared by every tenant homed in the region (records are keyed ``<tenant>:<user>``): a tenant has
    no topic of its own, so ``tenants apply`` ensures these once per run, not per tenant.
    """
    topic = topic_for(settings.kafka_topic_prefix, settings.region)
    dlq = dead_letter_topic_for(settings.kafka_topic_prefix, settings.region)
    return {topic: settings.kafka_partitions, dlq: 1}


def reconcile_region_topics(settings: Settings, *, execute: bool) -> list[str]:
    """``tenants plan|apply``: the region's missing topics as changes, created when ``execute``."""
    bootstrap = _kafka(settings)
    missing = missing_topics(bootstrap, region_topics(settings))
    if execute and missing:
        created = set(ensure_topics(bootstrap, missing))
        missing = {name: n for name, n in missing.items() if name in created}
    return [f"create topic {name} ({n} partition{'s' if n != 1 else ''})" for name, n in missing.items()]


def ensure_region_topics(settings: Settings) -> tuple[str, str]:
    topics = region_topics(settings)
    ensure_topics(_kafka(settings), topics)
    topic, dlq = topics  # the events topic, then its dead-letter topic
    return topic, dlq


async def run_relay(settings: Settings, relay_url: str, stop: asyncio.Event | None = None) -> int:
    """Relay the outbox to Kafka until stopped; returns the number of rows published."""
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    topic, _ = await asyncio.to_thread(ensure_region_topics, settings)
    publisher = KafkaPublisher(_kafka(settings), topic)
    relay = OutboxRelay(
        relay_url,
        publisher,
        batch_size=settings.relay_batch_size,
        dedupe_window=timedelta(days=settings.event_dedupe_days),
    )
    try:
        await relay.run(stop)
    finally:
        await publisher.close()
    return relay.published


async def run_consumers(settings: Settings, database_url: str, names: Sequence[str]) -> None:
    """Run the named consumer groups in this process until stopped."""
    from firstmile.analytics.factory import open_analytics_store
    from firstmile.events.consumers import AnalyticsSink, AutoCompletion, FeatureHook
    from firstmile.kit.db import create_engine
    from firstmile.ml.feature_stores import FeatureStoreSink, open_feature_store
    from firstmile.ml.features import FeatureStore
    from firstmile.onboarding.catalog import CatalogCache
    from firstmile.onboarding.service import OnboardingService

    stop = asyncio.Event()
    _stop_on_signals(stop)
    topic, dlq = await asyncio.to_thread(ensure_region_topics, settings)
    engine = None
    store = None
    features: FeatureStore | None = None
    handlers: list[Consumer] = []
    for name in names:
        if name == "analytics":
            store = await asyncio.to_thread(open_analytics_store, settings)
            handlers.append(AnalyticsSink(store))
        elif name == "progress":
            engine = create_engine(database_url, pool_size=4, max_overflow=0, application_name="firstmile-consumer")
            handlers.append(AutoCompletion(engine, OnboardingService(CatalogCache())))
        elif name == "features":
            features = open_feature_store(settings)
            handlers.append(FeatureHook(FeatureStoreSink(features)))
        else:
            raise ValueError(f"unknown consumer {name!r}; known: {', '.join(CONSUMER_NAMES)}")
    group = f"{settings.kafka_topic_prefix}.{settings.region}"
    runners = [
        KafkaConsumerRunner(_kafka(settings), topic, dlq, f"{group}.{h.name}", h, batch_size=settings.relay_batch_size)
        for h in handlers
    ]
    log.info("consumers running", extra={"fields": {"consumers": list(names), "topic": topic}})
    try:
        await asyncio.gather(*(r.run(stop) for r in runners))
    finally:
        if engine is not None:
            await engine.dispose()
        if store is not None:
            await asyncio.to_thread(store.close)
        if features is not None:
            await features.close()


def replay_dead_letters(settings: Settings, *, dry_run: bool, idle_seconds: float = 3.0) -> list[dict[str, str]]:
    """Copy the dead-letter topic back onto the events topic (once per letter; see docs/events.md)."""
    from confluent_kafka import Consumer as KafkaConsumer
    from confluent_kafka import Producer, TopicPartition

    from firstmile.events.kafka import PRODUCER_DEFAULTS

    bootstrap = _kafka(settings)
    topic, dlq = ensure_region_topics(settings)
    consumer = KafkaConsumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{settings.kafka_topic_prefix}.{settings.region}.dlq-replay",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
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
