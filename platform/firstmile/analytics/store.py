"""The analytics store port: what the sink, the queries and erasure need from the events engine.

Two adapters: :class:`firstmile.analytics.chdb_store.ChdbStore` (the ClickHouse
engine in-process; embedded mode and tests) and
:class:`firstmile.analytics.clickhouse_store.ClickHouseStore` (a ClickHouse
server through ``clickhouse-connect``). Both run the statements of
:mod:`firstmile.analytics.sql` unchanged.

Every method is synchronous and safe to call from several threads; async callers
use ``asyncio.to_thread`` (the :class:`~firstmile.analytics.service.AnalyticsService`
runs queries on its own small thread pool).

Reads fail closed: :meth:`AnalyticsStore.run` takes the tenant and a
:class:`~firstmile.analytics.queries.Query` built for it (the builder puts the tenant
filter on every read of the events table) and refuses one built for another tenant.
The one way around that, :meth:`AnalyticsStore.dangerous_raw_sql`, is named so that a
reviewer sees it; it is for operators' tools and benchmarks, and no request path calls it
(``tests/unit/test_architecture.py`` checks).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sql import Params

if TYPE_CHECKING:
    from firstmile.analytics.queries import Query


class AnalyticsStoreError(RuntimeError):
    """The store failed to run a statement (engine error, connection lost, timeout)."""


class WrongTenantQueryError(AssertionError):
    """A query built for one tenant was run for another (a bug in the caller)."""


def check_scope(tenant: uuid.UUID, query: Query) -> None:
    """Refuse a query built for another tenant than the one it runs for."""
    if query.tenant != tenant:
        raise WrongTenantQueryError("the query was built for another tenant than the one it runs for")


@runtime_checkable
class AnalyticsStore(Protocol):
    def ensure_schema(self) -> None:
        """Create the ``events`` and ``experiment_users`` tables (and, on ClickHouse, the row policies) if missing.
        Idempotent. When it creates ``experiment_users`` over stored events (an upgrade), it rebuilds it from them
        (:meth:`rebuild_experiment_users` for every tenant; on ClickHouse, where the row policy forbids that to the
        connecting role, it logs a warning instead: run ``firstmile analytics rebuild-experiments``)."""

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        """Store the rows, repeats of one ``(tenant_id, event_id)`` within the batch once; returns how many.

        There is no lookup of what is stored already: a redelivered event is written again,
        ``ReplacingMergeTree`` folds the copies at its next merge (same sorting key), and every
        query counts an event once meanwhile (:mod:`firstmile.analytics.queries`).

        Exposures and the outcomes of exposed users are also folded into ``experiment_users``
        (:mod:`firstmile.analytics.experiment_users`): one lookup per tenant of the batch when it
        holds outcomes (of the users' stored exposures), none otherwise; idempotent as well.
        """

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        """Insert the rows as they are, repeats within the batch included (benchmarks, seeding); folded as by
        :meth:`insert`."""

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        """(Re)compute ``experiment_users`` from ``events`` for one tenant, or every tenant (``None``): an upgrade,
        or a repair after an outcome overtook its exposure. Idempotent (the table's aggregates fold the rows it
        writes into what is there). Returns how many exposed (experiment, user) pairs the scope holds afterwards.
        On ClickHouse, every tenant at once needs a user the row policy does not bind."""

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        """Run a query built for ``tenant`` (server-side ``{name:Type}`` parameters); rows as dicts of JSON values.

        Raises :class:`WrongTenantQueryError` when the query was built for another tenant.
        """

    def dangerous_raw_sql(self, sql: str, params: Params) -> list[dict[str, Any]]:
        """Run any statement as written, with no tenant scoping: operator tools and benchmarks only."""

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        """Delete every row of one user of one tenant (GDPR erasure), in ``events`` and ``experiment_users``."""

    def close(self) -> None:
        """Release the engine or connection; the store is unusable afterwards."""
