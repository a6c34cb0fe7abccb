"""Wire types of the analytics API (msgspec structs)."""

from __future__ import annotations

from datetime import datetime

import msgspec


class AppliedFilters(msgspec.Struct):
    """The filters the numbers are for, after defaults: users whose onboarding start matches them."""

    from_: datetime = msgspec.field(name="from")
    to: datetime
    path: str | None
    path_version: int | None
    variant: str | None
    persona: str | None


class FunnelStepOut(msgspec.Struct):
    step_id: str
    title: str
    users: int
    conversion_from_previous: float | None
    conversion_from_start: float | None
    median_seconds_from_previous: float | None


class FunnelResponse(msgspec.Struct):
    filters: AppliedFilters
    steps_version: int
    window_hours: int
    started: int
    steps: list[FunnelStepOut]
    stale: bool
    computed_at: datetime


class DropoffStepOut(msgspec.Struct):
    step_id: str
    title: str
    reached_previous: int
    reached: int
    dropped: int
    share: float | None


class DropoffResponse(msgspec.Struct):
    filters: AppliedFilters
    steps_version: int
    window_hours: int
    started: int
    steps: list[DropoffStepOut]
    stale: bool
    computed_at: datetime


class CohortWeekOut(msgspec.Struct):
    week: int
    week_start: str
    users: int
    retention: float


class CohortOut(msgspec.Struct):
    cohort_week: str
    users: int
    weeks: list[CohortWeekOut]


class CohortsResponse(msgspec.Struct):
    filters: AppliedFilters
    weeks: int
    cohorts: list[CohortOut]
    stale: bool
    computed_at: datetime


class ActivationBucketOut(msgspec.Struct):
    """Activated users whose time to activation is at least ``from_seconds`` and less than ``to_seconds``
    (``null``: no upper bound)."""

    label: str
    from_seconds: int
    to_seconds: int | None
    users: int


class TimeToActivationResponse(msgspec.Struct):
    filters: AppliedFilters
    users: int
    activated: int
    p50_seconds: float | None
    p90_seconds: float | None
    histogram: list[ActivationBucketOut]
    stale: bool
    computed_at: datetime


class StepRateOut(msgspec.Struct):
    step_id: str
    title: str
    optional: bool
    completed: int
    rate: float | None


class StepCompletionResponse(msgspec.Struct):
    filters: AppliedFilters
    steps_version: int
    started: int
    steps: list[StepRateOut]
    stale: bool
    computed_at: datetime


class PathActivationOut(msgspec.Struct):
    path: str
    users: int
    activated: int
    rate: float | None


class ActivationWeekOut(msgspec.Struct):
    """The users who started in the signup week beginning ``cohort_week`` (a Monday, UTC) and how many activated."""

    cohort_week: str
    users: int
    activated: int
    rate: float | None


class ActivationRateResponse(msgspec.Struct):
    filters: AppliedFilters
    users: int
    activated: int
    rate: float | None
    paths: list[PathActivationOut]
    weeks: list[ActivationWeekOut]
    stale: bool
    computed_at: datetime


class NudgeChannelOut(msgspec.Struct):
    channel: str
    sent: int
    opened: int
    clicked: int
    converted: int
    unsubscribed: int
    open_rate: float | None
    click_rate: float | None
    conversion_rate: float | None


class NudgeRatesResponse(msgspec.Struct):
    """The design's nudge metrics over the range (docs/nudges.md#metrics)."""

    filters: AppliedFilters
    stuck: int
    nudged: int
    send_rate: float | None
    sent: int
    opened: int
    converted: int
    open_rate: float | None
    conversion_rate: float | None
    channels: list[NudgeChannelOut]
    stale: bool
    computed_at: datetime
