"""Review-queue test data (docs/review.md): a tenant whose manifest asks a person to confirm some steps, reviews
queued through the public onboarding API as a tenant's app would queue them, and the database's own view of what a
decision changed."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.onboarding import review
from firstmile.onboarding.catalog import CatalogCache
from firstmile.tenancy.cli import create_key
from tests.conftest import PEPPER, REGION
from tests.factories import demo_document, manifest_for

REVIEWED = {("developer-quickstart", "create-api-key"), ("developer-quickstart", "invite-teammate"),
            ("analyst-reports", "connect-data-source")}  # fmt: skip
"""The steps a person confirms in :func:`review_document` (``validation: review``)."""
TEST_OPERATOR = OperatorContext("operator:test-reviews")


def review_document() -> dict[str, Any]:
    """The demo manifest with :data:`REVIEWED` asking for a review."""
    doc = demo_document()
    for path in doc["paths"]:
        for step in path["steps"]:
            if (path["id"], step["id"]) in REVIEWED:
                step["validation"] = "review"
    return doc


@dataclass(frozen=True)
class ReviewTenant:
    slug: str
    id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def review_tenant(admin: AsyncEngine, prefix: str) -> ReviewTenant:
    """A new tenant of :func:`review_document` (``<prefix>-<8 hex>``) and an onboarding key."""
    slug = f"{prefix}-{secrets.token_hex(4)}"
    applied = await apply_manifest(admin, manifest_for(slug, REGION, review_document()))
    created = await create_key(admin, PEPPER, slug, ["onboarding:write", "onboarding:read"], "reviews")
    return ReviewTenant(slug, applied.tenant_id, created.key)


async def queued(
    api: httpx.AsyncClient, tenant: ReviewTenant, user: str, persona: str, step: str, occurred_at: datetime | None
) -> int:
    """Start ``user`` (``persona``) and complete ``step`` through the onboarding API: the completion waits for a
    review (202, the step open and ``pending_review``); the review's id."""
    started = await api.post("/v1/onboarding/start", headers=tenant.headers,
                             json={"user_id": user, "traits": {"persona": persona}})  # fmt: skip
    assert started.status_code == 201, started.text
    body = {} if occurred_at is None else {"occurred_at": occurred_at.isoformat()}
    done = await api.post(f"/v1/onboarding/{user}/steps/{step}/complete", headers=tenant.headers, json=body)
    assert done.status_code == 202, done.text
    [state] = [s for s in done.json()["steps"] if s["id"] == step]
    assert state["pending_review"] is True and state["completed"] is False, state
    review_id: int = state["review"]["id"]
    return review_id


async def decision_review(app: AsyncEngine, tenant: ReviewTenant, user: str, path_key: str, now: datetime) -> int:
    """A sampled low-confidence model decision of ``user`` on ``path_key`` queued for review, as the planner queues
    one (``review.queue``); its id."""
    async with tenant_transaction(app, TEST_OPERATOR.tenant(tenant.id)) as tx:
        catalog = await CatalogCache().reload(tx)
        [path] = [p for p in catalog.current if p.key == path_key]
        row = await review.queue(
            tx, kind="decision", reason="low_confidence", user_id=user, path=path, step_id=None, source="path_planner",
            occurred_at=now, details={"model": "path_classifier", "confidence": 0.41, "features": {"persona": 1}},
            now=now,
        )  # fmt: skip
        return row.id


async def completion(admin: AsyncEngine, tenant: ReviewTenant, user: str, step: str) -> dict[str, Any] | None:
    """The stored completion of ``step`` by ``user`` (``occurred_at``, ``completed_at``, ``source``), or None."""
    query = text("SELECT occurred_at, completed_at, source FROM step_completions"
                 " WHERE tenant_id = :t AND user_id = :u AND step_id = :s")  # fmt: skip
    async with admin.connect() as conn:
        row = (await conn.execute(query, {"t": tenant.id, "u": user, "s": step})).first()
    return None if row is None else {"occurred_at": row[0], "completed_at": row[1], "source": row[2]}


async def stored_review(admin: AsyncEngine, tenant: ReviewTenant, review_id: int) -> dict[str, Any]:
    """A review's row as stored (status, note, decided_by, occurred_at, better_path)."""
    query = text("SELECT status, note, decided_by, occurred_at, better_path, created_at FROM onboarding_reviews"
                 " WHERE tenant_id = :t AND id = :id")  # fmt: skip
    async with admin.connect() as conn:
        row = (await conn.execute(query, {"t": tenant.id, "id": review_id})).one()
    return {"status": row[0], "note": row[1], "decided_by": row[2], "occurred_at": row[3], "better_path": row[4],
            "created_at": row[5]}  # fmt: skip


async def review_audit(admin: AsyncEngine, tenant: ReviewTenant) -> list[dict[str, Any]]:
    """The tenant's ``review`` audit entries, queued or sequenced, oldest first."""
    async with admin.connect() as conn:
        rows = await conn.execute(
            text("SELECT actor, subject, payload::text, created_at FROM audit_queue WHERE tenant_id = :t"
                 " AND kind = 'review' UNION ALL SELECT actor, subject, payload::text, created_at FROM audit_entries"
                 " WHERE tenant_id = :t AND kind = 'review' ORDER BY 4"),
            {"t": tenant.id},
        )  # fmt: skip
        return [{"actor": r[0], "subject": r[1], "payload": json.loads(r[2])} for r in rows]


async def age_review(admin: AsyncEngine, tenant: ReviewTenant, review_id: int, hours: float) -> None:
    """Make a review look ``hours`` older (as if it had waited that long)."""
    async with admin.begin() as conn:
        await conn.execute(
            text("UPDATE onboarding_reviews SET created_at = created_at - make_interval(secs => :s)"
                 " WHERE tenant_id = :t AND id = :id"),
            {"s": hours * 3600, "t": tenant.id, "id": review_id},
        )  # fmt: skip
