/** The embed API's wire types (`GET /v1/embed/checklist`, `GET /v1/embed/messages`, the stream's events). */

export type StepStatus = "completed" | "pending_review" | "available" | "locked";

export interface ChecklistStep {
  id: string;
  title: string;
  description: string;
  optional: boolean;
  status: StepStatus;
  completed_at: string | null;
  /** The ids of the prerequisites not completed yet. */
  waiting_for: string[];
}

export interface Checklist {
  user_id: string;
  path: { id: string; name: string; version: number };
  status: string;
  activated: boolean;
  current_step: string | null;
  progress: { completed_required: number; required: number; percent: number };
  steps: ChecklistStep[];
}

export interface Message {
  send_id: string;
  subject: string | null;
  body: string;
  sent_at: string;
  seen_at: string | null;
}

export interface MessageList {
  user_id: string;
  messages: Message[];
}

/** `options` of `Firstmile.mount`. */
export interface MountOptions {
  /** The publishable key (`fmpk_…`). A secret key (`fm_…`) is refused. */
  key: string;
  /** The Firstmile API's base URL; by default the origin the SDK's script was loaded from. */
  api?: string;
  /** A URL of the tenant's own backend answering `{"token": "<JWT>"}` for the signed-in user (same origin). */
  identityUrl?: string;
  /** An identity token rendered into the page (cannot be renewed unless `identityUrl` or `getIdentity` is given too). */
  identity?: string;
  /** A function giving a fresh identity token (instead of `identityUrl`). */
  getIdentity?: () => Promise<string>;
  /** Where to mount (an element or a CSS selector); without it, a floating panel at the bottom right. */
  target?: Element | string;
}

export interface Handle {
  /** The `<firstmile-onboarding>` element. */
  readonly element: HTMLElement;
  /** Stop (close the stream, cancel timers) and remove the element. */
  destroy(): void;
}

/** `detail` of the `firstmile:error` event. */
export interface ErrorDetail {
  /** True when the SDK stopped (the error state shows); false when it retries by itself. */
  fatal: boolean;
  status: number | null;
  /** The problem's `type` slug (`invalid-identity`, `origin-not-allowed`, …), or `network`, `identity-url`, `config`. */
  type: string;
  reason: string | null;
  detail: string;
}
