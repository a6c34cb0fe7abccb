"""Web push (``pywebpush``): the channel adapter for a browser's push service (RFC 8030), with VAPID (RFC 8292).

A message's ``to`` is the browser's ``PushSubscription`` as JSON (what ``subscription.toJSON()`` gives the
page): ``{"endpoint": "https://…", "keys": {"p256dh": "…", "auth": "…"}}``. It is checked before anything
is sent: an ``https`` endpoint (``http://127.0.0.1`` only with ``allow_insecure_loopback``, for tests) on a
host of ``endpoint_hosts`` when that list is set, a ``p256dh`` that is an uncompressed P-256 point (65
octets) and an ``auth`` secret of 16 octets (RFC 8291, section 3), both base64url. A malformed
subscription is rejected and suppressed without a request.

The push message is a small JSON object, ``{"title", "body", "tag", "id"}`` (``tag`` and ``id`` are the
send's idempotency key, for the service worker's ``showNotification(title, {body, tag})`` to replace a
duplicate), encrypted by pywebpush with ``aes128gcm`` (RFC 8291 over RFC 8188) to the subscription's
keys. The request carries ``TTL`` (RFC 8030, section 5.2), ``Urgency`` when configured (section 5.3),
``Topic`` derived from the idempotency key (section 5.4: a retried send replaces an undelivered
duplicate at the push service) and ``Authorization: vapid t=<JWT>,k=<public key>`` (RFC 8292, section 3)
whose JWT has the endpoint's origin as ``aud``, the ``sub`` contact and an ``exp`` at most 24 hours ahead.

The push service's answers map onto the port's errors: 2xx (201 Created per RFC 8030, section 5; some
services answer 200 or 202) is a :class:`Receipt` whose id is the ``Location`` of the push message
resource; 404 and 410 (the subscription expired or was withdrawn) reject and suppress the subscription;
413 (payload too large) and any other 4xx (400, and 401/403 for a VAPID key the subscription was not
made with) reject the message only; 429 is a rate limit, retried after ``Retry-After`` (seconds or an
HTTP date) or ``rate_limit_retry_seconds``; 5xx, a connection that fails and a timeout are transient.

pywebpush's ``webpush_async`` (aiohttp) is used rather than its blocking ``webpush`` in a thread: a
timeout then cancels the request itself instead of leaving a thread waiting on a socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import http_ece
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid, VapidException
from pywebpush import WebPushException, webpush_async

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
    Receipt,
)

URGENCIES = ("very-low", "low", "normal", "high")
"""RFC 8030, section 5.3."""

MAX_PLAINTEXT = 3993
"""RFC 8291, section 4: one 4096-octet record less its header (86), padding delimiter (1) and tag (16)."""

MAX_VAPID_EXPIRY_SECONDS = 24 * 3600
"""RFC 8292, section 2: ``exp`` MUST NOT be more than 24 hours from the time of the request."""

_B64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_MAX_ENDPOINT = 2048
_LOOPBACK = "127.0.0.1"


def b64url_decode(text: str) -> bytes:
    """Base64url (RFC 4648, section 5), padded or not; :class:`ValueError` for anything else."""
    if not _B64URL.match(text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class PushSubscription:
    """A browser's push subscription, checked."""

    endpoint: str
    origin: str
    """``scheme://host[:port]`` of the endpoint: the VAPID token's ``aud`` (RFC 8292, section 2)."""
    p256dh: str
    auth: str

    def info(self) -> dict[str, Any]:
        """The ``subscription_info`` pywebpush takes."""
        return {"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}}


def load_vapid_private_key(key: str | ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    """A VAPID key: PEM, base64url of the raw 32-octet scalar (as ``web-push`` tools print it) or of DER."""
    loaded: object
    if isinstance(key, ec.EllipticCurvePrivateKey):
        loaded = key
    else:
        text = key.strip()
        try:
            if text.startswith("-----BEGIN"):
                loaded = serialization.load_pem_private_key(text.encode("ascii"), password=None)
            else:
                raw = b64url_decode(text)
                if len(raw) == 32:
                    loaded = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
                else:
                    loaded = serialization.load_der_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError("the VAPID private key is not a PEM, raw or DER private key") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise ValueError("a VAPID key is an EC P-256 private key (RFC 8292, section 3.2)")
    return loaded


class WebPushChannel:
    """Sends nudges to browsers through their push services, with VAPID."""

    channel = "push"

    def __init__(
        self,
        vapid_private_key: str | ec.EllipticCurvePrivateKey,
        vapid_subject: str,
        *,
        ttl_seconds: int = 4 * 3600,
        urgency: str | None = None,
        timeout_s: float = 10.0,
        rate_limit_retry_seconds: float = 60.0,
        vapid_expiry_seconds: int = 12 * 3600,
        endpoint_hosts: Collection[str] | None = None,
        allow_insecure_loopback: bool = False,
        name: str = "webpush",
    ) -> None:
        if ttl_seconds < 0:
            raise ValueError("ttl_seconds is 0 or more")
        if urgency is not None and urgency not in URGENCIES:
            raise ValueError(f"urgency is one of {', '.join(URGENCIES)}")
        if not 60 <= vapid_expiry_seconds <= MAX_VAPID_EXPIRY_SECONDS:
            raise ValueError("vapid_expiry_seconds is between 60 and 86400 (RFC 8292: at most 24 hours)")
        if timeout_s <= 0:
            raise ValueError("timeout_s is more than 0")
        self._key = load_vapid_private_key(vapid_private_key)
        self._vapid = Vapid(self._key)
        self.subject = vapid_subject
        try:  # the same check pywebpush makes on every send, made once here: a mailto: or https: contact
            self._vapid.sign({"sub": vapid_subject, "aud": "https://push.example"})
        except VapidException as exc:
            raise ValueError("vapid_subject is a mailto: address or an https: URL (RFC 8292, section 2.1)") from exc
        self.ttl_seconds = ttl_seconds
        self.urgency = urgency
        self.timeout_s = timeout_s
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self.vapid_expiry_seconds = vapid_expiry_seconds
        self.endpoint_hosts = tuple(h.lower().strip(".") for h in endpoint_hosts) if endpoint_hosts else None
        self.allow_insecure_loopback = allow_insecure_loopback
        self._name = name

    @property
    def provider(self) -> str:
        return self._name

    @property
    def application_server_key(self) -> str:
        """The VAPID public key, base64url: the ``applicationServerKey`` the page passes to ``subscribe()``."""
        point = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url_encode(point)

    def subscription(self, to: str) -> PushSubscription:
        """``to`` checked as a push subscription; :class:`ChannelRejectedError` (suppress) when it is not one."""
        try:
            data = json.loads(to)
        except ValueError as exc:
            raise self._malformed("not JSON") from exc
        if not isinstance(data, dict):
            raise self._malformed("not a JSON object")
        endpoint = data.get("endpoint")
        keys = data.get("keys")
        if not isinstance(endpoint, str) or not endpoint or len(endpoint) > _MAX_ENDPOINT:
            raise self._malformed("no endpoint")
        if not isinstance(keys, dict):
            raise self._malformed("no keys")
        origin = self._origin(endpoint)
        p256dh, auth = keys.get("p256dh"), keys.get("auth")
        if not isinstance(p256dh, str) or not isinstance(auth, str):
            raise self._malformed("keys.p256dh and keys.auth are required")
        try:
            point, secret = b64url_decode(p256dh), b64url_decode(auth)
        except ValueError as exc:
            raise self._malformed("keys.p256dh and keys.auth are base64url") from exc
        if len(point) != 65 or point[0] != 4:
            raise self._malformed("keys.p256dh is not an uncompressed P-256 point")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError as exc:
            raise self._malformed("keys.p256dh is not a point on P-256") from exc
        if len(secret) != 16:
            raise self._malformed("keys.auth is not 16 octets")
        return PushSubscription(endpoint, origin, b64url_encode(point), b64url_encode(secret))

    def payload(self, message: OutboundMessage) -> str:
        """The JSON the service worker receives (``event.data.json()``)."""
        if message.channel != "push":
            raise ValueError(f"a push adapter cannot send a {message.channel} message")
        document = {
            "title": message.subject or "",
            "body": message.body,
            "tag": message.idempotency_key,
            "id": message.idempotency_key,
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def topic(idempotency_key: str) -> str:
        """The ``Topic`` of every attempt of one send: 32 base64url characters (RFC 8030, section 5.4)."""
        return b64url_encode(hashlib.sha256(idempotency_key.encode("utf-8")).digest())[:32]

    def vapid_claims(self, subscription: PushSubscription) -> dict[str, str | int]:
        return {
            "sub": self.subject,
            "aud": subscription.origin,
            "exp": int(time.time()) + self.vapid_expiry_seconds,
        }

    async def send(self, message: OutboundMessage) -> Receipt:
        data = self.payload(message)
        subscription = self.subscription(message.to)
        if len(data.encode("utf-8")) > MAX_PLAINTEXT:
            raise ChannelRejectedError(self.provider, f"the push payload is over {MAX_PLAINTEXT} octets")
        headers: dict[str, str | int | float] = {"Topic": self.topic(message.idempotency_key)}
        if self.urgency is not None:
            headers["Urgency"] = self.urgency
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await webpush_async(
                    subscription_info=subscription.info(),
                    data=data,
                    vapid_private_key=self._vapid,
                    vapid_claims=self.vapid_claims(subscription),
                    content_encoding="aes128gcm",
                    timeout=self.timeout_s,
                    ttl=self.ttl_seconds,
                    headers=headers,
                )
        except WebPushException as exc:
            raise self._refused(exc) from exc
        except http_ece.ECEException as exc:
            raise self._malformed(f"encryption to the subscription's keys failed: {exc}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ChannelUnavailableError(self.provider, f"{type(exc).__name__}: {exc}") from exc
        location = response.headers.get("Location")
        return Receipt(self.provider, location if isinstance(location, str) and location else None)

    def _origin(self, endpoint: str) -> str:
        try:
            parts = urlsplit(endpoint)
            port = parts.port
        except ValueError as exc:
            raise self._malformed("the endpoint is not a URL") from exc
        host = parts.hostname or ""
        if parts.username is not None or parts.password is not None:
            raise self._malformed("the endpoint carries credentials")
        if not _HOST.match(host):
            raise self._malformed("the endpoint has no valid host name")
        if parts.scheme == "https":
            default = 443
        elif parts.scheme == "http" and self.allow_insecure_loopback and host == _LOOPBACK:
            default = 80
        else:
            raise self._malformed("the endpoint is not https")
        if self.endpoint_hosts is not None and not any(
            host == allowed or host.endswith("." + allowed) for allowed in self.endpoint_hosts
        ):
            raise self._malformed(f"the endpoint's host {host} is not a configured push service")
        return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")

    def _malformed(self, why: str) -> ChannelRejectedError:
        return ChannelRejectedError(self.provider, f"malformed push subscription: {why}", suppress=True)

    def _refused(
        self, exc: WebPushException
    ) -> ChannelRejectedError | ChannelRateLimitedError | ChannelUnavailableError:
        response = exc.response
        status = getattr(response, "status", None)
        detail = " ".join(str(exc.message).split())[:300]
        if not isinstance(status, int):  # pywebpush refused the subscription before any request
            return self._malformed(detail)
        if status in (404, 410):
            return ChannelRejectedError(self.provider, f"subscription gone: {detail}", suppress=True)
        if status == 429:
            headers = getattr(response, "headers", None) or {}
            retry_after = _retry_after(headers.get("Retry-After"))
            return ChannelRateLimitedError(
                self.provider, detail, self.rate_limit_retry_seconds if retry_after is None else retry_after
            )
        if status >= 500:
            return ChannelUnavailableError(self.provider, detail)
        return ChannelRejectedError(self.provider, detail)


def _retry_after(value: object) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds or an HTTP date (RFC 9110, section 10.2.3)."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
