"""The guardrail's request policy: rate limits per credential and per tenant, and the abuse detector.

Every request of a tenant app (an API key or a client-credentials token) is checked after
authentication and before its handler: :mod:`~firstmile.guardrail.policy` holds the rules
(GCRA, the IETF RateLimit header fields, the detector's baseline) with no I/O;
:mod:`~firstmile.guardrail.limiter` is the port and its in-process adapter,
:mod:`~firstmile.guardrail.redis_limiter` the Redis one (one Lua script, one round trip);
:class:`~firstmile.guardrail.service.Guardrail` applies the tenant's limits, falls back to a
local limiter when Redis fails, and writes abuse flags to the audit log;
:mod:`~firstmile.guardrail.middleware` answers ``429`` or adds the headers. The PII guardrail
is :mod:`firstmile.security.pii`.
"""
