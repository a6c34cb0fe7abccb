"""docs/audit.md's "What is recorded" table says what the platform writes: real flows, every entry checked.

The flows run against the real PostgreSQL through the app and the operator helpers: a manifest
applied and a key created as ``firstmile tenants apply`` and ``firstmile keys create`` do, a user
started and a step completed through the API, an admin signing in with a bootstrap link, editing a
path, refused by CSRF and by a role, signing out, an export through the API and the admin API, an
erasure, a key rotation and a revocation. Every audit entry of the tenant must match a row of the
table: the kind, the actor and the subject as the doc writes them (``<placeholder>`` is any
non-empty text), and the ``"action"`` or ``"decision"`` the payload column names.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.service import AdminAuth
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.security.cli import rotate_tenant_keys
from firstmile.settings import Settings
from firstmile.tenancy.cli import create_key, list_keys, revoke_key
from firstmile.wiring.adapters import key_config
from tests.conftest import PEPPER, REGION, Database, make_settings, sequenced
from tests.factories import ROOT, demo_document, manifest_for

Client = AsyncTestClient[Litestar]
BASE = "http://testserver.local"
DOC = ROOT / "docs" / "audit.md"
SCOPES = ["onboarding:write", "users:admin", "audit:read"]


@dataclass(frozen=True)
class Row:
    """One row of the documented table."""

    kind: str
    actors: tuple[re.Pattern[str], ...]
    subjects: tuple[re.Pattern[str], ...]
    payload: dict[str, str]  # "action"/"decision" values the payload column names
    text: str

    def matches(self, kind: str, actor: str, subject: str, payload: Any) -> bool:
        return (
            kind == self.kind
            and any(p.fullmatch(actor) for p in self.actors)
            and any(p.fullmatch(subject) for p in self.subjects)
            and all(isinstance(payload, dict) and payload.get(k) == v for k, v in self.payload.items())
        )


def _pattern(written: str) -> re.Pattern[str]:
    """A documented actor or subject: literal text, where each ``<placeholder>`` is any non-empty text."""
    parts = re.split(r"<[^>]+>", written)
    return re.compile(".+".join(re.escape(part) for part in parts), re.DOTALL)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented_rows(doc: str) -> list[Row]:
    """The rows of the table under ``## What is recorded`` (columns: kind, when, actor, subject, payload)."""
    start = doc.index("## What is recorded")
    end = doc.index("\n## ", start + 1)
    lines = [line for line in doc[start:end].splitlines() if line.startswith("|")]
    header = [c.lower() for c in _cells(lines[0])]
    kind_at, actor_at, subject_at, payload_at = (
        next(i for i, h in enumerate(header) if h.startswith(name)) for name in ("kind", "actor", "subject", "payload")
    )
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        spans = [re.findall(r"`([^`]+)`", cell) for cell in cells]
        payload = dict(re.findall(r'`"(action|decision)": "([^"]+)"`', cells[payload_at]))
        rows.append(
            Row(
                kind=spans[kind_at][0],
                actors=tuple(_pattern(s) for s in spans[actor_at]),
                subjects=tuple(_pattern(s) for s in spans[subject_at]),
                payload=payload,
                text=line,
            )
        )
    return rows


def undocumented(rows: list[Row], entries: list[tuple[str, str, str, Any]]) -> list[tuple[str, str, str, Any]]:
    """The entries no row of the table describes."""
    return [e for e in entries if not any(row.matches(*e) for row in rows)]


def test_the_table_is_read_as_written() -> None:
    """The parser sees every kind the platform writes, and a placeholder is not a wildcard for the prefix."""
    rows = documented_rows(DOC.read_text(encoding="utf-8"))
    kinds = {row.kind for row in rows}
    assert {"decision", "admin", "erasure", "key", "path.edit", "admin.login", "sso.login_failed"} <= kinds
    old = Row("decision", (_pattern("agent:<name>"),), (_pattern("user:<user_id>"),), {}, "the table before")
    assert undocumented([old], [("decision", "path_planner", "ada", {})]) != []
    assert undocumented([old], [("decision", "agent:planner", "user:ada", {})]) == []
    action = next(r for r in rows if r.payload.get("action") == "keys.revoke")
    assert not action.matches("admin", "operator:cli", "api_key:1", {"action": "keys.create"})


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # its own data folder: the local key-encryption key the app makes is the one the rotation uses
    data_dir: Path = tmp_path_factory.mktemp("audit-doc")
    return make_settings(data_dir=data_dir, public_url=BASE, admin_cookie_secure=False)


@pytest.fixture(scope="module")
async def api(database: Database, analytics_store: ChdbStore, settings: Settings) -> AsyncIterator[Client]:
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as client:
        yield client


async def _sign_in(api: Client, slug: str, role: str) -> str:
    """A bootstrap-link session of ``role``; its CSRF token."""
    api.cookies.clear()
    auth: AdminAuth = api.app.state.container.admin_auth
    token = auth.bootstrap_token(slug, role)
    redeemed = await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert redeemed.status_code == 303, redeemed.text
    replayed = await api.post("/admin/bootstrap/redeem", data={"token": token}, follow_redirects=False)
    assert replayed.status_code == 400  # admin.login_failed
    me = await api.get("/admin/api/me")
    assert me.status_code == 200, me.text
    csrf: str = me.json()["csrf_token"]
    return csrf


async def test_every_entry_of_real_flows_is_a_documented_row(
    api: Client, admin_engine: AsyncEngine, database: Database, settings: Settings
) -> None:
    slug = f"ad-{secrets.token_hex(4)}"
    applied = await apply_manifest(admin_engine, manifest_for(slug, REGION, demo_document()))  # tenants.apply
    key = (await create_key(admin_engine, PEPPER, slug, SCOPES, "doc")).key  # keys.create
    headers = {"Authorization": f"Bearer {key}"}

    # the tenant app: a start (the planner's decision), a step completed through the API (no entry)
    body = {"user_id": "ada", "traits": {"persona": "developer", "email": "ada@example.com"}}
    started = await api.post("/v1/onboarding/start", json=body, headers=headers)
    assert started.status_code == 201, started.text
    done = await api.post("/v1/onboarding/ada/steps/create-api-key/complete", headers=headers)
    assert done.status_code == 200, done.text
    assert (await api.post("/v1/onboarding/start", json=body | {"user_id": "bob"}, headers=headers)).status_code == 201

    # an admin: signs in, edits a path, is refused by CSRF, exports a user, signs out; a viewer is refused
    csrf = await _sign_in(api, slug, "owner")
    path = "developer-quickstart"
    edited = await api.patch(f"/admin/api/paths/{path}", json={"name": "Quickstart"}, headers={"X-CSRF-Token": csrf})
    assert edited.status_code == 200, edited.text
    refused = await api.patch(f"/admin/api/paths/{path}", json={"name": "No"}, headers={"X-CSRF-Token": "guess"})
    assert refused.status_code == 403, refused.text
    assert (await api.get("/admin/api/users/bob/export")).status_code == 200
    assert (await api.post("/admin/logout", data={"csrf_token": csrf}, follow_redirects=False)).status_code == 303
    await _sign_in(api, slug, "viewer")
    assert (await api.patch(f"/admin/api/paths/{path}", json={"name": "V"})).status_code == 403  # admin.forbidden
    api.cookies.clear()

    # data-subject requests through the API, then the operator's rotation and revocation
    assert (await api.get("/v1/users/ada/export", headers=headers)).status_code == 200
    assert (await api.delete("/v1/users/ada", headers=headers)).status_code == 202
    await rotate_tenant_keys(database.admin_url, slug, key_config(settings))
    key_id = (await list_keys(admin_engine, slug))[0].id
    assert await revoke_key(admin_engine, slug, key_id)

    await sequenced(admin_engine, applied.tenant_id)
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind, actor, subject, payload FROM audit_entries WHERE tenant_id = :t ORDER BY seq"),
            {"t": applied.tenant_id},
        )
        entries = [(r[0], r[1], r[2], r[3]) for r in rows]
    written = {(kind, p.get("action") or p.get("decision")) for kind, _, _, p in entries}
    assert written >= {  # the flows above did what they meant to: each kind below was written
        ("admin", "tenants.apply"),
        ("admin", "keys.create"),
        ("admin", "keys.revoke"),
        ("admin", "users.export"),
        ("decision", "path_selection"),
        ("erasure", None),
        ("key", "keys.rotate"),
        ("path.edit", None),
        ("admin.login", None),
        ("admin.login_failed", None),
        ("admin.csrf_refused", None),
        ("admin.forbidden", None),
        ("admin.logout", None),
    }, written
    assert undocumented(documented_rows(DOC.read_text(encoding="utf-8")), entries) == []
