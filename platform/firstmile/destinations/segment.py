"""Segment, through Segment's official Python library (``segment-analytics-python``, module ``segment.analytics``).

Each event becomes one message of Segment's HTTP Tracking API ("Track", "Identify"), shaped by the library's
own ``Client`` (``send=False``: it validates and builds the message, adds ``context.library`` and checks
the 32 KB per message limit), and a batch goes out through the library's transport,
``segment.analytics.request.post(write_key, host, batch=[...])``: ``POST {host}/v1/batch`` with HTTP basic
auth (the write key as the user name), ``writeKey`` and ``sentAt`` in the body.

* ``track``: ``{"type": "track", "userId", "event": name, "properties", "timestamp", "messageId"}``;
* ``identify``: ``{"type": "identify", "userId", "traits", "timestamp", "messageId"}``, the traits being
  the event's onboarding fields and the traits the destination allows (:func:`~.vendor.profile_of`);
* ``messageId`` is the event's idempotency key: Segment deduplicates on it ("Deduplication", HTTP Tracking
  API), so a redelivery is not counted twice; ``timestamp`` is when it happened (ISO 8601, milliseconds).

Batches keep within Segment's limits ("Max Request Size": 500 KB per batch, 32 KB per message): at most
:attr:`SegmentDestination.max_batch` messages and the library's own ``BATCH_SIZE_LIMIT`` bytes per request;
a message over 32 KB is refused by the library before sending and is :class:`~.port.Rejected`.

Answers ("Errors": Segment answers ``200`` to everything but payloads too large and invalid JSON, ``400``):
``2xx`` delivered; ``429`` and ``5xx``, timeouts and refused connections are :class:`~.port.Retry` (after the
answer's ``Retry-After``, read by the library's ``parse_retry_after``); a ``400`` for a batch re-sends its
messages one per request to find the bad ones (:func:`~.vendor.deliver_groups`).

Erasure goes through Segment's Public API ("Deletion and Suppression", Create Workspace Regulation):
``POST {public_api_url}/regulations`` with ``Authorization: Bearer <public_api_token>`` and
``{"regulationType": "SUPPRESS_WITH_DELETE", "subjectType": "USER_ID", "subjectIds": [user]}``; the token
(a Public API token with the deletion scope) names the workspace. There is no official Python client of
that API among our dependencies, so it is one ``httpx`` request. Without a token, erasure is
``ErasureOutcome(supported=False)``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
import requests
from segment.analytics.client import Client
from segment.analytics.consumer import BATCH_SIZE_LIMIT, MAX_MSG_SIZE
from segment.analytics.request import APIError, DatetimeSerializer, parse_retry_after, post

from firstmile.destinations.port import ErasureOutcome, OutboundEvent, Outcome, Rejected
from firstmile.destinations.vendor import (
    Answer,
    Sent,
    Transient,
    as_utc,
    classify_status,
    deliver_groups,
    groups_by,
    profile_of,
    properties_of,
    retry_after_seconds,
)

SEGMENT_MAX_BATCH = 100
"""Messages per request: Segment's libraries send 100 (``upload_size``), well within 500 KB of small events."""
SEGMENT_CALL_BATCH = 1000
"""Events one :meth:`deliver` takes (the worker's batch), sent in requests of at most ``SEGMENT_MAX_BATCH`` each: one
claim and one record in PostgreSQL then serve several requests (``make bench-destinations``: at one request
per batch, the worker's two transactions, not the vendor, set the rate)."""
REGULATION_TYPE = "SUPPRESS_WITH_DELETE"
"""Delete the user's data and drop whatever still arrives for them (Segment's Public API regulation types)."""


class SegmentDestination:
    """One Segment source (its write key) as a destination."""

    def __init__(
        self,
        write_key: str,
        *,
        host: str = "https://api.segment.io",
        timeout_s: float = 10.0,
        public_api_token: str | None = None,
        public_api_url: str = "https://api.segmentapis.com",
    ) -> None:
        if not write_key:
            raise ValueError("a Segment write key is required")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.write_key = write_key
        self.host = host.rstrip("/")
        self.timeout_s = timeout_s
        self.public_api_token = public_api_token
        self.public_api_url = public_api_url.rstrip("/")
        # the library's client, only to shape and check messages (send=False: it posts nothing itself)
        self._shaper = Client(write_key=write_key, host=self.host, send=False, sync_mode=True, max_retries=0)

    @property
    def kind(self) -> str:
        return "segment"

    @property
    def max_batch(self) -> int:
        return SEGMENT_CALL_BATCH

    def message(self, event: OutboundEvent) -> dict[str, Any]:
        """The Tracking API message of ``event``, as the library builds it (raises for one over 32 KB)."""
        timestamp = as_utc(event.occurred_at)
        if event.kind == "identify":
            _, msg = self._shaper.identify(
                user_id=event.user_id, traits=profile_of(event), timestamp=timestamp, message_id=event.idempotency_key
            )
        else:
            _, msg = self._shaper.track(
                user_id=event.user_id,
                event=event.name,
                properties=properties_of(event),
                timestamp=timestamp,
                message_id=event.idempotency_key,
            )
        return dict(msg)

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        messages: list[dict[str, Any] | None] = []
        decided: list[Outcome | None] = []
        sizes: list[int] = []
        for event in events:
            try:
                msg = self.message(event)
            except (RuntimeError, AssertionError, TypeError, ValueError) as exc:  # the library's checks
                messages.append(None)
                decided.append(Rejected(_refusal(exc)))
                sizes.append(0)
                continue
            messages.append(msg)
            decided.append(None)
            sizes.append(len(json.dumps(msg, cls=DatetimeSerializer).encode()))
        keys = ["batch" if m is not None else None for m in messages]
        groups = groups_by(keys, SEGMENT_MAX_BATCH, sizes, BATCH_SIZE_LIMIT)

        async def send(indices: Sequence[int]) -> Answer:
            batch = [messages[i] for i in indices]
            return await self._post(batch)

        return await deliver_groups(len(events), groups, send, outcomes=decided)

    async def _post(self, batch: list[dict[str, Any] | None]) -> Answer:
        try:
            async with asyncio.timeout(self.timeout_s * 2 + 1):  # the library's own timeout is timeout_s
                await asyncio.to_thread(post, self.write_key, self.host, timeout=self.timeout_s, batch=batch)
        except APIError as error:
            response = error.response
            after: float | None = None
            if response is not None:
                told = parse_retry_after(response)  # the library's reading (delta-seconds or an HTTP date)
                after = float(told) if told is not None else retry_after_seconds(response.headers.get("Retry-After"))
            status = int(error.status) if isinstance(error.status, int) else 0
            return classify_status(status, f"{error.code}: {error.message}", after)
        except (requests.RequestException, OSError, TimeoutError) as exc:
            return Transient(f"Segment did not answer: {type(exc).__name__}: {_first_line(exc)}")
        return Sent()

    async def erase(self, user_id: str) -> ErasureOutcome:
        if not self.public_api_token:
            return ErasureOutcome(
                supported=False,
                done=False,
                detail="Segment deletes through its Public API: set public_api_token to forward erasures",
            )
        body = {"regulationType": REGULATION_TYPE, "subjectType": "USER_ID", "subjectIds": [user_id]}
        headers = {
            "Authorization": f"Bearer {self.public_api_token}",
            "Content-Type": "application/vnd.segment.v1+json",
            "Accept": "application/vnd.segment.v1+json",
        }
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(f"{self.public_api_url}/regulations", json=body, headers=headers)
        except httpx.HTTPError as exc:
            return ErasureOutcome(supported=True, done=False, detail=f"Segment did not answer: {type(exc).__name__}")
        if response.is_success:
            regulate_id = _regulate_id(response)
            return ErasureOutcome(supported=True, done=True, detail=f"Segment regulation {regulate_id}")
        return ErasureOutcome(
            supported=True, done=False, detail=f"Segment answered HTTP {response.status_code}: {response.text[:300]}"
        )

    async def close(self) -> None:
        return None


def _regulate_id(response: httpx.Response) -> str:
    try:
        data = response.json()
        return str(data["data"]["regulateId"])
    except (ValueError, KeyError, TypeError):
        return "(no regulateId in the answer)"


def _refusal(exc: BaseException) -> str:
    """Why the library refused to build a message (its size check puts the whole message in the error)."""
    if isinstance(exc, RuntimeError) and exc.args and str(exc.args[0]).startswith("Message exceeds"):
        return f"the message exceeds Segment's {MAX_MSG_SIZE // 1024} KB limit per message"
    return f"Segment's library refused the message: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


__all__ = ["MAX_MSG_SIZE", "REGULATION_TYPE", "SEGMENT_CALL_BATCH", "SEGMENT_MAX_BATCH", "SegmentDestination"]
