"""Event ingestion as a service: validate a Segment batch, seal personal data, write the outbox or the bus.

The controller (:mod:`firstmile.events.api`) gets an :class:`IngestionService` from the
wiring and the caller's unit of work. Nothing that talks to the network happens inside the
write transaction: the tenant's data keys are unwrapped first (only when a message carries
personal data), then one transaction seals each user's fields under their own key and
writes receipts and outbox rows; a retry of that transaction repeats no provider call.
With direct delivery (:class:`IngestionService`) the sealing transaction only reads or
draws the users' keys, and the batch goes to the bus after it committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.events import ingest as ingestion
from firstmile.events.bus import DeliveryError, DirectPublisher
from firstmile.events.segment import DEFAULT_MAX_BATCH_BYTES, Message, parse_batch
from firstmile.kit import telemetry
from firstmile.kit.auth import wrong_region
from firstmile.kit.db import TenantTx, retry_transient
from firstmile.kit.errors import ProblemError
from firstmile.kit.scope import TenantId, tenant_of
from firstmile.kit.uow import UnitOfWork
from firstmile.security.crypto import FieldContext, FieldKey
from firstmile.security.datakeys import DataKeyService, TenantKeys, UserKeyMissingError
from firstmile.security.personal_data import BUILTIN_PII_TRAITS, extract_message_pii
from firstmile.tenancy import service as tenancy

log = logging.getLogger("firstmile.events")


@dataclass(frozen=True, slots=True)
class WebhookSender:
    """Whoever signed a webhook with the tenant's shared secret: an authenticated principal of that tenant."""

    authenticated_tenant: uuid.UUID
    tenant_slug: str
    tenant_revision: int


class BatchResult(msgspec.Struct):
    accepted: int
    duplicates: int
    rejected: list[dict[str, Any]]


class TrackingResult(BatchResult):
    """The answer of the Segment-compatible paths: Segment's tracking API answers ``200 {"success": true}``, and
    the counts come along."""

    success: bool = True

    @classmethod
    def of(cls, result: BatchResult) -> TrackingResult:
        return cls(accepted=result.accepted, duplicates=result.duplicates, rejected=result.rejected)


def _stripped(message: Message, pii_names: frozenset[str]) -> tuple[Message, dict[str, Any]]:
    """The message without its personal fields (copied where changed; the parsed batch is not touched)."""
    payload = dict(message.payload)
    if isinstance(payload.get("context"), dict):
        payload["context"] = dict(payload["context"])
    found = extract_message_pii(payload, pii_names)
    return (dataclasses.replace(message, payload=payload), found) if found else (message, found)


async def _seal(tx: TenantTx, keys: TenantKeys, stripped: list[tuple[Message, dict[str, Any]]]) -> list[Message]:
    """Each message with its personal fields moved into one ciphertext under its user's key (``payload.pii``)."""
    user_keys: dict[str, FieldKey] = {}  # one key look-up per user and batch
    sealed: list[Message] = []
    for clean, found in stripped:
        if found:
            key = user_keys.get(clean.subject)
            if key is None:
                try:  # most users already have a key: read it rather than draw and wrap a new one
                    key = await keys.user_key(tx, clean.subject)
                except UserKeyMissingError:
                    key = await keys.user_key(tx, clean.subject, create=True)
                user_keys[clean.subject] = key
            context = FieldContext(tx.tenant, "events", "pii", str(clean.event_id))
            clean.payload["pii"] = key.encrypt(msgspec.json.encode(found), context)
        sealed.append(clean)
    return sealed


class IngestionService:
    """Segment batches into the outbox, or straight onto the bus, for one region.

    With a ``direct`` publisher (Kafka configured and ``FIRSTMILE_INGEST_DELIVERY=kafka``), an
    accepted batch is acknowledged once the broker acknowledged every message (``acks=all``):
    no receipts and no outbox rows, and consumers dedupe by event id. When a delivery fails,
    that batch goes to the outbox instead (the relay publishes it later: still nothing lost),
    and so does every batch for ``retry_direct_after`` seconds; then one batch tries the bus
    again while the others keep to the outbox, until one succeeds.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: DataKeyService,
        region: str,
        *,
        cached_tenants: int = 4096,
        direct: DirectPublisher | None = None,
        retry_direct_after: float = 10.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.region = region
        self._pii: OrderedDict[TenantId, tuple[int, frozenset[str]]] = OrderedDict()
        self._cached_tenants = cached_tenants
        self.direct = direct
        self.retry_direct_after = retry_direct_after
        self.max_batch_bytes = max_batch_bytes  # FIRSTMILE_INGEST_MAX_BATCH_BYTES: the controller enforces it
        self._direct_paused_until = 0.0  # 0: the bus is taking deliveries
        self._probing = False

    def _try_direct(self) -> tuple[bool, bool]:
        """Whether this batch goes to the bus (always while it works; after a failure, one probe at a time),
        and whether it is that probe."""
        if self.direct is None:
            return False, False
        if not self._direct_paused_until:
            return True, False
        if self._probing or time.monotonic() < self._direct_paused_until:
            return False, False
        self._probing = True
        return True, True

    async def _deliver(self, direct: DirectPublisher, tenant: TenantId, messages: list[Message]) -> bool:
        """Hand the batch to the bus; False (and the bus paused) when it was not all acknowledged."""
        try:
            await direct.deliver(ingestion.records(tenant, messages))
        except DeliveryError as exc:
            self._direct_paused_until = time.monotonic() + self.retry_direct_after
            log.warning(
                "direct delivery failed: the batch goes to the outbox",
                extra={"fields": {"error": str(exc)[:300], "outbox_for_seconds": self.retry_direct_after}},
            )
            return False
        self._direct_paused_until = 0.0
        return True

    async def _pii_names(self, uow: UnitOfWork, revision: int) -> frozenset[str]:
        """The tenant's personal-data trait names (built-ins and its manifest's), cached per revision."""
        hit = self._pii.get(uow.tenant)
        if hit is not None and hit[0] >= revision:
            return hit[1]
        current, names = await uow.run(_pii_settings)
        found = BUILTIN_PII_TRAITS | names
        self._pii[uow.tenant] = (current, found)
        self._pii.move_to_end(uow.tenant)
        while len(self._pii) > self._cached_tenants:
            self._pii.popitem(last=False)
        return found

    async def accept(
        self,
        uow: UnitOfWork,
        revision: int,
        messages: list[Any],
        *,
        all_or_nothing: bool = False,
        sent_at: datetime | None = None,
    ) -> BatchResult:
        """Validate and store a batch: its counts, or 400 when nothing in it is valid.

        ``sent_at``: the batch's ``sentAt``, which corrects the client's clock (:mod:`firstmile.events.segment`).
        """
        now = datetime.now(UTC)
        parsed = parse_batch(uow.tenant, messages, now, sent_at)
        for rejection in parsed.rejected:
            telemetry.EVENTS_REJECTED.labels(rejection.field or "message").inc()
        rejected = [r.as_json() for r in parsed.rejected]
        if not parsed.messages or (all_or_nothing and rejected):
            first = parsed.rejected[0]
            raise ProblemError(
                400,
                "invalid-events",
                f"no message accepted; message {first.index}: {first.reason}"
                + (f" (at {first.field})" if first.field else ""),
                rejected=rejected,
            )
        pii_names = await self._pii_names(uow, revision)
        stripped = [_stripped(m, pii_names) for m in parsed.messages]
        # the key provider (network) is asked before the transaction, and only when there is something to seal
        keys = await self.keyring.keys(uow) if any(found for _, found in stripped) else None

        direct, probe = self._try_direct()
        if self.direct is not None and direct:
            try:
                # the users' keys (drawn here when new) are committed before their ciphertexts leave
                sealed = [m for m, _ in stripped]
                if keys is not None:
                    sealed = await uow.run(partial(_seal, keys=keys, stripped=stripped))
                delivered = await self._deliver(self.direct, uow.tenant, sealed)
            finally:  # a probe that ended any way (the database failing, the client gone) lets the next one try
                if probe:
                    self._probing = False
            if delivered:
                telemetry.EVENTS_INGESTED.labels("accepted").inc(len(sealed))
                telemetry.EVENTS_DELIVERED.labels("kafka").inc(len(sealed))
                return BatchResult(accepted=len(sealed), duplicates=parsed.duplicates_in_batch, rejected=rejected)
            result = await uow.run(partial(ingestion.ingest, messages=sealed, now=now))
        else:

            async def work(tx: TenantTx) -> ingestion.IngestResult:
                sealed = [m for m, _ in stripped] if keys is None else await _seal(tx, keys, stripped)
                return await ingestion.ingest(tx, sealed, now)

            result = await uow.run(work)
        telemetry.EVENTS_DELIVERED.labels("outbox").inc(result.accepted)
        return BatchResult(
            accepted=result.accepted, duplicates=result.duplicates + parsed.duplicates_in_batch, rejected=rejected
        )

    async def webhook_sender(self, slug: str, raw: bytes, signature: str) -> WebhookSender | None:
        """The sender whose tenant's shared secret signed ``raw`` (hex HMAC-SHA1), or None; 421 when homed elsewhere."""

        async def lookup() -> ingestion.WebhookTenant | None:
            async with self.engine.connect() as conn:
                return await ingestion.resolve_webhook(conn, slug, "segment")

        found = await retry_transient(lookup)
        if found is None:
            return None
        expected = hmac.new(found.secret.encode(), raw, hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, signature.strip().lower()):
            return None
        if found.home_region != self.region:
            raise wrong_region(slug, found.home_region, self.region)
        return WebhookSender(found.tenant_id, slug, found.revision)

    def unit_of_work(self, sender: WebhookSender) -> UnitOfWork:
        """The unit of work of an authenticated webhook sender's tenant."""
        return UnitOfWork(self.engine, tenant_of(sender))


async def _pii_settings(tx: TenantTx) -> tuple[int, frozenset[str]]:
    _, revision, pii_traits, _, _ = await tenancy.path_settings(tx)
    return revision, frozenset(pii_traits)


__all__ = ["BatchResult", "IngestionService", "TrackingResult", "WebhookSender"]
