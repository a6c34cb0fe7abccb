"""The audit viewer in Chromium: search by subject and kind, and "Verify", which checks an entry's leaf hash, its
inclusion proof and the checkpoint's Ed25519 signature in the browser (WebCrypto), and flags tampered answers
(issue 17, part 3). Screenshots at desktop and phone widths go to ``.firstmile/artifacts/screenshots/``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from playwright.sync_api import Browser, Page, Route, expect
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.audit.service import append, create_checkpoint
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI
from tests.conftest import Database, sequenced
from tests.support.browser import (
    WAIT_MS,
    applied_tenant,
    assert_keyboard_reachable,
    run_async,
    served_admin,
    sign_in,
    tenant_id,
)

SCREENSHOTS = Path(".firstmile/artifacts/screenshots")
SUBJECT = "user-audit-7"
PAYLOADS: list[dict[str, Any]] = [
    {"decision": "path_selection", "confidence": 0.8125, "inputs": {"persona": "developer", "seats": 12}},
    {"decision": "nudge", "text": 'Grüße, 東京 \u2028 "quoted" \\ back', "n": 1e21, "small": 5e-7, "empty": {}},
    {"decision": "stuck_detection", "steps": ["b", "a"], "nested": {"z": [1, {"y": None, "x": True}]}},
]


@pytest.fixture(scope="module")
def slug(database: Database) -> str:
    return applied_tenant(database, "ab")


@pytest.fixture(scope="module")
def served_app(database: Database, analytics_store: ChdbStore) -> Iterator[tuple[str, Litestar]]:
    with served_admin(database, analytics_store) as served:
        yield served


def _write(database: Database, app: Litestar, slug: str, payloads: list[dict[str, Any]], checkpoint: bool) -> None:
    """Entries about ``SUBJECT`` (and one about someone else), sequenced, and a checkpoint signed by the app's key."""
    tenant = OPERATOR_CLI.tenant(tenant_id(database, slug))

    async def work() -> None:
        engine = create_async_engine(database.app_url, pool_size=1)
        try:
            async with tenant_transaction(engine, tenant) as tx:
                for payload in payloads:
                    await append(tx, "decision", "planner", SUBJECT, payload)
                await append(tx, "admin", "admin:someone", "someone-else", {"action": "noise"})
            await sequenced(engine, tenant)
            if checkpoint:
                async with tenant_transaction(engine, tenant) as tx:
                    assert await create_checkpoint(tx, app.state.container.signer) is not None
        finally:
            await engine.dispose()

    run_async(work)


def _verify(page: Page, seq: str) -> Any:
    page.locator(f'button[data-verify="{seq}"]').click()
    verdict = page.get_by_test_id(f"verify-{seq}")
    expect(verdict).not_to_have_text("checking…", timeout=WAIT_MS)
    return verdict


def _tampered(change: Any) -> Any:
    def handle(route: Route) -> None:
        answer = route.fetch()
        body = answer.json()
        change(body)
        route.fulfill(response=answer, body=json.dumps(body))

    return handle


def test_the_audit_viewer_searches_and_verifies_proofs_in_the_browser_and_flags_tampering(
    served_app: tuple[str, Litestar], slug: str, browser: Browser, database: Database
) -> None:
    base, app = served_app
    _write(database, app, slug, PAYLOADS, checkpoint=True)
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    sign_in(page, base, slug, "analyst")  # analysts read the audit log
    page.goto(f"{base}/admin/audit?subject={SUBJECT}")
    rows = page.get_by_test_id("audit").locator("tbody tr")
    expect(rows).to_have_count(len(PAYLOADS))
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.subject)")) == {SUBJECT}
    page.get_by_test_id("audit-filter").locator("input[name=kind]").fill("admin")
    page.get_by_test_id("audit-filter").locator("input[name=subject]").fill("")
    page.get_by_role("button", name="Search").click()
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.kind)")) == {"admin"}
    page.goto(f"{base}/admin/audit?subject=nobody-at-all")
    expect(page.get_by_test_id("audit-empty")).to_have_text("No entry matches this search.")

    page.goto(f"{base}/admin/audit?subject={SUBJECT}")
    seqs = rows.evaluate_all("rs => rs.map(r => r.querySelector('button[data-verify]').dataset.verify)")
    assert len(seqs) == len(PAYLOADS)
    for seq in seqs:  # every entry, with its unicode, escapes and numbers, hashes in the browser as on the server
        verdict = _verify(page, seq)
        expect(verdict).to_have_attribute("data-verdict", "verified")
        expect(verdict).to_contain_text("Ed25519 signature by key")
    key_id = app.state.container.signer.key_id
    expect(page.get_by_test_id(f"verify-{seqs[0]}")).to_contain_text(key_id[:12])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "audit-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(SCREENSHOTS / "audit-390.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # the table scrolls, not the page
    page.set_viewport_size({"width": 1280, "height": 900})
    assert_keyboard_reachable(page)

    proof = "**/admin/api/audit/*/proof"
    altered = {"payload": lambda b: b["entry"]["payload"].update(confidence=0.99),
               "signature": lambda b: b["checkpoint"].update(signature="00" * 64),
               "path": lambda b: b.update(audit_path=b["audit_path"][:-1] or ["00" * 32]),
               "key": lambda b: b.update(public_key="11" * 32)}  # fmt: skip
    reasons = {"payload": "was altered", "signature": "does not verify", "path": "audit path",
               "key": "not the key given"}  # fmt: skip
    for name, change in altered.items():
        page.route(proof, _tampered(change))
        verdict = _verify(page, seqs[-1])
        expect(verdict).to_have_attribute("data-verdict", "failed")
        expect(verdict).to_contain_text(reasons[name])
        page.unroute(proof)
    expect(_verify(page, seqs[-1])).to_have_attribute("data-verdict", "verified")  # untouched again

    _write(database, app, slug, [{"decision": "later"}], checkpoint=False)  # no checkpoint covers it yet
    page.reload()
    newest = rows.first.locator("button[data-verify]").get_attribute("data-verify")
    assert newest is not None
    verdict = _verify(page, newest)
    expect(verdict).to_have_attribute("data-verdict", "unavailable")
    expect(verdict).to_contain_text("Not checked")
    page.close()


def test_the_audit_filters_refuse_bad_input(served_app: tuple[str, Litestar], slug: str, browser: Browser) -> None:
    base, _ = served_app
    page = browser.new_page()
    sign_in(page, base, slug, "analyst")
    bad = page.request.get(f"{base}/admin/audit?kind=Not%20A%20Kind")
    assert bad.status == 400 and bad.headers["content-type"].startswith("application/problem+json")
    long = page.request.get(f"{base}/admin/api/audit?subject={'x' * 1025}")
    assert long.status == 400 and "subject must be 1..1024" in long.json()["detail"]
    proof = page.request.get(f"{base}/admin/api/audit/-1/proof")
    assert proof.status == 400
    missing = page.request.get(f"{base}/admin/api/audit/999999999/proof")
    assert missing.status == 404 and missing.headers["content-type"].startswith("application/problem+json")
    page.close()
