"""One shell for every admin page, in Chromium (issue 17, part 6): the navigation a role may use with the current
section marked, sign-out on every page, the favicon, a skip link that keyboard users reach first, problems shown
as pages to people (and still as problem+json to scripts), no sideways scrolling at 390 px, and no serious or
critical axe-core finding on any page. Screenshots of each page at 1280 and 390 px go to
``.firstmile/artifacts/screenshots/``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from firstmile.admin.cli import login_link
from firstmile.analytics.chdb_store import ChdbStore
from tests.conftest import PEPPER, Database
from tests.support.browser import (
    applied_tenant,
    assert_keyboard_reachable,
    keyboard_problems,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
)

PAGES = {"dashboard": "/admin/", "analytics": "/admin/analytics", "experiments": "/admin/experiments",
         "users": "/admin/users", "reviews": "/admin/reviews", "models": "/admin/models", "nudges": "/admin/nudges",
         "audit": "/admin/audit"}  # fmt: skip
PLANTED = """() => {
  const main = document.querySelector('main');
  main.insertAdjacentHTML('beforeend', '<button id="plain" style="outline:none">Plain</button>'
    + '<button id="faint" style="outline-color:#eee">Faint</button><button id="jump" tabindex="3">Jump</button>'
    + '<span id="ghost" tabindex="0" class="visually-hidden">Ghost</span>');
  const host = main.appendChild(document.createElement('div'));
  host.attachShadow({mode: 'open'}).innerHTML = '<button id="shadowed" style="outline:none">In a shadow root</button>';
}"""
"""Controls the keyboard check must flag: no focus style (in the page and in a shadow root), a faint one, a positive
tabindex, a hidden element that takes focus."""


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    return applied_tenant(database, "sh")


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def test_every_page_has_the_shell_fits_a_phone_and_passes_axe(
    base: str, slug: str, page: Page, axe_script: str
) -> None:
    sign_in(page, base, slug, "owner")
    for section, path in PAGES.items():
        response = page.goto(f"{base}{path}")
        assert response is not None and response.status == 200, (section, response and response.status)
        nav = page.get_by_test_id("nav")
        expect(nav.locator('[aria-current="page"]')).to_have_count(1)
        assert nav.locator('[aria-current="page"]').get_attribute("href") == path
        expect(page.get_by_test_id("logout")).to_be_visible()
        assert page.locator('link[rel="icon"]').get_attribute("href") == "/admin/static/favicon.svg"
        assert serious_violations(page, axe_script) == [], section
        assert screenshots(page, f"shell-{section}") <= 390, f"{section} scrolls sideways at 390 px"
        assert_keyboard_reachable(page)
    page.evaluate(PLANTED)  # the keyboard check does look
    found = keyboard_problems(page)
    assert any(p.startswith('button#plain "Plain": no visible focus') for p in found), found
    assert any(p.startswith('button#shadowed "In a shadow root": no visible focus') for p in found), found
    assert any(p.startswith('span#ghost "Ghost": reached by Tab but not shown') for p in found), found
    assert any(p.startswith('button#jump "Jump": a positive tabindex') for p in found), found
    assert any(p.startswith('button#faint "Faint": its focus outline rgb(238, 238, 238) has a contrast') for p in found)
    page.evaluate("document.querySelector('main').insertAdjacentHTML('beforeend', '<img src=\"/x.png\">')")
    assert any(v.startswith("image-alt") for v in serious_violations(page, axe_script))  # the check does look
    icon = page.request.get(f"{base}/admin/static/favicon.svg")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")

    page.goto(f"{base}/admin/audit")
    page.keyboard.press("Tab")  # the first stop is the skip link, shown when focused
    assert page.evaluate("document.activeElement.className") == "skip"
    expect(page.locator("a.skip")).to_be_visible()
    page.get_by_test_id("logout").click()  # sign-out works from any page
    expect(page.get_by_test_id("logged-out")).to_be_visible()
    assert_keyboard_reachable(page)
    page.goto(f"{base}/admin/audit")
    assert page.url.endswith("/admin/signin")  # signed out: back to sign-in
    assert_keyboard_reachable(page)


def test_a_viewer_sees_only_their_sections_and_problems_are_pages(
    base: str, slug: str, page: Page, axe_script: str
) -> None:
    sign_in(page, base, slug, "viewer")
    nav = page.get_by_test_id("nav")
    expect(nav.get_by_test_id("nav-experiments")).to_be_visible()
    assert nav.get_by_test_id("nav-audit").count() == 0 and nav.get_by_test_id("nav-nudges").count() == 0

    forbidden = page.goto(f"{base}/admin/audit")  # a viewer opening the audit log
    assert forbidden is not None and forbidden.status == 403
    problem = page.get_by_test_id("problem")
    expect(problem).to_have_attribute("data-status", "403")
    expect(page.get_by_test_id("problem-detail")).to_have_text("your role cannot read the audit log")
    expect(problem).to_contain_text("audit:read")
    expect(problem.get_by_role("link", name="Back to the dashboard")).to_be_visible()
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "shell-error-403") <= 390
    assert_keyboard_reachable(page)

    missing = page.goto(f"{base}/admin/no-such-page")
    assert missing is not None and missing.status == 404
    expect(page.get_by_test_id("problem")).to_have_attribute("data-status", "404")
    assert_keyboard_reachable(page)

    bad = page.goto(f"{base}/admin/audit?kind=Not%20A%20Kind")  # a bad filter, for an analyst
    assert bad is not None and bad.status == 403  # the viewer is refused before the filter is read

    # scripts and API clients still get problem+json
    scripted = page.request.get(f"{base}/admin/audit", headers={"Accept": "application/json"})
    assert scripted.status == 403 and scripted.headers["content-type"].startswith("application/problem+json")
    assert scripted.json()["required_permission"] == "audit:read"
    api = page.request.get(f"{base}/v1/onboarding/someone", headers={"Accept": "text/html"})
    assert api.status == 401 and api.headers["content-type"].startswith("application/problem+json")  # not admin


def test_a_reused_login_link_explains_itself(base: str, slug: str, page: Page) -> None:
    link = login_link(base, PEPPER, slug, "analyst")
    page.goto(link)
    assert_keyboard_reachable(page)  # the bootstrap page every browser test signs in through
    page.get_by_test_id("bootstrap-continue").click()
    expect(page.get_by_test_id("roles")).to_have_text("analyst")
    page.context.clear_cookies()
    page.goto(link)  # the same link again: it was used
    page.get_by_test_id("bootstrap-continue").click()
    problem = page.get_by_test_id("problem")
    expect(problem).to_be_visible()
    status = problem.get_attribute("data-status")
    assert status in ("400", "401", "409"), status
    expect(problem).to_contain_text("Sign in again" if status == "401" else "Back to the dashboard")
    assert_keyboard_reachable(page)
    bad = page.goto(f"{base}/admin/audit?kind=Not%20A%20Kind")
    assert bad is not None and bad.status in (303, 200)  # signed out again: the sign-in page, no raw JSON
    assert "application/json" not in (bad.headers.get("content-type") or "")
