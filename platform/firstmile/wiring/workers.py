"""The worker processes: ``firstmile relay``, ``firstmile consume``, ``firstmile scheduler`` and
``firstmile sequencer``.

Wiring, because a consumer process assembles consumers of several slices (the analytics
sink, progress auto-completion, online features) around the events slice's Kafka runner,
and the scheduler runs the periodic tasks of several slices. All stop cleanly on SIGTERM or
SIGINT: the relay after its current batch, a consumer before committing a batch it has not
finished (so it is redelivered), the scheduler after the runs in progress. Each serves
``/health/live``, ``/health/ready`` and ``/metrics`` when ``FIRSTMILE_PROBE_PORT`` is set
(:mod:`firstmile.wiring.probe`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.sink import AnalyticsSink
from firstmile.analytics.store import AnalyticsStore
from firstmile.audit.service import Checkpointer, Sequencer, TreeCache
from firstmile.destinations.consumer import DestinationFeed
from firstmile.events.bus import Consumer
from firstmile.events.kafka import KafkaConsumerRunner, KafkaPublisher
from firstmile.events.relay import OutboxRelay
from firstmile.events.topics import StreamConfig, ensure_region_topics, stop_on_signals
from firstmile.kit.db import create_engine
from firstmile.kit.health import Readiness
from firstmile.kit.heap import freeze_startup_heap
from firstmile.kit.supervisor import Supervisor
from firstmile.ml.consumer import FeatureHook
from firstmile.ml.feature_stores import FeatureStoreSink
from firstmile.ml.features import FeatureStore
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.consumer import AutoCompletion
from firstmile.onboarding.service import OnboardingService
from firstmile.security.datakeys import DataKeyService, ManifestProviders
from firstmile.settings import Settings
from firstmile.wiring import adapters
from firstmile.wiring.container import Container, Overrides
from firstmile.wiring.probe import probe_server

log = logging.getLogger("firstmile.events")
CONSUMER_NAMES: tuple[str, ...] = ("analytics", "progress", "features", "destinations")


def stream_config(settings: Settings) -> StreamConfig:
    """The region's event stream settings."""
    events = settings.events
    return StreamConfig(
        bootstrap_servers=events.kafka_bootstrap_servers,
        topic_prefix=events.kafka_topic_prefix,
        region=settings.region,
        partitions=events.kafka_partitions,
        batch_size=events.relay_batch_size,
        client=tuple(sorted(events.kafka_client_config().items())),
    )


async def run_relay(settings: Settings, relay_url: str, stop: asyncio.Event | None = None) -> int:
    """Relay the outbox to Kafka until stopped; returns the number of rows published.

    The relay runs supervised, so readiness (the probe server, when configured) reports a relay
    that keeps failing to reach PostgreSQL or Kafka; a standby waiting for the lock is ready.
    """
    stop = stop or asyncio.Event()
    stop_on_signals(stop, timeout_s=settings.server.shutdown_timeout_seconds)
    config = stream_config(settings)
    topic, _ = await asyncio.to_thread(ensure_region_topics, config)
    publisher = KafkaPublisher(config.connection(), topic)
    relay = OutboxRelay(
        relay_url,
        publisher,
        batch_size=settings.events.relay_batch_size,
        dedupe_window=timedelta(days=settings.events.dedupe_days),
    )
    supervisor = Supervisor()
    supervisor.forever("outbox-relay", relay.run, probe=relay.health)
    try:
        async with probe_server(settings.server, Readiness(None, settings.region, supervisor)):
            supervisor.start()
            await stop.wait()
            await supervisor.stop()
    finally:
        await publisher.close()
    return relay.published


async def run_consumers(settings: Settings, database_url: str, names: Sequence[str]) -> None:
    """Run the named consumer groups in this process until stopped."""
    stop = asyncio.Event()
    stop_on_signals(stop, timeout_s=settings.server.shutdown_timeout_seconds)
    config = stream_config(settings)
    topic, dlq = await asyncio.to_thread(ensure_region_topics, config)
    engine: AsyncEngine | None = None
    store: AnalyticsStore | None = None
    features: FeatureStore | None = None
    keyring: DataKeyService | None = None
    handlers: list[Consumer] = []

    def database() -> AsyncEngine:
        nonlocal engine
        if engine is None:
            engine = create_engine(database_url, pool_size=4, max_overflow=0, application_name="firstmile-consumer")
        return engine

    for name in names:
        if name == "analytics":
            store = await asyncio.to_thread(adapters.open_analytics_store, settings)
            handlers.append(AnalyticsSink(store))
        elif name == "progress":
            handlers.append(AutoCompletion(database(), OnboardingService(CatalogCache())))
        elif name == "features":
            features = adapters.open_feature_store(settings)
            handlers.append(FeatureHook(FeatureStoreSink(features)))
        elif name == "destinations":
            # the tenants' data keys: personal traits a destination's allow-list names are queued sealed
            keyring = DataKeyService.from_config(database(), adapters.key_config(settings))
            handlers.append(DestinationFeed(database(), keyring))
        else:
            raise ValueError(f"unknown consumer {name!r}; known: {', '.join(CONSUMER_NAMES)}")
    runners = [
        KafkaConsumerRunner(
            config.connection(), topic, dlq, f"{config.group_prefix}.{h.name}", h, batch_size=config.batch_size
        )
        for h in handlers
    ]
    log.info("consumers running", extra={"fields": {"consumers": list(names), "topic": topic}})
    freeze_startup_heap()  # decoding batches of envelopes makes many dicts: collections skip the startup heap
    # A consumer that fails ends the process (Kubernetes restarts it, the group rebalances, and the
    # uncommitted batch is redelivered); readiness is the database's, when a consumer has a pool.
    try:
        async with probe_server(settings.server, Readiness(engine, settings.region)):
            await asyncio.gather(*(r.run(stop) for r in runners))
    finally:
        if engine is not None:
            await engine.dispose()
        if store is not None:
            await asyncio.to_thread(store.close)
        if features is not None:
            await features.close()
        if keyring is not None and isinstance(keyring.providers, ManifestProviders):
            keyring.providers.registry.close()


async def run_scheduler(
    settings: Settings, database_url: str, pepper: bytes, stop: asyncio.Event | None = None
) -> None:
    """Run the periodic tasks (stuck scan, Keycloak event sync) until stopped.

    The same tasks, built by the same container, as ``serve`` runs in-process when
    ``FIRSTMILE_IN_PROCESS_SCHEDULERS`` is true; here without the API. Several schedulers may
    run: the stuck scan writes a flag only
    if the user is still where it found them, and the event sync copies each event once.
    """
    stop = stop or asyncio.Event()
    stop_on_signals(stop, timeout_s=settings.server.shutdown_timeout_seconds)
    container = Container(settings, database_url, pepper, Overrides(schedulers=True, sequencer=False, serves_api=False))
    await container.start()
    try:
        tasks = sorted(container.supervisor.states())
        log.info("scheduler running", extra={"fields": {"tasks": tasks}})
        async with probe_server(settings.server, container.readiness):
            await stop.wait()
    finally:
        await container.stop()


async def run_sequencer(settings: Settings, database_url: str, stop: asyncio.Event | None = None) -> int:
    """Sequence the audit log's queue and sign checkpoints until stopped; returns the entries sequenced.

    What ``serve`` runs in-process when ``FIRSTMILE_IN_PROCESS_SEQUENCER`` is true, without the API and
    without its models. Several may run: a tenant is sequenced by one at a time (advisory lock and head
    row lock), and a checkpoint of one size is signed once. Stopping waits for the batch in progress;
    a sequencer killed mid-batch leaves its entries queued for the next one (nothing lost or doubled).
    """
    stop = stop or asyncio.Event()
    stop_on_signals(stop, timeout_s=settings.server.shutdown_timeout_seconds)
    engine = create_engine(database_url, pool_size=6, max_overflow=0, application_name="firstmile-sequencer")
    audit = settings.audit
    sequencer = Sequencer(engine, batch_size=audit.sequence_batch, poll_seconds=audit.sequence_poll_seconds)
    checkpointer = Checkpointer(
        engine,
        adapters.audit_signer(settings),
        TreeCache(),
        every_entries=audit.checkpoint_every_entries,
        every_seconds=audit.checkpoint_every_seconds,
    )
    supervisor = Supervisor()
    supervisor.forever("audit-sequencer", sequencer.run, probe=sequencer.health)
    supervisor.every("audit-checkpointer", checkpointer.poll_seconds, checkpointer.run_once)
    log.info("sequencer running", extra={"fields": {"batch": audit.sequence_batch}})
    try:
        async with probe_server(settings.server, Readiness(engine, settings.region, supervisor)):
            supervisor.start()
            await stop.wait()
            await supervisor.stop()
    finally:
        await engine.dispose()
    return sequencer.sequenced
