/**
 * `<firstmile-onboarding>`: the view. An open shadow root holds the styles and the content; every text from the
 * server is set with `textContent` (never as HTML). Stable `data-fm` attributes name the parts for tests and for
 * host pages (Playwright's CSS selectors pierce open shadow roots).
 */

import type { Checklist, ChecklistStep, Message } from "./types";
import { CSS } from "./styles";

export const TAG = "firstmile-onboarding";

export type ViewState = "loading" | "ready" | "empty" | "error";

export const TEXT = {
  loading: "Loading your checklist…",
  empty: "Your onboarding checklist will appear here once you get started.",
  error: "This checklist could not be loaded.",
  done: "You're all set",
} as const;

export interface ViewHandlers {
  /** The user pressed a message's Dismiss button. */
  dismiss(sendId: string): void;
  /** The messages may have become visible (the panel expanded, the page shown). */
  visible(): void;
  /** The element left the document (and did not come back in the same task). */
  disconnected(): void;
}

export interface OnboardingElement extends HTMLElement {
  handlers: ViewHandlers | null;
  /** Whether the user can see the content now (connected, not collapsed, the page not hidden). */
  readonly showing: boolean;
  setFloating(floating: boolean): void;
  setState(state: ViewState): void;
  renderChecklist(checklist: Checklist): void;
  renderMessages(messages: readonly Message[]): void;
  announce(text: string): void;
}

type Attrs = Record<string, string | boolean | undefined>;

/** An element with attributes and children (strings become text nodes). */
export function h(tag: string, attrs: Attrs = {}, ...children: (Node | string | null)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null) el.append(child);
  }
  return el;
}

let sheet: CSSStyleSheet | null | undefined;

/**
 * The styles into the shadow root: a constructed stylesheet where the browser has them (a page's strict
 * Content-Security-Policy, `style-src 'self'`, does not block it), else a `<style>` element in the shadow root.
 */
export function adoptStyles(root: ShadowRoot): void {
  if (sheet === undefined) {
    sheet = null;
    try {
      if ("adoptedStyleSheets" in root && "replaceSync" in CSSStyleSheet.prototype) {
        const constructed = new CSSStyleSheet();
        constructed.replaceSync(CSS);
        sheet = constructed;
      }
    } catch {
      sheet = null;
    }
  }
  if (sheet) {
    root.adoptedStyleSheets = [sheet];
  } else {
    root.append(h("style", {}, CSS));
  }
}

/** Forget the shared stylesheet (tests). */
export function resetStyles(): void {
  sheet = undefined;
}

function progressText(checklist: Checklist): string {
  const { completed_required, required } = checklist.progress;
  if (required > 0) return `${completed_required} of ${required} done`;
  const done = checklist.steps.filter((s) => s.status === "completed").length;
  return `${done} of ${checklist.steps.length} done`;
}

const STATUS_LABEL = { completed: "Completed", pending_review: "Waiting for review", available: "Available", locked: "Locked" } as const;
const STATUS_ICON = { completed: "✓", pending_review: "◔", available: "○", locked: "○" } as const;

function stepItem(step: ChecklistStep, current: boolean, titles: Map<string, string>): HTMLElement {
  const waiting = step.status === "locked" && step.waiting_for.length > 0
    ? h("p", { class: "waiting muted", "data-fm": "waiting" },
        `after: ${step.waiting_for.map((id) => titles.get(id) ?? id).join(", ")}`)
    : null;
  return h(
    "li",
    {
      class: "step",
      "data-fm": "step",
      "data-step-id": step.id,
      "data-status": step.status,
      "data-current": current,
      "data-optional": step.optional,
      "aria-current": current ? "step" : undefined,
    },
    h("span", { class: "icon", "aria-hidden": "true" }, current ? "●" : STATUS_ICON[step.status]),
    h(
      "div",
      {},
      h(
        "p",
        {},
        h("span", { class: "sr-only" }, `${current ? "Current step" : STATUS_LABEL[step.status]}: `),
        h("span", { class: "step-title", "data-fm": "step-title" }, step.title),
        step.optional ? h("span", { class: "tag", "data-fm": "optional" }, "optional") : null,
        step.status === "pending_review" ? h("span", { class: "tag", "data-fm": "review" }, "waiting for review") : null,
      ),
      step.description ? h("p", { class: "desc muted", "data-fm": "step-description" }, step.description) : null,
      waiting,
    ),
  );
}

function messageItem(message: Message, onDismiss: (li: HTMLElement) => void): HTMLElement {
  const label = message.subject ? `Dismiss message: ${message.subject}` : "Dismiss message";
  const button = h("button", { type: "button", "data-fm": "dismiss", "aria-label": label }, "Dismiss");
  const li = h(
    "li",
    { class: "message", "data-fm": "message", "data-send-id": message.send_id },
    message.subject ? h("p", { class: "subject", "data-fm": "message-subject" }, message.subject) : null,
    h("p", { class: "body", "data-fm": "message-body" }, message.body),
    button,
  );
  button.addEventListener("click", () => onDismiss(li));
  return li;
}

/** Define `<firstmile-onboarding>` (once; a second copy of the script reuses the first definition). */
export function defineElement(): void {
  if (customElements.get(TAG)) return;

  class FirstmileOnboarding extends HTMLElement implements OnboardingElement {
    handlers: ViewHandlers | null = null;
    private readonly box: HTMLElement;
    private readonly bar: HTMLElement;
    private readonly toggle: HTMLElement;
    private readonly content: HTMLElement;
    private readonly notice: HTMLElement;
    private readonly live: HTMLElement;
    private readonly messages: HTMLElement;
    private readonly checklist: HTMLElement;
    private collapsed = false;

    constructor() {
      super();
      const root = this.attachShadow({ mode: "open" });
      adoptStyles(root);
      this.toggle = h(
        "button",
        { type: "button", "data-fm": "toggle", "aria-expanded": "true", "aria-controls": "fm-content" },
        "Hide",
      );
      this.toggle.addEventListener("click", () => this.setCollapsed(!this.collapsed));
      this.bar = h("div", { class: "bar", hidden: true }, h("span", { class: "bar-title" }, "Getting started"), this.toggle);
      this.live = h("div", { class: "sr-only", "data-fm": "live", role: "status", "aria-live": "polite" });
      this.notice = h("p", { class: "notice", "data-fm": "notice" }, TEXT.loading);
      this.messages = h("ul", { class: "messages", "data-fm": "messages", "aria-label": "Messages", hidden: true });
      this.checklist = h("div", { class: "checklist", "data-fm": "checklist", hidden: true });
      this.content = h("div", { id: "fm-content" }, this.notice, this.messages, this.checklist);
      this.box = h(
        "section",
        {
          class: "fm state-loading",
          "data-fm": "state",
          "data-state": "loading",
          "aria-label": "Onboarding checklist",
          "aria-busy": "true",
          tabindex: "-1",
        },
        this.bar,
        this.live,
        this.content,
      );
      root.append(this.box);
    }

    get showing(): boolean {
      return this.isConnected && !this.collapsed && document.visibilityState !== "hidden";
    }

    connectedCallback(): void {
      if (!this.dataset["state"]) this.dataset["state"] = "loading";
    }

    disconnectedCallback(): void {
      // Moving the element fires disconnected then connected in the same task: only a real removal stops it.
      queueMicrotask(() => {
        if (!this.isConnected) this.handlers?.disconnected();
      });
    }

    setFloating(floating: boolean): void {
      this.toggleAttribute("data-floating", floating);
      this.bar.hidden = !floating;
    }

    private setCollapsed(collapsed: boolean): void {
      this.collapsed = collapsed;
      this.content.hidden = collapsed;
      this.toggle.textContent = collapsed ? "Show" : "Hide";
      this.toggle.setAttribute("aria-expanded", String(!collapsed));
      if (!collapsed) this.handlers?.visible();
    }

    setState(state: ViewState): void {
      this.dataset["state"] = state;
      this.box.dataset["state"] = state;
      this.box.className = `fm state-${state}`;
      this.box.setAttribute("aria-busy", String(state === "loading"));
      this.notice.hidden = state === "ready";
      if (state !== "ready") this.notice.textContent = TEXT[state];
      this.checklist.hidden = state !== "ready";
      if (state === "error" || state === "loading") this.messages.hidden = true;
      else this.messages.hidden = this.messages.childElementCount === 0;
    }

    renderChecklist(checklist: Checklist): void {
      const titles = new Map(checklist.steps.map((s) => [s.id, s.title]));
      const text = progressText(checklist);
      const percent = Math.max(0, Math.min(100, Math.round(checklist.progress.percent)));
      const fill = h("div", { class: "fill" });
      fill.style.width = `${percent}%`;
      const parts = [
        h("h2", { "data-fm": "title" }, checklist.path.name),
        checklist.activated ? h("p", { class: "banner", "data-fm": "activated" }, TEXT.done) : null,
        h(
          "div",
          {
            class: "track",
            role: "progressbar",
            "data-fm": "progress",
            "aria-label": "Onboarding progress",
            "aria-valuemin": "0",
            "aria-valuemax": "100",
            "aria-valuenow": String(percent),
            "aria-valuetext": text,
          },
          fill,
        ),
        h("p", { class: "progress-text muted", "data-fm": "progress-text" }, text),
        h(
          "ol",
          { class: "steps", "data-fm": "steps" },
          ...checklist.steps.map((s) => stepItem(s, s.id === checklist.current_step && s.status !== "completed", titles)),
        ),
      ];
      this.checklist.replaceChildren(...parts.filter((p): p is HTMLElement => p !== null));
      const barTitle = this.bar.firstElementChild;
      if (barTitle) barTitle.textContent = `Getting started · ${text}`;
      this.setState("ready");
    }

    renderMessages(messages: readonly Message[]): void {
      const list = this.messages;
      const existing = new Map<string, Element>();
      for (const li of Array.from(list.children)) existing.set(li.getAttribute("data-send-id") ?? "", li);
      let previous: Element | null = null;
      for (const message of messages) {
        let li = existing.get(message.send_id);
        if (li) existing.delete(message.send_id);
        else li = messageItem(message, (item) => this.dismissed(item));
        const expected: ChildNode | null = previous ? previous.nextSibling : list.firstChild;
        if (li !== expected) list.insertBefore(li, expected);
        previous = li;
      }
      for (const li of existing.values()) li.remove();
      const state = this.box.dataset["state"];
      list.hidden = messages.length === 0 || state === "error" || state === "loading";
    }

    private dismissed(item: HTMLElement): void {
      const id = item.getAttribute("data-send-id");
      const neighbour = item.nextElementSibling ?? item.previousElementSibling;
      if (id === null) return;
      this.handlers?.dismiss(id);
      // Keep the keyboard user's place: the next message's button, else the widget itself.
      const next = neighbour?.isConnected ? neighbour.querySelector("button") : null;
      (next ?? this.box).focus();
    }

    announce(text: string): void {
      this.live.textContent = text;
    }
  }

  customElements.define(TAG, FirstmileOnboarding);
}
