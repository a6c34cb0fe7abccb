"""The data-subject export returns everything held, the same document from the API and the admin UI,
and a failed analytics read exports and audits nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import Query
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sink import AnalyticsSink
from firstmile.analytics.sql import Params
from firstmile.analytics.store import AnalyticsStoreError
from firstmile.app import create_app
from firstmile.events.envelope import Envelope
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant

Client = AsyncTestClient[Litestar]
BASE = "http://127.0.0.1:8000"
SCOPES = ("onboarding:write", "events:write", "users:admin", "audit:read")


@pytest.fixture(scope="module")
async def api(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as client:
        yield client


async def _relay_to_analytics(admin_engine: AsyncEngine, store: ChdbStore, tenant: TenantFixture) -> int:
    """What the relay and the analytics sink do in production: the tenant's outbox rows into the store."""
    async with admin_engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT event_id, tenant_id, event_type, occurred_at, payload, partition_key FROM outbox"
                    " WHERE tenant_id = :t ORDER BY id"
                ),
                {"t": tenant.id},
            )
        ).all()
    envelopes = [Envelope(r[0], r[1], r[2], r[3], dict(r[4]), r[5]) for r in rows]
    dead = await AnalyticsSink(store).handle(envelopes)
    assert dead == []
    return len(envelopes)


async def _identify_and_track(api: Client, tenant: TenantFixture, user: str) -> None:
    batch = [
        {"type": "identify", "messageId": f"{user}-i", "userId": user, "traits": {"email": f"{user}@example.com"}},
        {"type": "track", "messageId": f"{user}-t", "userId": user, "event": "Project Created"},
    ]
    response = await api.post("/v1/events", json={"batch": batch}, headers=tenant.headers)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 2


async def test_a_user_known_only_through_events_is_exported(
    api: Client, admin_engine: AsyncEngine, analytics_store: ChdbStore
) -> None:
    tenant = await new_tenant(admin_engine, scopes=SCOPES)
    await _identify_and_track(api, tenant, "ev-1")  # no start: no profile, no progress
    assert await _relay_to_analytics(admin_engine, analytics_store, tenant) == 2
    response = await api.get("/v1/users/ev-1/export", headers=tenant.headers)
    assert response.status_code == 200, response.text  # it was 404 "nothing is held"
    document = response.json()
    assert document["profile"] is None and document["onboarding"] is None
    assert document["personal_data_key"] is True  # the identify sealed the email under the user's key
    assert sorted(e["event_type"] for e in document["events"]) == ["identify", "track"]
    assert "ev-1@example.com" not in response.text  # the event's personal data stays sealed in the store
    nobody = await api.get("/v1/users/nobody-at-all/export", headers=tenant.headers)
    assert nobody.status_code == 404


async def _admin_session(api: Client, slug: str) -> dict[str, Any]:
    api.cookies.clear()
    token = api.app.state.container.admin_auth.bootstrap_token(slug, "owner")
    redeemed = await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert redeemed.status_code == 303, redeemed.text
    me: dict[str, Any] = (await api.get("/admin/api/me")).json()
    return me


def _comparable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without what differs between two exports of the same data (when, and the audit of the first)."""
    kept = {k: v for k, v in document.items() if k not in ("exported_at", "decisions")}
    kept["decisions"] = [d for d in document["decisions"] if d["payload"].get("action") != "users.export"]
    return kept


async def test_the_admin_ui_exports_the_same_document_as_the_api(
    api: Client, admin_engine: AsyncEngine, analytics_store: ChdbStore
) -> None:
    tenant = await new_tenant(admin_engine, scopes=SCOPES)
    started = await api.post(
        "/v1/onboarding/start",
        json={"user_id": "both-1", "traits": {"persona": "developer", "email": "both@example.com"}},
        headers=tenant.headers,
    )
    assert started.status_code == 201, started.text
    await _identify_and_track(api, tenant, "both-1")
    await _relay_to_analytics(admin_engine, analytics_store, tenant)
    from_api = (await api.get("/v1/users/both-1/export", headers=tenant.headers)).json()
    await _admin_session(api, tenant.slug)
    from_admin = await api.get("/admin/api/users/both-1/export")
    assert from_admin.status_code == 200, from_admin.text
    assert sorted(e["event_type"] for e in from_api["events"]) == ["identify", "onboarding.started", "track"]
    assert _comparable(from_admin.json()) == _comparable(from_api)
    assert from_admin.json()["profile"]["personal"] == {"email": "both@example.com"}


class BrokenAnalytics:
    """An analytics store whose queries fail (the engine is down); writes are accepted."""

    def ensure_schema(self) -> None:
        return None

    def insert(self, rows: Sequence[AnalyticsEvent]) -> int:
        return len(rows)

    def bulk_load(self, rows: Sequence[AnalyticsEvent]) -> int:
        return len(rows)

    def run(self, tenant: uuid.UUID, query: Query) -> list[dict[str, Any]]:
        raise AnalyticsStoreError("clickhouse: connection refused")

    def dangerous_raw_sql(self, sql: str, params: Params) -> list[dict[str, Any]]:
        raise AnalyticsStoreError("clickhouse: connection refused")

    def erase_user(self, tenant_id: uuid.UUID, user_id: str) -> None:
        return None

    def rebuild_experiment_users(self, tenant: uuid.UUID | None = None) -> int:
        return 0

    def close(self) -> None:
        return None


async def test_an_export_the_analytics_store_cannot_complete_is_refused_and_not_audited(
    database: Database, admin_engine: AsyncEngine
) -> None:
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=BrokenAnalytics())
    tenant = await new_tenant(admin_engine, scopes=SCOPES)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        started = await client.post("/v1/onboarding/start", json={"user_id": "x-1"}, headers=tenant.headers)
        assert started.status_code == 201, started.text
        response = await client.get("/v1/users/x-1/export", headers=tenant.headers)
        assert response.status_code == 503, response.text
        assert response.json()["type"].endswith("/analytics-unavailable")
        assert response.headers["retry-after"]
    async with admin_engine.connect() as conn:
        exports = (
            await conn.execute(
                text("SELECT count(*) FROM audit_entries WHERE tenant_id = :t AND payload ->> 'action' = :a"),
                {"t": tenant.id, "a": "users.export"},
            )
        ).scalar_one()
    assert exports == 0  # it was audited before the analytics query could fail
