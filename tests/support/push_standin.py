"""A Web Push service stand-in: the push resource of RFC 8030 over real HTTP on 127.0.0.1, recording every request.

Browsers' push services (FCM, Mozilla autopush, Apple, WNS) are SaaS that cannot run here, so this speaks
the part of RFC 8030 ("Generic Event Delivery Using HTTP Push") an application server uses, after the RFC:

- ``POST /push/<token>`` requests delivery of a push message to the subscription ``<token>`` (section 5).
  The answer is ``201 Created`` with ``Location`` naming the push message resource (section 5, the
  example's ``Location: https://push.example.net/message/…``) and the ``TTL`` the service keeps it for
  (section 5.2: the service echoes the TTL it applies).
- A request without ``TTL`` is refused with ``400 Bad Request`` (section 5.2: "the push service MUST
  return a 400 (Bad Request) status code in response to requests that omit the TTL header field").
- Any other path or method is ``404 Not Found``.

The service neither decrypts (it cannot: RFC 8291 encrypts end to end to the browser) nor checks VAPID
(RFC 8292 leaves to the service whether it requires it); the tests do both on the recorded request.
Answers the tests need from a real service (404/410 for a gone subscription, 413, 429 with
``Retry-After``, 5xx) are scripted with :meth:`PushServiceStandIn.respond`; :meth:`hang` holds the next
request unanswered until the stand-in stops, for a client timeout.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType

from tests.support.loopback_http import LoopbackHTTPServer


@dataclass(frozen=True)
class PushRequest:
    """One request as it arrived: header names lower-cased, the body as bytes."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False


class PushServiceStandIn:
    """Run it as a context manager; :meth:`endpoint` gives a subscription's push resource URL."""

    def __init__(self) -> None:
        self.requests: list[PushRequest] = []
        self._answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                standin._handle(self)

            def do_GET(self) -> None:
                standin._handle(self)

            def do_PUT(self) -> None:
                standin._handle(self)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                return

        self._server = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="push-standin", daemon=True
        )

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def endpoint(self, token: str | None = None) -> str:
        """A push resource URL, as a browser's ``PushSubscription.endpoint`` would name one."""
        return f"{self.origin}/push/{token or secrets.token_urlsafe(24)}"

    def respond(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        """The next request gets this answer instead of the RFC's (queued, first in first out)."""
        with self._lock:
            self._answers.append(Answer(status, dict(headers or {}), body))

    def hang(self) -> None:
        """The next request is held unanswered until the stand-in stops."""
        with self._lock:
            self._answers.append(Answer(0, hang=True))

    def __enter__(self) -> PushServiceStandIn:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = PushRequest(handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body)
        with self._lock:
            self.requests.append(request)
            answer = self._answers.popleft() if self._answers else None
        if answer is None:
            answer = self._rfc8030(request)
        if answer.hang:
            self._release.wait()
            return
        try:
            handler.send_response(answer.status)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(answer.body)))
            handler.end_headers()
            handler.wfile.write(answer.body)
        except OSError:  # the client gave up (a timeout test): nothing to answer
            return

    def _rfc8030(self, request: PushRequest) -> Answer:
        if request.method != "POST" or not request.path.startswith("/push/") or len(request.path) <= len("/push/"):
            return Answer(404, {"Content-Type": "text/plain"}, b"no such push resource")
        ttl = request.headers.get("ttl")
        if ttl is None or not ttl.isdigit():
            return Answer(400, {"Content-Type": "text/plain"}, b"TTL header required (RFC 8030, section 5.2)")
        location = f"{self.origin}/message/{secrets.token_urlsafe(16)}"
        return Answer(201, {"Location": location, "TTL": ttl})
