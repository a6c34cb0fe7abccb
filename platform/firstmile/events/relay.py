"""The outbox relay: publishes outbox rows in commit order and deletes them once acknowledged.

One relay is active per region: it holds a PostgreSQL advisory lock, and a
second relay waits as a standby, so per-user order is never split between two
publishers. It reads with the ``firstmile_relay`` role (all tenants' outbox
rows, nothing else). A row is deleted only after the publisher acknowledged it;
a crash in between republishes it, and consumers dedupe by event id.
It also prunes Segment ``messageId`` receipts older than the dedupe window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import timedelta

import asyncpg
import msgspec

from firstmile.events.bus import Publisher, Record, wait_for_stop
from firstmile.kit import telemetry
from firstmile.kit.outbox import PROGRESS_EVENT_PREFIX, PROGRESS_NOTIFY_CHANNEL

log = logging.getLogger("firstmile.relay")
LOCK_KEY = 0x46_4D_52_4C  # "FMRL"
_FETCH = (
    "SELECT id, event_id, tenant_id, event_type, partition_key, payload::text, occurred_at"
    " FROM outbox ORDER BY id LIMIT $1"
)
_FETCH_AFTER = (
    "SELECT id, event_id, tenant_id, event_type, partition_key, payload::text, occurred_at"
    " FROM outbox WHERE id > $1 ORDER BY id LIMIT $2"
)
_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
_BACKLOG = (
    "SELECT count(*), coalesce(extract(epoch FROM now() - (SELECT enqueued_at FROM outbox ORDER BY id LIMIT 1)), 0)"
    " FROM outbox"
)
HEAD_EVERY = 16
"""While batches are full the next one is prefetched past the current one; every HEAD_EVERY
batches the relay reads from the head again, so a row committed late with a lower id waits
at most that long."""
_ANNOUNCE = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"
ANNOUNCE_BYTES = 7000
"""A notification's payload stays under PostgreSQL's 8,000-byte limit."""
_PRUNE = "DELETE FROM event_receipts WHERE received_at < now() - $1::interval"
_str = msgspec.json.Encoder()


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """``postgresql+asyncpg://…`` → the ``postgresql://…`` DSN asyncpg takes."""
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def to_record(row: asyncpg.Record) -> Record:
    """An outbox row as its envelope bytes; the payload's JSON text is spliced in, not re-encoded."""
    occurred = row[6].isoformat()
    value = b"".join(
        (
            b'{"event_id":"',
            str(row[1]).encode(),
            b'","tenant_id":"',
            str(row[2]).encode(),
            b'","event_type":',
            _str.encode(row[3]),
            b',"occurred_at":"',
            occurred.encode(),
            b'","partition_key":',
            _str.encode(row[4]),
            b',"payload":',
            row[5].encode(),
            b"}",
        )
    )
    return Record(outbox_id=row[0], event_id=row[1], tenant_id=row[2], event_type=row[3], key=row[4], value=value)


class OutboxRelay:
    def __init__(
        self,
        dsn: str,
        publisher: Publisher,
        *,
        batch_size: int = 2000,
        idle_interval: float = 0.05,
        dedupe_window: timedelta = timedelta(days=7),
        prune_interval: float = 300.0,
        announce: bool = True,
    ) -> None:
        self.dsn = asyncpg_dsn(dsn)
        self.publisher = publisher
        self.batch_size = batch_size
        self.idle_interval = idle_interval
        self.dedupe_window = dedupe_window
        self.prune_interval = prune_interval
        self.announce = announce
        self.published = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._conn: asyncpg.Connection | None = None
        self._last_prune = 0.0
        self._last_backlog = 0.0

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "firstmile-relay"})
        return self._conn

    async def acquire_leadership(self, stop: asyncio.Event) -> bool:
        """Wait for the region's relay lock; False if stopped first."""
        while not stop.is_set():
            conn = await self._connect()
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                log.info("outbox relay active")
                return True
            await wait_for_stop(stop, 1.0)
        return False

    async def run_once(self) -> int:
        """Publish from the head of the outbox while batches are full; the rows that left it.

        While batch N is being acknowledged, batch N+1 is fetched (rows after N's last id)
        on the same connection, so the database and the broker work at the same time.
        A batch leaves the outbox only once acknowledged; on a partial acknowledgement the
        prefetched batch is dropped and the next call starts again from the head.
        """
        conn = await self._connect()
        rows = await conn.fetch(_FETCH, self.batch_size)
        moved = 0
        rounds = 0
        while rows:
            records = [to_record(r) for r in rows]
            full = len(rows) == self.batch_size
            rounds += 1
            prefetch = (
                asyncio.create_task(conn.fetch(_FETCH_AFTER, rows[-1][0], self.batch_size))
                if full and rounds % HEAD_EVERY
                else None
            )
            try:
                acked = await self.publisher.publish(records)
            finally:
                following = await prefetch if prefetch is not None else None
            if acked:
                await conn.execute(_DELETE, [r.outbox_id for r in records[:acked]])
                if self.announce:
                    await self._announce(conn, rows[:acked])
                telemetry.RELAY_PUBLISHED.inc(acked)
                self.published += acked
                moved += acked
            if acked < len(records) or not full:
                break
            rows = following if following is not None else await conn.fetch(_FETCH, self.batch_size)
        return moved

    async def _announce(self, conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        """Notify the users whose progress this batch published (``kit.outbox.PROGRESS_NOTIFY_CHANNEL``).

        After the batch left the outbox, so a listener that re-reads finds the state the events describe. A lost
        notification only delays a live view until its next periodic read; it is never needed for correctness.
        """
        keys = sorted({r[4] for r in rows if r[3].startswith(PROGRESS_EVENT_PREFIX)})
        if not keys:
            return
        payloads: list[str] = []
        chunk: list[str] = []
        size = 2
        for key in keys:
            if chunk and size + len(key.encode()) + 4 > ANNOUNCE_BYTES:
                payloads.append(json.dumps(chunk))
                chunk, size = [], 2
            chunk.append(key)
            size += len(key.encode()) + 4
        payloads.append(json.dumps(chunk))
        await conn.execute(_ANNOUNCE, PROGRESS_NOTIFY_CHANNEL, payloads)

    async def measure_backlog(self) -> int:
        """Rows waiting in the outbox and the age of the oldest (``firstmile_relay_backlog``, ``…_lag_seconds``)."""
        conn = await self._connect()
        row = await conn.fetchrow(_BACKLOG)
        assert row is not None
        backlog = int(row[0])
        telemetry.RELAY_BACKLOG.set(backlog)
        telemetry.RELAY_LAG.set(max(0.0, float(row[1])))
        return backlog

    async def prune_receipts(self) -> int:
        conn = await self._connect()
        status = await conn.execute(_PRUNE, self.dedupe_window)
        return int(status.split()[-1])

    def health(self) -> tuple[int, str | None]:
        """How many times in a row the relay failed to reach PostgreSQL or the bus, and the last error.

        The relay retries those failures itself (they are usually brief); the supervisor reads this so
        that readiness reports a relay that keeps failing.
        """
        return self.consecutive_failures, self.last_error

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; reconnects with backoff when PostgreSQL or the bus fails."""
        backoff = 0.1
        while not stop.is_set():
            try:
                if not await self.acquire_leadership(stop):
                    break
                while not stop.is_set():
                    # measured before publishing, so the gauges keep moving while the bus is down
                    if time.monotonic() - self._last_backlog > 5.0:
                        self._last_backlog = time.monotonic()
                        await self.measure_backlog()
                    moved = await self.run_once()
                    if time.monotonic() - self._last_prune > self.prune_interval:
                        self._last_prune = time.monotonic()
                        await self.prune_receipts()
                    backoff = 0.1
                    self.consecutive_failures = 0
                    if not moved:
                        await wait_for_stop(stop, self.idle_interval)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("relay interrupted, retrying", extra={"fields": {"error": repr(exc), "backoff": backoff}})
                await self._close_conn()
                await wait_for_stop(stop, backoff)
                backoff = min(backoff * 2, 5.0)
        await self._close_conn()

    async def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close(timeout=2)
            except Exception:  # closing a broken connection may fail; it is gone either way
                self._conn.terminate()
            self._conn = None
