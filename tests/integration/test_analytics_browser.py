"""The analytics dashboard in Chromium (issue 17, part 2): the tenant's funnel, drop-off, activation, time to
activation (a histogram), activation rate by signup week and cohorts drawn with Chart.js (bundled from npm at build
time) beside tables whose numbers equal the analytics API's, for the default range and for a filter; freshness, empty
and error states shown; axe and 390 px."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.synthetic import SyntheticPath, generate
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, Database
from tests.factories import manifest_for
from tests.support.browser import (
    SCREENSHOTS,
    applied_tenant,
    assert_keyboard_reachable,
    run_async,
    screenshots,
    serious_violations,
    served_admin,
    sign_in,
    tenant_id,
)

PATH = "developer-quickstart"


@pytest.fixture(scope="module")
def slug(database: Database, analytics_store: ChdbStore) -> str:
    name = applied_tenant(database, "an")
    manifest = manifest_for(name, "eu-west-1")
    paths = [
        SyntheticPath(key=p.id, version=1, steps=tuple(s.id for s in p.steps), activation_step=p.activation_step,
                      optional=frozenset(s.id for s in p.steps if s.optional))
        for p in manifest.paths
    ]  # fmt: skip
    rows = list(generate(tenant_id(database, name), paths, users=500, weeks=6, end=datetime.now(UTC), seed=5))
    analytics_store.insert(rows)
    return name


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    with served_admin(database, analytics_store) as (url, _):
        yield url


def _key(database: Database, slug: str) -> dict[str, str]:
    async def make() -> str:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            return (await create_key(engine, PEPPER, slug, ["analytics:read"], "dashboard-test")).key
        finally:
            await engine.dispose()

    return {"Authorization": f"Bearer {run_async(make)}"}


def _table(page: Page, name: str) -> list[list[str]]:
    rows: list[list[str]] = (
        page.get_by_test_id(f"{name}-table")
        .locator("tbody tr")
        .evaluate_all("rs => rs.map(r => Array.from(r.cells, c => c.textContent))")
    )
    return rows


def _api(page: Page, base: str, headers: dict[str, str], name: str, **params: str) -> Any:
    query: dict[str, str | float | bool] = dict(params)
    answer = page.request.get(f"{base}/v1/analytics/{name}", params=query, headers=headers)
    assert answer.status == 200, answer.text()
    return answer.json()


def _drawn(page: Page) -> dict[str, list[float | None]]:
    """The numbers each chart was drawn from, by section."""
    drawn: dict[str, list[float | None]] = page.evaluate(
        "Object.fromEntries([...window.firstmileCharts].map(([k, c]) => [k, c.data.datasets[0].data]))"
    )
    return drawn


def _check_activation_charts(page: Page, base: str, headers: dict[str, str], **params: str) -> tuple[Any, Any]:
    """The histogram and the weekly rate as shown (tables, charts, summaries) equal the API's answers (every filter
    but the path, as the Activation section)."""
    tta = _api(page, base, headers, "time-to-activation", **params)
    rate = _api(page, base, headers, "activation-rate", **params)
    assert tta["activated"] > 0 and rate["users"] > 0
    assert [(r[0], int(r[1])) for r in _table(page, "time-to-activation")] == [
        (b["label"], b["users"]) for b in tta["histogram"]]  # fmt: skip
    assert [(r[0], int(r[1]), int(r[2])) for r in _table(page, "activation-weeks")] == [
        (w["cohort_week"], w["users"], w["activated"]) for w in rate["weeks"]]  # fmt: skip
    drawn = _drawn(page)
    assert drawn["time-to-activation"] == [b["users"] for b in tta["histogram"]]
    assert drawn["activation-weeks"] == [None if w["rate"] is None else w["rate"] * 100 for w in rate["weeks"]]
    summary = page.get_by_test_id("time-to-activation-summary")
    expect(summary).to_contain_text(f"{tta['activated']} of {tta['users']} users activated")
    expect(page.get_by_test_id("activation-weeks-summary")).to_contain_text(f"{len(rate['weeks'])} signup weeks")
    return tta, rate


def test_the_dashboard_shows_the_api_numbers_as_charts_and_tables(
    base: str, slug: str, page: Page, database: Database, axe_script: str
) -> None:
    headers = _key(database, slug)
    sign_in(page, base, slug, "analyst")
    page.get_by_test_id("nav-analytics").click()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    page.get_by_test_id("analytics-filter").locator("select[name=path]").select_option(PATH)
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")

    funnel = _api(page, base, headers, "funnel", path=PATH)
    shown = _table(page, "funnel")
    assert int(shown[0][1]) == funnel["started"] > 0
    assert [int(r[1]) for r in shown[1:]] == [s["users"] for s in funnel["steps"]]
    dropoff = _api(page, base, headers, "dropoff", path=PATH)
    assert [int(r[3]) for r in _table(page, "dropoff")] == [s["dropped"] for s in dropoff["steps"]]
    rate = _api(page, base, headers, "activation-rate")
    assert [(r[0], int(r[1]), int(r[2])) for r in _table(page, "activation")] == [
        (p["path"], p["users"], p["activated"]) for p in rate["paths"]]  # fmt: skip
    cohorts = _api(page, base, headers, "cohorts")
    assert [r[0] for r in _table(page, "cohorts")] == [c["cohort_week"] for c in cohorts["cohorts"]]
    drawn = _drawn(page)
    assert drawn["funnel"] == [funnel["started"], *[s["users"] for s in funnel["steps"]]]
    assert set(drawn) == {"funnel", "dropoff", "activation", "time-to-activation", "activation-weeks"}
    tta, weekly = _check_activation_charts(page, base, headers)
    assert sum(b["users"] for b in tta["histogram"]) == tta["activated"]
    assert len({b["users"] for b in tta["histogram"]}) > 2  # the synthetic delays spread over the buckets
    assert sum(1 for w in weekly["weeks"] if w["users"]) >= 4  # 30 days of starts: at least four signup weeks
    for name in ("funnel", "time-to-activation", "activation-weeks"):
        expect(page.locator(f'[data-section="{name}"] [data-freshness]')).to_contain_text("computed at")
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "analytics") <= 390
    for name in ("time-to-activation", "activation-weeks"):
        page.locator(f'[data-section="{name}"]').screenshot(path=str(SCREENSHOTS / f"analytics-{name}.png"))
    assert_keyboard_reachable(page)

    # a filter: the page and the API agree again
    page.get_by_test_id("analytics-filter").locator("input[name=persona]").fill("developer")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    filtered = _api(page, base, headers, "funnel", path=PATH, persona="developer")
    expect(page.get_by_test_id("funnel-table").locator("tbody tr").first).to_contain_text(str(filtered["started"]))
    assert filtered["started"] < funnel["started"]
    assert "persona=developer" in page.url
    narrowed, _ = _check_activation_charts(page, base, headers, persona="developer")
    assert narrowed["activated"] < tta["activated"]

    # nobody: the new sections say so instead of drawing zeros
    page.get_by_test_id("analytics-filter").locator("input[name=persona]").fill("astronaut")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    expect(page.locator('[data-section="time-to-activation"] [data-empty]')).to_have_text(
        "No user activated in this range.")  # fmt: skip
    expect(page.locator('[data-section="activation-weeks"] [data-empty]')).to_have_text("No user in this range.")
    assert _table(page, "time-to-activation") == [] and _table(page, "activation-weeks") == []
    assert not {"time-to-activation", "activation-weeks"} & set(_drawn(page))
    assert serious_violations(page, axe_script) == []

    # a bad filter: each section says why, and draws nothing
    page.goto(f"{base}/admin/analytics?path={PATH}&variant={'x' * 129}")
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    for name in ("time-to-activation", "activation-weeks"):
        expect(page.locator(f'[data-section="{name}"] [data-problem]')).to_contain_text("variant")
        expect(page.locator(f'[data-section="{name}"] [data-empty]')).to_be_hidden()
    assert not {"time-to-activation", "activation-weeks"} & set(_drawn(page))

    page.goto(f"{base}/admin/analytics?path={PATH}&window=0")  # a bad window: the section says why
    expect(page.locator('[data-section="funnel"] [data-problem]')).to_contain_text("window")
