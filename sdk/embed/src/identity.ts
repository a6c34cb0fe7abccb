/**
 * The user's identity token: from the page (`identity`), the tenant's backend (`identityUrl`) or a function
 * (`getIdentity`); renewed 60 s before its `exp`, and at once when Firstmile answers that it expired.
 */

import { backoffDelay } from "./backoff";
import { FirstmileError } from "./errors";
import { readExp, refreshDelay } from "./jwt";

export interface IdentitySource {
  token?: string | undefined;
  url?: string | undefined;
  get?: (() => Promise<string>) | undefined;
}

export class IdentityProvider {
  private token: string | null;
  private inflight: Promise<string> | null = null;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private failures = 0;
  private stopped = false;

  constructor(
    private readonly source: IdentitySource,
    /** Called when a background renewal fails for good (the identity URL answered 4xx, or a bad answer). */
    private readonly onFatal: (error: FirstmileError) => void,
  ) {
    this.token = source.token || null;
    if (this.token) this.schedule(this.token);
  }

  /** Whether a new token can be had (an identity URL or a function). */
  get renewable(): boolean {
    return Boolean(this.source.url || this.source.get);
  }

  /** The current token, fetched first if there is none yet. */
  current(): Promise<string> {
    return this.token !== null ? Promise.resolve(this.token) : this.refresh();
  }

  /** Fetch a new token now (one request at a time: callers share it). */
  refresh(): Promise<string> {
    if (!this.renewable) {
      return Promise.reject(
        new FirstmileError(null, "config", null, "the identity token expired and cannot be renewed: give identityUrl or getIdentity", "fatal"),
      );
    }
    if (this.inflight === null) {
      this.inflight = this.fetchToken().then(
        (token) => {
          this.inflight = null;
          this.failures = 0;
          this.token = token;
          this.schedule(token);
          return token;
        },
        (error: unknown) => {
          this.inflight = null;
          throw error;
        },
      );
    }
    return this.inflight;
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(token: string): void {
    clearTimeout(this.timer);
    const exp = readExp(token);
    if (this.stopped || exp === null || !this.renewable) return;
    this.timer = setTimeout(() => this.renewInBackground(), refreshDelay(exp, Date.now()));
  }

  private renewInBackground(): void {
    if (this.stopped) return;
    this.refresh().catch((error: unknown) => {
      if (this.stopped) return;
      if (error instanceof FirstmileError && error.kind === "fatal") {
        this.onFatal(error);
        return;
      }
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.renewInBackground(), backoffDelay(this.failures++));
    });
  }

  private async fetchToken(): Promise<string> {
    const { url, get } = this.source;
    let token: unknown;
    if (url) {
      let res: Response;
      try {
        res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" });
      } catch (error) {
        throw new FirstmileError(null, "identity-url", null, `the identity URL ${url} could not be reached (${String(error)})`, "transient");
      }
      if (!res.ok) {
        const transient = res.status >= 500 || res.status === 408 || res.status === 429;
        throw new FirstmileError(
          res.status,
          "identity-url",
          null,
          `the identity URL ${url} answered HTTP ${res.status}`,
          transient ? "transient" : "fatal",
        );
      }
      try {
        token = ((await res.json()) as { token?: unknown } | null)?.token;
      } catch {
        token = undefined;
      }
      if (typeof token !== "string" || token === "") {
        throw new FirstmileError(res.status, "identity-url", null, `the identity URL ${url} must answer JSON {"token": "<JWT>"}`, "fatal");
      }
      return token;
    }
    try {
      token = await get!();
    } catch (error) {
      throw new FirstmileError(null, "identity-url", null, `getIdentity() failed (${String(error)})`, "transient");
    }
    if (typeof token !== "string" || token === "") {
      throw new FirstmileError(null, "identity-url", null, "getIdentity() must resolve to the identity token (a string)", "fatal");
    }
    return token;
  }
}
