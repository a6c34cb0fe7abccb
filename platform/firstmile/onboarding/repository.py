"""All SQL of the onboarding slice.

The hot paths are single data-modifying CTEs so a start or a completion costs
one round trip after the tenant is set: the user, their progress and the outbox
events are written together or not at all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.db import DriverStatement, TenantTx, json_text
from firstmile.kit.outbox import INSERT_FROM_EVENTS, OutboxEvent, partition_key
from firstmile.onboarding.models import onboarding_paths


@dataclass(frozen=True, slots=True)
class ProgressRow:
    path_key: str
    path_version: int
    status: str
    current_step: str | None
    decision: dict[str, Any]
    started_at: datetime
    activated_at: datetime | None
    completed_at: datetime | None
    completions: dict[str, datetime]
    reviews: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per step, its latest completion review: ``id``, ``status``, ``reason``, ``note`` (the review queue)."""


_START = DriverStatement.of(
    "WITH u AS ("
    " INSERT INTO end_users (tenant_id, user_id, traits, pii, email_index, created_at, updated_at)"
    " VALUES (:tid, :uid, :traits, :pii, :email_index, :now, :now)"
    " ON CONFLICT (tenant_id, user_id) DO NOTHING RETURNING 1"
    "), p AS ("
    " INSERT INTO user_progress (tenant_id, user_id, path_key, path_version, status, current_step,"
    "  decision, started_at, updated_at)"
    " VALUES (:tid, :uid, :path_key, :path_version, 'in_progress', :current_step, :decision, :now, :now)"
    " ON CONFLICT (tenant_id, user_id) DO NOTHING RETURNING 1"
    "), o AS (" + INSERT_FROM_EVENTS + " WHERE EXISTS (SELECT 1 FROM p) RETURNING 1"
    ") SELECT (SELECT count(*) FROM p), (SELECT count(*) FROM u)"
)
"""A start's one statement, sent on the driver connection (the request path's hottest; ``jsonb`` as text)."""

_GET = text(
    "SELECT p.path_key, p.path_version, p.status, p.current_step, p.decision, p.started_at,"
    " p.activated_at, p.completed_at,"
    " coalesce((SELECT jsonb_object_agg(c.step_id, c.completed_at) FROM step_completions c"
    "   WHERE c.tenant_id = p.tenant_id AND c.user_id = p.user_id), '{}'::jsonb),"
    " coalesce((SELECT jsonb_object_agg(r.step_id, jsonb_build_object("
    "    'id', r.id, 'status', r.status, 'reason', r.reason, 'note', r.note))"
    "   FROM (SELECT DISTINCT ON (step_id) step_id, id, status, reason, note FROM onboarding_reviews"
    "     WHERE tenant_id = p.tenant_id AND user_id = p.user_id AND step_id IS NOT NULL"
    "     ORDER BY step_id, id DESC) r), '{}'::jsonb)"
    " FROM user_progress p WHERE p.tenant_id = :tid AND p.user_id = :uid"
)
_GET_FOR_UPDATE = text(_GET.text + " FOR UPDATE OF p")

_COMPLETE = text(
    "WITH c AS ("
    " INSERT INTO step_completions (tenant_id, user_id, step_id, path_key, path_version,"
    "  completed_at, occurred_at, source)"
    " VALUES (:tid, :uid, :step_id, :path_key, :path_version, :now, :occurred_at, :source)"
    " ON CONFLICT (tenant_id, user_id, step_id) DO NOTHING RETURNING 1"
    "), u AS ("
    " UPDATE user_progress SET current_step = :current_step, status = :status,"
    "  activated_at = coalesce(activated_at, :activated_at), completed_at = :completed_at, updated_at = :now"
    " WHERE tenant_id = :tid AND user_id = :uid AND EXISTS (SELECT 1 FROM c) RETURNING 1"
    "), o AS (" + INSERT_FROM_EVENTS + " WHERE EXISTS (SELECT 1 FROM c) RETURNING 1"
    ") SELECT count(*) FROM c"
).bindparams(bindparam("events", type_=JSONB))


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def insert_start(
    tx: TenantTx,
    user_id: str,
    traits: dict[str, Any],
    path_key: str,
    path_version: int,
    current_step: str | None,
    decision: dict[str, Any],
    now: datetime,
    events: list[OutboxEvent],
    pii: str | None = None,
    email_index: bytes | None = None,
) -> bool:
    """Create the user, their progress and the outbox events; False when the user already had a path.

    ``traits`` must hold no personal data: that goes encrypted in ``pii``.
    """
    rows = await tx.fetch_driver(
        _START,
        {
            "tid": tx.tenant,
            "uid": user_id,
            "traits": json_text(traits),
            "pii": pii,
            "email_index": email_index,
            "path_key": path_key,
            "path_version": path_version,
            "current_step": current_step,
            "decision": json_text(decision),
            "now": now,
            "pkey": partition_key(tx.tenant, user_id),
            "events": json_text([e.as_json() for e in events]),
        },
    )
    return bool(rows[0][0])


async def get_progress(tx: TenantTx, user_id: str, *, for_update: bool = False) -> ProgressRow | None:
    row = (await tx.execute(_GET_FOR_UPDATE if for_update else _GET, {"tid": tx.tenant, "uid": user_id})).first()
    if row is None:
        return None
    completions = {k: _parse_ts(v) for k, v in row[8].items()}
    return ProgressRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], completions, dict(row[9]))


async def insert_completion(
    tx: TenantTx,
    user_id: str,
    step_id: str,
    path_key: str,
    path_version: int,
    now: datetime,
    occurred_at: datetime,
    source: str,
    current_step: str | None,
    status: str,
    activated_at: datetime | None,
    completed_at: datetime | None,
    events: list[OutboxEvent],
) -> bool:
    """Record one completion, update progress, write events; False if it was already recorded."""
    row = (
        await tx.execute(
            _COMPLETE,
            {
                "tid": tx.tenant,
                "uid": user_id,
                "step_id": step_id,
                "path_key": path_key,
                "path_version": path_version,
                "now": now,
                "occurred_at": occurred_at,
                "source": source,
                "current_step": current_step,
                "status": status,
                "activated_at": activated_at,
                "completed_at": completed_at,
                "pkey": partition_key(tx.tenant, user_id),
                "events": [e.as_json() for e in events],
            },
        )
    ).one()
    return bool(row[0])


# ---- path versions (written by `tenants apply` and the admin path editor, through firstmile.onboarding.paths) ----

_PATH_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('firstmile.paths:' || :tenant || ':' || :key, 0))")


async def lock_path(tx: TenantTx, key: str) -> None:
    """Serialise changes to one path of the tenant until ``tx`` ends (concurrent edits queue, in order)."""
    await tx.execute(_PATH_LOCK, {"tenant": str(tx.tenant), "key": key})


async def current_path_hashes(tx: TenantTx) -> dict[str, tuple[int, str]]:
    """``{path_key: (version, content_hash)}`` of the tenant's current paths."""
    rows = await tx.execute(
        select(onboarding_paths.c.path_key, onboarding_paths.c.version, onboarding_paths.c.content_hash).where(
            onboarding_paths.c.tenant_id == tx.tenant, onboarding_paths.c.is_current
        )
    )
    return {r[0]: (r[1], r[2]) for r in rows}


async def latest_versions(tx: TenantTx) -> dict[str, int]:
    rows = await tx.execute(
        select(onboarding_paths.c.path_key, func.max(onboarding_paths.c.version))
        .where(onboarding_paths.c.tenant_id == tx.tenant)
        .group_by(onboarding_paths.c.path_key)
    )
    return {r[0]: r[1] for r in rows}


async def insert_path_version(
    tx: TenantTx, key: str, version: int, definition: dict[str, Any], content_hash: str
) -> None:
    await tx.execute(
        insert(onboarding_paths).values(
            tenant_id=tx.tenant,
            path_key=key,
            version=version,
            definition=definition,
            content_hash=content_hash,
            is_current=True,
        )
    )


async def retire_path(tx: TenantTx, key: str) -> None:
    await tx.execute(
        update(onboarding_paths)
        .where(
            onboarding_paths.c.tenant_id == tx.tenant, onboarding_paths.c.path_key == key, onboarding_paths.c.is_current
        )
        .values(is_current=False)
    )


async def current_path_definitions(tx: TenantTx) -> list[tuple[str, int, dict[str, Any]]]:
    """``(path_key, version, definition)`` of the tenant's current paths."""
    rows = await tx.execute(
        select(onboarding_paths.c.path_key, onboarding_paths.c.version, onboarding_paths.c.definition).where(
            onboarding_paths.c.tenant_id == tx.tenant, onboarding_paths.c.is_current
        )
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def path_versions(tx: TenantTx, key: str) -> list[tuple[int, bool, datetime, str]]:
    """Every stored version of path ``key``, newest first: (version, is current, created at, content hash)."""
    rows = await tx.execute(
        select(onboarding_paths.c.version, onboarding_paths.c.is_current, onboarding_paths.c.created_at,
               onboarding_paths.c.content_hash)
        .where(onboarding_paths.c.tenant_id == tx.tenant, onboarding_paths.c.path_key == key)
        .order_by(onboarding_paths.c.version.desc())
    )  # fmt: skip
    return [(int(r[0]), bool(r[1]), r[2], str(r[3])) for r in rows]


async def path_definition(tx: TenantTx, key: str, version: int) -> dict[str, Any]:
    """One stored path version's definition (versions are immutable)."""
    row = (
        await tx.execute(
            select(onboarding_paths.c.definition).where(
                onboarding_paths.c.tenant_id == tx.tenant,
                onboarding_paths.c.path_key == key,
                onboarding_paths.c.version == version,
            )
        )
    ).one()
    definition: dict[str, Any] = row[0]
    return definition


# ---- what the onboarding slice holds about one end user (export and erasure, for the privacy slice) ----

_USER = text("SELECT traits, pii, created_at, updated_at FROM end_users WHERE tenant_id = :t AND user_id = :u")
_PROGRESS = text(
    "SELECT path_key, path_version, status, current_step, decision, started_at, activated_at, completed_at"
    " FROM user_progress WHERE tenant_id = :t AND user_id = :u"
)
_COMPLETIONS = text(
    "SELECT step_id, path_key, path_version, completed_at, occurred_at, source FROM step_completions"
    " WHERE tenant_id = :t AND user_id = :u ORDER BY completed_at"
)
_COUNT = text(
    "SELECT (SELECT count(*) FROM end_users WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM user_progress WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM step_completions WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM onboarding_reviews WHERE tenant_id = :t AND user_id = :u),"
    " (SELECT count(*) FROM onboarding_overrides WHERE tenant_id = :t AND user_id = :u)"
)
# progress, completions and reviews cascade; a one-user override names the user without a foreign key
_DELETE = text(
    "WITH o AS (DELETE FROM onboarding_overrides WHERE tenant_id = :t AND user_id = :u RETURNING 1)"
    " DELETE FROM end_users WHERE tenant_id = :t AND user_id = :u"
)

_BY_EMAIL = text("SELECT user_id FROM end_users WHERE tenant_id = :t AND email_index = :i ORDER BY user_id")


@dataclass(frozen=True, slots=True)
class HeldUser:
    """The onboarding slice's rows about one end user, as stored (personal data still sealed)."""

    profile: tuple[Any, ...] | None  # traits, pii (ciphertext), created_at, updated_at
    progress: tuple[Any, ...] | None
    completions: list[tuple[Any, ...]]
    reviews: list[ReviewRow] = field(default_factory=list)
    overrides: list[OverrideRow] = field(default_factory=list)


_TRAITS = text("SELECT traits FROM end_users WHERE tenant_id = :t AND user_id = :u")


async def user_traits(tx: TenantTx, user_id: str) -> dict[str, Any] | None:
    row = (await tx.execute(_TRAITS, {"t": tx.tenant, "u": user_id})).first()
    return None if row is None else dict(row[0] or {})


async def held_user(tx: TenantTx, user_id: str) -> HeldUser:
    params = {"t": tx.tenant, "u": user_id}
    row = (await tx.execute(_USER, params)).first()
    progress = (await tx.execute(_PROGRESS, params)).first()
    completions = (await tx.execute(_COMPLETIONS, params)).all()
    reviews = [_review(r) for r in await tx.execute(_REVIEWS_OF, params)]
    overrides = [_override(r) for r in await tx.execute(_OVERRIDES_OF, params)]
    return HeldUser(
        None if row is None else tuple(row),
        None if progress is None else tuple(progress),
        [tuple(c) for c in completions],
        reviews,
        overrides,
    )


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    """Delete the user's rows (progress, completions and reviews cascade; overrides of the user too); how many of
    each there were."""
    counts = (await tx.execute(_COUNT, {"t": tx.tenant, "u": user_id})).one()
    if any(counts):
        await tx.execute(_DELETE, {"t": tx.tenant, "u": user_id})
    return {
        "end_users": int(counts[0]), "user_progress": int(counts[1]), "step_completions": int(counts[2]),
        "onboarding_reviews": int(counts[3]), "onboarding_overrides": int(counts[4]),
    }  # fmt: skip


async def users_by_email_index(tx: TenantTx, index: bytes) -> list[str]:
    return [r[0] for r in await tx.execute(_BY_EMAIL, {"t": tx.tenant, "i": index})]


_ON_STEP_SINCE = text(
    "SELECT user_id FROM user_progress WHERE tenant_id = :t AND path_key = :path AND status = 'in_progress'"
    " AND current_step = :step AND updated_at <= :before AND user_id > :after ORDER BY user_id LIMIT :limit"
)
_STARTED_BEFORE = text(
    "SELECT user_id FROM user_progress WHERE tenant_id = :t AND path_key = :path AND status = 'in_progress'"
    " AND started_at <= :before AND user_id > :after ORDER BY user_id LIMIT :limit"
)


async def users_on_step_since(
    tx: TenantTx, path_key: str, step_id: str, before: datetime, after: str, limit: int
) -> list[str]:
    """In-progress users of ``path_key`` on ``step_id`` with no progress since ``before``, by id after ``after``."""
    params = {"t": tx.tenant, "path": path_key, "step": step_id, "before": before, "after": after, "limit": limit}
    return [r[0] for r in await tx.execute(_ON_STEP_SINCE, params)]


async def users_started_before(tx: TenantTx, path_key: str, before: datetime, after: str, limit: int) -> list[str]:
    """In-progress users of ``path_key`` who started before ``before``; by user id, after ``after``."""
    params = {"t": tx.tenant, "path": path_key, "before": before, "after": after, "limit": limit}
    return [r[0] for r in await tx.execute(_STARTED_BEFORE, params)]


# ---- operator reads across tenants (``firstmile models drift``, as the schema owner) ----

_MODEL_FEATURES = text(
    "SELECT p.decision -> 'features' FROM user_progress p"
    " WHERE p.decision ->> 'selected_by' = 'model' AND p.decision ->> 'model' = :model"
    "  AND p.started_at >= now() - make_interval(secs => :window)"
    "  AND (CAST(:tenant AS uuid) IS NULL OR p.tenant_id = :tenant)"
)
_MODEL_OUTCOMES = text(
    "SELECT (p.decision ->> 'confidence')::float8,"
    "  p.activated_at IS NOT NULL AND p.activated_at <= p.started_at + make_interval(secs => :outcome)"
    " FROM user_progress p"
    " WHERE p.decision ->> 'selected_by' = 'model' AND p.decision ->> 'model' = :model"
    "  AND p.decision ? 'confidence'"
    "  AND p.started_at <= now() - make_interval(secs => :outcome)"
    "  AND (CAST(:tenant AS uuid) IS NULL OR p.tenant_id = :tenant)"
)


async def recent_model_features(
    conn: AsyncConnection, model: str, window_s: float, tenant: uuid.UUID | None
) -> list[dict[str, Any]]:
    params = {"model": model, "window": window_s, "tenant": tenant}
    return [dict(r[0]) for r in await conn.execute(_MODEL_FEATURES, params) if isinstance(r[0], dict)]


async def model_outcomes(
    conn: AsyncConnection, model: str, outcome_s: float, tenant: uuid.UUID | None
) -> list[tuple[float, bool]]:
    params = {"model": model, "outcome": outcome_s, "tenant": tenant}
    return [(float(r[0]), bool(r[1])) for r in await conn.execute(_MODEL_OUTCOMES, params) if r[0] is not None]


# One tenant's model decisions for the drift check of its own model (firstmile.ml.drift): those of the recent window
# (their features) and those of one version at least the horizon old (its predicted activation, the outcome).
_TENANT_MODEL_DECISIONS = text(
    "SELECT p.decision -> 'features', (p.decision ->> 'confidence')::float8,"
    "  p.started_at >= now() - make_interval(secs => :window),"
    "  p.decision ->> 'model_version' = :version AND p.started_at <= now() - make_interval(secs => :horizon),"
    "  p.activated_at IS NOT NULL AND p.activated_at <= p.started_at + make_interval(secs => :horizon)"
    " FROM user_progress p"
    " WHERE p.tenant_id = :tenant AND p.decision ->> 'selected_by' = 'model' AND p.decision ->> 'model' = :model"
    "  AND (p.started_at >= now() - make_interval(secs => :window)"
    "   OR (p.decision ->> 'model_version' = :version AND p.started_at <= now() - make_interval(secs => :horizon)))"
)
_LATEST_MODEL = text(
    "SELECT p.decision ->> 'model' FROM user_progress p"
    " WHERE p.tenant_id = :tenant AND p.decision ->> 'selected_by' = 'model'"
    "  AND p.started_at >= now() - make_interval(secs => :window)"
    " ORDER BY p.started_at DESC LIMIT 1"
)


async def tenant_model_decisions(
    conn: AsyncConnection, tenant: uuid.UUID, model: str, version: str, window_s: float, horizon_s: float
) -> tuple[list[dict[str, Any]], list[tuple[float, bool]]]:
    params = {"tenant": tenant, "model": model, "version": version, "window": window_s, "horizon": horizon_s}
    recent: list[dict[str, Any]] = []
    outcomes: list[tuple[float, bool]] = []
    for features, confidence, is_recent, matured, activated in await conn.execute(_TENANT_MODEL_DECISIONS, params):
        if is_recent and isinstance(features, dict):
            recent.append(dict(features))
        if matured and confidence is not None:
            outcomes.append((float(confidence), bool(activated)))
    return recent, outcomes


async def latest_model(conn: AsyncConnection, tenant: uuid.UUID, window_s: float) -> str | None:
    row = (await conn.execute(_LATEST_MODEL, {"tenant": tenant, "window": window_s})).first()
    return None if row is None or row[0] is None else str(row[0])


# ---- the review queue and path overrides (docs/review.md) ----

REVIEW_COLUMNS = (
    "id, kind, reason, user_id, path_key, path_version, step_id, source, occurred_at, details, status,"
    " better_path, note, decided_by, decided_at, created_at"
)


@dataclass(frozen=True, slots=True)
class ReviewRow:
    id: int
    kind: str
    reason: str
    user_id: str
    path_key: str
    path_version: int
    step_id: str | None
    source: str
    occurred_at: datetime
    details: dict[str, Any]
    status: str
    better_path: str | None
    note: str | None
    decided_by: str | None
    decided_at: datetime | None
    created_at: datetime


_INSERT_REVIEW = text(
    "INSERT INTO onboarding_reviews (tenant_id, kind, reason, user_id, path_key, path_version, step_id, source,"
    " occurred_at, details, created_at)"
    " VALUES (:t, :kind, :reason, :uid, :path_key, :path_version, :step_id, :source, :occurred_at, :details, :now)"
    " ON CONFLICT (tenant_id, user_id, step_id) WHERE status = 'pending' AND step_id IS NOT NULL DO NOTHING"
    " RETURNING " + REVIEW_COLUMNS
).bindparams(bindparam("details", type_=JSONB))
_PENDING_OF_STEP = text(
    "SELECT " + REVIEW_COLUMNS + " FROM onboarding_reviews"
    " WHERE tenant_id = :t AND user_id = :uid AND step_id = :step_id AND status = 'pending'"
)
_REVIEW = text("SELECT " + REVIEW_COLUMNS + " FROM onboarding_reviews WHERE tenant_id = :t AND id = :id")
_REVIEW_FOR_UPDATE = text(_REVIEW.text + " FOR UPDATE")
_DECIDE_REVIEW = text(
    "UPDATE onboarding_reviews SET status = :status, note = :note, better_path = :better_path,"
    " decided_by = :by, decided_at = :now WHERE tenant_id = :t AND id = :id AND status = 'pending'"
    " RETURNING " + REVIEW_COLUMNS
)


def _review(row: Any) -> ReviewRow:
    values: list[Any] = list(row)
    values[9] = dict(values[9])
    return ReviewRow(*values)


async def insert_review(
    tx: TenantTx,
    *,
    kind: str,
    reason: str,
    user_id: str,
    path_key: str,
    path_version: int,
    step_id: str | None,
    source: str,
    occurred_at: datetime,
    details: dict[str, Any],
    now: datetime,
) -> tuple[ReviewRow, bool]:
    """Queue a review; with a pending one for the same user and step already, that one and False."""
    params = {
        "t": tx.tenant, "kind": kind, "reason": reason, "uid": user_id, "path_key": path_key,
        "path_version": path_version, "step_id": step_id, "source": source, "occurred_at": occurred_at,
        "details": details, "now": now,
    }  # fmt: skip
    row = (await tx.execute(_INSERT_REVIEW, params)).first()
    if row is not None:
        return _review(row), True
    existing = (await tx.execute(_PENDING_OF_STEP, {"t": tx.tenant, "uid": user_id, "step_id": step_id})).one()
    return _review(existing), False


async def get_review(tx: TenantTx, review_id: int, *, for_update: bool = False) -> ReviewRow | None:
    row = (await tx.execute(_REVIEW_FOR_UPDATE if for_update else _REVIEW, {"t": tx.tenant, "id": review_id})).first()
    return None if row is None else _review(row)


async def decide_review(
    tx: TenantTx, review_id: int, status: str, note: str | None, better_path: str | None, by: str, now: datetime
) -> ReviewRow | None:
    """Record the decision of a pending review; None when it is no longer pending."""
    params = {"t": tx.tenant, "id": review_id, "status": status, "note": note, "better_path": better_path,
              "by": by, "now": now}  # fmt: skip
    row = (await tx.execute(_DECIDE_REVIEW, params)).first()
    return None if row is None else _review(row)


async def list_reviews(
    tx: TenantTx,
    *,
    status: str | None,
    kind: str | None,
    path_key: str | None,
    step_id: str | None,
    created_before: datetime | None,
    before_id: int | None,
    limit: int,
) -> list[ReviewRow]:
    """Reviews newest first (by id), filtered; ``before_id`` pages."""
    query = text(
        "SELECT " + REVIEW_COLUMNS + " FROM onboarding_reviews WHERE tenant_id = :t"
        " AND (CAST(:status AS text) IS NULL OR status = :status)"
        " AND (CAST(:kind AS text) IS NULL OR kind = :kind)"
        " AND (CAST(:path AS text) IS NULL OR path_key = :path)"
        " AND (CAST(:step AS text) IS NULL OR step_id = :step)"
        " AND (CAST(:created_before AS timestamptz) IS NULL OR created_at <= :created_before)"
        " AND (CAST(:before_id AS bigint) IS NULL OR id < :before_id)"
        " ORDER BY id DESC LIMIT :limit"
    )
    params = {"t": tx.tenant, "status": status, "kind": kind, "path": path_key, "step": step_id,
              "created_before": created_before, "before_id": before_id, "limit": limit}  # fmt: skip
    return [_review(r) for r in await tx.execute(query, params)]


_QUEUE_SUMMARY = text(
    "SELECT kind, count(*), min(created_at) FROM onboarding_reviews WHERE tenant_id = :t AND status = 'pending'"
    " GROUP BY kind"
)


async def queue_summary(tx: TenantTx) -> dict[str, tuple[int, datetime]]:
    """Per kind, the pending reviews and the creation time of the oldest."""
    return {r[0]: (int(r[1]), r[2]) for r in await tx.execute(_QUEUE_SUMMARY, {"t": tx.tenant})}


async def review_queues(conn: AsyncConnection) -> list[tuple[uuid.UUID, str, int, datetime]]:
    """Across tenants (``firstmile_review_queues``): tenant, kind, pending reviews, the oldest's creation time."""
    rows = await conn.execute(text("SELECT tenant_id, kind, pending, oldest FROM firstmile_review_queues()"))
    return [(r[0], r[1], int(r[2]), r[3]) for r in rows]


_DECISION_LABELS = text(
    "SELECT r.user_id, r.path_key, r.path_version, r.status, r.better_path, r.details, r.decided_at"
    " FROM onboarding_reviews r"
    " WHERE r.kind = 'decision' AND r.status IN ('right', 'wrong') AND r.details ->> 'model' = :model"
    "  AND r.decided_at >= now() - make_interval(secs => :window)"
    "  AND (CAST(:tenant AS uuid) IS NULL OR r.tenant_id = :tenant)"
    " ORDER BY r.decided_at"
)


async def decision_labels(
    conn: AsyncConnection, model: str, window_s: float, tenant: uuid.UUID | None
) -> list[dict[str, Any]]:
    """Reviewed decisions of ``model`` (operator read): the features, the path chosen, and the reviewer's verdict."""
    rows = await conn.execute(_DECISION_LABELS, {"model": model, "window": window_s, "tenant": tenant})
    return [
        {
            "user_id": r[0], "path_id": r[1], "path_version": r[2], "verdict": r[3], "better_path": r[4],
            "features": dict(r[5]).get("features"), "confidence": dict(r[5]).get("confidence"), "decided_at": r[6],
        }
        for r in rows
    ]  # fmt: skip


# overrides

OVERRIDE_COLUMNS = (
    "id, user_id, segment, path_key, forced, reason, created_by, created_at, expires_at, revoked_at, revoked_by"
)


@dataclass(frozen=True, slots=True)
class OverrideRow:
    id: int
    user_id: str | None
    segment: list[dict[str, Any]] | None
    path_key: str
    forced: bool
    reason: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None


_INSERT_OVERRIDE = text(
    "INSERT INTO onboarding_overrides (tenant_id, user_id, segment, path_key, forced, reason, created_by,"
    " created_at, expires_at) VALUES (:t, :uid, :segment, :path_key, :forced, :reason, :by, :now, :expires_at)"
    " RETURNING " + OVERRIDE_COLUMNS
).bindparams(bindparam("segment", type_=JSONB(none_as_null=True)))  # None: SQL NULL (a user override)
_ACTIVE_PINS = text(
    "SELECT " + OVERRIDE_COLUMNS + " FROM onboarding_overrides WHERE tenant_id = :t AND segment IS NOT NULL"
    " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now) ORDER BY id DESC"
)
_OVERRIDES = text(
    "SELECT " + OVERRIDE_COLUMNS + " FROM onboarding_overrides WHERE tenant_id = :t"
    " AND (CAST(:active AS boolean) IS NOT TRUE OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now)))"
    " ORDER BY id DESC LIMIT :limit"
)
_REVOKE_OVERRIDE = text(
    "UPDATE onboarding_overrides SET revoked_at = :now, revoked_by = :by"
    " WHERE tenant_id = :t AND id = :id AND revoked_at IS NULL RETURNING " + OVERRIDE_COLUMNS
)


def _override(row: Any) -> OverrideRow:
    return OverrideRow(*row)


async def insert_override(
    tx: TenantTx,
    *,
    user_id: str | None,
    segment: list[dict[str, Any]] | None,
    path_key: str,
    forced: bool,
    reason: str | None,
    by: str,
    now: datetime,
    expires_at: datetime | None,
) -> OverrideRow:
    params = {"t": tx.tenant, "uid": user_id, "segment": segment, "path_key": path_key, "forced": forced,
              "reason": reason, "by": by, "now": now, "expires_at": expires_at}  # fmt: skip
    return _override((await tx.execute(_INSERT_OVERRIDE, params)).one())


async def active_pins(tx: TenantTx, now: datetime) -> list[OverrideRow]:
    """Segment pins in force at ``now``, newest first."""
    return [_override(r) for r in await tx.execute(_ACTIVE_PINS, {"t": tx.tenant, "now": now})]


async def list_overrides(tx: TenantTx, *, active: bool, now: datetime, limit: int) -> list[OverrideRow]:
    params = {"t": tx.tenant, "active": active, "now": now, "limit": limit}
    return [_override(r) for r in await tx.execute(_OVERRIDES, params)]


async def revoke_override(tx: TenantTx, override_id: int, by: str, now: datetime) -> OverrideRow | None:
    row = (await tx.execute(_REVOKE_OVERRIDE, {"t": tx.tenant, "id": override_id, "by": by, "now": now})).first()
    return None if row is None else _override(row)


_SWITCH_PATH = text(
    "WITH d AS ("
    " DELETE FROM step_completions WHERE tenant_id = :t AND user_id = :uid AND NOT (step_id = ANY(:keep))"
    " RETURNING 1"
    "), u AS ("
    " UPDATE user_progress SET path_key = :path_key, path_version = :path_version, decision = :decision,"
    "  current_step = :current_step, status = :status, completed_at = :completed_at, updated_at = :now"
    " WHERE tenant_id = :t AND user_id = :uid RETURNING 1"
    "), o AS (" + INSERT_FROM_EVENTS + " RETURNING 1"
    ") SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM u)"
).bindparams(bindparam("decision", type_=JSONB), bindparam("events", type_=JSONB))


async def switch_path(
    tx: TenantTx,
    user_id: str,
    *,
    path_key: str,
    path_version: int,
    keep: list[str],
    decision: dict[str, Any],
    current_step: str | None,
    status: str,
    completed_at: datetime | None,
    now: datetime,
    events: list[OutboxEvent],
) -> int:
    """Move a started user to another path version, keeping the completions of ``keep``; how many were dropped."""
    params = {
        "t": tx.tenant, "tid": tx.tenant, "uid": user_id, "keep": keep, "path_key": path_key,
        "path_version": path_version, "decision": decision, "current_step": current_step, "status": status,
        "completed_at": completed_at, "now": now, "pkey": partition_key(tx.tenant, user_id),
        "events": [e.as_json() for e in events],
    }  # fmt: skip
    row = (await tx.execute(_SWITCH_PATH, params)).one()
    return int(row[0])


# ---- a tenant's logged decisions (``firstmile models train --tenant``, operator read as the schema owner) ----

_LOGGED_DECISIONS = text(
    "SELECT p.path_key, p.path_version, p.decision -> 'features', (p.decision ->> 'propensity')::float8, e.traits,"
    "  p.activated_at IS NOT NULL AND p.activated_at <= p.started_at + make_interval(secs => :horizon)"
    " FROM user_progress p JOIN end_users e ON e.tenant_id = p.tenant_id AND e.user_id = p.user_id"
    " WHERE p.tenant_id = :tenant AND jsonb_typeof(p.decision -> 'propensity') = 'number'"
    "  AND p.started_at <= now() - make_interval(secs => :horizon)"
    "  AND p.started_at >= now() - make_interval(secs => :window)"
    " ORDER BY p.started_at, p.user_id"
)


@dataclass(frozen=True, slots=True)
class LoggedDecisionRow:
    """One logged path decision old enough for its outcome: no user id, no personal data (plain traits only)."""

    path_key: str
    path_version: int
    features: dict[str, Any] | None  # what the model saw, when a model was asked
    propensity: float
    traits: dict[str, Any]
    activated: bool  # within the horizon


async def logged_decisions(
    conn: AsyncConnection, tenant: uuid.UUID, horizon_s: float, window_s: float
) -> list[LoggedDecisionRow]:
    rows = await conn.execute(_LOGGED_DECISIONS, {"tenant": tenant, "horizon": horizon_s, "window": window_s})
    return [
        LoggedDecisionRow(
            r[0], int(r[1]), dict(r[2]) if isinstance(r[2], dict) else None, float(r[3]),
            dict(r[4]) if isinstance(r[4], dict) else {}, bool(r[5]),
        )
        for r in rows
    ]  # fmt: skip


_REVIEWS_OF = text(
    "SELECT " + REVIEW_COLUMNS + " FROM onboarding_reviews WHERE tenant_id = :t AND user_id = :u ORDER BY id"
)
_OVERRIDES_OF = text(
    "SELECT " + OVERRIDE_COLUMNS + " FROM onboarding_overrides WHERE tenant_id = :t AND user_id = :u ORDER BY id"
)
