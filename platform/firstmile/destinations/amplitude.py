"""Amplitude, through Amplitude's official Python SDK (``amplitude-analytics``, module ``amplitude``).

Events go through the SDK's ``Amplitude`` client: ``track(BaseEvent(...))`` for lifecycle events and
``identify(Identify().set(...), EventOptions(...))`` for the user's onboarding fields and allowed traits.
The SDK batches them in its worker threads and posts ``{"api_key", "events", "options"}`` to its
``server_url`` (Amplitude's HTTP V2 API, ``POST /2/httpapi``); it reports each event's result through
``Config.callback(event, code, message)``, which :meth:`AmplitudeDestination.deliver` awaits for every
event of its batch (the SDK's flush is started while the batch is still held, so one batch is one flush).

* ``insert_id`` is the event's idempotency key: Amplitude ignores an event that repeats an ``insert_id``
  of the last 7 days ("HTTP V2 API", event deduplication); ``time`` is when it happened, in milliseconds;
* ``options.min_id_length`` is 1, so that short user ids (Amplitude's default minimum is 5) are taken;
* an ``identify`` with nothing to set is delivered without a request (the SDK sends no empty identify).

The SDK's own retries are off (``flush_max_retries=1``: a failed event is reported at once); the delivery
worker owns retries. Results ("Batch and retry HTTP V2 API requests"):

* ``200``: delivered;
* ``400`` naming some events (``events_with_invalid_fields``, ``events_with_missing_fields``,
  ``events_with_invalid_id_lengths``, ``silenced_events``): those events are :class:`~.port.Rejected`; the
  SDK reports the others as not retried, and they are sent once more in the same call ("remove those events
  and resend the rest");
* ``429``: :class:`~.port.Retry` after 30 s, the pause Amplitude asks of a throttled user or device
  (the SDK does not expose the answer's headers);
* ``413`` of a single event: rejected (the SDK halves its batches for the rest, sent once more);
* timeouts, ``5xx``, refused connections, no result within ``timeout_s``: :class:`~.port.Retry`.

The SDK's request timeout is fixed (``amplitude.constants.CONNECTION_TIMEOUT``, 10 s); ``timeout_s`` bounds
how long :meth:`~AmplitudeDestination.deliver` waits for the results.

Erasure is Amplitude's User Privacy API (``POST https://amplitude.com/api/2/deletions/users``, HTTP basic
auth with the API key and the secret key, ``{"user_ids": [user], "requester", "ignore_invalid_id"}``) when
``secret_key`` is set. The SDK has no deletion call, so it is one ``httpx`` request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any

import httpx
from amplitude import Amplitude, BaseEvent, Config, EventOptions, Identify, IdentifyEvent
from amplitude.constants import EventLogLevel
from amplitude.event import is_validate_properties
from amplitude.storage import InMemoryStorage, StorageProvider

from firstmile.destinations.port import Delivered, ErasureOutcome, OutboundEvent, Outcome, Rejected, Retry
from firstmile.destinations.vendor import epoch_ms, profile_of, properties_of, scalar_text

AMPLITUDE_MAX_BATCH = 500
"""Events per request, the SDK's ``flush_queue_size`` (its default is 200; Amplitude takes up to 2,000 events and
1 MB per request: 500 of the lifecycle events, a few hundred bytes each, stay well within; a ``413`` makes the SDK
halve its requests)."""
AMPLITUDE_CALL_BATCH = 500
"""Events one :meth:`deliver` takes (the worker's batch), one request of ``AMPLITUDE_MAX_BATCH``: one flush, sent
while the delivery worker records the previous batch and claims the next (``worker.py``)."""
THROTTLE_PAUSE_S = 30.0
"""How long Amplitude asks a throttled user or device to wait after a ``429``."""
REQUESTER = "firstmile"
"""The ``requester`` of deletion jobs (Amplitude e-mails it to the organisation's admins)."""
_NOT_RETRIED = "Event reached max retry times"


@dataclass(frozen=True, slots=True)
class _Result:
    code: int
    message: str


class _Round:
    """The results one flush waits for, by ``insert_id``: recorded by the SDK's threads (its callback), awaited by
    the event loop, which is woken once when the last one is in or the SDK's requests ended (not once per event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keys: Iterable[str] = ()) -> None:
        self.loop = loop
        self.missing = set(keys)
        self.results: dict[str, _Result] = {}
        self.done = asyncio.Event()
        self._lock = threading.Lock()
        self._requests = 0

    def expect(self, keys: Iterable[str]) -> None:
        """Wait for these keys too (before their events are pushed)."""
        with self._lock:
            self.missing.update(keys)

    def record(self, key: str, result: _Result) -> None:
        """A result from the SDK (in its thread): the first one per key counts."""
        with self._lock:
            if key not in self.missing:
                return
            self.missing.discard(key)
            self.results[key] = result
            last = not self.missing
        if last:
            _call_soon(self.loop, self.done.set)

    def watch(self, flushed: list[ThreadFuture[Any]]) -> None:
        """End the round when the SDK's requests of this flush have ended (at once when it sent none)."""
        if not flushed:
            self.end("the SDK sent nothing")
            return
        self._requests = len(flushed)
        for sent in flushed:
            sent.add_done_callback(self._ended)

    def _ended(self, sent: ThreadFuture[Any]) -> None:
        """A request's future is done (in the SDK's thread): every result of it was recorded before."""
        error = None if sent.cancelled() else sent.exception()  # cancelled: the adapter closed
        with self._lock:
            self._requests -= 1
            last = self._requests <= 0
        if error is not None:
            self.end(f"{type(error).__name__}: {error}")
        elif last:
            self.end("no result (an invalid API key?)")

    def end(self, reason: str) -> None:
        """The SDK's requests ended: what has no result by now gets none (a dropped connection, an invalid key)."""
        with self._lock:
            for key in self.missing:
                self.results[key] = _Result(0, f"Amplitude's SDK ended the request without a result: {reason}")
            self.missing.clear()
        _call_soon(self.loop, self.done.set)


class _Provider(StorageProvider):  # type: ignore[misc]  # the SDK is untyped
    """The SDK's in-memory buffer, kept at hand: a batch is pushed and flushed under its lock."""

    def __init__(self) -> None:
        self.storage = InMemoryStorage()

    def get_storage(self) -> Any:
        return self.storage


class AmplitudeDestination:
    """One Amplitude project (its API key, and its secret key for deletions) as a destination."""

    def __init__(
        self,
        api_key: str,
        *,
        secret_key: str | None = None,
        server_url: str = "https://api2.amplitude.com/2/httpapi",
        timeout_s: float = 10.0,
        deletion_url: str = "https://amplitude.com/api/2/deletions/users",
    ) -> None:
        if not api_key:
            raise ValueError("an Amplitude API key is required")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.api_key = api_key
        self.secret_key = secret_key or None
        self.server_url = server_url
        self.deletion_url = deletion_url
        self.timeout_s = timeout_s
        self._provider = _Provider()
        self._waiting: dict[str, list[_Round]] = {}
        self._waiting_lock = threading.Lock()
        self._serial = asyncio.Lock()
        config = Config(
            api_key=api_key,
            server_url=server_url,
            flush_queue_size=AMPLITUDE_MAX_BATCH,
            flush_interval_millis=1000,
            flush_max_retries=1,
            min_id_length=1,
            callback=self._on_result,
            storage_provider=self._provider,
            event_log_level=EventLogLevel.NONE,
        )
        self._client = Amplitude(api_key, config)

    @property
    def kind(self) -> str:
        return "amplitude"

    @property
    def max_batch(self) -> int:
        return AMPLITUDE_CALL_BATCH

    def event(self, event: OutboundEvent) -> BaseEvent | None:
        """The SDK event of ``event`` (``None`` for an identify with nothing to set)."""
        options: dict[str, Any] = {
            "user_id": event.user_id,
            "time": epoch_ms(event.occurred_at),
            "insert_id": event.idempotency_key,
        }
        if event.kind == "identify":
            identify = Identify()
            for key, value in _acceptable(profile_of(event)).items():
                if value is not None:
                    identify.set(key, value)
            if not identify.is_valid():
                return None
            built: BaseEvent = IdentifyEvent(user_properties=identify.user_properties)
            built.load_event_options(EventOptions(**options))
            return built
        return BaseEvent(event_type=event.name, event_properties=_acceptable(properties_of(event)), **options)

    async def deliver(self, events: Sequence[OutboundEvent]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        async with self._serial:
            built, results = await self._round(events, None, outcomes)
            # the valid events of a partly refused request: sent once more, as Amplitude asks
            again = {i: built[i] for i, r in results.items() if r is not None and _not_retried(r)}
            if again:
                results |= (await self._round(events, again, outcomes))[1]  # the SDK sent copies: these are fresh
        for i, result in results.items():
            outcomes[i] = _outcome(result, self.timeout_s)
        return [o if o is not None else Retry("no result from Amplitude's SDK") for o in outcomes]

    def _build(self, events: Sequence[OutboundEvent], outcomes: list[Outcome | None]) -> dict[int, BaseEvent]:
        """The SDK event of each event to send, by index; ``outcomes`` gets those of the others."""
        built: dict[int, BaseEvent] = {}
        for i, event in enumerate(events):
            if not event.user_id or not event.name:
                outcomes[i] = Rejected("Amplitude needs a user id and an event name")
                continue
            sdk_event = self.event(event)
            if sdk_event is None:
                outcomes[i] = Delivered()  # an identify with nothing to set: nothing to send
            else:
                built[i] = sdk_event
        return built

    async def _round(
        self, events: Sequence[OutboundEvent], built: dict[int, BaseEvent] | None, outcomes: list[Outcome | None]
    ) -> tuple[dict[int, BaseEvent], dict[int, _Result | None]]:
        """Push the SDK events (``built``, or built here from ``events``) as one flush and wait for each one's
        result (``None``: none within ``timeout_s``); the SDK events pushed, and their results."""
        waiting = _Round(asyncio.get_running_loop(), set())
        keys: dict[int, str] = {}

        def push() -> tuple[dict[int, BaseEvent], list[ThreadFuture[Any]]]:
            # in a thread, as the SDK's own work: building the SDK's events, then tracking them, costs CPU that
            # would otherwise hold the event loop (one thread hop for both)
            pushed = built if built is not None else self._build(events, outcomes)
            keys.update((i, events[i].idempotency_key) for i in pushed)
            waiting.expect(keys.values())
            with self._waiting_lock:
                for key in set(keys.values()):
                    self._waiting.setdefault(key, []).append(waiting)
            return pushed, self._push(list(pushed.values())) if pushed else []

        try:
            pushed, flushed = await asyncio.to_thread(push)
            if not pushed:
                return pushed, {}
            waiting.watch(flushed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiting.done.wait(), self.timeout_s)
        finally:
            with self._waiting_lock:
                for key in set(keys.values()):
                    rounds = self._waiting.get(key, [])
                    rounds[:] = [r for r in rounds if r is not waiting]
                    if not rounds:
                        self._waiting.pop(key, None)
        found = dict(waiting.results)
        return pushed, {i: found.get(key) for i, key in keys.items()}

    def _push(self, batch: list[BaseEvent]) -> list[ThreadFuture[Any]]:
        """Track ``batch`` and start the SDK's flush, holding its buffer so that its own timer takes none of it."""
        with self._provider.storage.lock:
            for sdk_event in batch:
                self._client.track(sdk_event)
            flushed = self._client.flush()
        return [f for f in flushed if isinstance(f, ThreadFuture)]

    def _on_result(self, event: BaseEvent, code: int, message: str | None) -> None:
        """The SDK's callback (in its worker thread): record the result for whoever waits for this ``insert_id``."""
        key = event.insert_id or ""
        with self._waiting_lock:
            rounds = list(self._waiting.get(key, ()))
        for waiting in rounds:
            waiting.record(key, _Result(int(code), message or ""))

    async def erase(self, user_id: str) -> ErasureOutcome:
        if self.secret_key is None:
            return ErasureOutcome(
                supported=False,
                done=False,
                detail="Amplitude deletes through its User Privacy API: set secret_key to forward erasures",
            )
        body = {"user_ids": [user_id], "requester": REQUESTER, "ignore_invalid_id": "True"}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(self.deletion_url, json=body, auth=(self.api_key, self.secret_key))
        except httpx.HTTPError as exc:
            return ErasureOutcome(supported=True, done=False, detail=f"Amplitude did not answer: {type(exc).__name__}")
        if response.is_success:
            return ErasureOutcome(supported=True, done=True, detail=f"Amplitude deletion job: {response.text[:300]}")
        return ErasureOutcome(
            supported=True, done=False, detail=f"Amplitude answered HTTP {response.status_code}: {response.text[:300]}"
        )

    async def close(self) -> None:
        """Stop the SDK now, without a last flush: every batch was awaited or timed out, and what the SDK
        still holds (an event it re-queued after a ``429`` or a split ``413``) is in the delivery queue, which
        sends it again. The SDK's consumer thread is not a daemon: left with events to wait for, it would keep
        the process from exiting; emptied and woken, it ends at once."""
        self._client.configuration.opt_out = True
        storage = self._provider.storage
        workers = storage.workers  # set when the client was built
        if workers is not None:
            workers.is_active = False
        storage.pull_all()
        with storage.lock:  # wake the SDK's consumer thread, so that it sees the empty buffer and ends
            storage.lock.notify_all()
        if workers is not None:
            workers.threads_pool.shutdown(wait=False, cancel_futures=True)


def _acceptable(properties: dict[str, Any]) -> dict[str, Any]:
    """Properties the SDK takes: a value it would refuse (a list of lists, a ``None`` in a list) as its JSON
    text, since the SDK drops a whole property map over one such value. (A scalar, as lifecycle properties
    are, is always taken: only nested values need the SDK's check.)"""
    return {
        k: v if type(v) in _SCALARS or is_validate_properties(k, v) else scalar_text(v) for k, v in properties.items()
    }


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Run ``callback`` in ``loop`` (from the SDK's threads); a loop that is gone has no one waiting."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed: the call that waited ended long ago
        return


def _not_retried(result: _Result) -> bool:
    """A valid event of a partly refused request (or of one too large), which the SDK did not resend."""
    return result.code in (400, 413) and result.message.startswith(_NOT_RETRIED)


def _outcome(result: _Result | None, timeout_s: float) -> Outcome:
    if result is None:
        return Retry(f"no result from Amplitude within {timeout_s} s")
    code, message = result.code, result.message
    if 200 <= code < 300:
        return Delivered()
    if code == 429:
        if "daily quota" in message.lower():
            return Retry(f"Amplitude 429: {message}")
        return Retry(f"Amplitude 429: {message}", THROTTLE_PAUSE_S)
    if _not_retried(result):  # twice in a request refused for other events: let the worker try again
        return Retry(f"Amplitude {code}: refused a request this event was in, twice")
    if code in (400, 413):
        return Rejected(f"Amplitude {code}: {message}")
    if code == 0:
        return Retry(message)
    return Retry(f"Amplitude {code}: {message}")


__all__ = ["AMPLITUDE_CALL_BATCH", "AMPLITUDE_MAX_BATCH", "REQUESTER", "THROTTLE_PAUSE_S", "AmplitudeDestination"]
