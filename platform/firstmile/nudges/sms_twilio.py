"""SMS through Twilio's Programmable Messaging, with the official ``twilio`` library.

One send is one Messages resource create (``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``,
HTTP basic auth with the account SID and auth token, form-encoded ``To``, ``From`` or
``MessagingServiceSid``, ``Body`` and ``StatusCallback``). The status callback URL carries the
send's idempotency key and the tenant in its query (``?send=…&tenant=…``): Twilio signs the full
URL, so a status callback names its send even if our record of the provider's message SID was
lost in a crash (:mod:`firstmile.nudges.webhooks`).

``to`` must be an E.164 number (``+`` and up to 15 digits) that ``phonenumbers`` finds valid;
anything else is a :class:`~firstmile.nudges.channels.ChannelRejectedError` with ``suppress=True``
and no request is made.

The library's client is synchronous (``requests``): the call runs in a worker thread
(``asyncio.to_thread``) under ``timeout_s``, which is also the HTTP client's timeout.

Answers (Twilio's REST API reference: the Message resource, "Errors", error codes 20429, 21211,
21610, 21614):

* ``201 Created``: a :class:`~firstmile.nudges.channels.Receipt` with the message SID (``SM…``).
* ``429`` (error 20429, too many concurrent requests; Twilio says it is never processed and safe
  to retry): :class:`~firstmile.nudges.channels.ChannelRateLimitedError`, retried after the
  ``Retry-After`` header when the answer has one (RFC 9110; Twilio documents no other), else
  after ``rate_limit_retry_seconds``.
* 5xx, a refused or dropped connection, a timeout:
  :class:`~firstmile.nudges.channels.ChannelUnavailableError` (a backup provider takes it).
* 400 with error 21211 (invalid ``To``), 21614 (not a mobile number) or 21610 (the recipient
  replied STOP): :class:`~firstmile.nudges.channels.ChannelRejectedError` with ``suppress=True``.
* Any other 4xx (a bad ``From``, bad credentials, …): ``ChannelRejectedError`` with ``suppress=False``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
    Receipt,
)
from firstmile.nudges.phones import e164

BAD_NUMBER_CODES = frozenset({21211, 21614, 21610})
"""Twilio error codes that condemn the number itself: invalid, not a mobile, unsubscribed (STOP)."""

# The library reads TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_REGION and TWILIO_EDGE from the
# environment mapping it is given, and from os.environ when that mapping is empty: this adapter's
# settings are explicit, so it is given a mapping that holds none of them.
_NO_TWILIO_ENVIRONMENT = {"FIRSTMILE_TWILIO": "settings are explicit"}


class _HttpClient(TwilioHttpClient):
    """The library's HTTP client, sent to ``base_url`` instead of ``https://api.twilio.com``.

    twilio-python has no base-URL setting (only ``region`` and ``edge``, which pick another
    ``*.twilio.com`` host); its documented way to change where requests go is a custom
    ``http_client`` (the library's "custom HTTP client" guide). This one rewrites the scheme and
    host of each request to ``base_url`` (a stand-in in the tests) and keeps the path. It also
    remembers, per thread, the headers of the last answer, so that a 429's ``Retry-After`` can be
    read (the library's exception does not carry headers).
    """

    def __init__(self, base_url: str | None, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._base = urlsplit(base_url.rstrip("/")) if base_url else None
        self._last = threading.local()

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        if self._base is not None:
            parts = urlsplit(url)
            url = urlunsplit((self._base.scheme, self._base.netloc, self._base.path + parts.path, parts.query, ""))
        self._last.headers = {}
        response = super().request(method, url, params, data, headers, auth, timeout, allow_redirects)
        self._last.headers = dict(response.headers or {})
        return response

    def last_headers(self) -> Mapping[str, str]:
        headers: Mapping[str, str] = getattr(self._last, "headers", {})
        return headers


class TwilioChannel:
    """Sends SMS through one Twilio account (or anything that speaks its Messages API)."""

    channel = "sms"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        rate_limit_retry_seconds: float = 5.0,
        name: str = "twilio",
    ) -> None:
        if (from_number is None) == (messaging_service_sid is None):
            raise ValueError("give exactly one of from_number and messaging_service_sid")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.from_number = from_number
        self.messaging_service_sid = messaging_service_sid
        self.status_callback = status_callback
        self.timeout_s = timeout_s
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self._name = name
        self._http = _HttpClient(base_url, timeout_s)
        self._client = Client(  # type: ignore[no-untyped-call]  # its __init__ is not annotated
            account_sid, auth_token, http_client=self._http, environment=_NO_TWILIO_ENVIRONMENT
        )

    @property
    def provider(self) -> str:
        return self._name

    def close(self) -> None:
        """Close the HTTP client's pooled connections."""
        if self._http.session is not None:
            self._http.session.close()

    def callback_url(self, message: OutboundMessage) -> str | None:
        """The status callback URL for ``message``: the configured one, with the send and the tenant."""
        if self.status_callback is None:
            return None
        query = {"send": message.idempotency_key}
        if message.tenant is not None:
            query["tenant"] = message.tenant
        parts = urlsplit(self.status_callback)
        joined = f"{parts.query}&{urlencode(query)}" if parts.query else urlencode(query)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))

    async def send(self, message: OutboundMessage) -> Receipt:
        if message.channel != "sms":
            raise ValueError(f"an SMS adapter cannot send a {message.channel} message")
        if e164(message.to) is None:
            raise ChannelRejectedError(self.provider, "the number is not a valid E.164 number", suppress=True)
        arguments: dict[str, Any] = {"to": message.to, "body": message.body}
        if self.messaging_service_sid is not None:
            arguments["messaging_service_sid"] = self.messaging_service_sid
        else:
            arguments["from_"] = self.from_number
        callback = self.callback_url(message)
        if callback is not None:
            arguments["status_callback"] = callback
        try:
            async with asyncio.timeout(self.timeout_s):
                sid = await asyncio.to_thread(self._create, arguments)
        except OSError as exc:  # requests' errors are OSErrors; so is the timeout
            raise ChannelUnavailableError(self.provider, f"{type(exc).__name__}: {exc}") from exc
        return Receipt(self.provider, sid)

    def _create(self, arguments: dict[str, Any]) -> str | None:
        try:
            message = self._client.messages.create(**arguments)
        except (TwilioRestException, TwilioServiceException) as error:
            # Mapped here, in the thread that made the request: the answer's headers are kept per thread.
            raise self._refused(error, self._http.last_headers().get("Retry-After")) from error
        sid: str | None = message.sid
        return sid

    def _refused(
        self, error: TwilioRestException | TwilioServiceException, retry_after: str | None
    ) -> ChannelUnavailableError | ChannelRateLimitedError | ChannelRejectedError:
        status = int(error.status)
        code = error.code
        text = error.msg if isinstance(error, TwilioRestException) else (error.detail or error.title)
        detail = f"HTTP {status}, error {code}: {text}"
        if status == 429:
            return ChannelRateLimitedError(self.provider, detail, self._seconds(retry_after))
        if status >= 500:
            return ChannelUnavailableError(self.provider, detail)
        return ChannelRejectedError(self.provider, detail, suppress=status == 400 and code in BAD_NUMBER_CODES)

    def _seconds(self, retry_after: str | None) -> float:
        try:
            return float(retry_after) if retry_after else self.rate_limit_retry_seconds
        except ValueError:  # Retry-After as an HTTP date: rare enough to take the default
            return self.rate_limit_retry_seconds
