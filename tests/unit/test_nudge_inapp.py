"""The in-app channel's pure pieces: the notification format, the hub's fan-out, subscriptions, the adapter,
and which settings turn the channel on. The database and the live stream: tests/integration/test_nudge_inapp.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from firstmile.kit.scope import OperatorContext
from firstmile.nudges import repository as repo
from firstmile.nudges.channels import ChannelRejectedError, OutboundMessage, Receipt
from firstmile.nudges.inapp import InAppChannel, InAppHub, Notice, Wake, parse_notice
from firstmile.settings import Settings
from firstmile.wiring.adapters import nudge_channels

TENANT = uuid.UUID("6f1c1a8e-2b7d-4c1e-9a53-0c6f0f7d9a11")
SEND = uuid.UUID("0b8f5b4e-6a61-4c3e-8f0e-3d2c1b0a9f88")


def _payload(tenant: object = TENANT, user: object = "u-1", send: object = SEND) -> str:
    return json.dumps({"tenant": str(tenant), "user": user, "send": str(send)})


def test_a_notice_is_read_back_and_anything_else_is_ignored() -> None:
    assert parse_notice(_payload()) == Notice(TENANT, "u-1", SEND)
    for bad in ("", "not json", "[]", "{}", _payload(tenant="nope"), _payload(send="nope"), _payload(user=""),
                _payload(user=7), json.dumps({"tenant": str(TENANT), "send": str(SEND)})):  # fmt: skip
        assert parse_notice(bad) is None, bad


class _RecordingTx:
    """What ``notify_in_app`` sends, without a database."""

    def __init__(self) -> None:
        self.tenant = OperatorContext("worker:test").tenant(TENANT)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def execute(self, statement: Any, parameters: dict[str, Any]) -> None:
        self.sent.append((str(statement), parameters))


async def test_what_the_worker_notifies_is_what_the_hub_reads() -> None:
    tx = _RecordingTx()
    await repo.notify_in_app(tx, "user@tenant", SEND)  # type: ignore[arg-type]
    [(sql, params)] = tx.sent
    assert "pg_notify" in sql and params["channel"] == repo.IN_APP_NOTIFY_CHANNEL == "firstmile_inapp"
    assert parse_notice(params["payload"]) == Notice(TENANT, "user@tenant", SEND)
    assert set(json.loads(params["payload"])) == {"tenant", "user", "send"}  # ids only


async def test_the_hub_wakes_only_the_subscriptions_of_that_tenant_and_user() -> None:
    hub = InAppHub("postgresql://unused@127.0.0.1:1/unused")
    other_tenant = uuid.uuid4()
    with hub.subscribe(TENANT, "u-1") as a, hub.subscribe(TENANT, "u-1") as b, hub.subscribe(TENANT, "u-2") as c:
        d = hub.subscribe(other_tenant, "u-1")
        assert hub.subscriptions == 4
        assert hub.deliver(_payload()) == 2
        assert hub.deliver("garbage") == 0
        assert await a.next(0) == await b.next(0) == Wake((SEND,))
        assert await c.next(0) is None and await d.next(0) is None  # nothing for them: a timeout
        assert await a.next(0) is None  # taken
        hub.unsubscribe(d)
    assert hub.subscriptions == 0 and hub.deliver(_payload()) == 0


async def test_a_subscription_that_falls_behind_resyncs_and_a_closed_one_says_so() -> None:
    hub = InAppHub("postgresql://unused@127.0.0.1:1/unused", pending_limit=3)
    with hub.subscribe(TENANT, "u-1") as sub:
        sends = [uuid.uuid4() for _ in range(3)]
        for send in sends:
            sub.push(send)
        assert await sub.next(0) == Wake(tuple(sends))
        for _ in range(4):  # one more than it keeps: the ids are dropped, the stream reads the database instead
            sub.push(uuid.uuid4())
        assert await sub.next(0) == Wake((), resync=True)
        hub.resync_all()
        assert await sub.next(0) == Wake((), resync=True)
        sub.close()
        assert (await sub.next(0) or Wake()).closed


async def test_the_adapter_accepts_a_message_for_a_user_and_refuses_anything_else() -> None:
    channel = InAppChannel()
    assert (channel.channel, channel.provider) == ("in_app", "in_app")
    message = OutboundMessage("in_app", "u-1", "Pick up where you left off.", SEND.hex, subject="Next")
    assert await channel.send(message) == Receipt("in_app", None)
    for wrong in (OutboundMessage("email", "u-1", "x", "k"), OutboundMessage("in_app", "", "x", "k")):
        with pytest.raises(ChannelRejectedError):
            await channel.send(wrong)


@pytest.mark.parametrize(
    ("in_app", "smtp", "expected"),
    [
        ("auto", False, []),
        ("auto", True, ["email", "in_app"]),
        ("on", False, ["in_app"]),
        ("on", True, ["email", "in_app"]),
        ("off", True, ["email"]),
        ("off", False, []),
    ],
)
def test_in_app_is_on_with_the_nudges_unless_the_settings_say_otherwise(
    in_app: str, smtp: bool, expected: list[str]
) -> None:
    values: dict[str, Any] = {"nudge_in_app": in_app}
    if smtp:
        values["nudge_smtp_url"] = SecretStr("smtp://127.0.0.1:2525")
    assert sorted(nudge_channels(Settings(**values))) == expected


def test_an_unknown_in_app_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="in_app"):
        Settings(nudge_in_app="sometimes")  # type: ignore[call-arg]
