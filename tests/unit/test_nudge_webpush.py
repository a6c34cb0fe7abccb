"""The web push adapter against a local push service: the exact request, VAPID, RFC 8291 decryption, error mapping.

The browser side is played here: a subscription is made as a user agent makes one (an ECDH P-256 key pair
and a 16-octet authentication secret, RFC 8291 section 2), and the recorded request's body is decrypted
with its private key by an implementation of RFC 8291 / RFC 8188 written in this file, independent of the
``http_ece`` package that pywebpush encrypts with.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firstmile.nudges.channels import (
    Channel,
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
)
from firstmile.nudges.push_webpush import WebPushChannel
from tests.support.push_standin import PushRequest, PushServiceStandIn

SUBJECT = "mailto:nudges@firstmile.example"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@dataclass
class Browser:
    """A user agent's push subscription: its ECDH key pair and authentication secret (RFC 8291, section 2)."""

    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes

    @classmethod
    def subscribe(cls) -> Browser:
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    def subscription(self, endpoint: str) -> str:
        """``PushSubscription.toJSON()``: the keys unpadded base64url, as browsers give them."""
        keys = {"p256dh": b64url(point(self.private_key.public_key())), "auth": b64url(self.auth_secret)}
        return json.dumps({"endpoint": endpoint, "expirationTime": None, "keys": keys})

    def decrypt(self, body: bytes) -> bytes:
        """RFC 8291 section 3.4 (key derivation) over RFC 8188 section 2 (the aes128gcm header and record)."""
        # RFC 8188 2.1: salt (16) | rs (uint32) | idlen (1) | keyid (idlen); RFC 8291 3.1: keyid is the
        # application server's ephemeral public key, and the whole message is one record (section 4).
        salt, rs, idlen = body[:16], struct.unpack("!I", body[16:20])[0], body[20]
        assert idlen == 65, "the keyid is the sender's uncompressed P-256 public key"
        sender = body[21 : 21 + idlen]
        record = body[21 + idlen :]
        assert len(record) <= rs, "RFC 8291 section 4: a push message is a single record"
        shared = self.private_key.exchange(
            ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender)
        )
        # RFC 8291 3.4: IKM = HKDF(salt=auth_secret, ikm=ecdh_secret, info="WebPush: info" 0x00 ua_public as_public)
        key_info = b"WebPush: info\x00" + point(self.private_key.public_key()) + sender
        ikm = HKDF(hashes.SHA256(), 32, self.auth_secret, key_info).derive(shared)
        # RFC 8188 2.2 and 2.3: CEK and NONCE from HKDF(salt, IKM)
        cek = HKDF(hashes.SHA256(), 16, salt, b"Content-Encoding: aes128gcm\x00").derive(ikm)
        nonce = HKDF(hashes.SHA256(), 12, salt, b"Content-Encoding: nonce\x00").derive(ikm)
        padded = AESGCM(cek).decrypt(nonce, record, None)  # sequence number 0: the nonce itself
        # RFC 8188 2: plaintext, then the delimiter 0x02 (last record), then zero padding
        stripped = padded.rstrip(b"\x00")
        assert stripped.endswith(b"\x02"), "the only record is the last one (delimiter 0x02)"
        return stripped[:-1]


@dataclass(frozen=True)
class Vapid:
    """What the ``Authorization: vapid t=…, k=…`` header carries (RFC 8292, section 3)."""

    token: str
    key: str

    @classmethod
    def parse(cls, header: str) -> Vapid:
        scheme, _, params = header.partition(" ")
        assert scheme.lower() == "vapid", header
        # RFC 8292 3 / RFC 9110 11.4: auth-params separated by commas, optional whitespace around them
        pairs = dict(p.strip().split("=", 1) for p in params.split(","))
        assert set(pairs) == {"t", "k"}, header
        return cls(pairs["t"], pairs["k"])


@pytest.fixture(scope="module")
def vapid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def push() -> Iterator[PushServiceStandIn]:
    with PushServiceStandIn() as standin:
        yield standin


def adapter(key: ec.EllipticCurvePrivateKey, **options: Any) -> WebPushChannel:
    options.setdefault("allow_insecure_loopback", True)
    return WebPushChannel(key, SUBJECT, **options)


def message(to: str, key: str = "send-7f3a", **fields: Any) -> OutboundMessage:
    fields.setdefault("subject", "Finish connecting your warehouse")
    fields.setdefault("body", "One step left: add the read-only credentials.")
    return OutboundMessage(channel="push", to=to, idempotency_key=key, **fields)


def only(push: PushServiceStandIn) -> PushRequest:
    assert len(push.requests) == 1, push.requests
    return push.requests[0]


async def test_a_push_is_one_vapid_signed_request_whose_body_the_browser_decrypts(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.subscribe()
    channel = adapter(vapid_key, ttl_seconds=900, urgency="high")
    assert isinstance(channel, Channel) and (channel.channel, channel.provider) == ("push", "webpush")
    endpoint = push.endpoint("sub-1")
    before = int(time.time())

    receipt = await channel.send(message(browser.subscription(endpoint)))

    request = only(push)
    assert (request.method, request.path) == ("POST", "/push/sub-1")
    assert request.headers["ttl"] == "900"  # RFC 8030 5.2
    assert request.headers["urgency"] == "high"  # RFC 8030 5.3
    assert request.headers["content-encoding"] == "aes128gcm"  # RFC 8291 4 (RFC 8188)
    assert request.headers["topic"] == channel.topic("send-7f3a") and len(request.headers["topic"]) == 32
    # the push service's Location names the push message resource (RFC 8030 5): it is the receipt's id
    assert receipt.provider == "webpush"
    assert receipt.provider_message_id is not None
    assert receipt.provider_message_id.startswith(f"{push.origin}/message/")

    # VAPID (RFC 8292): k is our public key, t an ES256 JWT it verifies, for this push service's origin
    vapid = Vapid.parse(request.headers["authorization"])
    assert vapid.key == b64url(point(vapid_key.public_key())) == channel.application_server_key
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(vapid.key))
    assert jwt.get_unverified_header(vapid.token)["alg"] == "ES256"
    claims = jwt.decode(
        vapid.token, public, algorithms=["ES256"], audience=push.origin, options={"require": ["aud", "exp", "sub"]}
    )
    assert claims["aud"] == push.origin and claims["sub"] == SUBJECT
    assert before < claims["exp"] <= int(time.time()) + 24 * 3600  # RFC 8292 2: at most 24 hours ahead

    # RFC 8291: the body decrypts with the subscription's private key and auth secret to the payload
    assert json.loads(browser.decrypt(request.body)) == {
        "title": "Finish connecting your warehouse",
        "body": "One step left: add the read-only credentials.",
        "tag": "send-7f3a",
        "id": "send-7f3a",
    }


async def test_a_retried_send_carries_the_same_topic_and_tag_and_another_send_does_not(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.subscribe()
    channel = adapter(vapid_key)
    to = browser.subscription(push.endpoint())
    await channel.send(message(to, key="send-a"))
    await channel.send(message(to, key="send-a"))
    await channel.send(message(to, key="send-b"))
    first, retry, other = push.requests
    assert first.headers["topic"] == retry.headers["topic"] != other.headers["topic"]
    tags = [json.loads(browser.decrypt(r.body))["tag"] for r in push.requests]
    assert tags == ["send-a", "send-a", "send-b"]
    # each encryption is fresh (a new ephemeral key and salt), so the bodies differ even for one send
    assert first.body != retry.body


async def test_defaults_send_no_urgency_a_four_hour_ttl_and_an_empty_title_without_subject(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.subscribe()
    await adapter(vapid_key).send(message(browser.subscription(push.endpoint()), subject=None, body="Héllo ✓"))
    request = only(push)
    assert "urgency" not in request.headers
    assert request.headers["ttl"] == str(4 * 3600)
    assert json.loads(browser.decrypt(request.body))["title"] == ""
    assert json.loads(browser.decrypt(request.body))["body"] == "Héllo ✓"


@pytest.mark.parametrize(
    ("status", "suppress"),
    [
        (404, True),  # the endpoint is unknown: the subscription expired
        (410, True),  # the user withdrew permission or the browser replaced the subscription
        (413, False),  # payload too large: this message, not the address
        (400, False),
        (401, False),  # VAPID refused: our key or claims, not the subscription
        (403, False),
    ],
)
async def test_a_refusal_rejects_and_only_a_gone_subscription_is_suppressed(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey, status: int, suppress: bool
) -> None:
    push.respond(status, {"Content-Type": "application/json"}, b'{"errno": 106, "message": "gone"}')
    with pytest.raises(ChannelRejectedError) as caught:
        await adapter(vapid_key).send(message(Browser.subscribe().subscription(push.endpoint())))
    assert caught.value.suppress is suppress
    assert str(status) in caught.value.detail
    assert len(push.requests) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_server_error_is_unavailable(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey, status: int
) -> None:
    push.respond(status)
    with pytest.raises(ChannelUnavailableError):
        await adapter(vapid_key).send(message(Browser.subscribe().subscription(push.endpoint())))


async def test_429_is_a_rate_limit_after_retry_after_in_seconds_as_a_date_or_by_default(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    channel = adapter(vapid_key, rate_limit_retry_seconds=37)
    to = Browser.subscribe().subscription(push.endpoint())
    push.respond(429, {"Retry-After": "120"})
    with pytest.raises(ChannelRateLimitedError) as seconds:
        await channel.send(message(to))
    assert seconds.value.retry_after == 120

    push.respond(429, {"Retry-After": format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)})
    with pytest.raises(ChannelRateLimitedError) as date:
        await channel.send(message(to))
    assert 3000 < date.value.retry_after <= 3600

    push.respond(429)
    with pytest.raises(ChannelRateLimitedError) as default:
        await channel.send(message(to))
    assert default.value.retry_after == 37


async def test_a_push_service_that_refuses_connections_is_unavailable(vapid_key: ec.EllipticCurvePrivateKey) -> None:
    with PushServiceStandIn() as gone:
        endpoint = gone.endpoint()
    with pytest.raises(ChannelUnavailableError):  # the stand-in has stopped: nothing listens on its port
        await adapter(vapid_key).send(message(Browser.subscribe().subscription(endpoint)))


async def test_a_push_service_that_does_not_answer_times_out_as_unavailable(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    push.hang()
    with pytest.raises(ChannelUnavailableError):
        await adapter(vapid_key, timeout_s=0.2).send(message(Browser.subscribe().subscription(push.endpoint())))
    assert len(push.requests) == 1


def _with(subscription: str, **changes: Any) -> str:
    document = json.loads(subscription)
    for path, value in changes.items():
        target = document
        *parents, leaf = path.split("__")
        for parent in parents:
            target = target[parent]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    return json.dumps(document)


def _malformed(endpoint: str) -> list[str]:
    good = Browser.subscribe().subscription(endpoint)
    keys = json.loads(good)["keys"]
    other = b64url(point(ec.generate_private_key(ec.SECP256R1()).public_key()))
    off_curve = b64url(b"\x04" + b"\x01" * 64)
    return [
        "not json",
        "[]",
        '"https://push.example/x"',
        _with(good, endpoint=None),
        _with(good, endpoint=""),
        _with(good, endpoint=42),
        _with(good, keys=None),
        _with(good, keys="p256dh"),
        _with(good, keys__p256dh=None),
        _with(good, keys__auth=None),
        _with(good, keys__p256dh=keys["p256dh"].replace("-", "+").replace("_", "/") + "+/"),  # base64, not url
        _with(good, keys__auth="!!!!"),
        _with(good, keys__p256dh=other[:-4]),  # too short for a point
        _with(good, keys__p256dh=off_curve),  # 65 octets, not on P-256
        _with(good, keys__p256dh=b64url(b"\x02" + unb64url(other)[1:33])),  # compressed form
        _with(good, keys__auth=b64url(b"\x00" * 15)),  # RFC 8291 2: 16 octets
        _with(good, endpoint=endpoint.replace("http://127.0.0.1", "http://localhost")),  # http, not loopback IP
        _with(good, endpoint=endpoint.replace("http://", "ftp://")),
        _with(good, endpoint=endpoint.replace("http://", "http://user:pw@")),
        _with(good, endpoint="https://[::1]/push/x"),
        _with(good, endpoint="https:///push/x"),
    ]


async def test_a_malformed_subscription_is_rejected_and_suppressed_without_a_request(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    channel = adapter(vapid_key)
    cases = _malformed(push.endpoint())
    for to in cases:
        with pytest.raises(ChannelRejectedError) as caught:
            await channel.send(message(to))
        assert caught.value.suppress, to
        assert "malformed push subscription" in caught.value.detail
    assert push.requests == []
    # and the well-formed one goes through, so each case above failed for its own defect
    await channel.send(message(Browser.subscribe().subscription(push.endpoint())))
    assert len(push.requests) == 1


async def test_plain_http_to_loopback_is_refused_unless_allowed(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(ChannelRejectedError) as caught:
        await adapter(vapid_key, allow_insecure_loopback=False).send(
            message(Browser.subscribe().subscription(push.endpoint()))
        )
    assert caught.value.suppress and "not https" in caught.value.detail
    assert push.requests == []


def test_endpoint_hosts_restrict_where_pushes_go_and_the_origin_is_the_vapid_audience(
    vapid_key: ec.EllipticCurvePrivateKey,
) -> None:
    channel = adapter(vapid_key, endpoint_hosts=["push.services.mozilla.com", "fcm.googleapis.com"])
    browser = Browser.subscribe()
    mozilla = channel.subscription(browser.subscription("https://Updates.Push.Services.Mozilla.com:443/wpush/v2/x"))
    assert mozilla.origin == "https://updates.push.services.mozilla.com"  # default port left out
    assert channel.subscription(browser.subscription("https://fcm.googleapis.com:8443/fcm/send/x")).origin == (
        "https://fcm.googleapis.com:8443"
    )
    for elsewhere in ("https://internal.example/hook", "https://evilfcm.googleapis.com.example/x"):
        with pytest.raises(ChannelRejectedError) as caught:
            channel.subscription(browser.subscription(elsewhere))
        assert caught.value.suppress and "not a configured push service" in caught.value.detail


async def test_a_payload_over_one_record_is_rejected_without_a_request(
    push: PushServiceStandIn, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.subscribe()
    with pytest.raises(ChannelRejectedError) as caught:
        await adapter(vapid_key).send(message(browser.subscription(push.endpoint()), body="x" * 4000))
    assert not caught.value.suppress and "3993" in caught.value.detail
    assert push.requests == []


def test_the_vapid_key_is_read_as_pem_raw_or_der_and_the_configuration_is_checked(
    vapid_key: ec.EllipticCurvePrivateKey,
) -> None:
    expected = b64url(point(vapid_key.public_key()))
    pem = vapid_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    raw = b64url(vapid_key.private_numbers().private_value.to_bytes(32, "big"))
    der = b64url(
        vapid_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for form in (pem, raw, der):
        assert WebPushChannel(form, SUBJECT).application_server_key == expected
    with pytest.raises(ValueError, match="P-256"):
        WebPushChannel(ec.generate_private_key(ec.SECP384R1()), SUBJECT)
    with pytest.raises(ValueError, match="private key"):
        WebPushChannel("not a key", SUBJECT)
    with pytest.raises(ValueError, match="vapid_subject"):
        WebPushChannel(vapid_key, "nudges@firstmile.example")  # RFC 8292 2.1: mailto: or https:
    with pytest.raises(ValueError, match="24 hours"):
        WebPushChannel(vapid_key, SUBJECT, vapid_expiry_seconds=25 * 3600)
    with pytest.raises(ValueError, match="urgency"):
        WebPushChannel(vapid_key, SUBJECT, urgency="urgent")
    with pytest.raises(ValueError, match="cannot send a email"):
        WebPushChannel(vapid_key, SUBJECT).payload(OutboundMessage("email", "a@b.example", "hi", "k"))
