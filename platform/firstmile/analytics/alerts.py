"""Drop-off alerts, the pure part: the windows a check compares, the test that judges a step, the messages.

The analytics agent's anomaly check (docs/alerts.md): for one path version, the drop-off of each required step
among users who *started* in the recent window (default the 7 days before the check) is compared with the same
step's drop-off among users who started in the baseline window (default the 28 days before that). Both come from
the analytics API's own drop-off query (:func:`firstmile.analytics.queries.build_funnel`, through
:meth:`~firstmile.analytics.queries.AnalyticsQueries.dropoff`) with one conversion window.

**Mature cohorts only.** A user who started an hour ago has had no time to drop off or not, so the recent window
ends ``conversion_window`` before the check (rounded down to the hour): every counted user had the whole window.
Without it a recent window always looks worse than its baseline.

**The test.** Per step, *n* users reached the step before (or started, for the first step) and *x* of them did
not reach this one. Recent (x₁, n₁) against baseline (x₀, n₀), a two-sided two-proportion z-test with the pooled
proportion p̂ = (x₀ + x₁) / (n₀ + n₁)::

    z = (x₁/n₁ - x₀/n₀) / sqrt(p̂ (1 - p̂) (1/n₀ + 1/n₁)),   p = erfc(|z| / √2)

A step is tested when both windows have at least ``min_users`` users at the step before; with *m* steps tested on
the path, a step alerts when ``p < significance / m`` (Bonferroni: the chance of any false alert on the path stays
under ``significance``) **and** the drop-off moved by at least ``min_shift`` in absolute terms (5 points by
default: with enough users a trivial move is significant too). Both directions alert (``rose``, ``fell``): a drop-off
that falls sharply is as often a tracking fault (a step completed by a misfiring event) as good news.

Nothing here does I/O; the check that runs it per tenant is :mod:`firstmile.analytics.alerting`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from firstmile.analytics.queries import Dropoff

Direction = Literal["rose", "fell"]
ALERT_TYPE = "analytics.dropoff_alert"
"""The ``type`` of the webhook payload (Standard Webhooks' event type)."""


@dataclass(frozen=True, slots=True)
class AlertRule:
    """When a step's drop-off shift is an alert (settings ``FIRSTMILE_DROPOFF_ALERT_*``, docs/configuration.md)."""

    recent: timedelta = timedelta(days=7)
    baseline: timedelta = timedelta(days=28)
    conversion_window: timedelta = timedelta(hours=24)
    min_users: int = 50
    min_shift: float = 0.05
    significance: float = 0.01

    def __post_init__(self) -> None:
        if self.recent <= timedelta(0) or self.baseline <= timedelta(0) or self.conversion_window <= timedelta(0):
            raise ValueError("the recent, baseline and conversion windows must be positive")
        if self.min_users < 1:
            raise ValueError("min_users must be at least 1")
        if not 0 <= self.min_shift < 1:
            raise ValueError("min_shift must be in [0, 1)")
        if not 0 < self.significance < 1:
            raise ValueError("significance must be in (0, 1)")


@dataclass(frozen=True, slots=True)
class Windows:
    """The onboarding starts a check compares: baseline ``[baseline_start, recent_start)``, recent
    ``[recent_start, recent_end)``."""

    baseline_start: datetime
    recent_start: datetime
    recent_end: datetime


def windows(now: datetime, rule: AlertRule) -> Windows:
    """The windows of a check at ``now``: the recent one ends ``conversion_window`` before ``now``, on the hour, so
    every check within one hour compares the same windows (and raises the same alert once)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    end = (now - rule.conversion_window).replace(minute=0, second=0, microsecond=0)
    start = end - rule.recent
    return Windows(baseline_start=start - rule.baseline, recent_start=start, recent_end=end)


@dataclass(frozen=True, slots=True)
class Proportions:
    """``dropped`` of ``users`` (users who reached the step before)."""

    users: int
    dropped: int

    @property
    def rate(self) -> float | None:
        return self.dropped / self.users if self.users else None


def two_proportion_test(baseline: Proportions, recent: Proportions) -> tuple[float, float] | None:
    """The pooled two-proportion z statistic of ``recent`` against ``baseline`` and its two-sided p-value; None when
    it is undefined (an empty side, or every user dropped, or none did, in both windows together)."""
    n0, n1 = baseline.users, recent.users
    if n0 <= 0 or n1 <= 0:
        return None
    pooled = (baseline.dropped + recent.dropped) / (n0 + n1)
    variance = pooled * (1 - pooled) * (1 / n0 + 1 / n1)
    if variance <= 0:
        return None
    z = (recent.dropped / n1 - baseline.dropped / n0) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass(frozen=True, slots=True)
class StepShift:
    """One step's drop-off in both windows and the verdict; ``reason`` says why it does or does not alert."""

    step_id: str
    baseline: Proportions
    recent: Proportions
    z: float | None
    p_value: float | None
    alert: bool
    reason: str

    @property
    def direction(self) -> Direction:
        r0, r1 = self.baseline.rate or 0.0, self.recent.rate or 0.0
        return "rose" if r1 >= r0 else "fell"


def compare(baseline: Dropoff, recent: Dropoff, rule: AlertRule) -> list[StepShift]:
    """Judge every step (see the module docstring); both answers must be for the same steps, in order."""
    if [s.step_id for s in baseline.steps] != [s.step_id for s in recent.steps]:
        raise ValueError("the baseline and recent drop-off must be for the same steps")
    pairs = [
        (b.step_id, Proportions(b.reached_previous, b.dropped), Proportions(r.reached_previous, r.dropped))
        for b, r in zip(baseline.steps, recent.steps, strict=True)
    ]
    tested = [p for p in pairs if p[1].users >= rule.min_users and p[2].users >= rule.min_users]
    threshold = rule.significance / len(tested) if tested else rule.significance
    out: list[StepShift] = []
    for step_id, b, r in pairs:
        if b.users < rule.min_users or r.users < rule.min_users:
            reason = f"too few users (baseline {b.users}, recent {r.users}; at least {rule.min_users} each)"
            out.append(StepShift(step_id, b, r, None, None, False, reason))
            continue
        test = two_proportion_test(b, r)
        if test is None:
            out.append(StepShift(step_id, b, r, None, None, False, "no variation to test"))
            continue
        z, p = test
        shift = abs((r.rate or 0.0) - (b.rate or 0.0))
        if p >= threshold:
            reason = f"not significant (p = {p:.3g} ≥ {threshold:.3g})"
        elif shift < rule.min_shift:
            reason = f"significant but small ({shift:.1%} < {rule.min_shift:.1%})"
        else:
            reason = f"shift of {shift:.1%}, p = {p:.3g} < {threshold:.3g}"
        out.append(StepShift(step_id, b, r, z, p, p < threshold and shift >= rule.min_shift, reason))
    return out


# -- the alert as stored, mailed and posted -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """One raised alert (a row of ``analytics_alerts``)."""

    id: uuid.UUID
    path_key: str
    path_version: int
    step_id: str
    step_title: str
    direction: Direction
    baseline_start: datetime
    window_start: datetime
    window_end: datetime
    baseline_users: int
    baseline_dropped: int
    recent_users: int
    recent_dropped: int
    z: float
    p_value: float
    created_at: datetime
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None

    @property
    def baseline_rate(self) -> float:
        return self.baseline_dropped / self.baseline_users

    @property
    def recent_rate(self) -> float:
        return self.recent_dropped / self.recent_users


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def email_subject(alert: Alert, tenant_name: str) -> str:
    return (
        f"[Firstmile] {tenant_name}: drop-off {alert.direction} at {alert.step_title!r} "
        f"({alert.path_key} v{alert.path_version})"
    )


def email_body(alert: Alert, tenant_name: str, dashboard_url: str) -> str:
    """The alert e-mail's text (plain text, no personal data: counts and ids only)."""
    return (
        f"Drop-off at step {alert.step_title!r} ({alert.step_id}) of path {alert.path_key} version "
        f"{alert.path_version} {alert.direction} from {alert.baseline_rate:.1%} to {alert.recent_rate:.1%}.\n"
        "\n"
        f"Recent: {alert.recent_dropped} of {alert.recent_users} users who reached the step before did not reach it "
        f"(onboarding starts {_day(alert.window_start)} to {_day(alert.window_end)}).\n"
        f"Baseline: {alert.baseline_dropped} of {alert.baseline_users} "
        f"(starts {_day(alert.baseline_start)} to {_day(alert.window_start)}).\n"
        f"Two-proportion z-test: z = {alert.z:.2f}, p = {alert.p_value:.2g}.\n"
        "\n"
        f"Tenant: {tenant_name}\n"
        f"Dashboard: {dashboard_url}\n"
        f"Alert: {alert.id}\n"
    )


def webhook_payload(alert: Alert, tenant_slug: str, dashboard_url: str) -> dict[str, Any]:
    """The webhook's JSON body (Standard Webhooks' ``type``, ``timestamp``, ``data``)."""
    return {
        "type": ALERT_TYPE,
        "timestamp": alert.created_at.isoformat(),
        "data": {
            "id": str(alert.id),
            "tenant": tenant_slug,
            "path": alert.path_key,
            "path_version": alert.path_version,
            "step_id": alert.step_id,
            "step_title": alert.step_title,
            "direction": alert.direction,
            "baseline": {
                "from": alert.baseline_start.isoformat(),
                "to": alert.window_start.isoformat(),
                "users": alert.baseline_users,
                "dropped": alert.baseline_dropped,
                "rate": alert.baseline_rate,
            },
            "recent": {
                "from": alert.window_start.isoformat(),
                "to": alert.window_end.isoformat(),
                "users": alert.recent_users,
                "dropped": alert.recent_dropped,
                "rate": alert.recent_rate,
            },
            "z": alert.z,
            "p_value": alert.p_value,
            "dashboard": dashboard_url,
        },
    }


def webhook_body(payload: Mapping[str, Any]) -> bytes:
    """The bytes posted (and signed): compact JSON, keys in a fixed order."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def webhook_secret_bytes(secret: str) -> bytes:
    """The HMAC key of a webhook secret: a Standard Webhooks ``whsec_<base64>`` secret is the decoded bytes; any
    other string is its UTF-8 bytes."""
    value = secret.strip()
    if value.startswith("whsec_"):
        try:
            return base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except ValueError as exc:
            raise ValueError("a whsec_ webhook secret must be base64 after the prefix") from exc
    if not value:
        raise ValueError("the webhook secret is empty")
    return value.encode("utf-8")


def sign_webhook(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of Standard Webhooks: ``v1,`` and the base64 HMAC-SHA256 of
    ``<id>.<timestamp>.<body>`` under ``secret``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode("ascii")


def verify_webhook(secret: bytes, headers: Mapping[str, str], body: bytes, *, now: int, tolerance: int = 300) -> bool:
    """What a receiver checks (and the tests do): one ``v1`` signature of the header list matches, and the timestamp
    is within ``tolerance`` seconds of ``now``."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        message_id, timestamp = lowered["webhook-id"], int(lowered["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign_webhook(secret, message_id, timestamp, body)
    offered: Sequence[str] = lowered.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)
