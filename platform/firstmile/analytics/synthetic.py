"""Seeded synthetic onboarding activity: for correctness tests, the 10M-event benchmark and the demo.

One call describes one tenant: users start one of the tenant's paths (with a
persona and an experiment variant), complete its required steps in order with a
falling probability and realistic, long-tailed delays (a few completions carry a
client timestamp slightly before the previous step's, and some arrive after a
typical conversion window), sometimes complete optional steps, activate on the
path's activation step, complete the path, and use the product (``track`` and
``page`` events) in the weeks after they start, less and less often: the retention
curve. The same seed and tenant give the same events, ids included.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from firstmile.analytics.rows import ACTIVATED, COMPLETED, STARTED, STEP_COMPLETED, AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore
from firstmile.onboarding.domain import PathDef

PERSONAS = ("developer", "analyst", "admin", "marketer", "it_admin", "")
PERSONA_WEIGHTS = (30, 25, 15, 15, 10, 5)
VARIANTS = ("", "control", "treatment")
VARIANT_WEIGHTS = (30, 35, 35)
PRODUCT_EVENTS = (
    "Report Viewed",
    "Dashboard Viewed",
    "Query Run",
    "Event Received",
    "Export Downloaded",
    "Alert Created",
)
PAGES = ("Home", "Reports", "Dashboards", "Settings", "Billing", "Docs")


@dataclass(frozen=True, slots=True)
class SyntheticPath:
    key: str
    version: int
    steps: tuple[str, ...]
    activation_step: str
    optional: frozenset[str] = frozenset()

    @classmethod
    def from_path(cls, path: PathDef) -> SyntheticPath:
        return cls(
            key=path.key,
            version=path.version,
            steps=tuple(s.id for s in path.steps),
            activation_step=path.activation_step,
            optional=frozenset(s.id for s in path.steps if s.optional),
        )

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(s for s in self.steps if s not in self.optional)


def _ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class _Gen:
    def __init__(self, tenant_id: uuid.UUID, seed: int) -> None:
        self.tenant_id = tenant_id
        self.rng = random.Random(f"{seed}:{tenant_id}")

    def event_id(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def event(
        self,
        event_type: str,
        user_id: str,
        at: datetime,
        *,
        name: str = "",
        path: SyntheticPath | None = None,
        step_id: str = "",
        variant: str = "",
        persona: str = "",
        properties: str = "{}",
    ) -> AnalyticsEvent:
        at = _ms(at)
        return AnalyticsEvent(
            tenant_id=self.tenant_id,
            event_id=self.event_id(),
            event_type=event_type,
            event_name=name,
            user_id=user_id,
            anonymous_id="",
            occurred_at=at,
            received_at=at + timedelta(milliseconds=self.rng.randrange(5, 2000)),
            path_key=path.key if path else "",
            path_version=path.version if path else 0,
            step_id=step_id,
            variant=variant,
            persona=persona,
            properties=properties,
        )

    def delay(self, position: int) -> timedelta:
        """Time to the next step: log-normal, median ~20 min for the first step, growing along the path."""
        minutes = self.rng.lognormvariate(math.log(20 * (1.8**position)), 1.4)
        return timedelta(minutes=min(minutes, 60 * 24 * 30))


def _paths(paths: Sequence[PathDef | SyntheticPath]) -> list[SyntheticPath]:
    out = [p if isinstance(p, SyntheticPath) else SyntheticPath.from_path(p) for p in paths]
    if not out:
        raise ValueError("synthetic activity needs at least one path")
    return out


def generate(
    tenant_id: uuid.UUID,
    paths: Sequence[PathDef | SyntheticPath],
    *,
    users: int,
    weeks: int,
    end: datetime,
    seed: int = 7,
    product: bool = True,
) -> Iterator[AnalyticsEvent]:
    """Events of ``users`` users who start over the ``weeks`` weeks before ``end`` (nothing after ``end``)."""
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    defs = _paths(paths)
    g = _Gen(tenant_id, seed)
    rng = g.rng
    begin = end - timedelta(weeks=weeks)
    span_ms = int((end - begin) / timedelta(milliseconds=1))
    for n in range(users):
        user_id = f"user-{n:06d}"
        persona = rng.choices(PERSONAS, PERSONA_WEIGHTS)[0]
        path = defs[PERSONAS.index(persona) % len(defs)] if rng.random() < 0.8 else rng.choice(defs)
        variant = rng.choices(VARIANTS, VARIANT_WEIGHTS)[0]
        t0 = _ms(begin + timedelta(milliseconds=rng.randrange(span_ms)))
        activated = yield from _onboarding(g, user_id, path, variant, persona, t0, end)
        if product:
            yield from _product(g, user_id, t0, end, activated)


def _onboarding(
    g: _Gen, user_id: str, path: SyntheticPath, variant: str, persona: str, t0: datetime, end: datetime
) -> Generator[AnalyticsEvent, None, bool]:
    """One user's onboarding facts; returns whether the user activated."""
    rng = g.rng

    def fact(event_type: str, at: datetime, step_id: str = "") -> AnalyticsEvent:
        return g.event(event_type, user_id, at, path=path, step_id=step_id, variant=variant, persona=persona)

    yield fact(STARTED, t0)
    keep = 0.86 + (0.05 if variant == "treatment" else 0.0) + (0.04 if persona == "developer" else 0.0)
    t = t0
    done_required = 0
    activated = False
    for position, step in enumerate(path.required):
        if rng.random() > keep:
            break
        keep *= 0.9
        at = t + g.delay(position)
        if rng.random() < 0.04:  # client clock skew / late report: stamped before the previous step
            at = t - timedelta(seconds=rng.randrange(1, 600))
        if at > end:
            break
        yield fact(STEP_COMPLETED, at, step)
        t = max(t, at)
        done_required += 1
        if step == path.activation_step:
            activated = True
            yield fact(ACTIVATED, at, step)
    for step in sorted(path.optional):
        if rng.random() < 0.3:
            at = t0 + g.delay(2)
            if at <= end:
                yield fact(STEP_COMPLETED, at, step)
    if path.required and done_required == len(path.required) and t <= end:
        yield fact(COMPLETED, t)
    return activated


def _product(g: _Gen, user_id: str, t0: datetime, end: datetime, activated: bool) -> Iterator[AnalyticsEvent]:
    rng = g.rng
    active = 0.75 if activated else 0.4
    week = 0
    while True:
        week_start = t0 + timedelta(weeks=week)
        if week_start > end:
            return
        if week == 0 or rng.random() < active:
            for _ in range(rng.randint(1, 6)):
                at = week_start + timedelta(seconds=rng.randrange(7 * 24 * 3600))
                if at > end:
                    continue
                if rng.random() < 0.7:
                    name = rng.choice(PRODUCT_EVENTS)
                    yield g.event("track", user_id, at, name=name, properties='{"source":"synthetic"}')
                else:
                    page = rng.choice(PAGES)
                    yield g.event("page", user_id, at, name=page, properties=f'{{"path":"/{page.lower()}"}}')
        if week > 0:
            active *= 0.85
        week += 1


def seed_demo(
    store: AnalyticsStore,
    tenant_id: uuid.UUID,
    paths: Sequence[PathDef | SyntheticPath],
    users: int = 2000,
    seed: int = 7,
    *,
    weeks: int = 8,
    end: datetime | None = None,
    batch: int = 20_000,
) -> int:
    """Seed ``users`` users' activity over the ``weeks`` weeks before ``end`` (default: now); returns rows inserted.

    Idempotent: ids depend only on the seed and the tenant, so a second run writes the same
    events again, which every query counts once (and the table folds at its next merge).
    """
    moment = _ms(end or datetime.now(UTC))
    events = generate(tenant_id, paths, users=users, weeks=weeks, end=moment, seed=seed)
    inserted = 0
    while chunk := list(islice(events, batch)):
        inserted += store.insert(chunk)
    return inserted
