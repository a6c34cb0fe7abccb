"""`firstmile dev` (and `firstmile analytics seed`) asks ClickHouse whether the demo tenant has rows before
seeding it. With a row-policy role, ClickHouse only shows a statement the rows of the tenant named in its
``SQL_firstmile_tenant`` setting; the count used to bind the tenant as ``t``, so the setting was never
sent and the count was refused (or empty) under the policy."""

from __future__ import annotations

import uuid
from typing import Any

from firstmile.analytics.cli import seed_tenant
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.kit.scope import OperatorContext


class CountingClient:
    """A clickhouse-connect client that answers every query with a count of 5 and records the calls."""

    def __init__(self) -> None:
        self.queries: list[dict[str, Any]] = []

    def raw_query(self, statement: str, **kwargs: Any) -> bytes:
        self.queries.append({"statement": statement, **kwargs})
        return b'{"n":"5"}\n'

    def close(self) -> None:
        return None


def test_the_seed_check_runs_under_the_tenant_row_policy() -> None:
    client = CountingClient()
    store = ClickHouseStore(client, policy_role="firstmile_analytics")
    tenant = OperatorContext("operator:test").tenant(uuid.uuid4())
    assert seed_tenant(store, tenant, [], "demo", users=10, only_if_empty=True) == 0  # 5 rows held: no seeding
    [count] = client.queries
    assert count["settings"] == {"SQL_firstmile_tenant": str(tenant)}
    assert count["parameters"] == {"tenant": str(tenant)}
    assert "tenant_id = {tenant:UUID}" in count["statement"]
