"""The channel port's contract, run against every adapter (``firstmile.nudges.channels``).

Each adapter comes with a receiver: the real one where this machine runs it (Mailpit for SMTP),
else a local stand-in of the provider's documented API. The contract:

- an accepted send returns a :class:`Receipt` naming the provider, and the receiver has exactly that message;
- every attempt of one send (same idempotency key) carries the same provider-visible id;
- a receiver that cannot be reached is :class:`ChannelUnavailableError` (retry, fail over);
- an address the receiver refuses for good is :class:`ChannelRejectedError`;
- a :class:`FailoverChannel` sends through the backup when the primary is unavailable, and only then.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from firstmile.nudges.channels import (
    Channel,
    ChannelRejectedError,
    ChannelUnavailableError,
    FailoverChannel,
    OutboundMessage,
    Receipt,
)
from firstmile.nudges.email_smtp import SmtpChannel
from tests.conftest import Mailpit

pytestmark = pytest.mark.xdist_group("mailpit")

SENDER = "nudges@firstmile.test"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiver:
    """An adapter and what its receiver saw."""

    channel: Channel
    down: Channel
    """The same adapter pointed at a receiver that is not there."""
    address: Callable[[], str]
    """A fresh address of this receiver's kind."""
    bad_address: str
    received: Callable[[str], Awaitable[list[dict[str, Any]]]]
    """What the receiver holds for an address: dicts with ``id`` (provider-visible id) and ``body``."""
    refuse_next: Callable[[], Awaitable[None]]
    """Make the receiver refuse the next recipient for good."""
    reset: Callable[[], Awaitable[None]]


async def _mailpit_received(mailpit: Mailpit, address: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        found = (await http.get("/api/v1/search", params={"query": f"to:{address}"})).raise_for_status().json()
        out = []
        for summary in found["messages"]:
            full = (await http.get(f"/api/v1/message/{summary['ID']}")).raise_for_status().json()
            out.append({"id": f"<{full['MessageID']}>", "body": full["Text"], "subject": full["Subject"]})
        return out


async def _mailpit_chaos(mailpit: Mailpit, **triggers: dict[str, int]) -> None:
    async with httpx.AsyncClient(base_url=mailpit.api, timeout=10) as http:
        (await http.put("/api/v1/chaos", json=triggers)).raise_for_status()


@pytest.fixture(params=["smtp"])
async def receiver(request: pytest.FixtureRequest, mailpit: Mailpit) -> AsyncIterator[Receiver]:
    if request.param == "smtp":

        async def refuse_next() -> None:
            await _mailpit_chaos(mailpit, Recipient={"ErrorCode": 550, "Probability": 100})

        async def reset() -> None:
            await _mailpit_chaos(
                mailpit,
                Sender={"ErrorCode": 451, "Probability": 0},
                Recipient={"ErrorCode": 451, "Probability": 0},
            )

        await reset()
        yield Receiver(
            channel=SmtpChannel(mailpit.smtp_host, mailpit.smtp_port, SENDER, timeout_s=5),
            down=SmtpChannel("127.0.0.1", _closed_port(), SENDER, timeout_s=2, name="smtp-down"),
            address=lambda: f"u-{uuid.uuid4().hex[:12]}@example.test",
            bad_address="nobody@example.test",
            received=lambda a: _mailpit_received(mailpit, a),
            refuse_next=refuse_next,
            reset=reset,
        )
        await reset()


def _message(receiver: Receiver, to: str, key: str | None = None, body: str = "Finish setting up") -> OutboundMessage:
    channel = receiver.channel.channel
    return OutboundMessage(channel, to, body, key or uuid.uuid4().hex, subject="Your next step")


async def test_an_accepted_send_is_received_once_with_its_receipt(receiver: Receiver) -> None:
    to = receiver.address()
    receipt = await receiver.channel.send(_message(receiver, to, body="Create an API key: 2 minutes"))
    assert isinstance(receipt, Receipt) and receipt.provider == receiver.channel.provider
    got = await receiver.received(to)
    assert len(got) == 1 and "Create an API key: 2 minutes" in got[0]["body"]
    assert got[0]["id"] == receipt.provider_message_id


async def test_every_attempt_of_one_send_carries_the_same_id(receiver: Receiver) -> None:
    to, key = receiver.address(), uuid.uuid4().hex
    first = await receiver.channel.send(_message(receiver, to, key))
    second = await receiver.channel.send(_message(receiver, to, key))  # a retry after a crash
    other = await receiver.channel.send(_message(receiver, to))
    assert first.provider_message_id == second.provider_message_id != other.provider_message_id
    ids = sorted(m["id"] for m in await receiver.received(to))
    assert ids.count(first.provider_message_id) == 2  # the receiver can tell the duplicate by its id


async def test_an_unreachable_receiver_is_unavailable(receiver: Receiver) -> None:
    with pytest.raises(ChannelUnavailableError):
        await receiver.down.send(_message(receiver, receiver.address()))


async def test_a_refused_address_is_rejected_and_marked_for_suppression(receiver: Receiver) -> None:
    await receiver.refuse_next()
    try:
        with pytest.raises(ChannelRejectedError) as refused:
            await receiver.channel.send(_message(receiver, receiver.bad_address))
    finally:
        await receiver.reset()
    assert refused.value.suppress
    assert await receiver.received(receiver.bad_address) == []


async def test_failover_uses_the_backup_only_when_the_primary_is_unavailable(receiver: Receiver) -> None:
    to = receiver.address()
    receipt = await FailoverChannel(receiver.down, receiver.channel).send(_message(receiver, to))
    assert receipt.provider == receiver.channel.provider and len(await receiver.received(to)) == 1
    await receiver.refuse_next()  # a rejection is the primary's answer: no failover
    try:
        with pytest.raises(ChannelRejectedError):
            await FailoverChannel(receiver.channel, receiver.down).send(_message(receiver, receiver.bad_address))
    finally:
        await receiver.reset()
    with pytest.raises(ChannelUnavailableError, match=r"primary .* backup"):
        await FailoverChannel(receiver.down, receiver.down).send(_message(receiver, receiver.address()))
