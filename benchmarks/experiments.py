"""``python -m benchmarks experiments``: allocation per second, and the experiment analysis query over millions of
exposures (chdb), each against a baseline measured in the same run (docs/benchmarks.md, issue 16).

1. **Allocation** (:func:`firstmile.experiments.allocation.allocate_all`: the holdout, three running
   experiments, two of them sharing a layer, one with targeting, 50% traffic), for ``users`` user ids in one
   process, against computing one SHA-256 of the same length per user (the irreducible part: every
   allocation draws at least one hash).
2. **Analysis query** (:meth:`AnalyticsQueries.experiment`: per variant, exposed users and what they did
   after their exposure) over ``exposures`` exposures of one experiment, with activations for about a
   third of the users and one to three step completions each, generated inside chdb (``INSERT … SELECT
   FROM numbers(N)``) in a fresh store, then ``OPTIMIZE TABLE events FINAL``. Baseline: the exposures per
   variant alone (``count()`` grouped by variant over the same rows), the scan any answer needs. One
   warm-up, then the median of ``runs``.

Returns a markdown report; progress goes to stderr.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from firstmile.analytics import sql
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import AnalyticsQueries
from firstmile.experiments.allocation import Experiment, Rule, Variant, allocate_all
from firstmile.kit.scope import OPERATOR_CLI

EXPERIMENT = "quickstart-vs-analytics"
START = datetime(2026, 11, 1, tzinfo=UTC)


def _log(message: str) -> None:
    sys.stderr.write(f"[bench experiments] {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Rate:
    label: str
    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


@dataclass(frozen=True)
class Timing:
    label: str
    runs_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


@dataclass(frozen=True)
class Report:
    users: int
    one: Rate
    allocation: Rate
    hashing: Rate
    allocated: int
    exposures: int
    rows: int
    load_s: float
    query: Timing
    baseline: Timing

    def markdown(self, command: str) -> str:
        a, h = self.allocation, self.hashing
        q, b = self.query, self.baseline
        return "\n".join(
            [
                f"## make bench-experiments (`{command}`)",
                "",
                f"{platform.node()}: {platform.processor() or platform.machine()}, Python {platform.python_version()}.",
                "",
                "| measurement | baseline (same run) | ratio |",
                "| --- | --- | --- |",
                f"| allocation to one running experiment (50/50, all traffic), {self.users:,} users: "
                f"**{self.one.per_second:,.0f}/s** | one SHA-256 per user: {h.per_second:,.0f}/s | "
                f"{self.one.per_second / h.per_second:.1%} |",
                f"| allocation, {self.users:,} users, 3 experiments (a layer, targeting, 50% traffic) and the holdout: "
                f"**{a.per_second:,.0f}/s** ({self.allocated:,} allocations made) | one SHA-256 per user: "
                f"{h.per_second:,.0f}/s | {a.per_second / h.per_second:.1%} |",
                f"| analysis query over {self.exposures:,} exposures ({self.rows:,} rows of the tenant): "
                f"**{q.median_ms:,.0f} ms** median of {len(q.runs_ms)} | exposures per variant alone: "
                f"{b.median_ms:,.0f} ms | {q.median_ms / b.median_ms:.1f}x |",
                "",
                f"Rows generated inside chdb and merged in {self.load_s:.1f} s. Targets (issue 16): at least 100,000 "
                "allocations/s in one process; the analysis over 10 million exposures in at most 1 s on chdb.",
            ]
        )


def _allocation(users: int) -> tuple[Rate, Rate, Rate, int]:
    experiments = [
        Experiment("first", "s-first", (Variant("control", 1), Variant("tour", 1)), 50.0, "onboarding", (0.0, 50.0)),
        Experiment(
            "second",
            "s-second",
            (Variant("control", 1), Variant("short", 1)),
            50.0,
            "onboarding",
            (50.0, 100.0),
            (Rule("persona", "eq", "developer"),),
        ),
        Experiment("copy", "s-copy", (Variant("a", 2), Variant("b", 1), Variant("c", 1)), 50.0),
    ]
    ids = [f"user-{i:08d}" for i in range(users)]
    traits = {"persona": "developer", "company_size": "11-50"}
    _log(f"allocating {users:,} users")
    single = [Experiment("one", "s-one", (Variant("control", 1), Variant("tour", 1)))]
    began = time.perf_counter()
    for u in ids:
        allocate_all(single, u, traits)
    one = Rate("one experiment", users, time.perf_counter() - began)
    began = time.perf_counter()
    allocated = sum(len(allocate_all(experiments, u, traits, tenant_seed="t", holdout_percent=5.0)) for u in ids)
    allocation = Rate("allocation", users, time.perf_counter() - began)
    began = time.perf_counter()
    for u in ids:
        hashlib.sha256(f"s-first:variant:{u}".encode()).digest()
    hashing = Rate("sha256", users, time.perf_counter() - began)
    return one, allocation, hashing, allocated


def _load(store: ChdbStore, tenant: uuid.UUID, exposures: int) -> int:
    """Exposures, activations (~35%, an hour to two days later) and 1-3 step completions per user, made in chdb."""
    t0 = START.strftime("%Y-%m-%d %H:%M:%S")
    columns = ", ".join(sql.COLUMNS)
    common = f"toUUID('{tenant}'), generateUUIDv4(number)"
    user = "concat('u-', toString(number))"
    exposed_at = f"toDateTime64('{t0}', 3, 'UTC') + toIntervalSecond(number % 2592000)"
    statements = [
        f"INSERT INTO {sql.TABLE} ({columns}) SELECT {common}, 'experiment.exposed', '{EXPERIMENT}', {user}, '', "
        f"{exposed_at}, {exposed_at}, 'developer-quickstart', 1, '', if(number % 2 = 0, 'quickstart', 'analytics'), "
        f"'developer', '{{}}' FROM numbers({exposures})",
        f"INSERT INTO {sql.TABLE} ({columns}) SELECT {common}, 'onboarding.activated', '', {user}, '', "
        f"{exposed_at} + toIntervalSecond(3600 + cityHash64(number) % 172800), {exposed_at}, 'developer-quickstart', "
        f"1, 'send-first-event', '', 'developer', '{{}}' FROM numbers({exposures}) "
        f"WHERE cityHash64(number, 1) % 100 < if(number % 2 = 0, 33, 37)",
        f"INSERT INTO {sql.TABLE} ({columns}) SELECT {common}, 'onboarding.step_completed', '', "
        f"concat('u-', toString(intDiv(number, 3))), '', "
        f"toDateTime64('{t0}', 3, 'UTC') + toIntervalSecond(intDiv(number, 3) % 2592000 + 600 * (number % 3 + 1)), "
        f"toDateTime64('{t0}', 3, 'UTC'), 'developer-quickstart', 1, concat('step-', toString(number % 3)), '', "
        f"'developer', '{{}}' FROM numbers({exposures * 3}) WHERE cityHash64(number, 2) % 3 <= number % 3",
    ]
    for statement in statements:
        store.dangerous_raw_sql(statement, {})
    store.dangerous_raw_sql(f"OPTIMIZE TABLE {sql.TABLE} FINAL", {})
    [row] = store.dangerous_raw_sql(f"SELECT count() AS n FROM {sql.TABLE} WHERE tenant_id = toUUID('{tenant}')", {})
    return int(row["n"])


def _time(runs: int, work: object) -> tuple[float, ...]:
    assert callable(work)
    work()  # warm-up
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        out.append((time.perf_counter() - began) * 1000)
    return tuple(out)


def run_experiments_benchmark(*, users: int, exposures: int, runs: int, data_dir: Path) -> Report:
    one, allocation, hashing, allocated = _allocation(users)
    data_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-experiments-", dir=data_dir))
    store = ChdbStore(folder / "chdb")
    store.ensure_schema()
    try:
        tenant = OPERATOR_CLI.tenant(uuid.uuid4())
        _log(f"generating {exposures:,} exposures and their outcomes in chdb")
        began = time.perf_counter()
        rows = _load(store, tenant, exposures)
        load_s = time.perf_counter() - began
        queries = AnalyticsQueries(store)
        since = START - timedelta(days=1)
        _log(f"timing the analysis ({runs} runs)")
        query = _time(runs, lambda: queries.experiment(tenant, EXPERIMENT, None, since))
        arms = queries.experiment(tenant, EXPERIMENT, None, since)
        if sum(a.users for a in arms) != exposures:
            raise RuntimeError(f"the query saw {sum(a.users for a in arms)} exposed users, not {exposures}")
        baseline_sql = (
            f"SELECT variant, count() AS n FROM {sql.TABLE} WHERE tenant_id = {{tenant:UUID}} AND "
            f"event_type = 'experiment.exposed' AND event_name = '{EXPERIMENT}' GROUP BY variant"
        )
        baseline = _time(runs, lambda: store.dangerous_raw_sql(baseline_sql, {"tenant": str(tenant)}))
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
    return Report(users, one, allocation, hashing, allocated, exposures, rows, load_s, Timing("analysis", query),
                  Timing("exposures per variant", baseline))  # fmt: skip
