"""The SendGrid and Twilio channel adapters against local stand-ins of their APIs, and their webhooks' verification.

The adapters use the vendors' official libraries; the stand-ins (``tests/support/saas_standins.py``)
record every request, so these tests assert on exactly what would reach SendGrid and Twilio, and
script the answers the vendors document (429, 5xx, refused addresses) to check how each maps onto
the channel port's errors. The webhook tests sign with keys generated here and cross-check the
signatures against the vendors' own verifiers (``sendgrid.helpers.eventwebhook.EventWebhook``,
``twilio.request_validator.RequestValidator``).
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator, Mapping
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.request_validator import RequestValidator

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    FailoverChannel,
    OutboundMessage,
)
from firstmile.nudges.email_sendgrid import SEND_ARG, TENANT_ARG, SendGridChannel
from firstmile.nudges.email_smtp import SmtpChannel
from firstmile.nudges.sms_twilio import TwilioChannel
from firstmile.nudges.webhooks import (
    MemoryReplayGuard,
    SendGridEvent,
    WebhookRefusedError,
    sendgrid_public_key,
    twilio_signature,
    verify_sendgrid,
    verify_twilio,
)
from tests.support.saas_standins import SendGridStandIn, TwilioStandIn, twilio_error

SENDER = "nudges@firstmile.test"
KEY = "SG.test-key"
ACCOUNT = "AC" + "1" * 32
TOKEN = "auth-token-for-tests"
FROM = "+14155552671"
TO = "+442071838750"
CALLBACK = "https://firstmile.test/webhooks/twilio/status"
UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://firstmile.test/u/abc123>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mail(
    key: str = "send-0001", to: str = "ada@example.test", html: str | None = "<p>Next: <b>invite</b></p>"
) -> OutboundMessage:
    return OutboundMessage(
        "email", to, "Next: invite a teammate", key, subject="One step left", html=html,
        headers=UNSUBSCRIBE, tenant="tenant-7",
    )  # fmt: skip


def _sms(key: str = "send-0002", to: str = TO) -> OutboundMessage:
    return OutboundMessage("sms", to, "Next: invite a teammate", key, tenant="tenant-7")


@pytest.fixture
def sendgrid() -> Iterator[SendGridStandIn]:
    with SendGridStandIn(KEY) as standin:
        yield standin


@pytest.fixture
def backup_sendgrid() -> Iterator[SendGridStandIn]:
    with SendGridStandIn("SG.backup-key") as standin:
        yield standin


@pytest.fixture
def twilio() -> Iterator[TwilioStandIn]:
    with TwilioStandIn(ACCOUNT, TOKEN) as standin:
        yield standin


@pytest.fixture
def backup_twilio() -> Iterator[TwilioStandIn]:
    with TwilioStandIn("AC" + "2" * 32, "backup-token") as standin:
        yield standin


def _sendgrid_channel(standin: SendGridStandIn, **options: object) -> SendGridChannel:
    settings: dict[str, object] = {"sender_name": "Firstmile", "base_url": standin.url, "timeout_s": 5.0}
    settings.update(options)
    return SendGridChannel(standin.api_key, SENDER, **settings)  # type: ignore[arg-type]


def _twilio_channel(standin: TwilioStandIn, **options: object) -> TwilioChannel:
    settings: dict[str, object] = {"from_number": FROM, "status_callback": CALLBACK, "timeout_s": 5.0}
    settings.update(options)
    return TwilioChannel(standin.account_sid, standin.auth_token, base_url=standin.url, **settings)  # type: ignore[arg-type]


# --- SendGrid: the request ---------------------------------------------------------------------------------------


async def test_sendgrid_posts_one_mail_send_request_with_the_documented_body(sendgrid: SendGridStandIn) -> None:
    channel = _sendgrid_channel(sendgrid)
    receipt = await channel.send(_mail())

    [request] = sendgrid.requests
    assert (request.method, request.path) == ("POST", "/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["personalizations"] == [{"to": [{"email": "ada@example.test"}]}]
    assert body["from"] == {"email": SENDER, "name": "Firstmile"}
    assert body["subject"] == "One step left"
    # text/plain first, as the v3 API requires
    assert body["content"] == [
        {"type": "text/plain", "value": "Next: invite a teammate"},
        {"type": "text/html", "value": "<p>Next: <b>invite</b></p>"},
    ]
    # the same Message-ID as the SMTP adapter gives the same send, and the one-click unsubscribe headers
    smtp_id = SmtpChannel("127.0.0.1", 25, SENDER).message_id("send-0001")
    assert body["headers"] == {"Message-ID": smtp_id, **UNSUBSCRIBE}
    assert smtp_id == "<send-0001@firstmile.test>"
    assert body["custom_args"] == {SEND_ARG: "send-0001", TENANT_ARG: "tenant-7"}
    assert set(body) == {"personalizations", "from", "subject", "content", "headers", "custom_args"}

    [accepted] = sendgrid.accepted
    assert receipt.provider == "sendgrid" and receipt.provider_message_id == accepted.message_id


async def test_sendgrid_sends_text_alone_when_there_is_no_html(sendgrid: SendGridStandIn) -> None:
    await _sendgrid_channel(sendgrid).send(_mail(html=None))
    assert sendgrid.requests[0].json()["content"] == [{"type": "text/plain", "value": "Next: invite a teammate"}]


def test_sendgrid_refuses_headers_it_sets_or_sendgrid_reserves() -> None:
    channel = SendGridChannel(KEY, SENDER)
    for name in ("Message-ID", "Reply-To", "subject", "DKIM-Signature"):
        message = OutboundMessage("email", "ada@example.test", "x", "send-1", headers={name: "x"})
        with pytest.raises(ValueError, match="reserved"):
            channel.request_body(message)
    with pytest.raises(ValueError, match="cannot send a sms"):
        channel.request_body(_sms())
    with pytest.raises(ValueError, match="idempotency key"):
        channel.request_body(_mail(key="not a key"))


# --- SendGrid: the answers -----------------------------------------------------------------------------------------


async def test_sendgrid_429_is_rate_limited_until_the_documented_reset(sendgrid: SendGridStandIn) -> None:
    channel = _sendgrid_channel(sendgrid, clock=lambda: 1_700_000_000.0, rate_limit_retry_seconds=60.0)
    sendgrid.respond(
        429,
        {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000042"},
        {"errors": [{"field": None, "message": "too many requests"}]},
    )
    with pytest.raises(ChannelRateLimitedError) as limited:
        await channel.send(_mail())
    assert limited.value.retry_after == 42.0 and "too many requests" in limited.value.detail

    sendgrid.respond(429, {}, {"errors": [{"field": None, "message": "too many requests"}]})
    with pytest.raises(ChannelRateLimitedError) as default:
        await channel.send(_mail())
    assert default.value.retry_after == 60.0
    assert sendgrid.accepted == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_sendgrid_5xx_is_unavailable(sendgrid: SendGridStandIn, status: int) -> None:
    sendgrid.respond(status, {"Content-Type": "text/html"}, "<html>upstream error</html>")
    with pytest.raises(ChannelUnavailableError, match=f"HTTP {status}"):
        await _sendgrid_channel(sendgrid).send(_mail())


async def test_sendgrid_unreachable_dropped_or_silent_is_unavailable(sendgrid: SendGridStandIn) -> None:
    closed = SendGridChannel(KEY, SENDER, base_url=f"http://127.0.0.1:{_closed_port()}", timeout_s=2)
    with pytest.raises(ChannelUnavailableError):
        await closed.send(_mail())
    sendgrid.drop()
    with pytest.raises(ChannelUnavailableError):
        await _sendgrid_channel(sendgrid).send(_mail())
    sendgrid.hang()
    with pytest.raises(ChannelUnavailableError):
        await _sendgrid_channel(sendgrid, timeout_s=0.3).send(_mail())


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "The subject is required."),
        (403, "access forbidden"),
        (413, "request entity too large"),
        (404, "not found"),
    ],
)
async def test_sendgrid_other_4xx_is_rejected_without_suppression(
    sendgrid: SendGridStandIn, status: int, message: str
) -> None:
    sendgrid.respond(status, {}, {"errors": [{"field": "subject" if status == 400 else None, "message": message}]})
    with pytest.raises(ChannelRejectedError, match=message) as rejected:
        await _sendgrid_channel(sendgrid).send(_mail())
    assert not rejected.value.suppress


async def test_sendgrid_bad_key_is_rejected_without_suppression(sendgrid: SendGridStandIn) -> None:
    with pytest.raises(ChannelRejectedError, match="HTTP 401") as rejected:
        await SendGridChannel("SG.wrong", SENDER, base_url=sendgrid.url).send(_mail())
    assert not rejected.value.suppress and sendgrid.accepted == []


async def test_sendgrid_malformed_recipient_is_rejected_and_suppressed(sendgrid: SendGridStandIn) -> None:
    # the stand-in's own answer: 400 naming personalizations.0.to.0.email
    with pytest.raises(ChannelRejectedError, match="valid address") as rejected:
        await _sendgrid_channel(sendgrid).send(_mail(to="not-an-address"))
    assert rejected.value.suppress and sendgrid.accepted == []


# --- Twilio: the request -------------------------------------------------------------------------------------------


async def test_twilio_creates_one_message_with_the_documented_form(twilio: TwilioStandIn) -> None:
    channel = _twilio_channel(twilio)
    try:
        receipt = await channel.send(_sms())
    finally:
        channel.close()

    [request] = twilio.requests
    assert (request.method, request.path) == ("POST", f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json")
    assert request.basic_auth() == (ACCOUNT, TOKEN)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = request.form()
    callback = f"{CALLBACK}?{urlencode({'send': 'send-0002', 'tenant': 'tenant-7'})}"
    assert form == {"To": [TO], "From": [FROM], "Body": ["Next: invite a teammate"], "StatusCallback": [callback]}
    [accepted] = twilio.accepted
    assert receipt.provider == "twilio" and receipt.provider_message_id == accepted.sid
    assert accepted.sid.startswith("SM")


async def test_twilio_through_a_messaging_service_sends_its_sid_and_no_from(twilio: TwilioStandIn) -> None:
    channel = _twilio_channel(twilio, from_number=None, messaging_service_sid="MG" + "3" * 32, status_callback=None)
    await channel.send(_sms())
    channel.close()
    assert twilio.requests[0].form() == {
        "To": [TO],
        "MessagingServiceSid": ["MG" + "3" * 32],
        "Body": ["Next: invite a teammate"],
    }
    with pytest.raises(ValueError, match="exactly one"):
        TwilioChannel(ACCOUNT, TOKEN, from_number=FROM, messaging_service_sid="MG1")


@pytest.mark.parametrize(
    "number",
    ["14155552671", "+1415555267", "+1 415 555 2671", "+999123456789", "+14155552671 ", "", "tel:+14155552671"],
)
async def test_twilio_malformed_number_is_rejected_and_suppressed_without_a_request(
    twilio: TwilioStandIn, number: str
) -> None:
    with pytest.raises(ChannelRejectedError, match=r"E\.164") as rejected:
        await _twilio_channel(twilio).send(_sms(to=number))
    assert rejected.value.suppress and twilio.requests == []


# --- Twilio: the answers ------------------------------------------------------------------------------------------


async def test_twilio_429_is_rate_limited(twilio: TwilioStandIn) -> None:
    channel = _twilio_channel(twilio, rate_limit_retry_seconds=5.0)
    twilio.respond(429, {"Retry-After": "17"}, {"code": 20429, "message": "Too Many Requests", "status": 429})
    with pytest.raises(ChannelRateLimitedError) as limited:
        await channel.send(_sms())
    assert limited.value.retry_after == 17.0 and "20429" in limited.value.detail
    twilio.respond(429, {}, {"code": 20429, "message": "Too Many Requests", "status": 429})
    with pytest.raises(ChannelRateLimitedError) as default:
        await channel.send(_sms())
    assert default.value.retry_after == 5.0
    channel.close()


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_twilio_5xx_is_unavailable(twilio: TwilioStandIn, status: int) -> None:
    twilio.respond(status, {"Content-Type": "text/html"}, "<html>bad gateway</html>")  # not Twilio's JSON
    with pytest.raises(ChannelUnavailableError, match=f"HTTP {status}"):
        await _twilio_channel(twilio).send(_sms())


async def test_twilio_unreachable_dropped_or_silent_is_unavailable(twilio: TwilioStandIn) -> None:
    closed = TwilioChannel(ACCOUNT, TOKEN, from_number=FROM, base_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ChannelUnavailableError):
        await closed.send(_sms())
    twilio.drop()
    with pytest.raises(ChannelUnavailableError):
        await _twilio_channel(twilio).send(_sms())
    twilio.hang()
    with pytest.raises(ChannelUnavailableError):
        await _twilio_channel(twilio, timeout_s=0.3).send(_sms())


@pytest.mark.parametrize(
    ("code", "suppress"),
    [(21211, True), (21614, True), (21610, True), (21606, False), (21408, False)],
)
async def test_twilio_400_suppresses_only_for_a_bad_or_stopped_number(
    twilio: TwilioStandIn, code: int, suppress: bool
) -> None:
    answer = twilio_error(400, code, f"error {code}")
    twilio.respond(answer.status, answer.headers, answer.body)
    with pytest.raises(ChannelRejectedError, match=str(code)) as rejected:
        await _twilio_channel(twilio).send(_sms())
    assert rejected.value.suppress is suppress


async def test_twilio_invalid_to_from_the_stand_in_and_bad_credentials(twilio: TwilioStandIn) -> None:
    # E.164 that phonenumbers accepts but the stand-in, like Twilio, refuses (here: no such number)
    twilio.respond(400, {}, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400})
    with pytest.raises(ChannelRejectedError) as bad_number:
        await _twilio_channel(twilio).send(_sms())
    assert bad_number.value.suppress
    wrong = TwilioChannel(ACCOUNT, "wrong-token", from_number=FROM, base_url=twilio.url)
    with pytest.raises(ChannelRejectedError, match="20003") as unauthorised:
        await wrong.send(_sms())
    assert not unauthorised.value.suppress and twilio.accepted == []


# --- failover and the port's contract -----------------------------------------------------------------------------


async def test_email_fails_over_from_a_sendgrid_answering_503_to_a_second_sendgrid(
    sendgrid: SendGridStandIn, backup_sendgrid: SendGridStandIn
) -> None:
    primary = _sendgrid_channel(sendgrid, name="sendgrid")
    backup = _sendgrid_channel(backup_sendgrid, name="sendgrid-backup")
    sendgrid.respond(503, {}, "Service Unavailable")
    receipt = await FailoverChannel(primary, backup).send(_mail(key="send-fo-1"))

    assert receipt.provider == "sendgrid-backup"
    assert [m.message_id for m in backup_sendgrid.received("ada@example.test")] == [receipt.provider_message_id]
    assert sendgrid.accepted == [] and len(sendgrid.requests) == 1
    # both attempts carry what a receiver or a webhook deduplicates by: the Message-ID and the send's key
    first, second = sendgrid.requests[0].json(), backup_sendgrid.requests[0].json()
    assert first["headers"]["Message-ID"] == second["headers"]["Message-ID"] == "<send-fo-1@firstmile.test>"
    assert first["custom_args"] == second["custom_args"] == {SEND_ARG: "send-fo-1", TENANT_ARG: "tenant-7"}
    assert backup_sendgrid.requests[0].headers["authorization"] == "Bearer SG.backup-key"

    # a rejection is the primary's answer about the message: no failover
    backup_before = len(backup_sendgrid.requests)
    with pytest.raises(ChannelRejectedError):
        await FailoverChannel(primary, backup).send(_mail(to="not-an-address"))
    assert len(backup_sendgrid.requests) == backup_before
    # and a rate limit is deferred, not failed over
    sendgrid.respond(429, {}, {"errors": [{"message": "too many requests"}]})
    with pytest.raises(ChannelRateLimitedError):
        await FailoverChannel(primary, backup).send(_mail())
    assert len(backup_sendgrid.requests) == backup_before


async def test_sms_fails_over_from_a_twilio_answering_500_to_a_second_twilio(
    twilio: TwilioStandIn, backup_twilio: TwilioStandIn
) -> None:
    primary = _twilio_channel(twilio, name="twilio")
    backup = _twilio_channel(backup_twilio, name="twilio-backup", from_number="+14155550123")
    twilio.respond(500, {}, {"code": 20500, "message": "Internal Server Error", "status": 500})
    receipt = await FailoverChannel(primary, backup).send(_sms(key="send-fo-2"))

    assert receipt.provider == "twilio-backup"
    assert [m.sid for m in backup_twilio.received(TO)] == [receipt.provider_message_id]
    assert twilio.accepted == [] and len(twilio.requests) == 1
    first, second = twilio.requests[0].form(), backup_twilio.requests[0].form()
    assert first["StatusCallback"] == second["StatusCallback"]  # the send's key travels with both attempts
    assert parse_qs(urlsplit(second["StatusCallback"][0]).query)["send"] == ["send-fo-2"]
    assert backup_twilio.requests[0].basic_auth() == (backup_twilio.account_sid, "backup-token")
    assert second["From"] == ["+14155550123"]

    both_down = FailoverChannel(primary, backup)
    twilio.respond(503, {}, "")
    backup_twilio.respond(502, {}, "")
    with pytest.raises(ChannelUnavailableError, match=r"primary .* backup"):
        await both_down.send(_sms())
    primary.close()
    backup.close()


async def test_the_port_contract_holds_for_both_adapters(sendgrid: SendGridStandIn, twilio: TwilioStandIn) -> None:
    """The checks of the port's contract suite that a SaaS stand-in can serve, on each adapter.

    What differs from SMTP: SendGrid's ``X-Message-Id`` and Twilio's SID are new for every request,
    so the id that stays the same across attempts is the one the receiver and the webhooks see:
    the ``Message-ID`` and ``custom_args`` (SendGrid), the status callback URL (Twilio).
    """
    sg, tw = _sendgrid_channel(sendgrid), _twilio_channel(twilio)
    assert (sg.channel, sg.provider, tw.channel, tw.provider) == ("email", "sendgrid", "sms", "twilio")

    # an accepted send is received once, with its receipt
    mail_receipt = await sg.send(_mail(key="contract-1", to="grace@example.test"))
    [mail] = sendgrid.received("grace@example.test")
    assert mail.message_id == mail_receipt.provider_message_id
    sms_receipt = await tw.send(_sms(key="contract-2", to="+14155550123"))
    [sms] = twilio.received("+14155550123")
    assert sms.sid == sms_receipt.provider_message_id and sms.form["Body"] == "Next: invite a teammate"

    # every attempt of one send carries the same receiver-visible id; another send another
    await sg.send(_mail(key="contract-1", to="grace@example.test"))
    await sg.send(_mail(key="contract-3", to="grace@example.test"))
    ids = [m.body["headers"]["Message-ID"] for m in sendgrid.received("grace@example.test")]
    assert ids[0] == ids[1] != ids[2]
    await tw.send(_sms(key="contract-2", to="+14155550123"))
    callbacks = [m.form["StatusCallback"] for m in twilio.received("+14155550123")]
    assert callbacks[0] == callbacks[1]

    # a refused address is rejected and marked for suppression, and nothing is received
    with pytest.raises(ChannelRejectedError) as mail_refused:
        await sg.send(_mail(to="grace@@example"))
    twilio.respond(400, {}, {"code": 21614, "message": "'To' number is not a valid mobile number", "status": 400})
    with pytest.raises(ChannelRejectedError) as sms_refused:
        await tw.send(_sms(to=TO))
    assert mail_refused.value.suppress and sms_refused.value.suppress
    assert sendgrid.received("grace@@example") == [] and twilio.received(TO) == []
    tw.close()


# --- webhooks: SendGrid's Signed Event Webhook ------------------------------------------------------------------


def _p256() -> tuple[ec.EllipticCurvePrivateKey, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def _sign(private: ec.EllipticCurvePrivateKey, timestamp: str, payload: bytes) -> str:
    return base64.b64encode(private.sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))).decode()


_EVENTS = [
    {"email": "ada@example.test", "timestamp": 1_700_000_000, "event": "processed", "sg_event_id": "e0",
     "sg_message_id": "abc.filter0001", SEND_ARG: "send-1", TENANT_ARG: "tenant-7"},
    {"email": "ada@example.test", "timestamp": 1_700_000_001, "event": "delivered", "sg_event_id": "e1",
     "sg_message_id": "abc.filter0001", "response": "250 OK", SEND_ARG: "send-1", TENANT_ARG: "tenant-7"},
    {"email": "ada@example.test", "timestamp": 1_700_000_002, "event": "open", "sg_event_id": "e2",
     SEND_ARG: "send-1", "category": ["onboarding"]},
    {"email": "ada@example.test", "timestamp": 1_700_000_003, "event": "click", "sg_event_id": "e3",
     "url": "https://app.test/invite", SEND_ARG: "send-1"},
    {"email": "bob@example.test", "timestamp": 1_700_000_004, "event": "bounce", "type": "bounce",
     "reason": "550 5.1.1 unknown user", SEND_ARG: "send-2"},
    {"email": "cy@example.test", "timestamp": 1_700_000_005, "event": "bounce", "type": "blocked",
     "reason": "421 try later", SEND_ARG: "send-3"},
    {"email": "di@example.test", "timestamp": 1_700_000_006, "event": "dropped", "reason": "Bounced Address",
     SEND_ARG: "send-4"},
    {"email": "ed@example.test", "timestamp": 1_700_000_007, "event": "spamreport", SEND_ARG: "send-5"},
    {"email": "fa@example.test", "timestamp": 1_700_000_008, "event": "unsubscribe", SEND_ARG: "send-6"},
    {"email": "gi@example.test", "timestamp": 1_700_000_009, "event": "deferred", "attempt": "1"},
]  # fmt: skip
_BODY = json.dumps(_EVENTS, separators=(",", ":")).encode()
_NOW = 1_700_000_100.0


def test_a_signed_sendgrid_batch_is_verified_parsed_and_mapped_to_statuses() -> None:
    private, public = _p256()
    stamp = str(int(_NOW) - 30)
    signature = _sign(private, stamp, _BODY)
    # the signature is one SendGrid's own library accepts
    assert EventWebhook(public).verify_signature(_BODY.decode(), signature, stamp)

    batch = verify_sendgrid(_BODY, signature, stamp, public, now=_NOW, guard=MemoryReplayGuard())
    assert batch.timestamp == int(stamp)
    assert [(e.event, e.status) for e in batch.events] == [
        ("processed", None),
        ("delivered", "delivered"),
        ("open", "opened"),
        ("click", "clicked"),
        ("bounce", "bounced"),
        ("bounce", "failed"),  # blocked: this message, not the address
        ("dropped", "failed"),
        ("spamreport", "complained"),
        ("unsubscribe", "unsubscribed"),
        ("deferred", None),
    ]
    delivered = batch.events[1]
    assert delivered == SendGridEvent(
        event="delivered", email="ada@example.test", timestamp=1_700_000_001, sg_event_id="e1",
        sg_message_id="abc.filter0001", custom_args={SEND_ARG: "send-1", TENANT_ARG: "tenant-7"},
    )  # fmt: skip
    assert delivered.send == "send-1" and delivered.tenant == "tenant-7"
    assert batch.events[3].url == "https://app.test/invite"
    assert batch.events[4].reason == "550 5.1.1 unknown user" and batch.events[9].send is None


def test_sendgrid_events_carry_back_the_custom_args_the_adapter_sent() -> None:
    body = SendGridChannel(KEY, SENDER).request_body(_mail(key="send-rt"))
    event = {"email": "ada@example.test", "timestamp": 1, "event": "delivered", **body["custom_args"]}
    private, public = _p256()
    payload = json.dumps([event]).encode()
    stamp = str(int(_NOW))
    [parsed] = verify_sendgrid(payload, _sign(private, stamp, payload), stamp, public, now=_NOW).events
    assert (parsed.send, parsed.tenant) == ("send-rt", "tenant-7")


def test_sendgrid_refuses_a_bad_signature() -> None:
    private, public = _p256()
    stamp = str(int(_NOW))
    signature = _sign(private, stamp, _BODY)
    tampered = _BODY.replace(b"bounce", b"delivr", 1)
    _, other_key = _p256()
    cases = [
        (tampered, signature, stamp, public),  # the body changed
        (_BODY, signature, str(int(_NOW) - 1), public),  # the timestamp changed
        (_BODY, signature, stamp, other_key),  # another account's key
        (_BODY, "not base64!", stamp, public),
        (_BODY, base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode(), stamp, public),
    ]
    for i, (payload, sig, at, key) in enumerate(cases):
        with pytest.raises(WebhookRefusedError) as refused:
            verify_sendgrid(payload, sig, at, key, now=_NOW)
        assert refused.value.reason == "bad-signature"
        if i < 3:  # SendGrid's own library refuses them too
            assert not EventWebhook(key).verify_signature(payload.decode(), sig, at)


def test_sendgrid_refuses_stale_and_future_timestamps_and_malformed_input() -> None:
    private, public = _p256()
    for stamp in (str(int(_NOW) - 301), str(int(_NOW) + 301)):
        with pytest.raises(WebhookRefusedError) as stale:
            verify_sendgrid(_BODY, _sign(private, stamp, _BODY), stamp, public, now=_NOW, tolerance_s=300)
        assert stale.value.reason == "stale"
    old = str(int(_NOW) - 3600)
    assert verify_sendgrid(_BODY, _sign(private, old, _BODY), old, public, now=_NOW, tolerance_s=7200).events
    for payload in (b"not json", b'{"event": "delivered"}', b'[{"email": "x"}]'):
        stamp = str(int(_NOW))
        with pytest.raises(WebhookRefusedError) as malformed:
            verify_sendgrid(payload, _sign(private, stamp, payload), stamp, public, now=_NOW)
        assert malformed.value.reason == "malformed"
    with pytest.raises(WebhookRefusedError, match="Unix time"):
        verify_sendgrid(_BODY, _sign(private, "12ab", _BODY), "12ab", public, now=_NOW)
    with pytest.raises(ValueError, match="base64 DER"):
        sendgrid_public_key("not a key")
    rsa_like = base64.b64encode(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    with pytest.raises(ValueError, match="P-256"):
        sendgrid_public_key(rsa_like)


def test_sendgrid_refuses_a_replay_even_with_the_signature_rewritten() -> None:
    private, public = _p256()
    guard = MemoryReplayGuard()
    stamp = str(int(_NOW))
    signature = _sign(private, stamp, _BODY)
    verify_sendgrid(_BODY, signature, stamp, public, now=_NOW, guard=guard)
    with pytest.raises(WebhookRefusedError) as replayed:
        verify_sendgrid(_BODY, signature, stamp, public, now=_NOW + 10, guard=guard)
    assert replayed.value.reason == "replayed"
    # ECDSA's (r, s) and (r, n - s) both verify: a replay with the other one is still the same request
    r, s = decode_dss_signature(base64.b64decode(signature))
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's group order
    mirrored = base64.b64encode(encode_dss_signature(r, n - s)).decode()
    assert mirrored != signature and EventWebhook(public).verify_signature(_BODY.decode(), mirrored, stamp)
    with pytest.raises(WebhookRefusedError) as rewritten:
        verify_sendgrid(_BODY, mirrored, stamp, public, now=_NOW + 10, guard=guard)
    assert rewritten.value.reason == "replayed"
    # a new signing of the same events at another time is a new request (SendGrid retries that way)
    later = str(int(_NOW) + 5)
    assert verify_sendgrid(_BODY, _sign(private, later, _BODY), later, public, now=_NOW + 10, guard=guard).events


# --- webhooks: Twilio's signed status callbacks ------------------------------------------------------------------

_STATUS_URL = f"{CALLBACK}?send=send-0002&tenant=tenant-7"


def _official_signature(url: str, params: Mapping[str, object]) -> str:
    """The signature Twilio's own library computes (it signs as Twilio does)."""
    validator = RequestValidator(TOKEN)  # type: ignore[no-untyped-call]
    return str(validator.compute_signature(url, params))  # type: ignore[no-untyped-call]


def _official_accepts(url: str, params: Mapping[str, str], signature: str) -> bool:
    validator = RequestValidator(TOKEN)  # type: ignore[no-untyped-call]
    return bool(validator.validate(url, params, signature))  # type: ignore[no-untyped-call]


def _callback(**fields: str) -> dict[str, str]:
    return {
        "AccountSid": ACCOUNT, "ApiVersion": "2010-04-01", "From": FROM, "To": TO,
        "MessageSid": "SM" + "a" * 32, "SmsSid": "SM" + "a" * 32, **fields,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (_STATUS_URL, {"MessageStatus": ["delivered"], "MessageSid": ["SM1"]}),
        ("https://x.test:8443/cb", {"Body": ["héllo wörld ✓"], "b": ["2", "1"], "B": ["0"], "Empty": [""]}),
        ("http://x.test/cb?z=1&a=2", {}),
    ],
)
def test_our_twilio_signature_is_the_official_one(url: str, params: dict[str, list[str]]) -> None:
    class Multi(dict[str, list[str]]):
        def getlist(self, name: str) -> list[str]:  # how RequestValidator reads repeated parameters
            return self[name]

    official = _official_signature(url, Multi(params))
    assert twilio_signature(url, params, TOKEN) == official
    assert twilio_signature(url, params, "another-token") != official


def test_a_signed_twilio_status_callback_is_verified_and_parsed() -> None:
    form = _callback(MessageStatus="delivered")
    body = urlencode(form)
    signature = _official_signature(_STATUS_URL, form)  # as Twilio would sign it
    status = verify_twilio(_STATUS_URL, body.encode(), signature, TOKEN, guard=MemoryReplayGuard())
    assert (status.message_sid, status.message_status, status.error_code) == ("SM" + "a" * 32, "delivered", None)
    assert (status.to, status.send, status.tenant, status.status) == (TO, "send-0002", "tenant-7", "delivered")
    # and what we compute, the official validator accepts
    ours = twilio_signature(_STATUS_URL, {k: [v] for k, v in form.items()}, TOKEN)
    assert _official_accepts(_STATUS_URL, form, ours)


def test_the_adapters_callback_url_comes_back_with_the_send() -> None:
    url = TwilioChannel(ACCOUNT, TOKEN, from_number=FROM, status_callback=CALLBACK + "?region=eu").callback_url(
        _sms(key="send-cb")
    )
    assert url is not None
    form = _callback(MessageStatus="sent")
    status = verify_twilio(url, urlencode(form), twilio_signature(url, {k: [v] for k, v in form.items()}, TOKEN), TOKEN)
    assert (status.send, status.tenant, status.status) == ("send-cb", "tenant-7", None)
    assert parse_qs(urlsplit(url).query)["region"] == ["eu"]


@pytest.mark.parametrize(
    ("message_status", "error_code", "expected"),
    [
        ("delivered", None, "delivered"),
        ("read", None, "opened"),
        ("undelivered", "30005", "bounced"),  # unknown handset
        ("failed", "30006", "bounced"),  # landline or unreachable carrier
        ("failed", "21211", "bounced"),
        ("undelivered", "30003", "failed"),  # handset off: worth a later try
        ("failed", None, "failed"),
        ("undelivered", "21610", "unsubscribed"),
        ("sent", None, None),
        ("queued", None, None),
    ],
)
def test_twilio_statuses_map_to_firstmile_statuses(
    message_status: str, error_code: str | None, expected: str | None
) -> None:
    form = _callback(MessageStatus=message_status, **({"ErrorCode": error_code} if error_code else {}))
    signature = _official_signature(_STATUS_URL, form)
    status = verify_twilio(_STATUS_URL, urlencode(form), signature, TOKEN)
    assert status.status == expected
    assert status.error_code == (int(error_code) if error_code else None)


def test_twilio_refuses_a_bad_signature_and_malformed_callbacks() -> None:
    form = _callback(MessageStatus="delivered")
    signature = _official_signature(_STATUS_URL, form)
    cases = [
        (_STATUS_URL, urlencode({**form, "MessageStatus": "undelivered"}), signature, TOKEN),  # a field changed
        (_STATUS_URL + "&x=1", urlencode(form), signature, TOKEN),  # the URL changed
        (_STATUS_URL.replace("https", "http"), urlencode(form), signature, TOKEN),
        (_STATUS_URL, urlencode(form), signature, "another-token"),
        (_STATUS_URL, urlencode(form), "", TOKEN),
    ]
    for url, body, sig, token in cases:
        with pytest.raises(WebhookRefusedError) as refused:
            verify_twilio(url, body, sig, token)
        assert refused.value.reason == "bad-signature"
    for bad in ({"MessageStatus": "delivered"}, {"MessageSid": "SM1"}, {**form, "ErrorCode": "x1"}):
        with pytest.raises(WebhookRefusedError) as malformed:
            verify_twilio(
                _STATUS_URL,
                urlencode(bad),
                twilio_signature(_STATUS_URL, {k: [v] for k, v in bad.items()}, TOKEN),
                TOKEN,
            )
        assert malformed.value.reason == "malformed"


def test_twilio_accepts_either_port_form_and_refuses_a_replay_through_the_other() -> None:
    form = _callback(MessageStatus="delivered")
    with_port = _STATUS_URL.replace("firstmile.test/", "firstmile.test:443/")
    signed_with_port = _official_signature(with_port, form)
    guard = MemoryReplayGuard()
    # Twilio signed the URL with :443; our server sees it without
    assert verify_twilio(_STATUS_URL, urlencode(form), signed_with_port, TOKEN, guard=guard).status == "delivered"
    for url in (_STATUS_URL, with_port):
        with pytest.raises(WebhookRefusedError) as replayed:
            verify_twilio(url, urlencode(form), signed_with_port, TOKEN, guard=guard)
        assert replayed.value.reason == "replayed"
    # a port that is not the default is part of what was signed
    with pytest.raises(WebhookRefusedError, match="bad-signature"):
        verify_twilio(
            _STATUS_URL.replace("firstmile.test/", "firstmile.test:8443/"), urlencode(form), signed_with_port, TOKEN
        )
    # the next status of the same message is a new callback
    later = _callback(MessageStatus="read")
    signed = _official_signature(_STATUS_URL, later)
    assert verify_twilio(_STATUS_URL, urlencode(later), signed, TOKEN, guard=guard).status == "opened"


def test_the_memory_replay_guard_forgets_after_its_ttl_and_beyond_its_capacity() -> None:
    now = [0.0]
    guard = MemoryReplayGuard(capacity=2, clock=lambda: now[0])
    assert guard.first_seen("a", 10) and not guard.first_seen("a", 10)
    now[0] = 10.5
    assert guard.first_seen("a", 10)  # expired, so new again
    assert guard.first_seen("b", 10) and guard.first_seen("c", 10)
    assert len(guard) == 2 and guard.first_seen("a", 10)  # "a" was the least recent: evicted
    assert not guard.first_seen("c", 10)
    with pytest.raises(ValueError, match="capacity"):
        MemoryReplayGuard(capacity=0)


def test_sendgrid_replay_keys_are_remembered_for_the_whole_tolerance_window() -> None:
    private, public = _p256()
    now = [0.0]
    guard = MemoryReplayGuard(clock=lambda: now[0])
    stamp = str(int(_NOW) - 299)  # at the edge of a 300 s tolerance: accepted until _NOW + 1
    signature = _sign(private, stamp, _BODY)
    verify_sendgrid(_BODY, signature, stamp, public, now=_NOW - 598, tolerance_s=300, guard=guard)  # early clock
    now[0] += 598  # the guard's clock moves as the request's does: still inside 2 x tolerance
    with pytest.raises(WebhookRefusedError, match="replayed"):
        verify_sendgrid(_BODY, signature, stamp, public, now=_NOW, tolerance_s=300, guard=guard)
