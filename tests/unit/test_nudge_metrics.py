"""The design's nudge metrics as analytics queries (send, open and conversion rates) on the real engine (chdb),
from ``nudge.*`` and ``onboarding.stuck`` events mapped as the analytics sink maps them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.analytics.queries import AnalyticsQueries, Filters
from firstmile.analytics.rows import AnalyticsEvent
from firstmile.analytics.sink import to_analytics
from firstmile.events.bus import UnprocessableEventError
from firstmile.events.envelope import Envelope
from firstmile.kit.scope import OPERATOR_CLI

D0 = datetime(2026, 11, 2, tzinfo=UTC)
D1 = D0 + timedelta(days=7)


def _event(tenant: uuid.UUID, kind: str, at: datetime, **payload: Any) -> AnalyticsEvent:
    return to_analytics(Envelope(uuid.uuid4(), tenant, kind, at, payload))


def _stuck(tenant: uuid.UUID, user: str, at: datetime) -> AnalyticsEvent:
    return _event(tenant, "onboarding.stuck", at, user_id=user, path_id="dev", path_version=1, step_id="key")


def _nudge(tenant: uuid.UUID, kind: str, user: str, send: str, at: datetime, channel: str) -> AnalyticsEvent:
    return _event(tenant, kind, at, user_id=user, send_id=send, channel=channel, arm=f"short|{channel}|policy",
                  trigger="stuck:key")  # fmt: skip


def _history(tenant: uuid.UUID) -> list[AnalyticsEvent]:
    h = timedelta(hours=1)
    s1, s2, s3, s4 = (str(uuid.uuid4()) for _ in range(4))
    return [
        _stuck(tenant, "a", D0 + h), _stuck(tenant, "b", D0 + h), _stuck(tenant, "c", D0 + h),
        _stuck(tenant, "d", D0 - timedelta(days=1)),  # flagged before the range
        _nudge(tenant, "nudge.sent", "a", s1, D0 + 2 * h, "email"),
        _nudge(tenant, "nudge.clicked", "a", s1, D0 + 3 * h, "email"),
        _nudge(tenant, "nudge.converted", "a", s1, D0 + 5 * h, "email"),
        _nudge(tenant, "nudge.sent", "b", s2, D0 + 2 * h, "in_app"),
        _nudge(tenant, "nudge.opened", "b", s2, D0 + 2.5 * h, "in_app"),
        _nudge(tenant, "nudge.unsubscribed", "b", s2, D1 + h, "in_app"),  # after the range, about a send in it
        _nudge(tenant, "nudge.sent", "e", s3, D0 + 4 * h, "in_app"),  # a declared trigger's: e was never stuck
        _nudge(tenant, "nudge.sent", "a", s4, D1 + h, "email"),  # sent after the range
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tenants(analytics_store: ChdbStore) -> tuple[uuid.UUID, uuid.UUID]:
    mine, theirs = OPERATOR_CLI.tenant(uuid.uuid4()), OPERATOR_CLI.tenant(uuid.uuid4())
    rows = _history(mine) + _history(theirs) + _history(theirs)
    assert analytics_store.insert(rows) == len(rows)
    return mine, theirs


def test_the_design_metrics_count_each_send_once_and_only_the_tenants_own(
    analytics_store: ChdbStore, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    rates = AnalyticsQueries(analytics_store).nudge_rates(OPERATOR_CLI.tenant(tenants[0]), Filters(D0, D1))
    assert (rates.stuck, rates.nudged) == (3, 2) and rates.send_rate == pytest.approx(2 / 3)  # a and b of a, b, c
    assert (rates.sent, rates.opened, rates.converted) == (3, 1, 1)
    assert rates.open_rate == pytest.approx(1 / 3) and rates.conversion_rate == pytest.approx(1 / 3)
    by_channel = {c.channel: c for c in rates.channels}
    email, in_app = by_channel["email"], by_channel["in_app"]
    assert (email.sent, email.opened, email.clicked, email.converted, email.unsubscribed) == (1, 0, 1, 1, 0)
    assert (in_app.sent, in_app.opened, in_app.clicked, in_app.converted, in_app.unsubscribed) == (2, 1, 0, 0, 1)
    assert in_app.open_rate == pytest.approx(0.5) and email.conversion_rate == 1.0


def test_an_empty_range_has_no_rates(analytics_store: ChdbStore, tenants: tuple[uuid.UUID, uuid.UUID]) -> None:
    empty = Filters(D0 - timedelta(days=30), D0 - timedelta(days=20))
    rates = AnalyticsQueries(analytics_store).nudge_rates(OPERATOR_CLI.tenant(tenants[0]), empty)
    assert (rates.stuck, rates.sent, rates.send_rate, rates.open_rate, rates.channels) == (0, 0, None, None, ())


def test_a_nudge_event_keeps_ids_and_channel_and_no_personal_data() -> None:
    row = _nudge(uuid.uuid4(), "nudge.clicked", "a", "s-1", D0, "email")
    assert (row.event_type, row.user_id, row.step_id, row.variant) == (
        "nudge.clicked",
        "a",
        "key",
        "short|email|policy",
    )
    assert row.properties == '{"send_id":"s-1","channel":"email","trigger":"stuck:key"}'
    with pytest.raises(UnprocessableEventError, match="needs user_id and send_id"):
        _event(uuid.uuid4(), "nudge.sent", D0, user_id="a")
