"""The ``destinations`` consumer: each tenant's lifecycle events, queued for each destination its manifest enables.

It reads the event stream (a Kafka consumer group, or the in-process dispatcher in embedded mode), maps each
lifecycle event to what a destination receives (:mod:`firstmile.destinations.mapping`: a ``track``, and an
``identify`` before it for a start) and writes one row per destination to ``destination_queue`` in one transaction
per tenant and batch; the delivery worker sends them. A row is unique per destination, event and kind, so a
redelivered event is queued once. Personal traits a destination's allow-list names are read from the user's
sealed profile and queued encrypted under the user's key.

``user.erased`` deletes everything queued about the user (for every destination: the rows carry the user's id
and traits) and queues an erasure for each enabled destination, which the worker forwards to the vendor.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.destinations import repository as repo
from firstmile.destinations.mapping import TRACK_NAMES, outbound, personal_wanted
from firstmile.destinations.service import TenantDestinations, tenant_destinations
from firstmile.events.bus import DeadLetter
from firstmile.events.envelope import Envelope
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx
from firstmile.kit.outbox import USER_ERASED
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import service as onboarding
from firstmile.security.crypto import DecryptionError, FieldContext
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.security.personal_data import canonical_name

log = logging.getLogger("firstmile.destinations")
WORKER = OperatorContext("worker:destinations")
ERASE = "erase"
_json = msgspec.json.Encoder()


def sealed_context(tenant: uuid.UUID, destination: str, event_id: uuid.UUID) -> FieldContext:
    """Where a queued identify's personal traits live (bound to its row: destination and event)."""
    return FieldContext(tenant, "destination_queue", "sealed", f"{destination}:{event_id}")


class DestinationFeed:
    """Queues lifecycle events and erasures for the tenants' destinations (see the module docstring)."""

    name = "destinations"

    def __init__(self, engine: AsyncEngine, keyring: DataKeyService | None = None, *, config_ttl: float = 30.0) -> None:
        self.engine = engine
        self.keyring = keyring
        self.config_ttl = config_ttl
        self._configs: OrderedDict[TenantId, tuple[float, TenantDestinations]] = OrderedDict()
        self.queued = 0

    async def _config(self, uow: UnitOfWork) -> TenantDestinations:
        """The tenant's destinations (cached; a manifest change is seen within ``config_ttl`` seconds)."""
        now = time.monotonic()
        cached = self._configs.get(uow.tenant)
        if cached is not None and now - cached[0] < self.config_ttl:
            return cached[1]
        config = await uow.run(tenant_destinations)
        self._configs[uow.tenant] = (now, config)
        if len(self._configs) > 10_000:
            self._configs.popitem(last=False)
        return config

    async def handle(self, events: Sequence[Envelope]) -> list[DeadLetter]:
        by_tenant: dict[uuid.UUID, list[Envelope]] = {}
        for event in events:
            if event.event_type in TRACK_NAMES or event.event_type == USER_ERASED:
                by_tenant.setdefault(event.tenant_id, []).append(event)
        for tenant_id, mine in by_tenant.items():
            uow = UnitOfWork(self.engine, WORKER.tenant(tenant_id))
            config = await self._config(uow)
            if not config.enabled and not any(e.event_type == USER_ERASED for e in mine):
                continue  # most tenants have no destination: one cached read, no write
            if not config.specs:
                continue  # an erasure where nothing can be queued (a removed destination's queue is deleted)
            personal = any(personal_wanted(s, config.pii_traits) for s in config.enabled) and any(
                e.event_type == "onboarding.started" for e in mine
            )

            work = partial(self._queue, events=mine, config=config)
            if personal and self.keyring is not None:
                self.queued += await self.keyring.run_with_keys(uow, work)
            else:
                self.queued += await uow.run(partial(work, keys=None))
        return []

    async def _queue(
        self, tx: TenantTx, keys: TenantKeys | None, *, events: list[Envelope], config: TenantDestinations
    ) -> int:
        rows: list[repo.NewRow] = []
        queued = 0
        kinds = {s.name: s.kind for s in config.enabled}
        personal_cache: dict[str, dict[str, Any]] = {}

        async def flush() -> None:
            nonlocal queued
            for destination, n in (await repo.enqueue(tx, rows)).items():
                telemetry.DESTINATION_QUEUED.labels(kinds.get(destination, "unknown")).inc(n)
                queued += n
            rows.clear()

        for event in events:
            if event.event_type == USER_ERASED:
                user_id = event.payload.get("user_id")
                if not isinstance(user_id, str) or not user_id:
                    continue
                await flush()
                await repo.delete_user(tx, user_id)
                rows.extend(
                    repo.NewRow(s.name, event.event_id, ERASE, user_id, ERASE, event.occurred_at, {})
                    for s in config.enabled
                )
                await flush()
                continue
            for spec in config.enabled:
                for out in outbound(spec, tx.tenant, event.event_id, event.event_type, event.payload,
                                    event.occurred_at, pii_traits=config.pii_traits):  # fmt: skip
                    sealed = None
                    wanted = personal_wanted(spec, config.pii_traits) if out.kind == "identify" else ()
                    if wanted and keys is not None:
                        if out.user_id not in personal_cache:
                            personal_cache[out.user_id] = await _personal(tx, keys, out.user_id)
                        held = {canonical_name(k): v for k, v in personal_cache[out.user_id].items()}
                        chosen = {t: held[canonical_name(t)] for t in wanted if canonical_name(t) in held}
                        if chosen:
                            context = sealed_context(tx.tenant, spec.name, out.event_id)
                            sealed = await keys.encrypt(tx, _json.encode(chosen), context, user_id=out.user_id)
                    payload = {"properties": dict(out.properties), "traits": dict(out.traits)}
                    rows.append(repo.NewRow(spec.name, out.event_id, out.kind, out.user_id, out.name,
                                            out.occurred_at, payload, sealed))  # fmt: skip
        await flush()
        return queued


async def _personal(tx: TenantTx, keys: TenantKeys, user_id: str) -> dict[str, Any]:
    """The user's personal traits from their sealed profile ({} when there are none, or the user was erased)."""
    held = await onboarding.held_user(tx, user_id)
    if held.profile is None or held.profile[1] is None:
        return {}
    try:
        key = await keys.user_key(tx, user_id)
        plain = key.decrypt(held.profile[1], FieldContext(tx.tenant, "end_users", "pii", user_id))
    except DecryptionError:
        log.warning("a user's personal traits do not decrypt: queued without them", extra={"fields": {"user": "-"}})
        return {}
    found = msgspec.json.decode(plain)
    return found if isinstance(found, dict) else {}


__all__ = ["DestinationFeed", "sealed_context"]
