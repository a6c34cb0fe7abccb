import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { mount } from "../src/mount";
import type { Checklist, Handle, Message } from "../src/types";
import {
  $,
  $$,
  API,
  EventStream,
  FakeFetch,
  KEY,
  checklist,
  json,
  message,
  noContent,
  settle,
  step,
  token,
} from "./helpers";

const NOW_S = Date.UTC(2025, 0, 2, 12, 0, 0) / 1000;
const IDENTITY_URL = "/firstmile/identity";
const TOKEN = token({ sub: "u-42", exp: NOW_S + 600, iat: NOW_S });
const CHECKLIST = `${API}/v1/embed/checklist`;
const MESSAGES = `${API}/v1/embed/messages`;
const STREAM = `${API}/v1/embed/stream`;
const API_HEADERS = { accept: "application/json", authorization: `Bearer ${KEY}`, "x-firstmile-identity": TOKEN };

let fake: FakeFetch;
let streams: EventStream[];
let handles: Handle[];

function serve(list: Checklist = checklist(), messages: Message[] = []): void {
  fake.on("GET", IDENTITY_URL, () => json(200, { token: TOKEN }));
  fake.on("GET", CHECKLIST, () => json(200, list));
  fake.on("GET", MESSAGES, () => json(200, { user_id: "u-42", messages }));
  fake.on("GET", STREAM, (init) => {
    const stream = new EventStream();
    streams.push(stream);
    return stream.response(init.signal);
  });
}

async function start(): Promise<HTMLElement> {
  const handle = mount({ key: KEY, api: API, identityUrl: IDENTITY_URL, target: "#onboarding" });
  handles.push(handle);
  await settle();
  return handle.element;
}

beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(NOW_S * 1000);
  vi.spyOn(Math, "random").mockReturnValue(1);
  document.body.replaceChildren(Object.assign(document.createElement("div"), { id: "onboarding" }));
  fake = new FakeFetch();
  streams = [];
  handles = [];
});

afterEach(() => {
  for (const handle of handles) handle.destroy();
  vi.useRealTimers();
});

describe("loading", () => {
  test("asks the identity URL, then the checklist, the messages and the stream, with the exact headers", async () => {
    serve();
    const host = await start();
    expect(fake.calls).toEqual([
      { url: IDENTITY_URL, method: "GET", headers: { accept: "application/json" }, credentials: "same-origin" },
      { url: CHECKLIST, method: "GET", headers: API_HEADERS, credentials: "omit" },
      { url: MESSAGES, method: "GET", headers: API_HEADERS, credentials: "omit" },
      { url: STREAM, method: "GET", headers: { ...API_HEADERS, accept: "text/event-stream" }, credentials: "omit" },
    ]);
    expect(host.parentElement?.id).toBe("onboarding");
    expect(host.tagName).toBe("FIRSTMILE-ONBOARDING");
    expect(fake.unexpected).toEqual([]);
  });

  test("shows the loading state until the checklist comes", async () => {
    let answer!: (r: Response) => void;
    fake.on("GET", IDENTITY_URL, () => json(200, { token: TOKEN }));
    fake.on("GET", CHECKLIST, () => new Promise<Response>((resolve) => (answer = resolve)));
    fake.on("GET", MESSAGES, () => json(200, { user_id: "u-42", messages: [] }));
    fake.on("GET", STREAM, (init) => new EventStream().response(init.signal));
    const host = await start();
    expect(host.dataset["state"]).toBe("loading");
    expect($(host, '[data-fm="state"]')?.dataset["state"]).toBe("loading");
    expect($(host, '[data-fm="state"]')?.getAttribute("aria-busy")).toBe("true");
    expect($(host, '[data-fm="notice"]')?.textContent).toBe("Loading your checklist…");
    expect($(host, '[data-fm="checklist"]')?.hidden).toBe(true);
    answer(json(200, checklist()));
    await settle();
    expect(host.dataset["state"]).toBe("ready");
    expect($(host, '[data-fm="state"]')?.getAttribute("aria-busy")).toBe("false");
    expect($(host, '[data-fm="notice"]')?.hidden).toBe(true);
  });
});

describe("the checklist", () => {
  test("a step whose completion waits for a person's review says so", async () => {
    serve(checklist({ steps: [step("profile", "completed"), step("contract", "pending_review"), step("tour", "locked", { waiting_for: ["contract"] })] }));
    const host = await start();
    const steps = $$(host, '[data-fm="step"]');
    expect(steps.map((s) => s.dataset["status"])).toEqual(["completed", "pending_review", "locked"]);
    expect(steps[1]!.querySelector('[data-fm="review"]')?.textContent).toBe("waiting for review");
    expect(steps[0]!.querySelector('[data-fm="review"]')).toBeNull();
    expect(steps[2]!.querySelector(".sr-only")?.textContent).toBe("Locked: ");
  });

  test("each step with its status, the current one highlighted, locked ones saying what they wait for", async () => {
    serve(
      checklist({
        steps: [
          step("profile", "completed"),
          step("connect", "available"),
          step("invite", "locked", { waiting_for: ["connect", "import"] }),
          step("import", "locked", { waiting_for: ["connect"], description: "" }),
          step("tour", "available", { optional: true }),
        ],
      }),
    );
    const host = await start();
    const steps = $$(host, '[data-fm="step"]');
    expect(steps.map((s) => [s.dataset["stepId"], s.dataset["status"]])).toEqual([
      ["profile", "completed"],
      ["connect", "available"],
      ["invite", "locked"],
      ["import", "locked"],
      ["tour", "available"],
    ]);
    expect(steps.map((s) => s.hasAttribute("data-current"))).toEqual([false, true, false, false, false]);
    expect(steps[1]!.getAttribute("aria-current")).toBe("step");
    expect(steps.map((s) => s.querySelector('[data-fm="step-title"]')?.textContent)).toEqual([
      "Title profile",
      "Title connect",
      "Title invite",
      "Title import",
      "Title tour",
    ]);
    expect(steps.map((s) => s.querySelector(".icon")?.textContent)).toEqual(["✓", "●", "○", "○", "○"]);
    expect(steps.map((s) => s.querySelector(".sr-only")?.textContent)).toEqual([
      "Completed: ",
      "Current step: ",
      "Locked: ",
      "Locked: ",
      "Available: ",
    ]);
    expect(steps.map((s) => s.querySelector('[data-fm="waiting"]')?.textContent ?? null)).toEqual([
      null,
      null,
      "after: Title connect, Title import",
      "after: Title connect",
      null,
    ]);
    expect(steps.map((s) => s.querySelector('[data-fm="optional"]')?.textContent ?? null)).toEqual([
      null,
      null,
      null,
      null,
      "optional",
    ]);
    expect(steps[3]!.querySelector('[data-fm="step-description"]')).toBeNull();
    expect(steps[0]!.querySelector('[data-fm="step-description"]')?.textContent).toBe("Description profile");
    expect($(host, '[data-fm="title"]')?.textContent).toBe("Get started with Acme");
    expect($(host, '[data-fm="title"]')?.tagName).toBe("H2");
    expect($(host, '[data-fm="activated"]')).toBeNull();
  });

  test("the progress bar and its text", async () => {
    serve(checklist({ progress: { completed_required: 3, required: 5, percent: 60 } }));
    const host = await start();
    const bar = $(host, '[data-fm="progress"]')!;
    expect(bar.getAttribute("role")).toBe("progressbar");
    expect(bar.getAttribute("aria-valuemin")).toBe("0");
    expect(bar.getAttribute("aria-valuemax")).toBe("100");
    expect(bar.getAttribute("aria-valuenow")).toBe("60");
    expect(bar.getAttribute("aria-valuetext")).toBe("3 of 5 done");
    expect((bar.firstElementChild as HTMLElement).style.width).toBe("60%");
    expect($(host, '[data-fm="progress-text"]')?.textContent).toBe("3 of 5 done");
  });

  test("server text is text, never HTML", async () => {
    const evil = '<img src=x onerror="window.pwned=1">';
    serve(
      checklist({ path: { id: "p", name: evil, version: 1 }, steps: [step("s", "available", { title: evil, description: evil })] }),
      [message("m1", { subject: evil, body: evil })],
    );
    fake.on("POST", `${MESSAGES}/m1/seen`, noContent());
    const host = await start();
    expect($$(host, "img")).toHaveLength(0);
    expect($(host, '[data-fm="title"]')?.textContent).toBe(evil);
    expect($(host, '[data-fm="step-title"]')?.textContent).toBe(evil);
    expect($(host, '[data-fm="message-body"]')?.textContent).toBe(evil);
  });

  test("every checklist event is rendered and dispatched; activation shows the banner and is announced", async () => {
    serve();
    const host = await start();
    const seen: Checklist[] = [];
    document.addEventListener("firstmile:checklist", (e) => seen.push((e as CustomEvent<Checklist>).detail));
    const next = checklist({
      current_step: "invite",
      progress: { completed_required: 2, required: 3, percent: 67 },
      steps: [step("profile", "completed"), step("connect", "completed"), step("invite", "available")],
    });
    streams[0]!.event("checklist", next);
    await settle();
    expect(seen).toEqual([next]);
    expect($$(host, '[data-fm="step"]').map((s) => s.dataset["status"])).toEqual(["completed", "completed", "available"]);
    expect($(host, '[data-fm="step"][data-current]')?.dataset["stepId"]).toBe("invite");
    expect($(host, '[data-fm="progress-text"]')?.textContent).toBe("2 of 3 done");
    expect($(host, '[data-fm="live"]')?.textContent).toBe("Get started with Acme: 2 of 3 done");
    expect($(host, '[data-fm="live"]')?.getAttribute("aria-live")).toBe("polite");

    const done = checklist({
      status: "activated",
      activated: true,
      current_step: null,
      progress: { completed_required: 3, required: 3, percent: 100 },
      steps: [step("profile", "completed"), step("connect", "completed"), step("invite", "completed")],
    });
    streams[0]!.event("checklist", done);
    await settle();
    expect(seen).toEqual([next, done]);
    expect($(host, '[data-fm="activated"]')?.textContent).toBe("You're all set");
    expect($(host, '[data-fm="step"][data-current]')).toBeNull();
    expect($(host, '[data-fm="live"]')?.textContent).toBe("You're all set: Get started with Acme is complete");
    expect($(host, '[data-fm="progress"]')?.getAttribute("aria-valuenow")).toBe("100");
  });

  test("the first render dispatches firstmile:checklist on the host element", async () => {
    serve();
    const events: Event[] = [];
    document.addEventListener("firstmile:checklist", (e) => events.push(e));
    const host = await start();
    expect(events).toHaveLength(1);
    expect(events[0]!.target).toBe(host);
    expect((events[0] as CustomEvent).detail).toEqual(checklist());
  });
});

describe("messages", () => {
  test("above the checklist, newest first, with subject, body and a labelled Dismiss button", async () => {
    serve(checklist(), [
      message("m1", { sent_at: "2025-01-02T09:00:00Z" }),
      message("m2", { subject: null, sent_at: "2025-01-02T11:00:00Z" }),
    ]);
    const host = await start();
    const list = $(host, '[data-fm="messages"]')!;
    expect(list.hidden).toBe(false);
    expect(list.compareDocumentPosition($(host, '[data-fm="checklist"]')!) & Node.DOCUMENT_POSITION_FOLLOWING).toBeTruthy();
    const items = $$(host, '[data-fm="message"]');
    expect(items.map((m) => m.dataset["sendId"])).toEqual(["m2", "m1"]);
    expect(items.map((m) => m.querySelector('[data-fm="message-subject"]')?.textContent ?? null)).toEqual([null, "Subject m1"]);
    expect(items.map((m) => m.querySelector('[data-fm="message-body"]')?.textContent)).toEqual(["Body m2", "Body m1"]);
    const buttons = items.map((m) => m.querySelector<HTMLButtonElement>('button[data-fm="dismiss"]')!);
    expect(buttons.map((b) => [b.type, b.textContent, b.getAttribute("aria-label")])).toEqual([
      ["button", "Dismiss", "Dismiss message"],
      ["button", "Dismiss", "Dismiss message: Subject m1"],
    ]);
    expect(buttons.every((b) => b.tabIndex === 0)).toBe(true);
    expect(fake.calls.filter((c) => c.method === "POST")).toEqual([]); // both seen already
  });

  test("a message shown unseen is reported seen, once", async () => {
    serve(checklist(), [message("m1", { seen_at: null }), message("m2")]);
    fake.on("POST", `${MESSAGES}/m1/seen`, noContent());
    await start();
    streams[0]!.event("checklist", checklist());
    await settle();
    expect(fake.calls.filter((c) => c.method === "POST")).toEqual([
      { url: `${MESSAGES}/m1/seen`, method: "POST", headers: API_HEADERS, credentials: "omit" },
    ]);
  });

  test("Dismiss removes the message, posts dismiss and keeps the keyboard focus in the list", async () => {
    serve(checklist(), [
      message("m1", { sent_at: "2025-01-02T11:00:00Z" }),
      message("m2", { sent_at: "2025-01-02T10:00:00Z" }),
    ]);
    fake.on("POST", `${MESSAGES}/m1/dismiss`, noContent());
    const host = await start();
    const button = $(host, '[data-send-id="m1"] [data-fm="dismiss"]')!;
    button.focus();
    button.click();
    await settle();
    expect($$(host, '[data-fm="message"]').map((m) => m.dataset["sendId"])).toEqual(["m2"]);
    expect(fake.calls.filter((c) => c.method === "POST")).toEqual([
      { url: `${MESSAGES}/m1/dismiss`, method: "POST", headers: API_HEADERS, credentials: "omit" },
    ]);
    expect(host.shadowRoot!.activeElement).toBe($(host, '[data-send-id="m2"] [data-fm="dismiss"]'));
    // The stream sending it again does not bring it back.
    streams[0]!.event("message", message("m1"), "m1");
    await settle();
    expect($$(host, '[data-fm="message"]').map((m) => m.dataset["sendId"])).toEqual(["m2"]);
  });

  test("a dismiss that fails on the network puts the message back", async () => {
    serve(checklist(), [message("m1")]);
    fake.on("POST", `${MESSAGES}/m1/dismiss`, new TypeError("offline"));
    const errors: unknown[] = [];
    document.addEventListener("firstmile:error", (e) => errors.push((e as CustomEvent).detail));
    const host = await start();
    $(host, '[data-fm="dismiss"]')!.click();
    expect($$(host, '[data-fm="message"]')).toHaveLength(0);
    await settle();
    expect($$(host, '[data-fm="message"]').map((m) => m.dataset["sendId"])).toEqual(["m1"]);
    expect(errors).toEqual([{ fatal: false, status: null, type: "network", reason: null, detail: expect.stringContaining("offline") }]);
    expect(host.dataset["state"]).toBe("ready");
  });

  test("a message from the stream goes on top, is announced and reported seen", async () => {
    serve(checklist(), [message("m1")]);
    fake.on("POST", `${MESSAGES}/m3/seen`, noContent());
    const host = await start();
    streams[0]!.push(": open\nretry: 3000\n\n");
    streams[0]!.event("message", message("m3", { subject: "Welcome!", seen_at: null, sent_at: "2025-01-02T12:00:00Z" }), "m3");
    await settle();
    expect($$(host, '[data-fm="message"]').map((m) => m.dataset["sendId"])).toEqual(["m3", "m1"]);
    expect($(host, '[data-fm="live"]')?.textContent).toBe("New message: Welcome!");
    expect(fake.count("POST", `${MESSAGES}/m3/seen`)).toBe(1);
    // Sent again on a later stream: shown once, not reported twice.
    streams[0]!.event("message", message("m3", { subject: "Welcome!", seen_at: null, sent_at: "2025-01-02T12:00:00Z" }), "m3");
    await settle();
    expect($$(host, '[data-fm="message"]')).toHaveLength(2);
    expect(fake.count("POST", `${MESSAGES}/m3/seen`)).toBe(1);
  });

  test("in a collapsed floating panel a message is reported seen only when the user opens it", async () => {
    serve(checklist());
    fake.on("POST", `${MESSAGES}/m5/seen`, noContent());
    const handle = mount({ key: KEY, api: API, identityUrl: IDENTITY_URL });
    handles.push(handle);
    await settle();
    const host = handle.element;
    expect(host.parentElement).toBe(document.body);
    expect(host.hasAttribute("data-floating")).toBe(true);
    const toggle = $(host, '[data-fm="toggle"]')!;
    expect([toggle.textContent, toggle.getAttribute("aria-expanded")]).toEqual(["Hide", "true"]);
    toggle.click();
    expect([toggle.textContent, toggle.getAttribute("aria-expanded")]).toEqual(["Show", "false"]);
    expect($(host, "#fm-content")?.hidden).toBe(true);
    streams[0]!.event("message", message("m5", { seen_at: null }), "m5");
    await settle();
    expect(fake.count("POST", `${MESSAGES}/m5/seen`)).toBe(0);
    toggle.click();
    await settle();
    expect(fake.count("POST", `${MESSAGES}/m5/seen`)).toBe(1);
  });
});

describe("the stream", () => {
  test("reconnects after the retry the server gave when it closes the stream", async () => {
    serve();
    await start();
    streams[0]!.push("retry: 5000\n: open\n\n");
    streams[0]!.close();
    await settle(4_999);
    expect(fake.count("GET", STREAM)).toBe(1);
    await settle(1);
    expect(fake.count("GET", STREAM)).toBe(2);
    expect(fake.count("GET", CHECKLIST)).toBe(1); // the stream's first event brings the checklist
  });

  test("a retry under 1 s is taken as 1 s", async () => {
    serve();
    await start();
    streams[0]!.push("retry: 0\n\n");
    streams[0]!.close();
    await settle(999);
    expect(fake.count("GET", STREAM)).toBe(1);
    await settle(1);
    expect(fake.count("GET", STREAM)).toBe(2);
  });

  test("reconnects after 3 s by default", async () => {
    serve();
    await start();
    streams[0]!.close();
    await settle(2_999);
    expect(fake.count("GET", STREAM)).toBe(1);
    await settle(1);
    expect(fake.count("GET", STREAM)).toBe(2);
  });

  test("a dropped stream reconnects with backoff, reset once a stream opens", async () => {
    serve();
    await start();
    fake.set("GET", STREAM, new TypeError("offline"), new TypeError("offline"), (init) => {
      const stream = new EventStream();
      streams.push(stream);
      return stream.response(init.signal);
    });
    streams[0]!.close();
    await settle(3_000); // the retry, then: offline
    expect(fake.count("GET", STREAM)).toBe(2);
    await settle(1_000); // backoff 1 s: offline
    expect(fake.count("GET", STREAM)).toBe(3);
    await settle(1_999);
    expect(fake.count("GET", STREAM)).toBe(3);
    await settle(1); // backoff 2 s: open
    expect(fake.count("GET", STREAM)).toBe(4);
    expect(streams).toHaveLength(2);
    streams[1]!.error();
    await settle(999);
    expect(fake.count("GET", STREAM)).toBe(4);
    await settle(1); // backoff back to 1 s
    expect(fake.count("GET", STREAM)).toBe(5);
  });

  test("a stream silent for 120 s is dropped and opened again", async () => {
    serve();
    await start();
    await settle(60_000);
    streams[0]!.push(": keep-alive\n\n");
    await settle(119_999);
    expect(streams[0]!.aborted).toBe(false);
    await settle(1);
    expect(streams[0]!.aborted).toBe(true);
    await settle(1_000);
    expect(fake.count("GET", STREAM)).toBe(2);
  });

  test("destroy() aborts the stream, removes the element and sends nothing more", async () => {
    serve();
    const host = await start();
    handles.pop()!.destroy();
    expect(streams[0]!.aborted).toBe(true);
    expect(host.isConnected).toBe(false);
    const before = fake.calls.length;
    await settle(600_000);
    expect(fake.calls.length).toBe(before);
  });

  test("removing the element from the page stops it too; moving it does not", async () => {
    serve();
    const host = await start();
    const other = document.createElement("section");
    document.body.append(other);
    other.append(host); // a move
    await settle();
    expect(streams[0]!.aborted).toBe(false);
    host.remove();
    await settle();
    expect(streams[0]!.aborted).toBe(true);
    const before = fake.calls.length;
    await settle(600_000);
    expect(fake.calls.length).toBe(before);
  });
});
