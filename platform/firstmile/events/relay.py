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
import logging
import time
from datetime import timedelta

import asyncpg
import msgspec

from firstmile.events.bus import Publisher, Record, wait_for_stop
from firstmile.kit import telemetry

log = logging.getLogger("firstmile.relay")
LOCK_KEY = 0x46_4D_52_4C  # "FMRL"
_FETCH = (
    "SELECT id, event_id, tenant_id, event_type, partition_key, payload::text, occurred_at"
    " FROM outbox ORDER BY id LIMIT $1"
)
_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
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
    ) -> None:
        self.dsn = asyncpg_dsn(dsn)
        self.publisher = publisher
        self.batch_size = batch_size
        self.idle_interval = idle_interval
        self.dedupe_window = dedupe_window
        self.prune_interval = prune_interval
        self.published = 0
        self._conn: asyncpg.Connection | None = None
        self._last_prune = 0.0

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
        """Publish one batch; the number of rows that left the outbox."""
        conn = await self._connect()
        rows = await conn.fetch(_FETCH, self.batch_size)
        telemetry.RELAY_BACKLOG.set(len(rows))
        if not rows:
            return 0
        records = [to_record(r) for r in rows]
        acked = await self.publisher.publish(records)
        if acked:
            await conn.execute(_DELETE, [r.outbox_id for r in records[:acked]])
            telemetry.RELAY_PUBLISHED.inc(acked)
            self.published += acked
        return acked

    async def prune_receipts(self) -> int:
        conn = await self._connect()
        status = await conn.execute(_PRUNE, self.dedupe_window)
        return int(status.split()[-1])

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; reconnects with backoff when PostgreSQL or the bus fails."""
        backoff = 0.1
        while not stop.is_set():
            try:
                if not await self.acquire_leadership(stop):
                    break
                while not stop.is_set():
                    moved = await self.run_once()
                    if time.monotonic() - self._last_prune > self.prune_interval:
                        self._last_prune = time.monotonic()
                        await self.prune_receipts()
                    backoff = 0.1
                    if moved < self.batch_size:
                        await wait_for_stop(stop, self.idle_interval if not moved else 0.001)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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
