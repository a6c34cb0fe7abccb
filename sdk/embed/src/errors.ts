/** What went wrong, and what the SDK does about it. */

export type ErrorKind =
  /** Stop and show the error state (401 or 403 other than an expired token, another 4xx, a bad configuration). */
  | "fatal"
  /** 404 `user-not-found`: the user has not started onboarding (the empty state). */
  | "not-found"
  /** 429: wait `Retry-After`. */
  | "rate-limited"
  /** A network error, a 5xx: retry with backoff. */
  | "transient";

export class FirstmileError extends Error {
  readonly kind: ErrorKind;

  constructor(
    /** The HTTP status, or null when no response came. */
    readonly status: number | null,
    /** The problem's `type` slug, or `network`, `identity-url`, `config`, `stream`. */
    readonly type: string,
    readonly reason: string | null,
    readonly detail: string,
    kind?: ErrorKind,
    /** From `Retry-After`, on a 429. */
    readonly retryAfterMs: number | null = null,
  ) {
    super(detail);
    this.name = "FirstmileError";
    this.kind = kind ?? kindOf(status, type);
  }

  get expiredIdentity(): boolean {
    return this.status === 401 && this.type === "invalid-identity" && this.reason === "expired";
  }
}

function kindOf(status: number | null, type: string): ErrorKind {
  if (status === null || status >= 500 || status === 408) return "transient";
  if (status === 429) return "rate-limited";
  if (status === 404 && type === "user-not-found") return "not-found";
  return "fatal";
}

/** `Retry-After` (delay-seconds or an HTTP date) in milliseconds, or null. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value === null) return null;
  const text = value.trim();
  if (/^[0-9]+$/.test(text)) return parseInt(text, 10) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, date - now);
}

/** The problem details (RFC 9457) of a failed response as a {@link FirstmileError}. */
export async function problemOf(res: Response): Promise<FirstmileError> {
  let body: Record<string, unknown> = {};
  if ((res.headers.get("content-type") ?? "").includes("json")) {
    try {
      const parsed: unknown = await res.json();
      if (parsed !== null && typeof parsed === "object") body = parsed as Record<string, unknown>;
    } catch {
      // not JSON after all: the status says enough
    }
  }
  const str = (v: unknown): string | null => (typeof v === "string" && v !== "" ? v : null);
  const typeUri = str(body["type"]);
  const slug = typeUri ? (typeUri.split("/").pop() ?? typeUri) : `http-${res.status}`;
  const detail = str(body["detail"]) ?? str(body["title"]) ?? `HTTP ${res.status}`;
  return new FirstmileError(
    res.status,
    slug,
    str(body["reason"]),
    detail,
    undefined,
    res.status === 429 ? parseRetryAfter(res.headers.get("retry-after")) : null,
  );
}
