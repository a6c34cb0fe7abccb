"""The onboarding API against the real PostgreSQL: happy paths and every refusal."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TenantFixture
from tests.factories import db_snapshot

Client = AsyncTestClient[Litestar]
PROBLEM = "https://firstmile.dev/problems/"


async def start(client: Client, tenant: TenantFixture, user_id: str, **traits: Any) -> Any:
    return await client.post(
        "/v1/onboarding/start", json={"user_id": user_id, "traits": traits}, headers=tenant.headers
    )


async def complete(client: Client, tenant: TenantFixture, user_id: str, step: str, **body: Any) -> Any:
    return await client.post(
        f"/v1/onboarding/{user_id}/steps/{step}/complete", json=body or None, headers=tenant.headers
    )


async def outbox(admin_engine: AsyncEngine, tenant: TenantFixture) -> list[tuple[str, dict[str, Any]]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_type, payload FROM outbox WHERE tenant_id = :t ORDER BY id"), {"t": tenant.id}
        )
        return [(r[0], r[1]) for r in rows]


async def test_start_chooses_a_path_by_rules_and_writes_the_event(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    response = await start(client, tenant, "u-1", persona="developer", company_size="11-50", plan="pro")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["path"] == {
        "id": "developer-quickstart",
        "version": 1,
        "name": "Developer quickstart",
        "activation_step": "send-first-event",
    }
    assert body["current_step"] == "create-api-key"
    assert body["decision"]["selected_by"] == "rules"
    assert body["decision"]["rule"] == "developer-quickstart: persona eq 'developer'"
    assert [s["id"] for s in body["steps"]][:2] == ["create-api-key", "install-sdk"]
    assert body["progress"] == {"completed_required": 0, "required": 4, "percent": 0}
    events = await outbox(admin_engine, tenant)
    assert [e[0] for e in events] == ["onboarding.started"]
    assert events[0][1]["path_id"] == "developer-quickstart"
    assert events[0][1]["traits"]["plan"] == "pro"


async def test_start_falls_back_to_the_default_path(client: Client, tenant: TenantFixture) -> None:
    response = await start(client, tenant, "u-2", persona="astronaut")
    assert response.status_code == 201
    body = response.json()
    assert body["path"]["id"] == "generic"
    assert body["decision"]["selected_by"] == "default"
    assert body["decision"]["rule"] is None
    assert body["decision"]["fallback"] == "default_path"


async def test_starting_again_returns_the_existing_state(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    first = await start(client, tenant, "u-3", persona="analyst")
    before = await db_snapshot(admin_engine, tenant.id)
    again = await start(client, tenant, "u-3", persona="developer")
    assert again.status_code == 200
    assert again.json() == first.json()
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_walk_a_path_to_activation_and_completion(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    await start(client, tenant, "walker", persona="developer")
    for step in ("create-api-key", "install-sdk"):
        response = await complete(client, tenant, "walker", step)
        assert response.status_code == 200, response.text
    state = (await complete(client, tenant, "walker", "send-first-event")).json()
    assert state["activated"] is True and state["activated_at"] is not None
    assert state["status"] == "in_progress" and state["current_step"] == "view-live-events"
    done = (await complete(client, tenant, "walker", "view-live-events")).json()
    assert done["status"] == "completed" and done["current_step"] is None and done["completed_at"]
    assert done["progress"]["percent"] == 100
    # optional step can still be completed afterwards
    assert (await complete(client, tenant, "walker", "invite-teammate")).status_code == 200
    fetched = await client.get("/v1/onboarding/walker", headers=tenant.headers)
    assert fetched.status_code == 200
    steps = {s["id"]: s for s in fetched.json()["steps"]}
    assert all(s["completed"] and s["completed_at"] for s in steps.values())
    types = [e[0] for e in await outbox(admin_engine, tenant)]
    assert types == ["onboarding.started"] + ["onboarding.step_completed"] * 3 + [
        "onboarding.activated",
        "onboarding.step_completed",
        "onboarding.completed",
        "onboarding.step_completed",
    ]


async def test_completion_is_idempotent(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine) -> None:
    await start(client, tenant, "idem", persona="developer")
    first = await complete(client, tenant, "idem", "create-api-key")
    before = await db_snapshot(admin_engine, tenant.id)
    second = await complete(client, tenant, "idem", "create-api-key")
    assert second.status_code == 200
    assert second.json() == first.json()
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_completion_records_the_occurrence_time(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    started = (await start(client, tenant, "timed", persona="developer")).json()["started_at"]
    # the step happened when the user started, before the call records it (a time before the start by more than
    # the clock skew contradicts the record and goes to a person's review: tests/integration/test_reviews_api.py)
    response = await complete(client, tenant, "timed", "create-api-key", occurred_at=started)
    assert response.status_code == 200, response.text
    async with admin_engine.connect() as conn:
        occurred = (
            await conn.execute(
                text(
                    "SELECT occurred_at, completed_at FROM step_completions WHERE tenant_id = :t AND user_id = 'timed'"
                ),
                {"t": tenant.id},
            )
        ).one()
    assert occurred[0] == datetime.fromisoformat(started)
    assert occurred[1] > occurred[0]


# ---- refusals: each is a precise problem+json and leaves the database unchanged ----


def _assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM + slug
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body


BAD_STARTS: list[tuple[str, bytes, str, str]] = [
    ("malformed json", b'{"user_id": ', "malformed-json", "not valid JSON"),
    ("not an object", b"[1, 2]", "validation-error", "Expected `object`"),
    ("wrong type", b'{"user_id": 5}', "validation-error", "Expected `str`, got `int`"),
    ("missing user", b'{"traits": {}}', "validation-error", "missing required field `user_id`"),
    ("unknown field", b'{"user_id": "a", "admin": true}', "validation-error", "unknown field `admin`"),
    ("bad user id", b'{"user_id": "a b"}', "validation-error", "user_id"),
    ("empty user id", b'{"user_id": ""}', "validation-error", "user_id"),
    # Python's $ matched before a final line break: "u-1\n" was stored as a user id
    ("user id ending in a line break", b'{"user_id": "u-1\\n"}', "validation-error", "user_id"),
    ("known trait type", b'{"user_id": "a", "traits": {"persona": 3}}', "validation-error", "traits.persona"),
    (
        "company size",
        b'{"user_id": "a", "traits": {"company_size": "huge"}}',
        "validation-error",
        "traits.company_size",
    ),
    ("nested trait", b'{"user_id": "a", "traits": {"x": {"y": 1}}}', "validation-error", "traits"),
    ("bad trait key", b'{"user_id": "a", "traits": {"Bad Key": "v"}}', "validation-error", "traits.Bad Key"),
]


@pytest.mark.parametrize(("case", "body", "slug", "needle"), BAD_STARTS, ids=[c[0] for c in BAD_STARTS])
async def test_bad_start_bodies_are_refused(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, case: str, body: bytes, slug: str, needle: str
) -> None:
    before = await db_snapshot(admin_engine, tenant.id)
    response = await client.post(
        "/v1/onboarding/start", content=body, headers=tenant.headers | {"content-type": "application/json"}
    )
    problem = _assert_problem(response, 400, slug)
    assert needle in problem["detail"] or needle in str(problem.get("errors")), problem
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_a_user_id_ending_in_a_line_break_is_refused_in_the_path(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine
) -> None:
    assert (await start(client, tenant, "u-1")).status_code == 201
    before = await db_snapshot(admin_engine, tenant.id)
    for response in (
        await client.get("/v1/onboarding/u-1%0A", headers=tenant.headers),
        await client.post("/v1/onboarding/u-1%0A/steps/complete-profile/complete", headers=tenant.headers),
        await client.post("/v1/onboarding/u-1/steps/complete-profile%0A/complete", headers=tenant.headers),
    ):
        _assert_problem(response, 400, "validation-error")
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_oversized_body_is_refused(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine) -> None:
    before = await db_snapshot(admin_engine, tenant.id)
    huge = b'{"user_id": "big", "traits": {"note": "' + b"x" * 70_000 + b'"}}'
    response = await client.post(
        "/v1/onboarding/start", content=huge, headers=tenant.headers | {"content-type": "application/json"}
    )
    _assert_problem(response, 413, "payload-too-large")
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_too_many_traits_and_long_values(client: Client, tenant: TenantFixture) -> None:
    many = {f"t{i}": "v" for i in range(51)}
    _assert_problem(await start(client, tenant, "many", **many), 400, "validation-error")
    _assert_problem(await start(client, tenant, "long", note="x" * 300), 400, "validation-error")


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, "Authorization"),
        ("Basic dXNlcjpwYXNz", "not a Firstmile API key"),
        ("Bearer fm_" + "A" * 43, "unknown or revoked"),
        ("Bearer not-a-key", "not a Firstmile API key"),
    ],
)
async def test_bad_credentials_are_401(
    client: Client, tenant: TenantFixture, admin_engine: AsyncEngine, header: str | None, detail: str
) -> None:
    before = await db_snapshot(admin_engine, tenant.id)
    headers = {"authorization": header} if header else {}
    response = await client.post("/v1/onboarding/start", json={"user_id": "x"}, headers=headers)
    problem = _assert_problem(response, 401, "unauthenticated")
    assert detail in problem["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_unknown_user_and_step(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine) -> None:
    await start(client, tenant, "known", persona="developer")
    before = await db_snapshot(admin_engine, tenant.id)
    _assert_problem(await client.get("/v1/onboarding/nobody", headers=tenant.headers), 404, "user-not-found")
    _assert_problem(await complete(client, tenant, "nobody", "create-api-key"), 404, "user-not-found")
    problem = _assert_problem(await complete(client, tenant, "known", "build-funnel"), 404, "step-not-found")
    assert "create-api-key" in problem["steps"]
    _assert_problem(await complete(client, tenant, "known", "Bad_Step"), 400, "validation-error")
    _assert_problem(await client.get("/v1/onboarding/bad%20id", headers=tenant.headers), 400, "validation-error")
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_prerequisites_are_enforced(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine) -> None:
    await start(client, tenant, "eager", persona="developer")
    before = await db_snapshot(admin_engine, tenant.id)
    problem = _assert_problem(
        await complete(client, tenant, "eager", "send-first-event"), 409, "step-prerequisites-unmet"
    )
    assert problem["missing"] == ["install-sdk"]
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_bad_completion_bodies(client: Client, tenant: TenantFixture, admin_engine: AsyncEngine) -> None:
    await start(client, tenant, "cb", persona="developer")
    before = await db_snapshot(admin_engine, tenant.id)
    _assert_problem(
        await complete(client, tenant, "cb", "create-api-key", occurred_at="yesterday"), 400, "validation-error"
    )
    _assert_problem(
        await complete(client, tenant, "cb", "create-api-key", occurred_at="2999-01-01T00:00:00Z"),
        400,
        "validation-error",
    )
    _assert_problem(
        await complete(client, tenant, "cb", "create-api-key", occurred_at="2026-01-01T00:00:00"),
        400,
        "validation-error",
    )
    _assert_problem(await complete(client, tenant, "cb", "create-api-key", when="now"), 400, "validation-error")
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_scope_is_required(admin_engine: AsyncEngine, client: Client) -> None:
    from tests.conftest import new_tenant

    reader = await new_tenant(admin_engine, scopes=("analytics:read",))
    before = await db_snapshot(admin_engine, reader.id)
    problem = _assert_problem(await start(client, reader, "x"), 403, "forbidden")
    assert problem["required_scope"] == "onboarding:write"
    assert await db_snapshot(admin_engine, reader.id) == before


async def test_a_read_only_key_reads_state_and_cannot_change_it(
    admin_engine: AsyncEngine, client: Client, tenant: TenantFixture
) -> None:
    from firstmile.tenancy.cli import create_key
    from tests.conftest import PEPPER, TenantFixture

    assert (await start(client, tenant, "reads")).status_code == 201
    created = await create_key(admin_engine, PEPPER, tenant.slug, ["onboarding:read"], "checklist")
    reader = TenantFixture(tenant.id, tenant.slug, created.key, tenant.manifest)
    state = await client.get("/v1/onboarding/reads", headers=reader.headers)
    assert state.status_code == 200 and state.json()["user_id"] == "reads"

    before = await db_snapshot(admin_engine, tenant.id)
    refused = _assert_problem(await start(client, reader, "new-user"), 403, "forbidden")
    assert refused["required_scope"] == "onboarding:write"
    refused = _assert_problem(await complete(client, reader, "reads", "create-api-key"), 403, "forbidden")
    assert refused["required_scope"] == "onboarding:write"
    assert await db_snapshot(admin_engine, tenant.id) == before

    # a key with neither onboarding scope cannot read: the refusal names the least it needs
    events_only = await create_key(admin_engine, PEPPER, tenant.slug, ["events:write"], "events")
    problem = _assert_problem(
        await client.get("/v1/onboarding/reads", headers={"Authorization": f"Bearer {events_only.key}"}),
        403,
        "forbidden",
    )
    assert problem["required_scope"] == "onboarding:read"


async def test_unknown_route_and_method(client: Client, tenant: TenantFixture) -> None:
    _assert_problem(await client.get("/v1/nothing-here", headers=tenant.headers), 404, "not-found")
    _assert_problem(await client.delete("/v1/onboarding/start", headers=tenant.headers), 405, "method-not-allowed")
