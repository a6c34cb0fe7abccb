/**
 * One mounted widget at work: load the checklist and the messages, keep them live over the stream, reconnect,
 * report messages seen and dismissed, and stop for good on an error a retry cannot fix.
 */

import { ApiClient } from "./api";
import { backoffDelay, sleep } from "./backoff";
import type { OnboardingElement } from "./element";
import { TEXT } from "./element";
import { FirstmileError } from "./errors";
import { IdentityProvider, type IdentitySource } from "./identity";
import { SseParser, readEventStream, type SseEvent } from "./sse";
import type { Checklist, ErrorDetail, Message, MessageList } from "./types";

export const CHECKLIST_PATH = "/v1/embed/checklist";
export const MESSAGES_PATH = "/v1/embed/messages";
export const STREAM_PATH = "/v1/embed/stream";
/** The reconnection delay until the stream's `retry:` says otherwise. */
export const DEFAULT_RETRY_MS = 3_000;
/** The shortest reconnection delay, whatever `retry:` says (a stream that ends at once must not spin). */
export const MIN_RETRY_MS = 1_000;
/** A stream silent this long (no event, no keep-alive comment) is dropped and opened again. */
export const STREAM_IDLE_MS = 120_000;

export interface SessionOptions {
  /** The API's base URL, without a trailing slash. */
  api: string;
  key: string;
  identity: IdentitySource;
}

function isChecklist(value: unknown): value is Checklist {
  const c = value as Checklist | null;
  return typeof c === "object" && c !== null && Array.isArray(c.steps) && typeof c.path === "object"
    && c.path !== null && typeof c.progress === "object" && c.progress !== null;
}

function isMessage(value: unknown): value is Message {
  const m = value as Message | null;
  return typeof m === "object" && m !== null && typeof m.send_id === "string" && typeof m.body === "string";
}

function asError(error: unknown): FirstmileError {
  if (error instanceof FirstmileError) return error;
  return new FirstmileError(null, "network", null, String(error), "transient");
}

export class Session {
  private readonly abort = new AbortController();
  private readonly identity: IdentityProvider;
  private readonly api: ApiClient;
  private stopped = false;
  private attempt = 0;
  private retryMs = DEFAULT_RETRY_MS;
  private checklist: Checklist | null = null;
  private messages = new Map<string, Message>();
  private readonly dismissedIds = new Set<string>();
  private readonly seenPosted = new Set<string>();
  private readonly onVisibility = (): void => this.markSeen();

  constructor(
    private readonly view: OnboardingElement,
    options: SessionOptions,
  ) {
    this.identity = new IdentityProvider(options.identity, (error) => this.fail(error));
    this.api = new ApiClient(options.api, options.key, this.identity);
  }

  start(): void {
    this.view.handlers = {
      dismiss: (id) => this.dismiss(id),
      visible: () => this.markSeen(),
      disconnected: () => this.stop(),
    };
    document.addEventListener("visibilitychange", this.onVisibility);
    this.view.setState("loading");
    void this.run();
  }

  /** Stop everything and remove the element. */
  destroy(): void {
    this.stop();
    this.view.remove();
  }

  private stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.abort.abort();
    this.identity.stop();
    this.view.handlers = null;
    document.removeEventListener("visibilitychange", this.onVisibility);
  }

  private async run(): Promise<void> {
    const signal = this.abort.signal;
    let loaded = false;
    while (!this.stopped) {
      try {
        if (!loaded) {
          const [checklist, list] = await Promise.all([
            this.api.getJson<Checklist>(CHECKLIST_PATH, signal),
            this.api.getJson<MessageList>(MESSAGES_PATH, signal),
          ]);
          if (this.stopped) return;
          this.messages = new Map((list?.messages ?? []).filter(isMessage).map((m) => [m.send_id, m]));
          if (checklist === null) {
            this.showEmpty();
            await sleep(backoffDelay(this.attempt++), signal);
            continue;
          }
          this.applyChecklist(checklist);
          loaded = true;
          this.attempt = 0;
        }
        await this.stream(signal);
        await sleep(this.retryMs, signal);
      } catch (error) {
        if (this.stopped) return;
        const e = asError(error);
        if (e.kind === "fatal") {
          this.fail(e);
          return;
        }
        if (e.kind === "not-found") {
          loaded = false;
          this.showEmpty();
        } else {
          this.emitError(e, false);
        }
        const wait = e.kind === "rate-limited" && e.retryAfterMs !== null ? e.retryAfterMs : backoffDelay(this.attempt++);
        await sleep(wait, signal);
      }
    }
  }

  /** One stream, read to its end: resolves when the server closes it, rejects on an error. */
  private async stream(signal: AbortSignal): Promise<void> {
    const local = new AbortController();
    const forward = (): void => local.abort();
    signal.addEventListener("abort", forward);
    let idle = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const arm = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        idle = true;
        local.abort();
      }, STREAM_IDLE_MS);
    };
    try {
      arm();
      const res = await this.api.request("GET", STREAM_PATH, { signal: local.signal, accept: "text/event-stream" });
      if (!res.body || !(res.headers.get("content-type") ?? "").includes("text/event-stream")) {
        throw new FirstmileError(res.status, "stream", null, "the stream did not answer text/event-stream", "transient");
      }
      this.attempt = 0;
      arm();
      const parser = new SseParser({
        onEvent: (event) => this.onEvent(event),
        onRetry: (ms) => {
          this.retryMs = Math.max(ms, MIN_RETRY_MS);
        },
      });
      await readEventStream(res.body, parser, arm);
    } catch (error) {
      if (idle && !this.stopped) {
        throw new FirstmileError(null, "network", null, `the stream was silent for ${STREAM_IDLE_MS / 1000} s`, "transient");
      }
      throw error;
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", forward);
    }
  }

  private onEvent(event: SseEvent): void {
    if (this.stopped || (event.type !== "checklist" && event.type !== "message")) return;
    let value: unknown;
    try {
      value = JSON.parse(event.data);
    } catch {
      console.warn(`[firstmile] ignored a ${event.type} event that is not JSON`);
      return;
    }
    if (event.type === "checklist" && isChecklist(value)) this.applyChecklist(value);
    else if (event.type === "message" && isMessage(value)) this.addMessage(value);
  }

  private applyChecklist(checklist: Checklist): void {
    const previous = this.checklist;
    this.checklist = checklist;
    this.view.renderChecklist(checklist);
    this.showMessages();
    if (previous && previous.user_id === checklist.user_id) {
      if (checklist.activated && !previous.activated) {
        this.view.announce(`${TEXT.done}: ${checklist.path.name} is complete`);
      } else if (checklist.progress.completed_required !== previous.progress.completed_required) {
        this.view.announce(`${checklist.path.name}: ${checklist.progress.completed_required} of ${checklist.progress.required} done`);
      }
    }
    this.emit("firstmile:checklist", checklist);
  }

  private showEmpty(): void {
    this.checklist = null;
    this.view.setState("empty");
    this.showMessages();
  }

  private addMessage(message: Message): void {
    if (this.dismissedIds.has(message.send_id)) return;
    const fresh = !this.messages.has(message.send_id);
    this.messages.set(message.send_id, message);
    this.showMessages();
    if (fresh) this.view.announce(message.subject ? `New message: ${message.subject}` : "New message");
  }

  private showMessages(): void {
    const time = (m: Message): number => Date.parse(m.sent_at) || 0;
    this.view.renderMessages([...this.messages.values()].sort((a, b) => time(b) - time(a)));
    this.markSeen();
  }

  /** `POST …/seen` once for each message the user can see and has not seen. */
  private markSeen(): void {
    if (this.stopped || !this.view.showing) return;
    const state = this.view.dataset["state"];
    if (state !== "ready" && state !== "empty") return;
    for (const message of this.messages.values()) {
      const id = message.send_id;
      if (message.seen_at !== null || this.seenPosted.has(id)) continue;
      this.seenPosted.add(id);
      this.post(id, "seen").then(
        () => {
          message.seen_at = new Date().toISOString();
        },
        (error: unknown) => {
          this.seenPosted.delete(id);
          this.sideError(error);
        },
      );
    }
  }

  private dismiss(id: string): void {
    const message = this.messages.get(id);
    if (this.stopped || !message) return;
    this.messages.delete(id);
    this.dismissedIds.add(id);
    this.showMessages();
    this.post(id, "dismiss").catch((error: unknown) => {
      if (error instanceof FirstmileError && error.status === 404) return; // already gone
      if (!this.stopped && !(error instanceof FirstmileError && error.kind === "fatal")) {
        this.dismissedIds.delete(id);
        this.messages.set(id, message);
        this.showMessages();
      }
      this.sideError(error);
    });
  }

  private async post(id: string, action: "seen" | "dismiss"): Promise<void> {
    await this.api.request("POST", `${MESSAGES_PATH}/${encodeURIComponent(id)}/${action}`, { signal: this.abort.signal });
  }

  /** An error of a seen or dismiss request: fatal ones stop the widget, others are reported. */
  private sideError(error: unknown): void {
    if (this.stopped) return;
    const e = asError(error);
    if (e.status === 404) return;
    if (e.kind === "fatal") this.fail(e);
    else this.emitError(e, false);
  }

  /** Stop for good and show the error state; the detail goes to the console, for the page's developers. */
  private fail(error: FirstmileError): void {
    if (this.stopped) return;
    this.stop();
    this.view.setState("error");
    const where = error.status === null ? "" : ` (HTTP ${error.status}${error.reason ? `, ${error.reason}` : ""})`;
    console.error(`[firstmile] ${TEXT.error} ${error.type}${where}: ${error.detail}`);
    this.emitError(error, true);
  }

  private emitError(error: FirstmileError, fatal: boolean): void {
    const detail: ErrorDetail = {
      fatal,
      status: error.status,
      type: error.type,
      reason: error.reason,
      detail: error.detail,
    };
    this.emit("firstmile:error", detail);
  }

  private emit(name: string, detail: unknown): void {
    this.view.dispatchEvent(new CustomEvent(name, { detail, bubbles: true, composed: true }));
  }
}
