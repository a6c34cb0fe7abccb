"""Any Segment-style tracking client works unchanged: the official libraries of Segment and RudderStack.

The app is served on a loopback socket and each official library is pointed at it as an application
would point it at Segment or RudderStack: Python's ``segment.analytics`` (segment-analytics-python) and
``rudderstack.analytics`` (rudder-sdk-python) in this process, Node.js's ``@segment/analytics-node`` and
``@rudderstack/rudder-sdk-node`` (``tests/clients``, installed by ``make tracking-clients``) in a ``node``
subprocess (``tests/clients/send.mjs``). Each sends track, identify, page, screen, group and alias,
plain and gzip where the library can; every event must be stored exactly once (the outbox and its
receipts: the served app runs no relay) and the library must report success. Then the limits
(a batch at the limit accepted, one byte more refused; a zip bomb refused), the single-call
endpoints, the traits where each library puts them and the clock-skew correction.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.events.segment import DEFAULT_MAX_BATCH_BYTES, MAX_MESSAGE_BYTES
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, new_tenant
from tests.factories import ROOT, db_snapshot
from tests.support.serving import served

CLIENTS = ROOT / "tests" / "clients"
PROBLEM = "https://firstmile.dev/problems/"
CALLS = ("track", "identify", "page", "screen", "group", "alias")
LIMIT = DEFAULT_MAX_BATCH_BYTES  # FIRSTMILE_INGEST_MAX_BATCH_BYTES: make_settings keeps the default


@pytest.fixture(scope="module")
def base(database: Database, analytics_store: ChdbStore) -> Iterator[str]:
    """The app on a loopback socket, as a tracking library reaches Segment."""
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=analytics_store)
    with served(app) as url:
        yield url


@pytest.fixture
async def tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await new_tenant(admin_engine, scopes=("events:write",))


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


async def stored(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> dict[str, list[dict[str, Any]]]:
    """What ingestion stored for the tenant: each messageId's outbox payloads (one each, when nothing doubled)."""
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_type, payload FROM outbox WHERE tenant_id = :t ORDER BY id"), {"t": tenant_id}
        )
        receipts = (
            await conn.execute(text("SELECT count(*) FROM event_receipts WHERE tenant_id = :t"), {"t": tenant_id})
        ).scalar_one()
    found: dict[str, list[dict[str, Any]]] = {}
    for kind, payload in rows:
        assert payload["type"] == kind
        found.setdefault(payload["messageId"], []).append(payload)
    assert receipts == sum(len(v) for v in found.values())
    return found


def once(found: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    doubled = {m: len(p) for m, p in found.items() if len(p) != 1}
    assert not doubled, f"stored more than once: {doubled}"
    return {m: p[0] for m, p in found.items()}


# ---- the six calls, as each library spells them ----


def script(prefix: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(call, messageId, arguments)`` for the six calls of one user: what every client sends."""
    user = f"{prefix}-user"
    return [
        (
            "identify",
            f"{prefix}-identify",
            {"userId": user, "traits": {"plan": "pro", "persona": "developer"}},
        ),
        ("track", f"{prefix}-track", {"userId": user, "event": "Report Created", "properties": {"kind": "funnel"}}),
        ("page", f"{prefix}-page", {"userId": user, "name": "Pricing", "properties": {"path": "/pricing"}}),
        ("screen", f"{prefix}-screen", {"userId": user, "name": "Home", "properties": {"tab": "feed"}}),
        ("group", f"{prefix}-group", {"userId": user, "groupId": "acme-1", "traits": {"plan": "team"}}),
        ("alias", f"{prefix}-alias", {"userId": user, "previousId": f"{prefix}-anon"}),
    ]


def python_call(client: Any, call: str, message_id: str, a: dict[str, Any]) -> None:
    """One call through a Python library's own methods (segment-analytics-python and rudder-sdk-python share them)."""
    user = a["userId"]
    if call == "identify":
        client.identify(user, a["traits"], message_id=message_id)
    elif call == "track":
        client.track(user, a["event"], a["properties"], message_id=message_id)
    elif call in ("page", "screen"):
        getattr(client, call)(user, name=a["name"], properties=a["properties"], message_id=message_id)
    elif call == "group":
        client.group(user, a["groupId"], a["traits"], message_id=message_id)
    else:
        client.alias(a["previousId"], user, message_id=message_id)


def node(config: dict[str, Any]) -> dict[str, Any]:
    """Run ``tests/clients/send.mjs`` with ``config``: what the Node.js library reported."""
    executable = shutil.which("node")
    assert executable, "node is needed for the Node.js tracking libraries"
    assert (CLIENTS / "node_modules" / "@segment" / "analytics-node").is_dir(), "run `make tracking-clients` first"
    done = subprocess.run(
        [executable, str(CLIENTS / "send.mjs"), json.dumps(config)],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def node_calls(steps: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"method": call, "message": {**a, "messageId": mid}} for call, mid, a in steps]


def python_client(library: str, key: str, host: str, use_gzip: bool, errors: list[Any], **options: Any) -> Any:
    """The library's client as an application makes it, reporting to ``errors`` (no retries unless asked: a
    failure shows at once)."""
    on_error: Callable[[Any, Any], None] = lambda exc, batch: errors.append(exc)  # noqa: E731
    options = {"max_retries": 0} | options
    if library == "segment":
        from segment.analytics import Client as SegmentClient

        return SegmentClient(key, host=host, gzip=use_gzip, on_error=on_error, **options)
    from rudderstack.analytics.client import Client as RudderClient  # type: ignore[import-untyped]

    return RudderClient(key, host=host, gzip=use_gzip, on_error=on_error, **options)


def bomb(size: int) -> bytes:
    """A gzip stream of ``size`` zero bytes, made a MiB at a time (about 1 KB of output per MiB)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1024 * 1024)
    parts = [deflater.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join([*parts, deflater.flush()])


# ---- every client, every call, exactly once ----

CASES = [
    ("python", "segment", False),
    ("python", "segment", True),
    ("python", "rudderstack", False),
    ("python", "rudderstack", True),
    ("node", "segment", False),  # @segment/analytics-node does not compress
    ("node", "rudderstack", False),
    ("node", "rudderstack", True),
]


@pytest.mark.parametrize(
    ("runtime", "library", "use_gzip"), CASES, ids=[f"{r}-{lib}-{'gzip' if z else 'plain'}" for r, lib, z in CASES]
)
async def test_each_official_library_delivers_every_call_once_and_reports_success(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine, runtime: str, library: str, use_gzip: bool
) -> None:
    steps = script(f"{runtime}-{library}-{uuid.uuid4().hex[:6]}")
    if runtime == "python":
        errors: list[Any] = []
        client = python_client(library, tenant.key, base, use_gzip, errors)

        def send() -> None:
            for call, message_id, arguments in steps:
                python_call(client, call, message_id, arguments)
            client.flush()
            client.join()

        await asyncio.to_thread(send)
        assert errors == []  # on_error was never called
    else:
        config = {"library": library, "host": base, "writeKey": tenant.key, "gzip": use_gzip}
        reported = await asyncio.to_thread(node, config | {"calls": node_calls(steps)})
        assert reported == {"callbacks": len(steps), "errors": []}
    events = once(await stored(admin_engine, tenant.id))
    assert {m: p["type"] for m, p in events.items()} == {mid: call for call, mid, _ in steps}
    by_call = {call: events[mid] for call, mid, _ in steps}
    user = steps[0][2]["userId"]
    assert all(p["userId"] == user for p in events.values())
    # identify's traits wherever the library put them (RudderStack's: context.traits), once, in traits
    assert by_call["identify"]["traits"] == {"plan": "pro", "persona": "developer"}
    assert "traits" not in by_call["identify"]["context"]
    assert by_call["track"]["event"] == "Report Created"
    assert by_call["track"]["properties"] == {"kind": "funnel"}
    assert (by_call["page"]["name"], by_call["page"]["properties"]) == ("Pricing", {"path": "/pricing"})
    assert (by_call["screen"]["name"], by_call["screen"]["properties"]) == ("Home", {"tab": "feed"})
    assert (by_call["group"]["groupId"], by_call["group"]["traits"]) == ("acme-1", {"plan": "team"})
    assert by_call["alias"]["previousId"] == steps[5][2]["previousId"]
    library_name = by_call["track"]["context"]["library"]["name"]
    assert library_name in ("analytics-python", "analytics-node", "@segment/analytics-node")
    received = datetime.fromisoformat(by_call["track"]["receivedAt"])
    for payload in events.values():  # the libraries' clocks are this machine's: the skew correction changes little
        assert abs(datetime.fromisoformat(payload["timestamp"]) - received) < timedelta(seconds=30)


# ---- the batch limit: the same number documented, enforced and sent by the libraries ----


def batch_of(size: int, prefix: str) -> bytes:
    """A batch body of exactly ``size`` bytes of messages under 32 KB each."""
    per = 30_000
    count = max(1, size // (per + 200))
    messages: list[dict[str, Any]] = [
        {"type": "track", "messageId": f"{prefix}-{i}", "userId": "big-user", "event": "Big", "properties": {"pad": ""}}
        for i in range(count)
    ]
    empty = len(msgspec.json.encode({"batch": messages}))
    spare = size - empty
    assert spare > 0
    for i, message in enumerate(messages):
        message["properties"]["pad"] = "x" * (spare // count + (1 if i < spare % count else 0))
    body = msgspec.json.encode({"batch": messages})
    assert len(body) == size
    assert all(len(msgspec.json.encode(m)) <= MAX_MESSAGE_BYTES for m in messages)
    return body


async def test_a_batch_at_the_limit_is_accepted_and_one_byte_more_is_refused(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    headers = basic(tenant.key) | {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        at_limit = batch_of(LIMIT, "at")
        accepted = await http.post("/v1/batch", content=at_limit, headers=headers)
        assert accepted.status_code == 200, accepted.text[:500]
        count = len(msgspec.json.decode(at_limit)["batch"])
        assert accepted.json() == {"accepted": count, "duplicates": 0, "rejected": [], "success": True}
        zipped = await http.post(
            "/v1/batch", content=gzip.compress(batch_of(LIMIT, "zip")), headers=headers | {"Content-Encoding": "gzip"}
        )
        assert zipped.status_code == 200, zipped.text[:500]
        before = await db_snapshot(admin_engine, tenant.id)
        for body, encoding in (
            (batch_of(LIMIT + 1, "over"), None),
            (gzip.compress(batch_of(LIMIT + 1, "zover")), "gzip"),
            (bomb(256 * 1024 * 1024), "gzip"),  # a zip bomb: 256 MiB from 250 KB
        ):
            sent = headers | ({"Content-Encoding": encoding} if encoding else {})
            refused = await http.post("/v1/batch", content=body, headers=sent)
            assert refused.status_code == 413, refused.text[:300]
            assert refused.headers["content-type"].startswith("application/problem+json")
            problem = refused.json()
            assert problem["type"] == PROBLEM + "payload-too-large"
            assert problem["limit"] == LIMIT and f"{LIMIT:,} bytes" in problem["detail"]
            assert (problem["code"], problem["message"]) == ("payload-too-large", problem["detail"])
        assert await db_snapshot(admin_engine, tenant.id) == before
    assert len(once(await stored(admin_engine, tenant.id))) == 2 * count


async def test_rudderstacks_largest_default_batch_is_accepted_and_a_refusal_is_not_retried(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    """rudder-sdk-python batches 100 messages or 4 MiB: 100 messages of 31 KB (3.1 MB, gzip, its defaults) are
    one batch, stored whole. A batch over the limit is a 413 with ``code``: the library reports it at once (it
    retried an answer without ``code`` for minutes: max_retries 10, exponential backoff)."""
    errors: list[Any] = []
    client = python_client("rudderstack", tenant.key, base, True, errors, max_retries=10, upload_interval=2.0)
    pad = "y" * 31_000
    ids = [f"rs-big-{i}" for i in range(100)]

    def send_full() -> None:
        for message_id in ids:
            client.track("rs-user", "Big", {"pad": pad}, message_id=message_id)
        client.flush()

    await asyncio.to_thread(send_full)
    assert errors == []
    assert set(once(await stored(admin_engine, tenant.id))) == set(ids)

    def send_over() -> float:
        began = datetime.now(UTC)
        client.track("rs-user", "Huge", {"pad": "z" * (3 * 1024 * 1024)}, message_id="rs-huge-1")
        client.track("rs-user", "Huge", {"pad": "z" * (2 * 1024 * 1024 + 512 * 1024)}, message_id="rs-huge-2")
        client.flush()
        client.join()
        return (datetime.now(UTC) - began).total_seconds()

    took = await asyncio.to_thread(send_over)
    assert len(errors) == 1, errors
    assert (errors[0].status, errors[0].code) == (413, "payload-too-large")
    assert took < 15  # refused once, not retried
    assert set(once(await stored(admin_engine, tenant.id))) == set(ids)


# ---- Segment's single calls ----


@pytest.mark.parametrize("call", CALLS)
async def test_the_single_call_endpoints_take_one_message_of_their_type(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine, call: str
) -> None:
    prefix = f"single-{call}-{uuid.uuid4().hex[:6]}"
    [(_, message_id, arguments)] = [s for s in script(prefix) if s[0] == call]
    message = {**arguments, "messageId": message_id}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        ok = await http.post(f"/v1/{call}", json=message, headers=basic(tenant.key))
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"accepted": 1, "duplicates": 0, "rejected": [], "success": True}
        again = await http.post(f"/v1/{call}", json=message, headers={"Authorization": f"Bearer {tenant.key}"})
        assert again.json() == {"accepted": 0, "duplicates": 1, "rejected": [], "success": True}
        zipped = await http.post(
            f"/v1/{call}",
            content=gzip.compress(msgspec.json.encode({**message, "messageId": message_id + "-gz"})),
            headers=basic(tenant.key) | {"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert zipped.status_code == 200, zipped.text
        before = await db_snapshot(admin_engine, tenant.id)
        other = "track" if call != "track" else "page"
        refusals = [
            (await http.post(f"/v1/{call}", json={**message, "type": other}, headers=basic(tenant.key)), 400),
            (await http.post(f"/v1/{call}", json={**message, "messageId": ""}, headers=basic(tenant.key)), 400),
            (await http.post(f"/v1/{call}", json=[message], headers=basic(tenant.key)), 400),
            (await http.post(f"/v1/{call}", json=message, headers=basic("fm_not-a-key")), 401),
            (
                await http.post(
                    f"/v1/{call}", json={**message, "pad": "p" * MAX_MESSAGE_BYTES}, headers=basic(tenant.key)
                ),
                413,
            ),
        ]
        for refused, status in refusals:
            assert refused.status_code == status, refused.text
            problem = refused.json()
            assert problem["type"].startswith(PROBLEM) and problem["status"] == status
            # what RudderStack's and Segment's libraries read from a refusal
            assert problem["code"] == problem["type"].removeprefix(PROBLEM)
            assert problem["message"] == problem["detail"]
        assert refusals[1][0].json()["code"] == "invalid-events"
        assert await db_snapshot(admin_engine, tenant.id) == before
    events = once(await stored(admin_engine, tenant.id))
    assert {m: p["type"] for m, p in events.items()} == {message_id: call, message_id + "-gz": call}


# ---- traits and clocks ----


async def test_identify_traits_merge_with_the_top_level_winning(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    message = {
        "type": "identify",
        "messageId": "traits-1",
        "userId": "t-user",
        "traits": {"plan": "pro"},
        "context": {"traits": {"plan": "free", "persona": "analyst"}, "locale": "de-DE"},
    }
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        ok = await http.post("/v1/batch", json={"batch": [message]}, headers=basic(tenant.key))
        assert ok.status_code == 200, ok.text
    [payload] = once(await stored(admin_engine, tenant.id)).values()
    assert payload["traits"] == {"plan": "pro", "persona": "analyst"}
    assert payload["context"] == {"locale": "de-DE"}


@pytest.mark.parametrize("library", ["segment", "rudderstack"])
async def test_a_node_library_on_a_wrong_clock_is_corrected_from_sent_at(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine, library: str
) -> None:
    """The library's process runs two hours ahead: its timestamps alone would be refused as in the future."""
    steps = script(f"skew-{library}")[:2]
    config = {"library": library, "host": base, "writeKey": tenant.key, "skewMs": 2 * 3600 * 1000}
    reported = await asyncio.to_thread(node, config | {"calls": node_calls(steps)})
    assert reported == {"callbacks": 2, "errors": []}
    for payload in once(await stored(admin_engine, tenant.id)).values():
        received = datetime.fromisoformat(payload["receivedAt"])
        original = datetime.fromisoformat(payload["originalTimestamp"])
        assert timedelta(hours=1, minutes=59) < original - received < timedelta(hours=2, minutes=1)
        assert abs(datetime.fromisoformat(payload["timestamp"]) - received) < timedelta(seconds=10)


async def test_clock_skew_is_corrected_from_the_batch_or_the_messages_sent_at(
    base: str, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    """A raw batch from a device three hours behind (the Python libraries set the time but not ``sentAt``)."""
    skew = timedelta(hours=-3)
    device_now = datetime.now(UTC) + skew
    happened = device_now - timedelta(minutes=10)  # on the device's clock
    messages = [
        {"type": "track", "messageId": "skew-batch", "userId": "s", "event": "E", "timestamp": happened.isoformat()},
        {  # its own sentAt (RudderStack's libraries) wins over the batch's: here a clock a day ahead
            "type": "track",
            "messageId": "skew-own",
            "userId": "s",
            "event": "E",
            "originalTimestamp": (happened + timedelta(days=1, hours=3)).isoformat(),
            "sentAt": (device_now + timedelta(days=1, hours=3)).isoformat(),
        },
        {"type": "track", "messageId": "skew-none", "userId": "s", "event": "E"},
    ]
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        body = {"batch": messages, "sentAt": device_now.isoformat()}
        ok = await http.post("/v1/batch", json=body, headers=basic(tenant.key))
        assert ok.status_code == 200, ok.text
        assert ok.json()["accepted"] == 3
        no_zone = await http.post(
            "/v1/batch", json={"batch": messages, "sentAt": "2026-01-01T00:00:00"}, headers=basic(tenant.key)
        )
        assert no_zone.status_code == 400 and no_zone.json()["code"] == "validation-error"
    events = once(await stored(admin_engine, tenant.id))
    for message_id in ("skew-batch", "skew-own"):
        payload = events[message_id]
        received = datetime.fromisoformat(payload["receivedAt"])
        corrected = datetime.fromisoformat(payload["timestamp"])
        assert abs(corrected - (received - timedelta(minutes=10))) < timedelta(seconds=10), payload
    assert events["skew-batch"]["originalTimestamp"] == happened.isoformat()
    assert events["skew-none"]["timestamp"] == events["skew-none"]["receivedAt"]
    assert "originalTimestamp" not in events["skew-none"]


def test_the_clients_folder_pins_its_libraries() -> None:
    """The Node.js libraries are pinned in package.json and locked (npm ci installs exactly those)."""
    package = json.loads((CLIENTS / "package.json").read_text())
    lock = json.loads((CLIENTS / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert (CLIENTS / "send.mjs").is_file()
