"""The admin UI's destinations page (docs/admin-ui.md#destinations) over HTTP: a tenant whose webhook destination went
through the real pipeline (a delivered event, a pending one, a dead letter) shown with the service's numbers; the
empty state; who may read and who may act; enable, disable with a reason and replay, each audited with the admin as
actor; the refusals (a role without ``destinations:manage``, a forged CSRF token, a malformed or unknown name, a
missing reason) answered with a problem, audited where the other admin actions are, and changing nothing."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.service import AdminAuth
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.destinations import service
from firstmile.destinations.policy import RetryPolicy
from firstmile.destinations.registry import OfficialAdapters
from firstmile.destinations.worker import DestinationDelivery
from tests.conftest import PEPPER, REGION, Database, make_settings
from tests.factories import manifest_for
from tests.support.destinations_pipeline import NAME, WORKER, Pipeline, delivered_pending_dead, webhook_tenant
from tests.support.webhook_receiver import WebhookReceiver

BASE = "http://testserver.local"
PROBLEMS = "https://firstmile.dev/problems/"
Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
async def admin_app(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
        api.follow_redirects = False  # the actions' 303 is checked, then followed by hand
        yield api


async def sign_in(api: Client, slug: str, role: str) -> str:
    """A fresh session of ``role`` through a bootstrap link; its CSRF token."""
    api.cookies.clear()
    auth: AdminAuth = api.app.state.container.admin_auth
    redeemed = await api.post("/admin/bootstrap/redeem", data={"token": auth.bootstrap_token(slug, role)},
                              follow_redirects=False)  # fmt: skip
    assert redeemed.status_code == 303, redeemed.text
    token: str = (await api.get("/admin/api/me")).json()["csrf_token"]
    return token


def held(found: service.DestinationStatus) -> tuple[Any, ...]:
    """What an action could change (not the lag, which grows)."""
    return found.pending, found.dead, found.delivered, found.disabled_at, found.disabled_reason, found.dead_letters


async def audit(admin: AsyncEngine, tenant: Any, *kinds: str) -> list[dict[str, Any]]:
    """The tenant's entries of ``kinds``, queued or sequenced, oldest first."""
    async with admin.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind, actor, subject, payload::text, created_at FROM audit_queue WHERE tenant_id = :t"
                 " AND kind = ANY(:k) UNION ALL SELECT kind, actor, subject, payload::text, created_at"
                 " FROM audit_entries WHERE tenant_id = :t AND kind = ANY(:k) ORDER BY 5"),
            {"t": tenant, "k": list(kinds)},
        )  # fmt: skip
        return [{"kind": r[0], "actor": r[1], "subject": r[2], "payload": json.loads(r[3])} for r in rows]


def cell(page: str, testid: str) -> str:
    """The text of the first element with ``data-testid=testid`` (a number, a short value)."""
    start = page.index(f'data-testid="{testid}"')
    return page[page.index(">", start) + 1 : page.index("<", start)]


async def test_the_page_shows_each_destination_with_the_services_numbers_and_who_may_read_it(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    with WebhookReceiver() as receiver:
        pipeline = await webhook_tenant(admin_engine, app_engine, receiver, "dp")
        await delivered_pending_dead(admin_app, pipeline, receiver)
    found = await pipeline.status()
    assert (found.delivered, found.pending, found.dead) == (1, 1, 1)

    for role in ("analyst", "editor", "owner"):
        await sign_in(admin_app, pipeline.slug, role)
        page = await admin_app.get("/admin/destinations")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'data-testid="nav-destinations" aria-current="page"' in page.text
        assert 'data-destination="hooks"' in page.text and cell(page.text, "kind") == "webhook"
        assert (cell(page.text, "delivered"), cell(page.text, "pending"), cell(page.text, "dead")) == ("1", "1", "1")
        assert 'data-state="ok"' in page.text and found.last_success_at is not None
        assert cell(page.text, "last-success") == found.last_success_at.strftime("%Y-%m-%d %H:%M:%S")
        assert "the endpoint answered 422: unknown event type" in page.text  # the dead letter's reason
        [dead] = found.dead_letters
        assert f'data-status="dead" data-event-id="{dead.event_id}"' in page.text
        lag = float(page.text.split('data-testid="lag" data-seconds="')[1].split('"')[0])
        assert found.oldest_pending_age_s is not None and 0 <= lag <= found.oldest_pending_age_s + 1
        # the actions are for editors and owners
        assert ('data-testid="replay"' in page.text) is (role != "analyst")
        assert ('data-testid="disable"' in page.text) is (role != "analyst")

    await sign_in(admin_app, pipeline.slug, "viewer")
    assert 'href="/admin/destinations"' not in (await admin_app.get("/admin/")).text
    refused = await admin_app.get("/admin/destinations")
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["required_permission"] == "destinations:read"
    as_page = await admin_app.get("/admin/destinations", headers={"Accept": "text/html"})
    assert as_page.status_code == 403 and "destinations:read" in as_page.text  # the problem page, for people
    forbidden = await audit(admin_engine, pipeline.tenant_id, "admin.forbidden")
    assert [(f["subject"], f["payload"]) for f in forbidden] == 2 * [
        ("GET /admin/destinations", {"permission": "destinations:read", "roles": ["viewer"]})]  # fmt: skip


async def test_a_tenant_without_destinations_is_told_how_to_add_one(
    admin_app: Client, admin_engine: AsyncEngine
) -> None:
    slug = f"dn-{secrets.token_hex(4)}"
    await apply_manifest(admin_engine, manifest_for(slug, REGION))
    await sign_in(admin_app, slug, "analyst")
    page = await admin_app.get("/admin/destinations")
    assert page.status_code == 200 and 'data-testid="destinations-empty"' in page.text
    assert "<code>destinations:</code> section" in page.text and "docs/destinations.md" in page.text
    assert 'data-testid="destination"' not in page.text


async def test_an_editor_disables_enables_and_replays_and_every_refusal_changes_nothing(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    with WebhookReceiver() as receiver:
        pipeline = await webhook_tenant(admin_engine, app_engine, receiver, "da")
        await delivered_pending_dead(admin_app, pipeline, receiver)
    before = await pipeline.status()
    url = f"/admin/destinations/{NAME}"

    # roles without destinations:manage
    for role in ("viewer", "analyst"):
        csrf = await sign_in(admin_app, pipeline.slug, role)
        for action in ("enable", "disable", "replay"):
            refused = await admin_app.post(f"{url}/{action}", data={"csrf_token": csrf, "reason": "x"})
            assert refused.status_code == 403, (role, action)
            assert refused.json()["required_permission"] == "destinations:manage"

    csrf = await sign_in(admin_app, pipeline.slug, "editor")
    me = (await admin_app.get("/admin/api/me")).json()["user"]
    forged = await admin_app.post(f"{url}/replay", data={"csrf_token": "guess"})
    assert forged.status_code == 403 and forged.json()["type"] == PROBLEMS + "csrf-failed"
    missing = await admin_app.post(f"{url}/disable", data={"reason": "maintenance"})
    assert missing.status_code == 403 and missing.json()["type"] == PROBLEMS + "csrf-failed"
    for bad in ("Not_A_Name", "x" * 300, "-hooks"):
        answer = await admin_app.post(f"/admin/destinations/{bad}/replay", data={"csrf_token": csrf})
        assert answer.status_code == 400 and answer.json()["type"] == PROBLEMS + "validation-error", bad
    for action in ("enable", "disable", "replay"):
        answer = await admin_app.post(f"/admin/destinations/ghost/{action}", data={"csrf_token": csrf, "reason": "x"})
        assert answer.status_code == 404 and answer.json()["type"] == PROBLEMS + "destination-not-found"
    for reason in ("", "   ", "x" * 501):
        answer = await admin_app.post(f"{url}/disable", data={"csrf_token": csrf, "reason": reason})
        assert answer.status_code == 400 and answer.json()["type"] == PROBLEMS + "validation-error"
    assert held(await pipeline.status()) == held(before)  # nothing refused changed anything
    assert [a["payload"]["action"] for a in await audit(admin_engine, pipeline.tenant_id, "destination")] == [
        "destination.added", "destination.credentials.set"]  # fmt: skip

    # disable, with a reason: shown with who did it
    done = await admin_app.post(f"{url}/disable", data={"csrf_token": csrf, "reason": " planned  maintenance "})
    assert done.status_code == 303 and done.headers["location"] == "/admin/destinations?done=disabled&name=hooks"
    page = (await admin_app.get(done.headers["location"])).text
    assert "hooks is disabled: its events keep queueing" in page and 'data-state="disabled"' in page
    assert f"disabled by admin:{me['subject']} at" in page and ">planned maintenance<" in page
    assert 'data-testid="enable"' in page and 'data-testid="disable"' not in page
    again = await admin_app.post(f"{url}/disable", data={"csrf_token": csrf, "reason": "twice"})
    assert again.headers["location"] == "/admin/destinations?done=already-disabled&name=hooks"
    assert (await pipeline.status()).disabled_reason == "planned maintenance"

    enabled = await admin_app.post(f"{url}/enable", data={"csrf_token": csrf})
    assert enabled.status_code == 303 and enabled.headers["location"].endswith("done=enabled&name=hooks")
    assert (await pipeline.status()).disabled_at is None

    replayed = await admin_app.post(f"{url}/replay", data={"csrf_token": csrf})
    assert replayed.headers["location"] == "/admin/destinations?done=replayed&name=hooks&events=1"
    page = (await admin_app.get(replayed.headers["location"])).text
    assert "1 dead letters of hooks are queued again." in page
    assert (cell(page, "pending"), cell(page, "dead")) == ("2", "0") and 'data-testid="replay"' not in page
    after = await pipeline.status()
    assert (after.pending, after.dead, after.delivered) == (2, 0, 1)

    # the audit log: the admin as actor of each change; the refusals where the other admin actions put them
    actor = f"admin:{me['subject']}"
    changes = [a for a in await audit(admin_engine, pipeline.tenant_id, "destination") if a["actor"] == actor]
    assert [(a["subject"], a["payload"]["action"]) for a in changes] == [
        ("destination:hooks", "destination.disabled"), ("destination:hooks", "destination.enabled"),
        ("destination:hooks", "destination.replay")]  # fmt: skip
    assert changes[0]["payload"]["reason"] == "planned maintenance" and changes[2]["payload"]["events"] == 1
    refusals = await audit(admin_engine, pipeline.tenant_id, "admin.forbidden", "admin.csrf_refused")
    forbidden = [r for r in refusals if r["kind"] == "admin.forbidden"]
    assert len(forbidden) == 6 and {r["payload"]["permission"] for r in forbidden} == {"destinations:manage"}
    assert {r["subject"] for r in forbidden} == {f"POST /admin/destinations/{{name}}/{a}"
                                                 for a in ("enable", "disable", "replay")}  # fmt: skip
    assert [r["payload"]["reason"] for r in refusals if r["kind"] == "admin.csrf_refused"] == [
        "missing_or_wrong_token", "missing_or_wrong_token"]  # fmt: skip


async def test_a_destination_the_worker_disabled_says_so(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    with WebhookReceiver() as receiver:
        pipeline: Pipeline = await webhook_tenant(admin_engine, app_engine, receiver, "dw")
        await pipeline.start(admin_app, "w1")
        await pipeline.feed()
        for _ in range(10):
            receiver.respond(503)
        worker = DestinationDelivery(app_engine, pipeline.keyring, OfficialAdapters(timeout_s=2), skip_s=0,
                                     policy=RetryPolicy(0.01, 0.02, 50), disable_after=timedelta(0))  # fmt: skip
        try:
            done = await worker.deliver_destination(WORKER.tenant(pipeline.tenant_id), NAME)
        finally:
            await worker.close()
        assert done.disabled
    await sign_in(admin_app, pipeline.slug, "owner")
    page = (await admin_app.get("/admin/destinations")).text
    assert 'data-state="disabled"' in page and "disabled automatically, after sustained failure, at" in page
    assert "every attempt failed since" in page and "the endpoint answered 503" in page
    assert 'data-testid="enable"' in page
