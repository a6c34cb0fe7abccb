"""The production analytics store: a ClickHouse server through ``clickhouse-connect``.

Runs the statements of :mod:`firstmile.analytics.sql` unchanged (the ones the
chdb adapter runs), sends rows in the same ``JSONCompactEachRow`` bytes, and
reads results in the same ``JSONEachRow`` format through the same parser.

On top of the tenant filter every query carries, a row policy on each table
(:data:`firstmile.analytics.sql.ROW_POLICIES`: ``events`` and ``experiment_users``)
limits the connecting role to the tenant named in the custom setting
``SQL_firstmile_tenant``, which this adapter sends with every tenant-scoped statement
(taken from the ``tenant`` parameter that the query builder puts in every query; the
fold's lookup and a one-tenant rebuild send it too).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

from firstmile.analytics import experiment_users, sql
from firstmile.analytics.queries import Query
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.store import AnalyticsStoreError, check_scope

log = logging.getLogger("firstmile.analytics")

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
        created = not sql.scalar(self._query(sql.EXPERIMENT_USERS_EXISTS, {}, None), default=1)
        try:
            for statement in sql.DDL:
                self._client.command(statement)
            if self._policy_role is not None:
                for policy in sql.ROW_POLICIES:
                    self._client.command(policy.format(role=self._policy_role))
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc
        if created and sql.scalar(self._query(sql.EVENTS_PRESENT, {}, None), default=0):
            # An upgrade: fold the events already stored. Across tenants, which the row policy forbids to a role
            # it binds: then the operator runs `firstmile analytics rebuild-experiments` (docs/analytics.md).
            try:
                self.rebuild_experiment_users()
            except AnalyticsStoreError as exc:
                log.warning(
                    "experiment_users was created over existing events but not rebuilt (%s); the experiment "
                    "analysis misses earlier exposures until `firstmile analytics rebuild-experiments` runs",
                    exc,
                )

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        if not rows:
            return 0
        unique = sql.unique_rows(rows)
        self._insert(unique)
        self._fold(unique)
        return len(unique)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        self._insert(rows)
        self._fold(rows)
        return len(rows)

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        statement, params = sql.rebuild_statement(tenant)
        scope = None if tenant is None else str(tenant)
        try:
            self._client.command(statement, parameters=params or None, settings=self._settings(scope))
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc
        return sql.scalar(self._query(sql.count_experiment_users(tenant), params, scope), default=0)

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
            for statement in sql.ERASE_STATEMENTS:
                self._client.command(
                    statement, parameters={"tenant": tenant, "user": user_id}, settings=self._settings(tenant)
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

    def _fold(self, rows: Sequence[AnalyticsEvent]) -> None:
        folded = experiment_users.fold(rows, self._exposures)
        if not folded:
            return
        try:
            self._client.raw_insert(
                sql.EXPERIMENT_USERS,
                list(sql.EXPERIMENT_USERS_COLUMNS),
                experiment_users.encode(folded),
                fmt=sql.INSERT_FORMAT,
            )
        except Exception as exc:
            raise AnalyticsStoreError(f"clickhouse: {exc}") from exc

    def _exposures(self, tenant: uuid.UUID, users: list[str]) -> list[dict[str, Any]]:
        scope = str(tenant)
        return self._query(sql.LOOKUP_EXPOSURES, {"tenant": scope, "users": users}, scope)
