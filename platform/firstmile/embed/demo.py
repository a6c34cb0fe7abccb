"""The demo host page of ``make run``: a tenant's web app as small as it gets, embedding the SDK for one user.

It plays both parts a tenant has: the **page** (one ``<script>`` tag with the publishable key) and the
**backend** (it signs the user's identity token with the key's identity secret, and calls the tenant API
with the secret key, which never reaches the browser). It listens on loopback on its own port, so the
page's origin differs from the API's and the browser does real CORS, as on a tenant's site.

``GET /`` starts the demo user's onboarding (idempotent) and serves the page; ``GET /identity`` answers
``{"token": …}`` for the signed-in user (here: always the demo user); ``POST /complete-next`` completes the
user's current step through the tenant API, which the embedded checklist then shows live.
"""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt

TOKEN_LIFETIME_S = 600


class DemoHost:
    """The demo host on ``127.0.0.1:port`` (``port`` 0: any free one); :meth:`start` serves it from a thread."""

    def __init__(
        self,
        api_url: str,
        secret_key: str,
        publishable_key: str,
        identity_secret: str,
        *,
        user_id: str = "demo-user",
        traits: dict[str, Any] | None = None,
        port: int = 0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.secret_key = secret_key
        self.publishable_key = publishable_key
        self.identity_secret = identity_secret
        self.user_id = user_id
        self.traits = traits if traits is not None else {"persona": "developer", "plan": "trial"}
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoHost:
        self._thread = threading.Thread(target=self._server.serve_forever, name="embed-demo-host", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the backend's two jobs --

    def identity_token(self) -> str:
        """What a tenant's backend does for its signed-in user: an HS256 token, ``sub`` and a short ``exp``."""
        now = int(time.time())
        claims = {"sub": self.user_id, "iat": now, "exp": now + TOKEN_LIFETIME_S}
        return jwt.encode(claims, self.identity_secret, algorithm="HS256")

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.secret_key}"}
        return httpx.request(method, self.api_url + path, json=body, headers=headers, timeout=10.0)

    def ensure_started(self) -> dict[str, Any]:
        r = self._api("POST", "/v1/onboarding/start", {"user_id": self.user_id, "traits": self.traits})
        r.raise_for_status()
        state: dict[str, Any] = r.json()
        return state

    def complete_next(self) -> dict[str, Any]:
        state = self.ensure_started()
        step = state.get("current_step")
        if step is None:
            return state
        r = self._api("POST", f"/v1/onboarding/{self.user_id}/steps/{step}/complete")
        r.raise_for_status()
        done: dict[str, Any] = r.json()
        return done

    def page(self) -> str:
        return PAGE.format(
            api=html.escape(self.api_url),
            key=html.escape(self.publishable_key),
            user=html.escape(self.user_id),
        )


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Acme Analytics (a demo host page for the Firstmile embed SDK)</title>
<style>
  body {{ font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }}
  header {{ background: #1d2330; color: #fff; padding: 0.75rem 1.5rem; }}
  main {{ display: grid; grid-template-columns: minmax(0, 2fr) minmax(280px, 1fr); gap: 1.5rem; padding: 1.5rem; }}
  @media (max-width: 700px) {{ main {{ grid-template-columns: 1fr; }} }}
  section {{ background: #fff; border-radius: 8px; padding: 1rem 1.25rem; }}
  button {{ font: inherit; padding: 0.5rem 0.9rem; border-radius: 6px; border: 1px solid #1d2330; background: #fff; }}
  button:focus-visible {{ outline: 3px solid #2456c7; outline-offset: 2px; }}
  #onboarding {{ --fm-accent: #2456c7; }}
  code {{ background: #eef0f4; color: #1d2330; padding: 0 0.25rem; border-radius: 3px; }}
</style>
</head>
<body>
<header><strong>Acme Analytics</strong>, signed in as <code>{user}</code></header>
<main>
  <section aria-labelledby="work-title">
    <h1 id="work-title">Your workspace</h1>
    <p>This page stands for a tenant's own web app. The checklist beside it is the Firstmile embed SDK,
       added with one script tag; this page's backend signs the user's identity token.</p>
    <p><button type="button" id="complete-next">Complete my current step (through the tenant API)</button></p>
    <p id="outcome" role="status"></p>
  </section>
  <div id="onboarding"></div>
</main>
<script src="/host.js" defer></script>
<script src="{api}/embed/v1/firstmile.js" defer
        data-key="{key}" data-identity-url="/identity" data-target="#onboarding"></script>
</body>
</html>
"""

HOST_JS = """document.getElementById("complete-next").addEventListener("click", async () => {
  const outcome = document.getElementById("outcome");
  const r = await fetch("/complete-next", { method: "POST" });
  outcome.textContent = r.ok ? "Done: the checklist updates by itself." : "The step could not be completed.";
});
"""


def _handler(host: DemoHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: the API logs what matters
            return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                try:
                    host.ensure_started()
                except httpx.HTTPError as exc:
                    self._send(502, f"the Firstmile API did not answer: {exc}".encode(), "text/plain; charset=utf-8")
                    return
                self._send(200, host.page().encode(), "text/html; charset=utf-8")
            elif self.path == "/host.js":
                self._send(200, HOST_JS.encode(), "text/javascript; charset=utf-8")
            elif self.path == "/identity":
                body = json.dumps({"token": host.identity_token()}).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found", "text/plain; charset=utf-8")

        def do_POST(self) -> None:
            if self.path != "/complete-next":
                self._send(404, b"not found", "text/plain; charset=utf-8")
                return
            try:
                state = host.complete_next()
            except httpx.HTTPError as exc:
                self._send(502, json.dumps({"error": str(exc)}).encode(), "application/json")
                return
            self._send(200, json.dumps({"current_step": state.get("current_step")}).encode(), "application/json")

    return Handler


__all__ = ["DemoHost"]
