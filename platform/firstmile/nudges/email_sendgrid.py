"""E-mail through SendGrid's v3 Mail Send API (``POST /v3/mail/send``), with the official ``sendgrid`` library.

The request is the library's ``Mail`` (one personalization, the text part and the HTML part when
the template has one), with:

* ``custom_args``: the send's idempotency key (``firstmile_send``) and the tenant
  (``firstmile_tenant``). SendGrid returns custom arguments as fields of every Event Webhook
  event for the message, so a status event finds its send even if our record of the send was
  lost in a crash (see :mod:`firstmile.nudges.webhooks`). Custom arguments are stored by SendGrid
  as non-PII: never put an address or a name there.
* ``headers``: the ``Message-ID`` derived from the idempotency key (:mod:`firstmile.nudges.message_ids`,
  the same as the SMTP adapter's, so a failover between them keeps it) and the message's extra
  headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``). None of them is one of the headers
  SendGrid reserves (``To``, ``From``, ``Subject``, ``Reply-To``, ``Content-Type``… as the
  library's ``Header`` documents); the adapter refuses to pass one that is.

The library is synchronous (``urllib``): the request runs in a worker thread
(``asyncio.to_thread``) under ``timeout_s``, which also bounds each socket operation.

Answers (SendGrid's Mail Send reference, "Responses", and "Rate Limits" of the v3 API):

* ``202 Accepted``: a :class:`~firstmile.nudges.channels.Receipt` whose provider message id is the
  ``X-Message-Id`` response header (the prefix of the events' ``sg_message_id``).
* ``429``: :class:`~firstmile.nudges.channels.ChannelRateLimitedError`, retried at
  ``X-RateLimit-Reset`` (a Unix time, when the rate-limit period ends), else after
  ``rate_limit_retry_seconds``.
* 5xx, a refused or dropped connection, a timeout:
  :class:`~firstmile.nudges.channels.ChannelUnavailableError` (a backup provider takes it). A
  timeout is ambiguous: SendGrid may have accepted the message, and the retry may send it twice
  (with the same ``Message-ID``).
* Any other 4xx (400 bad request, 401/403 a bad or unauthorised key, 413 too large):
  :class:`~firstmile.nudges.channels.ChannelRejectedError` with ``suppress=False`` (a malformed
  request or our account's problem, not the address's), except a 400 whose every error names a
  recipient's address (``field`` ``personalizations.<i>.to.<j>.email``, as SendGrid's "Mail Send
  Errors" reference names them): the address is malformed, so ``suppress=True``, as the port's
  contract asks of a refused address. Deliveries that fail later (bounces, blocks) come through
  the Event Webhook, not here.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Content, CustomArg, Email, Header, Mail, To

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
    Receipt,
)
from firstmile.nudges.message_ids import domain_of, message_id
from firstmile.nudges.webhooks import CUSTOM_ARG_PREFIX

SENDGRID_API = "https://api.sendgrid.com"
SEND_ARG = f"{CUSTOM_ARG_PREFIX}send"
"""The custom argument that carries the send's idempotency key."""
TENANT_ARG = f"{CUSTOM_ARG_PREFIX}tenant"
"""The custom argument that carries the tenant's id."""

_RECIPIENT_FIELD = re.compile(r"^personalizations\.\d+\.to\.\d+\.email$")

# The headers SendGrid's v3 Mail Send refuses in ``headers`` (the library's ``Header`` docstring).
_RESERVED = frozenset(
    name.lower()
    for name in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)


class SendGridChannel:
    """Sends e-mail through one SendGrid account (or anything that speaks its v3 Mail Send API)."""

    channel = "email"

    def __init__(
        self,
        api_key: str,
        sender: str,
        *,
        sender_name: str | None = None,
        base_url: str = SENDGRID_API,
        timeout_s: float = 10.0,
        rate_limit_retry_seconds: float = 60.0,
        message_id_domain: str | None = None,
        name: str = "sendgrid",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.sender = sender
        self.sender_name = sender_name
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self.domain = message_id_domain or domain_of(sender)
        self._name = name
        self._clock = clock
        self._client = SendGridAPIClient(api_key=api_key, host=self.base_url)

    @property
    def provider(self) -> str:
        return self._name

    def message_id(self, idempotency_key: str) -> str:
        """The ``Message-ID`` of every attempt of one send (the SMTP adapter's, for the same domain)."""
        return message_id(idempotency_key, self.domain)

    def request_body(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body of ``POST /v3/mail/send`` for ``message``."""
        if message.channel != "email":
            raise ValueError(f"an e-mail adapter cannot send a {message.channel} message")
        recipient = To()
        recipient.email = message.to  # as given: To(address) would read "Name <address>" out of it
        mail = Mail(from_email=Email(self.sender, self.sender_name), to_emails=recipient, subject=message.subject or "")
        # The v3 API wants text/plain before text/html.
        mail.content = Content("text/plain", message.body)
        if message.html is not None:
            mail.content = Content("text/html", message.html)
        headers = {"Message-ID": self.message_id(message.idempotency_key)}
        for header, value in message.headers.items():
            if header.lower() in _RESERVED or header.lower() == "message-id":
                raise ValueError(f"the header {header} is set by the adapter or reserved by SendGrid")
            headers[header] = value
        mail.header = [Header(header, value) for header, value in headers.items()]
        args = {SEND_ARG: message.idempotency_key}
        if message.tenant is not None:
            args[TENANT_ARG] = message.tenant
        mail.custom_arg = [CustomArg(key, value) for key, value in args.items()]
        body: dict[str, Any] = mail.get()
        return body

    async def send(self, message: OutboundMessage) -> Receipt:
        body = self.request_body(message)
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await asyncio.to_thread(self._post, body)
        except HTTPError as exc:
            raise self._refused(int(exc.status_code), exc.headers, _text(exc.body)) from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out (TimeoutError is an OSError)
            raise ChannelUnavailableError(self.provider, f"{type(exc).__name__}: {exc}") from exc
        status = int(response.status_code)
        if not 200 <= status < 300:  # urllib raises for 4xx and 5xx; a 1xx/3xx here is not an acceptance
            raise ChannelUnavailableError(self.provider, f"unexpected HTTP {status}")
        return Receipt(self.provider, response.headers.get("X-Message-Id"))

    def _post(self, body: dict[str, Any]) -> Any:
        # The library's fluent client (``client.mail.send.post``), the form its README shows for any
        # v3 call; it takes the per-request timeout that ``SendGridAPIClient.send`` does not.
        return self._client.client.mail.send.post(request_body=body, timeout=self.timeout_s)

    def _refused(
        self, status: int, headers: Mapping[str, str] | None, text: str
    ) -> ChannelUnavailableError | ChannelRateLimitedError | ChannelRejectedError:
        detail = f"HTTP {status}: {text[:300]}"
        if status == 429:
            return ChannelRateLimitedError(self.provider, detail, self._retry_after(headers))
        if status >= 500:
            return ChannelUnavailableError(self.provider, detail)
        return ChannelRejectedError(self.provider, detail, suppress=status == 400 and _bad_recipient(text))

    def _retry_after(self, headers: Mapping[str, str] | None) -> float:
        reset = (headers or {}).get("X-RateLimit-Reset")
        try:
            return max(0.0, float(reset) - self._clock()) if reset else self.rate_limit_retry_seconds
        except ValueError:
            return self.rate_limit_retry_seconds


def _bad_recipient(text: str) -> bool:
    """Whether a 400's errors all name a recipient's address (and there is at least one)."""
    try:
        errors = json.loads(text).get("errors")
    except (ValueError, AttributeError):
        return False
    if not isinstance(errors, list) or not errors:
        return False
    return all(isinstance(e, dict) and _RECIPIENT_FIELD.match(str(e.get("field"))) for e in errors)


def _text(body: bytes | str | None) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return body or ""
