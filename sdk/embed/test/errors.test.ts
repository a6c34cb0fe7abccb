import { afterEach, beforeEach, describe, expect, test, vi, type MockInstance } from "vitest";
import { autoMount, mount } from "../src/mount";
import type { ErrorDetail, Handle, MountOptions } from "../src/types";
import { $, API, EventStream, FakeFetch, KEY, checklist, json, problem, settle, token } from "./helpers";

const NOW_S = Date.UTC(2025, 0, 2, 12, 0, 0) / 1000;
const IDENTITY_URL = "/firstmile/identity";
const T1 = token({ sub: "u-42", exp: NOW_S + 600, iat: NOW_S, n: 1 });
const T2 = token({ sub: "u-42", exp: NOW_S + 900, iat: NOW_S, n: 2 });
const CHECKLIST = `${API}/v1/embed/checklist`;
const MESSAGES = `${API}/v1/embed/messages`;
const STREAM = `${API}/v1/embed/stream`;
const NO_MESSAGES = { user_id: "u-42", messages: [] };

let fake: FakeFetch;
let handles: Handle[];
let errors: ErrorDetail[];
let consoleError: MockInstance<(...args: unknown[]) => void>;
const onError = (e: Event): void => {
  errors.push((e as CustomEvent<ErrorDetail>).detail);
};

function streamReply(init: RequestInit): Response {
  return new EventStream().response(init.signal);
}

/** Mount with the test's options over the defaults (a key given as undefined is left out). */
function start(options: Record<string, unknown> = {}): HTMLElement {
  const merged = { key: KEY, api: API, identityUrl: IDENTITY_URL, target: "#onboarding", ...options };
  const defined = Object.fromEntries(Object.entries(merged).filter(([, v]) => v !== undefined));
  const handle = mount(defined as unknown as MountOptions);
  handles.push(handle);
  return handle.element;
}

/** The identity header of each request to `url`. */
function identities(url: string): (string | undefined)[] {
  return fake.calls.filter((c) => c.url === url).map((c) => c.headers["x-firstmile-identity"]);
}

function expectStopped(host: HTMLElement): void {
  expect(host.dataset["state"]).toBe("error");
  expect($(host, '[data-fm="state"]')?.dataset["state"]).toBe("error");
  expect($(host, '[data-fm="notice"]')?.textContent).toBe("This checklist could not be loaded.");
  expect($(host, '[data-fm="checklist"]')?.hidden).toBe(true);
  expect($(host, '[data-fm="messages"]')?.hidden).toBe(true);
}

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(NOW_S * 1000);
  vi.spyOn(Math, "random").mockReturnValue(1);
  consoleError = vi.spyOn(console, "error").mockImplementation(() => {});
  document.body.replaceChildren(Object.assign(document.createElement("div"), { id: "onboarding" }));
  fake = new FakeFetch();
  handles = [];
  errors = [];
  document.addEventListener("firstmile:error", onError);
});

afterEach(() => {
  document.removeEventListener("firstmile:error", onError);
  for (const handle of handles) handle.destroy();
  vi.useRealTimers();
});

describe("an expired identity token", () => {
  test("401 expired: a new token from the identity URL at once, and the request again, once", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }), () => json(200, { token: T2 }));
    fake.on("GET", CHECKLIST, () => problem(401, "invalid-identity", { reason: "expired" }), () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, streamReply);
    const host = start();
    await settle();
    expect(host.dataset["state"]).toBe("ready");
    expect(fake.count("GET", IDENTITY_URL)).toBe(2);
    expect(identities(CHECKLIST)).toEqual([T1, T2]);
    expect(identities(MESSAGES)).toEqual([T1]);
    expect(identities(STREAM)).toEqual([T2]);
    expect(errors).toEqual([]);
    expect(consoleError).not.toHaveBeenCalled();
  });

  test("401 expired again after the renewal: the error state, no third try", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }), () => json(200, { token: T2 }));
    fake.on("GET", CHECKLIST, () => problem(401, "invalid-identity", { reason: "expired" }));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    const host = start();
    await settle();
    expectStopped(host);
    expect(identities(CHECKLIST)).toEqual([T1, T2]);
    await settle(600_000);
    expect(fake.count("GET", CHECKLIST)).toBe(2);
    expect(errors).toEqual([
      { fatal: true, status: 401, type: "invalid-identity", reason: "expired", detail: "detail of invalid-identity" },
    ]);
  });

  test("a token rendered into the page, without a way to renew it: the error state", async () => {
    fake.on("GET", CHECKLIST, () => problem(401, "invalid-identity", { reason: "expired" }));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    const host = start({ identityUrl: undefined, identity: T1 });
    await settle();
    expectStopped(host);
    expect(fake.count("GET", CHECKLIST)).toBe(1);
    expect(identities(CHECKLIST)).toEqual([T1]);
  });

  test("the stream answering 401 expired renews the token and reconnects at once", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }), () => json(200, { token: T2 }));
    fake.on("GET", CHECKLIST, () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, () => problem(401, "invalid-identity", { reason: "expired" }), streamReply);
    const host = start();
    await settle();
    expect(identities(STREAM)).toEqual([T1, T2]);
    expect(host.dataset["state"]).toBe("ready");
  });
});

describe("refused", () => {
  test.each([
    [403, "origin-not-allowed", null],
    [401, "unauthenticated", null],
    [401, "invalid-identity", "bad-signature"],
    [401, "invalid-identity", "malformed"],
  ])("%i %s (%s): the error state, the detail in the console, no retry", async (status, slug, reason) => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, () => problem(status, slug, reason ? { reason } : {}));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    const host = start();
    await settle();
    expectStopped(host);
    const where = reason ? `HTTP ${status}, ${reason}` : `HTTP ${status}`;
    expect(consoleError.mock.calls).toEqual([
      [`[firstmile] This checklist could not be loaded. ${slug} (${where}): detail of ${slug}`],
    ]);
    expect(errors).toEqual([{ fatal: true, status, type: slug, reason, detail: `detail of ${slug}` }]);
    await settle(3_600_000);
    expect(fake.count("GET", CHECKLIST)).toBe(1);
    expect(fake.count("GET", IDENTITY_URL)).toBe(1);
    expect(fake.count("GET", STREAM)).toBe(0);
  });

  test("403 on the stream stops it too", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, () => problem(403, "origin-not-allowed"));
    const host = start();
    await settle();
    expectStopped(host);
    await settle(600_000);
    expect(fake.count("GET", STREAM)).toBe(1);
  });

  test("the identity URL answering 401 (the user signed out) is an error, not retried", async () => {
    fake.on("GET", IDENTITY_URL, () => json(401, { error: "signed out" }));
    const host = start();
    await settle();
    expectStopped(host);
    expect(errors).toEqual([
      { fatal: true, status: 401, type: "identity-url", reason: null, detail: "the identity URL /firstmile/identity answered HTTP 401" },
    ]);
    await settle(600_000);
    expect(fake.calls).toHaveLength(1);
  });
});

describe("not started", () => {
  test("404 user-not-found: the empty state, not an error, until the user starts", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, () => problem(404, "user-not-found"), () => problem(404, "user-not-found"), () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => problem(404, "user-not-found"), () => problem(404, "user-not-found"), () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, streamReply);
    const host = start();
    await settle();
    expect(host.dataset["state"]).toBe("empty");
    expect($(host, '[data-fm="notice"]')?.textContent).toBe("Your onboarding checklist will appear here once you get started.");
    expect($(host, '[data-fm="checklist"]')?.hidden).toBe(true);
    expect(errors).toEqual([]);
    expect(consoleError).not.toHaveBeenCalled();
    expect(fake.count("GET", STREAM)).toBe(0);
    await settle(1_000);
    expect(fake.count("GET", CHECKLIST)).toBe(2);
    expect(host.dataset["state"]).toBe("empty");
    await settle(1_999);
    expect(fake.count("GET", CHECKLIST)).toBe(2);
    await settle(1);
    expect(fake.count("GET", CHECKLIST)).toBe(3);
    expect(host.dataset["state"]).toBe("ready");
    expect(fake.count("GET", STREAM)).toBe(1);
  });
});

describe("rate limited and network errors", () => {
  test("429 waits Retry-After", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, () => problem(429, "rate-limited", {}, { "Retry-After": "7" }), () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, streamReply);
    const host = start();
    await settle();
    expect(host.dataset["state"]).toBe("loading");
    expect(errors).toEqual([{ fatal: false, status: 429, type: "rate-limited", reason: null, detail: "detail of rate-limited" }]);
    await settle(6_999);
    expect(fake.count("GET", CHECKLIST)).toBe(1);
    await settle(1);
    expect(fake.count("GET", CHECKLIST)).toBe(2);
    expect(host.dataset["state"]).toBe("ready");
  });

  test("network errors back off exponentially to 30 s, with jitter", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, new TypeError("Failed to fetch"));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    vi.spyOn(Math, "random").mockReturnValue(0.5);
    const host = start();
    await settle();
    const times: number[] = [];
    const t0 = Date.now();
    let seen = fake.count("GET", CHECKLIST);
    while (times.length < 8) {
      await settle(250);
      const now = fake.count("GET", CHECKLIST);
      if (now !== seen) times.push(Date.now() - t0);
      seen = now;
    }
    // Waits of 0.75 × 1, 2, 4, 8, 16, 30, 30, 30 s (Math.random() = 0.5: three quarters of the ceiling).
    const waits = times.map((t, i) => t - (i === 0 ? 0 : times[i - 1]!));
    expect(waits).toEqual([750, 1500, 3000, 6000, 12000, 22500, 22500, 22500]);
    expect(host.dataset["state"]).toBe("loading");
    expect(errors[0]).toEqual({ fatal: false, status: null, type: "network", reason: null, detail: expect.stringContaining("Failed to fetch") });
    expect(consoleError).not.toHaveBeenCalled();
  });

  test("a 503 is retried too", async () => {
    fake.on("GET", IDENTITY_URL, () => json(200, { token: T1 }));
    fake.on("GET", CHECKLIST, () => problem(503, "unavailable"), () => json(200, checklist()));
    fake.on("GET", MESSAGES, () => json(200, NO_MESSAGES));
    fake.on("GET", STREAM, streamReply);
    const host = start();
    await settle(1_000);
    expect(fake.count("GET", CHECKLIST)).toBe(2);
    expect(host.dataset["state"]).toBe("ready");
  });
});

describe("configuration", () => {
  test("a secret key (fm_) is refused: the error state, console.error, no request", async () => {
    const host = start({ key: "fm_live_secret_0123456789" });
    await settle();
    expectStopped(host);
    expect(consoleError).toHaveBeenCalledTimes(1);
    expect(String(consoleError.mock.calls[0]![0])).toMatch(/^\[firstmile\] refusing to start: the key is a secret key \(fm_…\)/);
    expect(errors).toEqual([{ fatal: true, status: null, type: "config", reason: null, detail: expect.stringContaining("secret key") }]);
    await settle(60_000);
    expect(fake.calls).toEqual([]);
  });

  test("a secret key in the script tag is refused the same way", async () => {
    const script = document.createElement("script");
    script.setAttribute("data-key", "fm_abc");
    script.setAttribute("data-identity-url", IDENTITY_URL);
    script.setAttribute("data-target", "#onboarding");
    autoMount(script);
    await settle();
    const host = document.querySelector<HTMLElement>("#onboarding firstmile-onboarding")!;
    expectStopped(host);
    expect(fake.calls).toEqual([]);
    host.remove();
  });

  test.each([
    [{ key: "" }, "no publishable key: set data-key (or the key option) to the publishable key (fmpk_…)"],
    [{ key: "pk_live_123" }, "the key is not a publishable key (fmpk_…)"],
    [{ identityUrl: undefined }, "no identity: set data-identity-url (or data-identity, or the getIdentity option)"],
    [{ api: "javascript:alert(1)" }, "the API URL javascript:alert(1) is not an http(s) URL"],
  ])("%o is refused", async (options, detail) => {
    const host = start(options);
    await settle();
    expectStopped(host);
    expect(consoleError.mock.calls).toEqual([[`[firstmile] ${detail}`]]);
    expect(fake.calls).toEqual([]);
  });
});
