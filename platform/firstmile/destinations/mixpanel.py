"""Mixpanel, through Mixpanel's official Python library (``mixpanel``: ``Mixpanel`` and its ``Consumer``).

The library's ``Mixpanel`` builds each message (``track``, ``people_set``, ``import_data``,
``people_delete``), and its ``Consumer`` sends them, a batch being a JSON array of messages as the library's
``BufferedConsumer`` sends it: ``POST https://{api_host}/track`` (or ``/engage``, ``/import``) with a form
body ``data=<json>&verbose=1&ip=0`` (Mixpanel's Ingestion API: "Track Events", "Profile Set", "Import
Events", "Delete Profile").

* ``track``: ``{"event": name, "properties": {"token", "distinct_id": user, "time": <ms>, "$insert_id":
  <idempotency key>, "mp_lib", "$lib_version", …the event's properties}}``. Mixpanel deduplicates on
  ``$insert_id`` (with the event's name, ``distinct_id`` and ``time``), so a redelivery is not counted twice.
* ``identify``: a profile update ``{"$token", "$distinct_id": user, "$time": <seconds>, "$set": {…}}`` of
  the event's onboarding fields and allowed traits (``email``, ``name``, ``phone``, ``first_name`` and
  ``last_name`` as Mixpanel's reserved ``$email`` … ``$last_name``); updates apply in ``$time`` order.
* ``/track`` keeps only events of the last 5 days and drops older ones silently ("Track Events": ingesting
  historical events, last 5 days only). An older event goes to ``/import`` with the project's API secret
  (HTTP basic auth) when ``api_secret`` is set, and is :class:`~.port.Rejected` otherwise (so it waits in
  the dead letters for a replay once the secret is set, instead of being lost as "delivered").

The consumer is the library's, with its transport changed in two ways (as the SMS adapters do): no urllib3
retries (the delivery worker owns retries; the library retries 5xx four times by default) and the last
answer kept, since the library reports a failure as a ``MixpanelException`` without its status:
``2xx`` with ``"status": 1`` delivered; ``429``, ``5xx``, ``401``/``403``, a timeout or a refused
connection are :class:`~.port.Retry` (after ``Retry-After`` when the answer has one: Mixpanel documents
none and asks for exponential backoff, which the worker does); any other ``4xx`` (or ``"status": 0``) refuses
the request, which is then re-sent one message per request to find the bad ones.

``api_host`` is a host name (``api.mixpanel.com``, ``api-eu.mixpanel.com``), or a base URL with its scheme
(a proxy, a stand-in); ``ca_bundle`` is a CA file to trust instead of the system's (a TLS-inspecting proxy).

Erasure is the library's ``people_delete`` (``$delete`` on ``/engage``): it deletes the user's profile.
Mixpanel keeps the user's events until a GDPR deletion request is filed in Mixpanel (its "GDPR API" takes
an OAuth token we are not given), and the outcome's detail says so.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from mixpanel import Consumer, Mixpanel, MixpanelException
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from firstmile.destinations.port import ErasureOutcome, OutboundEvent, Outcome, Rejected
from firstmile.destinations.vendor import (
    Answer,
    Refused,
    Sent,
    Transient,
    as_utc,
    classify_status,
    deliver_groups,
    epoch_ms,
    groups_by,
    profile_of,
    properties_of,
    retry_after_seconds,
)

MIXPANEL_MAX_BATCH = 2000
"""Messages per request: Mixpanel's documented limit for ``/track``, ``/import`` and ``/engage`` ("Track Events",
"Import Events": 2,000 events per request; "User Profile Limits": 2,000 updates). The library's
``BufferedConsumer`` sends 50 (its ``max_size`` stops at 50): a round trip for every 50 events."""
MIXPANEL_MAX_BYTES = 2_000_000
"""JSON bytes per request at most: Mixpanel's documented 2 MB of uncompressed JSON per request."""
MIXPANEL_CALL_BATCH = 500
"""Events one :meth:`deliver` takes (the worker's batch): one request of small events, sent while the delivery
worker records the previous batch and claims the next (``worker.py``). In ``make bench-destinations`` 500 did at
least as well as 1,000 or 2,000: PostgreSQL's work per batch then overlaps a shorter send."""
TRACK_WINDOW = timedelta(days=5)
"""How old an event ``/track`` still keeps."""
TRACK_MARGIN = timedelta(hours=1)
"""Events this close to the window's edge go to ``/import`` already (they may cross it in flight)."""
RESERVED_PROFILE = {
    "email": "$email",
    "name": "$name",
    "phone": "$phone",
    "first_name": "$first_name",
    "last_name": "$last_name",
}
"""Traits that are Mixpanel's reserved profile properties ("User Profiles": reserved profile properties)."""
_OWN_KEYS = frozenset({"token", "distinct_id", "time", "$insert_id"})


class _Capture:
    """A consumer that keeps what the library would send (the library's documented consumer interface)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def send(self, endpoint: str, json_message: str, api_key: Any = None, api_secret: Any = None) -> None:
        self.messages.append((endpoint, json_message))

    def take(self) -> tuple[str, str]:
        endpoint, message = self.messages.pop()
        self.messages.clear()
        return endpoint, message


class _Transport(HTTPAdapter):
    """The consumer's transport: no retries, ``ca_bundle`` trusted when given, the last answer kept per thread."""

    def __init__(self, ca_bundle: str | None) -> None:
        super().__init__(max_retries=0)
        self.ca_bundle = ca_bundle
        self.last = threading.local()

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        if self.ca_bundle is not None:
            kwargs["verify"] = self.ca_bundle
        response = super().send(request, *args, **kwargs)
        self.last.response = response
        return response

    def take(self) -> Response | None:
        response: Response | None = getattr(self.last, "response", None)
        self.last.response = None
        return response


class MixpanelDestination:
    """One Mixpanel project (its token, and its API secret for ``/import``) as a destination."""

    def __init__(
        self,
        project_token: str,
        *,
        api_host: str = "api.mixpanel.com",
        api_secret: str | None = None,
        timeout_s: float = 10.0,
        ca_bundle: str | None = None,
    ) -> None:
        if not project_token:
            raise ValueError("a Mixpanel project token is required")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.project_token = project_token
        self.api_secret = api_secret or None
        self.timeout_s = timeout_s
        base = api_host.rstrip("/") if "://" in api_host else f"https://{api_host.strip('/')}"
        self._consumer = Consumer(
            events_url=f"{base}/track",
            people_url=f"{base}/engage",
            import_url=f"{base}/import",
            request_timeout=timeout_s,
            retry_limit=0,
        )
        self._transport = _Transport(ca_bundle)
        session: requests.Session = self._consumer._session  # the library keeps its session private
        session.mount("https://", self._transport)
        session.mount("http://", self._transport)
        self._capture = _Capture()
        self._builder = Mixpanel(project_token, consumer=self._capture)
        self._building = threading.Lock()

    @property
    def kind(self) -> str:
        return "mixpanel"

    @property
    def max_batch(self) -> int:
        return MIXPANEL_CALL_BATCH

    def message(self, event: OutboundEvent, now: datetime | None = None) -> tuple[str, str] | None:
        """``(endpoint, JSON message)`` of ``event`` as the library builds it; ``None`` for an event ``/track``
        would drop and no API secret to ``/import`` it."""
        with self._building:  # one message at a time through the library's builder and its capture
            return self._message(event, now)

    def _message(self, event: OutboundEvent, now: datetime | None) -> tuple[str, str] | None:
        if event.kind == "identify":
            profile = {RESERVED_PROFILE.get(k, k): v for k, v in profile_of(event).items()}
            moment = round(as_utc(event.occurred_at).timestamp(), 3)
            self._builder.people_set(event.user_id, profile, meta={"$time": moment})
            return self._capture.take()
        properties = {k: v for k, v in properties_of(event).items() if k not in _OWN_KEYS}
        properties |= {"time": epoch_ms(event.occurred_at), "$insert_id": event.idempotency_key}
        old = as_utc(event.occurred_at) < (now or datetime.now(UTC)) - TRACK_WINDOW + TRACK_MARGIN
        if not old:
            self._builder.track(event.user_id, event.name, properties)
        elif self.api_secret is not None:
            self._builder.import_data(None, event.user_id, event.name, properties["time"], properties)
        else:
            return None
        return self._capture.take()

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        # the messages are built in a thread, as they are sent: the event loop stays free meanwhile
        built, decided = await asyncio.to_thread(self._messages, events, datetime.now(UTC))
        keys = [m[0] if m is not None else None for m in built]
        sizes = [len(m[1]) + 1 if m is not None else 0 for m in built]  # ASCII JSON (the library's), and a comma
        groups = groups_by(keys, MIXPANEL_MAX_BATCH, sizes, MIXPANEL_MAX_BYTES)

        async def send(indices: Sequence[int]) -> Answer:
            endpoint = keys[indices[0]]
            assert endpoint is not None
            payload = "[" + ",".join(built[i][1] for i in indices if built[i] is not None) + "]"  # type: ignore[index]
            return await self._send(endpoint, payload)

        return await deliver_groups(len(events), groups, send, outcomes=decided)

    def _messages(
        self, events: Sequence[OutboundEvent], now: datetime
    ) -> tuple[list[tuple[str, str] | None], list[Outcome | None]]:
        """Each event's message (``None``: not sent) and the outcomes decided already (those not sent)."""
        built: list[tuple[str, str] | None] = []
        decided: list[Outcome | None] = []
        for event in events:
            message = self.message(event, now)
            built.append(message)
            decided.append(
                None
                if message is not None
                else Rejected(
                    "Mixpanel's /track drops events older than 5 days: set the destination's api_secret"
                    " so they go to /import, then replay the dead letters"
                )
            )
        return built, decided

    async def _send(self, endpoint: str, payload: str) -> Answer:
        try:
            async with asyncio.timeout(self.timeout_s * 2 + 1):  # the library's own timeout is timeout_s
                return await asyncio.to_thread(self._send_blocking, endpoint, payload)
        except TimeoutError:
            return Transient(f"Mixpanel did not answer within {self.timeout_s} s")

    def _send_blocking(self, endpoint: str, payload: str) -> Answer:
        self._transport.take()
        try:
            if endpoint == "imports":
                self._consumer.send(endpoint, payload, api_secret=self.api_secret)
            else:
                self._consumer.send(endpoint, payload)
        except (MixpanelException, TypeError, KeyError) as exc:
            response = self._transport.take()
            if response is None:
                return Transient(f"Mixpanel did not answer: {_first_line(exc)}")
            detail = _error_of(response)
            if 200 <= response.status_code < 300:  # verbose "status": 0 with a 200
                return Refused(f"Mixpanel refused the request: {detail}")
            after = retry_after_seconds(response.headers.get("Retry-After"))
            return classify_status(response.status_code, detail, after)
        return Sent()

    async def erase(self, user_id: str) -> ErasureOutcome:
        with self._building:
            self._builder.people_delete(user_id)
            endpoint, message = self._capture.take()
        answer = await self._send(endpoint, "[" + message + "]")
        if isinstance(answer, Sent):
            return ErasureOutcome(
                supported=True,
                done=True,
                detail="Mixpanel deleted the profile ($delete); its events stay until a GDPR deletion request"
                " is filed in Mixpanel",
            )
        return ErasureOutcome(supported=True, done=False, detail=answer.reason)

    async def close(self) -> None:
        session: requests.Session = self._consumer._session
        session.close()


def _error_of(response: Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason or ""
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])[:300]
    return str(body)[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


__all__ = [
    "MIXPANEL_CALL_BATCH",
    "MIXPANEL_MAX_BATCH",
    "MIXPANEL_MAX_BYTES",
    "RESERVED_PROFILE",
    "TRACK_WINDOW",
    "MixpanelDestination",
]
