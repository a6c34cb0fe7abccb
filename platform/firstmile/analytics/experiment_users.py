"""The fold of ``events`` into ``experiment_users``: per (tenant, experiment, exposed user), what the experiment
analysis needs, kept up to date on every insert so the analysis reads one row per user instead of regrouping the
tenant's events (docs/analytics.md, "Experiment users"; the measurements: docs/benchmarks.md, issue 16).

Both stores call :func:`fold` inside ``insert`` and ``bulk_load`` with the rows they write to ``events``:

- an ``experiment.exposed`` row (``event_name``: the experiment, ``variant``: the variant) gives its user's row of
  that experiment the variant and the exposure time;
- an outcome row (``onboarding.activated``, ``onboarding.step_completed``, ``onboarding.stuck``,
  ``nudge.unsubscribed``) of a user who has exposures gives one row per experiment they were exposed to at or
  before the outcome: the activation time, the step id, the stuck or unsubscribe time. Its user's exposures are
  the batch's own plus what ``experiment_users`` holds, read with ONE lookup per tenant of the batch
  (:data:`~firstmile.analytics.sql.LOOKUP_EXPOSURES`), and none at all when the batch has no outcome.

Every column is an idempotent aggregate (min, max, set union): a redelivered event folded again changes nothing,
and so does the rebuild from ``events`` (:func:`~firstmile.analytics.sql.rebuild_experiment_users`) run over rows
the sink already folded.

**Ordering assumption.** An outcome is folded against the exposures known when it is inserted. A user's events
share a Kafka partition (key ``tenant:user``, :func:`firstmile.kit.outbox.partition_key`) and embedded mode
delivers in outbox order, so the exposure is inserted (in the same batch or an earlier one) before that user's
later outcomes. An outcome that overtook its exposure anyway would be missing from the analysis until the rebuild
(``firstmile analytics rebuild-experiments``) recomputes the user from ``events``.

Times are compared as ``YYYY-MM-DD hh:mm:ss.fff`` text (:func:`~firstmile.analytics.sql.timestamp`): the
millisecond the engine stores, in an order that is the text's order, so the fold and the rebuild agree to the
millisecond.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from firstmile.analytics.rows import ACTIVATED, EXPOSED, NUDGE_UNSUBSCRIBED, STEP_COMPLETED, STUCK, AnalyticsEvent
from firstmile.analytics.sql import timestamp

OUTCOMES = frozenset({ACTIVATED, STEP_COMPLETED, STUCK, NUDGE_UNSUBSCRIBED})
"""The event types the analysis counts after an exposure."""

LOOKUP_USERS = 10_000
"""At most this many users per lookup statement (a sink batch has fewer; a bulk load may have more)."""

Lookup = Callable[[uuid.UUID, list[str]], Iterable[Mapping[str, Any]]]
"""Runs :data:`~firstmile.analytics.sql.LOOKUP_EXPOSURES` for one tenant and some of its users, as the store runs
a tenant's statements (on ClickHouse with the tenant setting); rows ``experiment_id, user_id, first_exposed``."""

_Key = tuple[uuid.UUID, str, str]  # tenant, experiment, user


@dataclass(slots=True)
class _Row:
    variant: str = ""
    exposed_at: str | None = None
    activated_at: str | None = None
    steps: set[str] = field(default_factory=set)
    stuck_at: str | None = None
    unsubscribed_at: str | None = None


def _min(a: str | None, b: str) -> str:
    return b if a is None or b < a else a


def _max(a: str | None, b: str) -> str:
    return b if a is None or b > a else a


def _outcome(row: _Row, event: AnalyticsEvent, at: str) -> None:
    kind = event.event_type
    if kind == ACTIVATED:
        row.activated_at = _min(row.activated_at, at)
    elif kind == STEP_COMPLETED:
        row.steps.add(event.step_id)
    elif kind == STUCK:
        row.stuck_at = _max(row.stuck_at, at)
    else:
        row.unsubscribed_at = _max(row.unsubscribed_at, at)


def fold(rows: Sequence[AnalyticsEvent], lookup: Lookup) -> list[tuple[object, ...]]:
    """The ``experiment_users`` rows that ``rows`` add, folded per (tenant, experiment, user) within the batch
    (columns in :data:`~firstmile.analytics.sql.EXPERIMENT_USERS_COLUMNS` order). ``lookup`` is called once per
    tenant with outcome rows (in chunks of :data:`LOOKUP_USERS` users), never when there is none."""
    folded: dict[_Key, _Row] = {}
    exposed: dict[tuple[uuid.UUID, str], dict[str, str]] = {}  # (tenant, user) -> {experiment: earliest exposure}
    outcomes: list[tuple[AnalyticsEvent, str]] = []
    for event in rows:
        kind = event.event_type
        if kind == EXPOSED:
            at = timestamp(event.occurred_at)
            row = folded.setdefault((event.tenant_id, event.event_name, event.user_id), _Row())
            row.variant = max(row.variant, event.variant)
            row.exposed_at = _min(row.exposed_at, at)
            mine = exposed.setdefault((event.tenant_id, event.user_id), {})
            mine[event.event_name] = _min(mine.get(event.event_name), at)
        elif kind in OUTCOMES:
            outcomes.append((event, timestamp(event.occurred_at)))
    if outcomes:
        users: dict[uuid.UUID, set[str]] = {}
        for event, _ in outcomes:
            users.setdefault(event.tenant_id, set()).add(event.user_id)
        for tenant, names in users.items():
            ordered = sorted(names)
            for start in range(0, len(ordered), LOOKUP_USERS):
                for found in lookup(tenant, ordered[start : start + LOOKUP_USERS]):
                    mine = exposed.setdefault((tenant, str(found["user_id"])), {})
                    experiment = str(found["experiment_id"])
                    mine[experiment] = _min(mine.get(experiment), str(found["first_exposed"]))
        for event, at in outcomes:
            for experiment, t0 in exposed.get((event.tenant_id, event.user_id), {}).items():
                if t0 <= at:
                    _outcome(folded.setdefault((event.tenant_id, experiment, event.user_id), _Row()), event, at)
    return [
        (tenant, experiment, user, r.variant, r.exposed_at, r.activated_at, sorted(r.steps), r.stuck_at,
         r.unsubscribed_at)
        for (tenant, experiment, user), r in folded.items()
    ]  # fmt: skip


_ENCODER = msgspec.json.Encoder()


def encode(rows: Sequence[tuple[object, ...]]) -> bytes:
    """``JSONCompactEachRow`` lines for :data:`~firstmile.analytics.sql.INSERT_EXPERIMENT_USERS`."""
    return _ENCODER.encode_lines(rows)
