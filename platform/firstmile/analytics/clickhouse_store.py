"""The production analytics store: a ClickHouse server through ``clickhouse-connect``.

Runs the statements of :mod:`firstmile.analytics.sql` unchanged (the ones the
chdb adapter runs), sends rows in the same ``JSONCompactEachRow`` bytes, and
reads results in the same ``JSONEachRow`` format through the same parser.

On top of the tenant filter every query carries, a row policy
(:data:`firstmile.analytics.sql.ROW_POLICY`) limits the connecting role to the
tenant named in the custom setting ``SQL_firstmile_tenant``, which this adapter
sends with every tenant-scoped statement (taken from the ``tenant`` parameter
that the query builder puts in every query).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from firstmile.analytics import sql
from firstmile.analytics.queries import Query
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.store import AnalyticsStoreError, check_scope

_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _connect(url: str) -> Any:
    import clickhouse_connect

    # No session: a clickhouse-connect session serialises queries; the API runs several at once.
    return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)


class ClickHouseStore:
    """:class:`~firstmile.analytics.store.AnalyticsStore` on a ClickHouse server.

    ``client`` is a ``clickhouse_connect`` client, or a URL (``http[s]://user:password@host:8123/database``)
    to connect to as :meth:`connect` does.
    ``policy_role``: the role :meth:`ensure_schema` binds the row policy to (None:
    no policy is created, e.g. when an operator manages it). ``tenant_setting``:
    send ``SQL_firstmile_tenant`` with each statement (turn off only for engines
    without custom settings, such as clickhouse-connect's in-process chdb
    interface that the contract tests use).
    """

    def __init__(
        self, client: Any, *, policy_role: str | None = "firstmile_analytics", tenant_setting: bool = True
    ) -> None:
        if policy_role is not None and not _ROLE.match(policy_role):
            raise ValueError(f"invalid ClickHouse role name {policy_role!r}")
        self._client = _connect(client) if isinstance(client, str) else client
        self._policy_role = policy_role
        self._tenant_setting = tenant_setting

    @classmethod
    def connect(cls, url: str, *, policy_role: str | None = "firstmile_analytics") -> ClickHouseStore:
        """A store on the server at ``url`` (``http[s]://user:password@host:8123/database``)."""
        return cls(_connect(url), policy_role=policy_role)

    def _settings(self, tenant: str | None) -> dict[str, str] | None:
        if tenant is None or not self._tenant_setting:
            return None
        return {sql.TENANT_SETTING: tenant}

    def ensure_schema(self) -> None:
        try:
            for statement in sql.DDL:
                self._client.command(statement)
            if self._policy_role is not None:
                self._client.command(sql.ROW_POLICY.format(role=self._policy_role))
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        if not rows:
            return 0
        unique = sql.unique_rows(rows)
        self._insert(unique)
        return len(unique)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        self._insert(rows)
        return len(rows)

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        check_scope(tenant, query)
        # the row policy's setting names the tenant the query is run for, whatever its parameters are called
        return self._query(query.sql, query.params, str(tenant))

    def dangerous_raw_sql(self, statement: str, params: sql.Params) -> list[dict[str, Any]]:
        tenant = params.get("tenant")
        return self._query(statement, params, tenant if isinstance(tenant, str) else None)

    def _query(self, statement: str, params: sql.Params, tenant: str | None) -> list[dict[str, Any]]:
        try:
            data = self._client.raw_query(
                statement, parameters=dict(params) or None, settings=self._settings(tenant), fmt="JSONEachRow"
            )
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc
        return sql.decode_json_each_row(data)

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        tenant = str(tenant_id)
        try:
            self._client.command(
                sql.ERASE_USER, parameters={"tenant": tenant, "user": user_id}, settings=self._settings(tenant)
            )
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def _insert(self, rows: Sequence[AnalyticsEvent]) -> None:
        if not rows:
            return
        try:
            self._client.raw_insert(sql.TABLE, list(sql.COLUMNS), sql.encode_rows(rows), fmt=sql.INSERT_FORMAT)
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc
