"""The review queue page in Chromium (issue 20, part 4; docs/admin-ui.md#the-review-queue): reviews queued through
the onboarding API of the served app; an editor filters the queue, approves a completion with a note (the step is
then completed at the time the completion happened), rejects another, bulk-approves two, and reads a refusal (a
review decided meanwhile) as a sentence; an analyst sees the queue without a control to decide and is refused a
decision posted straight to the API; axe, screenshots at 1280 and 390 px, no sideways scrolling."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.kit.db import tenant_transaction
from firstmile.onboarding import review
from firstmile.onboarding.service import OnboardingService
from tests.conftest import Database
from tests.support.browser import (
    assert_keyboard_reachable,
    run_async,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
)
from tests.support.reviews import TEST_OPERATOR, ReviewTenant, completion, queued, review_tenant, stored_review


@pytest.fixture(scope="module")
def served(database: Database, analytics_store: ChdbStore) -> Iterator[tuple[str, Litestar]]:
    with served_admin(database, analytics_store) as (url, app):
        yield url, app


def prepared(database: Database, served: tuple[str, Litestar]) -> tuple[ReviewTenant, dict[str, int], datetime]:
    """A tenant and its reviews: four step reviews of developers' first step (``u-a`` dated two hours back), one
    of an analyst's, and an ambiguous one (a completion dated before its user started); a segment pin in force."""
    base, app = served
    earlier = datetime.now(UTC) - timedelta(hours=2)
    onboarding: OnboardingService = app.state.container.onboarding

    async def work() -> tuple[ReviewTenant, dict[str, int]]:
        admin = create_async_engine(database.admin_url, pool_size=1)
        try:
            tenant = await review_tenant(admin, "rw")
            async with tenant_transaction(admin, TEST_OPERATOR.tenant(tenant.id)) as tx:
                await onboarding.pin_segment(tx, [{"field": "persona", "op": "eq", "value": "marketer"}],
                                             "marketing-campaigns", actor="operator:test-reviews",
                                             expires_at=earlier + timedelta(days=7))  # fmt: skip
            ids = {}
            async with httpx.AsyncClient(base_url=base, timeout=15) as api:
                for user, persona, step, at in (
                    ("u-a", "developer", "create-api-key", earlier), ("u-b", "developer", "create-api-key", None),
                    ("u-c", "developer", "create-api-key", None), ("u-d", "developer", "create-api-key", None),
                    ("u-e", "analyst", "connect-data-source", None), ("u-f", "admin", "configure-workspace", earlier),
                ):  # fmt: skip
                    ids[user] = await queued(api, tenant, user, persona, step, at)
            return tenant, ids
        finally:
            await admin.dispose()

    tenant, ids = run_async(work)
    return tenant, ids, earlier


def stored(database: Database, tenant: ReviewTenant, user: str, review_id: int) -> tuple[Any, dict[str, Any]]:
    """The user's completion of the step under review (None: open) and the review as stored."""

    async def read() -> tuple[Any, dict[str, Any]]:
        admin = create_async_engine(database.admin_url, pool_size=1)
        try:
            row = await stored_review(admin, tenant, review_id)
            step = "connect-data-source" if user == "u-e" else "create-api-key"
            return await completion(admin, tenant, user, step), row
        finally:
            await admin.dispose()

    return run_async(read)


def card(page: Page, review_id: int) -> Any:
    return page.locator(f'[data-review-id="{review_id}"]')


def test_an_editor_filters_approves_rejects_and_bulk_approves_and_an_analyst_only_reads(
    served: tuple[str, Litestar], page: Page, database: Database, axe_script: str
) -> None:
    base = served[0]
    tenant, ids, earlier = prepared(database, served)

    sign_in(page, base, tenant.slug, "editor")
    page.get_by_test_id("reviews-link").click()  # from the dashboard
    expect(page.get_by_role("heading", level=1)).to_have_text("Review queue")
    expect(page.get_by_test_id("nav-reviews")).to_have_attribute("aria-current", "page")
    expect(page.get_by_test_id("review")).to_have_count(6)
    expect(page.get_by_test_id("pending-step")).to_have_text("5 step")
    expect(page.get_by_test_id("pending-ambiguous")).to_have_text("1 ambiguous")
    ambiguous = card(page, ids["u-f"])
    expect(ambiguous.get_by_test_id("reason")).to_contain_text(review.REASONS["contradicts_record"])
    expect(ambiguous.get_by_test_id("path")).to_have_text("workspace-admin@v1")
    pin = page.get_by_test_id("pin")
    expect(pin).to_have_count(1)
    expect(pin).to_contain_text('persona eq "marketer"')
    expect(pin).to_contain_text("marketing-campaigns")
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "reviews") <= 390
    assert_keyboard_reachable(page)

    # filters: the developers' step reviews of one path and step
    page.get_by_label("Kind", exact=True).select_option("step")
    page.get_by_label("Path", exact=True).select_option("developer-quickstart")
    page.get_by_label("Step", exact=True).fill("create-api-key")
    page.get_by_test_id("filter-apply").click()
    expect(page.get_by_test_id("review")).to_have_count(4)
    assert "kind=step" in page.url and "path=developer-quickstart" in page.url
    first = card(page, ids["u-a"])
    expect(first.get_by_test_id("user")).to_have_text("u-a")
    expect(first.get_by_test_id("step")).to_have_text("create-api-key")
    expect(first.get_by_test_id("source")).to_have_text("api")
    expect(first.get_by_test_id("occurred")).to_have_text(earlier.strftime("%Y-%m-%d %H:%M:%S"))
    expect(first.get_by_test_id("reason")).to_contain_text(review.REASONS["review_step"])

    # approve one with a note: the step is completed at the time it happened
    first.get_by_label(f"Note on review {ids['u-a']}", exact=True).fill("contract signed")
    first.get_by_role("button", name=f"Approve review {ids['u-a']}", exact=True).click()
    expect(first.get_by_test_id("outcome")).to_contain_text("Approved by admin:")
    expect(first.get_by_test_id("outcome")).to_contain_text("contract signed")
    expect(first).to_have_attribute("data-status", "approved")
    expect(page.get_by_test_id("status")).to_have_text(f"Review {ids['u-a']}: approved.")
    expect(first.get_by_test_id("approve")).to_have_count(0)
    done, row = stored(database, tenant, "u-a", ids["u-a"])
    assert done is not None and done["occurred_at"] == earlier and done["source"] == f"review:{ids['u-a']}"
    assert row["status"] == "approved" and row["note"] == "contract signed" and row["decided_by"].startswith("admin:")

    # reject another, by keyboard
    second = card(page, ids["u-b"])
    second.get_by_label(f"Note on review {ids['u-b']}", exact=True).fill("no contract on file")
    second.get_by_role("button", name=f"Reject review {ids['u-b']}", exact=True).focus()
    page.keyboard.press("Enter")
    expect(second).to_have_attribute("data-status", "rejected")
    done, row = stored(database, tenant, "u-b", ids["u-b"])
    assert done is None and (row["status"], row["note"]) == ("rejected", "no contract on file")

    # bulk: nothing selected is explained; then two approved at once
    page.get_by_test_id("bulk-approve").click()
    expect(page.get_by_test_id("status")).to_have_text("Select the reviews to approve first.")
    card(page, ids["u-c"]).get_by_label(f"Select review {ids['u-c']}", exact=True).check()
    card(page, ids["u-d"]).get_by_label(f"Select review {ids['u-d']}", exact=True).check()
    page.get_by_label("Note for all").fill("signed in a batch")
    page.get_by_test_id("bulk-approve").click()
    expect(page.get_by_test_id("status")).to_contain_text("2 reviews approved")
    for user in ("u-c", "u-d"):
        expect(card(page, ids[user])).to_have_attribute("data-status", "approved")
        done, row = stored(database, tenant, user, ids[user])
        assert done is not None and done["source"] == f"review:{ids[user]}" and row["note"] == "signed in a batch"
    assert serious_violations(page, axe_script) == []

    # a review decided meanwhile (someone else, through the API): the refusal is a sentence, not JSON
    page.goto(f"{base}/admin/reviews?kind=step&path=analyst-reports")
    expect(page.get_by_test_id("review")).to_have_count(1)
    token = page.locator('meta[name="csrf-token"]').get_attribute("content") or ""
    meanwhile = page.request.post(f"{base}/admin/api/reviews/{ids['u-e']}/decide", data={"decision": "approve"},
                                  headers={"X-CSRF-Token": token})  # fmt: skip
    assert meanwhile.status == 200
    late = card(page, ids["u-e"])
    late.get_by_role("button", name=f"Reject review {ids['u-e']}", exact=True).click()
    outcome = late.get_by_test_id("outcome")
    expect(outcome).to_contain_text(f"Not decided: Review decided: review {ids['u-e']} was decided already")
    expect(outcome).not_to_contain_text("{")
    expect(page.get_by_test_id("status")).to_have_attribute("data-kind", "problem")
    assert stored(database, tenant, "u-e", ids["u-e"])[1]["status"] == "approved"  # the refused one changed nothing

    # decided reviews, filtered by status
    page.get_by_label("Status", exact=True).select_option("decided")
    page.get_by_label("Path", exact=True).select_option("")
    page.get_by_test_id("filter-apply").click()
    expect(page.get_by_test_id("review")).to_have_count(5)
    expect(card(page, ids["u-b"]).get_by_test_id("decided")).to_contain_text("no contract on file")

    # the editor revokes the segment pin (after confirming)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=re.compile(r"^Revoke pin \d+$")).click()
    expect(page.get_by_test_id("pin")).to_have_count(0)
    expect(page.get_by_test_id("status")).to_contain_text("is revoked")
    page.reload()
    expect(page.get_by_test_id("pins-empty")).to_be_visible()

    # an analyst: the queue, no control to decide; a decision posted straight to the API is refused
    sign_in(page, base, tenant.slug, "analyst")
    page.get_by_test_id("nav-reviews").click()
    expect(page.get_by_test_id("review")).to_have_count(1)  # the ambiguous one still waits
    expect(page.get_by_test_id("read-only")).to_be_visible()
    for control in ("approve", "reject", "select", "bulk", "note"):
        expect(page.get_by_test_id(control)).to_have_count(0)
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "reviews-analyst") <= 390
    assert_keyboard_reachable(page)
    token = page.locator('meta[name="csrf-token"]').get_attribute("content") or ""
    refused = page.request.post(f"{base}/admin/api/reviews/{ids['u-f']}/decide", data={"decision": "approve"},
                                headers={"X-CSRF-Token": token})  # fmt: skip
    assert refused.status == 403 and refused.json()["required_permission"] == "reviews:decide"
    assert stored(database, tenant, "u-f", ids["u-f"])[1]["status"] == "pending"
