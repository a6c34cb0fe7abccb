"""The path editor in Chromium (issue 17, part 1): edit → validate (errors at their fields, nothing published) →
preview → publish (a new version; users already started stay on theirs) → compare → revert; a viewer reads only;
axe and 390 px."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, Database
from tests.support.browser import (
    applied_tenant,
    assert_keyboard_reachable,
    run_async,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
)

PATH = "developer-quickstart"


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    return applied_tenant(database, "pe")


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def _headers(database: Database, slug: str) -> dict[str, str]:
    async def make() -> str:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            return (await create_key(engine, PEPPER, slug, ["onboarding:write", "onboarding:read"], "editor")).key
        finally:
            await engine.dispose()

    return {"Authorization": f"Bearer {run_async(make)}"}


def _step(page: Page, index: int) -> object:
    return page.get_by_test_id("steps").locator("li[data-step]").nth(index)


def test_an_editor_validates_previews_publishes_compares_and_reverts_a_path(
    base: str, slug: str, page: Page, database: Database, axe_script: str
) -> None:
    headers = _headers(database, slug)
    early = page.request.post(f"{base}/v1/onboarding/start", headers=headers,
                              data={"user_id": "pe-early", "traits": {"persona": "developer"}})  # fmt: skip
    assert early.status == 201 and early.json()["path"] == {**early.json()["path"], "id": PATH, "version": 1}

    sign_in(page, base, slug, "editor")
    page.get_by_test_id(f"open-{PATH}").click()
    editor = page.get_by_test_id("path-editor")
    expect(editor).to_be_visible()
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "path-editor") <= 390
    assert_keyboard_reachable(page)

    # an invalid edit: the activation step made optional; the error shows at the step, nothing is published
    activation = page.get_by_test_id("steps").locator("li[data-step]").nth(2)
    activation.locator('[data-field="optional"]').check()
    page.get_by_role("button", name="Check and preview").click()
    expect(page.get_by_test_id("errors")).to_contain_text("cannot be optional")
    expect(page.get_by_test_id("status")).to_contain_text("Not valid")
    page.get_by_test_id("publish").click()
    expect(page.get_by_test_id("status")).to_contain_text("Not published")
    assert page.get_by_test_id("versions").locator("tbody tr").count() == 1
    title = page.get_by_test_id("steps").locator("li[data-step]").nth(1).locator('[data-field="title"]')
    title.fill("")  # a blank title is marked at its field, and the marked field still shows the focus
    page.get_by_role("button", name="Check and preview").click()
    expect(title).to_have_attribute("aria-invalid", "true")
    assert_keyboard_reachable(page)

    # a valid edit: the step back to required, a new title, the live view moved before the first event
    activation.locator('[data-field="optional"]').uncheck()
    second = page.get_by_test_id("steps").locator("li[data-step]").nth(1)
    second.locator('[data-field="title"]').fill("Install our SDK in two minutes")
    page.get_by_test_id("steps").locator("li[data-step]").nth(3).get_by_role("button", name="Move up").click()
    page.get_by_role("button", name="Check and preview").click()
    expect(page.get_by_test_id("status")).to_contain_text("Valid")
    preview = page.get_by_test_id("preview").locator("li")
    expect(preview.nth(1)).to_contain_text("Install our SDK in two minutes")
    expect(preview.nth(2)).to_have_attribute("data-step-id", "view-live-events")
    expect(preview.nth(0)).to_contain_text("open now")
    expect(preview.nth(1)).to_contain_text("after create-api-key")

    page.get_by_test_id("publish").click()
    expect(page.locator("h1")).to_contain_text("v2")
    rows = page.get_by_test_id("versions").locator("tbody tr")
    expect(rows).to_have_count(2)
    state = page.request.get(f"{base}/v1/onboarding/pe-early", headers=headers)
    assert state.json()["path"]["version"] == 1  # started before the edit: still on version 1
    late = page.request.post(f"{base}/v1/onboarding/start", headers=headers,
                             data={"user_id": "pe-late", "traits": {"persona": "developer"}})  # fmt: skip
    assert late.json()["path"]["version"] == 2
    assert [s["id"] for s in late.json()["steps"]][2] == "view-live-events"

    page.locator('button[data-compare="1"]').click()
    diff = page.get_by_test_id("diff")
    expect(diff).to_contain_text("v1 → v2")
    expect(diff).to_contain_text('step install-sdk, title: "Install the SDK" → "Install our SDK in two minutes"')
    expect(diff).to_contain_text("the order of the steps changed")

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator('button[data-revert="1"]').click()
    expect(page.locator("h1")).to_contain_text("v3")
    expect(page.get_by_test_id("steps").locator("li[data-step]").nth(1).locator('[data-field="title"]')).to_have_value(
        "Install the SDK"
    )
    page.goto(f"{base}/admin/")
    expect(page.get_by_test_id(f"edited-{PATH}")).to_have_count(0)  # v3 is the manifest's definition again


def test_a_viewer_reads_the_editor_but_cannot_publish(base: str, slug: str, page: Page) -> None:
    sign_in(page, base, slug, "viewer")
    page.goto(f"{base}/admin/paths/{PATH}")
    expect(page.get_by_test_id("path-editor").locator("input[name=name]")).to_be_disabled()
    assert page.get_by_test_id("publish").count() == 0
    refused = page.request.patch(f"{base}/admin/api/paths/{PATH}", data={"name": "x"},
                                 headers={"X-CSRF-Token": "none"})  # fmt: skip
    assert refused.status in (401, 403)
    missing = page.goto(f"{base}/admin/paths/no-such-path")
    assert missing is not None and missing.status == 404


def test_a_call_without_a_problem_answer_is_said_as_a_sentence(base: str, slug: str, page: Page) -> None:
    """A proxy's HTML error page, or a request that never reached the server: the editor says so in a sentence
    (admin-api.js), where it used to fail on the JSON it expected and say nothing; nothing is published."""
    sign_in(page, base, slug, "editor")
    page.goto(f"{base}/admin/paths/{PATH}")
    versions = page.get_by_test_id("versions").locator("tbody tr").count()
    status = page.get_by_test_id("status")
    page.route("**/validate", lambda route: route.fulfill(status=502, content_type="text/html",
                                                            body="<html><h1>502 Bad Gateway</h1></html>"))  # fmt: skip
    page.get_by_role("button", name="Check and preview").click()
    expect(status).to_contain_text("Not valid: ")
    expect(status).to_contain_text("(HTTP 502).")
    expect(status).not_to_contain_text("<")
    page.route(f"**/admin/api/paths/{PATH}", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("publish").click()
    expect(status).to_contain_text("Not published: The request did not reach the server")
    expect(status).to_contain_text("nothing was changed.")
    page.unroute("**/validate")
    page.unroute(f"**/admin/api/paths/{PATH}")
    page.reload()
    expect(page.get_by_test_id("versions").locator("tbody tr")).to_have_count(versions)
