"""The review queue in the admin UI over HTTP (issue 20, part 4; docs/admin-ui.md#the-review-queue): reviews queued
through the public onboarding API (a tenant whose manifest asks a person to confirm three steps, and a completion
backdated before the user started), listed and filtered by ``/admin/api/reviews`` and the ``/admin/reviews`` page;
an editor's approval completes the step at the time it happened, a rejection leaves it open with the note, each
audited with the admin as reviewer; a decision review judged wrong with a better path; deciding twice is 409, an
unknown or another tenant's review 404, a bulk decision all or nothing; the roles (an analyst reads, a viewer does
not, neither decides) and CSRF; the segment pins in force and their revocation. Real PostgreSQL, the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.rbac import GRANTS, Permission
from firstmile.admin.reviews_api import OverridesAdminController, ReviewsAdminController
from firstmile.admin.service import AdminAuth
from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.kit.db import tenant_transaction
from firstmile.onboarding import review
from firstmile.onboarding.service import OnboardingService
from tests.conftest import PEPPER, Database, make_settings
from tests.factories import db_snapshot
from tests.support.reviews import (
    TEST_OPERATOR,
    ReviewTenant,
    age_review,
    completion,
    decision_review,
    queued,
    review_audit,
    review_tenant,
    stored_review,
)

BASE = "http://testserver.local"
PROBLEMS = "https://firstmile.dev/problems/"
Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
async def admin_app(database: Database, analytics_store: ChdbStore) -> AsyncIterator[Client]:
    settings = make_settings(public_url=BASE, admin_cookie_secure=False)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    async with AsyncTestClient(app=app, base_url=BASE, raise_server_exceptions=False) as api:
        yield api


async def sign_in(api: Client, slug: str, role: str) -> dict[str, Any]:
    """A fresh session of ``role`` through a bootstrap link; ``/admin/api/me`` of it (its CSRF token, subject)."""
    api.cookies.clear()
    auth: AdminAuth = api.app.state.container.admin_auth
    redeemed = await api.post("/admin/bootstrap/redeem", data={"token": auth.bootstrap_token(slug, role)},
                              follow_redirects=False)  # fmt: skip
    assert redeemed.status_code == 303, redeemed.text
    me: dict[str, Any] = (await api.get("/admin/api/me")).json()
    return me


async def decide(api: Client, csrf: str, review_id: int | str, body: Any) -> Any:
    return await api.post(f"/admin/api/reviews/{review_id}/decide", json=body, headers={"X-CSRF-Token": csrf})


async def bulk(api: Client, csrf: str, body: Any) -> Any:
    return await api.post("/admin/api/reviews/bulk", json=body, headers={"X-CSRF-Token": csrf})


def problem(answer: Any, status: int, slug: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.headers
    body: dict[str, Any] = answer.json()
    assert body["type"] == PROBLEMS + slug, body
    return body


def unaudited(snapshot: dict[str, str]) -> dict[str, str]:
    """A tenant's snapshot but its audit queue (a refusal is audited; it changes nothing else)."""
    return {table: digest for table, digest in snapshot.items() if table != "audit_queue"}


async def listed(api: Client, **query: str) -> list[dict[str, Any]]:
    answer = await api.get("/admin/api/reviews", params=query)
    assert answer.status_code == 200, answer.text
    reviews: list[dict[str, Any]] = answer.json()["reviews"]
    return reviews


def test_every_review_handler_declares_its_permission() -> None:
    handlers = [getattr(c, n) for c in (ReviewsAdminController, OverridesAdminController) for n in dir(c)]
    routes = [h for h in handlers if hasattr(h, "opt") and hasattr(h, "http_methods")]
    declared = {(next(iter(h.http_methods)), h.opt["permission"]) for h in routes}
    assert declared == {("GET", Permission.REVIEWS_READ), ("POST", Permission.REVIEWS_DECIDE),
                        ("POST", Permission.OVERRIDES_MANAGE)}  # fmt: skip
    assert [r for r, g in GRANTS.items() if Permission.REVIEWS_READ in g] == ["analyst", "editor", "owner"]
    assert [r for r, g in GRANTS.items() if Permission.REVIEWS_DECIDE in g] == ["editor", "owner"]
    assert [r for r, g in GRANTS.items() if Permission.OVERRIDES_MANAGE in g] == ["editor", "owner"]


async def test_the_queue_is_listed_and_filtered_and_only_read_by_an_analyst(
    admin_app: Client, admin_engine: AsyncEngine
) -> None:
    tenant = await review_tenant(admin_engine, "rq")
    earlier = datetime.now(UTC) - timedelta(hours=2)
    a = await queued(admin_app, tenant, "u-a", "developer", "create-api-key", earlier)
    b = await queued(admin_app, tenant, "u-b", "developer", "invite-teammate", None)
    c = await queued(admin_app, tenant, "u-c", "analyst", "connect-data-source", None)
    d = await queued(admin_app, tenant, "u-d", "admin", "configure-workspace", earlier)  # before the user started

    await sign_in(admin_app, tenant.slug, "analyst")
    everything = await listed(admin_app)
    assert [r["id"] for r in everything] == [d, c, b, a]  # pending, newest first
    first = everything[-1]
    assert {k: first[k] for k in ("kind", "reason", "status", "user_id", "path_id", "path_version", "step_id",
                                  "source")} == {
        "kind": "step", "reason": "review_step", "status": "pending", "user_id": "u-a",
        "path_id": "developer-quickstart", "path_version": 1, "step_id": "create-api-key", "source": "api"}  # fmt: skip
    assert first["reason_text"] == review.REASONS["review_step"]
    assert datetime.fromisoformat(first["occurred_at"]) == earlier  # when it happened, not when it was queued
    assert 0 <= first["age_seconds"] < 600 and first["decided_by"] is None
    ambiguous = everything[0]
    assert (ambiguous["kind"], ambiguous["reason"]) == ("ambiguous", "contradicts_record")
    assert ambiguous["reason_text"] == review.REASONS["contradicts_record"] and "started_at" in ambiguous["details"]

    assert [r["id"] for r in await listed(admin_app, kind="step")] == [c, b, a]
    assert [r["id"] for r in await listed(admin_app, kind="ambiguous")] == [d]
    assert [r["id"] for r in await listed(admin_app, kind="decision")] == []
    assert [r["id"] for r in await listed(admin_app, path="developer-quickstart")] == [b, a]
    assert [r["id"] for r in await listed(admin_app, step="connect-data-source")] == [c]
    assert [r["id"] for r in await listed(admin_app, older_than="1")] == []
    await age_review(admin_engine, tenant, b, 5)
    assert [r["id"] for r in await listed(admin_app, older_than="4")] == [b]
    assert [r["id"] for r in await listed(admin_app, older_than="6")] == []
    assert [r["id"] for r in await listed(admin_app, status="decided")] == []
    assert [r["id"] for r in await listed(admin_app, status="any", kind="step", path="developer-quickstart")] == [b, a]
    page = (await admin_app.get("/admin/api/reviews", params={"limit": "3"})).json()
    assert [r["id"] for r in page["reviews"]] == [d, c, b] and page["next_before_id"] == b
    rest = await listed(admin_app, limit="3", before_id=str(b))
    assert [r["id"] for r in rest] == [a]
    assert (await admin_app.get(f"/admin/api/reviews/{a}")).json()["step_id"] == "create-api-key"

    for bad in ({"kind": "odd"}, {"status": "done"}, {"path": "Not A Path"}, {"step": "x" * 70},
                {"older_than": "0"}, {"older_than": "two"}, {"older_than": "9" * 5000}, {"limit": "500"},
                {"before_id": "-3"}):  # fmt: skip
        body = problem(await admin_app.get("/admin/api/reviews", params=bad), 400, "validation-error")
        assert body["errors"][0]["key"] == next(iter(bad)), body

    # the page: the same reviews, read-only for an analyst
    html = await admin_app.get("/admin/reviews", params={"kind": "step"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in html.headers["content-security-policy"]
    assert 'data-testid="nav-reviews" aria-current="page"' in html.text
    assert all(f'data-review-id="{i}"' in html.text for i in (a, b, c)) and f'data-review-id="{d}"' not in html.text
    assert review.REASONS["review_step"] in html.text and "developer-quickstart@v1" in html.text
    assert 'data-testid="approve"' not in html.text and 'data-testid="select"' not in html.text
    assert 'data-testid="read-only"' in html.text and 'data-testid="revoke"' not in html.text
    refused = await admin_app.get("/admin/reviews", params={"older_than": "-1"}, headers={"Accept": "text/html"})
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("text/html")
    assert "a whole number from 1 to" in refused.text  # the problem, as a page

    # an analyst decides nothing, through the API or otherwise
    analyst = await sign_in(admin_app, tenant.slug, "analyst")
    before = await db_snapshot(admin_engine, tenant.id)
    body = problem(await decide(admin_app, analyst["csrf_token"], a, {"decision": "approve"}), 403, "forbidden")
    assert body["required_permission"] == "reviews:decide"
    body = problem(await bulk(admin_app, analyst["csrf_token"], {"ids": [a, b], "decision": "approve"}), 403,
                   "forbidden")  # fmt: skip
    assert body["required_permission"] == "reviews:decide"
    assert unaudited(await db_snapshot(admin_engine, tenant.id)) == unaudited(before)  # the refusals are audited

    # a viewer does not see the queue
    await sign_in(admin_app, tenant.slug, "viewer")
    body = problem(await admin_app.get("/admin/api/reviews"), 403, "forbidden")
    assert body["required_permission"] == "reviews:read"
    assert (await admin_app.get("/admin/reviews")).status_code == 403
    assert 'href="/admin/reviews"' not in (await admin_app.get("/admin/")).text
    await sign_in(admin_app, tenant.slug, "editor")
    dashboard = (await admin_app.get("/admin/")).text
    assert 'data-testid="nav-reviews"' in dashboard and 'data-testid="reviews-link"' in dashboard


async def test_an_editor_approves_and_rejects_and_deciding_twice_changes_nothing(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await review_tenant(admin_engine, "rd")
    other = await review_tenant(admin_engine, "ro")
    earlier = datetime.now(UTC) - timedelta(hours=3)
    a = await queued(admin_app, tenant, "u-a", "developer", "create-api-key", earlier)
    b = await queued(admin_app, tenant, "u-b", "developer", "create-api-key", None)
    foreign = await queued(admin_app, other, "u-x", "developer", "create-api-key", None)
    editor = await sign_in(admin_app, tenant.slug, "editor")
    csrf, reviewer = editor["csrf_token"], f"admin:{editor['user']['subject']}"

    # refusals first: none of them changes anything
    before = await db_snapshot(admin_engine, tenant.id)
    problem(await decide(admin_app, csrf, 999_999_999, {"decision": "approve"}), 404, "review-not-found")
    problem(await decide(admin_app, csrf, foreign, {"decision": "approve"}), 404, "review-not-found")  # RLS
    problem(await decide(admin_app, csrf, "abc", {"decision": "approve"}), 400, "validation-error")
    problem(await decide(admin_app, csrf, a, {"decision": "maybe"}), 400, "validation-error")
    problem(await decide(admin_app, csrf, a, {"decision": "right"}), 400, "validation-error")  # not a decision review
    problem(await decide(admin_app, csrf, a, {"decision": "approve", "note": "x" * 1001}), 400, "validation-error")
    problem(await decide(admin_app, csrf, a, {"decision": "approve", "extra": 1}), 400, "validation-error")
    problem(await decide(admin_app, csrf, a, {"decision": "approve", "better_path": "analyst-reports"}), 400,
            "validation-error")  # fmt: skip
    forged = await admin_app.post(f"/admin/api/reviews/{a}/decide", json={"decision": "approve"},
                                  headers={"X-CSRF-Token": "guess"})  # fmt: skip
    problem(forged, 403, "csrf-failed")
    assert unaudited(await db_snapshot(admin_engine, tenant.id)) == unaudited(before)  # the CSRF refusal is audited
    assert (await stored_review(admin_engine, other, foreign))["status"] == "pending"

    # approve: the step is completed at the time it happened, by the review
    approved = await decide(admin_app, csrf, a, {"decision": "approve", "note": "  contract signed  "})
    assert approved.status_code == 200, approved.text
    view = approved.json()
    assert (view["status"], view["note"], view["decided_by"]) == ("approved", "contract signed", reviewer)
    done = await completion(admin_engine, tenant, "u-a", "create-api-key")
    assert done is not None and done["occurred_at"] == earlier and done["source"] == f"review:{a}"
    assert done["completed_at"] > earlier + timedelta(hours=2)
    state = (await admin_app.get("/v1/onboarding/u-a", headers=tenant.headers)).json()
    [step] = [s for s in state["steps"] if s["id"] == "create-api-key"]
    assert step["completed"] is True and step["pending_review"] is False and step["review"]["status"] == "approved"

    # twice: 409, nothing changed
    before = await db_snapshot(admin_engine, tenant.id)
    again = problem(await decide(admin_app, csrf, a, {"decision": "reject"}), 409, "review-decided")
    assert "decided already" in again["detail"]
    assert await db_snapshot(admin_engine, tenant.id) == before

    # reject: the step stays open, with the note
    rejected = await decide(admin_app, csrf, b, {"decision": "reject", "note": "no contract on file"})
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert await completion(admin_engine, tenant, "u-b", "create-api-key") is None
    state = (await admin_app.get("/v1/onboarding/u-b", headers=tenant.headers)).json()
    [step] = [s for s in state["steps"] if s["id"] == "create-api-key"]
    assert step["completed"] is False and step["review"] == {"id": b, "status": "rejected", "reason": "review_step",
                                                              "note": "no contract on file"}  # fmt: skip

    # the audit log names the admin as the reviewer of each decision
    decided = [e for e in await review_audit(admin_engine, tenant) if e["payload"].get("review") == "decided"]
    assert [(e["actor"], e["subject"], e["payload"]["review_id"], e["payload"]["decision"], e["payload"]["note"])
            for e in decided] == [(reviewer, "u-a", a, "approve", "contract signed"),
                                  (reviewer, "u-b", b, "reject", "no contract on file")]  # fmt: skip

    # the page shows both as decided, with who and the note
    page = (await admin_app.get("/admin/reviews", params={"status": "decided"})).text
    assert f"Approved by {reviewer}" in page and "contract signed" in page and "no contract on file" in page
    assert 'data-testid="approve"' not in page


async def test_a_bulk_decision_is_all_or_nothing(admin_app: Client, admin_engine: AsyncEngine) -> None:
    tenant = await review_tenant(admin_engine, "rb")
    a = await queued(admin_app, tenant, "u-a", "developer", "create-api-key", None)
    b = await queued(admin_app, tenant, "u-b", "developer", "create-api-key", None)
    c = await queued(admin_app, tenant, "u-c", "developer", "create-api-key", None)
    editor = await sign_in(admin_app, tenant.slug, "editor")
    csrf = editor["csrf_token"]
    assert (await decide(admin_app, csrf, c, {"decision": "reject"})).status_code == 200

    before = await db_snapshot(admin_engine, tenant.id)
    refused = problem(await bulk(admin_app, csrf, {"ids": [a, b, c], "decision": "approve"}), 409, "review-decided")
    assert refused["review_id"] == c and "none of the 3 reviews was decided" in refused["detail"]
    refused = problem(await bulk(admin_app, csrf, {"ids": [a, 999_999_999], "decision": "approve"}), 404,
                      "review-not-found")  # fmt: skip
    assert refused["review_id"] == 999_999_999
    for body in ({"ids": [], "decision": "approve"}, {"ids": [a, a], "decision": "approve"},
                 {"ids": list(range(1, 102)), "decision": "approve"}, {"ids": [a], "decision": "right"},
                 {"ids": ["1"], "decision": "approve"}, {"ids": [0], "decision": "approve"},
                 {"ids": [2**63], "decision": "approve"}, {"decision": "approve"}):  # fmt: skip
        assert (await bulk(admin_app, csrf, body)).status_code == 400, body
    assert await db_snapshot(admin_engine, tenant.id) == before  # not a or b either
    for review_id in (a, b):
        assert (await stored_review(admin_engine, tenant, review_id))["status"] == "pending"

    done = await bulk(admin_app, csrf, {"ids": [a, b], "decision": "approve", "note": "batch of signed contracts"})
    assert done.status_code == 200, done.text
    assert [(r["id"], r["status"], r["note"]) for r in done.json()["decided"]] == [
        (a, "approved", "batch of signed contracts"), (b, "approved", "batch of signed contracts")]  # fmt: skip
    for user, review_id in (("u-a", a), ("u-b", b)):
        stored = await completion(admin_engine, tenant, user, "create-api-key")
        assert stored is not None and stored["source"] == f"review:{review_id}"
    assert await listed(admin_app) == []


async def test_a_decision_review_is_judged_wrong_with_a_better_path(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await review_tenant(admin_engine, "rm")
    await queued(admin_app, tenant, "u-m", "developer", "create-api-key", None)
    sampled = await decision_review(app_engine, tenant, "u-m", "developer-quickstart", datetime.now(UTC))
    editor = await sign_in(admin_app, tenant.slug, "editor")
    csrf = editor["csrf_token"]
    [found] = await listed(admin_app, kind="decision")
    assert (found["id"], found["reason"], found["step_id"]) == (sampled, "low_confidence", None)
    assert found["details"]["confidence"] == 0.41

    problem(await decide(admin_app, csrf, sampled, {"decision": "approve"}), 400, "validation-error")
    problem(await decide(admin_app, csrf, sampled, {"decision": "wrong", "better_path": "no-such-path"}), 400,
            "validation-error")  # fmt: skip
    problem(await decide(admin_app, csrf, sampled, {"decision": "wrong", "better_path": "Bad Path"}), 400,
            "validation-error")  # fmt: skip
    judged = await decide(admin_app, csrf, sampled, {"decision": "wrong", "better_path": "analyst-reports"})
    assert judged.status_code == 200, judged.text
    assert (judged.json()["status"], judged.json()["better_path"]) == ("wrong", "analyst-reports")
    stored = await stored_review(admin_engine, tenant, sampled)
    assert (stored["status"], stored["better_path"], stored["decided_by"]) == (
        "wrong", "analyst-reports", f"admin:{editor['user']['subject']}")  # fmt: skip
    html = (await admin_app.get("/admin/reviews", params={"kind": "decision", "status": "wrong"})).text
    assert f'data-review-id="{sampled}"' in html and "better path: <code>analyst-reports</code>" in html


async def test_the_pins_in_force_are_shown_and_an_editor_revokes_one(
    admin_app: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant: ReviewTenant = await review_tenant(admin_engine, "rp")
    onboarding: OnboardingService = admin_app.app.state.container.onboarding
    async with tenant_transaction(app_engine, TEST_OPERATOR.tenant(tenant.id)) as tx:
        pin = await onboarding.pin_segment(tx, [{"field": "persona", "op": "eq", "value": "developer"}],
                                           "analyst-reports", actor="operator:test-reviews", expires_at=None,
                                           force=True, reason="shadow trial")  # fmt: skip

    analyst = await sign_in(admin_app, tenant.slug, "analyst")
    pins = (await admin_app.get("/admin/api/overrides")).json()
    assert pins == [{"id": pin.id, "segment": [{"field": "persona", "op": "eq", "value": "developer"}],
                     "path_id": "analyst-reports", "forced": True, "reason": "shadow trial",
                     "created_by": "operator:test-reviews", "created_at": pin.created_at.isoformat(),
                     "expires_at": None}]  # fmt: skip
    page = (await admin_app.get("/admin/reviews")).text
    assert f'data-pin-id="{pin.id}"' in page and "shadow trial" in page and 'data-testid="revoke"' not in page
    refused = await admin_app.post(f"/admin/api/overrides/{pin.id}/revoke",
                                   headers={"X-CSRF-Token": analyst["csrf_token"]})  # fmt: skip
    assert problem(refused, 403, "forbidden")["required_permission"] == "overrides:manage"

    editor = await sign_in(admin_app, tenant.slug, "editor")
    headers = {"X-CSRF-Token": editor["csrf_token"]}
    assert 'data-testid="revoke"' in (await admin_app.get("/admin/reviews")).text
    problem(await admin_app.post("/admin/api/overrides/x1/revoke", headers=headers), 400, "validation-error")
    problem(await admin_app.post("/admin/api/overrides/999999999/revoke", headers=headers), 404, "override-not-found")
    revoked = await admin_app.post(f"/admin/api/overrides/{pin.id}/revoke", headers=headers)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_by"] == f"admin:{editor['user']['subject']}"
    problem(await admin_app.post(f"/admin/api/overrides/{pin.id}/revoke", headers=headers), 404, "override-not-found")
    assert (await admin_app.get("/admin/api/overrides")).json() == []
    assert 'data-testid="pins-empty"' in (await admin_app.get("/admin/reviews")).text
    entries = [e for e in await review_audit(admin_engine, tenant) if e["subject"] == f"override:{pin.id}"]
    assert [(e["actor"], e["payload"]["override"]) for e in entries] == [
        ("operator:test-reviews", "pinned"), (f"admin:{editor['user']['subject']}", "revoked")]  # fmt: skip
