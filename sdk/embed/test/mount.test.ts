import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import pkg from "../package.json";
import { autoMount, mount, optionsFromScript, setDefaultApi } from "../src/mount";
import type { Handle } from "../src/types";
import { VERSION } from "../src/version";
import { EventStream, FakeFetch, checklist, json, settle, token } from "./helpers";

const KEY = "fmpk_live_abc";
let fake: FakeFetch;
let handles: Handle[];

function serve(api: string): void {
  fake.on("GET", "/firstmile/identity", () => json(200, { token: token({ sub: "u", exp: Date.now() / 1000 + 600 }) }));
  fake.on("GET", `${api}/v1/embed/checklist`, () => json(200, checklist()));
  fake.on("GET", `${api}/v1/embed/messages`, () => json(200, { user_id: "u", messages: [] }));
  fake.on("GET", `${api}/v1/embed/stream`, (init) => new EventStream().response(init.signal));
}

function script(attrs: Record<string, string>): HTMLScriptElement {
  const el = document.createElement("script");
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  return el;
}

beforeEach(() => {
  vi.useFakeTimers();
  document.body.replaceChildren(Object.assign(document.createElement("div"), { id: "onboarding" }));
  fake = new FakeFetch();
  handles = [];
  setDefaultApi(null);
});

afterEach(() => {
  for (const handle of handles) handle.destroy();
  for (const el of document.querySelectorAll("firstmile-onboarding")) el.remove();
  setDefaultApi(null);
  vi.useRealTimers();
});

describe("the script tag", () => {
  test("its data attributes are the options", () => {
    expect(
      optionsFromScript(
        script({ "data-key": KEY, "data-identity-url": "/me/token", "data-target": "#onboarding", "data-api": "https://fm.test" }),
      ),
    ).toEqual({ key: KEY, identityUrl: "/me/token", target: "#onboarding", api: "https://fm.test" });
    expect(optionsFromScript(script({ "data-key": KEY, "data-identity": "tok" }))).toEqual({ key: KEY, identity: "tok" });
    expect(optionsFromScript(script({ "data-identity-url": "/x" }))).toBeNull();
  });

  test("mounts into data-target, against the origin the script came from", async () => {
    setDefaultApi("https://firstmile.example.com");
    serve("https://firstmile.example.com");
    autoMount(script({ "data-key": KEY, "data-identity-url": "/firstmile/identity", "data-target": "#onboarding" }));
    await settle();
    const host = document.querySelector<HTMLElement>("#onboarding > firstmile-onboarding")!;
    expect(host.dataset["state"]).toBe("ready");
    expect(host.hasAttribute("data-floating")).toBe(false);
    expect(fake.lines()).toEqual([
      "GET /firstmile/identity",
      "GET https://firstmile.example.com/v1/embed/checklist",
      "GET https://firstmile.example.com/v1/embed/messages",
      "GET https://firstmile.example.com/v1/embed/stream",
    ]);
  });

  test("data-api wins (a trailing slash or a path kept right); without data-target a floating panel", async () => {
    setDefaultApi("https://cdn.example.com");
    serve("https://eu.firstmile.example.com/base");
    autoMount(script({ "data-key": KEY, "data-identity-url": "/firstmile/identity", "data-api": "https://eu.firstmile.example.com/base/" }));
    await settle();
    const host = document.querySelector<HTMLElement>("body > firstmile-onboarding")!;
    expect(host.hasAttribute("data-floating")).toBe(true);
    expect(host.shadowRoot!.querySelector<HTMLElement>(".bar")!.hidden).toBe(false);
    expect(host.shadowRoot!.querySelector(".bar-title")!.textContent).toBe("Getting started · 1 of 3 done");
    expect(fake.lines()[1]).toBe("GET https://eu.firstmile.example.com/base/v1/embed/checklist");
  });

  test("waits for the document to be parsed before it looks for the target", async () => {
    serve(location.origin);
    const state = vi.spyOn(document, "readyState", "get").mockReturnValue("loading");
    autoMount(script({ "data-key": KEY, "data-identity-url": "/firstmile/identity", "data-target": "#later" }));
    await settle();
    expect(document.querySelector("firstmile-onboarding")).toBeNull();
    const later = Object.assign(document.createElement("div"), { id: "later" });
    document.body.append(later);
    state.mockReturnValue("complete");
    document.dispatchEvent(new Event("DOMContentLoaded"));
    await settle();
    expect(later.querySelector<HTMLElement>("firstmile-onboarding")?.dataset["state"]).toBe("ready");
    expect(fake.lines()[1]).toBe(`GET ${location.origin}/v1/embed/checklist`);
  });

  test("a target that is not there: console.error, nothing mounted", () => {
    const error = vi.spyOn(console, "error").mockImplementation(() => {});
    autoMount(script({ "data-key": KEY, "data-identity-url": "/x", "data-target": "#missing" }));
    expect(error.mock.calls).toEqual([['[firstmile] no element matches the target "#missing"']]);
    expect(document.querySelector("firstmile-onboarding")).toBeNull();
    expect(() => mount({ key: KEY, identityUrl: "/x", target: "#missing" })).toThrow('no element matches the target "#missing"');
  });
});

describe("mount()", () => {
  test("into an element, with getIdentity", async () => {
    const api = "https://api.example.com";
    fake.on("GET", `${api}/v1/embed/checklist`, () => json(200, checklist()));
    fake.on("GET", `${api}/v1/embed/messages`, () => json(200, { user_id: "u", messages: [] }));
    fake.on("GET", `${api}/v1/embed/stream`, (init) => new EventStream().response(init.signal));
    const tok = token({ sub: "u", exp: Date.now() / 1000 + 600 });
    const target = document.getElementById("onboarding")!;
    const handle = mount({ key: KEY, api, getIdentity: async () => tok, target });
    handles.push(handle);
    await settle();
    expect(handle.element.parentElement).toBe(target);
    expect(handle.element.dataset["state"]).toBe("ready");
    expect(fake.calls[0]!.headers["x-firstmile-identity"]).toBe(tok);
  });

  test("window.Firstmile has mount and the package's version", async () => {
    await import("../src/index");
    expect(window.Firstmile?.version).toBe(pkg.version);
    expect(VERSION).toBe(pkg.version);
    expect(window.Firstmile?.mount).toBe(mount);
    expect(Object.isFrozen(window.Firstmile)).toBe(true);
    expect(document.querySelector("firstmile-onboarding")).toBeNull(); // no script tag: no automatic mount
  });
});
