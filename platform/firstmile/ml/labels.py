"""Reviewed model decisions as labels (docs/review.md): what ``firstmile models labels`` exports and ``models drift``
counts.

A sample of the path model's low-confidence decisions goes to the review queue (``FIRSTMILE_REVIEW_SAMPLE_RATE`` of
those below ``FIRSTMILE_REVIEW_CONFIDENCE_THRESHOLD``). A reviewer marks each ``right`` or ``wrong``, and may name
the better path. Each verdict is a label on the features the model decided on:

- ``right``: the chosen path is the target;
- ``wrong`` with a better path: the better path is the corrected target;
- ``wrong`` alone: the chosen path is known not to be the target, and no target is named.

Training (``firstmile models train``) runs on the simulator only; it does not read these labels. They are exported
for an operator's own training or evaluation, and counted in the drift report next to the live accuracy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from firstmile.onboarding import service as onboarding
from firstmile.tenancy import service as tenancy

Verdict = Literal["right", "wrong"]


class UnknownTenantError(LookupError):
    """No tenant has this slug."""


@dataclass(frozen=True, slots=True)
class Label:
    """One reviewed decision: the features the model saw, the path it chose, the reviewer's verdict."""

    features: Mapping[str, Any] | None
    chosen_path: str
    path_version: int
    confidence: float | None
    verdict: Verdict
    better_path: str | None
    decided_at: datetime

    @property
    def target(self) -> str | None:
        """The path that should have been chosen: the chosen one when right, the better one when a reviewer named
        it, else None (only known wrong)."""
        if self.verdict == "right":
            return self.chosen_path
        return self.better_path

    def training_row(self) -> tuple[Mapping[str, Any] | None, str, bool, str | None]:
        """(features, chosen path, whether it was right, the corrected target or None)."""
        return self.features, self.chosen_path, self.verdict == "right", self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "features": None if self.features is None else dict(self.features),
            "chosen_path": self.chosen_path,
            "path_version": self.path_version,
            "confidence": self.confidence,
            "verdict": self.verdict,
            "better_path": self.better_path,
            "target": self.target,
            "decided_at": self.decided_at.isoformat(),
        }


def labels_of(rows: Iterable[Mapping[str, Any]]) -> list[Label]:
    """Labels from :func:`firstmile.onboarding.service.decision_labels` rows (user ids are left out: a label is
    about the decision, not the person)."""
    found: list[Label] = []
    for row in rows:
        verdict = row["verdict"]
        if verdict not in ("right", "wrong"):
            continue
        features = row.get("features")
        confidence = row.get("confidence")
        found.append(
            Label(
                features=dict(features) if isinstance(features, Mapping) else None,
                chosen_path=str(row["path_id"]),
                path_version=int(row["path_version"]),
                confidence=float(confidence) if isinstance(confidence, int | float) else None,
                verdict=verdict,
                better_path=row.get("better_path"),
                decided_at=row["decided_at"],
            )
        )
    return found


def review_summary(labels: Iterable[Label]) -> dict[str, Any]:
    """How the reviewers judged the model: reviewed, right, wrong, ``reviewer_accuracy`` (right / reviewed: the
    model's accuracy in the reviewers' eyes, None without reviews) and the better paths they named, with counts."""
    listed = list(labels)
    right = sum(1 for label in listed if label.verdict == "right")
    wrong = len(listed) - right
    better = Counter(label.better_path for label in listed if label.verdict == "wrong" and label.better_path)
    return {
        "reviewed": len(listed),
        "right": right,
        "wrong": wrong,
        "reviewer_accuracy": round(right / (right + wrong), 4) if listed else None,
        "better_paths": dict(sorted(better.items())),
    }


async def read_labels(
    conn: AsyncConnection, model: str, window: timedelta, tenant_slug: str | None = None
) -> list[Label]:
    """The labels of ``model``'s decisions reviewed within ``window``, across tenants or of one (by slug);
    :class:`UnknownTenantError` for a slug no tenant has."""
    tenant_id = None
    if tenant_slug is not None:
        found = await tenancy.find_tenant(conn, tenant_slug)
        if found is None:
            raise UnknownTenantError(tenant_slug)
        tenant_id = found.id
    return labels_of(await onboarding.decision_labels(conn, model, window, tenant_id))


async def load_labels(admin_url: str, model: str, window: timedelta, tenant_slug: str | None = None) -> list[Label]:
    """:func:`read_labels` as the schema owner (``FIRSTMILE_DATABASE_ADMIN_URL``), on a connection of its own."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            return await read_labels(conn, model, window, tenant_slug)
    finally:
        await engine.dispose()
