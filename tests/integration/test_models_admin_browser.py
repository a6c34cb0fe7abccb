"""The models page in Chromium (docs/admin-ui.md#models): an owner reads a version's off-policy report, sees a
failing version refused with its report as sentences (nothing staged), and promotes a passing one into shadow; an
analyst sees the same page without a control; axe, screenshots at 1280 and 390 px, no sideways scrolling."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.ml.planner import tenant_model_name
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, Database, make_settings
from tests.integration.test_models_admin import register_tenant_model
from tests.support.browser import (
    WAIT_MS,
    applied_tenant,
    assert_keyboard_reachable,
    screenshots,
    serious_violations,
    sign_in,
)
from tests.support.serving import free_port, served


@pytest.fixture(scope="module")
def model_registry(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("models-browser") / "models"
    shutil.copytree(tiny_registry, copy)
    return copy


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore, model_registry: Path) -> Iterator[str]:
    port = free_port()
    settings = make_settings(public_url=f"http://127.0.0.1:{port}", admin_cookie_secure=False,
                             in_process_schedulers=False, model_registry_uri=str(model_registry))  # fmt: skip
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    with served(app, port) as url:
        yield url


def test_an_owner_reads_the_report_is_refused_by_the_gate_and_promotes(
    base: str, database: Database, model_registry: Path, page: Page, axe_script: str
) -> None:
    slug = applied_tenant(database, "md")
    registry = Registry(model_registry)
    good = register_tenant_model(registry, slug, passing=True)
    noise = register_tenant_model(registry, slug, passing=False)
    name = tenant_model_name(slug)

    sign_in(page, base, slug, "owner")
    page.goto(f"{base}/admin/models")
    expect(page.get_by_test_id("nav").locator('[aria-current="page"]')).to_have_attribute("href", "/admin/models")
    own = page.get_by_test_id("own-model")
    passing = own.locator(f'[data-version="{good}"]')
    failing = own.locator(f'[data-version="{noise}"]')
    expect(passing.get_by_test_id("gate")).to_contain_text("Passes the gate")
    expect(passing.get_by_test_id("report-dr")).to_be_visible()
    expect(failing.get_by_test_id("gate")).to_contain_text("Fails the gate")
    expect(page.get_by_test_id("shared-production")).to_have_text("1.0.0")
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "models-owner") <= 390
    assert_keyboard_reachable(page)

    failing.get_by_test_id("stage").select_option("canary")
    failing.get_by_test_id("force").check()
    page.once("dialog", lambda dialog: dialog.accept())
    failing.get_by_test_id("promote").click()
    outcome = failing.get_by_test_id("outcome")
    expect(outcome).to_contain_text("stays out of canary", timeout=WAIT_MS)
    expect(outcome.get_by_test_id("refused-report")).to_contain_text("it fails")
    assert "{" not in outcome.inner_text()  # a sentence and the report, never JSON
    assert registry.stages(name).canary is None
    assert serious_violations(page, axe_script) == []

    passing.get_by_test_id("stage").select_option("shadow")
    page.once("dialog", lambda dialog: dialog.accept())
    passing.get_by_test_id("promote").click()
    expect(page.get_by_test_id("status")).to_contain_text(f"Version {good} is now in shadow", timeout=WAIT_MS)
    expect(page.get_by_test_id("own-shadow")).to_have_text(good, timeout=WAIT_MS)  # after the reload
    expect(page.get_by_test_id("own-history").get_by_test_id("history-row")).to_have_count(1)
    assert registry.stages(name).shadow == good

    sign_in(page, base, slug, "analyst")
    page.goto(f"{base}/admin/models")
    expect(page.get_by_test_id("read-only")).to_be_visible()
    expect(page.get_by_test_id("gate").first).to_be_visible()
    assert page.get_by_test_id("promote").count() == 0 and page.get_by_test_id("rollback").count() == 0
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "models-analyst") <= 390
    assert_keyboard_reachable(page)
