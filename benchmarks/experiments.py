"""``python -m benchmarks experiments``: allocation per second, the experiment analysis query over millions of
exposures (chdb), and the ingest cost of what makes that query fast, each against a baseline measured in the same
run (docs/benchmarks.md, issue 16).

1. **Allocation** (:func:`firstmile.experiments.allocation.allocate_all`: the holdout, three running
   experiments, two of them sharing a layer, one with targeting, 50% traffic), for ``users`` user ids in one
   process, against computing one SHA-256 of the same length per user (the irreducible part: every
   allocation draws at least one hash).
2. **Analysis query** (:meth:`AnalyticsQueries.experiment`: per variant, exposed users and what they did
   after their exposure, read from ``experiment_users``) over ``exposures`` exposures of one experiment, with
   activations for about a third of the users and one to three step completions each, generated inside chdb
   (``INSERT … SELECT FROM numbers(N)``) in a fresh store, then ``OPTIMIZE TABLE events FINAL``; then
   ``experiment_users`` built from those events (:meth:`ChdbStore.rebuild_experiment_users`, timed) and
   merged (``OPTIMIZE TABLE experiment_users FINAL``, timed). Timed as well: the analysis over the unmerged
   parts the rebuild left (merges held off), and the query before ``experiment_users`` (:data:`QUERY_BEFORE`,
   regrouping the tenant's events by user), whose answer the new one must equal. Baseline: the exposures per
   variant alone (``count()`` grouped by variant over the events), the scan any answer over the events needs.
   One warm-up, then the median of ``runs``.
3. **Ingest** (:meth:`ChdbStore.insert`, what the analytics sink runs) of ``ingest_rows`` realistic rows (starts,
   product events, step completions, activations; half the users exposed) for new users of the same tenant, in
   batches of 2,000 (the consumer's batch), in time order: with the fold into ``experiment_users`` (a lookup of the
   batch's users among the tenant's exposed users, and the folded rows) against the events-only insert
   (``ChdbStore._insert``) of the same rows, alternating, two rounds each. Then the analysis again, over the parts
   the sink's batches added (as the background merges left them), and the fold's lookup alone for 1,000 users.

Returns a markdown report; progress goes to stderr.
"""

from __future__ import annotations

import hashlib
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from firstmile.analytics import sql
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import AnalyticsQueries, ExperimentArm, build_experiment
from firstmile.analytics.rows import ACTIVATED, EXPOSED, STARTED, STEP_COMPLETED, AnalyticsEvent
from firstmile.experiments.allocation import Experiment, Rule, Variant, allocate_all
from firstmile.kit.scope import OPERATOR_CLI

EXPERIMENT = "quickstart-vs-analytics"
START = datetime(2026, 11, 1, tzinfo=UTC)
INGEST_BATCH = 2_000
"""Rows per insert in the ingest measurement: the Kafka consumer's default batch."""
LOOKUP_USERS = 1_000
"""Users in one timed lookup: about the distinct users of a 2,000-row batch."""

_EXPOSED = f"event_type = '{EXPOSED}' AND event_name = {{experiment:String}}"
QUERY_BEFORE = f"""
SELECT variant, count() AS users, countIf(converted) AS n_converted, countIf(activated) AS n_activated,
    avgIf(tta_s, activated) AS tta_mean, varSampIf(tta_s, activated) AS tta_var,
    avg(steps) AS steps_mean, varSamp(steps) AS steps_var, countIf(stuck) AS n_stuck,
    countIf(unsubscribed) AS n_unsubscribed
FROM (
    SELECT user_id, anyIf(variant, {_EXPOSED}) AS variant, minIf(occurred_at, {_EXPOSED}) AS t0,
        maxIf(occurred_at, event_type = 'onboarding.activated') >= t0 AS converted,
        maxIf(occurred_at, event_type = 'onboarding.activated') >= t0 AS activated,
        if(activated, dateDiff('millisecond', t0, arrayMin(arrayFilter(x -> x >= t0,
            groupArrayIf(occurred_at, event_type = 'onboarding.activated')))) / 1000.0, 0.0) AS tta_s,
        toFloat64(arrayCount(x -> x.1 >= t0,
            arrayDistinct(groupArrayIf((occurred_at, event_id), event_type = 'onboarding.step_completed')))) AS steps,
        maxIf(occurred_at, event_type = 'onboarding.stuck') >= t0 AS stuck,
        maxIf(occurred_at, event_type = 'nudge.unsubscribed') >= t0 AS unsubscribed
    FROM {sql.TABLE}
    WHERE tenant_id = {{tenant:UUID}} AND event_type IN ('experiment.exposed', 'onboarding.activated',
        'onboarding.step_completed', 'onboarding.stuck', 'nudge.unsubscribed')
        AND occurred_at >= {{since:DateTime64(3, 'UTC')}}
    GROUP BY user_id
    HAVING countIf({_EXPOSED}) > 0
)
GROUP BY variant
ORDER BY variant""".strip()
"""The analysis before ``experiment_users`` (``build_experiment`` as issue 16 first wrote it, activation as the
primary metric): it regroups the tenant's events by user at query time. Kept to time it against the new one."""


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
class Ingest:
    rows: int
    folded_s: tuple[float, ...]  # insert() with the fold, one entry per round
    events_s: tuple[float, ...]  # the events-only insert of the same rows
    folded_rows: int  # experiment_users rows one round wrote

    @property
    def folded_per_second(self) -> float:
        return self.rows / statistics.median(self.folded_s)

    @property
    def events_per_second(self) -> float:
        return self.rows / statistics.median(self.events_s)


def _seconds(values: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


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
    build_s: float
    pairs: int
    unmerged_parts: int
    optimize_s: float
    query: Timing
    unmerged: Timing
    before: Timing
    baseline: Timing
    ingest: Ingest
    after_ingest: Timing
    parts_after_ingest: int
    lookup: Timing

    def markdown(self, command: str) -> str:
        a, h = self.allocation, self.hashing
        q, u, o, b = self.query, self.unmerged, self.before, self.baseline
        i = self.ingest
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
                f"| analysis over {self.exposures:,} exposures ({self.rows:,} rows of the tenant), from "
                f"experiment_users merged: **{q.median_ms:,.0f} ms** median of {len(q.runs_ms)} | exposures per "
                f"variant alone (events): {b.median_ms:,.0f} ms | {q.median_ms / b.median_ms:.1f}x |",
                f"| the same over the {self.unmerged_parts} unmerged parts the rebuild wrote (merges held off): "
                f"{u.median_ms:,.0f} ms | {b.median_ms:,.0f} ms | {u.median_ms / b.median_ms:.1f}x |",
                f"| the same after the ingest below ({self.parts_after_ingest} parts: the merged one and what the "
                f"sink's batches added since, as background merges left them): {self.after_ingest.median_ms:,.0f} ms | "
                f"{b.median_ms:,.0f} ms | {self.after_ingest.median_ms / b.median_ms:.1f}x |",
                f"| the fold's lookup alone: {LOOKUP_USERS:,} users (half of them exposed) among the tenant's "
                f"{self.exposures:,} exposed users: {self.lookup.median_ms:,.0f} ms median of "
                f"{len(self.lookup.runs_ms)} | | |",
                f"| the query before (the events regrouped by user): {o.median_ms:,.0f} ms | {b.median_ms:,.0f} ms | "
                f"{o.median_ms / b.median_ms:.1f}x |",
                f"| ingest of {i.rows:,} rows (half the users exposed) in batches of {INGEST_BATCH:,}, with the fold: "
                f"**{i.folded_per_second:,.0f} rows/s** ({i.folded_rows:,} experiment_users rows) | the events-only "
                f"insert: {i.events_per_second:,.0f} rows/s | {i.folded_per_second / i.events_per_second:.1%} |",
                "",
                f"Events generated inside chdb and merged in {self.load_s:.1f} s; experiment_users rebuilt from "
                f"them in {self.build_s:.1f} s ({self.pairs:,} exposed users, {self.unmerged_parts} parts) and "
                f"merged (`OPTIMIZE TABLE experiment_users FINAL`) in {self.optimize_s:.1f} s. Ingest rounds (s): "
                f"with the fold {_seconds(i.folded_s)}; events only {_seconds(i.events_s)}. "
                "Targets (issue 16): at least 100,000 allocations/s in one process; the analysis over 10 million "
                "exposures in at most 1 s on chdb.",
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


def _same(new: list[dict[str, Any]], before: list[dict[str, Any]]) -> None:
    """The analysis from experiment_users answers what the query before answered (floats to 1e-9)."""
    if [r["variant"] for r in new] != [r["variant"] for r in before]:
        raise RuntimeError(f"variants differ: {new} vs {before}")
    for a, b in zip(new, before, strict=True):
        for key, x in a.items():
            y = b[key]
            if isinstance(x, float) or isinstance(y, float):
                same = x is not None and y is not None and abs(float(x) - float(y)) <= 1e-9 * max(1.0, abs(float(y)))
            else:
                same = str(x) == str(y)
            if not same:
                raise RuntimeError(f"{key} differs for {a['variant']}: {x} (experiment_users) vs {y} (events)")


def _ingest_rows(tenant: uuid.UUID, prefix: str, count: int, spread: int) -> list[AnalyticsEvent]:
    """Starts, product events, 1-3 step completions, activations for ~35%; every other user exposed; time order.
    The user ids fall among the ``spread`` users already stored (``u-<n>``), as new users' random ids would, so a
    batch's lookup reads that many places of the table, not one corner of it."""
    rng = random.Random(16)
    rows: list[AnalyticsEvent] = []

    def add(kind: str, user: str, at: datetime, **fields: str) -> None:
        name = fields.pop("name", "")
        rows.append(AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=kind, event_name=name,
                                   user_id=user, anonymous_id="", occurred_at=at, received_at=at,
                                   path_key="developer-quickstart", path_version=1, **fields))  # fmt: skip

    n = 0
    while len(rows) < count:
        user, n = f"u-{rng.randrange(spread)}-{prefix}-{n}", n + 1
        at = START + timedelta(seconds=rng.randrange(0, 7 * 86_400))
        add(STARTED, user, at, persona="developer")
        if n % 2 == 0:
            add(
                EXPOSED,
                user,
                at + timedelta(seconds=1),
                name=EXPERIMENT,
                variant=rng.choice(["quickstart", "analytics"]),
            )
        for k in range(rng.randrange(1, 4)):
            add(STEP_COMPLETED, user, at + timedelta(minutes=10 * (k + 1)), step_id=f"step-{k}")
        if rng.random() < 0.35:
            add(ACTIVATED, user, at + timedelta(seconds=rng.randrange(3_600, 172_800)), step_id="send-first-event")
        for _ in range(rng.randrange(0, 4)):
            add("track", user, at + timedelta(seconds=rng.randrange(0, 86_400)), name="Report Viewed",
                properties='{"plan": "pro"}')  # fmt: skip
    del rows[count:]
    rows.sort(key=lambda r: r.occurred_at)
    return rows


def _ingest(store: ChdbStore, tenant: uuid.UUID, count: int, spread: int, rounds: int = 2) -> Ingest:
    """``store.insert`` (events and the fold) against the events-only insert, batches of :data:`INGEST_BATCH`."""

    def stored() -> int:
        [row] = store.dangerous_raw_sql(f"SELECT count() AS n FROM {sql.EXPERIMENT_USERS}", {})
        return int(row["n"])

    folded_s: list[float] = []
    events_s: list[float] = []
    folded_rows = 0
    for r in range(rounds):
        for fold in (False, True):
            rows = _ingest_rows(tenant, f"ingest-{'f' if fold else 'e'}{r}", count, spread)
            held = stored()
            began = time.perf_counter()
            for start in range(0, len(rows), INGEST_BATCH):
                batch = rows[start : start + INGEST_BATCH]
                if fold:
                    store.insert(batch)
                else:
                    store._insert(sql.unique_rows(batch))  # insert() without the fold: the baseline
            (folded_s if fold else events_s).append(time.perf_counter() - began)
            if fold:
                folded_rows = stored() - held
    return Ingest(count, tuple(folded_s), tuple(events_s), folded_rows)


def _lookups(store: ChdbStore, tenant: uuid.UUID, spread: int, runs: int) -> tuple[float, ...]:
    """The fold's lookup (:data:`~firstmile.analytics.sql.LOOKUP_EXPOSURES`) of a batch's worth of users: half of
    them stored exposed users, half not, spread over the table; a fresh set each run."""
    rng = random.Random(7)
    out = []
    for i in range(runs + 1):
        users = [f"u-{rng.randrange(spread)}" for _ in range(LOOKUP_USERS // 2)]
        users += [f"u-{rng.randrange(spread)}-none-{i}" for _ in range(LOOKUP_USERS - len(users))]
        began = time.perf_counter()
        store.dangerous_raw_sql(sql.LOOKUP_EXPOSURES, {"tenant": str(tenant), "users": users})
        out.append((time.perf_counter() - began) * 1000)
    return tuple(out[1:])  # the first: warm-up


def _parts(store: ChdbStore) -> int:
    """Active parts of experiment_users: what ``FINAL`` merges at read time where their key ranges overlap."""
    [row] = store.dangerous_raw_sql(
        "SELECT count() AS n FROM system.parts WHERE active AND database = currentDatabase() AND table = {t:String}",
        {"t": sql.EXPERIMENT_USERS},
    )
    return int(row["n"])


def run_experiments_benchmark(
    *, users: int, exposures: int, runs: int, data_dir: Path, ingest_rows: int = 200_000
) -> Report:
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
        params: sql.Params = {"tenant": str(tenant), "experiment": EXPERIMENT, "since": sql.timestamp(since)}
        _log(f"timing the query before experiment_users ({runs} runs)")
        before = _time(runs, lambda: store.dangerous_raw_sql(QUERY_BEFORE, params))
        answer_before = store.dangerous_raw_sql(QUERY_BEFORE, params)

        _log("building experiment_users from the events")
        store.dangerous_raw_sql(f"SYSTEM STOP MERGES {sql.EXPERIMENT_USERS}", {})
        began = time.perf_counter()
        pairs = store.rebuild_experiment_users(tenant)
        build_s = time.perf_counter() - began
        parts = _parts(store)
        _log(f"timing the analysis over {parts} unmerged parts ({runs} runs)")
        unmerged = _time(runs, lambda: queries.experiment(tenant, EXPERIMENT, None, since))
        _same(store.run(tenant, build_experiment(tenant, EXPERIMENT, None, since)), answer_before)
        store.dangerous_raw_sql(f"SYSTEM START MERGES {sql.EXPERIMENT_USERS}", {})
        began = time.perf_counter()
        store.dangerous_raw_sql(f"OPTIMIZE TABLE {sql.EXPERIMENT_USERS} FINAL", {})
        optimize_s = time.perf_counter() - began

        _log(f"timing the analysis ({runs} runs)")
        query = _time(runs, lambda: queries.experiment(tenant, EXPERIMENT, None, since))
        arms: tuple[ExperimentArm, ...] = queries.experiment(tenant, EXPERIMENT, None, since)
        if sum(a.users for a in arms) != exposures:
            raise RuntimeError(f"the query saw {sum(a.users for a in arms)} exposed users, not {exposures}")
        _same(store.run(tenant, build_experiment(tenant, EXPERIMENT, None, since)), answer_before)
        baseline_sql = (
            f"SELECT variant, count() AS n FROM {sql.TABLE} WHERE tenant_id = {{tenant:UUID}} AND "
            f"event_type = 'experiment.exposed' AND event_name = '{EXPERIMENT}' GROUP BY variant"
        )
        baseline = _time(runs, lambda: store.dangerous_raw_sql(baseline_sql, {"tenant": str(tenant)}))

        _log(f"timing the ingest of {ingest_rows:,} rows with and without the fold")
        ingest = _ingest(store, tenant, ingest_rows, exposures)
        parts_after = _parts(store)
        _log(f"timing the analysis over the {parts_after} parts after the ingest ({runs} runs)")
        after_ingest = _time(runs, lambda: queries.experiment(tenant, EXPERIMENT, None, since))
        lookup = _lookups(store, tenant, exposures, runs)
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
    return Report(users, one, allocation, hashing, allocated, exposures, rows, load_s, build_s, pairs,
                  parts, optimize_s, Timing("analysis", query), Timing("unmerged", unmerged), Timing("before", before),
                  Timing("exposures per variant", baseline), ingest, Timing("after ingest", after_ingest),
                  parts_after, Timing("lookup", lookup))  # fmt: skip
