"""The admin UI's destinations page in Chromium (issue 18, part 5): a tenant whose webhook destination went through the
real pipeline (the manifest's ``destinations:`` section pointing at a loopback receiver that verifies every request
with ``standardwebhooks``, the consumer, the delivery worker) with a delivered event, a pending one and a dead letter;
the page's numbers are the service's (what ``firstmile destinations status --json`` prints); an editor replays the
dead letter by keyboard; the empty state; axe, screenshots at 1280 and 390 px, no sideways scrolling."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.destinations import service
from tests.conftest import Database
from tests.support.browser import (
    applied_tenant,
    assert_keyboard_reachable,
    run_async,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
)
from tests.support.destinations_pipeline import Pipeline, delivered_pending_dead, webhook_tenant
from tests.support.webhook_receiver import WebhookReceiver


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def prepared(database: Database, base: str, receiver: WebhookReceiver) -> Pipeline:
    """The tenant, and its delivered, pending and dead events (the onboarding API of the served app)."""

    async def work() -> Pipeline:
        admin = create_async_engine(database.admin_url, pool_size=1)
        app = create_async_engine(database.app_url, pool_size=2)
        try:
            pipeline = await webhook_tenant(admin, app, receiver, "db")
            async with httpx.AsyncClient(base_url=base, timeout=15) as api:
                await delivered_pending_dead(api, pipeline, receiver)
            return pipeline
        finally:
            await admin.dispose()
            await app.dispose()

    return run_async(work)


def status(database: Database, pipeline: Pipeline) -> service.DestinationStatus:
    """The service's view now (``firstmile destinations status`` prints it)."""

    async def read() -> service.DestinationStatus:
        admin = create_async_engine(database.admin_url, pool_size=1)
        app = create_async_engine(database.app_url, pool_size=1)
        try:
            return await dataclasses.replace(pipeline, admin=admin, app=app).status()
        finally:
            await admin.dispose()
            await app.dispose()

    return run_async(read)


def test_the_page_shows_the_services_numbers_and_an_editor_replays_a_dead_letter_by_keyboard(
    base: str, page: Page, database: Database, axe_script: str
) -> None:
    with WebhookReceiver() as receiver:
        pipeline = prepared(database, base, receiver)
    before = status(database, pipeline)
    assert (before.delivered, before.pending, before.dead) == (1, 1, 1)

    sign_in(page, base, pipeline.slug, "editor")
    page.get_by_test_id("nav-destinations").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Destinations")
    expect(page.get_by_test_id("nav-destinations")).to_have_attribute("aria-current", "page")
    section = page.locator('[data-destination="hooks"]')
    expect(section.get_by_role("heading", level=2)).to_contain_text("hooks")
    expect(section.get_by_test_id("kind")).to_have_text(before.kind)
    expect(section.get_by_test_id("state")).to_have_attribute("data-state", "ok")
    expect(section.get_by_test_id("delivered")).to_have_text(str(before.delivered))
    expect(section.get_by_test_id("pending")).to_have_text(str(before.pending))
    expect(section.get_by_test_id("dead")).to_have_text(str(before.dead))
    assert before.last_success_at is not None
    expect(section.get_by_test_id("last-success")).to_have_text(before.last_success_at.strftime("%Y-%m-%d %H:%M:%S"))
    lag = float(section.get_by_test_id("lag").get_attribute("data-seconds") or "-1")
    after_page = status(database, pipeline)  # the page's lag was read between the two
    assert before.oldest_pending_age_s is not None and after_page.oldest_pending_age_s is not None
    assert before.oldest_pending_age_s - 1 <= lag <= after_page.oldest_pending_age_s + 1
    [dead] = before.dead_letters
    row = section.locator(f'[data-event-id="{dead.event_id}"]')
    expect(row).to_have_attribute("data-status", "dead")
    expect(row).to_contain_text("identify")
    expect(row).to_contain_text(dead.error)  # the endpoint answered 422: unknown event type
    assert dead.error == "the endpoint answered 422: unknown event type"
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "destinations") <= 390
    assert_keyboard_reachable(page)

    # the editor replays the dead letter, by keyboard
    button = section.get_by_role("button", name="Replay 1 dead letter of hooks")
    button.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("notice")).to_have_text("1 dead letters of hooks are queued again.")
    assert page.url == f"{base}/admin/destinations?done=replayed&name=hooks&events=1"
    after = status(database, pipeline)
    assert (after.delivered, after.pending, after.dead) == (1, 2, 0)
    expect(section.get_by_test_id("pending")).to_have_text(str(after.pending))
    expect(section.get_by_test_id("dead")).to_have_text(str(after.dead))
    expect(section.get_by_test_id("replay")).to_have_count(0)
    assert serious_violations(page, axe_script) == []

    # the disable form, by keyboard too: the reason is asked for, then shown
    page.get_by_label("Reason for disabling hooks").fill("planned maintenance")
    page.keyboard.press("Enter")
    expect(section.get_by_test_id("state")).to_have_attribute("data-state", "disabled")
    expect(section.get_by_test_id("reason")).to_have_text("planned maintenance")
    assert status(database, pipeline).disabled_reason == "planned maintenance"
    assert serious_violations(page, axe_script) == []


def test_the_empty_state_says_how_to_add_a_destination(base: str, page: Page, database: Database,
                                                       axe_script: str) -> None:  # fmt: skip
    slug = applied_tenant(database, "de")
    sign_in(page, base, slug, "analyst")
    page.get_by_test_id("nav-destinations").click()
    empty = page.get_by_test_id("destinations-empty")
    expect(empty).to_contain_text("No destination yet")
    expect(empty).to_contain_text("docs/destinations.md")
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "destinations-empty") <= 390
    assert_keyboard_reachable(page)
