"""The destinations slice: each tenant's onboarding lifecycle, delivered out to the tools it already uses.

Segment, Mixpanel, Amplitude, Intercom (each through the vendor's official client) and signed webhooks
(Standard Webhooks): a consumer of the event stream queues the lifecycle events per enabled destination,
and a delivery worker sends them in batches, in order per user, at least once, with the destination's
own idempotency key. ``docs/destinations.md`` describes it.
"""
