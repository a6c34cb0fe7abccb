"""Events: Segment-compatible ingestion, the outbox relay to Kafka (or in-process), topics and dead letters.

Consumers live with the slice whose state they change (``analytics.sink``,
``onboarding.consumer``, ``ml.consumer``); the outbox table is platform infrastructure
(:mod:`firstmile.kit.outbox`).
"""
