"""The SMTP adapter's message and its reading of SMTP replies (the exchange itself is tested on Mailpit)."""

from __future__ import annotations

import pytest

from firstmile.nudges.channels import ChannelRateLimitedError, ChannelUnavailableError, OutboundMessage
from firstmile.nudges.email_smtp import SmtpChannel

CHANNEL = SmtpChannel("127.0.0.1", 25, "Firstmile <nudges@firstmile.test>", rate_limit_retry_seconds=90)


def test_the_message_has_both_parts_the_headers_and_a_message_id_from_the_key() -> None:
    mail = CHANNEL.build(
        OutboundMessage(
            "email", "ada@example.test", "text body", "send-1", subject="Next step", html="<p>html body</p>",
            headers={"List-Unsubscribe": "<https://x.test/u/1>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        )
    )  # fmt: skip
    assert mail["Message-ID"] == "<send-1@firstmile.test>" and mail["Subject"] == "Next step"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [p.get_content_type() for p in mail.iter_parts()] == ["text/plain", "text/html"]
    with pytest.raises(ValueError, match="idempotency key"):
        CHANNEL.message_id("has space")
    with pytest.raises(ValueError, match="cannot send a sms"):
        CHANNEL.build(OutboundMessage("sms", "+15550100", "x", "k"))


@pytest.mark.parametrize(
    ("code", "text", "kind"),
    [
        (421, "4.7.28 Our system has detected an unusual rate of mail", ChannelRateLimitedError),
        (451, "4.7.1 Throttled: try again later", ChannelRateLimitedError),
        (452, "4.5.3 Too many recipients", ChannelRateLimitedError),
        (421, "4.3.2 Service shutting down", ChannelUnavailableError),
        (451, "4.3.0 Temporary local problem", ChannelUnavailableError),
        (450, "4.2.1 Mailbox busy", ChannelUnavailableError),
    ],
)
def test_4xx_replies_are_transient_and_those_about_rate_are_a_rate_limit(code: int, text: str, kind: type) -> None:
    error = CHANNEL._transient(code, f"{code} {text}")
    assert type(error) is kind
    if isinstance(error, ChannelRateLimitedError):
        assert error.retry_after == 90


def test_a_long_list_unsubscribe_url_stays_a_url_on_the_wire() -> None:
    url = "https://firstmile.example/v1/nudges/u/" + "A" * 66
    mail = CHANNEL.build(OutboundMessage("email", "a@example.test", "x", "k", headers={"List-Unsubscribe": f"<{url}>"}))
    raw = mail.as_bytes(policy=mail.policy)
    assert f"List-Unsubscribe: <{url}>".encode() in raw  # not RFC 2047 encoded words, which no client reads as a URL
