"""Drop-off alerts end to end (docs/alerts.md): synthetic onboarding in the real analytics store (chdb) with a known
shift raises exactly the expected alert in PostgreSQL, once; no shift raises none; a failing store skips the tenant's
check and logs it; the alert e-mail arrives in Mailpit with its exact content and the webhook reaches a loopback
server with a valid Standard Webhooks signature; a failed delivery is retried at the next run; an analyst
acknowledges an alert (audited) and a viewer is refused."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.service import AdminAuth
from firstmile.analytics.alerting import WATCHER, DropoffWatch
from firstmile.analytics.alerts import AlertRule, email_subject, verify_webhook, webhook_secret_bytes, windows
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.clickhouse_store import ClickHouseStore
from firstmile.analytics.lazy import LazyStore
from firstmile.analytics.service import AnalyticsService
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.nudges.email_smtp import SmtpChannel
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.wiring.adapters import ChannelMailer
from tests.conftest import PEPPER, REGION, Database, Mailpit, make_settings, sequenced
from tests.factories import demo_document, manifest_for
from tests.support.dropoff import BASELINE, PATH, SHIFTED, STEPS, seed
from tests.support.loopback_http import LoopbackHTTPServer
from tests.support.serving import free_port

pytestmark = pytest.mark.xdist_group("mailpit")

SECRET_ENV = "FM_TEST_ALERT_WEBHOOK_SECRET"
SECRET = "whsec_" + "dGVzdC1zZWNyZXQtZm9yLWZpcnN0bWlsZS1hbGVydHM="  # base64 of a test secret
BASE = "http://testserver.local"
PROBLEMS = "https://firstmile.dev/problems/"
Client = AsyncTestClient[Litestar]


# ---------------------------------------------------------------------- the receivers


@dataclass
class Hook:
    """A loopback HTTP server that records each POST and answers with the next of ``statuses`` (then 204)."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
def hook() -> Iterator[Hook]:
    port = free_port()
    state = Hook(f"http://127.0.0.1:{port}/firstmile-alerts")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(state.statuses.pop(0) if state.statuses else 204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = LoopbackHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def mail_to(mailpit: Mailpit, address: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        found = (await http.get("/api/v1/search", params={"query": f"to:{address}"})).raise_for_status().json()
        return [(await http.get(f"/api/v1/message/{m['ID']}")).raise_for_status().json() for m in found["messages"]]


# ---------------------------------------------------------------------- tenants and the watch


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    slug: str
    email: str


async def alerting_tenant(admin_engine: AsyncEngine, hook_url: str | None = None, **alerts: Any) -> Tenant:
    slug = f"t-{secrets.token_hex(5)}"
    email = f"ops-{uuid.uuid4().hex[:8]}@example.test"
    doc = demo_document()
    doc["alerts"] = {"email": [email], **alerts}
    if hook_url is not None:
        doc["alerts"]["webhook"] = {"url": hook_url, "secret_env": SECRET_ENV}
    result = await apply_manifest(admin_engine, manifest_for(slug, REGION, doc))
    return Tenant(result.tenant_id, slug, email)


def watch(engine: AsyncEngine, store: Any, mailpit: Mailpit, **overrides: Any) -> DropoffWatch:
    analytics = overrides.pop("analytics", None) or AnalyticsService(store, 30.0)
    mailer = ChannelMailer(SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, "alerts@firstmile.test"))
    return DropoffWatch(engine, analytics, OnboardingService(CatalogCache()), AlertRule(), mailer=mailer,
                        public_url="https://firstmile.test", environ={SECRET_ENV: SECRET}, **overrides)  # fmt: skip


async def rows(admin_engine: AsyncEngine, tenant: uuid.UUID) -> list[dict[str, Any]]:
    async with admin_engine.connect() as conn:
        result = await conn.execute(
            text("SELECT * FROM analytics_alerts WHERE tenant_id = :t ORDER BY created_at"), {"t": tenant}
        )
        return [dict(r._mapping) for r in result]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------- the check


async def test_a_known_shift_raises_exactly_its_alert_once_and_delivers_it(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore, mailpit: Mailpit, hook: Hook
) -> None:
    now = datetime.now(UTC)
    tenant = await alerting_tenant(admin_engine, hook.url)
    seed(analytics_store, tenant.id, now, SHIFTED)
    w = windows(now, AlertRule())
    checker = watch(app_engine, analytics_store, mailpit)
    assert WATCHER.tenant(tenant.id) in await checker.tenants()
    raised_before = metric("firstmile_dropoff_alerts_total", direction="rose")

    check = await checker.check_tenant(WATCHER.tenant(tenant.id), now)

    assert check.outcome == "checked" and check.slug == tenant.slug
    [path] = [p for p in check.paths if p.path_key == PATH]
    assert (path.started_baseline, path.started_recent) == (400, 200)
    assert [(s.step_id, s.alert) for s in path.shifts] == [(step, step == "install-sdk") for step in STEPS]
    assert not any(s.alert for p in check.paths if p.path_key != PATH for s in p.shifts)  # no users, no alert
    [alert] = check.raised
    assert (alert.path_key, alert.path_version, alert.step_id, alert.step_title, alert.direction) == (
        PATH, 1, "install-sdk", "Install the SDK", "rose")  # fmt: skip
    counts = (alert.baseline_users, alert.baseline_dropped, alert.recent_users, alert.recent_dropped)
    assert counts == (360, 72, 180, 90)  # install-sdk: 20% of the 360 who created a key, then 50% of 180
    assert (alert.baseline_start, alert.window_start, alert.window_end) == (
        w.baseline_start, w.recent_start, w.recent_end)  # fmt: skip
    assert metric("firstmile_dropoff_alerts_total", direction="rose") == raised_before + 1
    assert (check.delivered, check.failed_deliveries) == (2, 0)

    [stored] = await rows(admin_engine, tenant.id)
    assert stored["id"] == alert.id and stored["step_id"] == "install-sdk" and stored["acknowledged_at"] is None
    assert stored["delivered_at"] is not None
    assert {k: v["status"] for k, v in stored["delivery"].items()} == {
        f"email:{tenant.email}": "delivered", f"webhook:{hook.url}": "delivered"}  # fmt: skip

    # the e-mail, as Mailpit received it
    [mail] = await mail_to(mailpit, tenant.email)
    name = f"Tenant {tenant.slug}"
    assert mail["Subject"] == email_subject(alert, name)
    assert mail["Subject"] == f"[Firstmile] {name}: drop-off rose at 'Install the SDK' ({PATH} v1)"
    assert mail["MessageID"] == f"alert-{alert.id.hex}@firstmile.test"
    day = "%Y-%m-%d %H:%M UTC"
    assert mail["Text"].replace("\r\n", "\n").rstrip("\n") == (
        f"Drop-off at step 'Install the SDK' (install-sdk) of path {PATH} version 1 rose from 20.0% to 50.0%.\n\n"
        f"Recent: 90 of 180 users who reached the step before did not reach it (onboarding starts "
        f"{w.recent_start:{day}} to {w.recent_end:{day}}).\n"
        f"Baseline: 72 of 360 (starts {w.baseline_start:{day}} to {w.recent_start:{day}}).\n"
        f"Two-proportion z-test: z = {alert.z:.2f}, p = {alert.p_value:.2g}.\n\n"
        f"Tenant: {name}\n"
        f"Dashboard: https://firstmile.test/admin/analytics?path={PATH}\n"
        f"Alert: {alert.id}"
    )
    assert alert.z == pytest.approx(7.171, abs=0.001)  # (0.5 - 0.2) / sqrt(0.3 * 0.7 * (1/360 + 1/180))

    # the webhook, as the loopback server received it: signed with the secret the manifest names
    [(headers, body)] = hook.received
    assert headers["content-type"] == "application/json" and headers["webhook-id"] == str(alert.id)
    assert verify_webhook(webhook_secret_bytes(SECRET), headers, body, now=int(time.time()))
    assert not verify_webhook(b"another secret", headers, body, now=int(time.time()))
    payload = json.loads(body)
    assert payload["type"] == "analytics.dropoff_alert"
    data = payload["data"]
    assert (data["id"], data["tenant"], data["path"], data["step_id"]) == (str(alert.id), tenant.slug, PATH,
                                                                          "install-sdk")  # fmt: skip
    assert (data["baseline"]["users"], data["baseline"]["dropped"], data["baseline"]["rate"]) == (360, 72, 0.2)
    assert (data["recent"]["users"], data["recent"]["dropped"], data["recent"]["rate"]) == (180, 90, 0.5)

    # run again in the same hour (a redelivered run), and in the next hours: nothing new, nothing sent again
    for later in (now, now + timedelta(minutes=1), now + timedelta(hours=1), now + timedelta(days=6)):
        again = await checker.check_tenant(WATCHER.tenant(tenant.id), later)
        assert again.outcome == "checked" and again.raised == [] and again.delivered == 0
    assert len(await rows(admin_engine, tenant.id)) == 1
    assert len(await mail_to(mailpit, tenant.email)) == 1 and len(hook.received) == 1


async def test_no_shift_raises_no_alert(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore, mailpit: Mailpit
) -> None:
    now = datetime.now(UTC)
    tenant = await alerting_tenant(admin_engine)
    seed(analytics_store, tenant.id, now, BASELINE)
    check = await watch(app_engine, analytics_store, mailpit).check_tenant(WATCHER.tenant(tenant.id), now)
    assert check.outcome == "checked" and check.raised == []
    [path] = [p for p in check.paths if p.path_key == PATH]
    assert (path.started_baseline, path.started_recent) == (400, 200)
    assert all(s.p_value is not None and not s.alert for s in path.shifts)  # tested, and in line
    assert await rows(admin_engine, tenant.id) == [] and await mail_to(mailpit, tenant.email) == []


@pytest.mark.parametrize("failure", ["store down", "timeout"])
async def test_a_failing_store_skips_the_check_and_logs_it(
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    analytics_store: ChdbStore,
    mailpit: Mailpit,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    now = datetime.now(UTC)
    tenant = await alerting_tenant(admin_engine)
    seed(analytics_store, tenant.id, now, SHIFTED)  # a shift the check would see
    if failure == "store down":  # a ClickHouse server that is not there: every query fails to connect
        down = LazyStore(lambda: ClickHouseStore.connect(f"http://127.0.0.1:{free_port()}/firstmile"))
        analytics = AnalyticsService(down, 5.0)
    else:  # the real store, answering slower than the deadline
        analytics = AnalyticsService(analytics_store, 1e-6)
    skipped_before = metric("firstmile_dropoff_checks_total", outcome="skipped")
    caplog.set_level(logging.WARNING, logger="firstmile.analytics.alerts")
    try:
        check = await watch(app_engine, None, mailpit, analytics=analytics).check_tenant(WATCHER.tenant(tenant.id), now)
    finally:
        analytics.close(close_store=False)
    assert check.outcome == "skipped" and check.raised == []
    assert ("timed out" if failure == "timeout" else "failed") in check.reason
    assert metric("firstmile_dropoff_checks_total", outcome="skipped") == skipped_before + 1
    [line] = [r for r in caplog.records if r.getMessage().startswith("drop-off check skipped")]
    assert line.levelno == logging.WARNING and str(tenant.id) in line.getMessage()
    assert await rows(admin_engine, tenant.id) == [] and await mail_to(mailpit, tenant.email) == []
    # the next run, with the store back, raises the alert the failed one skipped
    recovered = await watch(app_engine, analytics_store, mailpit).check_tenant(WATCHER.tenant(tenant.id), now)
    assert [a.step_id for a in recovered.raised] == ["install-sdk"]


async def test_a_failed_delivery_is_retried_at_the_next_run_and_the_alert_kept(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore, mailpit: Mailpit, hook: Hook
) -> None:
    now = datetime.now(UTC)
    tenant = await alerting_tenant(admin_engine, hook.url)
    seed(analytics_store, tenant.id, now, SHIFTED)
    hook.statuses = [500]
    checker = watch(app_engine, analytics_store, mailpit)
    first = await checker.check_tenant(WATCHER.tenant(tenant.id), now)
    assert len(first.raised) == 1 and (first.delivered, first.failed_deliveries) == (1, 1)
    [stored] = await rows(admin_engine, tenant.id)
    assert stored["delivered_at"] is None
    webhook = stored["delivery"][f"webhook:{hook.url}"]
    assert webhook["status"] == "failed" and webhook["attempts"] == 1 and "500" in webhook["error"]

    second = await checker.check_tenant(WATCHER.tenant(tenant.id), now + timedelta(hours=1))
    assert second.raised == [] and (second.delivered, second.failed_deliveries) == (1, 0)  # the webhook only
    [stored] = await rows(admin_engine, tenant.id)
    assert stored["delivered_at"] is not None and stored["delivery"][f"webhook:{hook.url}"]["attempts"] == 2
    assert len(hook.received) == 2 and {h["webhook-id"] for h, _ in hook.received} == {str(stored["id"])}
    assert len(await mail_to(mailpit, tenant.email)) == 1  # the e-mail went once


async def test_a_tenant_that_turned_alerts_off_is_not_checked(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, mailpit: Mailpit
) -> None:
    off = await alerting_tenant(admin_engine, enabled=False)
    on = await alerting_tenant(admin_engine)
    tenants = await watch(app_engine, None, mailpit).tenants()
    assert WATCHER.tenant(on.id) in tenants and WATCHER.tenant(off.id) not in tenants


# ---------------------------------------------------------------------- acknowledging, in the admin UI


@pytest.fixture(scope="module")
async def admin_app(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
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


async def test_an_analyst_acknowledges_an_alert_and_a_viewer_cannot(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine, analytics_store: ChdbStore, mailpit: Mailpit
) -> None:
    now = datetime.now(UTC)
    tenant = await alerting_tenant(admin_engine)
    seed(analytics_store, tenant.id, now, SHIFTED)
    [alert] = (await watch(app_engine, analytics_store, mailpit).check_tenant(WATCHER.tenant(tenant.id), now)).raised
    url = f"/admin/analytics/alerts/{alert.id}/acknowledge"

    csrf = await sign_in(admin_app, tenant.slug, "viewer")
    page = await admin_app.get("/admin/analytics")
    assert page.status_code == 200 and f'data-alert="{alert.id}"' in page.text
    assert 'data-testid="acknowledge"' not in page.text  # a viewer gets no button
    refused = await admin_app.post(url, data={"csrf_token": csrf}, follow_redirects=False)
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["required_permission"] == "alerts:acknowledge"

    csrf = await sign_in(admin_app, tenant.slug, "analyst")
    assert 'data-testid="acknowledge"' in (await admin_app.get("/admin/analytics")).text
    forged = await admin_app.post(url, data={"csrf_token": "guess"}, follow_redirects=False)
    assert forged.status_code == 403 and forged.json()["type"] == PROBLEMS + "csrf-failed"
    bad = await admin_app.post("/admin/analytics/alerts/not-a-uuid/acknowledge", data={"csrf_token": csrf})
    assert bad.status_code == 400 and bad.json()["type"] == PROBLEMS + "validation-error"
    unknown = await admin_app.post(f"/admin/analytics/alerts/{uuid.uuid4()}/acknowledge", data={"csrf_token": csrf})
    assert unknown.status_code == 404 and unknown.json()["type"] == PROBLEMS + "alert-not-found"
    [stored] = await rows(admin_engine, tenant.id)
    assert stored["acknowledged_at"] is None  # nothing refused changed anything

    done = await admin_app.post(url, data={"csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/admin/analytics"
    [stored] = await rows(admin_engine, tenant.id)
    assert stored["acknowledged_at"] is not None and stored["acknowledged_by"].startswith("admin:")
    page = await admin_app.get("/admin/analytics")
    assert f'data-alert="{alert.id}"' not in page.text and 'data-testid="alerts-empty"' in page.text
    twice = await admin_app.post(url, data={"csrf_token": csrf})
    assert twice.status_code == 404  # acknowledged already

    await sequenced(admin_engine, tenant.id)
    async with admin_engine.connect() as conn:
        entries = (
            await conn.execute(
                text("SELECT kind, actor, subject, payload FROM audit_entries WHERE tenant_id = :t "
                     "AND kind IN ('analytics.alert', 'admin.forbidden', 'admin.csrf_refused') ORDER BY seq"),
                {"t": tenant.id},
            )
        ).all()  # fmt: skip
    assert [e.kind for e in entries] == ["analytics.alert", "admin.forbidden", "admin.csrf_refused", "analytics.alert"]
    raised, forbidden, _, acknowledged = entries
    assert raised.actor == "worker:dropoff-alerts" and raised.subject == str(alert.id)
    assert raised.payload["action"] == "raised" and raised.payload["step_id"] == "install-sdk"
    assert forbidden.payload["permission"] == "alerts:acknowledge" and forbidden.payload["roles"] == ["viewer"]
    assert acknowledged.subject == str(alert.id) and acknowledged.actor == stored["acknowledged_by"]
    assert acknowledged.payload == {"action": "acknowledged", "path": PATH, "path_version": 1,
                                    "step_id": "install-sdk", "window_end": alert.window_end.isoformat()}  # fmt: skip
