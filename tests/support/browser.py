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


KEYBOARD_MARGIN = 6
"""Tab presses allowed beyond three a control (a date field's day, month and year are stops of their own)."""

_KEYBOARD_START = """() => {
  const SELECTOR = 'a[href], button, input:not([type="hidden"]), select, textarea, summary, '
    + '[tabindex]:not([tabindex="-1"])';
  const deep = () => {
    let active = document.activeElement;
    while (active && active.shadowRoot && active.shadowRoot.activeElement) active = active.shadowRoot.activeElement;
    return active;
  };
  const shown = (el) => {
    if (!el.checkVisibility({visibilityProperty: true, opacityProperty: true})) return false;
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const enabled = (el) => !el.matches(':disabled') && !el.closest('[inert]');
  const summaryOfItsDetails = (el) => el.tagName !== 'SUMMARY'
    || (el.parentElement?.tagName === 'DETAILS' && el.parentElement.querySelector(':scope > summary') === el);
  const look = (el) => {
    const s = getComputedStyle(el);
    return {outlineStyle: s.outlineStyle, outlineWidth: s.outlineWidth, outlineColor: s.outlineColor,
            outlineOffset: s.outlineOffset, boxShadow: s.boxShadow, background: s.backgroundColor,
            border: [s.borderTopColor, s.borderTopWidth, s.borderBottomColor, s.borderBottomWidth,
                     s.borderLeftColor, s.borderLeftWidth].join(' ')};
  };
  const rgba = (colour) => {
    const m = colour.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const [r, g, b, a] = m[1].split(/[ ,/]+/).filter(Boolean).map(Number);
    return [r, g, b, a === undefined || Number.isNaN(a) ? 1 : a];
  };
  const parentOf = (el) => el.parentElement || el.getRootNode().host || null;
  const backgroundOf = (start) => {  // the first opaque background colour from start up (the canvas is white)
    for (let el = start; el; el = parentOf(el)) {
      const c = rgba(getComputedStyle(el).backgroundColor);
      if (c && c[3] >= 0.5) return c;
    }
    return [255, 255, 255, 1];
  };
  const behind = (el, seen) => {
    // what the outline is drawn on: the topmost element under a point just outside it that is not the control
    const gap = parseFloat(seen.outlineOffset) + parseFloat(seen.outlineWidth) / 2;
    const r = el.getBoundingClientRect();
    const points = [[r.left - gap, r.top + r.height / 2], [r.right + gap, r.top + r.height / 2],
                    [r.left + r.width / 2, r.top - gap], [r.left + r.width / 2, r.bottom + gap]];
    const root = el.getRootNode();
    for (const [x, y] of points) {
      if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) continue;
      const under = (root.elementsFromPoint ? root : document).elementsFromPoint(x, y)
        .find((e) => e !== el && !el.contains(e));
      if (under) return backgroundOf(under);
    }
    return backgroundOf(gap >= 0 ? parentOf(el) : el);
  };
  const controls = [];
  const radios = new Set();
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.matches(SELECTOR) && shown(el) && enabled(el) && summaryOfItsDetails(el)) {
        // a group of radio buttons is one stop (the arrows move within it)
        const group = el.matches('input[type="radio"][name]') ? `${el.form ? 'f' : 'd'}:${el.name}` : null;
        if (group === null || !radios.has(group)) {
          if (group !== null) radios.add(group);
          controls.push({el, group, reached: false});
        }
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  const focused = deep();
  if (focused && focused !== document.body) focused.blur();
  walk(document);
  for (const control of controls) control.before = look(control.el);
  const visits = [];
  const onFocus = () => {
    const el = deep();
    if (!el || el === document.body) return;
    const r = el.getBoundingClientRect();
    const seen = look(el);
    const control = controls.find((c) => c.el === el
      || (c.group !== null && el.matches('input[type="radio"]') && el.name === c.el.name));
    if (control) control.reached = true;
    visits.push({el, control, look: seen, shown: shown(el), focusVisible: el.matches(':focus-visible'),
                 onPage: r.right + scrollX > 0 && r.bottom + scrollY > 0 && r.width > 1 && r.height > 1,
                 outline: rgba(seen.outlineColor), behind: behind(el, seen)});
  };
  document.addEventListener('focusin', onFocus, true);
  // done: every control reached, and the Tab order came round to where it started (so nothing else is in it)
  const done = () => controls.every((c) => c.reached) && visits.length > 1
    && visits.slice(1).some((v) => v.el === visits[0].el);
  window.__fmKeyboard = {controls, visits, onFocus, done};
  return controls.length;
}"""

_KEYBOARD_VERDICT = """() => {
  const {controls, visits, onFocus} = window.__fmKeyboard;
  document.removeEventListener('focusin', onFocus, true);
  delete window.__fmKeyboard;
  const name = (el) => {
    const label = el.labels && el.labels.length ? el.labels[0].textContent : '';
    const text = (el.getAttribute('aria-label') || label || el.textContent || el.value || el.getAttribute('name') || '')
      .replace(/\\s+/g, ' ').trim().slice(0, 48);
    const id = el.id ? `#${el.id}` : el.dataset.testid ? `[data-testid=${el.dataset.testid}]`
      : el.dataset.fm ? `[data-fm=${el.dataset.fm}]` : el.dataset.field ? `[data-field=${el.dataset.field}]` : '';
    return `${el.tagName.toLowerCase()}${id}${text ? ` "${text}"` : ''}`;
  };
  const luminance = ([r, g, b]) => {
    const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const contrast = (a, b) => {
    const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  const problems = [];
  const judged = new Set();
  for (const visit of visits) {
    const {control, look} = visit;
    if (!control || !visit.shown || !visit.onPage) {
      problems.push(`${name(visit.el)}: reached by Tab but not shown (a hidden control must not take focus)`);
      continue;
    }
    if (judged.has(control)) continue;
    judged.add(control);
    const before = control.before;
    const outline = look.outlineStyle !== 'none' && parseFloat(look.outlineWidth) > 0 && (visit.outline?.[3] ?? 1) > 0
      && ['outlineStyle', 'outlineWidth', 'outlineColor'].some((k) => look[k] !== before[k]);  // moved: not new
    const changed = (look.boxShadow !== 'none' && look.boxShadow !== before.boxShadow)
      || look.border !== before.border || look.background !== before.background;
    if (!visit.focusVisible) {
      problems.push(`${name(visit.el)}: focused by Tab without matching :focus-visible`);
    } else if (outline && look.outlineStyle !== 'auto' && visit.outline) {
      const ratio = contrast(visit.outline, visit.behind);
      if (ratio < 3) problems.push(`${name(visit.el)}: its focus outline ${look.outlineColor} has a contrast `
        + `of ${ratio.toFixed(2)}:1 with what is behind it (at least 3:1)`);
    } else if (!outline && !changed) {
      problems.push(`${name(visit.el)}: no visible focus indicator (no outline, box-shadow, border or background `
        + 'that appears on focus)');
    }
  }
  for (const control of controls) {
    if (control.el.tabIndex > 0) problems.push(`${name(control.el)}: a positive tabindex (${control.el.tabIndex})`);
    if (!control.reached) problems.push(`${name(control.el)}: not reachable by Tab`);
  }
  let active = document.activeElement;
  while (active && active.shadowRoot && active.shadowRoot.activeElement) active = active.shadowRoot.activeElement;
  if (active && active !== document.body) active.blur();
  return problems;
}"""


def keyboard_problems(page: Page, margin: int = KEYBOARD_MARGIN) -> list[str]:
    """Every visible, enabled control of the page (links, buttons, fields, ``summary``, ``tabindex`` ≥ 0, inside
    open shadow roots too) reached by pressing Tab, each with a visible focus: ``:focus-visible`` matches, and a
    new outline with at least 3:1 contrast against what it is drawn on (or the browser's own ``auto`` ring), else
    a box-shadow, border or background that changed on focus. Also refused: a positive ``tabindex``, and a hidden
    or off-page element taking focus. Tab is pressed until every control was reached and the order came round
    (at most three presses a control plus ``margin``). One line for each problem, naming the control; the page is
    left with nothing focused."""
    count = int(page.evaluate(_KEYBOARD_START))
    for pressed in range(3 * count + margin):
        page.keyboard.press("Tab")
        if pressed >= count and page.evaluate("window.__fmKeyboard.done()"):
            break
    return [str(line) for line in page.evaluate(_KEYBOARD_VERDICT)]


def assert_keyboard_reachable(page: Page, margin: int = KEYBOARD_MARGIN) -> None:
    """Fail, naming each control, unless :func:`keyboard_problems` finds none on the page as it is."""
    problems = keyboard_problems(page, margin)
    assert not problems, f"keyboard problems on {page.url}:\n" + "\n".join(problems)
