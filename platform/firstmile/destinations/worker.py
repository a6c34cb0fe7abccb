"""The delivery worker: sends each destination's queued events in batches, in order per user, at least once.

It runs in the scheduler (``firstmile scheduler``, or ``serve`` with in-process schedulers) as one supervised loop.
Every ``FIRSTMILE_DESTINATION_POLL_SECONDS`` it finds the destinations of every tenant with rows due (the SECURITY
DEFINER function ``firstmile_destinations_due``) and starts, for each one not already being delivered, a task of
its own: a slow or failing destination never holds back another, nor the tenant's other destinations. A task:

1. reads the destination's section of the manifest, its state and its credentials (decrypted with the tenant's
   data key, fetched from the key provider before any transaction), and builds its adapter (kept while they stay
   the same);
2. **claims** up to a batch of due rows (the adapter's ``max_batch``, or the manifest's if smaller), oldest first,
   with ``FOR UPDATE SKIP LOCKED`` and a lease (``claimed_until``, ``FIRSTMILE_DESTINATION_LEASE_SECONDS``): a
   worker killed mid-batch leaves rows that come back when the lease ends. A row whose user has an earlier row
   waiting or claimed is not taken, so each user's events arrive in order;
3. sends them (the adapter's ``deliver``; an erasure through ``erase``) **outside any transaction**, then records
   each outcome under the claim (a row another worker claimed since, after the lease ran out, is left to it):
   delivered → ``done``; refused for good (:class:`~firstmile.destinations.port.Rejected`) → ``dead`` with the
   reason, for that event only; a transient failure (:class:`~firstmile.destinations.port.Retry`) → pending
   again after the vendor's ``Retry-After`` or the backoff of :class:`~firstmile.destinations.policy.RetryPolicy`
   (and the user's later rows wait behind it), ``dead`` once its attempts are spent;
4. repeats while rows are due (at most ``max_batches`` batches, then the next poll: at once while rows are still
   due), and stops early when a whole batch failed (the destination is down: its rows wait for their next attempt).
   While a batch is sent, one transaction records the previous batch and claims the next: sending and the
   database's work overlap (:meth:`_batches`, which keeps each user's order with the batch in flight).

Delivered means the vendor acknowledged; a worker killed between the vendor's acknowledgement and the record sends
the batch again after the lease, with the same idempotency keys (the vendor, or the webhook's receiver, counts it
once). When every attempt to a destination has failed for ``FIRSTMILE_DESTINATION_DISABLE_AFTER_HOURS`` it is
disabled (audited, ``firstmile_destination_disabled_total``) until ``firstmile destinations enable``; its events
keep queueing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.destinations import repository as repo
from firstmile.destinations.consumer import ERASE, sealed_context
from firstmile.destinations.mapping import probe_event
from firstmile.destinations.policy import RetryPolicy
from firstmile.destinations.port import (
    Delivered,
    Destination,
    ErasureOutcome,
    OutboundEvent,
    Outcome,
    Rejected,
    Retry,
    check_outcomes,
)
from firstmile.destinations.registry import AdapterFactory, Credentials
from firstmile.destinations.service import AUDIT_KIND, read_credentials, tenant_destinations
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.security.crypto import DecryptionError
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.tenancy.manifest import DestinationSpec

log = logging.getLogger("firstmile.destinations")
DELIVERY = OperatorContext("worker:destinations")
AHEAD_WINDOW = 4
"""A batch claimed while another is sent is taken among the oldest ``AHEAD_WINDOW`` times a batch of due rows only: a
backlog whose users are all held back is not read whole to find nothing."""


@dataclass(frozen=True, slots=True)
class Context:
    """What delivering to one destination needs, read in one transaction."""

    spec: DestinationSpec | None
    state: repo.StateRow
    credentials: Credentials | None


@dataclass(slots=True)
class DestinationPass:
    """What one delivery task of a destination did."""

    tenant: TenantId
    destination: str
    kind: str = "unknown"
    sent: int = 0
    retried: int = 0
    dead: int = 0
    erased: int = 0
    batches: int = 0
    skipped: str | None = None
    """Why nothing was sent (not in the manifest, disabled, no credentials, waiting for a fuller batch)."""
    disabled: bool = False
    """This pass disabled the destination (every attempt failed for too long)."""
    more: bool = False
    """The pass stopped at ``max_batches`` with rows still due: the loop polls again at once."""
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A claimed batch: its rows (and their decrypted personal traits), under one claim id and lease."""

    claim_id: uuid.UUID
    now: datetime
    at: float
    """``time.monotonic()`` of the claim (a batch claimed ahead is sent only while its lease allows)."""
    rows: list[repo.QueuedRow]
    personal: dict[int, dict[str, Any] | str]


@dataclass(frozen=True, slots=True)
class _Want:
    """A claim to make: ``limit`` rows; for the batch claimed ahead, among the oldest ``window`` due rows, while the
    batch ``inflight`` is sent, none of the users ``held`` (:func:`~firstmile.destinations.repository.claim`)."""

    limit: int
    window: int | None = None
    inflight: uuid.UUID | None = None
    held: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Sent:
    """What became of a sent batch, to be recorded under its claim."""

    claim_id: uuid.UUID
    results: dict[int, repo.Result]
    erasures: list[tuple[repo.QueuedRow, ErasureOutcome]]
    succeeded: bool
    failing: bool
    """Every attempt of the batch failed (the destination is down): the pass stops."""
    first_error: str | None
    waiting: frozenset[str] = frozenset()
    """The users with a row of this batch still pending (a retry, or not sent): their later rows wait."""


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """What ``firstmile destinations test`` reports: the outcome of one test event, and the vendor's answer."""

    kind: str
    outcome: str
    detail: str


async def _either(first: asyncio.Event, second: asyncio.Event, seconds: float) -> None:
    """Wait up to ``seconds`` for either event to be set."""
    waiters = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _reason(outcome: Outcome) -> str:
    return outcome.reason if isinstance(outcome, Retry | Rejected) else ""


class DestinationDelivery:
    """The delivery worker (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: DataKeyService,
        factory: AdapterFactory,
        *,
        policy: RetryPolicy | None = None,
        lease: timedelta = timedelta(minutes=5),
        poll_s: float = 2.0,
        disable_after: timedelta = timedelta(hours=24),
        retention: timedelta = timedelta(days=7),
        max_batches: int = 20,
        concurrency: int = 16,
        call_timeout_s: float = 60.0,
        skip_s: float = 10.0,
        purge_every_s: float = 600.0,
        stop_grace_s: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] | None = None,
        worker: OperatorContext | None = None,
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.factory = factory
        self.policy = policy or RetryPolicy()
        self.lease = lease
        self.poll_s = poll_s
        self.disable_after = disable_after
        self.retention = retention
        self.max_batches = max_batches
        self.call_timeout_s = call_timeout_s
        self.skip_s = skip_s
        self.purge_every_s = purge_every_s
        self.stop_grace_s = stop_grace_s
        self.rng = rng or random.SystemRandom()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.worker = worker or DELIVERY
        self._gate = asyncio.Semaphore(concurrency)
        self._adapters: dict[tuple[uuid.UUID, str], tuple[tuple[Any, ...], Destination]] = {}
        self._in_flight: dict[tuple[uuid.UUID, str], asyncio.Task[DestinationPass | None]] = {}
        self._skip_until: dict[tuple[uuid.UUID, str], float] = {}
        self._kinds: dict[tuple[uuid.UUID, str], str] = {}
        self._lag_kinds: set[str] = set()
        self._last_purge = float("-inf")
        self._wake = asyncio.Event()
        self._failures = 0
        self._last_error: str | None = None

    # ------------------------------------------------------------------ the loop

    def health(self) -> tuple[int, str | None]:
        """Polls that failed in a row (the database unreachable), and the last error: the supervisor's probe."""
        return self._failures, self._last_error

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set (the supervised loop); then :meth:`_drain` the deliveries in flight."""
        try:
            while not stop.is_set():
                try:
                    await self._tick(wait=False)
                    self._failures, self._last_error = 0, None
                except Exception as exc:
                    self._failures += 1
                    self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("destination delivery poll failed: %s", self._last_error)
                if await self._pause(stop):
                    break
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """Wait up to ``stop_grace_s`` for the deliveries in flight, cancel the rest, close the adapters.

        A cancelled delivery loses nothing: its rows stay claimed until the lease ends and are delivered
        again (at least once, each with its idempotency key). Cancellation of this wait itself (the
        supervisor's own deadline) still cancels them and closes the adapters.
        """
        pending = [task for task in self._in_flight.values() if not task.done()]
        try:
            if pending:
                await asyncio.wait(pending, timeout=self.stop_grace_s)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.close()

    async def _pause(self, stop: asyncio.Event) -> bool:
        """Wait for the next poll: ``poll_s``, or less when a pass left rows due (a backlog is delivered without
        the pause); True when ``stop`` was set."""
        if not self._wake.is_set():
            await _either(stop, self._wake, self.poll_s)
        self._wake.clear()
        return stop.is_set()

    async def run_once(self) -> list[DestinationPass]:
        """One poll, waiting for every delivery it starts (tests, ``firstmile destinations deliver``)."""
        return await self._tick(wait=True)

    async def _tick(self, *, wait: bool) -> list[DestinationPass]:
        found = await across_tenants(self.engine, repo.due)
        self._record_lag(found)
        started: list[asyncio.Task[DestinationPass | None]] = []
        now = time.monotonic()
        for due in found:
            key = (due.tenant_id, due.destination)
            if due.due == 0 or key in self._in_flight or self._skip_until.get(key, 0.0) > now:
                continue
            task = asyncio.create_task(self._guarded(due), name=f"destination:{due.destination}")
            self._in_flight[key] = task
            task.add_done_callback(partial(self._landed, key))
            started.append(task)
        if time.monotonic() - self._last_purge >= self.purge_every_s:
            self._last_purge = time.monotonic()
            await self.purge()
        if not wait:
            return []
        return [p for p in await asyncio.gather(*started) if p is not None]

    def _landed(self, key: tuple[uuid.UUID, str], task: asyncio.Task[DestinationPass | None]) -> None:
        self._in_flight.pop(key, None)
        if not task.cancelled() and task.exception() is None and (found := task.result()) is not None and found.more:
            self._wake.set()

    async def _guarded(self, due: repo.Due) -> DestinationPass | None:
        async with self._gate:
            tenant = self.worker.tenant(due.tenant_id)
            try:
                return await self.deliver_destination(tenant, due.destination, due)
            except Exception as exc:
                log.exception(
                    "delivery to a destination failed",
                    extra={"fields": {"tenant": str(due.tenant_id), "destination": due.destination}},
                )
                failed = DestinationPass(tenant, due.destination, self._kinds.get((due.tenant_id, due.destination),
                                         "unknown"))  # fmt: skip
                failed.errors.append(f"{type(exc).__name__}: {exc}")
                return failed

    def _record_lag(self, found: Sequence[repo.Due]) -> None:
        """``firstmile_destination_lag_seconds``: per kind, the age of the oldest row waiting at any destination."""
        now = self.clock()
        ages: dict[str, float] = dict.fromkeys(self._lag_kinds, 0.0)
        for due in found:
            kind = self._kinds.get((due.tenant_id, due.destination))
            if kind is not None:
                ages[kind] = max(ages.get(kind, 0.0), (now - due.oldest).total_seconds())
        for kind, age in ages.items():
            telemetry.DESTINATION_LAG.labels(kind).set(max(0.0, age))
            self._lag_kinds.add(kind)

    async def purge(self) -> int:
        """Delete the rows finished longer ago than the retention (every tenant); how many."""
        before = self.clock() - self.retention

        async def tenants(conn: Any) -> list[uuid.UUID]:
            return await repo.finished_tenants(conn, before)

        deleted = 0
        for tenant_id in await across_tenants(self.engine, tenants):
            uow = UnitOfWork(self.engine, self.worker.tenant(tenant_id))
            deleted += await uow.run(lambda tx: repo.purge_finished(tx, before))
        return deleted

    async def close(self) -> None:
        """Close every adapter this worker built."""
        adapters = [adapter for _, adapter in self._adapters.values()]
        self._adapters.clear()
        for adapter in adapters:
            with contextlib.suppress(Exception):
                await adapter.close()

    # ------------------------------------------------------------------ one destination

    async def _context(self, uow: UnitOfWork, name: str) -> tuple[Context, TenantKeys]:
        async def read(tx: TenantTx, keys: TenantKeys) -> tuple[Context, TenantKeys]:
            spec = (await tenant_destinations(tx)).specs.get(name)
            state = (await repo.states(tx)).get(name, repo.StateRow())
            credentials = await read_credentials(tx, keys, name, self.clock()) if spec is not None else None
            return Context(spec, state, credentials), keys

        return await self.keyring.run_with_keys(uow, read)

    async def _adapter(
        self, tenant: uuid.UUID, name: str, spec: DestinationSpec, credentials: Credentials
    ) -> Destination:
        """The destination's adapter, built again when its section or its credentials changed."""
        fingerprint = (spec.model_dump_json(), credentials.version, credentials.previous is not None)
        cached = self._adapters.get((tenant, name))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        adapter = self.factory.build(spec, credentials)
        self._adapters[(tenant, name)] = (fingerprint, adapter)
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached[1].close()
        return adapter

    async def _note(self, uow: UnitOfWork, name: str, state: repo.StateRow, error: str) -> None:
        """Record why a destination cannot be delivered to (once, not at every poll)."""
        if state.last_error == error:
            return
        await uow.run(lambda tx: repo.record_failure(tx, name, error, self.clock(), failing=False))

    async def deliver_destination(self, tenant: TenantId, name: str, due: repo.Due | None = None) -> DestinationPass:
        """Deliver what is due at one destination (see the module docstring)."""
        uow = UnitOfWork(self.engine, tenant)
        context, _ = await self._context(uow, name)
        spec, key = context.spec, (uuid.UUID(str(tenant)), name)
        done = DestinationPass(tenant, name, spec.kind if spec is not None else "unknown")
        if spec is not None:
            self._kinds[key] = spec.kind
        skip = None
        if spec is None:
            skip = "not in the tenant's manifest"
        elif not spec.enabled:
            skip = "disabled in the manifest"
        elif context.state.disabled_at is not None:
            skip = f"disabled: {context.state.disabled_reason}"
        elif context.credentials is None:
            skip = "no credentials stored (firstmile destinations credentials set)"
            await self._note(uow, name, context.state, skip)
        if skip is not None:
            done.skipped = skip
            self._skip_until[key] = time.monotonic() + self.skip_s
            return done
        assert spec is not None and context.credentials is not None
        try:
            adapter = await self._adapter(key[0], name, spec, context.credentials)
        except ValueError as exc:
            done.skipped = f"its credentials do not fit: {exc}"
            await self._note(uow, name, context.state, done.skipped)
            self._skip_until[key] = time.monotonic() + self.skip_s
            return done
        limit = max(1, min(adapter.max_batch, spec.max_batch or adapter.max_batch))
        waited = (self.clock() - due.oldest_due).total_seconds() if due is not None and due.oldest_due else None
        if (
            spec.max_wait_seconds
            and due is not None
            and due.due < limit
            and waited is not None
            and (waited < spec.max_wait_seconds)
        ):
            done.skipped = "waiting for a fuller batch"
            return done
        await self._batches(uow, spec, name, adapter, limit, done)
        return done

    async def _batches(
        self, uow: UnitOfWork, spec: DestinationSpec, name: str, adapter: Destination, limit: int,
        done: DestinationPass,
    ) -> None:  # fmt: skip
        """Up to ``max_batches`` batches, sent one at a time, each recorded while the next one is sent.

        Two lanes: the vendor's, where the batches are sent one after the other, and the database's, where one
        transaction records the previous batch and claims the next one while the current one is sent. That claim
        keeps the per-user rule of :func:`~firstmile.destinations.repository.claim` (as for another worker) but
        for the batch in flight: its rows do not hold back their users' later rows, which are sent after them,
        in the next batch; the users of the batch in flight whose rows are not sent are left out of that claim,
        and the users whose row the vendor did not take have their rows in the next batch held back, unsent
        (``waiting``). When that claim finds nothing the pass goes on one batch at a time, each recorded together
        with the next claim; a batch that failed whole stops the pass and gives the batch claimed after it back
        (its attempt uncounted).
        """
        current = await self._settle(uow, spec, name, done, claim=_Want(limit))
        waiting: frozenset[str] = frozenset()  # users of the current batch whose rows are not sent
        sending: asyncio.Task[_Sent] | None = None
        previous: _Sent | None = None  # sent, recorded while the current batch is sent
        ahead = True  # claim the next batch while one is sent (off once such a claim found nothing)
        sent_batches = 0
        try:
            while current.rows:
                sent_batches += 1
                done.batches += 1
                sending = asyncio.create_task(self._send_claimed(uow.tenant, adapter, current, waiting))
                following: _Claimed | None = None
                if ahead and sent_batches < self.max_batches and len(current.rows) >= limit:
                    want = _Want(limit, AHEAD_WINDOW * limit, current.claim_id, waiting)
                    following = await self._settle(uow, spec, name, done, sent=previous, claim=want)
                    if not following.rows:
                        ahead, following = False, None
                elif previous is not None:
                    await self._settle(uow, spec, name, done, sent=previous)
                previous = None
                sent = await sending
                sending = None
                if not sent.failing and following is not None and self._fresh(following):
                    # sent next, without the users whose row was not taken; recorded while it is sent
                    previous, current, waiting = sent, following, sent.waiting
                    continue
                last = sent.failing or sent_batches >= self.max_batches
                # not sent ahead (the destination is down, or its lease is too short by now): given back
                current = await self._settle(
                    uow, spec, name, done, sent=sent, give_back=following, claim=None if last else _Want(limit)
                )
                waiting = frozenset()
                if sent.failing:
                    break
                if last:
                    done.more = True
                    break
        finally:
            if sending is not None and not sending.done():  # cancelled (the loop's stop): its rows keep their lease
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)

    def _fresh(self, claimed: _Claimed) -> bool:
        """Whether a batch claimed ahead can still be sent within its lease (the send may take ``call_timeout_s``)."""
        return time.monotonic() - claimed.at + self.call_timeout_s < self.lease.total_seconds()

    async def _settle(
        self, uow: UnitOfWork, spec: DestinationSpec, name: str, done: DestinationPass, *, sent: _Sent | None = None,
        give_back: _Claimed | None = None, claim: _Want | None = None,
    ) -> _Claimed:  # fmt: skip
        """One transaction of the database's lane: record a sent batch (:meth:`_record`), give back a batch claimed
        ahead and not sent (pending again at once, its attempt uncounted), then claim the next batch (``claim``:
        how many, and for a batch claimed ahead the window, the claim in flight and the users held back:
        :func:`~firstmile.destinations.repository.claim`) and decrypt the personal traits queued with it (an error
        text where they do not decrypt)."""
        now = self.clock()
        claim_id = uuid.uuid4()
        at = time.monotonic()
        disabled: list[bool] = []

        async def work(tx: TenantTx, keys: TenantKeys) -> tuple[set[int], _Claimed]:
            disabled.clear()
            # the claim's lock is taken by the last finish before it, in the same statement (a round trip less)
            recorded: set[int] = set()
            if sent is not None:
                lock = name if claim is not None and give_back is None else None
                recorded = await self._record(tx, spec, name, sent, disabled, lock)
            if give_back is not None:
                back = [
                    repo.Result(r.id, "pending", next_attempt_at=give_back.now, refund=True) for r in give_back.rows
                ]
                await repo.finish(tx, give_back.claim_id, back, lock=name if claim is not None else None)
            rows: list[repo.QueuedRow] = []
            personal: dict[int, dict[str, Any] | str] = {}
            if claim is not None:
                locked = sent is not None or give_back is not None
                rows = await repo.claim(tx, name, now, now + self.lease, claim_id, claim.limit, window=claim.window,
                                        inflight=claim.inflight, held=claim.held, locked=locked)  # fmt: skip
            for row in rows:
                if row.sealed is None:
                    continue
                try:
                    plain = await keys.decrypt(tx, row.sealed, sealed_context(tx.tenant, name, row.event_id),
                                               user_id=row.user_id)  # fmt: skip
                    found = msgspec.json.decode(plain)
                    personal[row.id] = found if isinstance(found, dict) else {}
                except DecryptionError as exc:
                    personal[row.id] = f"the user's personal traits cannot be read (erased?): {exc}"
            return recorded, _Claimed(claim_id, now, at, rows, personal)

        recorded, claimed = await self.keyring.run_with_keys(uow, work)
        if sent is not None:
            self._count(uow, spec, name, sent, recorded, bool(disabled), done)
        return claimed

    async def _erase(self, adapter: Destination, user_id: str) -> ErasureOutcome:
        try:
            return await asyncio.wait_for(adapter.erase(user_id), self.call_timeout_s)
        except TimeoutError:
            return ErasureOutcome(True, False, f"no answer within {self.call_timeout_s:g} s")
        except Exception as exc:
            return ErasureOutcome(True, False, f"{type(exc).__name__}: {exc}"[:500])

    async def _send(self, adapter: Destination, events: Sequence[OutboundEvent]) -> list[Outcome]:
        if not events:
            return []
        try:
            outcomes = await asyncio.wait_for(adapter.deliver(events), self.call_timeout_s)
        except TimeoutError:
            return [Retry(f"the adapter did not answer within {self.call_timeout_s:g} s")] * len(events)
        except Exception as exc:  # the port: an exception is a retry of the whole batch
            return [Retry(f"{type(exc).__name__}: {exc}"[:500])] * len(events)
        return check_outcomes(events, outcomes)

    def _again(self, row: repo.QueuedRow, reason: str, after_s: float | None, now: datetime) -> repo.Result:
        if self.policy.exhausted(row.attempts):
            return repo.Result(row.id, "dead", error=f"gave up after {row.attempts} attempts: {reason}")
        wait = self.policy.delay(row.attempts, self.rng, after_s)
        return repo.Result(row.id, "pending", next_attempt_at=now + timedelta(seconds=wait), error=reason)

    async def _send_claimed(
        self, tenant: uuid.UUID, adapter: Destination, claimed: _Claimed, waiting: frozenset[str] = frozenset()
    ) -> _Sent:
        """Send a claimed batch (its erasures, then its events), outside any transaction; what became of each row.
        The rows of the users in ``waiting`` (a row of theirs in the previous batch is not final) are not sent."""
        now, rows, personal = claimed.now, claimed.rows, claimed.personal
        results: dict[int, repo.Result] = {}
        erasures: list[tuple[repo.QueuedRow, ErasureOutcome]] = []
        held: set[str] = set(waiting)
        deadline = time.monotonic() + self.call_timeout_s  # erasures are sent one by one: within the lease
        for row in (r for r in rows if r.kind == ERASE):
            if row.user_id in held:  # an earlier row of the user waits: this one waits behind it, unsent
                results[row.id] = repo.Result(row.id, "pending", next_attempt_at=now, refund=True)
                continue
            if time.monotonic() > deadline:  # the rest of the batch's erasures wait for the next claim
                results[row.id] = repo.Result(row.id, "pending", next_attempt_at=now, refund=True)
                held.add(row.user_id)
                continue
            answer = await self._erase(adapter, row.user_id)
            erasures.append((row, answer))
            if answer.done or not answer.supported:
                results[row.id] = repo.Result(row.id, "done", outcome=asdict(answer))
            else:
                results[row.id] = self._again(row, answer.detail or "the erasure failed", None, now)
                held.add(row.user_id)
        sending: list[repo.QueuedRow] = []
        for row in (r for r in rows if r.kind != ERASE):
            if row.user_id in held:  # an earlier row of the user waits (an erasure, a retry): this one, unsent
                results[row.id] = repo.Result(row.id, "pending", next_attempt_at=now, refund=True)
            elif isinstance(personal.get(row.id), str):
                results[row.id] = repo.Result(row.id, "dead", error=str(personal[row.id]))
            else:
                sending.append(row)
        events = [self._event(tenant, row, personal.get(row.id)) for row in sending]
        outcomes = await self._send(adapter, events)
        for row, outcome in zip(sending, outcomes, strict=True):
            if isinstance(outcome, Delivered):
                results[row.id] = repo.Result(row.id, "done")
            elif isinstance(outcome, Rejected):
                results[row.id] = repo.Result(row.id, "dead", error=outcome.reason)
            else:
                results[row.id] = self._again(row, outcome.reason, outcome.after_s, now)
        succeeded = any(isinstance(o, Delivered) for o in outcomes) or any(a.done for _, a in erasures)
        failing = (
            bool(outcomes or erasures)
            and all(isinstance(o, Retry) for o in outcomes)
            and all(a.supported and not a.done for _, a in erasures)
        )
        first_error = next((_reason(o) for o in outcomes if not isinstance(o, Delivered)), None) or next(
            (a.detail for _, a in erasures if a.supported and not a.done), None
        )
        waits = frozenset(r.user_id for r in rows if results[r.id].status == "pending")
        return _Sent(claimed.claim_id, results, erasures, succeeded, failing, first_error, waits)

    async def _record(
        self, tx: TenantTx, spec: DestinationSpec, name: str, sent: _Sent, disabled: list[bool], lock: str | None
    ) -> set[int]:
        """Record what became of a sent batch under its claim, and the destination's state (the module docstring);
        the ids recorded. ``disabled`` gets an entry when this disabled the destination; ``lock``: take that
        destination's claim lock too (:func:`~firstmile.destinations.repository.finish`)."""
        results, first_error, failing = sent.results, sent.first_error, sent.failing
        at = self.clock()
        success = (name, at) if sent.succeeded else None
        recorded = await repo.finish(tx, sent.claim_id, list(results.values()), success=success, lock=lock)
        if first_error is not None:
            since, disabled_at = await repo.record_failure(tx, name, first_error, at, failing=failing)
            if failing and since is not None and disabled_at is None and at - since >= self.disable_after:
                reason = f"every attempt failed since {since.isoformat(timespec='seconds')}: {first_error}"
                if await repo.disable(tx, name, reason, at):
                    disabled.append(True)
                    await audit.append(tx, AUDIT_KIND, self.worker.actor, f"destination:{name}", {
                        "action": "destination.disabled", "destination": name, "kind": spec.kind,
                        "automatic": True, "failing_since": since.isoformat(), "reason": reason[:500]})  # fmt: skip
        for row, answer in sent.erasures:
            if row.id in recorded and results[row.id].status == "done":
                await audit.append(tx, "erasure", self.worker.actor, row.user_id, {
                    "action": "destination.erasure", "destination": name, "kind": spec.kind,
                    "supported": answer.supported, "done": answer.done, "detail": answer.detail[:500]})  # fmt: skip
        return recorded

    def _count(
        self, uow: UnitOfWork, spec: DestinationSpec, name: str, sent: _Sent, recorded: set[int], disabled: bool,
        done: DestinationPass,
    ) -> None:  # fmt: skip
        """A recorded batch in the pass's counts, the metrics and the log."""
        sent_n = dead = retried = 0
        for result in (r for r in sent.results.values() if r.id in recorded):
            if result.status == "done" and result.outcome is None:
                sent_n += 1
            elif result.status == "done":
                done.erased += 1
            elif result.status == "dead":
                dead += 1
            elif not result.refund:
                retried += 1
        done.sent += sent_n
        done.dead += dead
        done.retried += retried
        for metric, count in ((telemetry.DESTINATION_SENT, sent_n), (telemetry.DESTINATION_DEAD, dead),
                              (telemetry.DESTINATION_FAILED, retried)):  # fmt: skip
            if count:
                metric.labels(spec.kind).inc(count)
        for row, answer in sent.erasures:
            if row.id in recorded:
                label = "done" if answer.done else "unsupported" if not answer.supported else "failed"
                telemetry.DESTINATION_ERASURES.labels(spec.kind, label).inc()
        if sent.first_error is not None:
            done.errors.append(sent.first_error)
        if disabled:
            done.disabled = True
            telemetry.DESTINATION_DISABLED.labels(spec.kind).inc()
            log.warning(
                "destination disabled after sustained failure",
                extra={"fields": {"tenant": str(uow.tenant), "destination": name, "error": sent.first_error}},
            )

    @staticmethod
    def _event(tenant: uuid.UUID, row: repo.QueuedRow, personal: dict[str, Any] | str | None) -> OutboundEvent:
        properties = row.payload.get("properties") or {}
        traits = dict(row.payload.get("traits") or {})
        if isinstance(personal, dict):
            traits.update(personal)
        if row.kind == "identify":
            return OutboundEvent(row.event_id, tenant, row.user_id, "identify", row.name, row.occurred_at, properties,
                                 traits)  # fmt: skip
        return OutboundEvent(row.event_id, tenant, row.user_id, "track", row.name, row.occurred_at, properties, traits)

    # ------------------------------------------------------------------ the operator's test

    async def test(self, tenant: TenantId, name: str) -> ProbeAnswer:
        """Send one test event to a destination now, through a fresh adapter; the outcome and the vendor's answer.
        :class:`ValueError` when the destination cannot be tried (not in the manifest, no credentials)."""
        uow = UnitOfWork(self.engine, tenant)
        context, _ = await self._context(uow, name)
        if context.spec is None:
            raise ValueError(f"the tenant's manifest has no destination {name!r}")
        if context.credentials is None:
            raise ValueError(f"destination {name} has no credentials: firstmile destinations credentials set")
        adapter = self.factory.build(context.spec, context.credentials)
        try:
            [outcome] = await self._send(adapter, [probe_event(uuid.UUID(str(tenant)), self.clock())])
        finally:
            await adapter.close()
        kind = context.spec.kind
        if isinstance(outcome, Delivered):
            return ProbeAnswer(kind, "delivered", "the destination accepted the test event")
        if isinstance(outcome, Rejected):
            return ProbeAnswer(kind, "rejected", outcome.reason)
        after = f" (retry after {outcome.after_s:g} s)" if outcome.after_s is not None else ""
        return ProbeAnswer(kind, "failed", outcome.reason + after)


__all__ = ["DELIVERY", "DestinationDelivery", "DestinationPass", "ProbeAnswer"]
