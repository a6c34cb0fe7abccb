"""The review queue's pure rules (firstmile.onboarding.review, docs/review.md): who is eligible for a path, how many
of a step's criteria an event meets, which decision fits which kind of review, when a segment pin applies, the
sampling settings and which decisions are sampled; and the review-queue check's figures and notification
(firstmile.analytics.review_watch), without a database."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from firstmile.analytics.repository import QueueCrossing
from firstmile.analytics.review_watch import NOTICE_TYPE, email_body, email_subject, queue_metrics, webhook_payload
from firstmile.kit.errors import ProblemError
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import Decision
from firstmile.onboarding.review import KINDS, REASONS, Pin, ReviewSampling, criteria_met, eligible, status_of
from firstmile.onboarding.service import OnboardingService

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


def _path(targeting: tuple[dict[str, object], ...] = ()) -> PathDef:
    steps = [{"id": f"s{i}", "title": f"Step {i}", "completion": {"event": f"E{i}"}} for i in range(4)]
    return PathDef.from_definition(
        "enterprise", 1, {"name": "E", "activation_step": "s1", "targeting": list(targeting), "steps": steps}
    )


# ---------------------------------------------------------------------- eligibility


def test_a_path_without_targeting_is_open_to_anyone() -> None:
    assert eligible(_path(), {})
    assert eligible(_path(), {"persona": "developer"})


def test_eligibility_needs_every_predicate_of_the_targeting() -> None:
    size: dict[str, object] = {"field": "company_size", "op": "in", "value": ["201-1000", "1001+"]}
    path = _path((size, {"field": "role", "value": "it_admin"}))  # the second's op omitted: eq
    assert eligible(path, {"company_size": "1001+", "role": "it_admin"})
    assert not eligible(path, {"company_size": "1001+", "role": "developer"})
    assert not eligible(path, {"company_size": "1-10", "role": "it_admin"})
    assert not eligible(path, {"role": "it_admin"})  # an absent trait never matches


# ---------------------------------------------------------------------- partial matches


def test_criteria_met_counts_the_criteria_an_event_meets() -> None:
    completion = {
        "event": "Users Provisioned",
        "where": [{"field": "count", "op": "gte", "value": 10}, {"field": "source", "value": "scim"}],
    }
    assert criteria_met(completion, {"count": 12, "source": "scim"}) == (2, 2)
    assert criteria_met(completion, {"count": 3, "source": "scim"}) == (1, 2)  # partial: a review
    assert criteria_met(completion, {"count": 3}) == (0, 2)
    assert criteria_met({"event": "SSO Configured"}, {"anything": 1}) == (0, 0)  # no criteria: nothing to meet


# ---------------------------------------------------------------------- decisions


@pytest.mark.parametrize(("kind", "decision", "status"), [
    ("step", "approve", "approved"), ("step", "reject", "rejected"),
    ("ambiguous", "approve", "approved"), ("ambiguous", "reject", "rejected"),
    ("decision", "right", "right"), ("decision", "wrong", "wrong"),
])  # fmt: skip
def test_each_kind_is_decided_with_its_own_words(kind: str, decision: str, status: str) -> None:
    assert status_of(kind, decision) == status


@pytest.mark.parametrize(("kind", "decision"), [
    ("step", "right"), ("ambiguous", "wrong"), ("decision", "approve"), ("decision", "reject"), ("step", "maybe"),
    ("step", ""),
])  # fmt: skip
def test_a_decision_that_does_not_fit_its_kind_is_a_400_problem(kind: str, decision: str) -> None:
    with pytest.raises(ProblemError) as raised:
        status_of(kind, decision)
    assert raised.value.status == 400 and raised.value.slug == "validation-error"
    assert raised.value.extensions["errors"][0]["key"] == "decision"


def test_the_kinds_and_reasons_are_the_documented_ones() -> None:
    assert KINDS == ("step", "ambiguous", "decision")
    assert set(REASONS) == {"review_step", "partial_match", "path_version_changed", "contradicts_record",
                            "low_confidence"}  # fmt: skip


# ---------------------------------------------------------------------- segment pins


def _pin(expires_at: datetime | None = None, segment: tuple[dict[str, object], ...] | None = None) -> Pin:
    found = segment if segment is not None else ({"field": "plan", "value": "enterprise"},)
    return Pin(7, found, "enterprise", False, None, "editor@acme.example", expires_at)


def test_a_pin_applies_to_the_users_its_segment_admits() -> None:
    pin = _pin(segment=({"field": "plan", "value": "enterprise"}, {"field": "seats", "op": "gte", "value": 50}))
    assert pin.applies({"plan": "enterprise", "seats": 80}, NOW)
    assert not pin.applies({"plan": "enterprise", "seats": 10}, NOW)
    assert not pin.applies({"plan": "team", "seats": 80}, NOW)
    assert not pin.applies({}, NOW)


def test_a_pin_stops_applying_when_it_expires() -> None:
    pin = _pin(expires_at=NOW + timedelta(hours=1))
    traits = {"plan": "enterprise"}
    assert pin.applies(traits, NOW)
    assert pin.applies(traits, NOW + timedelta(minutes=59, seconds=59))
    assert not pin.applies(traits, NOW + timedelta(hours=1))  # at the expiry: no longer
    assert not pin.applies(traits, NOW + timedelta(days=1))
    assert _pin(expires_at=None).applies(traits, NOW + timedelta(days=3650))  # no expiry: until revoked


def test_a_pin_records_who_set_it_and_whether_it_was_forced() -> None:
    forced = Pin(9, ({"field": "plan", "value": "x"},), "enterprise", True, "pilot customer", "ed", None)
    assert forced.as_record() == {"override_id": 9, "by": "ed", "forced": True, "reason": "pilot customer"}


# ---------------------------------------------------------------------- sampling


def test_sampling_settings_are_shares_between_0_and_1() -> None:
    assert ReviewSampling() == ReviewSampling(0.6, 0.1)
    ReviewSampling(0.0, 0.0)
    ReviewSampling(1.0, 1.0)
    for threshold, rate in ((-0.1, 0.1), (1.1, 0.1), (0.5, -0.01), (0.5, 1.5)):
        with pytest.raises(ValueError, match="between 0 and 1"):
            ReviewSampling(threshold, rate)


def _decision(selected_by: str = "model", confidence: float | None = 0.3) -> Decision:
    model = "path_classifier" if selected_by == "model" else None
    return Decision("enterprise", 1, selected_by, None, None, 3, model=model, confidence=confidence)


def test_only_model_decisions_below_the_threshold_are_sampled() -> None:
    every = OnboardingService(CatalogCache(), sampling=ReviewSampling(0.6, 1.0))
    assert every._sampled(_decision(confidence=0.59))
    assert not every._sampled(_decision(confidence=0.6))  # at the threshold: confident enough
    assert not every._sampled(_decision(confidence=0.95))
    assert not every._sampled(_decision(confidence=None))
    assert not every._sampled(_decision("rules", confidence=0.1))
    assert not every._sampled(_decision("human", confidence=0.1))
    none = OnboardingService(CatalogCache(), sampling=ReviewSampling(0.6, 0.0))
    assert not none._sampled(_decision(confidence=0.1))
    assert not OnboardingService(CatalogCache())._sampled(_decision(confidence=0.1))  # no sampling given: off


def test_the_sample_rate_is_the_share_of_low_confidence_decisions_sampled() -> None:
    service = OnboardingService(CatalogCache(), sampling=ReviewSampling(0.6, 0.25), rng=random.Random(20))
    sampled = sum(service._sampled(_decision(confidence=0.4)) for _ in range(4000))
    assert 900 < sampled < 1100  # 25% of 4,000, within about 3.5 standard deviations


# ---------------------------------------------------------------------- the review-queue check


def test_the_queue_figures_sum_lengths_and_take_the_oldest_age_over_tenants() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    rows = [
        (a, "step", 3, NOW - timedelta(minutes=5)),
        (b, "step", 4, NOW - timedelta(hours=2)),
        (b, "decision", 1, NOW - timedelta(seconds=30)),
    ]
    assert queue_metrics(rows, NOW) == {"step": (7, 7200.0), "ambiguous": (0, 0.0), "decision": (1, 30.0)}
    assert queue_metrics([], NOW) == dict.fromkeys(KINDS, (0, 0.0))  # every kind, 0 when none is pending


def _crossing() -> QueueCrossing:
    return QueueCrossing(
        id=uuid.UUID("6d1f2a47-0b8e-4c1e-9d9b-2f9b5d3c1a10"), pending=12, threshold=10,
        by_kind={"step": 9, "decision": 3}, oldest_at=NOW - timedelta(days=1, hours=2, minutes=5), crossed_at=NOW,
        delivery={}, delivered_at=None, cleared_at=None,
    )  # fmt: skip


def test_the_notification_says_how_many_wait_and_where_without_personal_data() -> None:
    crossing = _crossing()
    url = "https://firstmile.test/admin/reviews"
    assert email_subject(crossing, "Acme") == "[Firstmile] Acme: 12 reviews waiting (threshold 10)"
    assert email_body(crossing, "Acme", url) == (
        "12 reviews are waiting in the review queue, more than the threshold of 10.\n"
        "By kind: step 9, decision 3.\n"
        "The oldest has waited 1d 2h 5m (since 2026-12-07 09:55 UTC).\n"
        "\n"
        "You get this once until the queue is back at or below the threshold.\n"
        "\n"
        "Tenant: Acme\n"
        "Review queue: https://firstmile.test/admin/reviews\n"
        "Notification: 6d1f2a47-0b8e-4c1e-9d9b-2f9b5d3c1a10\n"
    )
    assert webhook_payload(crossing, "acme", url) == {
        "type": NOTICE_TYPE,
        "timestamp": NOW.isoformat(),
        "data": {
            "id": "6d1f2a47-0b8e-4c1e-9d9b-2f9b5d3c1a10", "tenant": "acme", "pending": 12, "threshold": 10,
            "by_kind": {"step": 9, "decision": 3}, "oldest_at": crossing.oldest_at.isoformat()
            if crossing.oldest_at else None, "review_queue": url,
        },
    }  # fmt: skip
