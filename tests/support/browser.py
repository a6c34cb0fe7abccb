"""What the browser tests share: Debian's Chromium under Playwright, a bootstrap sign-in, and database work run
from the (synchronous) test's thread on a loop of its own."""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from litestar import Litestar
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.admin.cli import login_link
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.tenancy.service import find_tenant
from tests.conftest import PEPPER, REGION, Database, make_settings
from tests.factories import manifest_for
from tests.support.serving import free_port, served

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]
WAIT_MS = 15_000
SCREENSHOTS = Path(".firstmile/artifacts/screenshots")
"""Where the browser tests save their screenshots (CI keeps ``.firstmile/artifacts`` as the run's artifacts)."""
T = TypeVar("T")


def run_async(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` to its end on a loop of its own, in a thread (the test's thread may have one running)."""
    done: list[T] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            done.append(asyncio.run(work()))
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    if failed:
        raise failed[0]
    assert done, "the database work did not finish"
    return done[0]


@contextmanager
def chromium(executable: str) -> Iterator[Browser]:
    """Debian's Chromium, headless (Playwright cannot download its own browser here)."""
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def sign_in(page: Page, base: str, slug: str, role: str) -> None:
    """A fresh session of ``role`` through a one-time bootstrap link (the SSO login has its own e2e test)."""
    page.context.clear_cookies()
    page.goto(login_link(base, PEPPER, slug, role))
    page.get_by_test_id("bootstrap-continue").click()
    expect(page.get_by_test_id("roles")).to_have_text(role, timeout=WAIT_MS)


def applied_tenant(database: Database, prefix: str) -> str:
    """A new tenant from the demo manifest (``<prefix>-<8 hex>``); its slug."""
    name = f"{prefix}-{secrets.token_hex(4)}"

    async def apply() -> None:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            await apply_manifest(engine, manifest_for(name, REGION))
        finally:
            await engine.dispose()

    run_async(apply)
    return name


def tenant_id(database: Database, slug: str) -> uuid.UUID:
    async def find() -> uuid.UUID:
        engine = create_async_engine(database.admin_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                found = await find_tenant(conn, slug)
            assert found is not None
            return found.id
        finally:
            await engine.dispose()

    return run_async(find)


def serious_violations(page: Page, axe_script: str) -> list[str]:
    """axe-core's serious and critical findings on the page as it is (WCAG 2.1 A and AA rules), one line each.
    The page's context must bypass its CSP (``bypass_csp=True``): axe is injected as a script of its own."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=axe_script)
    found = page.evaluate(
        "async () => (await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}}))"
        ".violations.filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => `${v.id} (${v.impact}): ${v.nodes.map(n => n.target.join(' ')).join(', ')}`)"
    )
    return [str(line) for line in found]


def screenshots(page: Page, name: str, folder: Path = SCREENSHOTS) -> int:
    """Full-page screenshots at 1280 and 390 px wide (``<name>-desktop.png``, ``<name>-390.png``); the page's
    scroll width at 390 px (more than 390: the page scrolls sideways)."""
    folder.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(folder / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(folder / f"{name}-390.png"), full_page=True)
    width = int(page.evaluate("document.documentElement.scrollWidth"))
    page.set_viewport_size({"width": 1280, "height": 900})
    return width


@contextmanager
def served_admin(database: Database, analytics: ChdbStore) -> Iterator[tuple[str, Litestar]]:
    """The app on a loopback port for a browser (the test database and chdb store; no background schedulers):
    its base URL and the app (whose container holds, e.g., the audit signer once started)."""
    port = free_port()
    settings = make_settings(public_url=f"http://127.0.0.1:{port}", admin_cookie_secure=False,
                             in_process_schedulers=False)  # fmt: skip
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics)
    with served(app, port) as url:
        yield url, app
