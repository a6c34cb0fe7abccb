"""The experiment manager in Chromium: an editor drafts, an owner approves, the editor starts, the result page
shows the winner, the editor declares it and the owner promotes it (issue 16's browser check).

The app is served by uvicorn on a loopback port (the test database, the test chdb store); admins sign in
through one-time bootstrap links (the login itself is tested against Keycloak in test_admin_sso_e2e.py).
Exposures and activations are written to the analytics store as the analytics sink would write them.
"""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser, expect

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.rows import ACTIVATED, EXPOSED, AnalyticsEvent
from tests.conftest import Database
from tests.support.browser import WAIT_MS, applied_tenant, assert_keyboard_reachable, served_admin, sign_in, tenant_id

expect.set_options(timeout=WAIT_MS)  # a result page runs the analysis: allow for a busy machine


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    return applied_tenant(database, "xb")


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def test_an_experiment_goes_from_draft_to_promotion_in_the_browser(
    base: str, slug: str, browser: Browser, analytics_store: ChdbStore, database: Database
) -> None:
    experiment_id = f"tour-{secrets.token_hex(3)}"
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)

    sign_in(page, base, slug, "editor")
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
    assert_keyboard_reachable(page)

    sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/experiments")
    page.locator(f'button[data-action="approve"][data-experiment="{experiment_id}"]').click()
    expect(page.get_by_test_id(f"status-{experiment_id}")).to_have_text("approved")

    sign_in(page, base, slug, "editor")
    page.goto(f"{base}/admin/experiments")
    page.locator(f'button[data-action="start"][data-experiment="{experiment_id}"]').click()
    expect(page.get_by_test_id(f"status-{experiment_id}")).to_have_text("running")
    page.get_by_test_id(f"result-{experiment_id}").click()
    expect(page.get_by_test_id("verdict")).not_to_have_text("winner")
    page.get_by_role("button", name="Declare the winner").click()  # no verdict yet: refused, said why
    expect(page.get_by_test_id("status-line")).to_contain_text("Not done: ")  # the problem as a sentence:
    expect(page.get_by_test_id("status-line")).to_contain_text(f"experiment {experiment_id} has no winner to declare")
    expect(page.get_by_test_id("status-line")).not_to_contain_text("{")  # never as JSON

    # the users the experiment exposed, and their activations, as the analytics sink writes them
    tenant = tenant_id(database, slug)
    rng, now, rows = random.Random(7), datetime.now(UTC), []
    for i in range(3000):
        variant = "analytics" if i % 2 else "quickstart"
        at = now + timedelta(seconds=rng.uniform(1, 300))
        user = f"{experiment_id}-{i}"
        rows.append(AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=EXPOSED,
                                   event_name=experiment_id, user_id=user, anonymous_id="", occurred_at=at,
                                   received_at=at, variant=variant))  # fmt: skip
        if rng.random() < (0.5 if variant == "analytics" else 0.3):
            done = at + timedelta(minutes=20)
            rows.append(AnalyticsEvent(tenant_id=tenant, event_id=uuid.uuid4(), event_type=ACTIVATED,
                                       event_name="", user_id=user, anonymous_id="", occurred_at=done,
                                       received_at=done))  # fmt: skip
    analytics_store.insert(rows)
    page.reload()
    expect(page.get_by_test_id("verdict")).to_have_text("winner")
    expect(page.get_by_test_id("verdict-variant")).to_have_text("analytics")
    expect(page.get_by_test_id("arms").locator('tr[data-variant="analytics"]')).to_contain_text("1500")
    expect(page.get_by_test_id("srm")).to_contain_text("as configured")
    assert_keyboard_reachable(page)
    page.get_by_role("button", name="Declare the winner").click()
    expect(page.get_by_test_id("status")).to_have_text("concluded")
    assert page.get_by_role("button", name="Promote").count() == 0  # an editor cannot promote

    sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/experiments/{experiment_id}")
    page.get_by_role("button", name="Promote").click()
    expect(page.get_by_test_id("promoted")).to_contain_text("developer-quickstart")
    expect(page.get_by_test_id("promoted")).to_contain_text("product-analytics")
    page.goto(f"{base}/admin/")
    expect(page.locator('li[data-path="developer-quickstart"]')).to_contain_text("v2")
    page.close()
