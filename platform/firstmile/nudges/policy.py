"""The guardrail's policy for nudges, with no I/O: consent, suppression, one fatigue budget, quiet hours.

Every rule that depends on the clock is evaluated in the **user's own time zone** (IANA name,
``zoneinfo``), so "one nudge a day" means one per calendar day where the user lives, and quiet
hours are the user's nights, on days of 23 and 25 hours too:

* **Consent** per channel and category (``onboarding``, ``product``…): a send needs an explicit
  grant for its channel and category unless the tenant's policy says the category is sent by
  default (transactional onboarding mail, for instance); a withdrawal (an unsubscribe) always wins.
* **Suppression**: an address that bounced hard or complained is never sent to again on that channel.
* **Fatigue budget**: at most ``daily_cap`` nudges per local calendar day, every channel together
  (in-app included). A nudge over the budget is deferred to the first moment of the next local day
  that has room, within ``max_delay``; past that, it is dropped.
* **Quiet hours**: a nudge that would arrive between ``quiet_start`` and ``quiet_end`` (local; the
  window may span midnight) is deferred to the window's end. A local time that does not exist on
  that day (the hour skipped when clocks go forward) resolves to the first instant after the gap;
  one that exists twice (clocks go back) to its first occurrence.

:func:`evaluate` returns a :class:`Verdict` with each check's outcome, for the audit log. The design's
recovery rule "a policy check that times out denies" is the caller's (the check is pure and fast;
what can time out is reading its inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CHANNELS = ("email", "sms", "in_app", "push")
"""Every channel a nudge can take."""

_MAX_STEPS = 16
"""Deferral steps tried before giving up (each moves past one quiet window or one full day)."""


class PolicyError(ValueError):
    """A policy or its input is invalid (an unknown time zone or channel, a cap below zero)."""


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`PolicyError` when it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PolicyError(f"unknown time zone {name!r}") from exc


def local_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall time ``at`` on ``day`` in ``tz``.

    A wall time skipped by a DST change resolves to the first instant after the gap; a repeated
    one to its first occurrence (``fold=0``).
    """
    naive = datetime.combine(day, at)
    utc = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) == naive:
        return utc
    # In a gap: read with the offset after the jump (fold=1), the wall time falls before the gap;
    # with the offset before it (fold=0), after it. The jump lies between the two readings: find the
    # first instant there whose wall time is not earlier than ``at`` (wall time only moves forward).
    low = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = utc
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0) if high.microsecond else high


@dataclass(frozen=True, slots=True)
class NudgePolicy:
    """A tenant's policy (the manifest's ``nudges.policy``; these are the defaults)."""

    daily_cap: int = 1
    """Nudges per user per local calendar day, every channel together; 0 sends nothing."""
    quiet_start: time | None = time(21, 0)
    """Local start of quiet hours; None for none."""
    quiet_end: time | None = time(8, 0)
    max_delay: timedelta = timedelta(hours=48)
    """How long a nudge may be deferred (by the budget or quiet hours) before it is dropped instead."""
    default_categories: frozenset[str] = frozenset({"onboarding"})
    """Categories sent without an explicit grant (until the user withdraws consent)."""

    def __post_init__(self) -> None:
        if self.daily_cap < 0:
            raise PolicyError("daily_cap must be 0 or more")
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise PolicyError("quiet hours need both a start and an end")
        if self.max_delay < timedelta(0):
            raise PolicyError("max_delay must not be negative")

    def in_quiet_hours(self, local: time) -> bool:
        start, end = self.quiet_start, self.quiet_end
        if start is None or end is None or start == end:
            return False
        if start < end:
            return start <= local < end
        return local >= start or local < end  # the window spans midnight


@dataclass(frozen=True, slots=True)
class Audience:
    """What the policy knows about the user and the channel's address."""

    time_zone: str = "UTC"
    consents: Mapping[tuple[str, str], bool] = field(default_factory=dict)
    """(channel, category) -> granted (True) or withdrawn (False); absent = never asked."""
    suppressed: bool = False
    """The channel's address is on the suppression list (a hard bounce, a complaint)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer for one candidate send."""

    allowed: bool
    send_at: datetime | None
    """When it may be sent (UTC): ``now`` or later (deferred); None when denied."""
    reasons: tuple[str, ...]
    """Why it was denied or deferred: ``no-consent``, ``unsubscribed``, ``suppressed``, ``fatigue-cap``,
    ``quiet-hours``, ``deferred-too-long``."""
    checks: Mapping[str, str]
    """Each check's outcome (``pass``, ``deny``, ``defer``), for the audit log."""

    @property
    def deferred(self) -> bool:
        return self.allowed and bool({"fatigue-cap", "quiet-hours"} & set(self.reasons))


def _sends_on(day: date, sent: Iterable[datetime], tz: ZoneInfo) -> int:
    return sum(1 for s in sent if s.astimezone(tz).date() == day)


def evaluate(
    policy: NudgePolicy,
    audience: Audience,
    channel: str,
    category: str,
    now: datetime,
    sent: Iterable[datetime],
) -> Verdict:
    """Whether a nudge on ``channel`` of ``category`` may go to this user, and when.

    ``sent`` holds the user's earlier nudges (UTC instants, every channel, in-app included), as
    the budget counts them; ``now`` is timezone-aware.
    """
    if channel not in CHANNELS:
        raise PolicyError(f"unknown channel {channel!r} (one of {', '.join(CHANNELS)})")
    if now.tzinfo is None:
        raise PolicyError("now must carry a time zone")
    tz = zone(audience.time_zone)
    checks: dict[str, str] = {}
    consent = audience.consents.get((channel, category))
    if consent is False:
        checks["consent"] = "deny"
        return Verdict(False, None, ("unsubscribed",), checks)
    if consent is None and category not in policy.default_categories:
        checks["consent"] = "deny"
        return Verdict(False, None, ("no-consent",), checks)
    checks["consent"] = "pass"
    if audience.suppressed:
        checks["suppression"] = "deny"
        return Verdict(False, None, ("suppressed",), checks)
    checks["suppression"] = "pass"
    if policy.daily_cap == 0:
        checks["fatigue"] = "deny"
        return Verdict(False, None, ("fatigue-cap",), checks)
    history = [s.astimezone(UTC) for s in sent]
    at = now.astimezone(UTC)
    reasons: list[str] = []
    checks["fatigue"] = checks["quiet_hours"] = "pass"
    for _ in range(_MAX_STEPS):
        local = at.astimezone(tz)
        if _sends_on(local.date(), history, tz) >= policy.daily_cap:
            checks["fatigue"] = "defer"
            if "fatigue-cap" not in reasons:
                reasons.append("fatigue-cap")
            at = local_instant(local.date() + timedelta(days=1), time(0), tz)
            continue
        if policy.in_quiet_hours(local.timetz().replace(tzinfo=None)):
            checks["quiet_hours"] = "defer"
            if "quiet-hours" not in reasons:
                reasons.append("quiet-hours")
            assert policy.quiet_end is not None
            end_day = local.date() if local.time() < policy.quiet_end else local.date() + timedelta(days=1)
            at = local_instant(end_day, policy.quiet_end, tz)
            continue
        break
    else:  # pragma: no cover - every step crosses a day or a quiet window; 16 cannot all be blocked
        return Verdict(False, None, (*reasons, "deferred-too-long"), checks)
    if at - now.astimezone(UTC) > policy.max_delay:
        return Verdict(False, None, (*reasons, "deferred-too-long"), checks)
    return Verdict(True, at, tuple(reasons), checks)
