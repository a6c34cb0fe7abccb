"""The audit API: scope, validation, pagination, and proofs that an independent verifier accepts."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.app import create_app
from firstmile.audit.canonical import canonical_entry, leaf_hash, parse_timestamp
from firstmile.audit.service import AuditService, append, create_checkpoint
from firstmile.audit.signing import AuditSigner
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OPERATOR_CLI, TenantId
from tests.conftest import PEPPER, Database, TenantFixture, make_settings, sequenced, unaudited_tenant
from tests.unit.analytics_support import FlakyStore
from tests.unit.test_audit_rfc9162 import rfc_verify_consistency, rfc_verify_inclusion

Client = AsyncTestClient[Litestar]
PROBLEM = "https://firstmile.dev/problems/"


@pytest.fixture(scope="module")
async def client(database: Database, analytics_store: Any) -> AsyncIterator[Client]:
    """An app of its own (the audit controller and its service are wired by ``create_app``)."""
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=FlakyStore(analytics_store))
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        yield c


def _signer(client: Client) -> AuditSigner:
    service: AuditService = client.app.state.container.audit
    return service.signer


async def _tenant(admin_engine: AsyncEngine) -> TenantFixture:
    return await unaudited_tenant(admin_engine, scopes=("audit:read",))


async def _append(
    app_engine: AsyncEngine, tenant: TenantFixture, count: int, start: int = 0, *, sequence: bool = True
) -> list[uuid.UUID]:
    """Write ``count`` entries; by default also sequence them (as the sequencer does within its merge delay)."""
    ids = []
    async with tenant_transaction(app_engine, OPERATOR_CLI.tenant(tenant.id)) as tx:
        for i in range(start, start + count):
            kind = ("decision", "admin", "auth")[i % 3]
            payload = {"i": i, "model": "planner-v3", "confidence": i / 100, "fallback": None}
            ids.append((await append(tx, kind, f"actor:{i % 2}", f"user:{i % 4}", payload)).entry_id)
    if sequence:
        await sequenced(app_engine, tenant.id)
    return ids


async def _checkpoint(client: Client, app_engine: AsyncEngine, tenant: TenantFixture) -> int:
    tid: TenantId = OPERATOR_CLI.tenant(tenant.id)
    async with tenant_transaction(app_engine, tid) as tx:
        cp = await create_checkpoint(tx, _signer(client))
    assert cp is not None
    return cp.tree_size


async def _get(client: Client, tenant: TenantFixture, path: str, **params: Any) -> Any:
    query = {("from" if k == "from_" else k): str(v) for k, v in params.items()}
    return await client.get(f"/v1/audit{path}", params=query, headers=tenant.headers)


def _leaf_of(tenant: TenantFixture, entry: dict[str, Any]) -> bytes:
    """The leaf hash an independent verifier computes from the entry as served (docs/audit.md)."""
    canonical = canonical_entry(
        tenant.id,
        entry.get("seq") or 0,
        entry["kind"],
        entry["actor"],
        entry["subject"],
        entry["payload"],
        parse_timestamp(entry["created_at"]),
        None if entry["id"] is None else uuid.UUID(entry["id"]),
    )
    return leaf_hash(canonical)


def _public_key(body: dict[str, Any]) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(body["public_key"]))


async def test_scope_is_required(client: Client, admin_engine: AsyncEngine) -> None:
    tenant = await unaudited_tenant(admin_engine, scopes=("onboarding:write",))
    for path in ("/entries", "/entries/0/proof", "/checkpoints", "/consistency?first=1&second=1", "/public-key"):
        response = await client.get(f"/v1/audit{path}", headers=tenant.headers)
        assert response.status_code == 403, path
        assert response.json()["required_scope"] == "audit:read"
    assert (await client.get("/v1/audit/entries")).status_code == 401


async def test_entries_filters_and_cursor_pagination(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    other = await _tenant(admin_engine)
    await _append(app_engine, tenant, 25)
    await _append(app_engine, other, 3)
    seen: list[int] = []
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 10}
        if after is not None:
            params["after_seq"] = after
        body = (await _get(client, tenant, "/entries", **params)).json()
        seen.extend(e["seq"] for e in body["entries"])
        after = body["next_after_seq"]
        if after is None:
            break
    assert seen == list(range(25))
    first = (await _get(client, tenant, "/entries", limit=1)).json()["entries"][0]
    assert first["prev_hash"] == "00" * 32
    assert bytes.fromhex(first["leaf_hash"]) == _leaf_of(tenant, first)
    kinds = (await _get(client, tenant, "/entries", kind="admin")).json()["entries"]
    assert [e["seq"] for e in kinds] == [i for i in range(25) if i % 3 == 1]
    subject = (await _get(client, tenant, "/entries", subject="user:2", actor="actor:0")).json()["entries"]
    assert [e["seq"] for e in subject] == [i for i in range(25) if i % 4 == 2]
    moment = first["created_at"]
    assert len((await _get(client, tenant, "/entries", from_=moment, limit=1000)).json()["entries"]) == 25
    assert (await _get(client, tenant, "/entries", to=moment)).json()["entries"] == []
    theirs = (await _get(client, other, "/entries")).json()["entries"]
    assert [e["seq"] for e in theirs] == [0, 1, 2]


@pytest.mark.parametrize(
    ("path", "params", "key"),
    [
        ("/entries", {"limit": 0}, "limit"),
        ("/entries", {"limit": 1001}, "limit"),
        ("/entries", {"after_seq": -1}, "after_seq"),
        ("/entries", {"after_seq": "x"}, "after_seq"),
        ("/entries", {"from_": "yesterday"}, "from"),
        ("/entries", {"kind": "Not A Kind"}, "kind"),
        ("/entries/abc/proof", {}, "ref"),
        ("/entries/1e3/proof", {}, "ref"),
        ("/entries/00000000-0000-0000-0000-00000000000g/proof", {}, "ref"),
        ("/entries/0/proof", {"tree_size": 0}, "tree_size"),
        ("/consistency", {"second": 3}, "first"),
        ("/consistency", {"first": 5, "second": 3}, "first"),
        ("/checkpoints", {"limit": 5000}, "limit"),
        # what the OpenAPI document refuses (schemathesis: it admitted tree_size=0 and limit=0, refused here)
        ("/checkpoints", {"after_size": "5\n"}, "after_size"),
        ("/entries", {"after_seq": "1" * 19}, "after_seq"),
    ],
)
async def test_bad_input_is_a_validation_problem(
    client: Client, admin_engine: AsyncEngine, path: str, params: dict[str, Any], key: str
) -> None:
    tenant = await _tenant(admin_engine)
    response = await _get(client, tenant, path, **params)
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == PROBLEM + "validation-error"
    assert key in [e["key"] for e in body["errors"]]


async def test_unknown_entries_and_checkpoints_are_404_uncovered_entries_409(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    assert (await _get(client, tenant, "/entries/0/proof")).status_code == 404
    await _append(app_engine, tenant, 3)
    response = await _get(client, tenant, "/entries/1/proof")
    assert response.status_code == 409
    assert response.json()["type"] == PROBLEM + "not-checkpointed"
    size = await _checkpoint(client, app_engine, tenant)
    await _append(app_engine, tenant, 2, start=3)
    assert (await _get(client, tenant, "/entries/4/proof")).status_code == 409
    assert (await _get(client, tenant, "/entries/99/proof")).status_code == 404
    assert (await _get(client, tenant, "/entries/0/proof", tree_size=size + 1)).status_code == 404
    assert (await _get(client, tenant, "/consistency", first=1, second=size)).status_code == 404
    other = await _tenant(admin_engine)  # another tenant's seqs are not there for this key
    assert (await _get(client, other, "/entries/0/proof")).status_code == 404


async def test_checkpoints_and_proofs_verify_independently(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    await _append(app_engine, tenant, 7)
    small = await _checkpoint(client, app_engine, tenant)
    await _append(app_engine, tenant, 18, start=7)
    large = await _checkpoint(client, app_engine, tenant)
    assert (small, large) == (7, 25)

    key_doc = (await _get(client, tenant, "/public-key")).json()
    key = _public_key(key_doc)
    assert key_doc["algorithm"] == "Ed25519" and key_doc["key_id"] == _signer(client).key_id
    listing = (await _get(client, tenant, "/checkpoints")).json()
    assert listing["public_key"] == key_doc["public_key"]
    by_size = {c["tree_size"]: c for c in listing["checkpoints"]}
    assert {small, large} <= set(by_size)
    for cp in by_size.values():
        key.verify(bytes.fromhex(cp["signature"]), cp["body"].encode())  # raises if wrong
        origin, size, root, stamp = cp["body"].splitlines()
        assert origin == f"firstmile.dev/audit/{tenant.id}"
        assert int(size) == cp["tree_size"]
        assert base64.b64decode(root).hex() == cp["root_hash"]
        assert stamp == cp["signed_at"]
    paged = (await _get(client, tenant, "/checkpoints", limit=1)).json()
    assert len(paged["checkpoints"]) == 1 and paged["next_after_size"] == paged["checkpoints"][0]["tree_size"]

    latest = max(by_size)
    for seq in range(latest):
        proof = (await _get(client, tenant, f"/entries/{seq}/proof")).json()
        assert proof["tree_size"] == latest and proof["root_hash"] == by_size[latest]["root_hash"]
        leaf = _leaf_of(tenant, proof["entry"])
        assert leaf.hex() == proof["leaf_hash"]
        path = [bytes.fromhex(p) for p in proof["audit_path"]]
        assert rfc_verify_inclusion(seq, latest, leaf, path, bytes.fromhex(proof["root_hash"]))
        assert not rfc_verify_inclusion(seq, latest, leaf_hash(b"forged"), path, bytes.fromhex(proof["root_hash"]))
    for seq in range(small):
        proof = (await _get(client, tenant, f"/entries/{seq}/proof", tree_size=small)).json()
        path = [bytes.fromhex(p) for p in proof["audit_path"]]
        assert rfc_verify_inclusion(
            seq, small, _leaf_of(tenant, proof["entry"]), path, bytes.fromhex(proof["root_hash"])
        )

    consistency = (await _get(client, tenant, "/consistency", first=small, second=large)).json()
    assert rfc_verify_consistency(
        small,
        large,
        bytes.fromhex(by_size[small]["root_hash"]),
        bytes.fromhex(by_size[large]["root_hash"]),
        [bytes.fromhex(p) for p in consistency["proof"]],
    )
    assert consistency["first_checkpoint"] == by_size[small]
    same = (await _get(client, tenant, "/consistency", first=large, second=large)).json()
    assert same["proof"] == []


async def test_a_queued_entry_answers_pending_with_its_leaf_hash_until_it_is_sequenced(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    await _append(app_engine, tenant, 2)
    (queued,) = await _append(app_engine, tenant, 1, start=2, sequence=False)
    response = await _get(client, tenant, f"/entries/{queued}/proof")
    assert response.status_code == 202, response.text
    pending = response.json()
    assert pending["status"] == "pending" and pending["id"] == str(queued)
    assert bytes.fromhex(pending["leaf_hash"]) == _leaf_of(tenant, pending)  # the leaf it will be, already
    assert [e["seq"] for e in (await _get(client, tenant, "/entries")).json()["entries"]] == [0, 1]
    other = await _tenant(admin_engine)  # another tenant's queued entry is not there for this key
    assert (await _get(client, other, f"/entries/{queued}/proof")).status_code == 404
    assert (await _get(client, tenant, f"/entries/{uuid.uuid4()}/proof")).status_code == 404

    await sequenced(app_engine, tenant.id)
    response = await _get(client, tenant, f"/entries/{queued}/proof")
    assert response.status_code == 409 and response.json()["type"] == PROBLEM + "not-checkpointed"
    size = await _checkpoint(client, app_engine, tenant)
    proof = (await _get(client, tenant, f"/entries/{queued}/proof")).json()
    assert (proof["leaf_index"], proof["tree_size"], proof["leaf_hash"]) == (2, size, pending["leaf_hash"])
    assert proof["entry"]["id"] == str(queued) and proof["entry"]["sequenced_at"] >= proof["entry"]["created_at"]
    path = [bytes.fromhex(p) for p in proof["audit_path"]]
    assert rfc_verify_inclusion(2, size, _leaf_of(tenant, proof["entry"]), path, bytes.fromhex(proof["root_hash"]))
    assert (await _get(client, tenant, "/entries/2/proof")).json() == proof  # by seq: the same proof
