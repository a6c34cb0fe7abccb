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

from firstmile.analytics.rows import AnalyticsEvent

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

DDL: tuple[str, ...] = (CREATE_EVENTS,)

INSERT_FORMAT = "JSONCompactEachRow"
INSERT_EVENTS_PREFIX = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)})"
INSERT_EVENTS = f"{INSERT_EVENTS_PREFIX} FORMAT {INSERT_FORMAT}"
"""The insert both stores send, followed by the rows of :func:`encode_rows` (chdb streams it with
``send_insert(INSERT_EVENTS_PREFIX, INSERT_FORMAT)``, clickhouse-connect's ``raw_insert`` builds the
same statement from :data:`TABLE`, :data:`COLUMNS` and :data:`INSERT_FORMAT`)."""

ERASE_USER = f"DELETE FROM {TABLE} WHERE tenant_id = {{tenant:UUID}} AND user_id = {{user:String}}"
"""Lightweight delete of one user's rows (GDPR erasure): hidden at once, purged by the next merges."""

TENANT_SETTING = "SQL_firstmile_tenant"
"""Custom setting (ClickHouse's default ``custom_settings_prefixes`` is ``SQL_``) carrying the tenant of a
query to the row policy; the ClickHouse adapter sends it with every tenant-scoped statement."""

ROW_POLICY = (
    f"CREATE ROW POLICY IF NOT EXISTS tenant_isolation ON {TABLE} "
    f"USING tenant_id = toUUID(getSetting('{TENANT_SETTING}')) TO {{role}}"
)
"""The second wall on ClickHouse (``{role}``: the role the API and the sink connect as). A statement
without the setting fails (``getSetting`` of an unknown setting) instead of seeing every tenant."""

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


def decode_json_each_row(data: bytes | str) -> list[dict[str, object]]:
    """Parse ``JSONEachRow`` output: both stores read results in this format."""
    raw = data.encode() if isinstance(data, str) else data
    return [msgspec.json.decode(line) for line in raw.splitlines() if line.strip()]
