"""The nudge policy: one budget across channels per local day, quiet hours, consent and suppression, DST."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest

from firstmile.nudges.policy import Audience, NudgePolicy, PolicyError, evaluate, local_instant, zone

NY = "America/New_York"
DEFAULT = NudgePolicy()  # one a day, quiet 21:00-08:00, onboarding sent by default


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_first_nudge_in_the_day_goes_now() -> None:
    now = utc(2026, 6, 10, 15, 0)  # 11:00 in New York
    verdict = evaluate(DEFAULT, Audience(NY), "email", "onboarding", now, [])
    assert verdict.allowed and verdict.send_at == now and not verdict.deferred
    assert verdict.checks == {"consent": "pass", "suppression": "pass", "fatigue": "pass", "quiet_hours": "pass"}


def test_the_budget_is_shared_by_every_channel_and_counted_in_the_users_day() -> None:
    sent = [utc(2026, 6, 10, 13, 0)]  # an in-app nudge at 09:00 New York time
    now = utc(2026, 6, 10, 20, 0)  # 16:00 the same local day
    for channel in ("email", "sms", "in_app", "push"):
        verdict = evaluate(DEFAULT, Audience(NY), channel, "onboarding", now, sent)
        # deferred past the local midnight, then past quiet hours: 08:00 EDT on the 11th
        assert verdict.allowed and verdict.send_at == utc(2026, 6, 11, 12, 0), channel
        assert verdict.reasons == ("fatigue-cap", "quiet-hours") and verdict.deferred
    # the same instants, for a user in Tokyo, are two different local days: no deferral
    tokyo = evaluate(DEFAULT, Audience("Asia/Tokyo"), "email", "onboarding", utc(2026, 6, 10, 23, 30), sent)
    assert tokyo.allowed and tokyo.send_at == utc(2026, 6, 10, 23, 30)  # 08:30 on the 11th in Tokyo


def test_quiet_hours_defer_to_their_end_across_midnight() -> None:
    late = evaluate(DEFAULT, Audience(NY), "sms", "onboarding", utc(2026, 6, 11, 2, 0), [])  # 22:00 on the 10th
    assert late.send_at == utc(2026, 6, 11, 12, 0) and late.reasons == ("quiet-hours",)
    early = evaluate(DEFAULT, Audience(NY), "sms", "onboarding", utc(2026, 6, 11, 10, 0), [])  # 06:00 on the 11th
    assert early.send_at == utc(2026, 6, 11, 12, 0)
    day = NudgePolicy(quiet_start=time(12), quiet_end=time(13))  # a window inside one day
    assert evaluate(day, Audience(NY), "sms", "onboarding", utc(2026, 6, 11, 16, 30), []).send_at == utc(
        2026, 6, 11, 17, 0
    )


def test_spring_forward_day_has_23_hours_and_the_budget_follows_the_calendar() -> None:
    # 2026-03-08: New York goes from 02:00 EST to 03:00 EDT. A nudge at 00:30 EST (05:30Z) uses the day's budget;
    # the next may go at 08:00 EDT on the 9th, which is 12:00Z (on the 7th, 08:00 was 13:00Z).
    sent = [utc(2026, 3, 8, 5, 30)]
    verdict = evaluate(DEFAULT, Audience(NY), "email", "onboarding", utc(2026, 3, 8, 16, 0), sent)
    assert verdict.send_at == utc(2026, 3, 9, 12, 0)
    before = evaluate(DEFAULT, Audience(NY), "email", "onboarding", utc(2026, 3, 7, 10, 0), [])
    assert before.send_at == utc(2026, 3, 7, 13, 0)  # 08:00 EST


def test_fall_back_day_has_25_hours_and_a_quiet_end_in_the_repeated_hour_is_its_first_occurrence() -> None:
    # 2026-11-01: New York goes from 02:00 EDT back to 01:00 EST; 01:30 happens twice.
    policy = NudgePolicy(quiet_start=time(0), quiet_end=time(1, 30))
    verdict = evaluate(policy, Audience(NY), "push", "onboarding", utc(2026, 11, 1, 4, 15), [])  # 00:15 EDT
    assert verdict.send_at == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, the first 01:30
    # a send at 23:30 EST on the 1st (04:30Z on the 2nd) is still the 1st's budget: a 25-hour day
    sent = [utc(2026, 11, 1, 4, 5)]  # 00:05 EDT on the 1st
    late = evaluate(NudgePolicy(quiet_start=None, quiet_end=None), Audience(NY), "email", "onboarding",
                    utc(2026, 11, 2, 4, 30), sent)  # fmt: skip
    assert late.send_at == utc(2026, 11, 2, 5, 0)  # midnight EST of the 2nd


def test_a_quiet_end_inside_the_skipped_hour_resolves_to_the_end_of_the_gap() -> None:
    policy = NudgePolicy(quiet_start=time(0), quiet_end=time(2, 30))  # 02:30 does not exist on 2026-03-08
    verdict = evaluate(policy, Audience(NY), "email", "onboarding", utc(2026, 3, 8, 5, 10), [])  # 00:10 EST
    assert verdict.send_at == utc(2026, 3, 8, 7, 0)  # 03:00 EDT, the first instant after the gap
    assert local_instant(date(2026, 3, 8), time(2, 30), zone(NY)) == utc(2026, 3, 8, 7, 0)


def test_consent_unsubscribe_and_suppression_deny_whatever_the_clock() -> None:
    now = utc(2026, 6, 10, 15, 0)
    product = evaluate(DEFAULT, Audience(NY), "email", "product", now, [])
    assert not product.allowed and product.reasons == ("no-consent",) and product.send_at is None
    granted = Audience(NY, consents={("email", "product"): True})
    assert evaluate(DEFAULT, granted, "email", "product", now, []).allowed
    withdrawn = Audience(NY, consents={("email", "onboarding"): False})
    assert evaluate(DEFAULT, withdrawn, "email", "onboarding", now, []).reasons == ("unsubscribed",)
    assert evaluate(DEFAULT, withdrawn, "sms", "onboarding", now, []).allowed  # consent is per channel
    bounced = evaluate(DEFAULT, Audience(NY, suppressed=True), "email", "onboarding", now, [])
    assert not bounced.allowed and bounced.reasons == ("suppressed",)


def test_a_deferral_beyond_the_limit_drops_the_nudge_and_a_cap_of_zero_sends_nothing() -> None:
    short = NudgePolicy(max_delay=timedelta(hours=2))
    late = evaluate(short, Audience(NY), "email", "onboarding", utc(2026, 6, 11, 2, 0), [])  # 22:00: 10 h of quiet
    assert not late.allowed and late.reasons == ("quiet-hours", "deferred-too-long")
    none = evaluate(NudgePolicy(daily_cap=0), Audience(NY), "email", "onboarding", utc(2026, 6, 10, 15, 0), [])
    assert not none.allowed and none.reasons == ("fatigue-cap",)
    two = NudgePolicy(daily_cap=2)
    assert evaluate(two, Audience(NY), "email", "onboarding", utc(2026, 6, 10, 15, 0), [utc(2026, 6, 10, 13)]).allowed


def test_bad_input_is_refused_clearly() -> None:
    now = utc(2026, 6, 10, 15, 0)
    with pytest.raises(PolicyError, match="unknown channel 'fax'"):
        evaluate(DEFAULT, Audience(NY), "fax", "onboarding", now, [])
    with pytest.raises(PolicyError, match="unknown time zone 'Mars/Olympus'"):
        evaluate(DEFAULT, Audience("Mars/Olympus"), "email", "onboarding", now, [])
    with pytest.raises(PolicyError, match="time zone"):
        evaluate(DEFAULT, Audience(NY), "email", "onboarding", utc(2026, 6, 10, 15).replace(tzinfo=None), [])
    with pytest.raises(PolicyError, match="daily_cap"):
        NudgePolicy(daily_cap=-1)
    with pytest.raises(PolicyError, match="both a start and an end"):
        NudgePolicy(quiet_start=time(22), quiet_end=None)
