"""Drop-off alerts: the analytics agent's scheduled check, the alerts' delivery, and what the admin UI reads.

:class:`DropoffWatch` runs on a schedule under ``worker:dropoff-alerts`` (the scheduler process, every
``FIRSTMILE_DROPOFF_ALERT_SECONDS``). For each tenant that the SECURITY DEFINER function
``firstmile_dropoff_alert_tenants`` lists (migration 0022) it:

1. reads the tenant's current paths (the onboarding catalog) and its manifest's ``alerts:`` section;
2. asks the analytics store, outside any transaction, for each path's current version: the drop-off by step of the
   recent window's starts and of the baseline window's (the analytics API's own query,
   :meth:`~firstmile.analytics.queries.AnalyticsQueries.dropoff`), and judges every step
   (:func:`firstmile.analytics.alerts.compare`);
3. stores each alert in ``analytics_alerts`` in one transaction, once per path version, step and window (the
   unique key; a step that alerted is quiet while its recent windows overlap);
4. delivers every alert not yet delivered (this run's and earlier runs' failures) to the e-mail addresses and the
   webhook of the ``alerts:`` section, and records each target's outcome afterwards: **stored first, marked
   delivered after**, so a failed delivery is retried at the next run and a crash between the two repeats a
   delivery rather than losing one (the e-mail's ``Message-ID`` and the webhook's ``webhook-id`` are the alert's id,
   for the receiver to deduplicate). The sending is :class:`Notifier`'s, which the review queue's notification
   (:mod:`firstmile.analytics.review_watch`) shares.

**The design's rule, "if anomaly detection fails, skip the alert".** When a query of the tenant fails or times out
(the store down, a slow merge), the tenant's check stores nothing this run: it is logged at warning level and
counted (``firstmile_dropoff_checks_total{outcome="skipped"}``), and the next run checks again. Any other error of
one tenant is logged with its traceback and counted as ``failed``; the other tenants are checked, and
:meth:`DropoffWatch.run_once` never raises, so the scheduler's task never dies of it. Deliveries of stored alerts go
on either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics import repository as repo
from firstmile.analytics.alerts import (
    Alert,
    AlertRule,
    StepShift,
    compare,
    email_body,
    email_subject,
    sign_webhook,
    webhook_body,
    webhook_payload,
    webhook_secret_bytes,
    windows,
)
from firstmile.analytics.queries import Dropoff, Filters
from firstmile.analytics.service import AnalyticsService, AnalyticsUnavailableError
from firstmile.audit import service as audit
from firstmile.kit import telemetry
from firstmile.kit.db import TenantTx, across_tenants
from firstmile.kit.scope import OperatorContext, TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import AlertsSpec, AlertWebhookSpec

log = logging.getLogger("firstmile.analytics.alerts")

WATCHER = OperatorContext("worker:dropoff-alerts")
AUDIT_KIND = "analytics.alert"
MAX_OPEN = 50
"""How many open alerts the dashboard shows (newest first)."""


class AlertMailer(Protocol):
    """Sends one alert e-mail; raises when the provider did not take it. The wiring gives the platform's e-mail
    channel (the nudges' SMTP relay or SendGrid), which sits above this slice."""

    async def send_alert(self, to: str, subject: str, body: str, idempotency_key: str) -> None: ...


class DeliveryError(RuntimeError):
    """A target did not take the alert (its reason is recorded; the next run retries)."""


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    """``email:<address>`` or ``webhook:<url>``: the key of its outcome in the alert's ``delivery`` record."""
    channel: Literal["email", "webhook"]
    address: str


def targets(spec: AlertsSpec | None) -> list[Target]:
    """Where the tenant's alerts go, from its manifest's ``alerts:`` section."""
    if spec is None:
        return []
    found = [Target(f"email:{a.lower()}", "email", a) for a in spec.email]
    if spec.webhook is not None:
        found.append(Target(f"webhook:{spec.webhook.url}", "webhook", spec.webhook.url))
    return found


@dataclass(frozen=True, slots=True)
class PathCheck:
    """One path version's steps as the check judged them."""

    path_key: str
    path_version: int
    started_baseline: int
    started_recent: int
    shifts: tuple[StepShift, ...]


@dataclass(slots=True)
class TenantCheck:
    """What one tenant's check did."""

    tenant: TenantId
    outcome: Literal["checked", "skipped", "failed"]
    reason: str = ""
    paths: list[PathCheck] = field(default_factory=list)
    raised: list[Alert] = field(default_factory=list)
    delivered: int = 0
    failed_deliveries: int = 0
    slug: str = ""


def alerts_spec(manifest: Mapping[str, Any]) -> AlertsSpec | None:
    """The manifest's ``alerts:`` section (validated when it was applied), or None."""
    raw = manifest.get("alerts")
    if not raw:
        return None
    try:
        return AlertsSpec.model_validate(raw)
    except ValidationError:
        log.warning("the stored manifest's alerts section does not validate; nothing is delivered")
        return None


def dashboard_url(public_url: str, path_key: str) -> str:
    return f"{public_url.rstrip('/')}/admin/analytics?path={quote(path_key)}"


class DropoffWatch:
    """The scheduled drop-off check and the alerts' delivery (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        analytics: AnalyticsService,
        onboarding: OnboardingService,
        rule: AlertRule | None = None,
        *,
        mailer: AlertMailer | None = None,
        public_url: str = "http://127.0.0.1:8000",
        webhook_timeout_s: float = 10.0,
        max_deliveries: int = 100,
        worker: OperatorContext | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.analytics = analytics
        self.onboarding = onboarding
        self.rule = rule or AlertRule()
        self.public_url = public_url
        self.max_deliveries = max_deliveries
        self.worker = worker or WATCHER
        self.clock = clock or (lambda: datetime.now(UTC))
        self.notifier = Notifier(mailer, webhook_timeout_s=webhook_timeout_s, environ=environ, clock=self.clock)

    async def tenants(self) -> list[TenantId]:
        return [self.worker.tenant(t) for t in await across_tenants(self.engine, repo.alert_tenants)]

    async def run_once(self, now: datetime | None = None, stop: asyncio.Event | None = None) -> list[TenantCheck]:
        """Check every tenant (see the module docstring); never raises for one tenant's failure.

        ``stop``: once set, no further tenant is checked (a process stopping waits for one tenant's check, not for
        every tenant's; the next run checks them all again)."""
        checks: list[TenantCheck] = []
        for tenant in await self.tenants():
            if stop is not None and stop.is_set():
                break
            checks.append(await self.check_tenant(tenant, now))
        return checks

    async def check_tenant(self, tenant: TenantId, now: datetime | None = None) -> TenantCheck:
        """Check one tenant and deliver its pending alerts; every failure is logged, counted and returned."""
        moment = now or self.clock()
        uow = UnitOfWork(self.engine, tenant)
        fields = {"tenant": str(tenant)}
        try:
            check, spec, name, slug = await self._check(uow, moment)
        except Exception as exc:
            log.exception("drop-off check failed", extra={"fields": fields})
            telemetry.DROPOFF_CHECKS.labels("failed").inc()
            return TenantCheck(tenant, "failed", f"{type(exc).__name__}: {exc}")
        telemetry.DROPOFF_CHECKS.labels(check.outcome).inc()
        check.slug = slug
        try:
            check.delivered, check.failed_deliveries = await self._deliver(uow, spec, name, slug, moment)
        except Exception:
            log.exception("drop-off alert delivery failed", extra={"fields": fields})
        return check

    async def _check(self, uow: UnitOfWork, now: datetime) -> tuple[TenantCheck, AlertsSpec | None, str, str]:
        tenant = uow.tenant

        async def read(tx: TenantTx) -> tuple[int, dict[str, Any], str]:
            return await tenancy.revision(tx), await tenancy.manifest(tx), await tenancy.tenant_name(tx)

        revision, manifest, name = await uow.run(read)
        slug = str(manifest.get("tenant", {}).get("slug", tenant))
        spec = alerts_spec(manifest)
        check = TenantCheck(tenant, "checked")
        w = windows(now, self.rule)
        window = self.rule.conversion_window
        queries = self.analytics.queries
        found: list[Alert] = []
        try:
            catalog = await self.onboarding.catalog(uow, revision)
            for path in catalog.current:
                steps = tuple(s.id for s in path.required_steps)
                if not steps:
                    continue
                titles = {s.id: s.title for s in path.steps}
                base_f = Filters(w.baseline_start, w.recent_start, path.key, path.version)
                recent_f = Filters(w.recent_start, w.recent_end, path.key, path.version)
                baseline: Dropoff = await self.analytics.fresh(
                    tenant, "drop-off baseline", partial(queries.dropoff, tenant, base_f, steps, window)
                )
                recent: Dropoff = await self.analytics.fresh(
                    tenant, "drop-off recent", partial(queries.dropoff, tenant, recent_f, steps, window)
                )
                shifts = compare(baseline, recent, self.rule)
                check.paths.append(PathCheck(path.key, path.version, baseline.started, recent.started, tuple(shifts)))
                found += [
                    Alert(
                        id=uuid.uuid4(), path_key=path.key, path_version=path.version, step_id=s.step_id,
                        step_title=titles.get(s.step_id, s.step_id), direction=s.direction,
                        baseline_start=w.baseline_start, window_start=w.recent_start, window_end=w.recent_end,
                        baseline_users=s.baseline.users, baseline_dropped=s.baseline.dropped,
                        recent_users=s.recent.users, recent_dropped=s.recent.dropped,
                        z=float(s.z or 0.0), p_value=float(s.p_value if s.p_value is not None else 1.0),
                        created_at=now,
                    )
                    for s in shifts
                    if s.alert
                ]  # fmt: skip
        except AnalyticsUnavailableError as exc:
            # the design's rule: when the anomaly check fails, the alert is skipped (and logged)
            log.warning(
                "drop-off check skipped: %s", exc, extra={"fields": {"tenant": str(tenant), "reason": "analytics"}}
            )
            return TenantCheck(tenant, "skipped", str(exc), check.paths), spec, name, slug
        if found:
            nowhere = not targets(spec)
            quiet_since = w.recent_end - self.rule.recent

            async def store(tx: TenantTx) -> list[Alert]:
                raised = [a for a in found if await repo.raise_alert(tx, a, quiet_since=quiet_since, delivered=nowhere)]
                for a in raised:  # an automated decision: audited with the figures it was taken on
                    await audit.append(tx, AUDIT_KIND, self.worker.actor, str(a.id), {
                        "action": "raised", "path": a.path_key, "path_version": a.path_version, "step_id": a.step_id,
                        "direction": a.direction, "baseline": [a.baseline_users, a.baseline_dropped],
                        "recent": [a.recent_users, a.recent_dropped], "p_value": a.p_value,
                        "window_end": a.window_end.isoformat()})  # fmt: skip
                return raised

            check.raised = await uow.run(store)
            for alert in check.raised:
                telemetry.DROPOFF_ALERTS.labels(alert.direction).inc()
                log.warning(
                    "drop-off alert: %s v%s step %s %s from %.1f%% to %.1f%%", alert.path_key, alert.path_version,
                    alert.step_id, alert.direction, 100 * alert.baseline_rate, 100 * alert.recent_rate,
                    extra={"fields": {"tenant": str(tenant), "alert": str(alert.id), "p_value": alert.p_value}},
                )  # fmt: skip
        return check, spec, name, slug

    # ------------------------------------------------------------------ delivery

    async def _deliver(
        self, uow: UnitOfWork, spec: AlertsSpec | None, name: str, slug: str, now: datetime
    ) -> tuple[int, int]:
        """Send every undelivered alert to each target that does not have it yet; record the outcomes after."""
        pending = await uow.run(partial(repo.undelivered, limit=self.max_deliveries))
        if not pending:
            return 0, 0
        where = targets(spec)
        delivered = failed = 0
        for alert, record in pending:
            url = dashboard_url(self.public_url, alert.path_key)
            notice = Notice(
                alert.id,
                email_subject(alert, name),
                email_body(alert, name, url),
                webhook_payload(alert, slug, url),
                f"alert-{alert.id.hex}",
            )
            fields = {"tenant": str(uow.tenant), "alert": str(alert.id)}
            sent = await self.notifier.deliver(where, spec, notice, record, now, what="drop-off alert", fields=fields)
            delivered, failed = delivered + sent.delivered, failed + sent.failed
            save = partial(
                repo.record_delivery, alert_id=alert.id, outcomes=sent.outcomes, complete=sent.complete, at=now
            )
            await uow.run(save)
        return delivered, failed


# ---------------------------------------------------------------------- delivery, shared with the review queue's


@dataclass(frozen=True, slots=True)
class Notice:
    """One message for a tenant's ``alerts:`` targets: the e-mail's subject and text, the webhook's JSON payload."""

    id: uuid.UUID
    """The webhook's ``webhook-id``, for the receiver to deduplicate."""
    subject: str
    body: str
    payload: Mapping[str, Any]
    idempotency_key: str
    """The e-mail's idempotency key (its ``Message-ID``)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one notice's delivery did: each target's outcome (the ``delivery`` record's entries), whether every
    target has it now, and how many sends went through or failed."""

    outcomes: dict[str, dict[str, Any]]
    complete: bool
    delivered: int
    failed: int


class Notifier:
    """Sends notices to a tenant's ``alerts:`` targets: an e-mail through the :class:`AlertMailer`, a POST signed the
    Standard Webhooks way to the webhook. The drop-off alerts and the review queue's notification go out through it."""

    def __init__(
        self,
        mailer: AlertMailer | None,
        *,
        webhook_timeout_s: float = 10.0,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.mailer = mailer
        self.webhook_timeout_s = webhook_timeout_s
        self.environ = environ if environ is not None else os.environ
        self.clock = clock or (lambda: datetime.now(UTC))

    async def deliver(
        self,
        where: list[Target],
        spec: AlertsSpec | None,
        notice: Notice,
        record: Mapping[str, Any],
        now: datetime,
        *,
        what: str,
        fields: Mapping[str, str],
    ) -> Delivery:
        """Send ``notice`` to each target of ``where`` that ``record`` (the earlier outcomes) does not show delivered;
        a failure is logged as a warning and counted, never raised."""
        outcomes: dict[str, dict[str, Any]] = {}
        delivered = failed = 0
        for target in where:
            before = record.get(target.key) or {}
            if before.get("status") == "delivered":
                continue
            attempts = int(before.get("attempts", 0)) + 1
            try:
                await self.send(target, spec, notice)
            except Exception as exc:
                failed += 1
                telemetry.ALERT_DELIVERIES.labels(target.channel, "failed").inc()
                reason = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
                log.warning(
                    "%s not delivered to a %s target (attempt %d): %s", what, target.channel, attempts, reason,
                    extra={"fields": dict(fields)},
                )  # fmt: skip
                outcomes[target.key] = {"status": "failed", "attempts": attempts, "at": now.isoformat(),
                                        "error": reason[:500]}  # fmt: skip
            else:
                delivered += 1
                telemetry.ALERT_DELIVERIES.labels(target.channel, "delivered").inc()
                outcomes[target.key] = {"status": "delivered", "attempts": attempts, "at": now.isoformat()}
        merged = {**record, **outcomes}
        complete = all((merged.get(t.key) or {}).get("status") == "delivered" for t in where)
        return Delivery(outcomes, complete, delivered, failed)

    async def send(self, target: Target, spec: AlertsSpec | None, notice: Notice) -> None:
        """Send ``notice`` to one target; :class:`DeliveryError` (or the mailer's error) when it did not take it."""
        if target.channel == "email":
            if self.mailer is None:
                raise DeliveryError(
                    "no e-mail channel is configured (FIRSTMILE_NUDGE_SMTP_URL or FIRSTMILE_NUDGE_SENDGRID_API_KEY)"
                )
            await self.mailer.send_alert(target.address, notice.subject, notice.body, notice.idempotency_key)
            return
        assert spec is not None and spec.webhook is not None
        body = webhook_body(notice.payload)
        timestamp = int(self.clock().timestamp())
        message_id = str(notice.id)
        headers = {
            "content-type": "application/json",
            "user-agent": "Firstmile-Alerts/1",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(self._secret(spec.webhook), message_id, timestamp, body),
        }
        try:
            async with httpx.AsyncClient(timeout=self.webhook_timeout_s, follow_redirects=False) as http:
                answer = await http.post(target.address, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"the webhook could not be reached: {type(exc).__name__}: {exc}") from exc
        if not 200 <= answer.status_code < 300:
            raise DeliveryError(f"the webhook answered {answer.status_code}")

    def _secret(self, webhook: AlertWebhookSpec) -> bytes:
        """The signing key, read at each delivery (a rotated secret is used at once)."""
        if webhook.secret_env is not None:
            value = self.environ.get(webhook.secret_env)
            if not value:
                raise DeliveryError(f"the webhook secret's environment variable {webhook.secret_env} is not set")
        else:
            assert webhook.secret_file is not None
            try:
                value = Path(webhook.secret_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise DeliveryError(f"the webhook secret file cannot be read: {exc.strerror}") from exc
        try:
            return webhook_secret_bytes(value)
        except ValueError as exc:
            raise DeliveryError(str(exc)) from exc


# ---------------------------------------------------------------------- what the admin UI reads and does


async def open_alerts(tx: TenantTx, limit: int = MAX_OPEN) -> list[Alert]:
    """The tenant's alerts nobody acknowledged yet, newest first."""
    return await repo.open_alerts(tx, limit)


class AlertNotFoundError(LookupError):
    """No open alert of the tenant has this id (unknown, another tenant's, or acknowledged already)."""


async def acknowledge(tx: TenantTx, alert_id: uuid.UUID, actor: str, now: datetime) -> Alert:
    """Acknowledge (dismiss) an open alert, with an ``analytics.alert`` audit entry in the same transaction."""
    alert = await repo.get_alert(tx, alert_id)
    if alert is None or not await repo.acknowledge(tx, alert_id, actor, now):
        raise AlertNotFoundError(str(alert_id))
    await audit.append(tx, AUDIT_KIND, actor, str(alert_id), {
        "action": "acknowledged", "path": alert.path_key, "path_version": alert.path_version,
        "step_id": alert.step_id, "window_end": alert.window_end.isoformat()})  # fmt: skip
    return alert
