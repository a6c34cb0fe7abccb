"""``python -m benchmarks analytics``: the analytics queries over millions of synthetic events, against scans.

What one run does:

1. Opens a fresh chdb store in a new folder under ``<data_dir>/`` (removed at the
   end unless ``keep``), so it must run in a process that has no other chdb store
   open (chdb binds one data path per process).
2. Generates ``events`` synthetic events (:mod:`firstmile.analytics.synthetic`)
   for ``tenants`` tenants, equal shares, over ``weeks`` weeks, and loads them in
   batches with :meth:`ChdbStore.bulk_load` (no per-batch dedupe lookup: the ids
   are unique by construction); then ``OPTIMIZE TABLE events FINAL``, so the
   queries see merged parts as a server's background merges would leave them.
3. For the first tenant, times each query (funnel, drop-off, cohorts, time to
   activation, step completion, activation rate) and two baselines measured in the
   same run on the same tenant: ``count()`` of its rows, and a scan of the user ids
   of all its rows in the range (``uniqExact(user_id)``, every event type). One
   warm-up, then the median of ``runs``. Two ranges: the whole history, and the
   API's default (the last 30 days).
4. With ``compare_key``, copies the rows into a table sorted by that key instead,
   swaps it in and times the same queries again: the evidence for the key
   docs/analytics.md chooses.
5. Times the deduplicating insert (what the analytics sink runs) into the loaded
   table: batches of new events mixed with redeliveries.

Returns a markdown report; progress goes to stderr.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from benchmarks.common import bench_tenant
from firstmile.analytics import sql
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import AnalyticsQueries, Filters
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.synthetic import SyntheticPath, generate
from firstmile.kit.scope import TenantId

PATHS = (
    SyntheticPath(
        "developer-quickstart",
        1,
        ("create-api-key", "install-sdk", "send-first-event", "view-live-events", "invite-teammate"),
        "send-first-event",
        frozenset({"invite-teammate"}),
    ),
    SyntheticPath(
        "analyst-reports",
        1,
        ("connect-data-source", "build-first-report", "create-dashboard", "share-dashboard", "schedule-export"),
        "build-first-report",
        frozenset({"schedule-export"}),
    ),
    SyntheticPath(
        "workspace-admin",
        1,
        ("configure-workspace", "invite-team", "assign-roles", "review-billing"),
        "invite-team",
    ),
    SyntheticPath(
        "enterprise-rollout",
        1,
        ("configure-sso", "provision-users", "connect-warehouse", "security-review", "build-first-report"),
        "provision-users",
        frozenset({"security-review"}),
    ),
)
FUNNEL_PATH = PATHS[0]
TARGET_MS = 500.0
COMPARE_KEY = "tenant_id, occurred_at, user_id, event_id"
"""The plain per-tenant time key, timed on the same rows after the table's own key (None: skip)."""
BATCH = 250_000


def _log(message: str) -> None:
    sys.stderr.write(f"[bench analytics] {message}\n")
    sys.stderr.flush()


@dataclass
class Timing:
    name: str
    runs_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


@dataclass
class AnalyticsBenchReport:
    events: int
    tenants: int
    weeks: int
    runs: int
    tenant_events: int
    tenant_users: int
    generate_s: float
    load_s: float
    optimize_s: float
    insert_dedupe_rows_per_s: float
    insert_dedupe_batch: int
    timings: dict[str, list[Timing]] = field(default_factory=dict)  # range label -> timings
    engine: str = ""

    def markdown(self, command: str) -> str:
        lines = [
            f"Command: `{command}` — {self.events:,} events, {self.tenants} tenants, {self.weeks} weeks, "
            f"chdb {self.engine}; queries for one tenant ({self.tenant_events:,} events, {self.tenant_users:,} "
            f"users), one warm-up then the median of {self.runs} runs.",
            "",
            f"Load: generated in {self.generate_s:.1f} s, bulk-loaded in {self.load_s:.1f} s "
            f"({self.events / self.load_s:,.0f} rows/s), `OPTIMIZE TABLE events FINAL` {self.optimize_s:.1f} s. "
            f"Deduplicating insert into the loaded table (batches of {self.insert_dedupe_batch:,}, a quarter of "
            f"each a redelivery of the batch before): {self.insert_dedupe_rows_per_s:,.0f} rows/s.",
            "",
        ]
        for label, timings in self.timings.items():
            scan = next(t for t in timings if t.name.startswith("baseline: scan"))
            lines += [
                f"**{label}**",
                "",
                "| query | median ms | min ms | max ms | ratio to the scan |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for t in timings:
                lines.append(
                    f"| {t.name} | {t.median_ms:.1f} | {min(t.runs_ms):.1f} | {max(t.runs_ms):.1f} | "
                    f"{t.median_ms / scan.median_ms:.2f} |"
                )
            funnel = next(t for t in timings if t.name == "funnel")
            verdict = "meets" if funnel.median_ms <= TARGET_MS else "misses"
            lines += ["", f"Funnel {funnel.median_ms:.0f} ms: {verdict} the {TARGET_MS:.0f} ms target.", ""]
        return "\n".join(lines)


def _tenant_rows(tenant: TenantId, count: int, weeks: int, end: datetime, seed: int) -> Iterator[AnalyticsEvent]:
    """Exactly ``count`` events of one tenant: enough users, cut at ``count``."""
    sample = sum(1 for _ in generate(tenant, PATHS, users=500, weeks=weeks, end=end, seed=seed))
    users = int(count / (sample / 500) * 1.1) + 10
    return islice(generate(tenant, PATHS, users=users, weeks=weeks, end=end, seed=seed), count)


def _time_queries(store: ChdbStore, target: TenantId, everyone: Filters, runs: int, label: str) -> list[Timing]:
    """Each query for ``target`` over one range, and the two baselines on the same tenant and range."""
    q = AnalyticsQueries(store)
    f = Filters(everyone.start, everyone.end, path_key=FUNNEL_PATH.key)
    steps = FUNNEL_PATH.required
    window = timedelta(days=7)
    tenant_param: dict[str, sql.ParamValue] = {"tenant": str(target)}
    count_sql = f"SELECT count() AS n FROM {sql.TABLE} WHERE tenant_id = {{tenant:UUID}}"
    scan_sql = (
        f"SELECT uniqExact(user_id) AS n FROM {sql.TABLE} WHERE tenant_id = {{tenant:UUID}} "
        "AND occurred_at >= {date_from:DateTime64(3, 'UTC')} AND occurred_at < {date_to:DateTime64(3, 'UTC')}"
    )
    range_params = {**tenant_param, "date_from": sql.timestamp(everyone.start), "date_to": sql.timestamp(everyone.end)}
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("baseline: count() of the tenant's rows", partial(store.dangerous_raw_sql, count_sql, tenant_param)),
        ("baseline: scan of the user ids in the range", partial(store.dangerous_raw_sql, scan_sql, range_params)),
        ("funnel", partial(q.funnel, target, f, steps, window)),
        ("drop-off", partial(q.dropoff, target, f, steps, window)),
        ("cohorts (12 weeks)", partial(q.cohorts, target, everyone, 12)),
        ("time to activation", partial(q.time_to_activation, target, everyone)),
        ("step completion", partial(q.step_completion, target, f, FUNNEL_PATH.steps)),
        ("activation rate", partial(q.activation_rate, target, everyone)),
    ]
    timings = []
    for name, work in cases:
        timings.append(Timing(name, _time(runs, work)))
        _log(f"{label}: {name} {timings[-1].median_ms:.1f} ms")
    return timings


def _rebuild_with_key(store: ChdbStore, order_by: str) -> None:
    """Copy the table into one sorted by ``order_by`` and swap it in (the original stays as ``events_main``)."""
    main_key = sql.CREATE_EVENTS.split("ORDER BY ", 1)[1].strip()
    ddl = sql.CREATE_EVENTS.replace(f"CREATE TABLE IF NOT EXISTS {sql.TABLE}", "CREATE TABLE events_alt").replace(
        f"ORDER BY {main_key}", f"ORDER BY ({order_by})"
    )
    store.dangerous_raw_sql(ddl, {})
    store.dangerous_raw_sql(f"INSERT INTO events_alt SELECT * FROM {sql.TABLE}", {})
    store.dangerous_raw_sql("OPTIMIZE TABLE events_alt FINAL", {})
    store.dangerous_raw_sql(f"RENAME TABLE {sql.TABLE} TO events_main, events_alt TO {sql.TABLE}", {})


def _time(runs: int, work: Callable[[], Any]) -> list[float]:
    work()  # warm-up
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        out.append((time.perf_counter() - began) * 1000)
    return out


def run_analytics_benchmark(
    *,
    events: int = 10_000_000,
    tenants: int = 5,
    weeks: int = 26,
    runs: int = 5,
    data_dir: Path = Path(".firstmile"),
    keep: bool = False,
    seed: int = 7,
    compare_key: str | None = COMPARE_KEY,
) -> AnalyticsBenchReport:
    """Run the benchmark (see the module docstring); a few minutes for 10M events on two cores."""
    if events < tenants * 1000:
        raise ValueError("at least 1,000 events per tenant")
    data_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-analytics-", dir=data_dir))
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ids = [bench_tenant(uuid.UUID(int=i + 1, version=4)) for i in range(tenants)]
    store = ChdbStore(folder)
    try:
        store.ensure_schema()
        engine = str(store.dangerous_raw_sql("SELECT version() AS v", {})[0]["v"])
        _log(f"loading {events:,} events for {tenants} tenants into {folder}")
        generate_s = load_s = 0.0
        loaded = 0
        for n, tenant in enumerate(ids):
            share = events // tenants + (1 if n < events % tenants else 0)
            rows = _tenant_rows(tenant, share, weeks, end, seed + n)
            while True:
                began = time.perf_counter()
                batch = list(islice(rows, BATCH))
                generate_s += time.perf_counter() - began
                if not batch:
                    break
                began = time.perf_counter()
                store.bulk_load(batch)
                load_s += time.perf_counter() - began
                loaded += len(batch)
                if loaded % 1_000_000 < BATCH:
                    _log(f"{loaded:,} / {events:,} events (generate {generate_s:.0f} s, load {load_s:.0f} s)")
        began = time.perf_counter()
        store.dangerous_raw_sql(f"OPTIMIZE TABLE {sql.TABLE} FINAL", {})
        optimize_s = time.perf_counter() - began
        _log(f"optimized in {optimize_s:.1f} s")

        target = ids[0]
        stats = store.dangerous_raw_sql(
            f"SELECT count() AS n, uniqExact(user_id) AS users FROM {sql.TABLE} WHERE tenant_id = {{tenant:UUID}}",
            {"tenant": str(target)},
        )[0]
        report = AnalyticsBenchReport(
            events=loaded,
            tenants=tenants,
            weeks=weeks,
            runs=runs,
            tenant_events=int(stats["n"]),
            tenant_users=int(stats["users"]),
            generate_s=generate_s,
            load_s=load_s,
            optimize_s=optimize_s,
            insert_dedupe_rows_per_s=0.0,
            insert_dedupe_batch=10_000,
            engine=engine,
        )
        ranges = {
            f"whole history ({weeks} weeks)": Filters(end - timedelta(weeks=weeks), end + timedelta(hours=1)),
            "last 30 days (the API's default range)": Filters(end - timedelta(days=30), end + timedelta(hours=1)),
        }
        key = sql.CREATE_EVENTS.split("ORDER BY ", 1)[1].strip().strip("()")
        for label, everyone in ranges.items():
            report.timings[f"Key ({key}), {label}"] = _time_queries(store, target, everyone, runs, label)
        if compare_key is not None:
            began = time.perf_counter()
            _rebuild_with_key(store, compare_key)
            _log(f"rebuilt the table ordered by ({compare_key}) in {time.perf_counter() - began:.1f} s")
            for label, everyone in ranges.items():
                timings = _time_queries(store, target, everyone, runs, f"{compare_key}: {label}")
                report.timings[f"Key ({compare_key}), {label}"] = timings
            store.dangerous_raw_sql(f"RENAME TABLE {sql.TABLE} TO events_compared, events_main TO {sql.TABLE}", {})

        fresh_tenant = bench_tenant(uuid.UUID(int=tenants + 1, version=4))
        fresh = list(_tenant_rows(fresh_tenant, 40_000, weeks, end, seed + 100))
        began = time.perf_counter()
        inserted = processed = 0
        for start in range(0, len(fresh), 7_500):
            batch = fresh[max(0, start - 2_500) : start + 7_500]  # the previous batch's last 2,500 again
            inserted += store.insert(batch)
            processed += len(batch)
        elapsed = time.perf_counter() - began
        if inserted != len(fresh):
            raise RuntimeError(f"dedupe insert stored {inserted} of {len(fresh)} new events")
        report.insert_dedupe_rows_per_s = processed / elapsed
        return report
    finally:
        store.close()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
