"""The review queue and manual overrides through the tenant API, against the real PostgreSQL (docs/review.md).

Each kind of ambiguity lands in the queue with its reason (a ``validation: review`` step, an event that meets
part of a step's criteria, a completion of a step only the path's newer version has, a completion dated before
the user started); approval completes the step at the original time and is audited with its reviewer; rejection
leaves it open with the note; a review is decided once, by its own tenant; a bulk decision is all or nothing;
a user's path set by hand keeps the planner's choice as its shadow; a segment pin applies to new starts while in
force; the scopes hold; and a webhook destination receives the review events.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.destinations import service as destinations
from firstmile.destinations.consumer import DestinationFeed
from firstmile.destinations.policy import RetryPolicy, new_webhook_secret
from firstmile.destinations.registry import OfficialAdapters
from firstmile.destinations.worker import DestinationDelivery
from firstmile.events.envelope import Envelope
from firstmile.kit.scope import OperatorContext
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.consumer import AutoCompletion
from firstmile.onboarding.service import OnboardingService
from firstmile.security.datakeys import DataKeyService, TenantKeys
from firstmile.tenancy.cli import create_key
from firstmile.wiring import adapters
from tests.conftest import PEPPER, REGION, make_settings
from tests.factories import db_snapshot, demo_document, manifest_for
from tests.support.webhook_receiver import WebhookReceiver

Client = AsyncTestClient[Litestar]
PROBLEM = "https://firstmile.dev/problems/"
OPS = OperatorContext("worker:test-reviews")
ALL = ("onboarding:write", "reviews:write")


def review_document(**extra: Any) -> dict[str, Any]:
    """The demo manifest; on developer-quickstart, create-api-key is confirmed by a person, and the optional
    invite-teammate completes on an event that meets two criteria."""
    doc = demo_document() | extra
    quickstart = next(p for p in doc["paths"] if p["id"] == "developer-quickstart")
    for step in quickstart["steps"]:
        step.pop("validation", None)  # whatever the demo says: these tests name their review steps
        if step["id"] == "create-api-key":
            step["validation"] = "review"
        if step["id"] == "invite-teammate":
            step["completion"] = {
                "event": "Teammate Invited",
                "where": [{"field": "role", "op": "eq", "value": "admin"},
                          {"field": "accepted", "op": "eq", "value": True}],
            }  # fmt: skip
    return doc


class Tenant:
    def __init__(self, tenant_id: uuid.UUID, slug: str, key: str, key_id: uuid.UUID, document: dict[str, Any]):
        self.id, self.slug, self.key, self.key_id, self.document = tenant_id, slug, key, key_id, document

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def actor(self) -> str:
        return f"api_key:{self.key_id}"


async def make_tenant(
    admin_engine: AsyncEngine, scopes: tuple[str, ...] = ALL, document: dict[str, Any] | None = None
) -> Tenant:
    slug = f"t-{secrets.token_hex(5)}"
    doc = document if document is not None else review_document()
    result = await apply_manifest(admin_engine, manifest_for(slug, REGION, doc))
    created = await create_key(admin_engine, PEPPER, slug, list(scopes), "test")
    return Tenant(result.tenant_id, slug, created.key, created.key_id, doc)


async def key_for(admin_engine: AsyncEngine, tenant: Tenant, *scopes: str) -> dict[str, str]:
    created = await create_key(admin_engine, PEPPER, tenant.slug, list(scopes), f"k-{secrets.token_hex(3)}")
    return {"Authorization": f"Bearer {created.key}"}


@pytest.fixture
async def tenant(admin_engine: AsyncEngine) -> Tenant:
    return await make_tenant(admin_engine)


async def start(client: Client, tenant: Tenant, user: str, **traits: Any) -> dict[str, Any]:
    body = {"user_id": user, "traits": {"persona": "developer", **traits}}
    response = await client.post("/v1/onboarding/start", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    return found


async def complete(client: Client, tenant: Tenant, user: str, step: str, **body: Any) -> Any:
    return await client.post(f"/v1/onboarding/{user}/steps/{step}/complete", json=body or None, headers=tenant.headers)


async def state(client: Client, tenant: Tenant, user: str) -> dict[str, Any]:
    response = await client.get(f"/v1/onboarding/{user}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def step_of(body: dict[str, Any], step: str) -> dict[str, Any]:
    return next(s for s in body["steps"] if s["id"] == step)


async def reviews(client: Client, tenant: Tenant, **query: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/reviews", params=query, headers=tenant.headers)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["reviews"]
    return found


async def decide(client: Client, tenant: Tenant, review_id: int, decision: str, **body: Any) -> Any:
    return await client.post(
        f"/v1/reviews/{review_id}/decision", json={"decision": decision, **body}, headers=tenant.headers
    )


def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM + slug and body["status"] == status and body["detail"]
    return body


async def completion_times(admin_engine: AsyncEngine, tenant: Tenant, user: str) -> dict[str, tuple[datetime, str]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT step_id, occurred_at, source FROM step_completions WHERE tenant_id = :t AND user_id = :u"),
            {"t": tenant.id, "u": user},
        )
        return {r[0]: (r[1], r[2]) for r in rows}


async def audit(admin_engine: AsyncEngine, tenant: Tenant, kind: str) -> list[dict[str, Any]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT actor, subject, payload FROM (SELECT actor, subject, payload::text, created_at"
                 " FROM audit_queue WHERE tenant_id = :t AND kind = :k UNION ALL"
                 " SELECT actor, subject, payload::text, created_at FROM audit_entries"
                 " WHERE tenant_id = :t AND kind = :k) a ORDER BY created_at"),
            {"t": tenant.id, "k": kind},
        )  # fmt: skip
        return [{"actor": r[0], "subject": r[1], "payload": json.loads(r[2])} for r in rows]


async def outbox_types(admin_engine: AsyncEngine, tenant: Tenant) -> list[tuple[str, dict[str, Any]]]:
    async with admin_engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_type, payload FROM outbox WHERE tenant_id = :t ORDER BY id"), {"t": tenant.id}
        )
        return [(r[0], r[1]) for r in rows]


# ------------------------------------------------------------------ each ambiguity lands in the queue


async def test_a_review_step_waits_for_approval_which_completes_it_at_the_original_time_and_audits_the_reviewer(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    started = await start(client, tenant, "ada")
    claimed = started["started_at"]
    response = await complete(client, tenant, "ada", "create-api-key", occurred_at=claimed)
    assert response.status_code == 202, response.text
    waiting = step_of(response.json(), "create-api-key")
    assert waiting["completed"] is False and waiting["pending_review"] is True
    assert waiting["validation"] == "review" and waiting["review"]["status"] == "pending"
    assert waiting["review"]["reason"] == "review_step"
    assert await completion_times(admin_engine, tenant, "ada") == {}
    again = await complete(client, tenant, "ada", "create-api-key")  # the same completion again: the same review
    assert again.status_code == 202

    [queued] = await reviews(client, tenant)
    assert queued["id"] == waiting["review"]["id"]
    assert (queued["kind"], queued["reason"], queued["status"]) == ("step", "review_step", "pending")
    assert (queued["user_id"], queued["path_id"], queued["step_id"], queued["source"]) == (
        "ada", "developer-quickstart", "create-api-key", "api",
    )  # fmt: skip
    assert datetime.fromisoformat(queued["occurred_at"]) == datetime.fromisoformat(claimed)
    one = await client.get(f"/v1/reviews/{queued['id']}", headers=tenant.headers)
    assert one.status_code == 200 and one.json() == queued
    assert [t for t, _ in await outbox_types(admin_engine, tenant)] == [
        "onboarding.started",
        "onboarding.review_created",
    ]

    decided = await decide(client, tenant, queued["id"], "approve", note="contract on file")
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert (body["status"], body["decided_by"], body["note"]) == ("approved", tenant.actor, "contract on file")
    after = step_of(await state(client, tenant, "ada"), "create-api-key")
    assert after["completed"] is True and after["pending_review"] is False
    assert after["review"]["status"] == "approved"
    # completed at the time the completion happened, not when it was approved
    occurred, source = (await completion_times(admin_engine, tenant, "ada"))["create-api-key"]
    assert occurred == datetime.fromisoformat(claimed) and source == f"review:{queued['id']}"
    reviewed = [a for a in await audit(admin_engine, tenant, "review") if a["payload"].get("review_id") == queued["id"]]
    assert [(a["actor"], a["payload"]["review"]) for a in reviewed] == [
        ("progress_evaluator", "created"), (tenant.actor, "decided"),
    ]  # fmt: skip
    assert reviewed[1]["subject"] == "ada" and reviewed[1]["payload"]["decision"] == "approve"
    assert reviewed[1]["payload"]["note"] == "contract on file"
    types = [t for t, _ in await outbox_types(admin_engine, tenant)]
    assert types[-2:] == ["onboarding.review_decided", "onboarding.step_completed"]
    assert await reviews(client, tenant) == []  # the queue (pending) is empty
    assert [r["status"] for r in await reviews(client, tenant, status="approved")] == ["approved"]


async def test_rejection_leaves_the_step_open_with_the_note_and_a_second_decision_is_refused(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    await start(client, tenant, "bob")
    review_id = step_of((await complete(client, tenant, "bob", "create-api-key")).json(), "create-api-key")["review"][
        "id"
    ]
    rejected = await decide(client, tenant, review_id, "reject", note="no signed contract yet")
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    step = step_of(await state(client, tenant, "bob"), "create-api-key")
    assert step["completed"] is False and step["pending_review"] is False
    assert step["review"] == {"id": review_id, "status": "rejected", "reason": "review_step",
                              "note": "no signed contract yet"}  # fmt: skip
    assert await completion_times(admin_engine, tenant, "bob") == {}

    before = await db_snapshot(admin_engine, tenant.id)
    for decision in ("approve", "reject"):
        body = problem(await decide(client, tenant, review_id, decision), 409, "review-decided")
        assert body["status_now"] == "rejected"
    # a decision that does not fit the kind, a better path on a completion: 400
    problem(await decide(client, tenant, review_id, "right"), 400, "validation-error")
    problem(await client.post(f"/v1/reviews/{review_id}/decision", json={"decision": "maybe"},
                              headers=tenant.headers), 400, "validation-error")  # fmt: skip
    problem(await client.post(f"/v1/reviews/{review_id}/decision", json={"decision": "approve", "by": "me"},
                              headers=tenant.headers), 400, "validation-error")  # fmt: skip
    problem(await decide(client, tenant, 9_999_999, "approve"), 404, "review-not-found")
    problem(await client.get("/v1/reviews/9999999", headers=tenant.headers), 404, "review-not-found")
    assert await db_snapshot(admin_engine, tenant.id) == before

    # completed again after the rejection: a new review
    again = await complete(client, tenant, "bob", "create-api-key")
    assert again.status_code == 202
    assert step_of(again.json(), "create-api-key")["review"]["id"] != review_id


async def test_an_event_meeting_part_of_the_criteria_goes_to_review_and_approval_completes_at_the_events_time(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    await start(client, tenant, "cy")
    at = datetime.now(UTC) - timedelta(seconds=30)
    consumer = AutoCompletion(app_engine, OnboardingService(CatalogCache()))

    def tracked(properties: dict[str, Any]) -> Envelope:
        payload = {"type": "track", "userId": "cy", "event": "Teammate Invited", "properties": properties,
                   "timestamp": at.isoformat()}  # fmt: skip
        return Envelope(uuid.uuid4(), tenant.id, "track", at, payload, "cy")

    partial = tracked({"role": "admin", "accepted": False})
    assert await consumer.handle([partial, tracked({"role": "viewer"})]) == []  # none of the criteria: ignored
    [queued] = await reviews(client, tenant)
    assert (queued["kind"], queued["reason"], queued["step_id"]) == ("ambiguous", "partial_match", "invite-teammate")
    assert queued["source"] == f"event:{partial.event_id}"
    assert queued["details"]["criteria_met"] == 1 and queued["details"]["criteria"] == 2
    step = step_of(await state(client, tenant, "cy"), "invite-teammate")
    assert step["pending_review"] is True and step["completed"] is False
    assert await consumer.handle([partial]) == []  # redelivered: still one review
    assert len(await reviews(client, tenant)) == 1

    assert (await decide(client, tenant, queued["id"], "approve")).status_code == 200
    occurred, _ = (await completion_times(admin_engine, tenant, "cy"))["invite-teammate"]
    assert occurred == at
    # the whole criteria met completes at once, no review
    await start(client, tenant, "cy-2")
    full = Envelope(uuid.uuid4(), tenant.id, "track", at, {**partial.payload, "userId": "cy-2",
                    "properties": {"role": "admin", "accepted": True}}, "cy-2")  # fmt: skip
    assert await consumer.handle([full]) == []
    assert "invite-teammate" in await completion_times(admin_engine, tenant, "cy-2")
    assert [r["user_id"] for r in await reviews(client, tenant, status="any")] == ["cy"]


async def test_a_completion_dated_before_the_start_contradicts_the_record_and_goes_to_review(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    started = datetime.fromisoformat((await start(client, tenant, "dee"))["started_at"])
    backdated = (started - timedelta(hours=2)).isoformat()
    response = await complete(client, tenant, "dee", "invite-teammate", occurred_at=backdated)
    assert response.status_code == 202, response.text
    step = step_of(response.json(), "invite-teammate")
    assert step["pending_review"] is True and step["review"]["reason"] == "contradicts_record"
    [queued] = await reviews(client, tenant, kind="ambiguous")
    assert queued["details"]["started_at"] == started.isoformat()
    assert datetime.fromisoformat(queued["occurred_at"]) == started - timedelta(hours=2)
    # within the clock skew of the start: accepted at once
    other = datetime.fromisoformat((await start(client, tenant, "dee-2"))["started_at"])
    within = other - timedelta(minutes=4)
    accepted = await complete(client, tenant, "dee-2", "invite-teammate", occurred_at=within.isoformat())
    assert accepted.status_code == 200, accepted.text
    assert step_of(accepted.json(), "invite-teammate")["completed"] is True
    assert (await completion_times(admin_engine, tenant, "dee-2"))["invite-teammate"][0] == within
    assert len(await reviews(client, tenant, status="any")) == 1

    assert (await decide(client, tenant, queued["id"], "approve")).status_code == 200
    occurred, _ = (await completion_times(admin_engine, tenant, "dee"))["invite-teammate"]
    assert occurred == started - timedelta(hours=2)  # the time claimed, as a person confirmed it


async def test_a_step_only_the_paths_newer_version_has_goes_to_review_and_approval_moves_the_user(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    await start(client, tenant, "eve")  # on developer-quickstart v1
    assert (await complete(client, tenant, "eve", "invite-teammate")).status_code == 200
    newer = json.loads(json.dumps(tenant.document))
    quickstart = next(p for p in newer["paths"] if p["id"] == "developer-quickstart")
    quickstart["steps"].append({"id": "verify-domain", "title": "Verify your domain", "optional": True,
                                "prerequisites": [], "completion": {"event": "Domain Verified"}})  # fmt: skip
    await apply_manifest(admin_engine, manifest_for(tenant.slug, REGION, newer))
    assert (await state(client, tenant, "eve"))["path"]["version"] == 1

    response = await complete(client, tenant, "eve", "verify-domain")
    assert response.status_code == 202, response.text
    assert response.json()["path"]["version"] == 1
    assert "verify-domain" not in [s["id"] for s in response.json()["steps"]]
    [queued] = await reviews(client, tenant, step="verify-domain")
    assert (queued["reason"], queued["path_version"]) == ("path_version_changed", 1)
    assert queued["details"] == {"user_version": 1, "current_version": 2}
    problem(await complete(client, tenant, "eve", "no-such-step"), 404, "step-not-found")  # still refused

    assert (await decide(client, tenant, queued["id"], "approve")).status_code == 200
    moved = await state(client, tenant, "eve")
    assert moved["path"]["version"] == 2
    assert step_of(moved, "verify-domain")["completed"] is True
    assert step_of(moved, "invite-teammate")["completed"] is True  # the completions both versions have stay
    assert moved["decision"]["selected_by"] == "rules"  # the path is the planner's still: only its version moved
    changed = [p for t, p in await outbox_types(admin_engine, tenant) if t == "onboarding.path_changed"]
    assert changed[0]["previous"] == {"path_id": "developer-quickstart", "path_version": 1}
    assert changed[0]["path_version"] == 2


# ------------------------------------------------------------------ decided by its own tenant, all or nothing


async def test_another_tenants_review_is_not_found_and_nothing_changes(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    other = await make_tenant(admin_engine)
    await start(client, tenant, "fay")
    review_id = step_of((await complete(client, tenant, "fay", "create-api-key")).json(), "create-api-key")["review"][
        "id"
    ]
    before = await db_snapshot(admin_engine, tenant.id)
    problem(await client.get(f"/v1/reviews/{review_id}", headers=other.headers), 404, "review-not-found")
    problem(await decide(client, other, review_id, "approve"), 404, "review-not-found")
    bulk = {"decisions": [{"id": review_id, "decision": "approve"}]}
    problem(await client.post("/v1/reviews/decisions", json=bulk, headers=other.headers), 404, "review-not-found")
    assert await reviews(client, other, status="any") == []
    assert await db_snapshot(admin_engine, tenant.id) == before


async def test_a_bulk_decision_decides_all_or_none(client: Client, tenant: Tenant, admin_engine: AsyncEngine) -> None:
    ids = []
    for user in ("g1", "g2", "g3"):
        await start(client, tenant, user)
        ids.append(
            step_of((await complete(client, tenant, user, "create-api-key")).json(), "create-api-key")["review"]["id"]
        )
    assert (await decide(client, tenant, ids[2], "reject")).status_code == 200

    before = await db_snapshot(admin_engine, tenant.id)
    refused = [
        ([{"id": ids[0], "decision": "approve"}, {"id": ids[2], "decision": "approve"}], 409, "review-decided", 1),
        ([{"id": ids[0], "decision": "approve"}, {"id": 8_888_888, "decision": "approve"}], 404, "review-not-found", 1),
        ([{"id": ids[1], "decision": "approve"}, {"id": ids[0], "decision": "wrong"}], 400, "validation-error", 1),
    ]
    for decisions, status, slug, index in refused:
        response = await client.post("/v1/reviews/decisions", json={"decisions": decisions}, headers=tenant.headers)
        body = problem(response, status, slug)
        assert body["index"] == index and body["review_id"] == decisions[index]["id"]
    malformed: list[Any] = [
        {"decisions": []},
        {"decisions": [{"id": ids[0], "decision": "approve"}] * 2},  # the same review twice
        {"decisions": [{"id": str(ids[0]), "decision": "approve"}]},  # "5" is not an id
        {"decisions": [{"id": ids[0], "decision": "approve", "extra": 1}]},
        {"decisions": [{"id": i, "decision": "approve"} for i in range(1, 102)]},
    ]
    for bad in malformed:
        problem(await client.post("/v1/reviews/decisions", json=bad, headers=tenant.headers), 400, "validation-error")
    assert await db_snapshot(admin_engine, tenant.id) == before
    assert {r["id"] for r in await reviews(client, tenant)} == {ids[0], ids[1]}

    decisions = [{"id": ids[1], "decision": "approve", "note": "ok"}, {"id": ids[0], "decision": "reject"}]
    done = await client.post("/v1/reviews/decisions", json={"decisions": decisions}, headers=tenant.headers)
    assert done.status_code == 200, done.text
    assert [(r["id"], r["status"]) for r in done.json()["reviews"]] == [(ids[1], "approved"), (ids[0], "rejected")]
    assert await reviews(client, tenant) == []
    assert step_of(await state(client, tenant, "g2"), "create-api-key")["completed"] is True
    assert step_of(await state(client, tenant, "g1"), "create-api-key")["completed"] is False


async def test_the_listing_filters_and_pages(client: Client, tenant: Tenant) -> None:
    for user in ("h1", "h2", "h3"):
        await start(client, tenant, user)
        await complete(client, tenant, user, "create-api-key")
    await complete(client, tenant, "h1", "invite-teammate", occurred_at="2020-01-01T00:00:00Z")
    everything = await reviews(client, tenant)
    assert [r["user_id"] for r in everything] == ["h1", "h3", "h2", "h1"]  # newest first
    assert [r["user_id"] for r in await reviews(client, tenant, kind="step")] == ["h3", "h2", "h1"]
    assert [r["reason"] for r in await reviews(client, tenant, step="invite-teammate")] == ["contradicts_record"]
    assert await reviews(client, tenant, path="generic") == []
    assert await reviews(client, tenant, older_than_seconds=3600) == []
    assert len(await reviews(client, tenant, older_than_seconds=0)) == 4
    page = await client.get("/v1/reviews", params={"limit": 3}, headers=tenant.headers)
    assert len(page.json()["reviews"]) == 3
    rest = await reviews(client, tenant, before=page.json()["next_before"])
    assert [r["user_id"] for r in rest] == ["h1"]
    last = await client.get("/v1/reviews", params={"before": page.json()["next_before"]}, headers=tenant.headers)
    assert last.json()["next_before"] is None
    for bad in ({"limit": 0}, {"limit": 501}, {"kind": "other"}, {"status": "done"}, {"path": "Not A Slug"},
                {"older_than_seconds": -1}, {"before": 0}, {"before": "x"}):  # fmt: skip
        problem(await client.get("/v1/reviews", params=bad, headers=tenant.headers), 400, "validation-error")


# ------------------------------------------------------------------ manual overrides


async def test_a_users_path_set_by_hand_is_the_decision_with_the_planners_choice_as_its_shadow(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    await start(client, tenant, "ida")  # developer-quickstart, by the rules
    moved = await client.put("/v1/onboarding/ida/path", json={"path_id": "generic", "reason": "asked for the tour"},
                             headers=tenant.headers)  # fmt: skip
    assert moved.status_code == 200, moved.text
    body = moved.json()
    assert body["path"]["id"] == "generic" and body["current_step"] == "complete-profile"
    decision = body["decision"]
    assert decision["selected_by"] == "human" and decision["planner"] == "override"
    assert decision["override"]["by"] == tenant.actor and decision["override"]["forced"] is False
    assert decision["shadow"]["path_id"] == "developer-quickstart" and decision["shadow"]["selected_by"] == "rules"
    assert (await state(client, tenant, "ida"))["decision"] == decision
    [entry] = [a for a in await audit(admin_engine, tenant, "decision") if a["payload"].get("selected_by") == "human"]
    assert entry["actor"] == tenant.actor and entry["subject"] == "ida"
    assert entry["payload"]["output"]["path_id"] == "generic"
    assert entry["payload"]["shadow"]["path_id"] == "developer-quickstart"
    assert entry["payload"]["previous"] == {"path_id": "developer-quickstart", "path_version": 1}
    [override] = (await client.get("/v1/overrides", headers=tenant.headers)).json()["overrides"]
    assert (override["user_id"], override["path_id"], override["active"]) == ("ida", "generic", True)

    before = await db_snapshot(admin_engine, tenant.id)
    # the enterprise path's targeting (company size, IT admin) does not hold for ida
    refused = await client.put(
        "/v1/onboarding/ida/path", json={"path_id": "enterprise-rollout"}, headers=tenant.headers
    )
    assert problem(refused, 409, "path-not-eligible")["targeting"]
    no_reason = {"path_id": "enterprise-rollout", "force": True}
    problem(
        await client.put("/v1/onboarding/ida/path", json=no_reason, headers=tenant.headers), 400, "validation-error"
    )
    blank = {"path_id": "enterprise-rollout", "force": True, "reason": "  "}
    problem(await client.put("/v1/onboarding/ida/path", json=blank, headers=tenant.headers), 400, "validation-error")
    problem(await client.put("/v1/onboarding/ida/path", json={"path_id": "enterprise-rollout", "force": "true",
                                                              "reason": "x"}, headers=tenant.headers),
            400, "validation-error")  # fmt: skip
    problem(await client.put("/v1/onboarding/ida/path", json={"path_id": "no-such-path"}, headers=tenant.headers),
            404, "path-not-found")  # fmt: skip
    problem(await client.put("/v1/onboarding/nobody/path", json={"path_id": "generic"}, headers=tenant.headers),
            404, "user-not-found")  # fmt: skip
    assert await db_snapshot(admin_engine, tenant.id) == before

    forced = {"path_id": "enterprise-rollout", "force": True, "reason": "pilot account, IT-managed"}
    response = await client.put("/v1/onboarding/ida/path", json=forced, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["path"]["id"] == "enterprise-rollout"
    assert response.json()["decision"]["override"]["reason"] == "pilot account, IT-managed"
    entries = [a for a in await audit(admin_engine, tenant, "decision") if a["payload"].get("selected_by") == "human"]
    assert [e["payload"]["override"]["forced"] for e in entries] == [False, True]
    assert entries[1]["payload"]["override"]["reason"] == "pilot account, IT-managed"


async def test_a_segment_pin_applies_to_new_starts_while_in_force(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    pin = {"segment": [{"field": "plan", "op": "eq", "value": "pro"}], "path_id": "generic",
           "reason": "trying the tour on pro accounts"}  # fmt: skip
    made = await client.post("/v1/overrides/pins", json=pin, headers=tenant.headers)
    assert made.status_code == 201, made.text
    assert made.json()["segment"] == [{"field": "plan", "op": "eq", "value": "pro"}] and made.json()["active"]

    pinned = await start(client, tenant, "pro-1", plan="pro")
    assert pinned["path"]["id"] == "generic"
    assert pinned["decision"]["selected_by"] == "human"
    assert pinned["decision"]["override"]["override_id"] == made.json()["id"]
    assert pinned["decision"]["shadow"]["path_id"] == "developer-quickstart"  # what the planner chose
    [entry] = [a for a in await audit(admin_engine, tenant, "decision") if a["subject"] == "pro-1"]
    assert entry["payload"]["selected_by"] == "human"
    assert entry["payload"]["shadow"]["path_id"] == "developer-quickstart"
    assert (await start(client, tenant, "free-1", plan="free"))["path"]["id"] == "developer-quickstart"

    revoked = await client.delete(f"/v1/overrides/{made.json()['id']}", headers=tenant.headers)
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    assert revoked.json()["revoked_by"] == tenant.actor
    assert (await start(client, tenant, "pro-2", plan="pro"))["path"]["id"] == "developer-quickstart"
    problem(await client.delete(f"/v1/overrides/{made.json()['id']}", headers=tenant.headers),
            404, "override-not-found")  # fmt: skip
    assert (await client.get("/v1/overrides", headers=tenant.headers)).json()["overrides"] == []
    listed = (await client.get("/v1/overrides", params={"active": "false"}, headers=tenant.headers)).json()
    assert [o["id"] for o in listed["overrides"]] == [made.json()["id"]]

    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    expiring = await client.post(
        "/v1/overrides/pins", json=pin | {"expires_at": soon.isoformat()}, headers=tenant.headers
    )
    assert expiring.status_code == 201, expiring.text
    assert (await start(client, tenant, "pro-3", plan="pro"))["path"]["id"] == "generic"
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    assert (await start(client, tenant, "pro-4", plan="pro"))["path"]["id"] == "developer-quickstart"


async def test_a_pin_that_does_not_hold_is_refused_and_changes_nothing(
    client: Client, tenant: Tenant, admin_engine: AsyncEngine
) -> None:
    before = await db_snapshot(admin_engine, tenant.id)
    good = [{"field": "plan", "op": "eq", "value": "pro"}]
    refused: list[tuple[dict[str, Any], int, str, str]] = [
        ({"segment": [{"field": "plan", "op": "in", "value": "pro"}], "path_id": "generic"}, 400,
         "validation-error", "segment[0]"),
        ({"segment": [{"field": "plan", "op": "like", "value": "pro"}], "path_id": "generic"}, 400,
         "validation-error", "segment[0].op"),
        ({"segment": [{"op": "eq", "value": "pro"}], "path_id": "generic"}, 400, "validation-error",
         "segment[0].field"),
        ({"segment": [{"field": "plan", "value": "pro", "extra": 1}], "path_id": "generic"}, 400,
         "validation-error", "segment[0].extra"),
        ({"segment": [], "path_id": "generic"}, 400, "validation-error", "segment"),
        ({"segment": good, "path_id": "generic", "force": True}, 400, "validation-error", "reason"),
        ({"segment": good, "path_id": "generic", "expires_at": "2020-01-01T00:00:00Z"}, 400, "validation-error",
         "expires_at"),
        ({"segment": good, "path_id": "generic", "expires_at": "2999-01-01T00:00:00"}, 400, "validation-error",
         "expires_at"),
        ({"segment": good, "path_id": "generic", "force": "true", "reason": "x"}, 400, "validation-error", "force"),
        ({"segment": good, "path_id": "no-such-path"}, 404, "path-not-found", ""),
    ]  # fmt: skip
    for body, status, slug, key in refused:
        found = problem(await client.post("/v1/overrides/pins", json=body, headers=tenant.headers), status, slug)
        if key:
            assert found["errors"][0]["key"] == key, found
    problem(await client.delete("/v1/overrides/7777777", headers=tenant.headers), 404, "override-not-found")
    assert await db_snapshot(admin_engine, tenant.id) == before


# ------------------------------------------------------------------ scopes


async def test_the_scopes_hold(client: Client, tenant: Tenant, admin_engine: AsyncEngine) -> None:
    await start(client, tenant, "jo")
    review_id = step_of((await complete(client, tenant, "jo", "create-api-key")).json(), "create-api-key")["review"][
        "id"
    ]
    writer = await key_for(admin_engine, tenant, "onboarding:write")
    reader = await key_for(admin_engine, tenant, "reviews:read")
    for method, url in (("GET", "/v1/reviews"), ("GET", f"/v1/reviews/{review_id}"), ("GET", "/v1/overrides")):
        refused = await client.request(method, url, headers=writer)
        assert problem(refused, 403, "forbidden")["required_scope"] == "reviews:read"
        assert (await client.request(method, url, headers=reader)).status_code == 200
    writes = [
        ("POST", f"/v1/reviews/{review_id}/decision", {"decision": "approve"}),
        ("POST", "/v1/reviews/decisions", {"decisions": [{"id": review_id, "decision": "approve"}]}),
        ("POST", "/v1/overrides/pins", {"segment": [{"field": "plan", "value": "pro"}], "path_id": "generic"}),
        ("DELETE", "/v1/overrides/1", None),
        ("PUT", "/v1/onboarding/jo/path", {"path_id": "generic"}),
    ]
    before = await db_snapshot(admin_engine, tenant.id)
    for method, url, body in writes:
        for headers in (writer, reader):
            refused = await client.request(method, url, json=body, headers=headers)
            assert problem(refused, 403, "forbidden")["required_scope"] == "reviews:write"
    assert await db_snapshot(admin_engine, tenant.id) == before


# ------------------------------------------------------------------ the review events at a webhook


@pytest.fixture
async def keyring(app_engine: AsyncEngine) -> DataKeyService:
    return DataKeyService.from_config(app_engine, adapters.key_config(make_settings()))  # the app's KEK


async def test_a_webhook_destination_receives_the_review_events_without_the_note(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine, keyring: DataKeyService
) -> None:
    secret = new_webhook_secret()
    with WebhookReceiver(secret) as receiver:
        hooks = [{"name": "hooks", "kind": "webhook", "url": receiver.url + "/reviews",
                  "events": ["onboarding.review_created", "onboarding.review_decided"]}]  # fmt: skip
        tenant = await make_tenant(admin_engine, document=review_document(destinations=hooks))
        uow = UnitOfWork(app_engine, OPS.tenant(tenant.id))

        async def store(tx: Any, keys: TenantKeys) -> Any:
            return await destinations.set_credentials(
                tx, keys, "hooks", {"secret": secret}, actor="operator:test", rotate=False, rotation=timedelta(hours=1)
            )

        await keyring.run_with_keys(uow, store)
        await start(client, tenant, "kim")
        review_id = step_of((await complete(client, tenant, "kim", "create-api-key")).json(),
                            "create-api-key")["review"]["id"]  # fmt: skip
        decided = await decide(client, tenant, review_id, "reject", note="Kim's contract is unsigned")
        assert decided.status_code == 200

        async with admin_engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT event_id, tenant_id, event_type, occurred_at, payload, partition_key FROM outbox"
                     " WHERE tenant_id = :t ORDER BY id"), {"t": tenant.id},
            )  # fmt: skip
            events = [Envelope(r[0], r[1], r[2], r[3], dict(r[4]), r[5]) for r in rows]
        await DestinationFeed(app_engine, keyring, config_ttl=0).handle(events)
        worker = DestinationDelivery(app_engine, keyring, OfficialAdapters(timeout_s=2),
                                     policy=RetryPolicy(0.05, 0.2, 5), skip_s=0, purge_every_s=3600)  # fmt: skip
        try:
            done = await worker.deliver_destination(OPS.tenant(tenant.id), "hooks")
        finally:
            await worker.close()
        assert (done.sent, done.dead) == (2, 0)

    assert receiver.refused == []
    created, decided_event = [d.payload for d in receiver.deliveries]
    assert created["type"] == "onboarding.review_created" and decided_event["type"] == "onboarding.review_decided"
    assert created["data"]["user_id"] == "kim"
    assert created["data"]["properties"] == {
        "review_id": review_id, "kind": "step", "reason": "review_step", "status": "pending",
        "path_id": "developer-quickstart", "path_version": 1, "step_id": "create-api-key",
    }  # fmt: skip
    assert decided_event["data"]["properties"]["status"] == "rejected"
    raw = json.dumps([d.payload for d in receiver.deliveries])
    assert "unsigned" not in raw and "note" not in raw and tenant.actor not in raw  # no note, no reviewer


# ---- what a user's export and erasure cover ----


async def test_a_users_export_holds_their_reviews_and_overrides_and_erasure_removes_them(
    client: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await make_tenant(admin_engine, (*ALL, "users:admin"))
    await start(client, tenant, "ada")
    assert (await complete(client, tenant, "ada", "create-api-key")).status_code == 202
    moved = await client.put("/v1/onboarding/ada/path", json={"path_id": "developer-quickstart"},
                             headers=tenant.headers)  # fmt: skip
    assert moved.status_code == 200, moved.text
    exported = await client.get("/v1/users/ada/export", headers=tenant.headers)
    assert exported.status_code == 200, exported.text
    onboarding = exported.json()["onboarding"]
    assert [(r["kind"], r["reason"], r["step_id"], r["status"]) for r in onboarding["reviews"]] == [
        ("step", "review_step", "create-api-key", "pending")
    ]
    assert [(o["path_id"], o["created_by"]) for o in onboarding["overrides"]] == [
        ("developer-quickstart", tenant.actor)
    ]
    erased = await client.delete("/v1/users/ada", headers=tenant.headers)
    assert erased.status_code == 202, erased.text
    deleted = erased.json()["rows_deleted"]
    assert deleted["onboarding_reviews"] == 1 and deleted["onboarding_overrides"] == 1
    async with admin_engine.connect() as conn:
        for table in ("onboarding_reviews", "onboarding_overrides"):
            left = await conn.scalar(
                text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t AND user_id = 'ada'"), {"t": tenant.id}
            )
            assert left == 0, table
