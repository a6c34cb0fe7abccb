"""SMS through Vonage's SMS API, with Vonage's official client (``vonage-sms`` on ``vonage-http-client``).

Vonage is the backup SMS provider: Twilio's :class:`~firstmile.nudges.sms_twilio.TwilioChannel` fails over
to it on timeouts and 5xx (:class:`~firstmile.nudges.channels.FailoverChannel`), or it is the only one.

One send is one ``POST https://{rest_host}/sms/json`` with a form body (Vonage's SMS API reference,
"Send an SMS"): ``from``, ``to`` (the number in E.164 without its ``+``), ``text``, ``type=unicode``
when the text is not GSM-7, ``client-ref`` (``{tenant}:{send}``: the send's idempotency key, which the
delivery receipt carries back) and ``callback`` (our delivery-receipt webhook) when configured. The
request is authenticated with the account's API key and secret (HTTP basic), or signed with the
account's signature secret when one is set (``api_key``, ``timestamp`` and ``sig`` in the body, the
library's ``Auth.sign_params``).

``to`` must be an E.164 number that ``phonenumbers`` finds valid (the same check as Twilio's);
anything else is a :class:`~firstmile.nudges.channels.ChannelRejectedError` with ``suppress=True`` and no
request is made.

The library is synchronous (``requests``): the call runs in a worker thread under ``timeout_s``.
Two of its defaults are turned off, because the delivery loop owns retries (backoff with jitter, the
same idempotency key, failover): urllib3's retries (``max_retries=0``), and the client's own resend of
a request whose connection closed without an answer (it resends up to ``pool_maxsize`` times, so the
pool has one connection kept per host). ``ca_bundle`` is the CA file the TLS connection trusts instead
of the system's (an egress proxy that inspects TLS, a stand-in in the tests).

Answers (Vonage's "SMS API error codes", the ``status`` of each message of a ``200``):

* status ``0``: a :class:`~firstmile.nudges.channels.Receipt` with the ``message-id``.
* status ``1`` (throttled) or HTTP ``429``: :class:`~firstmile.nudges.channels.ChannelRateLimitedError`,
  after ``Retry-After`` when the answer has one, else after ``rate_limit_retry_seconds``.
* status ``5`` (internal error), HTTP 5xx, a refused or dropped connection, a timeout, a TLS failure:
  :class:`~firstmile.nudges.channels.ChannelUnavailableError`.
* status ``6`` (unroutable), ``7`` (number barred) or ``33`` (number de-activated):
  :class:`~firstmile.nudges.channels.ChannelRejectedError` with ``suppress=True``.
* any other status or 4xx (bad credentials, a bad sender, no credit, a signature refused…):
  ``ChannelRejectedError`` with ``suppress=False``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from requests import PreparedRequest, RequestException, Response
from requests.adapters import HTTPAdapter
from vonage_http_client.auth import Auth
from vonage_http_client.errors import HttpRequestError
from vonage_http_client.http_client import HttpClient, HttpClientOptions
from vonage_sms.requests import SmsMessage

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
    Receipt,
)
from firstmile.nudges.phones import e164

SIGNATURE_METHODS = ("md5", "sha1", "sha256", "sha512")
"""The HMAC digests of Vonage's signed requests and webhooks (its dashboard's "MD5 HMAC" … "SHA-512 HMAC")."""

VONAGE_CALLBACK_MAX = 100
"""The longest ``callback`` URL Vonage takes."""
BAD_NUMBER_STATUSES = frozenset({6, 7, 33})
"""Statuses that condemn the number itself: unroutable, barred, de-activated."""
_THROTTLED, _INTERNAL_ERROR = 1, 5

# GSM 03.38: its basic character set and extension table. Text outside it must go as type=unicode,
# or the carrier replaces what it cannot encode.
_GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM = frozenset(_GSM_BASIC) | frozenset("^{}\\[~]|€\f")


def is_gsm7(text: str) -> bool:
    """Whether ``text`` can be sent in GSM-7 (else it is sent as ``type=unicode``)."""
    return all(c in _GSM for c in text)


def client_ref(message: OutboundMessage) -> str:
    """What the delivery receipt carries back: ``{tenant}:{send}`` (the send alone without a tenant)."""
    return f"{message.tenant}:{message.idempotency_key}" if message.tenant else message.idempotency_key


class _TrustingAdapter(HTTPAdapter):
    """Checks the server's certificate against ``ca_bundle``, whatever the environment says.

    A session's own ``verify`` loses to ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` when those are set
    (requests merges the environment over it), so the CA file is applied where each request is sent.
    """

    def __init__(self, ca_bundle: str) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.ca_bundle = ca_bundle

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        kwargs["verify"] = self.ca_bundle
        return super().send(request, *args, **kwargs)


class _HttpClient(HttpClient):
    """The library's client, trusting ``ca_bundle`` instead of the system's CAs when one is given."""

    def __init__(self, auth: Auth, options: HttpClientOptions, ca_bundle: str | None) -> None:
        super().__init__(auth, options)
        if ca_bundle is not None:
            self._session.mount("https://", _TrustingAdapter(ca_bundle))

    def close(self) -> None:
        self._session.close()


class VonageChannel:
    """Sends SMS through one Vonage account (or anything that speaks its SMS API)."""

    channel = "sms"

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        from_: str,
        signature_secret: str | None = None,
        signature_method: str = "sha256",
        callback: str | None = None,
        rest_host: str = "rest.nexmo.com",
        ca_bundle: str | None = None,
        timeout_s: float = 10.0,
        rate_limit_retry_seconds: float = 5.0,
        name: str = "vonage",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if signature_method not in SIGNATURE_METHODS:
            raise ValueError(f"signature_method must be one of {', '.join(SIGNATURE_METHODS)}")
        if callback is not None and len(callback) > VONAGE_CALLBACK_MAX:
            raise ValueError(f"Vonage takes a callback URL of at most {VONAGE_CALLBACK_MAX} characters")
        if not from_:
            raise ValueError("from_ (a number or an alphanumeric sender id) is required")
        self.from_ = from_.removeprefix("+")
        self.callback = callback
        self.timeout_s = timeout_s
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self._name = name
        self._auth_type: Literal["signature", "basic"] = "signature" if signature_secret else "basic"
        auth = Auth(
            api_key=api_key,
            api_secret=api_secret,
            signature_secret=signature_secret,
            signature_method=signature_method,  # type: ignore[arg-type]  # checked above
        )
        options = HttpClientOptions(rest_host=rest_host, timeout=math.ceil(timeout_s), max_retries=0, pool_maxsize=1)
        self._http = _HttpClient(auth, options, ca_bundle)

    @property
    def provider(self) -> str:
        return self._name

    def close(self) -> None:
        """Close the HTTP client's pooled connection."""
        self._http.close()

    def request(self, message: OutboundMessage) -> dict[str, Any]:
        """The form fields of ``message``'s request, before authentication (the library adds it)."""
        number = e164(message.to)
        if number is None:
            raise ChannelRejectedError(self.provider, "the number is not a valid E.164 number", suppress=True)
        sms = SmsMessage.model_validate(
            {
                "to": number.removeprefix("+"),
                "from_": self.from_,
                "text": message.body,
                "client_ref": client_ref(message),
                "type": None if is_gsm7(message.body) else "unicode",
                "callback": self.callback,
            }
        )
        fields: dict[str, Any] = sms.model_dump(by_alias=True, exclude_none=True)
        return fields

    async def send(self, message: OutboundMessage) -> Receipt:
        if message.channel != "sms":
            raise ValueError(f"an SMS adapter cannot send a {message.channel} message")
        fields = self.request(message)
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await asyncio.to_thread(self._post, fields)
        except (OSError, RequestException) as exc:  # requests' errors, and the timeout
            raise ChannelUnavailableError(self.provider, f"{type(exc).__name__}: {exc}") from exc
        return self._receipt(answer)

    def _post(self, fields: dict[str, Any]) -> Any:
        try:
            return self._http.post(self._http.rest_host, "/sms/json", fields, self._auth_type, "form")
        except HttpRequestError as error:
            raise self._refused_http(error.response) from error

    def _receipt(self, answer: Any) -> Receipt:
        messages = answer.get("messages") if isinstance(answer, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
            raise ChannelUnavailableError(self.provider, "the answer is not Vonage's message list")
        first = messages[0]
        try:
            status = int(first.get("status", ""))
        except ValueError:
            raise ChannelUnavailableError(self.provider, "the answer's status is not a number") from None
        if status == 0:
            return Receipt(self.provider, first.get("message-id"))
        detail = f"status {status}: {first.get('error-text', '')}"
        if status == _THROTTLED:
            raise ChannelRateLimitedError(self.provider, detail, self.rate_limit_retry_seconds)
        if status == _INTERNAL_ERROR:
            raise ChannelUnavailableError(self.provider, detail)
        raise ChannelRejectedError(self.provider, detail, suppress=status in BAD_NUMBER_STATUSES)

    def _refused_http(
        self, response: Response
    ) -> ChannelUnavailableError | ChannelRateLimitedError | ChannelRejectedError:
        status = response.status_code
        detail = f"HTTP {status}: {response.text[:200]}"
        if status == 429:
            return ChannelRateLimitedError(self.provider, detail, self._seconds(response.headers.get("Retry-After")))
        if status >= 500:
            return ChannelUnavailableError(self.provider, detail)
        return ChannelRejectedError(self.provider, detail)

    def _seconds(self, retry_after: str | None) -> float:
        try:
            return float(retry_after) if retry_after else self.rate_limit_retry_seconds
        except ValueError:
            return self.rate_limit_retry_seconds
