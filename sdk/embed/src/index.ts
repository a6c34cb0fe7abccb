/**
 * The Firstmile embed SDK: `<script src="…/embed/v1/firstmile.js" data-key="fmpk_…" data-identity-url="…">`
 * shows the signed-in user's onboarding checklist and in-app messages. `window.Firstmile.mount(options)` does
 * the same from code. See README.md.
 */

import { autoMount, mount, setDefaultApi } from "./mount";
import type { Handle, MountOptions } from "./types";
import { VERSION } from "./version";

export interface FirstmileApi {
  mount(options: MountOptions): Handle;
  readonly version: string;
}

declare global {
  interface Window {
    Firstmile?: FirstmileApi;
  }
}

const script = document.currentScript instanceof HTMLScriptElement ? document.currentScript : null;
if (script?.src) {
  try {
    setDefaultApi(new URL(script.src, location.href).origin);
  } catch {
    // a src that is not a URL: the page's own origin is the default
  }
}
window.Firstmile = Object.freeze({ mount, version: VERSION });
autoMount(script);
