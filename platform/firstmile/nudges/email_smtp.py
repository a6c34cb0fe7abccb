"""E-mail over SMTP (``aiosmtplib``): the channel adapter for any SMTP relay, and Mailpit in tests and ``make run``.

The message is a multipart/alternative (text, and HTML when the template has it) with a
``Message-ID`` derived from the send's idempotency key (``<key@domain>``), so every retry of one
send carries the same id and a receiver can deduplicate. SMTP replies map onto the port's errors:
a connection that fails or times out, and a 4xx reply, are transient (421/450/451/452 that name a
rate or a limit are a rate limit, retried after ``rate_limit_retry_seconds``); 5xx replies are
rejections, and a refused recipient (550, 551, 553) goes on the suppression list.
"""

from __future__ import annotations

import asyncio
import re
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import aiosmtplib

from firstmile.nudges.channels import (
    ChannelRateLimitedError,
    ChannelRejectedError,
    ChannelUnavailableError,
    OutboundMessage,
    Receipt,
)
from firstmile.nudges.message_ids import domain_of, message_id

_POLICY = policy.SMTP.clone(max_line_length=998)
"""RFC 5322's line limit: with the default 78, a long header without spaces (a List-Unsubscribe URL) is
turned into RFC 2047 encoded words, which no mail client reads as a URL."""
_RATE = re.compile(r"rate|limit|too many|throttl", re.IGNORECASE)
_BAD_ADDRESS = frozenset({550, 551, 553})


class SmtpChannel:
    """Sends e-mail through one SMTP server."""

    channel = "email"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool | None = None,
        timeout_s: float = 10.0,
        rate_limit_retry_seconds: float = 60.0,
        message_id_domain: str | None = None,
        name: str = "smtp",
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.username = username
        self.password = password
        self.starttls = starttls
        self.timeout_s = timeout_s
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self.domain = message_id_domain or domain_of(sender)
        self._name = name

    @property
    def provider(self) -> str:
        return self._name

    def message_id(self, idempotency_key: str) -> str:
        """The ``Message-ID`` of every attempt of one send."""
        return message_id(idempotency_key, self.domain)

    def build(self, message: OutboundMessage) -> EmailMessage:
        """The MIME message this adapter sends for ``message``."""
        if message.channel != "email":
            raise ValueError(f"an e-mail adapter cannot send a {message.channel} message")
        mail = EmailMessage(policy=_POLICY)
        mail["From"] = self.sender
        mail["To"] = message.to
        mail["Subject"] = message.subject or ""
        mail["Message-ID"] = self.message_id(message.idempotency_key)
        mail["Date"] = formatdate(usegmt=True)
        for name, value in message.headers.items():
            mail[name] = value
        mail.set_content(message.body)
        if message.html is not None:
            mail.add_alternative(message.html, subtype="html")
        return mail

    async def send(self, message: OutboundMessage) -> Receipt:
        mail = self.build(message)
        try:
            async with asyncio.timeout(self.timeout_s):
                await aiosmtplib.send(
                    mail.as_bytes(policy=_POLICY),  # flattened here: aiosmtplib's own policy folds at 78
                    sender=parseaddr(self.sender)[1],
                    recipients=[message.to],
                    hostname=self.host,
                    port=self.port,
                    username=self.username,
                    password=self.password,
                    start_tls=self.starttls,
                    timeout=self.timeout_s,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if all(400 <= c < 500 for c in codes):
                raise self._transient(min(codes), detail) from exc
            raise ChannelRejectedError(self.provider, detail, suppress=any(c in _BAD_ADDRESS for c in codes)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise self._transient(exc.code, f"{exc.code} {exc.message}") from exc
            raise ChannelRejectedError(self.provider, f"{exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ChannelUnavailableError(self.provider, f"{type(exc).__name__}: {exc}") from exc
        return Receipt(self.provider, mail["Message-ID"])

    def _transient(self, code: int, detail: str) -> ChannelUnavailableError | ChannelRateLimitedError:
        if code in (421, 450, 451, 452) and _RATE.search(detail):
            return ChannelRateLimitedError(self.provider, detail, self.rate_limit_retry_seconds)
        return ChannelUnavailableError(self.provider, detail)
