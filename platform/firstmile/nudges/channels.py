"""The channel port: how a rendered nudge leaves Firstmile (e-mail, SMS, in-app, web push).

Every adapter implements :class:`Channel` and passes the contract suite
(``tests/integration/test_nudge_channels.py``). An adapter sends one :class:`OutboundMessage` and
answers with a :class:`Receipt` once the provider has accepted it, or raises one of the three
errors below, which decide what the delivery loop does next:

* :class:`ChannelUnavailableError`: the provider could not be reached, timed out or answered 5xx.
  Transient: the send is retried with backoff, on the backup provider first when one is configured
  (:class:`FailoverChannel`).
* :class:`ChannelRateLimitedError`: the provider refused for rate (HTTP 429, SMTP 421/451 with a
  rate reason). The send is deferred to ``retry_after`` (the design's rule: the next allowed
  window), not counted as a failure.
* :class:`ChannelRejectedError`: the provider refused this message for good (a malformed or
  unknown address, a blocked recipient). Not retried; ``suppress`` says whether the address
  should go on the suppression list.

Every message carries ``idempotency_key``, stable across retries of the same send: adapters pass
it to the provider where the provider deduplicates (a header, a custom argument) and, for
e-mail, derive the ``Message-ID`` from it, so that a receiver can deduplicate the one duplicate the
delivery loop cannot rule out (a crash between the provider's acceptance and our record of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered nudge for one address on one channel."""

    channel: str
    to: str
    """The address: an e-mail address, an E.164 phone number, a push subscription (JSON), a user id (in-app)."""
    body: str
    """Plain text (e-mail's text part, the SMS, the push or in-app text)."""
    idempotency_key: str
    """Stable for every attempt of this send (the send's id)."""
    subject: str | None = None
    html: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra e-mail headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``)."""
    tenant: str | None = None
    """The tenant's id, for providers that tag messages (custom arguments, status callbacks)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """The provider accepted the message."""

    provider: str
    provider_message_id: str | None


class ChannelError(Exception):
    """A send did not go through; the subclass says what to do next."""

    def __init__(self, provider: str, detail: str) -> None:
        super().__init__(f"{provider}: {detail}")
        self.provider = provider
        self.detail = detail


class ChannelUnavailableError(ChannelError):
    """Unreachable, timed out or a server error: retry later, or on the backup provider."""


class ChannelRateLimitedError(ChannelError):
    """Refused for rate: try again at ``retry_after`` seconds from now (the next allowed window)."""

    def __init__(self, provider: str, detail: str, retry_after: float) -> None:
        super().__init__(provider, detail)
        self.retry_after = max(0.0, retry_after)


class ChannelRejectedError(ChannelError):
    """Refused for good; ``suppress`` when the address itself is bad (it goes on the suppression list)."""

    def __init__(self, provider: str, detail: str, *, suppress: bool = False) -> None:
        super().__init__(provider, detail)
        self.suppress = suppress


@runtime_checkable
class Channel(Protocol):
    """One way out for nudges (an adapter for one provider of one channel)."""

    @property
    def channel(self) -> str:
        """Which channel it serves: ``email``, ``sms``, ``in_app`` or ``push``."""
        ...

    @property
    def provider(self) -> str:
        """The provider's name, as receipts and metrics show it (``smtp``, ``sendgrid``, ``twilio`` …)."""
        ...

    async def send(self, message: OutboundMessage) -> Receipt:
        """Hand ``message`` to the provider; a :class:`Receipt` once accepted, else a :class:`ChannelError`."""
        ...


class FailoverChannel:
    """A primary provider and a backup for the same channel: an unavailable primary fails over.

    Only :class:`ChannelUnavailableError` fails over (the design's "switch to backup provider"); a
    rate limit or a rejection is the primary's answer about this message and is raised as it is.
    When both are unavailable, the backup's error is raised, naming both.
    """

    def __init__(self, primary: Channel, backup: Channel) -> None:
        if primary.channel != backup.channel:
            raise ValueError(f"a {primary.channel} provider cannot fail over to a {backup.channel} provider")
        self.primary = primary
        self.backup = backup

    @property
    def channel(self) -> str:
        return self.primary.channel

    @property
    def provider(self) -> str:
        return f"{self.primary.provider}+{self.backup.provider}"

    async def send(self, message: OutboundMessage) -> Receipt:
        try:
            return await self.primary.send(message)
        except ChannelUnavailableError as first:
            try:
                return await self.backup.send(message)
            except ChannelUnavailableError as second:
                raise ChannelUnavailableError(
                    self.provider, f"primary {first.detail}; backup {second.detail}"
                ) from second
