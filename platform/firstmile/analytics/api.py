"""The analytics API (tenant apps and the admin UI, API key with ``analytics:read``).

Every endpoint answers for the caller's tenant only (the tenant comes from the
key, never from a parameter), filters users by their onboarding start, and
carries ``stale`` and ``computed_at``: a query that times out or fails answers
with the last result computed for the same question, marked stale.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, TypeVar

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from firstmile.analytics import schemas
from firstmile.analytics.queries import Filters
from firstmile.analytics.service import AnalyticsService, Computed
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import SLUG_PATTERN
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy import service as tenancy

T = TypeVar("T")

DEFAULT_RANGE = timedelta(days=30)
MAX_RANGE = timedelta(days=366)
DEFAULT_WINDOW_HOURS = 168
MAX_WINDOW_HOURS = 2160
DEFAULT_WEEKS = 8
MAX_WEEKS = 52
MAX_VALUE_LENGTH = 128
_SLUG = re.compile(SLUG_PATTERN)
_VALUE = re.compile(r"^[^\x00-\x1f\x7f]*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# The parameters are strings so that the handler reports every bad one at once (400 with ``errors``);
# ``schema_extra`` documents what the handler accepts, so the OpenAPI document admits nothing it refuses.
_MOMENT = {"min_length": 10, "max_length": 64}
_INTEGER = {"pattern": r"^\s*[+-]?[0-9]{1,10}\s*$"}
_VALUE_SCHEMA = {"max_length": MAX_VALUE_LENGTH, "pattern": r"^[^\x00-\x1f\x7f]*$"}

FromQ = Annotated[
    str | None,
    QueryParameter(
        name="from",
        description="Start of the range of onboarding starts (inclusive): ISO date (UTC midnight) or datetime "
        "(no offset: UTC). Default: 30 days before `to`.",
        schema_extra=_MOMENT,
    ),
]
ToQ = Annotated[
    str | None,
    QueryParameter(
        description="End of the range (exclusive): ISO datetime, or ISO date meaning the end of that day (UTC). "
        "Default: the end of today (UTC). At most 366 days after `from`.",
        schema_extra=_MOMENT,
    ),
]
PathQ = Annotated[
    str | None,
    QueryParameter(
        description="Path key (id in the manifest).", schema_extra={"max_length": 64, "pattern": SLUG_PATTERN}
    ),
]
# Required in the document; the handler still reports its absence with the other faults (the type
# stays optional, so Litestar does not refuse the request before the handler sees it).
RequiredPathQ = Annotated[
    str | None,
    QueryParameter(
        description="Path key (id in the manifest).",
        required=True,
        schema_extra={"max_length": 64, "pattern": SLUG_PATTERN},
    ),
]
VersionQ = Annotated[
    str | None,
    QueryParameter(
        description="Only users who started this version of the path (needs `path`), 1 or more.", schema_extra=_INTEGER
    ),
]
VariantQ = Annotated[
    str | None,
    QueryParameter(
        description="Only users in this experiment variant (empty: users without one).", schema_extra=_VALUE_SCHEMA
    ),
]
PersonaQ = Annotated[
    str | None, QueryParameter(description="Only users whose persona at start was this.", schema_extra=_VALUE_SCHEMA)
]
WindowQ = Annotated[
    str | None,
    QueryParameter(
        description=f"Conversion window in hours from the user's start, 1..{MAX_WINDOW_HOURS} "
        f"(default {DEFAULT_WINDOW_HOURS}).",
        schema_extra=_INTEGER,
    ),
]
WeeksQ = Annotated[
    str | None,
    QueryParameter(
        description=f"Weeks since signup to report, 0..{MAX_WEEKS} (default {DEFAULT_WEEKS}).", schema_extra=_INTEGER
    ),
]


@dataclass(frozen=True, slots=True)
class _Checked:
    filters: Filters
    window: timedelta
    weeks: int


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append({"key": key, "message": message, "source": "query"})

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            raise ProblemError(
                400, "validation-error", f"{first['message']} (at {first['key']})", errors=list(self.items)
            )


def _moment(value: str, key: str, errors: _Errors, *, end: bool) -> datetime | None:
    text = value.strip()
    try:
        if _DATE.match(text):
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1) if end else day, time(), tzinfo=UTC)
        if len(text) > 19 and text[-6] == " ":  # an unencoded '+' of the offset arrives as a space
            text = text[:-6] + "+" + text[-5:]
        moment = datetime.fromisoformat(text)
    except ValueError:
        errors.add(key, "must be an ISO 8601 date (YYYY-MM-DD) or datetime")
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _integer(value: str | None, key: str, default: int, low: int, high: int, errors: _Errors) -> int:
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        errors.add(key, "must be an integer")
        return default
    if not low <= number <= high:
        errors.add(key, f"must be between {low} and {high}")
        return default
    return number


def _value(value: str | None, key: str, errors: _Errors) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_VALUE_LENGTH or not _VALUE.match(value):
        errors.add(key, f"must be at most {MAX_VALUE_LENGTH} printable characters")
        return None
    return value


def check_query(
    *,
    from_: str | None,
    to: str | None,
    path: str | None,
    path_version: str | None,
    variant: str | None,
    persona: str | None,
    window: str | None = None,
    weeks: str | None = None,
    path_required: bool,
    now: datetime | None = None,
) -> _Checked:
    """Validate the query parameters of any endpoint; every problem is reported at once (400)."""
    errors = _Errors()
    current = now or datetime.now(UTC)
    default_end = datetime.combine(current.date() + timedelta(days=1), time(), tzinfo=UTC)
    end = _moment(to, "to", errors, end=True) if to is not None else default_end
    start = _moment(from_, "from", errors, end=False) if from_ is not None else None
    if end is not None and start is None and from_ is None:
        start = end - DEFAULT_RANGE
    if start is not None and end is not None:
        if start >= end:
            errors.add("from", "must be before to")
        elif end - start > MAX_RANGE:
            errors.add("to", f"the range may span at most {MAX_RANGE.days} days")
    if path is None:
        if path_required:
            errors.add("path", "is required")
        if path_version is not None:
            errors.add("path_version", "needs path")
    elif len(path) > 64 or not _SLUG.match(path):
        errors.add("path", "must be a path key (lower-case letters, digits and dashes)")
    version = _integer(path_version, "path_version", 0, 1, 2**31 - 1, errors) if path_version is not None else None
    window_hours = _integer(window, "window", DEFAULT_WINDOW_HOURS, 1, MAX_WINDOW_HOURS, errors)
    week_count = _integer(weeks, "weeks", DEFAULT_WEEKS, 0, MAX_WEEKS, errors)
    variant_value = _value(variant, "variant", errors)
    persona_value = _value(persona, "persona", errors)
    errors.raise_if_any()
    assert start is not None and end is not None
    return _Checked(
        filters=Filters(
            start=start,
            end=end,
            path_key=path,
            path_version=version,
            variant=variant_value,
            persona=persona_value,
        ),
        window=timedelta(hours=window_hours),
        weeks=week_count,
    )


async def resolve_path(
    request: Request[Principal, Any, Any],
    uow: NamedDependency[UnitOfWork],
    onboarding: NamedDependency[OnboardingService],
    key: str,
    version: int | None,
) -> PathDef:
    """The path definition from PostgreSQL (through the onboarding catalog cache); 404 when unknown. An API key's
    principal carries the tenant's revision; an admin session does not, so it is read."""
    known: int | None = getattr(request.user, "tenant_revision", None)
    revision = known if known is not None else await uow.run(tenancy.revision)
    path = await onboarding.find_path(uow, revision, key, version)
    if path is None:
        where = f" version {version}" if version is not None else ""
        raise ProblemError(404, "path-not-found", f"path {key!r}{where} does not exist", path=key)
    return path


def _applied(f: Filters) -> schemas.AppliedFilters:
    return schemas.AppliedFilters(
        from_=f.start, to=f.end, path=f.path_key, path_version=f.path_version, variant=f.variant, persona=f.persona
    )


async def _run(
    uow: NamedDependency[UnitOfWork],
    analytics: NamedDependency[AnalyticsService],
    name: str,
    key: Any,
    compute: Callable[[TenantId], T],
) -> Computed[T]:
    tenant = uow.tenant
    return await analytics.run(tenant, name, key, lambda: compute(tenant))


_PROBLEMS = {
    "problems": {
        404: "path-not-found: the path (or path version) does not exist",
        503: "analytics-unavailable: the query failed or timed out and no earlier result is cached",
    }
}


class AnalyticsController(Controller):
    path = "/v1/analytics"
    tags = ["analytics"]
    guards = [require_scope("analytics:read")]

    @get("/funnel", summary="Funnel of a path", opt=_PROBLEMS)
    async def funnel(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: RequiredPathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
        window: WindowQ = None,
    ) -> schemas.FunnelResponse:
        """Users who started the path; per required step, in path order, the users who completed it and
        every earlier step in order within the window from their start, the conversion from the previous
        step and from the start, and the median time from the previous step."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            window=window,
            path_required=True,
        )
        assert q.filters.path_key is not None
        path_def = await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        steps = tuple(s.id for s in path_def.required_steps)
        titles = {s.id: s.title for s in path_def.steps}
        result = await _run(
            uow,
            analytics,
            "funnel",
            (q.filters, steps, q.window),
            lambda tenant: analytics.queries.funnel(tenant, q.filters, steps, q.window),
        )
        return schemas.FunnelResponse(
            filters=_applied(q.filters),
            steps_version=path_def.version,
            window_hours=int(q.window / timedelta(hours=1)),
            started=result.value.started,
            steps=[
                schemas.FunnelStepOut(
                    step_id=s.step_id,
                    title=titles[s.step_id],
                    users=s.users,
                    conversion_from_previous=s.conversion_from_previous,
                    conversion_from_start=s.conversion_from_start,
                    median_seconds_from_previous=s.median_seconds_from_previous,
                )
                for s in result.value.steps
            ],
            stale=result.stale,
            computed_at=result.computed_at,
        )

    @get("/dropoff", summary="Drop-off by step of a path", opt=_PROBLEMS)
    async def dropoff(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: RequiredPathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
        window: WindowQ = None,
    ) -> schemas.DropoffResponse:
        """Per required step: users who reached the previous step (or started, for the first) but did not
        reach this one within the window, and their share of those who reached the previous step."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            window=window,
            path_required=True,
        )
        assert q.filters.path_key is not None
        path_def = await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        steps = tuple(s.id for s in path_def.required_steps)
        titles = {s.id: s.title for s in path_def.steps}
        result = await _run(
            uow,
            analytics,
            "dropoff",
            (q.filters, steps, q.window),
            lambda tenant: analytics.queries.dropoff(tenant, q.filters, steps, q.window),
        )
        return schemas.DropoffResponse(
            filters=_applied(q.filters),
            steps_version=path_def.version,
            window_hours=int(q.window / timedelta(hours=1)),
            started=result.value.started,
            steps=[
                schemas.DropoffStepOut(
                    step_id=s.step_id,
                    title=titles[s.step_id],
                    reached_previous=s.reached_previous,
                    reached=s.reached,
                    dropped=s.dropped,
                    share=s.share,
                )
                for s in result.value.steps
            ],
            stale=result.stale,
            computed_at=result.computed_at,
        )

    @get("/cohorts", summary="Cohort retention: signup week by weeks since signup", opt=_PROBLEMS)
    async def cohorts(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: PathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
        weeks: WeeksQ = None,
    ) -> schemas.CohortsResponse:
        """Users grouped by the Monday (UTC) of their start week; for each week since (0..weeks, up to the
        current week), the share of the cohort with any event in that week."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            weeks=weeks,
            path_required=False,
        )
        if q.filters.path_key is not None:
            await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        as_of = datetime.combine(datetime.now(UTC).date(), time(), tzinfo=UTC)
        result = await _run(
            uow,
            analytics,
            "cohorts",
            (q.filters, q.weeks, as_of),
            lambda tenant: analytics.queries.cohorts(tenant, q.filters, q.weeks, as_of),
        )
        return schemas.CohortsResponse(
            filters=_applied(q.filters),
            weeks=q.weeks,
            cohorts=[
                schemas.CohortOut(
                    cohort_week=c.cohort_week,
                    users=c.users,
                    weeks=[schemas.CohortWeekOut(w.week, w.week_start, w.users, w.retention) for w in c.weeks],
                )
                for c in result.value.cohorts
            ],
            stale=result.stale,
            computed_at=result.computed_at,
        )

    @get("/time-to-activation", summary="Time to activation: p50, p90 and a histogram", opt=_PROBLEMS)
    async def time_to_activation(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: PathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
    ) -> schemas.TimeToActivationResponse:
        """Seconds from each user's start to their first activation at or after it (on the path, when
        given); exact quantiles (the element at index floor(q * n) of the sorted times), and a histogram of the
        activated users over fixed buckets (< 1 h, 1-6 h, 6-24 h, 1-3 d, 3-7 d, 7-14 d, 14-30 d, ≥ 30 d; each
        lower bound inclusive, upper bound exclusive, in seconds) whose counts sum to `activated`."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            path_required=False,
        )
        if q.filters.path_key is not None:
            await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        result = await _run(
            uow,
            analytics,
            "time-to-activation",
            q.filters,
            lambda tenant: analytics.queries.time_to_activation(tenant, q.filters),
        )
        value = result.value
        return schemas.TimeToActivationResponse(
            filters=_applied(q.filters),
            users=value.users,
            activated=value.activated,
            p50_seconds=value.p50_seconds,
            p90_seconds=value.p90_seconds,
            histogram=[
                schemas.ActivationBucketOut(b.label, b.from_seconds, b.to_seconds, b.users) for b in value.histogram
            ],
            stale=result.stale,
            computed_at=result.computed_at,
        )

    @get("/step-completion", summary="Completion rate of each step of a path", opt=_PROBLEMS)
    async def step_completion(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: RequiredPathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
    ) -> schemas.StepCompletionResponse:
        """Per step (optional ones included, in path order): users who completed it at or after their
        start, over the users who started the path (any order, no window)."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            path_required=True,
        )
        assert q.filters.path_key is not None
        path_def = await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        steps = tuple(s.id for s in path_def.steps)
        result = await _run(
            uow,
            analytics,
            "step-completion",
            (q.filters, steps),
            lambda tenant: analytics.queries.step_completion(tenant, q.filters, steps),
        )
        defs = {s.id: s for s in path_def.steps}
        return schemas.StepCompletionResponse(
            filters=_applied(q.filters),
            steps_version=path_def.version,
            started=result.value.started,
            steps=[
                schemas.StepRateOut(
                    step_id=s.step_id,
                    title=defs[s.step_id].title,
                    optional=defs[s.step_id].optional,
                    completed=s.completed,
                    rate=s.rate,
                )
                for s in result.value.steps
            ],
            stale=result.stale,
            computed_at=result.computed_at,
        )

    @get("/nudges", summary="Nudge send, open and conversion rates", opt=_PROBLEMS)
    async def nudges(
        self,
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        from_: FromQ = None,
        to: ToQ = None,
    ) -> schemas.NudgeRatesResponse:
        """The design's nudge metrics over the range: **send rate**, the users flagged stuck in the range who were
        sent a nudge at or after their flag, over those flagged; per channel, of the nudges sent in the range, the
        **open rate** (opened: in-app messages the app showed; e-mail opens are not tracked), click rate and
        **conversion rate** (the nudged step completed within the outcome window), each over the nudges sent."""
        q = check_query(
            from_=from_, to=to, path=None, path_version=None, variant=None, persona=None, path_required=False
        )
        result = await _run(uow, analytics, "nudges", q.filters, lambda t: analytics.queries.nudge_rates(t, q.filters))
        v = result.value
        channels = [
            schemas.NudgeChannelOut(c.channel, c.sent, c.opened, c.clicked, c.converted, c.unsubscribed, c.open_rate,
                                    c.click_rate, c.conversion_rate)
            for c in v.channels
        ]  # fmt: skip
        return schemas.NudgeRatesResponse(
            filters=_applied(q.filters), stuck=v.stuck, nudged=v.nudged, send_rate=v.send_rate, sent=v.sent,
            opened=v.opened, converted=v.converted, open_rate=v.open_rate, conversion_rate=v.conversion_rate,
            channels=channels, stale=result.stale, computed_at=result.computed_at,
        )  # fmt: skip

    @get("/activation-rate", summary="Activation rate, overall, per path and per signup week", opt=_PROBLEMS)
    async def activation_rate(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
        onboarding: NamedDependency[OnboardingService],
        from_: FromQ = None,
        to: ToQ = None,
        path: PathQ = None,
        path_version: VersionQ = None,
        variant: VariantQ = None,
        persona: PersonaQ = None,
    ) -> schemas.ActivationRateResponse:
        """Users who activated at or after their start over the users who started: overall (each user
        once), per path of their start, and per signup week (the Monday, UTC, of the user's start, as the cohorts
        count it): every week that overlaps the range, oldest first, a week with no start at 0 users and a null
        rate; the weeks sum to the overall numbers."""
        q = check_query(
            from_=from_,
            to=to,
            path=path,
            path_version=path_version,
            variant=variant,
            persona=persona,
            path_required=False,
        )
        if q.filters.path_key is not None:
            await resolve_path(request, uow, onboarding, q.filters.path_key, q.filters.path_version)
        result = await _run(
            uow,
            analytics,
            "activation-rate",
            q.filters,
            lambda tenant: analytics.queries.activation_rate(tenant, q.filters),
        )
        value = result.value
        return schemas.ActivationRateResponse(
            filters=_applied(q.filters),
            users=value.users,
            activated=value.activated,
            rate=value.rate,
            paths=[schemas.PathActivationOut(p.path_key, p.users, p.activated, p.rate) for p in value.paths],
            weeks=[schemas.ActivationWeekOut(w.cohort_week, w.users, w.activated, w.rate) for w in value.weeks],
            stale=result.stale,
            computed_at=result.computed_at,
        )
