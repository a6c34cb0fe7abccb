"""Status webhooks, verified and parsed, with no I/O: SendGrid's Signed Event Webhook, Twilio's status
callbacks, Vonage's signed delivery receipts.

A webhook is believed only when its signature holds and it has not been seen before; anything else
is a :class:`WebhookRefusedError` whose ``reason`` says why (``bad-signature``, ``stale``,
``replayed``, ``malformed``), for a logged refusal and a 4xx. The caller hands in the raw body as
received (the signatures cover its exact bytes) and the headers' values.

**SendGrid** (its "Getting Started with the Event Webhook Security Features"): the request carries
``X-Twilio-Email-Event-Webhook-Signature``, a base64 ECDSA P-256 / SHA-256 signature (DER) over the
``X-Twilio-Email-Event-Webhook-Timestamp`` value followed by the body, checked with the account's
verification key (base64 DER, as the SendGrid console shows it). A timestamp more than
``tolerance_s`` away from now is ``stale``. The body is a JSON array of events; each is a
:class:`SendGridEvent`. Custom arguments set at send time come back as fields of each event; those
whose names start with ``firstmile_`` (the send's idempotency key, the tenant) are its ``custom_args``.

**Twilio** (its "Webhooks security"): ``X-Twilio-Signature`` is the base64 HMAC-SHA1, keyed with the
account's auth token, of the full URL Twilio requested followed by each POST parameter's name and
value, sorted by name. The URL is checked as given and with the scheme's default port added or
removed (Twilio signs either form; the official ``RequestValidator`` accepts both). A status
callback is a :class:`TwilioStatus`; the send's idempotency key and the tenant come from the
callback URL's query, where the adapter put them.

**Vonage** (its "Signed webhooks" for the SMS API): a delivery receipt's parameters (a GET query, a
POST form or a POST JSON object) carry ``sig``, the hex HMAC (MD5, SHA-1, SHA-256 or SHA-512, as the
account is set) keyed with the account's signature secret, of ``&name=value`` for every other
parameter in name order, where ``&`` and ``=`` inside a value are written ``_``; and ``timestamp``,
the Unix time of signing: more than ``tolerance_s`` away from now is ``stale``. A receipt is a
:class:`VonageReceipt`; the tenant and the send come from its ``client-ref`` (``{tenant}:{send}``),
which the adapter set.

**Replays.** Each verified request is offered to a :class:`ReplayGuard` under a key derived from
the signed content (not from the signature bytes: an ECDSA signature can be rewritten into another
valid one for the same content); a key already seen is ``replayed``. SendGrid's timestamps bound
how long a key must be remembered (the tolerance, either side of now); Twilio's callbacks carry no
timestamp, so they are remembered for ``replay_ttl_s`` and as long as the guard has room.
:class:`MemoryReplayGuard` is an in-process LRU; a guard shared by several processes (Redis) can
implement the same protocol, or the caller can pass ``guard=None`` and check
``WebhookBatch.replay_key`` / ``TwilioStatus.replay_key`` itself.

**Statuses.** :attr:`SendGridEvent.status` and :attr:`TwilioStatus.status` map the provider's
event onto Firstmile's delivery statuses (:data:`STATUSES`), or None for an event that changes none
(SendGrid's ``processed``, ``deferred``; Twilio's ``queued``, ``sent``…).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE = "X-Twilio-Signature"

STATUSES = ("delivered", "opened", "clicked", "bounced", "complained", "failed", "unsubscribed")
"""Firstmile's delivery statuses a webhook can report. ``bounced`` and ``complained`` suppress the
address; ``unsubscribed`` withdraws the user's consent for the channel."""

CUSTOM_ARG_PREFIX = "firstmile_"
"""Our custom arguments' names start with it (``firstmile_send``, ``firstmile_tenant``: see ``email_sendgrid``)."""

Reason = Literal["bad-signature", "stale", "replayed", "malformed"]

TOLERANCE_S = 300.0
"""How far from now a signed timestamp may be (SendGrid's, Vonage's); its keys are remembered twice that long."""
TWILIO_REPLAY_TTL_S = 7 * 24 * 3600.0
"""How long a Twilio callback (no timestamp) is remembered."""

# SendGrid: event -> status. A bounce of type "blocked" is temporary (SendGrid's event reference:
# the receiving server refused the message, not the address), so it is a failure, not a bounce.
_SENDGRID = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "bounce": "bounced",
    "dropped": "failed",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
# Twilio: MessageStatus -> status ("read" is the read receipt of WhatsApp and RCS). An undelivered or
# failed message whose error condemns the number (30005 unknown handset, 30006 landline or unreachable
# carrier, 21211 invalid, 21614 not a mobile) bounced; 21610 (the recipient replied STOP) unsubscribed;
# other errors (30003 handset unreachable, 30008 unknown…) are failures worth a later retry.
_TWILIO = {"delivered": "delivered", "read": "opened", "undelivered": "failed", "failed": "failed"}
_TWILIO_BAD_NUMBER = frozenset({30005, 30006, 21211, 21614})
_TWILIO_STOPPED = 21610
_DEFAULT_PORTS = {"https": 443, "http": 80}
# Vonage: a delivery receipt's status -> status. Its err-code 3 (absent subscriber, permanent) and 9
# (illegal number) condemn the number; 4 (call barred by user: the recipient asked not to get messages
# from this sender) is an unsubscribe; other codes (2 absent for now, 8 network error…) are failures.
_VONAGE = {"delivered": "delivered", "failed": "failed", "rejected": "failed", "expired": "failed"}
_VONAGE_BAD_NUMBER = frozenset({3, 9})
_VONAGE_STOPPED = 4
_VONAGE_DIGESTS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


class WebhookRefusedError(ValueError):
    """A webhook request that is not believed; nothing in it may be acted on."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


class ReplayGuard(Protocol):
    """Remembers the webhook requests already acted on."""

    def first_seen(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; True when it was not already recorded."""
        ...


class MemoryReplayGuard:
    """An in-process :class:`ReplayGuard`: the ``capacity`` most recent keys, each for its time to live."""

    def __init__(self, capacity: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._clock = clock
        self._keys: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_seen(self, key: str, ttl_s: float) -> bool:
        now = self._clock()
        with self._lock:
            expires = self._keys.get(key)
            if expires is not None and expires > now:
                self._keys.move_to_end(key)
                return False
            self._keys[key] = now + ttl_s
            self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
            return True

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True, slots=True)
class SendGridEvent:
    """One event of a SendGrid Event Webhook batch."""

    event: str
    email: str | None = None
    timestamp: int | None = None
    sg_event_id: str | None = None
    sg_message_id: str | None = None
    """Starts with the ``X-Message-Id`` the send's answer carried."""
    reason: str | None = None
    bounce_type: str | None = None
    """For a bounce: ``bounce`` (the address) or ``blocked`` (this message, for now)."""
    url: str | None = None
    """For a click: the link."""
    custom_args: Mapping[str, str] = field(default_factory=dict)
    """The custom arguments of ours set at send time (names starting ``firstmile_``)."""

    @property
    def send(self) -> str | None:
        """The idempotency key of the send this event is about."""
        return self.custom_args.get(f"{CUSTOM_ARG_PREFIX}send")

    @property
    def tenant(self) -> str | None:
        return self.custom_args.get(f"{CUSTOM_ARG_PREFIX}tenant")

    @property
    def status(self) -> str | None:
        """The Firstmile delivery status this event reports, or None."""
        if self.event == "bounce" and self.bounce_type == "blocked":
            return "failed"
        return _SENDGRID.get(self.event)


@dataclass(frozen=True, slots=True)
class WebhookBatch:
    """A verified SendGrid request: its events, and the key it was remembered under."""

    events: tuple[SendGridEvent, ...]
    replay_key: str
    timestamp: int


@dataclass(frozen=True, slots=True)
class TwilioStatus:
    """A verified Twilio status callback."""

    message_sid: str
    message_status: str
    error_code: int | None
    to: str | None
    send: str | None
    """The idempotency key of the send (from the callback URL's query)."""
    tenant: str | None
    replay_key: str

    @property
    def status(self) -> str | None:
        """The Firstmile delivery status this callback reports, or None."""
        if self.message_status in ("undelivered", "failed"):
            if self.error_code in _TWILIO_BAD_NUMBER:
                return "bounced"
            if self.error_code == _TWILIO_STOPPED:
                return "unsubscribed"
        return _TWILIO.get(self.message_status)


@dataclass(frozen=True, slots=True)
class VonageReceipt:
    """A verified Vonage delivery receipt."""

    message_id: str
    message_status: str
    error_code: int | None
    msisdn: str | None
    send: str | None
    """The idempotency key of the send (from ``client-ref``)."""
    tenant: str | None
    replay_key: str

    @property
    def status(self) -> str | None:
        """The Firstmile delivery status this receipt reports, or None (``accepted``, ``buffered``, ``unknown``)."""
        if self.message_status in ("failed", "rejected", "expired"):
            if self.error_code in _VONAGE_BAD_NUMBER:
                return "bounced"
            if self.error_code == _VONAGE_STOPPED:
                return "unsubscribed"
        return _VONAGE.get(self.message_status)


def sendgrid_public_key(verification_key: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 DER SubjectPublicKeyInfo, P-256)."""
    try:
        key = load_der_public_key(base64.b64decode(verification_key, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError("the SendGrid verification key is not base64 DER") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the SendGrid verification key is not an ECDSA P-256 public key")
    return key


def verify_sendgrid(
    payload: bytes,
    signature: str,
    timestamp: str,
    public_key: ec.EllipticCurvePublicKey | str,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
    guard: ReplayGuard | None = None,
) -> WebhookBatch:
    """Verify a SendGrid Event Webhook request and parse its events; :class:`WebhookRefusedError` if not believed."""
    key = sendgrid_public_key(public_key) if isinstance(public_key, str) else public_key
    if not timestamp.isascii() or not timestamp.isdigit():
        raise WebhookRefusedError("malformed", f"{SENDGRID_TIMESTAMP} is not a Unix time")
    try:
        der = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise WebhookRefusedError("bad-signature", f"{SENDGRID_SIGNATURE} is not base64") from None
    signed = timestamp.encode() + payload
    try:
        key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise WebhookRefusedError("bad-signature", "the signature does not match the timestamp and body") from None
    at = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - at) > tolerance_s:
        raise WebhookRefusedError("stale", f"signed at {at}, {current - at:.0f} s from now (tolerance {tolerance_s} s)")
    replay_key = "sendgrid:" + hashlib.sha256(signed).hexdigest()
    events = _sendgrid_events(payload)
    if guard is not None and not guard.first_seen(replay_key, 2 * tolerance_s):
        raise WebhookRefusedError("replayed", "this signed request was already received")
    return WebhookBatch(events, replay_key, at)


def _sendgrid_events(payload: bytes) -> tuple[SendGridEvent, ...]:
    try:
        parsed: Any = json.loads(payload)
    except ValueError:
        raise WebhookRefusedError("malformed", "the body is not JSON") from None
    if not isinstance(parsed, list) or not all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in parsed):
        raise WebhookRefusedError("malformed", "the body is not an array of events")
    return tuple(_sendgrid_event(e) for e in parsed)


def _sendgrid_event(raw: Mapping[str, Any]) -> SendGridEvent:
    def text(name: str) -> str | None:
        value = raw.get(name)
        return value if isinstance(value, str) else None

    stamp = raw.get("timestamp")
    return SendGridEvent(
        event=raw["event"],
        email=text("email"),
        timestamp=stamp if isinstance(stamp, int) and not isinstance(stamp, bool) else None,
        sg_event_id=text("sg_event_id"),
        sg_message_id=text("sg_message_id"),
        reason=text("reason"),
        bounce_type=text("type"),
        url=text("url"),
        custom_args={k: v for k, v in raw.items() if k.startswith(CUSTOM_ARG_PREFIX) and isinstance(v, str)},
    )


def twilio_signature(url: str, params: Mapping[str, Sequence[str]], auth_token: str) -> str:
    """``X-Twilio-Signature`` for a POST to ``url`` with the form ``params`` (name -> values)."""
    signed = _twilio_signed(url, params)
    return base64.b64encode(hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def _twilio_signed(url: str, params: Mapping[str, Sequence[str]]) -> str:
    # Names sorted (case-sensitive); a repeated name's values sorted and, as the official library
    # does, each distinct value once.
    return url + "".join(name + value for name in sorted(params) for value in sorted(set(params[name])))


def verify_twilio(
    url: str,
    body: bytes | str,
    signature: str,
    auth_token: str,
    *,
    guard: ReplayGuard | None = None,
    replay_ttl_s: float = TWILIO_REPLAY_TTL_S,
) -> TwilioStatus:
    """Verify a Twilio status callback to ``url`` (the full URL Twilio requested) and parse it."""
    text = body.decode() if isinstance(body, bytes) else body
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise WebhookRefusedError("malformed", "the body is not a form") from None
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    canonical, with_port = _twilio_urls(url)
    if not any(
        hmac.compare_digest(twilio_signature(candidate, params, auth_token), signature)
        for candidate in (canonical, with_port)
        if candidate is not None
    ):
        raise WebhookRefusedError("bad-signature", f"{TWILIO_SIGNATURE} does not match the URL and parameters")
    # Keyed on the URL without its default port: the same request sent to either form is one request.
    replay_key = "twilio:" + hashlib.sha256(_twilio_signed(canonical, params).encode()).hexdigest()
    sid, status = _one(params, "MessageSid"), _one(params, "MessageStatus")
    if not sid or not status:
        raise WebhookRefusedError("malformed", "MessageSid and MessageStatus are required")
    code = _one(params, "ErrorCode")
    if code and not code.isdigit():
        raise WebhookRefusedError("malformed", "ErrorCode is not a number")
    query = parse_qs(urlsplit(url).query)
    if guard is not None and not guard.first_seen(replay_key, replay_ttl_s):
        raise WebhookRefusedError("replayed", "this signed request was already received")
    return TwilioStatus(
        message_sid=sid,
        message_status=status,
        error_code=int(code) if code else None,
        to=_one(params, "To"),
        send=query.get("send", [None])[-1],
        tenant=query.get("tenant", [None])[-1],
        replay_key=replay_key,
    )


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _twilio_urls(url: str) -> tuple[str, str | None]:
    """``url`` without the scheme's default port, and with it (None when the URL names another port)."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or (parts.port is not None and parts.port != default):
        return url, None
    bare = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    without = urlunsplit((parts.scheme, bare, parts.path, parts.query, parts.fragment))
    return without, urlunsplit((parts.scheme, f"{bare}:{default}", parts.path, parts.query, parts.fragment))


def vonage_signature(params: Mapping[str, str], secret: str, method: str = "sha256") -> str:
    """The ``sig`` of Vonage's signed requests and webhooks over ``params`` (``sig`` itself left out)."""
    digest = _VONAGE_DIGESTS.get(method)
    if digest is None:
        raise ValueError(f"unknown Vonage signature method {method!r}")
    signed = "".join(
        f"&{name}={value.replace('&', '_').replace('=', '_')}"
        for name, value in sorted(params.items())
        if name != "sig"
    )
    return hmac.new(secret.encode(), signed.encode(), digest).hexdigest()


def verify_vonage(
    params: Mapping[str, str],
    signature_secret: str,
    method: str = "sha256",
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
    guard: ReplayGuard | None = None,
) -> VonageReceipt:
    """Verify a Vonage delivery receipt (its parameters, however they came) and parse it."""
    signature = params.get("sig", "")
    expected = vonage_signature(params, signature_secret, method)
    if not signature or not hmac.compare_digest(expected, signature.lower()):
        raise WebhookRefusedError("bad-signature", "sig does not match the parameters")
    stamp = params.get("timestamp", "")
    if not stamp.isascii() or not stamp.isdigit():
        raise WebhookRefusedError("malformed", "a signed receipt carries its Unix timestamp")
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        raise WebhookRefusedError("stale", f"signed {current - int(stamp):.0f} s from now (tolerance {tolerance_s} s)")
    message_id, status = params.get("messageId"), params.get("status")
    if not message_id or not status:
        raise WebhookRefusedError("malformed", "messageId and status are required")
    code = params.get("err-code") or ""
    if code and (not code.isascii() or not code.isdigit()):
        raise WebhookRefusedError("malformed", "err-code is not a number")
    signed = "".join(f"&{k}={v}" for k, v in sorted(params.items()) if k != "sig")
    replay_key = "vonage:" + hashlib.sha256(signed.encode()).hexdigest()
    if guard is not None and not guard.first_seen(replay_key, 2 * tolerance_s):
        raise WebhookRefusedError("replayed", "this signed receipt was already received")
    tenant, _, send = (params.get("client-ref") or "").rpartition(":")
    return VonageReceipt(
        message_id=message_id,
        message_status=status,
        error_code=int(code) if code else None,
        msisdn=params.get("msisdn"),
        send=send or None,
        tenant=tenant or None,
        replay_key=replay_key,
    )
