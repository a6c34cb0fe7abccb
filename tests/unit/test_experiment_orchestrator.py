"""The orchestrator's read of the running experiments: shared by concurrent starts, and finished in the
background when a start stops waiting for it (that start gets control; the next ones are allocated)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from firstmile.experiments.orchestrator import ExperimentOrchestrator, Running, to_allocation
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.tenancy.manifest import ExperimentSpec

SPEC = ExperimentSpec.model_validate({"id": "first-path", "control": "ctl", "variants": [
    {"name": "ctl", "path": "developer-quickstart"}, {"name": "alt", "path": "product-analytics"}]})  # fmt: skip


class SlowUnitOfWork:
    """Stands in for ``kit.uow.UnitOfWork``: its one read takes ``delay`` seconds and is counted."""

    def __init__(self, delay: float) -> None:
        self.tenant = OPERATOR_CLI.tenant(uuid.uuid4())
        self.delay = delay
        self.reads = 0

    async def run(self, work: Callable[[Any], Awaitable[Any]]) -> Running:
        self.reads += 1
        await asyncio.sleep(self.delay)
        return Running(((SPEC, to_allocation(SPEC)),), 0.0, str(self.tenant))


async def test_a_slow_read_gives_control_then_fills_the_cache_for_the_next_starts() -> None:
    orchestrator = ExperimentOrchestrator(timeout_s=0.05)
    uow = SlowUnitOfWork(delay=0.3)
    assert await orchestrator.assign(uow, 1, "user-1", {}) is None  # type: ignore[arg-type]  # timed out: control
    await asyncio.sleep(0.4)  # the read finished in the background
    assigned = await orchestrator.assign(uow, 1, "user-1", {})  # type: ignore[arg-type]
    assert assigned is not None and assigned.experiment == "first-path" and uow.reads == 1


async def test_concurrent_starts_share_one_read_and_a_new_revision_reads_again() -> None:
    orchestrator = ExperimentOrchestrator(timeout_s=1.0)
    uow = SlowUnitOfWork(delay=0.1)
    found = await asyncio.gather(*(orchestrator.assign(uow, 1, f"user-{i}", {}) for i in range(20)))  # type: ignore[arg-type]
    assert all(a is not None for a in found) and uow.reads == 1
    await orchestrator.assign(uow, 2, "user-1", {})  # type: ignore[arg-type]
    assert uow.reads == 2
