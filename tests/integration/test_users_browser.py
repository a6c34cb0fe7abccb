"""The users page in Chromium (issue 17, part 5): look a user up by id or by e-mail (blind index), see their path,
progress, the planner's decision and why, nudges and experiment exposures, with no personal data on the page;
export (analyst) and erase (owner, after confirming); each look audited; a viewer refused; axe and 390 px."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text
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
    tenant_id,
)

USER = "u-browse-1"
EMAIL = "ana.lopez@example.test"


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    return applied_tenant(database, "us")


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def _api_key(database: Database, slug: str) -> str:
    async def make() -> str:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            return (await create_key(engine, PEPPER, slug, ["onboarding:write"], "users-page")).key
        finally:
            await engine.dispose()

    return run_async(make)


def _views(database: Database, slug: str) -> int:
    tenant = tenant_id(database, slug)

    async def count() -> int:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                sql = ("SELECT count(*) FROM audit_queue WHERE tenant_id = :t AND subject = :u AND kind = 'admin' "
                       "AND payload LIKE '%users.view%'")  # fmt: skip
                queued = (await conn.execute(text(sql), {"t": tenant, "u": USER})).scalar_one()
                sql = ("SELECT count(*) FROM audit_entries WHERE tenant_id = :t AND subject = :u AND kind = 'admin' "
                       "AND payload->>'action' = 'users.view'")  # fmt: skip
                return int(queued) + int((await conn.execute(text(sql), {"t": tenant, "u": USER})).scalar_one())
        finally:
            await engine.dispose()

    return run_async(count)


def test_a_user_is_found_by_id_or_email_shown_without_personal_data_exported_and_erased(
    base: str, slug: str, page: Page, database: Database, axe_script: str
) -> None:
    headers = {"Authorization": f"Bearer {_api_key(database, slug)}"}
    traits = {"persona": "developer", "plan": "team", "email": EMAIL, "name": "Ana López"}
    body = {"user_id": USER, "traits": traits}
    started = page.request.post(f"{base}/v1/onboarding/start", headers=headers, data=body)
    assert started.status == 201, started.text()
    first = started.json()["current_step"]
    done = page.request.post(f"{base}/v1/onboarding/{USER}/steps/{first}/complete", headers=headers)
    assert done.status == 200, done.text()

    sign_in(page, base, slug, "analyst")
    page.get_by_test_id("nav-users").click()
    lookup = page.get_by_test_id("user-lookup")
    lookup.locator("input[name=q]").fill(USER)
    lookup.get_by_role("button", name="Look up").click()
    user = page.get_by_test_id("end-user")
    expect(user).to_have_attribute("data-user", USER)
    expect(page.get_by_test_id("progress")).to_contain_text("developer-quickstart")
    expect(page.get_by_test_id("completions")).to_contain_text(first)
    expect(page.get_by_test_id("decision")).to_contain_text("Chosen by")
    expect(page.get_by_test_id("traits")).to_contain_text("team")
    content = page.content()
    assert EMAIL not in content and "Ana López" not in content  # personal data stays sealed on this page
    assert page.get_by_test_id("erase").count() == 0  # an analyst exports but does not erase
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "users") <= 390
    assert_keyboard_reachable(page)
    exported = page.request.get(f"{base}{page.get_by_test_id('export').get_attribute('href')}")
    assert exported.status == 200 and exported.json()["profile"]["personal"]["email"] == EMAIL

    page.goto(f"{base}/admin/users?q={EMAIL.replace('@', '%40')}")  # by e-mail: the blind index finds them
    expect(page.get_by_test_id("end-user")).to_have_attribute("data-user", USER)
    page.goto(f"{base}/admin/users?q=nobody%40example.test")
    expect(page.get_by_test_id("user-none")).to_have_text("No user has this e-mail address.")
    bad = page.goto(f"{base}/admin/users?q=%01bad")
    assert bad is not None and bad.status == 400
    assert _views(database, slug) == 2  # each look at the user (by id, by e-mail) is audited

    sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/users?q={USER}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_test_id("erase").click()
    expect(page.get_by_test_id("status")).to_contain_text(f"Erased {USER}")
    page.goto(f"{base}/admin/users?q={USER}")
    expect(page.get_by_test_id("user-none")).to_contain_text("Nothing is held")


def test_a_viewer_cannot_look_users_up(base: str, slug: str, page: Page) -> None:
    sign_in(page, base, slug, "viewer")
    assert page.get_by_test_id("nav-users").count() == 0
    refused = page.goto(f"{base}/admin/users?q={USER}")
    assert refused is not None and refused.status == 403
    expect(page.get_by_test_id("problem")).to_contain_text("users:export")
