"""The SQL both analytics stores run, byte for byte: DDL, inserts, erasure, row encoding.

The chdb adapter (embedded) and the ClickHouse adapter (production) import every
statement from here, so the engine in tests runs exactly what production runs.
Query parameters use ClickHouse's server-side ``{name:Type}`` placeholders; their
values are encoded here once (:func:`encode_params`) in the text form the server
parses, the same form ``clickhouse-connect`` produces for the same Python values.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

import msgspec

from firstmile.analytics.rows import (
    ACTIVATED,
    EXPOSED,
    NUDGE_UNSUBSCRIBED,
    STEP_COMPLETED,
    STUCK,
    AnalyticsEvent,
)

TABLE = "events"

COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "event_id",
    "event_type",
    "event_name",
    "user_id",
    "anonymous_id",
    "occurred_at",
    "received_at",
    "path_key",
    "path_version",
    "step_id",
    "variant",
    "persona",
    "properties",
)
"""The ``events`` columns, in the order rows are encoded; names exactly as :class:`AnalyticsEvent`."""

CREATE_EVENTS = f"""
CREATE TABLE IF NOT EXISTS {TABLE}
(
    tenant_id UUID,
    event_id UUID,
    event_type LowCardinality(String),
    event_name LowCardinality(String),
    user_id String,
    anonymous_id String,
    occurred_at DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'),
    path_key LowCardinality(String),
    path_version UInt32,
    step_id LowCardinality(String),
    variant LowCardinality(String),
    persona LowCardinality(String),
    properties String CODEC(ZSTD(3)),
    INDEX ix_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX ix_user_id user_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, event_type, occurred_at, user_id, event_id)
""".strip()
"""The events table. Why this key: docs/analytics.md, "Schema"."""

EXPERIMENT_USERS = "experiment_users"

EXPERIMENT_USERS_COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "experiment_id",
    "user_id",
    "variant",
    "exposed_at",
    "activated_at",
    "steps",
    "stuck_at",
    "unsubscribed_at",
)
"""The ``experiment_users`` columns, in the order :mod:`firstmile.analytics.experiment_users` encodes rows."""

_AT = "Nullable(DateTime64(3, 'UTC'))"

CREATE_EXPERIMENT_USERS = f"""
CREATE TABLE IF NOT EXISTS {EXPERIMENT_USERS}
(
    tenant_id UUID,
    experiment_id LowCardinality(String),
    user_id String,
    variant SimpleAggregateFunction(max, LowCardinality(String)),
    exposed_at SimpleAggregateFunction(min, {_AT}),
    activated_at SimpleAggregateFunction(min, {_AT}),
    steps SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    stuck_at SimpleAggregateFunction(max, {_AT}),
    unsubscribed_at SimpleAggregateFunction(max, {_AT})
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, experiment_id, user_id)
""".strip()
"""One row per (tenant, experiment, exposed user), folded from ``events`` on insert: what the experiment analysis
reads (``FINAL``) instead of regrouping the tenant's events by user. Every column is an idempotent aggregate (min,
max, set union), so a row folded twice (a redelivered event) changes nothing. ``variant`` is ``max``, not ``any``:
the rows folded from outcomes carry an empty variant, and ``max`` keeps the exposure's whichever part merges first.
Why, the fold and its ordering assumption: :mod:`firstmile.analytics.experiment_users`, docs/analytics.md."""

DDL: tuple[str, ...] = (CREATE_EVENTS, CREATE_EXPERIMENT_USERS)

INSERT_FORMAT = "JSONCompactEachRow"
INSERT_EVENTS_PREFIX = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)})"
INSERT_EVENTS = f"{INSERT_EVENTS_PREFIX} FORMAT {INSERT_FORMAT}"
"""The insert both stores send, followed by the rows of :func:`encode_rows` (chdb streams it with
``send_insert(INSERT_EVENTS_PREFIX, INSERT_FORMAT)``, clickhouse-connect's ``raw_insert`` builds the
same statement from :data:`TABLE`, :data:`COLUMNS` and :data:`INSERT_FORMAT`)."""

INSERT_EXPERIMENT_USERS_PREFIX = f"INSERT INTO {EXPERIMENT_USERS} ({', '.join(EXPERIMENT_USERS_COLUMNS)})"
INSERT_EXPERIMENT_USERS = f"{INSERT_EXPERIMENT_USERS_PREFIX} FORMAT {INSERT_FORMAT}"

ERASE_USER = f"DELETE FROM {TABLE} WHERE tenant_id = {{tenant:UUID}} AND user_id = {{user:String}}"
"""Lightweight delete of one user's rows (GDPR erasure): hidden at once, purged by the next merges."""

ERASE_EXPERIMENT_USER = (
    f"DELETE FROM {EXPERIMENT_USERS} WHERE tenant_id = {{tenant:UUID}} AND user_id = {{user:String}}"
)
"""The same for the user's rows of ``experiment_users`` (erasure runs both)."""

ERASE_STATEMENTS: tuple[str, ...] = (ERASE_USER, ERASE_EXPERIMENT_USER)

LOOKUP_EXPOSURES = (
    f"SELECT experiment_id, user_id, toString(assumeNotNull(min(exposed_at))) AS first_exposed FROM {EXPERIMENT_USERS} "
    "WHERE tenant_id = {tenant:UUID} AND user_id IN {users:Array(String)} AND exposed_at IS NOT NULL "
    "GROUP BY experiment_id, user_id"
)
"""The stored exposures of some users of one tenant (the fold's one lookup per tenant and batch): the earliest
exposure per experiment, as ``YYYY-MM-DD hh:mm:ss.fff`` text (:func:`timestamp`'s form)."""

EXPERIMENT_USERS_EXISTS = f"EXISTS TABLE {EXPERIMENT_USERS}"
EVENTS_PRESENT = f"SELECT count() AS n FROM (SELECT 1 FROM {TABLE} LIMIT 1)"
"""``ensure_schema``: was ``experiment_users`` there before, and are there events to rebuild it from."""


def rebuild_experiment_users(*, tenant: bool) -> str:
    """``INSERT … SELECT`` of ``experiment_users`` from ``events``: for one tenant (``{tenant:UUID}``) or all.

    Per user, the logic of the analysis before the fold: per experiment the exposure ``t0`` (the fold keeps the
    earliest), the first activation at or after it, the distinct steps completed at or after it, the latest
    stuck flag and unsubscribe at or after it. One row per exposure event (an experiment exposed twice gives two
    rows, whose aggregates fold into the earliest exposure's answers), so running it again, or over rows the
    sink already folded, changes nothing.
    """
    scope = "tenant_id = {tenant:UUID} AND " if tenant else ""
    kinds = ", ".join(f"'{k}'" for k in (EXPOSED, ACTIVATED, STEP_COMPLETED, STUCK, NUDGE_UNSUBSCRIBED))
    return f"""
INSERT INTO {EXPERIMENT_USERS} ({", ".join(EXPERIMENT_USERS_COLUMNS)})
SELECT tenant_id, exposure.1, user_id, exposure.2, exposure.3 AS t0,
    arrayFirstOrNull(x -> x >= t0, activations),
    arrayDistinct(arrayMap(s -> s.2, arrayFilter(s -> s.1 >= t0, completions))),
    if(stuck_last >= t0, stuck_last, NULL),
    if(unsubscribed_last >= t0, unsubscribed_last, NULL)
FROM (
    SELECT tenant_id, user_id,
        arrayDistinct(groupArrayIf((toString(event_name), toString(variant), occurred_at),
            event_type = '{EXPOSED}')) AS exposures,
        arraySort(groupArrayIf(occurred_at, event_type = '{ACTIVATED}')) AS activations,
        groupArrayIf((occurred_at, toString(step_id)), event_type = '{STEP_COMPLETED}') AS completions,
        maxIfOrNull(occurred_at, event_type = '{STUCK}') AS stuck_last,
        maxIfOrNull(occurred_at, event_type = '{NUDGE_UNSUBSCRIBED}') AS unsubscribed_last
    FROM {TABLE}
    WHERE {scope}event_type IN ({kinds})
    GROUP BY tenant_id, user_id
    HAVING countIf(event_type = '{EXPOSED}') > 0
)
ARRAY JOIN exposures AS exposure""".strip()


REBUILD_EXPERIMENT_USERS = rebuild_experiment_users(tenant=True)
REBUILD_ALL_EXPERIMENT_USERS = rebuild_experiment_users(tenant=False)


def rebuild_statement(tenant: uuid.UUID | None) -> tuple[str, dict[str, ParamValue]]:
    """The rebuild of one tenant (with its ``tenant`` parameter), or of every tenant (``None``)."""
    if tenant is None:
        return REBUILD_ALL_EXPERIMENT_USERS, {}
    return REBUILD_EXPERIMENT_USERS, {"tenant": str(tenant)}


def count_experiment_users(tenant: uuid.UUID | None) -> str:
    """How many exposed (tenant, experiment, user) the table holds for one tenant (``{tenant:UUID}``) or all: what
    ``rebuild_experiment_users`` reports."""
    scope = "tenant_id = {tenant:UUID} AND " if tenant is not None else ""
    return (
        f"SELECT count() AS n FROM (SELECT DISTINCT tenant_id, experiment_id, user_id FROM {EXPERIMENT_USERS} "
        f"WHERE {scope}exposed_at IS NOT NULL)"
    )


TENANT_SETTING = "SQL_firstmile_tenant"
"""Custom setting (ClickHouse's default ``custom_settings_prefixes`` is ``SQL_``) carrying the tenant of a
query to the row policy; the ClickHouse adapter sends it with every tenant-scoped statement."""


def _row_policy(table: str) -> str:
    return (
        f"CREATE ROW POLICY IF NOT EXISTS tenant_isolation ON {table} "
        f"USING tenant_id = toUUID(getSetting('{TENANT_SETTING}')) TO {{role}}"
    )


ROW_POLICY = _row_policy(TABLE)
"""The second wall on ClickHouse (``{role}``: the role the API and the sink connect as). A statement
without the setting fails (``getSetting`` of an unknown setting) instead of seeing every tenant."""

ROW_POLICIES: tuple[str, ...] = (ROW_POLICY, _row_policy(EXPERIMENT_USERS))
"""The same policy on every table that holds tenants' rows: ``events`` and ``experiment_users``."""

COUNT_TENANT = f"SELECT count() AS events FROM {TABLE} WHERE tenant_id = {{tenant:UUID}}"

ParamValue = str | int | list[str]
"""What a query parameter may be: text (UUIDs and datetimes as their text form), an integer, a list of text."""

Params = Mapping[str, ParamValue]

_MUST_ESCAPE = {"\\": "\\\\", "'": "\\'", "`": "\\`", "\t": "\\\t", "\n": "\\\n"}


def _escape(value: str) -> str:
    if not any(c in value for c in _MUST_ESCAPE):
        return value
    return "".join(_MUST_ESCAPE.get(c, c) for c in value)


def encode_param(value: ParamValue) -> str:
    """The text ClickHouse parses for one ``{name:Type}`` value (``param_<name>`` on the HTTP interface).

    Identical to what ``clickhouse-connect`` sends for the same Python value
    (``tests/unit/test_analytics_stores.py`` checks it against its binder).
    """
    if isinstance(value, bool):
        raise TypeError("boolean query parameters are not supported; pass 0 or 1")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list):
        return "[" + ", ".join(f"'{_escape(item)}'" for item in value) + "]"
    raise TypeError(f"unsupported query parameter type {type(value).__name__}")


def encode_params(params: Params) -> dict[str, str]:
    return {name: encode_param(value) for name, value in params.items()}


def timestamp(value: datetime) -> str:
    """``YYYY-MM-DD hh:mm:ss.fff`` in UTC: a ``DateTime64(3, 'UTC')`` value (sub-milliseconds truncated)."""
    if value.tzinfo is None:
        raise ValueError(f"analytics timestamps must be timezone-aware, got {value.isoformat()}")
    u = value.astimezone(UTC)
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d} {u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond // 1000:03d}"
    )


_ENCODER = msgspec.json.Encoder()


def _row(e: AnalyticsEvent) -> tuple[object, ...]:
    return (
        e.tenant_id,
        e.event_id,
        e.event_type,
        e.event_name,
        e.user_id,
        e.anonymous_id,
        timestamp(e.occurred_at),
        timestamp(e.received_at),
        e.path_key,
        e.path_version,
        e.step_id,
        e.variant,
        e.persona,
        e.properties,
    )


def encode_rows(rows: Iterable[AnalyticsEvent]) -> bytes:
    """``JSONCompactEachRow`` lines for :data:`INSERT_EVENTS` (one JSON array per row, :data:`COLUMNS` order)."""
    return _ENCODER.encode_lines([_row(e) for e in rows])


def unique_rows(rows: Sequence[AnalyticsEvent]) -> list[AnalyticsEvent]:
    """The batch with repeated ``(tenant_id, event_id)`` dropped (first occurrence kept)."""
    seen: set[tuple[uuid.UUID, uuid.UUID]] = set()
    unique: list[AnalyticsEvent] = []
    for row in rows:
        key = (row.tenant_id, row.event_id)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def scalar(rows: Sequence[Mapping[str, object]], *, default: int) -> int:
    """The one value of a one-row, one-column answer as an integer; ``default`` when there is no row."""
    if not rows:
        return default
    [value] = rows[0].values()
    return int(str(value))


def decode_json_each_row(data: bytes | str) -> list[dict[str, object]]:
    """Parse ``JSONEachRow`` output: both stores read results in this format."""
    raw = data.encode() if isinstance(data, str) else data
    return [msgspec.json.decode(line) for line in raw.splitlines() if line.strip()]
