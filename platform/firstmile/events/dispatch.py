"""Embedded mode's event bus: the relay hands batches straight to the consumers, in-process.

Same relay, same consumers, same guarantees as Kafka, minus the broker: a batch
is acknowledged (and leaves the outbox) only after every consumer handled it;
a consumer's transient failure makes the relay retry the batch, and events a
consumer cannot process are appended, with the reason, to
``<data_dir>/dead-letters/<consumer>.jsonl``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import msgspec

from firstmile.events import envelope as env
from firstmile.events.bus import Consumer, DeadLetter, Record
from firstmile.kit import telemetry

log = logging.getLogger("firstmile.dispatch")


class InProcessPublisher:
    def __init__(self, consumers: Sequence[Consumer], dead_letter_dir: Path) -> None:
        self.consumers = list(consumers)
        self.dead_letter_dir = dead_letter_dir

    async def publish(self, records: Sequence[Record]) -> int:
        envelopes = [env.decode(r.value) for r in records]
        for consumer in self.consumers:
            try:
                dead = await consumer.handle(envelopes)
            except Exception as exc:
                log.warning(
                    "in-process consumer failed; the batch stays in the outbox",
                    extra={"fields": {"consumer": consumer.name, "error": repr(exc)}},
                )
                return 0
            telemetry.CONSUMED.labels(consumer.name, "ok").inc(len(envelopes) - len(dead))
            if dead:
                await asyncio.to_thread(self._dead_letter, consumer.name, dead)
        return len(records)

    def _dead_letter(self, consumer: str, dead: Sequence[DeadLetter]) -> None:
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True)
        with (self.dead_letter_dir / f"{consumer}.jsonl").open("ab") as out:
            for letter in dead:
                record = {
                    "reason": letter.reason,
                    "consumer": consumer,
                    "event": msgspec.json.decode(letter.raw) if letter.raw else letter.envelope,
                }
                out.write(msgspec.json.encode(record) + b"\n")
                telemetry.DEAD_LETTERS.labels(consumer).inc()

    async def close(self) -> None:
        return None
