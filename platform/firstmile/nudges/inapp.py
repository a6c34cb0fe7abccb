"""The in-app channel: nudges stored per user, delivered live over Server-Sent Events and by a pull endpoint.

**Sending** an in-app nudge means making it available: :class:`InAppChannel` accepts the message
(``Receipt("in_app", None)``) and the delivery worker records the send ``sent``; that row of
``nudge_sends`` *is* the stored message. In the same transaction the worker calls
``pg_notify('firstmile_inapp', {"tenant", "user", "send"})`` (ids only, no personal data), which
PostgreSQL delivers to the listeners when the transaction commits, and never if it rolls back.
An in-app nudge is decided like any other (policy, bandit), so it counts against the same daily
budget.

**Live delivery.** :class:`InAppHub` is one ``LISTEN`` connection per process (opened when the
first stream subscribes), fanning each notification out to the process's subscriptions of that
tenant and user. When the connection drops it reconnects with backoff, and on every (re)connect
it tells every subscription to *resync*: notifications sent while nobody listened are lost, so
the stream reads from the database what it has not sent yet.

**A stream** (:meth:`InAppInbox.stream`) subscribes first, then sends the user's pending messages
(delivered, neither seen nor dismissed, oldest first), then what the hub announces; a message
committed while the stream connected is in the database read, the notification, or both, and is
sent once (the stream remembers the ids it sent). Between messages it sends a heartbeat; it ends
after ``stream_s`` (an ``EventSource`` reconnects by itself, after the ``retry`` it was given),
when the process stops, or when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import asyncpg

from firstmile.kit import telemetry
from firstmile.kit.db import DatabaseUnavailableError, TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.outbox import PROGRESS_NOTIFY_CHANNEL, OutboxEvent, enqueue
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges import repository as repo
from firstmile.nudges.channels import ChannelRejectedError, OutboundMessage, Receipt
from firstmile.nudges.schemas import InAppMessage, InAppMessageList
from firstmile.onboarding import service as onboarding

log = logging.getLogger("firstmile.nudges.inapp")

CHANNEL = "in_app"


class InAppChannel:
    """The in-app channel's adapter: nothing leaves Firstmile, the message is stored (see the module docstring)."""

    channel = CHANNEL
    provider = CHANNEL

    async def send(self, message: OutboundMessage) -> Receipt:
        if message.channel != CHANNEL or not message.to:
            raise ChannelRejectedError(self.provider, f"not an in-app message for a user ({message.channel!r})")
        return Receipt(self.provider, None)


# ---- the hub: one LISTEN connection per process ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: the tenant, the user, the delivered send."""

    tenant: uuid.UUID
    user_id: str
    send_id: uuid.UUID


def parse_notice(payload: str) -> Notice | None:
    """The notification ``payload`` of :func:`~firstmile.nudges.repository.notify_in_app`, or None if malformed."""
    try:
        data = json.loads(payload)
        user = data["user"]
        if not isinstance(user, str) or not user:
            return None
        return Notice(uuid.UUID(str(data["tenant"])), user, uuid.UUID(str(data["send"])))
    except (ValueError, TypeError, KeyError):
        return None


@dataclass(frozen=True, slots=True)
class Wake:
    """What woke a subscription: the sends announced since, or a resync (the ids are unknown), or the end;
    ``progress``: the relay announced new onboarding events of the user (``kit.outbox.PROGRESS_NOTIFY_CHANNEL``)."""

    send_ids: tuple[uuid.UUID, ...] = ()
    resync: bool = False
    closed: bool = False
    progress: bool = False


class Subscription:
    """One stream's interest in one user's messages; a context manager that unsubscribes on exit."""

    __slots__ = ("_closed", "_hub", "_ids", "_limit", "_progress", "_resync", "_wake", "key")

    def __init__(self, hub: InAppHub, key: tuple[uuid.UUID, str], limit: int) -> None:
        self._hub = hub
        self.key = key
        self._limit = limit
        self._ids: list[uuid.UUID] = []
        self._resync = False
        self._closed = False
        self._progress = False
        self._wake = asyncio.Event()

    def push(self, send_id: uuid.UUID) -> None:
        if len(self._ids) >= self._limit:  # a stream that does not keep up reads the database instead
            self.resync()
            return
        self._ids.append(send_id)
        self._wake.set()

    def progressed(self) -> None:
        self._progress = True
        self._wake.set()

    def resync(self) -> None:
        self._ids.clear()
        self._resync = True
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def next(self, timeout_s: float) -> Wake | None:
        """What happened since the last call; None when nothing did within ``timeout_s``."""
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout_s)
            if not self._wake.is_set():
                return None
        self._wake.clear()
        wake = Wake(tuple(self._ids), self._resync, self._closed, self._progress)
        self._ids = []
        self._resync = False
        self._progress = False
        return wake

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._hub.unsubscribe(self)


class InAppHub:
    """The process's ``LISTEN firstmile_inapp`` connection and its subscriptions (see the module docstring).

    :meth:`run` is a supervised loop (``Supervisor.forever``): it connects when the first subscription
    is made, keeps the connection (a ``SELECT 1`` every ``ping_s`` finds a dead one), reconnects with
    backoff (``0.1 s`` doubling to ``max_backoff_s``) and resyncs every subscription after each
    connect; when the process stops it closes every subscription, so the streams end.
    """

    def __init__(
        self,
        dsn: str,
        *,
        ping_s: float = 30.0,
        max_backoff_s: float = 30.0,
        pending_limit: int = 100,
        application_name: str = "firstmile-inapp",
    ) -> None:
        self.dsn = dsn
        self.ping_s = ping_s
        self.max_backoff_s = max_backoff_s
        self.pending_limit = pending_limit
        self.application_name = application_name
        self._subscriptions: dict[tuple[uuid.UUID, str], set[Subscription]] = {}
        self._wanted = asyncio.Event()
        self.listening = False
        """Whether the ``LISTEN`` is in place now (notifications committed from now on arrive)."""
        self.connects = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None

    # -- subscriptions (on the serving loop) --

    def subscribe(self, tenant: uuid.UUID, user_id: str) -> Subscription:
        subscription = Subscription(self, (tenant, user_id), self.pending_limit)
        self._subscriptions.setdefault(subscription.key, set()).add(subscription)
        self._wanted.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        found = self._subscriptions.get(subscription.key)
        if found is not None:
            found.discard(subscription)
            if not found:
                del self._subscriptions[subscription.key]

    @property
    def subscriptions(self) -> int:
        return sum(len(s) for s in self._subscriptions.values())

    def deliver(self, payload: str) -> int:
        """Fan one notification out; how many subscriptions it reached."""
        notice = parse_notice(payload)
        if notice is None:
            log.warning("malformed in-app notification ignored", extra={"fields": {"payload": payload[:200]}})
            return 0
        found = self._subscriptions.get((notice.tenant, notice.user_id), set())
        for subscription in found:
            subscription.push(notice.send_id)
        return len(found)

    def deliver_progress(self, payload: str) -> int:
        """Fan the relay's announcement (a JSON list of ``tenant:user`` keys) out; how many subscriptions it reached."""
        try:
            keys = json.loads(payload)
            if not isinstance(keys, list):
                raise TypeError("not a list")
        except (ValueError, TypeError):
            log.warning("malformed progress notification ignored", extra={"fields": {"payload": payload[:200]}})
            return 0
        reached = 0
        for key in keys:
            tenant, _, user = str(key).partition(":")
            try:
                found = self._subscriptions.get((uuid.UUID(tenant), user), set())
            except ValueError:
                continue
            for subscription in found:
                subscription.progressed()
                reached += 1
        return reached

    def resync_all(self) -> None:
        """Every subscription reads the database again (after a reconnect: what was sent meanwhile)."""
        for found in self._subscriptions.values():
            for subscription in found:
                subscription.resync()

    def _close_all(self) -> None:
        for found in list(self._subscriptions.values()):
            for subscription in list(found):
                subscription.close()

    # -- the connection --

    def health(self) -> tuple[int, str | None]:
        """Failures in a row to connect or keep the connection, and the last error (the supervisor's probe)."""
        return self.consecutive_failures, self.last_error

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self.deliver(str(payload))

    def _on_progress(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self.deliver_progress(str(payload))

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set (see the class docstring)."""
        backoff = 0.1
        try:
            while not stop.is_set():
                if not await _first(stop, self._wanted, None):
                    break  # stopped before anyone subscribed
                try:
                    await self._listen(stop)
                    backoff = 0.1
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.consecutive_failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning(
                        "in-app listener interrupted, reconnecting",
                        extra={"fields": {"error": repr(exc)[:300], "backoff": backoff}},
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            if stop.is_set():
                self._close_all()

    async def _listen(self, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self.dsn, server_settings={"application_name": self.application_name}
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(repo.IN_APP_NOTIFY_CHANNEL, self._on_notification)
            await conn.add_listener(PROGRESS_NOTIFY_CHANNEL, self._on_progress)
            self.listening = True
            self.connects += 1
            self.consecutive_failures = 0
            self.resync_all()  # what was committed while nobody listened is read from the database
            while not stop.is_set():
                if await _first(stop, lost, self.ping_s):
                    break
                await conn.execute("SELECT 1", timeout=min(10.0, self.ping_s))
            if lost.is_set() and not stop.is_set():
                raise ConnectionResetError("the in-app LISTEN connection was closed")
        finally:
            self.listening = False
            if not conn.is_closed():
                try:
                    await conn.close(timeout=2)
                except Exception:  # closing a broken connection may fail; it is gone either way
                    conn.terminate()


async def _first(stop: asyncio.Event, other: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``stop`` or ``other`` is set (or ``timeout_s`` passes); whether one of them is set."""
    if stop.is_set() or other.is_set():
        return True
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return stop.is_set() or other.is_set()


# ---- the inbox: what the API does ---------------------------------------------------------------------------


def _message(row: repo.InAppRow) -> InAppMessage:
    return InAppMessage(row.send_id, row.subject, row.body, row.sent_at, row.seen_at)


def _no_user(user_id: str) -> ProblemError:
    return ProblemError(404, "user-not-found", f"user {user_id!r} is not known here")


def _no_message(send_id: uuid.UUID) -> ProblemError:
    return ProblemError(404, "message-not-found", f"the user has no in-app message {send_id}")


async def _known(tx: TenantTx, user_id: str) -> bool:
    held = await onboarding.held_user(tx, user_id)
    return held.profile is not None or held.progress is not None


@dataclass(frozen=True, slots=True)
class Watched:
    """A new value of the state a stream watches (see :meth:`InAppInbox.stream`)."""

    value: Any


Watch = Callable[[TenantTx], Awaitable[object]]
"""A read of a user's state in the user's tenant transaction (its value is compared with ``==``)."""

OPEN = "open"
"""The comment a stream starts with (after the pending messages): from here on, it is live."""
HEARTBEAT = "keep-alive"


class InAppInbox:
    """A user's in-app messages, for the tenant API: the list, seen, dismiss and the live stream.

    ``hub`` is None where the in-app channel is off: what is stored is still listed, and a stream
    sends what is pending and ends (nothing new can arrive).
    """

    def __init__(
        self,
        hub: InAppHub | None,
        *,
        heartbeat_s: float = 15.0,
        stream_s: float = 300.0,
        retry_ms: int = 3000,
        backlog: int = 100,
    ) -> None:
        self.hub = hub
        self.heartbeat_s = heartbeat_s
        self.stream_s = stream_s
        self.retry_ms = retry_ms
        self.backlog = backlog

    async def messages(self, tx: TenantTx, user_id: str, limit: int) -> InAppMessageList:
        """The user's delivered messages not dismissed, newest first; 404 ``user-not-found`` for a stranger."""
        rows = await repo.in_app_messages(tx, user_id, limit)
        if not rows and not await _known(tx, user_id):
            raise _no_user(user_id)
        return InAppMessageList(user_id, [_message(r) for r in rows])

    async def check_user(self, tx: TenantTx, user_id: str) -> None:
        """404 ``user-not-found`` unless the tenant holds the user (a stream is refused before it starts)."""
        if not await _known(tx, user_id):
            raise _no_user(user_id)

    async def seen(self, uow: UnitOfWork, user_id: str, send_id: uuid.UUID) -> bool:
        """Record that the app showed the message; True the first time (then a ``nudge.opened`` event)."""

        async def work(tx: TenantTx) -> bool:
            row = await repo.mark_seen(tx, user_id, send_id)
            if row is None:
                if await repo.get_in_app(tx, user_id, send_id) is None:
                    raise _no_message(send_id)
                return False
            payload = {"user_id": user_id, "send_id": str(send_id), "channel": CHANNEL, "arm": row.arm,
                       "trigger": row.trigger_key}  # fmt: skip
            await enqueue(tx, [OutboxEvent.new("nudge.opened", payload)], user_id=user_id, now=datetime.now(UTC))
            return True

        first = await uow.run(work)
        if first:
            telemetry.NUDGE_OUTCOMES.labels("opened").inc()
        return first

    async def dismiss(self, uow: UnitOfWork, user_id: str, send_id: uuid.UUID) -> bool:
        """The user dismissed the message: it leaves the list and the stream; True the first time."""

        async def work(tx: TenantTx) -> bool:
            if await repo.mark_dismissed(tx, user_id, send_id):
                return True
            if await repo.get_in_app(tx, user_id, send_id) is None:
                raise _no_message(send_id)
            return False

        return await uow.run(work)

    async def _announced(self, uow: UnitOfWork, user_id: str, send_ids: list[uuid.UUID]) -> list[repo.InAppRow]:
        if not send_ids:
            return []
        return await uow.run(lambda tx: repo.in_app_by_ids(tx, user_id, send_ids))

    async def stream(
        self, uow: UnitOfWork, user_id: str, watch: Watch | None = None
    ) -> AsyncIterator[InAppMessage | str | Watched]:
        """The live stream: messages, and comments (:data:`OPEN`, then :data:`HEARTBEAT`) between them.

        With ``watch`` (a read of some state of the user, the embed SDK's checklist), the stream also yields
        :class:`Watched` with its value first, and again whenever it changed: read again when the relay
        announces the user's progress, after a resync, and at every heartbeat (so a lost notification
        delays a change by one heartbeat at most).
        """
        subscription = self.hub.subscribe(uow.tenant, user_id) if self.hub is not None else None
        sent: set[uuid.UUID] = set()
        last: list[object] = []

        async def changed() -> Watched | None:
            assert watch is not None
            value = await uow.run(watch)
            if last and last[0] == value:
                return None
            last[:] = [value]
            return Watched(value)

        try:
            if watch is not None:
                first = await changed()
                assert first is not None
                yield first
            pending = await uow.run(lambda tx: repo.in_app_messages(tx, user_id, self.backlog, unseen=True))
            for row in reversed(pending):  # oldest first, as they came
                sent.add(row.send_id)
                yield _message(row)
            yield OPEN
            if subscription is None:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.stream_s
            while (left := deadline - loop.time()) > 0:
                wake = await subscription.next(min(self.heartbeat_s, left))
                if wake is None:
                    if deadline - loop.time() > 0:
                        if watch is not None and (update := await changed()) is not None:
                            yield update
                        yield HEARTBEAT
                    continue
                if wake.closed:
                    return
                if watch is not None and (wake.progress or wake.resync) and (update := await changed()) is not None:
                    yield update
                if wake.resync:
                    rows = list(reversed(await uow.run(
                        lambda tx: repo.in_app_messages(tx, user_id, self.backlog, unseen=True)
                    )))  # fmt: skip
                else:
                    rows = await self._announced(uow, user_id, [i for i in wake.send_ids if i not in sent])
                for row in rows:
                    if row.send_id not in sent:
                        sent.add(row.send_id)
                        yield _message(row)
        except DatabaseUnavailableError as exc:  # the client reconnects after `retry` and reads what it missed
            log.warning("in-app stream ended: the database is unavailable", extra={"fields": {"error": str(exc)}})
        finally:
            if self.hub is not None and subscription is not None:
                self.hub.unsubscribe(subscription)


__all__ = [
    "CHANNEL",
    "HEARTBEAT",
    "OPEN",
    "InAppChannel",
    "InAppHub",
    "InAppInbox",
    "Notice",
    "Subscription",
    "Wake",
    "Watch",
    "Watched",
    "parse_notice",
]
