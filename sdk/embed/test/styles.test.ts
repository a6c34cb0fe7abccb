import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { resetStyles } from "../src/element";
import { mount } from "../src/mount";
import { CSS } from "../src/styles";
import type { Handle } from "../src/types";
import { API, EventStream, FakeFetch, KEY, checklist, json, settle, token } from "./helpers";

let handles: Handle[];

function start(): HTMLElement {
  const fake = new FakeFetch();
  fake.on("GET", "/id", () => json(200, { token: token({ sub: "u", exp: Date.now() / 1000 + 600 }) }));
  fake.on("GET", `${API}/v1/embed/checklist`, () => json(200, checklist()));
  fake.on("GET", `${API}/v1/embed/messages`, () => json(200, { user_id: "u", messages: [] }));
  fake.on("GET", `${API}/v1/embed/stream`, (init) => new EventStream().response(init.signal));
  const handle = mount({ key: KEY, api: API, identityUrl: "/id", target: "#onboarding" });
  handles.push(handle);
  return handle.element;
}

beforeEach(() => {
  vi.useFakeTimers();
  handles = [];
  document.head.replaceChildren();
  document.body.replaceChildren(Object.assign(document.createElement("div"), { id: "onboarding" }));
});

afterEach(() => {
  for (const handle of handles) handle.destroy();
  resetStyles();
  vi.useRealTimers();
});

/** Relative luminance and contrast ratio (WCAG 2). */
function contrast(a: string, b: string): number {
  const lum = (hex: string): number => {
    const [r, g, bl] = [1, 3, 5].map((i) => {
      const c = parseInt(hex.slice(i, i + 2), 16) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r! + 0.7152 * g! + 0.0722 * bl!;
  };
  const [hi, lo] = [lum(a), lum(b)].sort((x, y) => y - x);
  return (hi! + 0.05) / (lo! + 0.05);
}

function fallback(name: string): string {
  const match = new RegExp(`var\\(${name},(#[0-9a-f]{6})\\)`).exec(CSS);
  if (!match) throw new Error(`no default for ${name}`);
  return match[1]!;
}

describe("styles", () => {
  test("live in the shadow root only: nothing is added to the page's head or stylesheets", async () => {
    const host = start();
    await settle();
    expect(host.shadowRoot?.mode).toBe("open");
    expect(document.head.children).toHaveLength(0);
    expect(document.querySelectorAll("style, link")).toHaveLength(0);
    expect(document.styleSheets).toHaveLength(0);
    const sheets = host.shadowRoot!.adoptedStyleSheets;
    expect(sheets).toHaveLength(1);
    const text = Array.from(sheets[0]!.cssRules, (r) => r.cssText).join("\n");
    expect(text).toContain(":host");
    expect(text).toContain(".step");
  });

  test("without constructable stylesheets, a <style> inside the shadow root", async () => {
    vi.stubGlobal("CSSStyleSheet", class {});
    resetStyles();
    const host = start();
    await settle();
    const styles = host.shadowRoot!.querySelectorAll("style");
    expect(styles).toHaveLength(1);
    expect(styles[0]!.textContent).toBe(CSS);
    expect(document.querySelectorAll("style")).toHaveLength(0);
    expect(document.head.children).toHaveLength(0);
  });

  test("every rule is scoped to the widget: no selector reaches the page", () => {
    expect(CSS).not.toMatch(/(^|[},])\s*(html|body|:root)\b/m);
    expect(CSS).toMatch(/^:host\{all:initial;/m);
  });

  test("themeable with the documented custom properties", () => {
    for (const name of ["--fm-font", "--fm-text", "--fm-muted", "--fm-bg", "--fm-accent", "--fm-radius", "--fm-border", "--fm-focus"]) {
      expect(CSS).toContain(`var(${name},`);
    }
  });

  test("the default colours have a text contrast of at least 4.5:1", () => {
    const bg = fallback("--fm-bg");
    expect(bg).toBe("#ffffff");
    expect(contrast(fallback("--fm-text"), bg)).toBeGreaterThanOrEqual(4.5);
    expect(contrast(fallback("--fm-muted"), bg)).toBeGreaterThanOrEqual(4.5);
    expect(contrast(fallback("--fm-accent"), bg)).toBeGreaterThanOrEqual(4.5); // the Dismiss button's text
    expect(contrast("#065f46", "#ecfdf5")).toBeGreaterThanOrEqual(4.5); // the "You're all set" banner
    expect(CSS).toContain(".banner{background:#ecfdf5;color:#065f46");
  });

  test("every control shows a focus ring from the keyboard, 3:1 or better on the panel by default", () => {
    expect(CSS).toMatch(/(^|[,}])button:focus-visible[,{]/m);
    const ring = /button:focus-visible[^{]*\{outline:2px solid var\(--fm-focus,var\(--fm-accent,(#[0-9a-f]{6})\)\)/.exec(CSS);
    expect(ring).not.toBeNull();
    expect(contrast(ring![1]!, fallback("--fm-bg"))).toBeGreaterThanOrEqual(3);
  });

  test("the page's own rules do not restyle the content of the shadow root", async () => {
    const pageStyle = document.createElement("style");
    pageStyle.textContent = "p, h2, li, button { color: rgb(255, 0, 0) !important; font-size: 40px !important; }";
    document.head.append(pageStyle);
    const host = start();
    await settle();
    const title = host.shadowRoot!.querySelector("h2")!;
    expect(getComputedStyle(title).color).not.toBe("rgb(255, 0, 0)");
    expect(getComputedStyle(title).fontSize).toBe("16px");
    const notInside = Array.from(document.querySelectorAll("h2, li"));
    expect(notInside).toHaveLength(0); // the content is not in the page's tree at all
  });
});
