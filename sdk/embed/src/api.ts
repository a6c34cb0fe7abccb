/** The embed API: every request with the publishable key and the identity token, and one retry after a renewal. */

import { FirstmileError, problemOf } from "./errors";
import type { IdentityProvider } from "./identity";

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  accept?: string;
}

export class ApiClient {
  constructor(
    /** The API's base URL, without a trailing slash. */
    readonly base: string,
    private readonly key: string,
    private readonly identity: IdentityProvider,
  ) {}

  /**
   * A successful response, or a {@link FirstmileError}. When Firstmile answers 401 `invalid-identity` with reason
   * `expired`, the token is renewed at once and the request sent again, once.
   */
  async request(method: "GET" | "POST", path: string, options: RequestOptions = {}): Promise<Response> {
    let renewed = false;
    for (;;) {
      const token = await this.identity.current();
      let res: Response;
      try {
        res = await fetch(this.base + path, {
          method,
          headers: {
            Accept: options.accept ?? "application/json",
            Authorization: `Bearer ${this.key}`,
            "X-Firstmile-Identity": token,
          },
          mode: "cors",
          credentials: "omit",
          ...(options.signal ? { signal: options.signal } : {}),
        });
      } catch (error) {
        if (options.signal?.aborted) throw error;
        throw new FirstmileError(null, "network", null, `${method} ${path} failed: ${String(error)}`);
      }
      if (res.ok) return res;
      const problem = await problemOf(res);
      if (problem.expiredIdentity && !renewed && this.identity.renewable) {
        renewed = true;
        await this.identity.refresh();
        continue;
      }
      throw problem;
    }
  }

  /** The JSON body of a GET, or null on 404 `user-not-found`. */
  async getJson<T>(path: string, signal?: AbortSignal): Promise<T | null> {
    try {
      const res = await this.request("GET", path, { signal });
      return (await res.json()) as T;
    } catch (error) {
      if (error instanceof FirstmileError && error.kind === "not-found") return null;
      throw error;
    }
  }
}
