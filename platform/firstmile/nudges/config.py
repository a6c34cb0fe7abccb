"""A tenant's nudge configuration: the manifest's ``nudges:`` section over the platform's defaults (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import time, timedelta

from firstmile.nudges.policy import NudgePolicy
from firstmile.tenancy.manifest import NudgesSpec, NudgeTemplateSpec, NudgeTriggerSpec


@dataclass(frozen=True, slots=True)
class TenantNudges:
    """What the executor decides with, for one tenant."""

    enabled: bool
    channels: tuple[str, ...]
    """The platform's channels the tenant allows, in the platform's order."""
    policy: NudgePolicy
    default_time_zone: str
    triggers: tuple[NudgeTriggerSpec, ...] = ()
    templates: tuple[NudgeTemplateSpec, ...] = ()
    tenant_name: str = ""
    """The tenant's display name (``tenant.name`` in the templates)."""


def _clock(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def tenant_nudges(
    spec: NudgesSpec | None, platform: NudgePolicy, channels: tuple[str, ...], default_time_zone: str
) -> TenantNudges:
    """The platform's policy, channels and time zone, with what the tenant's manifest sets instead."""
    if spec is None:
        return TenantNudges(True, channels, platform, default_time_zone)
    policy, zone = platform, default_time_zone
    if spec.policy is not None:
        given = spec.policy
        if given.daily_cap is not None:
            policy = replace(policy, daily_cap=given.daily_cap)
        if given.quiet_hours == "none":
            policy = replace(policy, quiet_start=None, quiet_end=None)
        elif given.quiet_hours is not None:
            policy = replace(
                policy, quiet_start=_clock(given.quiet_hours.start), quiet_end=_clock(given.quiet_hours.end)
            )
        if given.max_delay_hours is not None:
            policy = replace(policy, max_delay=timedelta(hours=given.max_delay_hours))
        if given.default_categories is not None:
            policy = replace(policy, default_categories=frozenset(given.default_categories))
        zone = given.default_time_zone or zone
    allowed = channels if spec.channels is None else tuple(c for c in channels if c in spec.channels)
    return TenantNudges(spec.enabled, allowed, policy, zone, spec.triggers, spec.templates)
