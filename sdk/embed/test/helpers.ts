/** Test doubles: a scripted `fetch`, identity tokens, event-stream bodies, checklists and messages. */

import { vi } from "vitest";
import type { Checklist, ChecklistStep, Message } from "../src/types";

export const API = "https://api.firstmile.test";
export const KEY = "fmpk_test_0123456789abcdef";
export const PROBLEM = "https://firstmile.dev/problems/";

function base64url(text: string): string {
  const binary = String.fromCharCode(...new TextEncoder().encode(text)); // a JWT's JSON is UTF-8
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** An HS256-looking JWT (the SDK does not verify signatures). */
export function token(payload: Record<string, unknown>): string {
  return `${base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${base64url(JSON.stringify(payload))}.c2lnbmF0dXJl`;
}

export function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
}

export function problem(
  status: number,
  slug: string,
  extra: Record<string, unknown> = {},
  headers: Record<string, string> = {},
): Response {
  const body = { type: PROBLEM + slug, title: slug, status, detail: `detail of ${slug}`, ...extra };
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/problem+json", ...headers },
  });
}

export function noContent(): Response {
  return new Response(null, { status: 204 });
}

/** A response body the test writes to, chunk by chunk, and closes. */
export class EventStream {
  private controller!: ReadableStreamDefaultController<Uint8Array>;
  readonly body = new ReadableStream<Uint8Array>({
    start: (c) => {
      this.controller = c;
    },
  });
  closed = false;
  /** Set when the request's signal aborted the body (the SDK stopped or dropped the stream). */
  aborted = false;

  push(text: string): void {
    this.controller.enqueue(new TextEncoder().encode(text));
  }

  event(type: string, data: unknown, id?: string): void {
    this.push(`${id ? `id: ${id}\n` : ""}event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
  }

  /** The connection breaks. */
  error(): void {
    this.controller.error(new TypeError("network error"));
  }

  close(): void {
    this.closed = true;
    this.controller.close();
  }

  /** The response; an abort of `signal` errors the body, as a browser's fetch does. */
  response(signal?: AbortSignal | null): Response {
    signal?.addEventListener("abort", () => {
      this.aborted = true;
      if (!this.closed) this.controller.error(new DOMException("The operation was aborted.", "AbortError"));
    });
    return new Response(this.body, { status: 200, headers: { "content-type": "text/event-stream" } });
  }
}

export interface Call {
  url: string;
  method: string;
  headers: Record<string, string>;
  credentials: string | undefined;
}

type Reply = Response | Error | ((init: RequestInit) => Response | Error | Promise<Response>);

/**
 * A scripted `fetch`: replies are queued per "METHOD URL" and used in order (the last one stays for later calls);
 * a request with no reply queued fails the test with a network error and is recorded in `unexpected`.
 */
export class FakeFetch {
  readonly calls: Call[] = [];
  readonly unexpected: string[] = [];
  private readonly replies = new Map<string, Reply[]>();
  readonly fn = vi.fn(async (input: RequestInfo | URL, init: RequestInit = {}): Promise<Response> => {
    const url = String(input);
    const method = init.method ?? "GET";
    const headers: Record<string, string> = {};
    new Headers(init.headers).forEach((value, name) => {
      headers[name.toLowerCase()] = value;
    });
    this.calls.push({ url, method, headers, credentials: init.credentials });
    const queue = this.replies.get(`${method} ${url}`);
    if (!queue || queue.length === 0) {
      this.unexpected.push(`${method} ${url}`);
      throw new TypeError(`no reply for ${method} ${url}`);
    }
    const next = queue.length > 1 ? queue.shift()! : queue[0]!;
    const reply = typeof next === "function" ? await next(init) : next;
    if (reply instanceof Error) throw reply;
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
    return reply;
  });

  constructor() {
    vi.stubGlobal("fetch", this.fn);
  }

  /** Queue replies for `METHOD URL` (a Response object can be read once: give a function to answer many). */
  on(method: string, url: string, ...replies: Reply[]): this {
    this.replies.set(`${method} ${url}`, [...(this.replies.get(`${method} ${url}`) ?? []), ...replies]);
    return this;
  }

  /** Replace what `METHOD URL` answers. */
  set(method: string, url: string, ...replies: Reply[]): this {
    this.replies.set(`${method} ${url}`, replies);
    return this;
  }

  /** The calls to one URL (with the method), as "METHOD URL". */
  count(method: string, url: string): number {
    return this.calls.filter((c) => c.method === method && c.url === url).length;
  }

  lines(): string[] {
    return this.calls.map((c) => `${c.method} ${c.url}`);
  }
}

export function step(id: string, status: ChecklistStep["status"], extra: Partial<ChecklistStep> = {}): ChecklistStep {
  return {
    id,
    title: `Title ${id}`,
    description: `Description ${id}`,
    optional: false,
    status,
    completed_at: status === "completed" ? "2025-01-02T03:04:05Z" : null,
    waiting_for: [],
    ...extra,
  };
}

export function checklist(extra: Partial<Checklist> = {}): Checklist {
  return {
    user_id: "u-42",
    path: { id: "p-main", name: "Get started with Acme", version: 3 },
    status: "in_progress",
    activated: false,
    current_step: "connect",
    progress: { completed_required: 1, required: 3, percent: 33 },
    steps: [
      step("profile", "completed"),
      step("connect", "available"),
      step("invite", "locked", { waiting_for: ["connect"] }),
      step("tour", "available", { optional: true }),
    ],
    ...extra,
  };
}

export function message(sendId: string, extra: Partial<Message> = {}): Message {
  return {
    send_id: sendId,
    subject: `Subject ${sendId}`,
    body: `Body ${sendId}`,
    sent_at: "2025-01-02T10:00:00Z",
    seen_at: "2025-01-02T10:01:00Z",
    ...extra,
  };
}

/** Let pending promises and zero-delay timers run (fake timers). */
export async function settle(ms = 0): Promise<void> {
  await vi.advanceTimersByTimeAsync(ms);
}

/** The shadow root's element matching `selector`. */
export function $(host: Element, selector: string): HTMLElement | null {
  return host.shadowRoot!.querySelector<HTMLElement>(selector);
}

export function $$(host: Element, selector: string): HTMLElement[] {
  return Array.from(host.shadowRoot!.querySelectorAll<HTMLElement>(selector));
}
