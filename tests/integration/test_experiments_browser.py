"""The experiment manager in Chromium: an editor drafts, an owner approves, the editor starts, the result page
shows the winner, the editor declares it and the owner promotes it (issue 16's browser check).

The app is served by uvicorn on a loopback port (the test database, the test chdb store); admins sign in
through one-time bootstrap links (the login itself is tested against Keycloak in test_admin_sso_e2e.py).
Exposures and activations are written to the analytics store as the analytics sink would write them.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.admin.cli import login_link
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.rows import ACTIVATED, EXPOSED, AnalyticsEvent
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.tenancy.service import find_tenant
from tests.conftest import PEPPER, REGION, Database, make_settings
from tests.factories import manifest_for
from tests.support.serving import free_port, served

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
WAIT_MS = 15_000
T = TypeVar("T")
expect.set_options(timeout=WAIT_MS)  # a result page runs the analysis: allow for a busy machine


def _run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` to its end on a loop of its own, in a thread (the test's thread may have one running)."""
    done: list[T] = []
    thread = threading.Thread(target=lambda: done.append(asyncio.run(work())))
    thread.start()
    thread.join(60)
    assert done, "the database work did not finish"
    return done[0]


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    name = f"xb-{secrets.token_hex(4)}"

    async def apply() -> None:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            await apply_manifest(engine, manifest_for(name, REGION))
        finally:
            await engine.dispose()

    _run(apply)
    return name


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(public_url=url, admin_cookie_secure=False, in_process_schedulers=False)
    with served(create_app(settings, database.app_url, PEPPER, analytics=analytics_store), port) as served_url:
        yield served_url


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium_path, headless=True, args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _sign_in(page: Page, base: str, slug: str, role: str) -> None:
    page.context.clear_cookies()
    page.goto(login_link(base, PEPPER, slug, role))
    page.get_by_test_id("bootstrap-continue").click()
    expect(page.get_by_test_id("roles")).to_have_text(role, timeout=WAIT_MS)


def test_an_experiment_goes_from_draft_to_promotion_in_the_browser(
    base: str, slug: str, browser: Browser, analytics_store: ChdbStore, database: Database
) -> None:
    experiment_id = f"tour-{secrets.token_hex(3)}"
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)

    _sign_in(page, base, slug, "editor")
    page.get_by_test_id("experiments-link").click()
    expect(page.get_by_test_id("experiments-empty")).to_be_visible()
    form = page.get_by_test_id("draft-form")
    form.locator("input[name=id]").fill(experiment_id)
    form.locator("input[name=control_name]").fill("quickstart")
    form.locator("select[name=control_path]").select_option("developer-quickstart")
    form.locator("input[name=variant_name]").fill("analytics")
    form.locator("select[name=variant_path]").select_option("product-analytics")
    form.get_by_role("button", name="Save the draft").click()
    expect(page.get_by_test_id(f"status-{experiment_id}")).to_have_text("draft")
    assert page.locator(f'button[data-action="approve"][data-experiment="{experiment_id}"]').count() == 0

    _sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/experiments")
    page.locator(f'button[data-action="approve"][data-experiment="{experiment_id}"]').click()
    expect(page.get_by_test_id(f"status-{experiment_id}")).to_have_text("approved")

    _sign_in(page, base, slug, "editor")
    page.goto(f"{base}/admin/experiments")
    page.locator(f'button[data-action="start"][data-experiment="{experiment_id}"]').click()
    expect(page.get_by_test_id(f"status-{experiment_id}")).to_have_text("running")
    page.get_by_test_id(f"result-{experiment_id}").click()
    expect(page.get_by_test_id("verdict")).not_to_have_text("winner")
    page.get_by_role("button", name="Declare the winner").click()  # no verdict yet: refused, said why
    expect(page.get_by_test_id("status-line")).to_contain_text("Not done: experiment")

    # the users the experiment exposed, and their activations, as the analytics sink writes them
    tenant_id = _tenant_id(database, slug)
    rng, now, rows = random.Random(7), datetime.now(UTC), []
    for i in range(3000):
        variant = "analytics" if i % 2 else "quickstart"
        at = now + timedelta(seconds=rng.uniform(1, 300))
        user = f"{experiment_id}-{i}"
        rows.append(AnalyticsEvent(tenant_id=tenant_id, event_id=uuid.uuid4(), event_type=EXPOSED,
                                   event_name=experiment_id, user_id=user, anonymous_id="", occurred_at=at,
                                   received_at=at, variant=variant))  # fmt: skip
        if rng.random() < (0.5 if variant == "analytics" else 0.3):
            done = at + timedelta(minutes=20)
            rows.append(AnalyticsEvent(tenant_id=tenant_id, event_id=uuid.uuid4(), event_type=ACTIVATED,
                                       event_name="", user_id=user, anonymous_id="", occurred_at=done,
                                       received_at=done))  # fmt: skip
    analytics_store.insert(rows)
    page.reload()
    expect(page.get_by_test_id("verdict")).to_have_text("winner")
    expect(page.get_by_test_id("verdict-variant")).to_have_text("analytics")
    expect(page.get_by_test_id("arms").locator('tr[data-variant="analytics"]')).to_contain_text("1500")
    expect(page.get_by_test_id("srm")).to_contain_text("as configured")
    page.get_by_role("button", name="Declare the winner").click()
    expect(page.get_by_test_id("status")).to_have_text("concluded")
    assert page.get_by_role("button", name="Promote").count() == 0  # an editor cannot promote

    _sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/experiments/{experiment_id}")
    page.get_by_role("button", name="Promote").click()
    expect(page.get_by_test_id("promoted")).to_contain_text("developer-quickstart")
    expect(page.get_by_test_id("promoted")).to_contain_text("product-analytics")
    page.goto(f"{base}/admin/")
    expect(page.locator('li[data-path="developer-quickstart"]')).to_contain_text("v2")
    page.close()


def _tenant_id(database: Database, slug: str) -> uuid.UUID:
    async def find() -> uuid.UUID:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                found = await find_tenant(conn, slug)
            assert found is not None
            return found.id
        finally:
            await engine.dispose()

    return _run(find)
