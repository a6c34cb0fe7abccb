"""The embed SDK in Chromium, on the demo host page of ``make run``: a tenant's page on an origin of its own.

The API is served by uvicorn with the outbox relay in process; the demo host (``firstmile.embed.demo``)
serves the page and signs the user's identity token, as a tenant's backend does. Chromium loads the
page, the SDK renders the checklist in its shadow root (Playwright's CSS locators pierce open shadow
roots), a step completed through the tenant API shows without a reload, an in-app message delivered by
the nudge worker appears and is dismissed by keyboard, and a page whose backend signs with the wrong
secret shows the error state while the refusal lands in the audit log.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.embed.demo import DemoHost
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.inapp import InAppChannel
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import DeliveryWorker, NudgeExecutor
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.cli import create_key, create_publishable_key
from tests.conftest import PEPPER, REGION, EventsDatabase, make_settings, sequenced
from tests.factories import manifest_for
from tests.support.browser import WAIT_MS, assert_keyboard_reachable, run_async, screenshots, serious_violations
from tests.support.serving import free_port, served

OPS = OperatorContext("worker:test-embed-browser")


@dataclass
class Live:
    api: str
    app_url: str
    admin_url: str
    tenant_id: uuid.UUID
    secret: str
    host: DemoHost
    forged: DemoHost


@pytest.fixture(scope="module")
def live(events_database: EventsDatabase, analytics_store: ChdbStore) -> Iterator[Live]:
    slug = f"embb-{uuid.uuid4().hex[:8]}"
    host_port, forged_port = free_port(), free_port()
    origins = [f"http://127.0.0.1:{host_port}", f"http://127.0.0.1:{forged_port}"]

    async def setup() -> tuple[uuid.UUID, str, str, str]:
        admin = create_async_engine(events_database.admin_url, pool_size=2)
        try:
            applied = await apply_manifest(admin, manifest_for(slug, REGION))
            secret = (await create_key(admin, PEPPER, slug, ["onboarding:write"], "backend")).key
            publishable = await create_publishable_key(admin, PEPPER, slug, origins, "demo-host")
        finally:
            await admin.dispose()
        assert publishable.identity_secret is not None
        return applied.tenant_id, secret, publishable.key, publishable.identity_secret

    tenant_id, secret, publishable, identity_secret = run_async(setup)
    settings = make_settings(
        in_process_schedulers=False, nudge_in_app="on", nudge_stream_heartbeat_seconds=1, nudge_stream_seconds=60
    )
    relay = events_database.relay_url
    app = create_app(settings, events_database.app_url, PEPPER, analytics=analytics_store, relay_database_url=relay)
    with served(app) as api:
        host = DemoHost(api, secret, publishable, identity_secret, user_id=f"dh-{uuid.uuid4().hex[:8]}", port=host_port)
        wrong = "fmid_" + "W" * 43  # a backend signing with a secret that is not the key's
        forged = DemoHost(api, secret, publishable, wrong, user_id=f"dh-{uuid.uuid4().hex[:8]}", port=forged_port)
        host.start()
        forged.start()
        try:
            yield Live(api, events_database.app_url, events_database.admin_url, tenant_id, secret, host, forged)
        finally:
            host.stop()
            forged.stop()


def _deliver_in_app(live: Live, user_id: str, step: str) -> None:
    """Decide and deliver an in-app nudge to the user, as the stuck scan and the delivery worker do."""
    executor = NudgeExecutor(
        OnboardingService(CatalogCache()),
        ["in_app"],
        NudgePolicy(quiet_start=None, quiet_end=None),
        ThompsonSampler(random.Random(3)),
    )

    async def work() -> list[str]:
        engine = create_async_engine(live.app_url, pool_size=2)
        try:
            async with tenant_transaction(engine, OPS.tenant(live.tenant_id)) as tx:
                decided = await executor.on_stuck(tx, user_id, step, datetime.now(UTC))
            assert decided.status == "scheduled", decided
            worker = DeliveryWorker(engine, {"in_app": InAppChannel()}, None, rng=random.Random(5))
            return [o.status for o in await worker.deliver_tenant(OPS.tenant(live.tenant_id))]
        finally:
            await engine.dispose()

    assert run_async(work) == ["sent"]


def _statuses(page: Page) -> dict[str, str]:
    steps = page.locator('[data-fm="step"]')
    return {
        str(steps.nth(i).get_attribute("data-step-id")): str(steps.nth(i).get_attribute("data-status"))
        for i in range(steps.count())
    }


def test_the_demo_page_shows_the_checklist_and_follows_a_step_completed_through_the_api(
    page: Page, live: Live, axe_script: str
) -> None:
    page.goto(live.host.url + "/")
    expect(page.locator('[data-fm="state"]')).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
    state = live.host.ensure_started()  # idempotent: the state the page's backend started
    expected = {
        s["id"]: "completed" if s["completed"] else "available" if s["available"] else "locked" for s in state["steps"]
    }
    assert _statuses(page) == expected
    expect(page.locator('[data-fm="title"]')).to_have_text(state["path"]["name"])
    progress = page.locator('[data-fm="progress"]')
    assert progress.get_attribute("aria-valuenow") == str(state["progress"]["percent"])
    # the widget's styles live in its shadow root: the host page gained no stylesheet from it
    assert page.evaluate("document.styleSheets.length") == 1
    assert serious_violations(page, axe_script) == []
    assert screenshots(page, "embed-demo") <= 390
    assert_keyboard_reachable(page)

    page.evaluate("window.__same_page = true")
    step = state["current_step"]
    done = httpx.post(
        f"{live.api}/v1/onboarding/{live.host.user_id}/steps/{step}/complete",
        headers={"Authorization": f"Bearer {live.secret}"},
        timeout=10,
    )
    assert done.status_code == 200, done.text
    expect(page.locator(f'[data-fm="step"][data-step-id="{step}"]')).to_have_attribute(
        "data-status", "completed", timeout=WAIT_MS
    )
    after = done.json()
    expect(page.locator('[data-fm="progress"]')).to_have_attribute(
        "aria-valuenow", str(after["progress"]["percent"]), timeout=WAIT_MS
    )
    assert page.evaluate("window.__same_page === true"), "the page was reloaded"

    # the page's own button: its backend completes the next step through the API, and the widget follows
    next_step = after["current_step"]
    if next_step is not None:
        page.get_by_role("button", name="Complete my current step").click()
        expect(page.locator(f'[data-fm="step"][data-step-id="{next_step}"]')).to_have_attribute(
            "data-status", "completed", timeout=WAIT_MS
        )


def test_an_in_app_message_appears_live_and_is_dismissed_by_keyboard(page: Page, live: Live, axe_script: str) -> None:
    page.goto(live.host.url + "/")
    expect(page.locator('[data-fm="state"]')).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
    state = live.host.ensure_started()
    _deliver_in_app(live, live.host.user_id, state["current_step"])
    message = page.locator('[data-fm="message"]')
    expect(message).to_have_count(1, timeout=WAIT_MS)
    send_id = message.get_attribute("data-send-id")
    assert send_id is not None and uuid.UUID(send_id)
    expect(page.locator('[data-fm="message-body"]')).not_to_be_empty()
    assert serious_violations(page, axe_script) == []
    screenshots(page, "embed-demo-message")
    assert_keyboard_reachable(page)  # the page's button, the widget's (in its shadow root) and the message's

    dismiss = page.locator('[data-fm="dismiss"]')
    for _ in range(10):  # Tab from the page's own button reaches the widget's Dismiss
        page.keyboard.press("Tab")
        if dismiss.evaluate("b => b.getRootNode().activeElement === b"):
            break
    else:
        raise AssertionError("Dismiss is not reachable by keyboard")
    outline = dismiss.evaluate("b => getComputedStyle(b).outlineStyle")
    assert outline not in ("none", ""), "the focused Dismiss has no visible focus"
    page.keyboard.press("Enter")
    expect(page.locator('[data-fm="message"]')).to_have_count(0, timeout=WAIT_MS)

    async def stored() -> tuple[object, object]:
        engine = create_async_engine(live.admin_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        text("SELECT seen_at, dismissed_at FROM nudge_sends WHERE tenant_id = :t AND send_id = :s"),
                        {"t": live.tenant_id, "s": uuid.UUID(send_id)},
                    )
                ).one()
            return row[0], row[1]
        finally:
            await engine.dispose()

    seen_at, dismissed_at = run_async(stored)
    assert seen_at is not None and dismissed_at is not None


def test_a_page_whose_backend_signs_with_the_wrong_secret_shows_the_error_and_is_audited(
    page: Page, live: Live, axe_script: str
) -> None:
    refused: list[int] = []
    page.on("response", lambda r: refused.append(r.status) if "/v1/embed/" in r.url else None)
    page.goto(live.forged.url + "/")
    expect(page.locator('[data-fm="state"]')).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    expect(page.locator('[data-fm="step"]')).to_have_count(0)
    assert refused and set(refused) == {401}, refused
    assert serious_violations(page, axe_script) == []
    screenshots(page, "embed-demo-refused")
    assert_keyboard_reachable(page)

    async def audited() -> list[dict[str, object]]:
        engine = create_async_engine(live.admin_url, pool_size=1)
        try:
            await sequenced(engine, live.tenant_id)
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT payload FROM audit_entries WHERE tenant_id = :t AND kind = 'auth.key_refused' "
                        "ORDER BY seq"
                    ),
                    {"t": live.tenant_id},
                )
                return [dict(r[0]) for r in rows]
        finally:
            await engine.dispose()

    entries = run_async(audited)
    assert any(
        e["reason"] == "invalid-identity" and e["identity"] == "bad-signature" and e["origin"] == live.forged.url
        for e in entries
    ), entries
