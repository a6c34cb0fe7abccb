/** `Firstmile.mount(options)`, and the automatic mount from the script tag's `data-*` attributes. */

import { TAG, defineElement, type OnboardingElement } from "./element";
import { FirstmileError } from "./errors";
import { Session } from "./session";
import type { ErrorDetail, Handle, MountOptions } from "./types";

let defaultApi: string | null = null;

/** The API's base URL when `api` is not given: the origin the SDK's script was loaded from. */
export function setDefaultApi(url: string | null): void {
  defaultApi = url;
}

/** Why the options cannot start a widget, or null. */
export function configProblem(options: MountOptions): string | null {
  const key: unknown = options.key;
  if (typeof key !== "string" || key.trim() === "") {
    return "no publishable key: set data-key (or the key option) to the publishable key (fmpk_…)";
  }
  if (key.startsWith("fm_")) {
    return "refusing to start: the key is a secret key (fm_…), which must never be in a web page. "
      + "Use the publishable key (fmpk_…), and rotate the secret key now: it has been exposed.";
  }
  if (!key.startsWith("fmpk_")) return "the key is not a publishable key (fmpk_…)";
  if (!options.identity && !options.identityUrl && !options.getIdentity) {
    return "no identity: set data-identity-url (or data-identity, or the getIdentity option)";
  }
  if (options.getIdentity !== undefined && typeof options.getIdentity !== "function") {
    return "getIdentity must be a function returning a promise of the identity token";
  }
  return apiBase(options.api) === null ? `the API URL ${String(options.api)} is not an http(s) URL` : null;
}

function apiBase(api: string | undefined): string | null {
  try {
    const url = new URL(api || defaultApi || location.origin, location.href);
    if (url.protocol !== "https:" && url.protocol !== "http:") return null;
    return `${url.origin}${url.pathname}`.replace(/\/+$/, "");
  } catch {
    return null;
  }
}

function resolveTarget(target: Element | string | undefined): Element | null {
  if (target === undefined || target === null || target === "") return null;
  if (typeof target !== "string") return target;
  const found = document.querySelector(target);
  if (!found) throw new Error(`[firstmile] no element matches the target ${JSON.stringify(target)}`);
  return found;
}

/** Mount the widget into `options.target` (or as a floating panel) and start it. */
export function mount(options: MountOptions): Handle {
  defineElement();
  const target = resolveTarget(options.target);
  const element = document.createElement(TAG) as OnboardingElement;
  element.setFloating(target === null);
  (target ?? document.body).append(element);
  const problem = configProblem(options);
  if (problem !== null) {
    element.setState("error");
    console.error(`[firstmile] ${problem}`);
    const error = new FirstmileError(null, "config", null, problem, "fatal");
    const detail: ErrorDetail = { fatal: true, status: null, type: error.type, reason: null, detail: problem };
    queueMicrotask(() => element.dispatchEvent(new CustomEvent("firstmile:error", { detail, bubbles: true, composed: true })));
    return { element, destroy: () => element.remove() };
  }
  const session = new Session(element, {
    api: apiBase(options.api) as string,
    key: options.key,
    identity: { token: options.identity, url: options.identityUrl, get: options.getIdentity },
  });
  session.start();
  return { element, destroy: () => session.destroy() };
}

/** The options a script tag's data attributes give, or null without `data-key`. */
export function optionsFromScript(script: HTMLScriptElement): MountOptions | null {
  const attr = (name: string): string | undefined => script.getAttribute(name) ?? undefined;
  const key = attr("data-key");
  if (key === undefined) return null;
  const options: MountOptions = { key };
  const api = attr("data-api");
  const identityUrl = attr("data-identity-url");
  const identity = attr("data-identity");
  const target = attr("data-target");
  if (api) options.api = api;
  if (identityUrl) options.identityUrl = identityUrl;
  if (identity) options.identity = identity;
  if (target) options.target = target;
  return options;
}

/** Mount from the script tag when it has `data-key` (after the document is parsed). */
export function autoMount(script: HTMLScriptElement | null): void {
  const options = script ? optionsFromScript(script) : null;
  if (options === null) return;
  const go = (): void => {
    try {
      mount(options);
    } catch (error) {
      console.error(error instanceof Error ? error.message : error);
    }
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", go, { once: true });
  else go();
}
