"""Timing the hottest query through RLS and through a BYPASSRLS role."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from benchmarks.common import RLS_ROUND, BenchError


def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class RlsSide:
    role: str
    query_s: list[float] = field(default_factory=list)
    txn_s: list[float] = field(default_factory=list)
    explain: str = ""


@dataclass(frozen=True)
class RlsResult:
    sides: dict[str, RlsSide]
    iterations: int
    users: int
    visible_without_tenant: dict[str, int]


def _get_sql() -> str:
    from firstmile.onboarding.repository import _GET

    return str(_GET.text).replace(":tid", "$1").replace(":uid", "$2")


async def _measure_rls(dsns: dict[str, str], tenant_id: uuid.UUID, users: Sequence[str], iterations: int) -> RlsResult:
    sql = _get_sql()
    rng = random.Random(20260101)
    picks = [rng.choice(users) for _ in range(iterations)]
    conns: dict[str, Any] = {}
    sides = {name: RlsSide(role=name) for name in dsns}
    visible: dict[str, int] = {}
    try:
        for name, dsn in dsns.items():
            conns[name] = await asyncpg.connect(dsn)
        prepared: dict[str, tuple[Any, Any]] = {}
        for name, conn in conns.items():
            visible[name] = int(await conn.fetchval("SELECT count(*) FROM user_progress"))
            prepared[name] = (
                await conn.prepare("SELECT set_config('firstmile.tenant_id', $1, true)"),
                await conn.prepare(sql),
            )

        async def once(name: str, user: str, record: bool) -> None:
            conn, (set_tenant, get) = conns[name], prepared[name]
            t0 = time.perf_counter()
            async with conn.transaction():
                await set_tenant.fetchval(str(tenant_id))
                t1 = time.perf_counter()
                rows = await get.fetch(tenant_id, user)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            if len(rows) != 1:
                raise BenchError(f"progress read as {name} returned {len(rows)} rows for {user!r}")
            if record:
                sides[name].query_s.append(t2 - t1)
                sides[name].txn_s.append(t3 - t0)

        names = list(conns)
        for user in picks[: min(300, len(picks))]:  # warm-up: plans, caches
            for name in names:
                await once(name, user, record=False)
        for start in range(0, len(picks), RLS_ROUND):
            order = names if (start // RLS_ROUND) % 2 == 0 else names[::-1]
            for name in order:
                for user in picks[start : start + RLS_ROUND]:
                    await once(name, user, record=True)

        for name, conn in conns.items():
            async with conn.transaction():
                await conn.execute(f"SELECT set_config('firstmile.tenant_id', '{tenant_id}', true)")
                plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", tenant_id, picks[0])
            sides[name].explain = "\n".join(str(r[0]) for r in plan)
    finally:
        for conn in conns.values():
            await conn.close()
    return RlsResult(sides, iterations, len(set(picks)), visible)
