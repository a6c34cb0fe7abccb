"""The analytics page's drop-off alerts in Chromium (issue 17, part 2): an alert the scheduled check raised from a
known shift in the analytics store is shown at the top (step, baseline and recent drop-off, when), a viewer sees it
without the button, an analyst acknowledges it and the section shows its empty state; axe and 390 px."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.alerting import WATCHER, DropoffWatch
from firstmile.analytics.alerts import Alert, AlertRule
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.service import AnalyticsService
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from tests.conftest import Database
from tests.support.browser import (
    applied_tenant,
    assert_keyboard_reachable,
    run_async,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
    tenant_id,
)
from tests.support.dropoff import SHIFTED, seed


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def raise_alert(database: Database, store: ChdbStore, slug: str) -> Alert:
    """A known shift in the tenant's analytics, and the check that raises its alert (no delivery target)."""
    tenant = tenant_id(database, slug)
    now = datetime.now(UTC)
    seed(store, tenant, now, SHIFTED)

    async def check() -> Alert:
        engine = create_async_engine(database.app_url, pool_size=1)
        analytics = AnalyticsService(store, 30.0)
        try:
            watch = DropoffWatch(engine, analytics, OnboardingService(CatalogCache()), AlertRule())
            [alert] = (await watch.check_tenant(WATCHER.tenant(tenant), now)).raised
            return alert
        finally:
            analytics.close(close_store=False)
            await engine.dispose()

    return run_async(check)


def acknowledged_by(database: Database, alert: Alert) -> str | None:
    async def read() -> str | None:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        text("SELECT acknowledged_by FROM analytics_alerts WHERE id = :i"), {"i": alert.id}
                    )
                ).one()
            return None if row[0] is None else str(row[0])
        finally:
            await engine.dispose()

    return run_async(read)


def test_the_dashboard_shows_open_alerts_and_an_analyst_acknowledges_one(
    base: str, page: Page, database: Database, analytics_store: ChdbStore, axe_script: str
) -> None:
    slug = applied_tenant(database, "al")
    sign_in(page, base, slug, "analyst")
    page.get_by_test_id("nav-analytics").click()
    section = page.get_by_test_id("alerts")
    expect(section.get_by_test_id("alerts-empty")).to_contain_text("No open alert")  # the empty state
    assert serious_violations(page, axe_script) == []

    alert = raise_alert(database, analytics_store, slug)
    page.reload()
    row = section.locator(f'[data-alert="{alert.id}"]')
    expect(row).to_contain_text("Install the SDK")
    expect(row.get_by_test_id("alert-baseline")).to_contain_text("20.0% (72 of 360")
    expect(row.get_by_test_id("alert-recent")).to_contain_text("50.0% rose (90 of 180")
    expect(row.get_by_test_id("alert-raised")).to_have_text(alert.created_at.strftime("%Y-%m-%d %H:%M"))
    assert section.locator("[data-alert]").count() == 1
    # the section comes first, above the filters and the charts
    assert page.evaluate(
        "document.querySelector('[data-testid=alerts]').compareDocumentPosition("
        "document.querySelector('form.analytics-filter')) & Node.DOCUMENT_POSITION_FOLLOWING"
    )
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "analytics-alerts") <= 390
    assert_keyboard_reachable(page)

    # a viewer sees the alert, and no button
    sign_in(page, base, slug, "viewer")
    page.goto(f"{base}/admin/analytics")
    expect(section.locator(f'[data-alert="{alert.id}"]')).to_be_visible()
    expect(section.get_by_test_id("acknowledge")).to_have_count(0)

    # the analyst acknowledges it, by keyboard
    sign_in(page, base, slug, "analyst")
    page.goto(f"{base}/admin/analytics")
    button = section.get_by_role("button", name="Acknowledge the alert on Install the SDK (developer-quickstart v1)")
    button.focus()
    page.keyboard.press("Enter")
    expect(section.get_by_test_id("alerts-empty")).to_be_visible()
    assert page.url == f"{base}/admin/analytics"
    assert (acknowledged_by(database, alert) or "").startswith("admin:")
    assert serious_violations(page, axe_script) == []
