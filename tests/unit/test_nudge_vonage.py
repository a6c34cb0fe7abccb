"""The Vonage SMS adapter (the backup SMS provider) against a local HTTPS stand-in of Vonage's SMS API,
and the verification of Vonage's signed delivery receipts.

The adapter drives Vonage's official client (``vonage-sms`` on ``vonage-http-client``), which only
speaks ``https://``: the stand-in serves TLS with a certificate from a throwaway CA, and the adapter
trusts that CA through its ``ca_bundle`` setting. The stand-in records every request, so the tests
assert on exactly what would reach Vonage. Our signature code is cross-checked against the official
client's signer (``vonage_http_client.auth.Auth.sign_params``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from vonage_http_client.auth import Auth

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    FailoverChannel,
    OutboundMessage,
)
from firstmile.nudges.sms_twilio import TwilioChannel
from firstmile.nudges.sms_vonage import VonageChannel, client_ref, is_gsm7
from firstmile.nudges.webhooks import MemoryReplayGuard, WebhookRefusedError, verify_vonage, vonage_signature
from firstmile.settings import Settings
from firstmile.wiring.adapters import nudge_channels
from tests.support.saas_standins import TwilioStandIn, VonageStandIn
from tests.support.tls import LoopbackTls, loopback_tls

KEY, SECRET, SIGNING = "a1b2c3d4", "vonage-secret", "signature-secret-for-tests"
FROM = "+14155552671"
TO = "+442071838750"
CALLBACK = "https://firstmile.test/v1/nudges/webhooks/vonage"


@pytest.fixture(scope="module")
def tls() -> LoopbackTls:
    return loopback_tls()


@pytest.fixture
def vonage(tls: LoopbackTls) -> Iterator[VonageStandIn]:
    with VonageStandIn(tls.server_context, KEY, SECRET) as standin:
        yield standin


def _channel(standin: VonageStandIn, tls: LoopbackTls, **options: object) -> VonageChannel:
    settings: dict[str, object] = {"from_": FROM, "callback": CALLBACK, "rest_host": standin.host,
                                   "ca_bundle": tls.ca_file, "timeout_s": 2.0} | options  # fmt: skip
    return VonageChannel(standin.api_key, standin.api_secret, **settings)  # type: ignore[arg-type]


def _sms(key: str = "send-0002", to: str = TO, body: str = "Next: invite a teammate") -> OutboundMessage:
    return OutboundMessage("sms", to, body, key, tenant="tenant-7")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_one_send_is_one_documented_request_with_basic_auth(vonage: VonageStandIn, tls: LoopbackTls) -> None:
    channel = _channel(vonage, tls)
    receipt = await channel.send(_sms())

    [request] = vonage.requests
    assert (request.method, request.path) == ("POST", "/sms/json")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.basic_auth() == (KEY, SECRET)
    assert {k: v[-1] for k, v in request.form().items()} == {
        "to": "442071838750", "from": "14155552671", "text": "Next: invite a teammate",
        "client-ref": "tenant-7:send-0002", "callback": CALLBACK,
    }  # fmt: skip  # no type: GSM-7 text; the secret is not in the body
    [accepted] = vonage.received(TO)
    assert (receipt.provider, receipt.provider_message_id) == ("vonage", accepted.message_id)
    channel.close()


async def test_text_outside_gsm7_goes_as_unicode() -> None:
    assert is_gsm7("Nächster Schritt: Schlüssel anlegen (Ä, é, ñ, €)")  # GSM-7 has these
    assert not is_gsm7("次のステップ") and not is_gsm7("Next step 🚀") and not is_gsm7("Krok: złóż")
    assert client_ref(OutboundMessage("sms", TO, "x", "send-9")) == "send-9"  # no tenant: the send alone


async def test_unicode_text_is_sent_with_type_unicode(vonage: VonageStandIn, tls: LoopbackTls) -> None:
    channel = _channel(vonage, tls)
    await channel.send(_sms(body="次のステップ: API キーを作成"))
    assert vonage.requests[0].form()["type"] == ["unicode"]
    channel.close()


async def test_with_a_signature_secret_the_request_is_signed_and_carries_no_secret(tls: LoopbackTls) -> None:
    with VonageStandIn(tls.server_context, KEY, SECRET, signature_secret=SIGNING, signature_method="sha512") as v:
        channel = _channel(v, tls, signature_secret=SIGNING, signature_method="sha512")
        receipt = await channel.send(_sms())
        [request] = v.requests
        form = {k: vs[-1] for k, vs in request.form().items()}
        assert "authorization" not in request.headers and "api_secret" not in form
        assert form["api_key"] == KEY and abs(int(form["timestamp"]) - time.time()) < 60
        assert form["sig"] == vonage_signature(form, SIGNING, "sha512")
        assert receipt.provider_message_id == v.accepted[0].message_id  # the stand-in believed the signature

        wrong = _channel(v, tls, signature_secret="another-secret", signature_method="sha512")
        with pytest.raises(ChannelRejectedError, match="status 14") as refused:
            await wrong.send(_sms())
        assert not refused.value.suppress
        channel.close()
        wrong.close()


async def test_a_malformed_number_is_rejected_and_suppressed_without_a_request(
    vonage: VonageStandIn, tls: LoopbackTls
) -> None:
    channel = _channel(vonage, tls)
    for bad in ("442071838750", "+44 20 7183 8750", "+999", "not-a-number"):
        with pytest.raises(ChannelRejectedError) as refused:
            await channel.send(_sms(to=bad))
        assert refused.value.suppress
    assert vonage.requests == []


@pytest.mark.parametrize(
    ("status", "suppress"), [(6, True), (7, True), (33, True), (4, False), (9, False), (15, False), (29, False)]
)
async def test_statuses_that_condemn_the_number_suppress_it_and_others_do_not(
    vonage: VonageStandIn, tls: LoopbackTls, status: int, suppress: bool
) -> None:
    vonage.respond(200, {}, {"message-count": "1", "messages": [{"to": "44", "status": str(status),
                                                                  "error-text": "refused"}]})  # fmt: skip
    with pytest.raises(ChannelRejectedError) as refused:
        await _channel(vonage, tls).send(_sms())
    assert refused.value.suppress is suppress and f"status {status}" in str(refused.value)


async def test_throttled_and_429_are_rate_limits(vonage: VonageStandIn, tls: LoopbackTls) -> None:
    channel = _channel(vonage, tls, rate_limit_retry_seconds=7.0)
    vonage.respond(200, {}, {"message-count": "1", "messages": [{"status": "1", "error-text": "Throttled"}]})
    with pytest.raises(ChannelRateLimitedError) as throttled:
        await channel.send(_sms())
    assert throttled.value.retry_after == 7.0
    vonage.respond(429, {"Retry-After": "30"}, {"type": "https://developer.vonage.com/api-errors#throttled"})
    with pytest.raises(ChannelRateLimitedError) as limited:
        await channel.send(_sms())
    assert limited.value.retry_after == 30.0


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_and_internal_error_are_unavailable(vonage: VonageStandIn, tls: LoopbackTls, status: int) -> None:
    channel = _channel(vonage, tls)
    vonage.respond(status, {}, "")
    with pytest.raises(ChannelUnavailableError, match=f"HTTP {status}"):
        await channel.send(_sms())
    vonage.respond(200, {}, {"message-count": "1", "messages": [{"status": "5", "error-text": "Internal Error"}]})
    with pytest.raises(ChannelUnavailableError, match="status 5"):
        await channel.send(_sms())


async def test_unreachable_dropped_silent_or_untrusted_is_unavailable_and_never_resent(
    vonage: VonageStandIn, tls: LoopbackTls
) -> None:
    with pytest.raises(ChannelUnavailableError):
        await VonageChannel(KEY, SECRET, from_=FROM, rest_host=f"127.0.0.1:{_closed_port()}",
                            ca_bundle=tls.ca_file, timeout_s=2.0).send(_sms())  # fmt: skip
    vonage.drop()
    with pytest.raises(ChannelUnavailableError):
        await _channel(vonage, tls).send(_sms(key="dropped"))
    # the client would resend a request whose connection closed unanswered; the delivery loop retries instead
    assert len(vonage.requests) == 1
    vonage.hang()
    started = time.monotonic()
    with pytest.raises(ChannelUnavailableError):
        await _channel(vonage, tls, timeout_s=0.5).send(_sms(key="silent"))
    assert time.monotonic() - started < 5
    with pytest.raises(ChannelUnavailableError, match=r"SSL|certificate"):  # the system's CAs do not know it
        await VonageChannel(KEY, SECRET, from_=FROM, rest_host=vonage.host, timeout_s=2.0).send(_sms())


async def test_twilio_down_fails_over_to_vonage_with_the_same_send(vonage: VonageStandIn, tls: LoopbackTls) -> None:
    with TwilioStandIn("AC" + "1" * 32, "tw-token") as twilio:
        primary = TwilioChannel(twilio.account_sid, twilio.auth_token, from_number=FROM, base_url=twilio.url,
                                status_callback="https://firstmile.test/v1/nudges/webhooks/twilio")  # fmt: skip
        backup = _channel(vonage, tls)
        failover = FailoverChannel(primary, backup)
        assert failover.provider == "twilio+vonage"
        twilio.respond(503, {}, {"code": 20503, "message": "Service Unavailable", "status": 503})
        receipt = await failover.send(_sms(key="send-fo-3"))
        assert receipt.provider == "vonage" and twilio.accepted == [] and len(twilio.requests) == 1
        [sms] = vonage.received(TO)
        assert sms.form["client-ref"] == "tenant-7:send-fo-3"  # the receipt names the same send
        ok = await failover.send(_sms(key="send-fo-4"))  # Twilio is back: the primary takes it
        assert ok.provider == "twilio" and len(vonage.accepted) == 1
        primary.close()
        backup.close()


async def test_the_port_contract_holds(vonage: VonageStandIn, tls: LoopbackTls) -> None:
    """The port contract's checks that a SaaS stand-in can serve (as for SendGrid and Twilio): Vonage's
    message id is new for every request, so what every attempt of one send shares is ``client-ref``."""
    channel = _channel(vonage, tls)
    assert (channel.channel, channel.provider) == ("sms", "vonage")
    receipt = await channel.send(_sms(key="contract-1", to="+14155550123"))  # received once, with its receipt
    [sms] = vonage.received("+14155550123")
    assert sms.message_id == receipt.provider_message_id and sms.form["text"] == "Next: invite a teammate"
    await channel.send(_sms(key="contract-1", to="+14155550123"))  # every attempt: the same client-ref
    await channel.send(_sms(key="contract-2", to="+14155550123"))
    refs = [m.form["client-ref"] for m in vonage.received("+14155550123")]
    assert refs[0] == refs[1] != refs[2]
    vonage.respond(200, {}, {"message-count": "1", "messages": [{"status": "7", "error-text": "Number barred"}]})
    with pytest.raises(ChannelRejectedError) as refused:  # a refused address: rejected, to be suppressed
        await channel.send(_sms(to=TO))
    assert refused.value.suppress and vonage.received(TO) == []
    with pytest.raises(ValueError, match="cannot send a email"):
        await channel.send(OutboundMessage("email", "ada@example.test", "x", "k"))
    channel.close()


def test_the_channel_refuses_settings_vonage_would_refuse() -> None:
    with pytest.raises(ValueError, match="100"):
        VonageChannel(KEY, SECRET, from_=FROM, callback="https://firstmile.test/" + "x" * 100)
    with pytest.raises(ValueError, match="signature_method"):
        VonageChannel(KEY, SECRET, from_=FROM, signature_method="md5hash")
    with pytest.raises(ValueError, match="from_"):
        VonageChannel(KEY, SECRET, from_="")


# --- delivery receipts ------------------------------------------------------------------------------------------


def _receipt(**changes: str) -> dict[str, str]:
    params = {
        "msisdn": "442071838750", "to": "Firstmile", "network-code": "23410", "messageId": "0A0000001234567B",
        "price": "0.03330000", "status": "delivered", "scts": "2612071200", "err-code": "0", "api-key": KEY,
        "client-ref": "tenant-7:send-0002", "message-timestamp": "2026-12-07 12:00:00",
        "timestamp": str(int(time.time())), "nonce": "a0b1c2d3-e4f5",
    }  # fmt: skip
    return params | changes


def _official(params: dict[str, str], method: str) -> str:
    auth = Auth(api_key=KEY, api_secret=SECRET, signature_secret=SIGNING, signature_method=method)  # type: ignore[arg-type]
    return auth.sign_params(dict(params))


@pytest.mark.parametrize("method", ["md5", "sha1", "sha256", "sha512"])
def test_our_vonage_signature_is_the_official_one(method: str) -> None:
    for params in (_receipt(), _receipt(**{"client-ref": "a&b=c", "nonce": "x=y&z"}), {"timestamp": "1", "k": ""}):
        assert vonage_signature(params, SIGNING, method) == _official(params, method)


def test_a_signed_receipt_is_verified_and_parsed() -> None:
    params = _receipt()
    params["sig"] = _official(params, "sha256")
    receipt = verify_vonage(params, SIGNING)
    assert (receipt.message_id, receipt.status, receipt.error_code) == ("0A0000001234567B", "delivered", 0)
    assert (receipt.tenant, receipt.send, receipt.msisdn) == ("tenant-7", "send-0002", "442071838750")
    upper = params | {"sig": params["sig"].upper()}  # Vonage's hex may come in either case
    assert verify_vonage(upper, SIGNING).replay_key == receipt.replay_key


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [("delivered", "0", "delivered"), ("failed", "3", "bounced"), ("rejected", "9", "bounced"),
     ("failed", "4", "unsubscribed"), ("failed", "2", "failed"), ("expired", "", "failed"),
     ("accepted", "0", None), ("buffered", "0", None), ("unknown", "1", None)],
)  # fmt: skip
def test_receipt_statuses_map_to_firstmile_statuses(status: str, code: str, expected: str | None) -> None:
    params = _receipt(status=status, **{"err-code": code})
    params["sig"] = vonage_signature(params, SIGNING)
    assert verify_vonage(params, SIGNING).status == expected


def test_forged_stale_malformed_and_replayed_receipts_are_refused() -> None:
    signed = _receipt()
    signed["sig"] = vonage_signature(signed, SIGNING)
    with pytest.raises(WebhookRefusedError) as forged:
        verify_vonage(signed | {"status": "failed"}, SIGNING)
    assert forged.value.reason == "bad-signature"
    for unsigned in ({k: v for k, v in signed.items() if k != "sig"}, signed | {"sig": "0" * 64}):
        with pytest.raises(WebhookRefusedError, match="bad-signature"):
            verify_vonage(unsigned, SIGNING)
    with pytest.raises(WebhookRefusedError, match="bad-signature"):
        verify_vonage(signed, "another-secret")
    with pytest.raises(WebhookRefusedError, match="bad-signature"):
        verify_vonage(signed, SIGNING, "sha512")  # the account signs with another method
    old = _receipt(timestamp=str(int(time.time()) - 600))
    old["sig"] = vonage_signature(old, SIGNING)
    with pytest.raises(WebhookRefusedError) as stale:
        verify_vonage(old, SIGNING)
    assert stale.value.reason == "stale"
    for broken in (_receipt(messageId=""), _receipt(**{"err-code": "x1"}), _receipt(timestamp="soon")):
        broken["sig"] = vonage_signature(broken, SIGNING)
        with pytest.raises(WebhookRefusedError) as malformed:
            verify_vonage(broken, SIGNING)
        assert malformed.value.reason == "malformed"
    guard = MemoryReplayGuard()
    verify_vonage(signed, SIGNING, guard=guard)
    with pytest.raises(WebhookRefusedError) as replayed:
        verify_vonage(dict(signed), SIGNING, guard=guard)
    assert replayed.value.reason == "replayed"
    with pytest.raises(ValueError, match="method"):
        vonage_signature(signed, SIGNING, "md5hash")


# --- settings and wiring ----------------------------------------------------------------------------------------

TWILIO = {"nudge_twilio_account_sid": "AC" + "3" * 32, "nudge_twilio_auth_token": "tw", "nudge_sms_from": FROM}
VONAGE = {"nudge_vonage_api_key": KEY, "nudge_vonage_api_secret": SECRET}


def test_the_wiring_fails_twilio_over_to_vonage_or_uses_either_alone() -> None:
    both = nudge_channels(Settings(**TWILIO, **VONAGE, nudge_in_app="off"))  # type: ignore[arg-type,call-arg]
    assert isinstance(both["sms"], FailoverChannel) and both["sms"].provider == "twilio+vonage"
    alone = nudge_channels(Settings(**VONAGE, nudge_vonage_from="Firstmile", nudge_in_app="off"))  # type: ignore[arg-type,call-arg]
    assert isinstance(alone["sms"], VonageChannel) and alone["sms"].from_ == "Firstmile"
    assert alone["sms"].callback == "http://127.0.0.1:8000/v1/nudges/webhooks/vonage"
    long_public_url = {"nudge_sms_from": FROM, "public_url": "https://" + "a" * 80 + ".test"}
    long_url = nudge_channels(Settings(**VONAGE, **long_public_url))  # type: ignore[arg-type]
    sms = long_url["sms"]
    assert isinstance(sms, VonageChannel) and sms.callback is None  # over Vonage's 100: the account's default


@pytest.mark.parametrize(
    "values",
    [
        {"nudge_vonage_api_key": KEY},  # no secret
        {"nudge_vonage_api_secret": SECRET},  # no key
        VONAGE,  # no sender at all
        {**VONAGE, "nudge_vonage_from": "A sender id too long"},
        {**VONAGE, "nudge_sms_from": FROM, "nudge_vonage_signature_method": "md5hash"},
        {"nudge_twilio_account_sid": "AC" + "3" * 32, "nudge_twilio_auth_token": "tw"},  # Twilio without a number
    ],
)
def test_partial_sms_settings_are_refused(values: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"VONAGE|TWILIO|vonage|string_pattern|literal"):
        Settings(**values)  # type: ignore[arg-type]
