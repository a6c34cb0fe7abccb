"""Stand-ins for SendGrid's v3 Mail Send API, Twilio's Messages API and Vonage's SMS API, over real HTTP
(HTTPS for Vonage) on 127.0.0.1.

SendGrid and Twilio are SaaS that cannot run here, so the adapters' tests drive the vendors' official
client libraries against these: one ``http.server`` in a thread per stand-in, on an ephemeral port,
that records every request (method, path, headers, body) and answers as the vendor documents.

:class:`SendGridStandIn` follows SendGrid's v3 reference ("Mail Send", "Authentication", "Errors"):

- ``POST /v3/mail/send`` with ``Authorization: Bearer <api key>`` and a JSON body is accepted with
  ``202 Accepted``, an empty body and an ``X-Message-Id`` header;
- a wrong or missing key is ``401`` with ``{"errors": [{"field": null, "message": …}]}``;
- a body that is not JSON, or lacks ``personalizations``, ``from`` or ``content``, is ``400``; a
  recipient that is not an e-mail address is ``400`` naming ``personalizations.<i>.to.<j>.email``
  in the error's ``field`` (the "Mail Send Errors" page's field names);
- any other path or method is ``404``.

:class:`TwilioStandIn` follows Twilio's REST reference (the Message resource, "Errors"):

- ``POST /2010-04-01/Accounts/<AccountSid>/Messages.json`` with HTTP basic auth (account SID, auth
  token) and a form body is accepted with ``201 Created`` and the Message resource as JSON
  (``sid`` ``SM…``, ``status`` ``queued``, or ``accepted`` when sent through a Messaging Service);
- wrong credentials, or another account's path, are ``401`` with error ``20003``;
- a ``To`` that is not E.164 is ``400`` with error ``21211``; no ``From`` and no
  ``MessagingServiceSid`` is ``400`` with error ``21603`` ("A 'From' or 'MessagingServiceSid'
  parameter is required to send a message"); no ``Body`` is ``400`` with error ``21602`` ("Message
  body is required"), the errors' pages in Twilio's error dictionary;
- any other path or method is ``404`` with error ``20404``. Twilio errors are JSON
  ``{"code", "message", "more_info", "status"}``.

Answers a real service gives only sometimes (429, 5xx, an address refused for good) are scripted
with :meth:`StandIn.respond` (queued, first in first out); :meth:`StandIn.hang` holds the next
request unanswered until the stand-in stops (a client timeout); :meth:`StandIn.drop` closes the next
connection without an answer.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from firstmile.nudges.webhooks import vonage_signature  # the unit tests hold it to Vonage's official signer
from tests.support.loopback_http import LoopbackHTTPServer

_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived: header names lower-cased, the body as bytes."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode(), keep_blank_values=True, strict_parsing=bool(self.body))

    def basic_auth(self) -> tuple[str, str] | None:
        scheme, _, encoded = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        return user, password


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False
    drop: bool = False


def json_answer(status: int, payload: object, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode())


class StandIn:
    """A vendor's API on 127.0.0.1; run it as a context manager. Subclasses answer in :meth:`answer`."""

    name = "standin"

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self._answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                standin._handle(self)

            def do_GET(self) -> None:
                standin._handle(self)

            def do_PUT(self) -> None:
                standin._handle(self)

            def do_DELETE(self) -> None:
                standin._handle(self)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                return

        self._server = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self._scheme = "http"
        if tls is not None:  # HTTPS: each accepted connection does its handshake
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        # a short poll interval: stopping waits for the loop's next poll (0.5 s by default)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name=self.name, daemon=True)

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self.host}"

    def respond(self, status: int, headers: dict[str, str] | None = None, body: bytes | str | object = b"") -> None:
        """The next request gets this answer instead of the documented one (a dict or list body is sent as JSON)."""
        if isinstance(body, dict | list):
            answer = json_answer(status, body, headers)
        else:
            raw = body.encode() if isinstance(body, str) else body
            assert isinstance(raw, bytes)
            answer = Answer(status, dict(headers or {}), raw)
        with self._lock:
            self._answers.append(answer)

    def hang(self) -> None:
        """The next request is held unanswered until the stand-in stops."""
        with self._lock:
            self._answers.append(Answer(0, hang=True))

    def drop(self) -> None:
        """The next request's connection is closed without an answer."""
        with self._lock:
            self._answers.append(Answer(0, drop=True))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, request: Recorded) -> Answer:
        raise NotImplementedError

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        parts = urlsplit(handler.path)
        request = Recorded(
            handler.command, parts.path, parts.query, {k.lower(): v for k, v in handler.headers.items()}, body
        )
        with self._lock:
            self.requests.append(request)
            answer = self._answers.popleft() if self._answers else None
        if answer is None:
            answer = self.answer(request)
        if answer.hang:
            self._release.wait()
            handler.close_connection = True
            return
        if answer.drop:
            handler.close_connection = True
            return
        try:
            handler.send_response(answer.status)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(answer.body)))
            handler.end_headers()
            handler.wfile.write(answer.body)
        except OSError:  # the client gave up (a timeout test): nothing to answer
            handler.close_connection = True


@dataclass(frozen=True)
class AcceptedMail:
    """A message SendGrid accepted: its ``X-Message-Id`` and the request body."""

    message_id: str
    body: dict[str, Any]

    @property
    def recipients(self) -> list[str]:
        return [to["email"] for p in self.body["personalizations"] for to in p["to"]]


class SendGridStandIn(StandIn):
    """SendGrid's v3 Mail Send API for one API key."""

    name = "sendgrid-standin"

    def __init__(self, api_key: str = "SG.test-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.accepted: list[AcceptedMail] = []

    def received(self, address: str) -> list[AcceptedMail]:
        return [m for m in self.accepted if address in m.recipients]

    def answer(self, request: Recorded) -> Answer:
        if request.method != "POST" or request.path != "/v3/mail/send":
            return _sendgrid_error(404, "not found")
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _sendgrid_error(401, "The provided authorization grant is invalid, expired, or revoked")
        try:
            body = request.json()
        except ValueError:
            return _sendgrid_error(400, "Bad Request")
        for required in ("personalizations", "from", "content"):
            if not body.get(required):
                return _sendgrid_error(400, f"The {required} field is required.", required)
        for i, personalization in enumerate(body["personalizations"]):
            for j, to in enumerate(personalization.get("to", [])):
                if not _EMAIL.match(str(to.get("email", ""))):
                    return _sendgrid_error(
                        400, "Does not contain a valid address.", f"personalizations.{i}.to.{j}.email"
                    )
        message_id = secrets.token_urlsafe(16)
        with self._lock:
            self.accepted.append(AcceptedMail(message_id, body))
        return Answer(202, {"X-Message-Id": message_id})


def _sendgrid_error(status: int, message: str, field: str | None = None) -> Answer:
    return json_answer(status, {"errors": [{"field": field, "message": message, "help": None}]})


@dataclass(frozen=True)
class AcceptedSms:
    """A message Twilio accepted: its SID and the form fields."""

    sid: str
    form: dict[str, str]


class TwilioStandIn(StandIn):
    """Twilio's Messages API for one account."""

    name = "twilio-standin"

    def __init__(self, account_sid: str = "AC" + "0" * 32, auth_token: str = "test-auth-token") -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.accepted: list[AcceptedSms] = []

    def received(self, number: str) -> list[AcceptedSms]:
        return [m for m in self.accepted if m.form.get("To") == number]

    def answer(self, request: Recorded) -> Answer:
        match = re.fullmatch(r"/2010-04-01/Accounts/([^/]+)/Messages\.json", request.path)
        if request.method != "POST" or match is None:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        if request.basic_auth() != (self.account_sid, self.auth_token) or match.group(1) != self.account_sid:
            return twilio_error(401, 20003, "Authenticate")
        form = {name: values[-1] for name, values in request.form().items()}
        to = form.get("To", "")
        if not _E164.match(to):
            return twilio_error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return twilio_error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message")
        if not form.get("Body"):
            return twilio_error(400, 21602, "Message body is required.")
        sid = "SM" + secrets.token_hex(16)
        with self._lock:
            self.accepted.append(AcceptedSms(sid, form))
        now = formatdate(usegmt=False)
        return json_answer(
            201,
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "api_version": "2010-04-01",
                "body": form["Body"],
                "date_created": now,
                "date_updated": now,
                "date_sent": None,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "status": "accepted" if form.get("MessagingServiceSid") else "queued",
                "subresource_uris": {"media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"},
                "to": to,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
        )


def twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    """A Twilio REST error body, as the API answers it."""
    payload = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return json_answer(status, payload, headers)


@dataclass(frozen=True)
class AcceptedVonageSms:
    """A message Vonage accepted: its message id and the form fields."""

    message_id: str
    form: dict[str, str]


class VonageStandIn(StandIn):
    """Vonage's SMS API (``POST /sms/json``) for one account, over HTTPS (its client speaks nothing else).

    As Vonage's SMS API reference documents it: a form body with ``api_key`` and ``api_secret``, or HTTP
    basic auth with them, or ``api_key`` with ``timestamp`` and ``sig`` signed with the account's
    signature secret (checked within 5 minutes of now). Each message answers ``200`` with
    ``{"message-count": "1", "messages": [{…, "status": "0", "message-id": …}]}``; a failure is a message
    with a non-zero ``status`` and its ``error-text`` (2 missing parameter, 3 invalid parameter such as a
    ``to`` that is not a number, 4 invalid credentials, 14 invalid signature). Other paths are ``404``.
    """

    name = "vonage-standin"

    def __init__(
        self,
        tls: ssl.SSLContext,
        api_key: str = "a1b2c3d4",
        api_secret: str = "vonage-secret",
        signature_secret: str | None = None,
        signature_method: str = "sha256",
    ) -> None:
        super().__init__(tls)
        self.api_key = api_key
        self.api_secret = api_secret
        self.signature_secret = signature_secret
        self.signature_method = signature_method
        self.accepted: list[AcceptedVonageSms] = []

    def received(self, number: str) -> list[AcceptedVonageSms]:
        return [m for m in self.accepted if m.form.get("to") == number.removeprefix("+")]

    def answer(self, request: Recorded) -> Answer:
        if request.method != "POST" or request.path != "/sms/json":
            return Answer(404, {"Content-Type": "text/plain"}, b"Not Found")
        form = {name: values[-1] for name, values in request.form().items()}
        to = form.get("to", "")
        if self.signature_secret is not None and "sig" in form:
            signed = vonage_signature(form, self.signature_secret, self.signature_method)
            fresh = form.get("timestamp", "").isdigit() and abs(time.time() - int(form["timestamp"])) <= 300
            if form.get("api_key") != self.api_key or not fresh or form["sig"] != signed:
                return _vonage_message(to, 14, "Invalid Signature")
        elif request.basic_auth() != (self.api_key, self.api_secret) and (
            form.get("api_key"), form.get("api_secret")) != (self.api_key, self.api_secret):  # fmt: skip
            return _vonage_message(to, 4, "Bad Credentials")
        if not form.get("from") or not to or not form.get("text"):
            return _vonage_message(to, 2, "Missing from, to or text")
        if not to.isdigit():
            return _vonage_message(to, 3, f"Invalid to address: {to}")
        message_id = secrets.token_hex(8).upper()
        with self._lock:
            self.accepted.append(AcceptedVonageSms(message_id, form))
        return json_answer(200, {"message-count": "1", "messages": [{
            "to": to, "message-id": message_id, "status": "0", "remaining-balance": "3.14159265",
            "message-price": "0.03330000", "network": "12345", "client-ref": form.get("client-ref", ""),
        }]})  # fmt: skip


def _vonage_message(to: str, status: int, error_text: str) -> Answer:
    """A Vonage SMS API answer for one message that was not sent (HTTP 200, as Vonage answers it)."""
    return json_answer(200, {"message-count": "1", "messages": [{"to": to, "status": str(status),
                                                                   "error-text": error_text}]})  # fmt: skip
