"""The review queue's scheduled check: its SLA metrics, and a notification to reviewers when it grows too long.

:class:`ReviewQueueWatch` runs on a schedule under ``worker:review-queue`` (the scheduler process, every
``FIRSTMILE_REVIEW_QUEUE_CHECK_SECONDS``; docs/review.md). Each run:

1. reads every tenant's pending reviews through the SECURITY DEFINER function ``firstmile_review_queues``
   (:func:`firstmile.onboarding.review.review_queues`) and sets ``firstmile_review_queue_length{kind}`` (the sum
   over tenants) and ``firstmile_review_queue_oldest_seconds{kind}`` (the oldest pending item's age, the maximum
   over tenants; 0 for a kind with none);
2. for each tenant with more pending reviews than ``FIRSTMILE_REVIEW_QUEUE_ALERT_THRESHOLD`` and no open crossing,
   stores a crossing in ``review_queue_alerts`` (audited) and notifies the tenant's reviewers through the targets of
   its manifest's ``alerts:`` section, the e-mail channel and the signed webhook of the drop-off alerts
   (:class:`~firstmile.analytics.alerting.Notifier`): **stored first, marked delivered after**, so a failed delivery
   is retried at the next run while the crossing is open;
3. for each tenant with an open crossing (``firstmile_review_queue_alerted``) whose queue is back at or below the
   threshold, clears it (audited): the next crossing notifies again.

The crossing is durable, one open per tenant (a unique index), so a restarted or second scheduler does not notify
twice for one crossing. The design's rule holds: when the check fails it logs and skips. The cross-tenant read
failing raises (the supervisor logs it, retries with backoff and names the task in readiness while it keeps
failing); one tenant's failure is logged with its traceback and the other tenants are checked.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics import repository as repo
from firstmile.analytics.alerting import AlertMailer, Notice, Notifier, alerts_spec, targets
from firstmile.analytics.repository import QueueCrossing
from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding import review
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import AlertsSpec

log = logging.getLogger("firstmile.analytics.review_queue")

WORKER = OperatorContext("worker:review-queue")
NOTICE_TYPE = "review_queue.threshold_crossed"
"""The webhook payload's ``type``."""

Queues = dict[str, tuple[int, datetime]]
"""Per kind: pending reviews, and when the oldest was created."""


def review_queue_url(public_url: str) -> str:
    return f"{public_url.rstrip('/')}/admin/reviews"


def _age(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m"


def email_subject(crossing: QueueCrossing, tenant_name: str) -> str:
    return f"[Firstmile] {tenant_name}: {crossing.pending} reviews waiting (threshold {crossing.threshold})"


def email_body(crossing: QueueCrossing, tenant_name: str, url: str) -> str:
    """The notification e-mail's text (plain text, counts only: no user ids, no personal data)."""
    kinds = ", ".join(f"{kind} {crossing.by_kind[kind]}" for kind in review.KINDS if crossing.by_kind.get(kind))
    oldest = ""
    if crossing.oldest_at is not None:
        waited = _age((crossing.crossed_at - crossing.oldest_at).total_seconds())
        oldest = f"The oldest has waited {waited} (since {crossing.oldest_at:%Y-%m-%d %H:%M} UTC).\n"
    return (
        f"{crossing.pending} reviews are waiting in the review queue, more than the threshold of "
        f"{crossing.threshold}.\n"
        f"By kind: {kinds}.\n"
        f"{oldest}"
        "\n"
        "You get this once until the queue is back at or below the threshold.\n"
        "\n"
        f"Tenant: {tenant_name}\n"
        f"Review queue: {url}\n"
        f"Notification: {crossing.id}\n"
    )


def webhook_payload(crossing: QueueCrossing, tenant_slug: str, url: str) -> dict[str, Any]:
    """The webhook's JSON body (Standard Webhooks' ``type``, ``timestamp``, ``data``)."""
    return {
        "type": NOTICE_TYPE,
        "timestamp": crossing.crossed_at.isoformat(),
        "data": {
            "id": str(crossing.id),
            "tenant": tenant_slug,
            "pending": crossing.pending,
            "threshold": crossing.threshold,
            "by_kind": dict(crossing.by_kind),
            "oldest_at": None if crossing.oldest_at is None else crossing.oldest_at.isoformat(),
            "review_queue": url,
        },
    }


def queue_metrics(rows: Sequence[tuple[uuid.UUID, str, int, datetime]], now: datetime) -> dict[str, tuple[int, float]]:
    """Per kind (every kind, 0 for none): pending reviews summed over tenants, and the oldest one's age in seconds
    (the maximum over tenants)."""
    found = dict.fromkeys(review.KINDS, (0, 0.0))
    for _tenant, kind, pending, oldest in rows:
        count, age = found.get(kind, (0, 0.0))
        found[kind] = (count + pending, max(age, (now - oldest).total_seconds()))
    return found


@dataclass(slots=True)
class QueueCheck:
    """What one tenant's check did."""

    tenant: TenantId
    pending: int
    action: Literal["crossed", "over", "cleared", "failed"]
    """``crossed``: a crossing was stored now; ``over``: one was open already (its delivery retried if it failed);
    ``cleared``: the queue is back, the crossing cleared; ``failed``: an error, logged."""
    crossing: QueueCrossing | None = None
    delivered: int = 0
    failed_deliveries: int = 0
    reason: str = ""


class ReviewQueueWatch:
    """The scheduled review-queue check (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        threshold: int,
        mailer: AlertMailer | None = None,
        public_url: str = "http://127.0.0.1:8000",
        webhook_timeout_s: float = 10.0,
        worker: OperatorContext | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("the review queue's alert threshold is at least 1")
        self.engine = engine
        self.threshold = threshold
        self.public_url = public_url
        self.worker = worker or WORKER
        self.clock = clock or (lambda: datetime.now(UTC))
        self.notifier = Notifier(mailer, webhook_timeout_s=webhook_timeout_s, environ=environ, clock=self.clock)

    async def run_once(self, now: datetime | None = None) -> list[QueueCheck]:
        """Measure every tenant's queue, then notify or re-arm the tenants past or back below the threshold."""
        moment = now or self.clock()
        rows = await across_tenants(self.engine, review.review_queues)
        alerted = set(await across_tenants(self.engine, repo.review_alerted_tenants))
        for kind, (pending, oldest) in queue_metrics(rows, moment).items():
            telemetry.REVIEW_QUEUE_LENGTH.labels(kind).set(pending)
            telemetry.REVIEW_QUEUE_OLDEST.labels(kind).set(oldest)
        totals: dict[uuid.UUID, int] = {}
        for tenant_id, _kind, pending, _oldest in rows:
            totals[tenant_id] = totals.get(tenant_id, 0) + pending
        due = sorted({t for t, n in totals.items() if n > self.threshold} | alerted)
        return [await self.check_tenant(self.worker.tenant(t), moment) for t in due]

    async def check_tenant(self, tenant: TenantId, now: datetime | None = None) -> QueueCheck:
        """Store (and notify) or clear the tenant's crossing from its queue as it is now; never raises."""
        moment = now or self.clock()
        uow = UnitOfWork(self.engine, tenant)
        try:
            return await self._check(uow, moment)
        except Exception as exc:
            log.exception("review queue check failed", extra={"fields": {"tenant": str(tenant)}})
            return QueueCheck(tenant, 0, "failed", reason=f"{type(exc).__name__}: {exc}")

    async def _check(self, uow: UnitOfWork, now: datetime) -> QueueCheck:
        threshold = self.threshold
        actor = self.worker.actor

        async def judge(
            tx: TenantTx,
        ) -> tuple[int, Literal["crossed", "over", "cleared"], QueueCrossing | None, dict[str, Any], str]:
            queues: Queues = await review.queue_summary(tx)
            pending = sum(n for n, _ in queues.values())
            manifest, name = await tenancy.manifest(tx), await tenancy.tenant_name(tx)
            by_kind = {kind: n for kind, (n, _) in sorted(queues.items())}
            if pending <= threshold:
                cleared = await repo.clear_crossing(tx, now)
                if cleared is not None:
                    await audit.append(tx, "review", actor, f"review-queue:{cleared.id}", {
                        "review_queue": "cleared", "pending": pending, "threshold": threshold, "by_kind": by_kind,
                        "crossed_at": cleared.crossed_at.isoformat()})  # fmt: skip
                return pending, "cleared", cleared, manifest, name
            found = await repo.open_crossing(tx, for_update=True)
            if found is not None:
                return pending, "over", found, manifest, name
            oldest = min((at for _, at in queues.values()), default=None)
            made = await repo.open_new_crossing(
                tx, uuid.uuid4(), pending=pending, threshold=threshold, by_kind=by_kind, oldest_at=oldest, at=now,
                delivered=not targets(alerts_spec(manifest)),
            )  # fmt: skip
            if made is None:  # another scheduler stored it since
                return pending, "over", await repo.open_crossing(tx), manifest, name
            await audit.append(tx, "review", actor, f"review-queue:{made.id}", {
                "review_queue": "over_threshold", "pending": pending, "threshold": threshold,
                "by_kind": by_kind})  # fmt: skip
            return pending, "crossed", made, manifest, name

        pending, action, crossing, manifest, name = await uow.run(judge)
        check = QueueCheck(uow.tenant, pending, action, crossing)
        if action == "crossed":
            log.warning(
                "review queue past its threshold: %d pending (threshold %d)", pending, threshold,
                extra={"fields": {"tenant": str(uow.tenant), "crossing": str(crossing.id) if crossing else None}},
            )  # fmt: skip
        if action == "cleared" or crossing is None or crossing.delivered_at is not None:
            return check
        spec = alerts_spec(manifest)
        slug = str(manifest.get("tenant", {}).get("slug", uow.tenant))
        check.delivered, check.failed_deliveries = await self._deliver(uow, crossing, spec, name, slug, now)
        return check

    async def _deliver(
        self, uow: UnitOfWork, crossing: QueueCrossing, spec: AlertsSpec | None, name: str, slug: str, now: datetime
    ) -> tuple[int, int]:
        """Send the crossing's notification to each target that does not have it yet; record the outcomes after."""
        url = review_queue_url(self.public_url)
        notice = Notice(
            crossing.id,
            email_subject(crossing, name),
            email_body(crossing, name, url),
            webhook_payload(crossing, slug, url),
            f"review-queue-{crossing.id.hex}",
        )
        fields = {"tenant": str(uow.tenant), "crossing": str(crossing.id)}
        sent = await self.notifier.deliver(
            targets(spec), spec, notice, crossing.delivery, now, what="review queue notification", fields=fields
        )

        async def save(tx: TenantTx) -> None:
            await repo.record_crossing_delivery(tx, crossing.id, sent.outcomes, complete=sent.complete, at=now)

        await uow.run(save)
        return sent.delivered, sent.failed
