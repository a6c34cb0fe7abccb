import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { backoffDelay } from "../src/backoff";
import { FirstmileError } from "../src/errors";
import { IdentityProvider } from "../src/identity";
import { jwtPayload, readExp, refreshDelay } from "../src/jwt";
import { FakeFetch, json, settle, token } from "./helpers";

const NOW_S = Date.UTC(2025, 0, 2, 12, 0, 0) / 1000;

describe("reading exp", () => {
  test("exp from a base64url payload (with - and _, without padding)", () => {
    const t = token({ sub: "ü>>>?~", exp: NOW_S + 600, iat: NOW_S });
    const payload = t.split(".")[1]!;
    expect(payload).toMatch(/[-_]/);
    expect(payload).not.toContain("=");
    expect(readExp(t)).toBe(NOW_S + 600);
    expect(jwtPayload(t)).toEqual({ sub: "ü>>>?~", exp: NOW_S + 600, iat: NOW_S });
  });

  test("no exp from what is not a JWT with a numeric exp", () => {
    expect(readExp("not-a-jwt")).toBeNull();
    expect(readExp("a.b")).toBeNull();
    expect(readExp("a.!!!.c")).toBeNull();
    expect(readExp(`x.${btoa("not json")}.y`)).toBeNull();
    expect(readExp(token({ sub: "u", exp: "soon" }))).toBeNull();
    expect(readExp(token({ sub: "u" }))).toBeNull();
    expect(readExp(`x.${btoa("[1,2]")}.y`)).toBeNull();
  });

  test("renewal 60 s before exp, 15 s at the least", () => {
    const now = NOW_S * 1000;
    expect(refreshDelay(NOW_S + 600, now)).toBe(540_000);
    expect(refreshDelay(NOW_S + 61, now)).toBe(15_000);
    expect(refreshDelay(NOW_S + 90, now)).toBe(30_000);
    expect(refreshDelay(NOW_S - 10, now)).toBe(15_000);
  });

  test("backoff doubles from 1 s to a 30 s cap, drawn between half and all of it", () => {
    expect([0, 1, 2, 3, 4, 5, 6, 10].map((a) => backoffDelay(a, () => 1))).toEqual([
      1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000,
    ]);
    expect([0, 1, 5].map((a) => backoffDelay(a, () => 0))).toEqual([500, 1000, 15000]);
    expect(backoffDelay(2, () => 0.5)).toBe(3000);
  });
});

describe("IdentityProvider", () => {
  const URL = "/firstmile/identity";
  let fake: FakeFetch;

  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(NOW_S * 1000);
    vi.spyOn(Math, "random").mockReturnValue(1);
    fake = new FakeFetch();
  });

  afterEach(() => {
    vi.useRealTimers();
  });

  test("fetches the token from the identity URL, same-origin, once", async () => {
    const t1 = token({ sub: "u-1", exp: NOW_S + 600 });
    fake.on("GET", URL, () => json(200, { token: t1 }));
    const identity = new IdentityProvider({ url: URL }, () => {});
    expect(await identity.current()).toBe(t1);
    expect(await identity.current()).toBe(t1);
    expect(fake.calls).toEqual([{ url: URL, method: "GET", headers: { accept: "application/json" }, credentials: "same-origin" }]);
    identity.stop();
  });

  test("renews 60 s before exp, then again before the new token's exp", async () => {
    const t1 = token({ sub: "u-1", exp: NOW_S + 300 });
    const t2 = token({ sub: "u-1", exp: NOW_S + 240 + 600 });
    fake.on("GET", URL, () => json(200, { token: t1 }), () => json(200, { token: t2 }));
    const identity = new IdentityProvider({ url: URL }, () => {});
    await identity.current();
    await settle(240_000 - 1);
    expect(fake.count("GET", URL)).toBe(1);
    await settle(1);
    expect(fake.count("GET", URL)).toBe(2);
    expect(await identity.current()).toBe(t2);
    await settle(540_000 - 1);
    expect(fake.count("GET", URL)).toBe(2);
    await settle(1);
    expect(fake.count("GET", URL)).toBe(3);
    identity.stop();
    await settle(3_600_000);
    expect(fake.count("GET", URL)).toBe(3);
  });

  test("a token rendered into the page is renewed from the URL before it expires", async () => {
    const page = token({ sub: "u-1", exp: NOW_S + 120 });
    fake.on("GET", URL, () => json(200, { token: token({ sub: "u-1", exp: NOW_S + 900 }) }));
    const identity = new IdentityProvider({ token: page, url: URL }, () => {});
    expect(await identity.current()).toBe(page);
    expect(fake.calls).toHaveLength(0);
    await settle(60_000);
    expect(fake.count("GET", URL)).toBe(1);
    identity.stop();
  });

  test("concurrent renewals share one request", async () => {
    fake.on("GET", URL, () => json(200, { token: token({ sub: "u-1", exp: NOW_S + 600 }) }));
    const identity = new IdentityProvider({ url: URL }, () => {});
    const [a, b, c] = await Promise.all([identity.refresh(), identity.refresh(), identity.current()]);
    expect(a).toBe(b);
    expect(b).toBe(c);
    expect(fake.count("GET", URL)).toBe(1);
    identity.stop();
  });

  test("a token alone cannot be renewed, and schedules nothing", async () => {
    const identity = new IdentityProvider({ token: token({ sub: "u-1", exp: NOW_S + 100 }) }, () => {});
    expect(identity.renewable).toBe(false);
    await expect(identity.refresh()).rejects.toMatchObject({ kind: "fatal", type: "config" });
    await settle(3_600_000);
    expect(fake.calls).toHaveLength(0);
  });

  test("getIdentity() is asked instead of a URL", async () => {
    const get = vi.fn(async () => token({ sub: "u-9", exp: NOW_S + 600 }));
    const identity = new IdentityProvider({ get }, () => {});
    expect(jwtPayload(await identity.current())?.["sub"]).toBe("u-9");
    await settle(540_000);
    expect(get).toHaveBeenCalledTimes(2);
    expect(fake.calls).toHaveLength(0);
    identity.stop();
  });

  test("a failed background renewal is retried with backoff", async () => {
    fake.on(
      "GET",
      URL,
      () => json(200, { token: token({ sub: "u-1", exp: NOW_S + 300 }) }),
      new TypeError("offline"),
      () => json(503, {}),
      () => json(200, { token: token({ sub: "u-1", exp: NOW_S + 2000 }) }),
    );
    const fatal = vi.fn();
    const identity = new IdentityProvider({ url: URL }, fatal);
    await identity.current();
    await settle(240_000);
    expect(fake.count("GET", URL)).toBe(2); // offline
    await settle(999);
    expect(fake.count("GET", URL)).toBe(2);
    await settle(1);
    expect(fake.count("GET", URL)).toBe(3); // 503, after 1 s
    await settle(1_999);
    expect(fake.count("GET", URL)).toBe(3);
    await settle(1);
    expect(fake.count("GET", URL)).toBe(4); // then 2 s
    expect(readExp(await identity.current())).toBe(NOW_S + 2000);
    expect(fatal).not.toHaveBeenCalled();
    identity.stop();
  });

  test("the identity URL answering 401 (signed out) or a body without a token is fatal", async () => {
    fake.on("GET", URL, () => json(200, { token: token({ sub: "u-1", exp: NOW_S + 300 }) }), () => json(401, {}));
    const fatal = vi.fn();
    const identity = new IdentityProvider({ url: URL }, fatal);
    await identity.current();
    await settle(240_000);
    expect(fatal).toHaveBeenCalledTimes(1);
    const error = fatal.mock.calls[0]![0] as FirstmileError;
    expect([error.kind, error.type, error.status]).toEqual(["fatal", "identity-url", 401]);
    await settle(600_000);
    expect(fake.count("GET", URL)).toBe(2);

    const other = new FakeFetch().on("GET", URL, () => json(200, { jwt: "x" }));
    await expect(new IdentityProvider({ url: URL }, () => {}).current()).rejects.toMatchObject({
      kind: "fatal",
      detail: 'the identity URL /firstmile/identity must answer JSON {"token": "<JWT>"}',
    });
    expect(other.calls).toHaveLength(1);
  });
});
