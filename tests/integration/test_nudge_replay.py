"""The webhook replay guard shared by API replicas through Redis (the real one the suite starts).

Two ``NudgeWebhooks``, each with its own Redis client, stand for two API replicas behind one load
balancer: a signed SendGrid request that one of them applied is refused by the other as a replay.
With Redis unreachable, a replica falls back to its own memory and still acts on the report.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.nudges.replay import RedisReplayGuard
from firstmile.nudges.service import NudgeWebhooks
from firstmile.nudges.webhooks import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, WebhookRefusedError
from tests.support.nudges import sendgrid_headers, verification_key

# events of mail that is not a nudge (no custom arguments of ours): verified, guarded, then ignored
BODY = json.dumps([{"email": "ada@example.test", "timestamp": 1_700_000_000, "event": "delivered"}]).encode()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_request_one_replica_applied_is_a_replay_for_the_other(
    app_engine: AsyncEngine, redis_url: str, redis_region: str
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key = verification_key(private)
    first_guard = RedisReplayGuard.from_url(redis_url, redis_region)
    second_guard = RedisReplayGuard.from_url(redis_url, redis_region)
    first = NudgeWebhooks(app_engine, key, first_guard)
    second = NudgeWebhooks(app_engine, key, second_guard)
    headers = sendgrid_headers(private, BODY, int(time.time()))
    signature, timestamp = headers[SENDGRID_SIGNATURE], headers[SENDGRID_TIMESTAMP]
    try:
        assert await first.sendgrid(BODY, signature, timestamp) == 0  # believed; nothing of ours in it
        with pytest.raises(WebhookRefusedError) as replayed:
            await second.sendgrid(BODY, signature, timestamp)
        assert replayed.value.reason == "replayed"
        client = Redis.from_url(redis_url)
        [stored] = [k async for k in client.scan_iter(match=f"fm:{redis_region}:wh:*")]
        assert 590_000 < await client.pttl(stored) <= 600_000  # twice the 5-minute tolerance, then forgotten
        await client.aclose()

        # the same new request at both replicas at once: exactly one of them acts on it
        again = sendgrid_headers(private, BODY, int(time.time()) + 1)
        outcomes = await asyncio.gather(
            first.sendgrid(BODY, again[SENDGRID_SIGNATURE], again[SENDGRID_TIMESTAMP]),
            second.sendgrid(BODY, again[SENDGRID_SIGNATURE], again[SENDGRID_TIMESTAMP]),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["WebhookRefusedError", "int"]
    finally:
        await first_guard.close()
        await second_guard.close()


async def test_without_redis_a_replica_still_acts_and_remembers_in_its_own_memory(
    app_engine: AsyncEngine, redis_region: str
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    guard = RedisReplayGuard.from_url(f"redis://127.0.0.1:{_closed_port()}/0", redis_region, timeout_s=0.2)
    webhooks = NudgeWebhooks(app_engine, verification_key(private), guard)
    headers = sendgrid_headers(private, BODY, int(time.time()))
    try:
        assert await webhooks.sendgrid(BODY, headers[SENDGRID_SIGNATURE], headers[SENDGRID_TIMESTAMP]) == 0
        with pytest.raises(WebhookRefusedError, match="replayed"):
            await webhooks.sendgrid(BODY, headers[SENDGRID_SIGNATURE], headers[SENDGRID_TIMESTAMP])
        assert len(guard.fallback) == 1
    finally:
        await guard.close()
