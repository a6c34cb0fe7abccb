"""Outbound webhooks, signed as the Standard Webhooks specification says (the ``standardwebhooks`` library).

Each event is one ``POST`` of a JSON body to the destination's ``url``::

    {"type": "onboarding.step_completed", "timestamp": "2026-12-08T10:00:00+00:00",
     "data": {"event_id": "…", "event": "Onboarding Step Completed", "kind": "track", "tenant_id": "…",
              "user_id": "u-1", "properties": {…}, "traits": {…}}}

with the headers ``webhook-id`` (the event's idempotency key: the same on every retry, so the receiver drops a
copy), ``webhook-timestamp`` (the attempt's time, Unix seconds) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256
of "<id>.<timestamp>.<body>">`` made by :meth:`standardwebhooks.Webhook.sign`. While a secret is being rotated the
request is signed with both, the signatures separated by a space, as the specification allows: the receiver
verifies with either. An erasure is a ``user.erased`` message.

An answer ``2xx`` is delivered; ``408``, ``429``, ``5xx``, a timeout or a connection failure is retried (after the
``Retry-After`` it names, else on the worker's schedule); any other ``4xx`` is refused for good (the event's dead
letter). Redirects are not followed. Events of different users are sent concurrently, each user's in order: once
one of a user's events fails, the user's later events in the batch wait for the next attempt, unsent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from firstmile.destinations.mapping import webhook_type
from firstmile.destinations.policy import webhook_secret_bytes
from firstmile.destinations.port import Delivered, ErasureOutcome, OutboundEvent, Outcome, Rejected, Retry

USER_AGENT = "Firstmile-Webhooks/1"
ERASED_TYPE = "user.erased"


def retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def body_of(event: OutboundEvent) -> bytes:
    """The JSON body of one event (Standard Webhooks' ``type``, ``timestamp``, ``data``)."""
    document = {
        "type": webhook_type(event),
        "timestamp": event.occurred_at.isoformat(),
        "data": {
            "event_id": str(event.event_id),
            "event": event.name,
            "kind": event.kind,
            "tenant_id": str(event.tenant_id),
            "user_id": event.user_id,
            "properties": dict(event.properties),
            "traits": dict(event.traits),
        },
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True, default=str).encode()


class WebhookDestination:
    """A tenant's webhook endpoint (see the module docstring). ``secrets``: the current secret first, then the
    previous one while a rotation lasts."""

    kind = "webhook"

    def __init__(
        self,
        url: str,
        secrets: Sequence[str],
        *,
        timeout_s: float = 10.0,
        max_batch: int = 50,
        concurrency: int = 8,
        clock: Callable[[], datetime] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not secrets:
            raise ValueError("a webhook destination needs its signing secret")
        for secret in secrets:
            webhook_secret_bytes(secret)
        self.url = url
        self._signers = [Webhook(secret) for secret in secrets]
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._clock = clock or (lambda: datetime.now(UTC))
        self._http = httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, transport=transport, headers={"user-agent": USER_AGENT}
        )

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def sign(self, message_id: str, timestamp: datetime, body: bytes) -> str:
        """The ``webhook-signature`` header: one ``v1,…`` signature per valid secret, space-separated."""
        return " ".join(signer.sign(message_id, timestamp, body) for signer in self._signers)

    async def _post(self, message_id: str, body: bytes) -> Outcome:
        now = self._clock()
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.sign(message_id, now, body),
        }
        try:
            answer = await self._http.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return Retry(f"the endpoint did not answer in time ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return Retry(f"the endpoint could not be reached: {type(exc).__name__}: {exc}"[:300])
        status = answer.status_code
        if 200 <= status < 300:
            return Delivered()
        reason = f"the endpoint answered {status}"
        detail = answer.text[:200].strip()
        if detail:
            reason += f": {detail}"
        if status in (408, 429) or status >= 500:
            return Retry(reason, retry_after(answer.headers.get("retry-after"), now))
        return Rejected(reason)

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        by_user: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            by_user.setdefault(event.user_id, []).append(i)
        gate = asyncio.Semaphore(self._concurrency)

        async def user_chain(indexes: list[int]) -> None:
            waiting: Retry | None = None
            for i in indexes:
                if waiting is not None:  # an earlier event of this user failed: keep the order, send nothing
                    outcomes[i] = Retry(f"an earlier event of the user waits ({waiting.reason})", waiting.after_s)
                    continue
                event = events[i]
                async with gate:
                    outcome = await self._post(event.idempotency_key, body_of(event))
                outcomes[i] = outcome
                if isinstance(outcome, Retry):
                    waiting = outcome

        await asyncio.gather(*(user_chain(indexes) for indexes in by_user.values()))
        return [o if o is not None else Retry("not sent") for o in outcomes]

    async def erase(self, user_id: str) -> ErasureOutcome:
        """Tell the endpoint to delete the user: a signed ``user.erased`` message (its id is the same on every
        retry, from the user id)."""
        now = self._clock()
        message_id = "erase_" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
        document: dict[str, Any] = {"type": ERASED_TYPE, "timestamp": now.isoformat(), "data": {"user_id": user_id}}
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        outcome = await self._post(message_id, body)
        if isinstance(outcome, Delivered):
            return ErasureOutcome(supported=True, done=True, detail="the endpoint took the user.erased message")
        return ErasureOutcome(supported=True, done=False, detail=outcome.reason)

    async def close(self) -> None:
        await self._http.aclose()


__all__ = ["WebhookDestination", "body_of", "retry_after"]
