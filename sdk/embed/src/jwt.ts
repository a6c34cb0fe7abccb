/**
 * Reading an identity token's expiry. The SDK does not verify the token (it cannot: the secret stays on the
 * tenant's backend, and Firstmile verifies it); it only reads `exp` to renew the token before it expires.
 */

/** How long before `exp` a token is renewed. */
export const REFRESH_LEAD_MS = 60_000;
/** The shortest wait before a scheduled renewal (a token that looks expired, a clock that is off). */
export const MIN_REFRESH_MS = 15_000;

/** The JSON payload of a JWT (its second part, base64url), or null when it is not one. */
export function jwtPayload(token: string): Record<string, unknown> | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const part = parts[1] ?? "";
  if (!/^[A-Za-z0-9_-]*$/.test(part)) return null;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const binary = atob(base64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const payload: unknown = JSON.parse(new TextDecoder().decode(bytes));
    return payload !== null && typeof payload === "object" && !Array.isArray(payload)
      ? (payload as Record<string, unknown>)
      : null;
  } catch {
    return null;
  }
}

/** The token's `exp` (seconds since the epoch), or null when it has none. */
export function readExp(token: string): number | null {
  const exp = jwtPayload(token)?.["exp"];
  return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
}

/** Milliseconds from `now` until a token expiring at `exp` should be renewed: 60 s before, 15 s at the least. */
export function refreshDelay(exp: number, now: number): number {
  return Math.max(exp * 1000 - now - REFRESH_LEAD_MS, MIN_REFRESH_MS);
}
