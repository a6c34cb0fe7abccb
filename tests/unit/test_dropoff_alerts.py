"""Drop-off alerts, the pure part (firstmile.analytics.alerts): the test against an independent implementation, the
windows, the verdicts, the Standard Webhooks signature against the specification's example, the messages, and the
manifest's ``alerts:`` section."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from scipy.stats import chi2_contingency

from firstmile.analytics.alerts import (
    Alert,
    AlertRule,
    Proportions,
    compare,
    email_body,
    email_subject,
    sign_webhook,
    two_proportion_test,
    verify_webhook,
    webhook_body,
    webhook_payload,
    webhook_secret_bytes,
    windows,
)
from firstmile.analytics.queries import Dropoff, DropoffStep
from firstmile.tenancy.manifest import TenantManifest
from tests.factories import demo_document

RULE = AlertRule()


def _dropoff(*steps: tuple[str, int, int]) -> Dropoff:
    """A drop-off answer from (step, users who reached the step before, users who dropped)."""
    return Dropoff(
        started=steps[0][1] if steps else 0,
        steps=tuple(DropoffStep(s, n, n - x, x, x / n if n else None) for s, n, x in steps),
    )


@pytest.mark.parametrize(
    ("x0", "n0", "x1", "n1"),
    [(100, 1000, 150, 1000), (30, 400, 12, 90), (500, 2000, 480, 2100), (7, 60, 25, 55)],
)
def test_the_two_proportion_test_agrees_with_a_chi_square_test_of_the_2x2_table(
    x0: int, n0: int, x1: int, n1: int
) -> None:
    """z² is the Pearson chi-square of the 2x2 table (no continuity correction), and the p-values agree."""
    result = two_proportion_test(Proportions(n0, x0), Proportions(n1, x1))
    assert result is not None
    z, p = result
    chi2, expected_p, _, _ = chi2_contingency([[x0, n0 - x0], [x1, n1 - x1]], correction=False)
    assert z**2 == pytest.approx(chi2, rel=1e-9)
    assert p == pytest.approx(expected_p, rel=1e-9)
    assert (z > 0) == (x1 / n1 > x0 / n0)


def test_the_test_is_undefined_without_users_or_without_variation() -> None:
    assert two_proportion_test(Proportions(0, 0), Proportions(100, 10)) is None
    assert two_proportion_test(Proportions(100, 0), Proportions(100, 0)) is None
    assert two_proportion_test(Proportions(100, 100), Proportions(80, 80)) is None


def test_the_windows_end_a_conversion_window_before_the_check_on_the_hour() -> None:
    now = datetime(2026, 5, 20, 14, 37, 12, tzinfo=UTC)
    w = windows(now, RULE)
    assert w.recent_end == datetime(2026, 5, 19, 14, 0, tzinfo=UTC)
    assert w.recent_start == datetime(2026, 5, 12, 14, 0, tzinfo=UTC)
    assert w.baseline_start == datetime(2026, 4, 14, 14, 0, tzinfo=UTC)
    assert windows(now.replace(minute=59), RULE) == w  # every check of the hour compares the same windows
    assert windows(now + timedelta(hours=1), RULE).recent_end == w.recent_end + timedelta(hours=1)
    with pytest.raises(ValueError, match="timezone"):
        windows(now.replace(tzinfo=None), RULE)


def test_a_known_shift_alerts_on_exactly_its_step() -> None:
    baseline = _dropoff(("a", 2000, 200), ("b", 1800, 360), ("c", 1440, 144))
    recent = _dropoff(("a", 500, 50), ("b", 450, 180), ("c", 270, 27))  # b: 20% -> 40%
    shifts = compare(baseline, recent, RULE)
    assert [(s.step_id, s.alert) for s in shifts] == [("a", False), ("b", True), ("c", False)]
    b = shifts[1]
    assert b.direction == "rose" and b.baseline.rate == 0.2 and b.recent.rate == 0.4
    assert b.p_value is not None and b.p_value < RULE.significance / 3
    assert shifts[0].p_value == pytest.approx(1.0) and "not significant" in shifts[0].reason


def test_no_shift_raises_nothing_and_a_fall_alerts_too() -> None:
    same = _dropoff(("a", 1000, 300), ("b", 700, 70))
    assert not any(s.alert for s in compare(same, same, RULE))
    better = compare(same, _dropoff(("a", 1000, 150), ("b", 850, 85)), RULE)
    assert [(s.step_id, s.alert, s.direction) for s in better] == [("a", True, "fell"), ("b", False, "rose")]


def test_too_few_users_are_not_tested() -> None:
    shifts = compare(_dropoff(("a", 49, 5)), _dropoff(("a", 49, 40)), RULE)
    assert [s.alert for s in shifts] == [False] and shifts[0].p_value is None
    assert "too few users" in shifts[0].reason
    assert compare(_dropoff(("a", 49, 5)), _dropoff(("a", 49, 40)), AlertRule(min_users=40))[0].alert


def test_a_significant_but_small_shift_does_not_alert() -> None:
    shifts = compare(_dropoff(("a", 400_000, 80_000)), _dropoff(("a", 100_000, 21_000)), RULE)  # 20% -> 21%
    assert shifts[0].p_value is not None and shifts[0].p_value < 1e-6
    assert not shifts[0].alert and "small" in shifts[0].reason
    assert compare(_dropoff(("a", 400_000, 80_000)), _dropoff(("a", 100_000, 21_000)), AlertRule(min_shift=0.005))[
        0
    ].alert


def test_the_threshold_is_shared_by_the_tested_steps() -> None:
    """A p-value under the significance level but over its Bonferroni share alerts on a one-step path only."""
    base, recent = ("a", 1000, 200), ("a", 1000, 260)  # p ≈ 0.0013
    p = compare(_dropoff(base), _dropoff(recent), RULE)[0].p_value
    assert p is not None and RULE.significance / 8 < p < RULE.significance
    assert compare(_dropoff(base), _dropoff(recent), RULE)[0].alert
    others = [(f"s{i}", 1000, 100) for i in range(7)]
    many = compare(_dropoff(base, *others), _dropoff(recent, *others), RULE)
    assert not many[0].alert and "not significant" in many[0].reason
    # steps with too few users do not count against the others
    few = [(f"s{i}", 10, 1) for i in range(7)]
    assert compare(_dropoff(base, *few), _dropoff(recent, *few), RULE)[0].alert


def test_the_answers_must_be_for_the_same_steps() -> None:
    with pytest.raises(ValueError, match="same steps"):
        compare(_dropoff(("a", 10, 1)), _dropoff(("b", 10, 1)), RULE)


@pytest.mark.parametrize(
    "bad",
    [{"recent": timedelta(0)}, {"min_users": 0}, {"min_shift": 1.0}, {"significance": 0.0}, {"significance": 1.0}],
)
def test_a_rule_out_of_bounds_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AlertRule(**bad)


def test_the_signature_is_standard_webhooks() -> None:
    """The specification's own example (github.com/standard-webhooks/standard-webhooks, spec/standard-webhooks.md)."""
    secret = webhook_secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signature = sign_webhook(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"Webhook-Id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "Webhook-Timestamp": "1614265330",
               "Webhook-Signature": f"v1,bm9ub3RoaXM= {signature}"}  # fmt: skip
    assert verify_webhook(secret, headers, body, now=1614265330 + 10)
    assert not verify_webhook(secret, headers, body + b" ", now=1614265330)
    assert not verify_webhook(b"another secret", headers, body, now=1614265330)
    assert not verify_webhook(secret, headers, body, now=1614265330 + 301)  # replayed later
    assert webhook_secret_bytes("plain secret") == b"plain secret"
    with pytest.raises(ValueError):
        webhook_secret_bytes("whsec_not base64!")


ALERT = Alert(
    id=uuid.UUID("0b5a3f1e-8a0c-4f53-9d8e-6f0a1b2c3d4e"),
    path_key="developer-quickstart",
    path_version=2,
    step_id="install-sdk",
    step_title="Install the SDK",
    direction="rose",
    baseline_start=datetime(2026, 4, 14, 14, 0, tzinfo=UTC),
    window_start=datetime(2026, 5, 12, 14, 0, tzinfo=UTC),
    window_end=datetime(2026, 5, 19, 14, 0, tzinfo=UTC),
    baseline_users=1800,
    baseline_dropped=360,
    recent_users=450,
    recent_dropped=180,
    z=8.49,
    p_value=2.1e-17,
    created_at=datetime(2026, 5, 20, 14, 37, tzinfo=UTC),
)


def test_the_email_says_what_moved_and_holds_no_personal_data() -> None:
    url = "https://firstmile.example/admin/analytics?path=developer-quickstart"
    assert email_subject(ALERT, "Acme") == (
        "[Firstmile] Acme: drop-off rose at 'Install the SDK' (developer-quickstart v2)"
    )
    assert email_body(ALERT, "Acme", url) == (
        "Drop-off at step 'Install the SDK' (install-sdk) of path developer-quickstart version 2 rose from 20.0% to "
        "40.0%.\n\n"
        "Recent: 180 of 450 users who reached the step before did not reach it (onboarding starts 2026-05-12 14:00 "
        "UTC to 2026-05-19 14:00 UTC).\n"
        "Baseline: 360 of 1800 (starts 2026-04-14 14:00 UTC to 2026-05-12 14:00 UTC).\n"
        "Two-proportion z-test: z = 8.49, p = 2.1e-17.\n\n"
        "Tenant: Acme\n"
        f"Dashboard: {url}\n"
        "Alert: 0b5a3f1e-8a0c-4f53-9d8e-6f0a1b2c3d4e\n"
    )


def test_the_webhook_payload() -> None:
    payload = webhook_payload(ALERT, "acme", "https://x.example/d")
    assert payload["type"] == "analytics.dropoff_alert" and payload["timestamp"] == "2026-05-20T14:37:00+00:00"
    data = payload["data"]
    assert data["id"] == str(ALERT.id) and data["tenant"] == "acme" and data["step_id"] == "install-sdk"
    assert data["baseline"] == {"from": "2026-04-14T14:00:00+00:00", "to": "2026-05-12T14:00:00+00:00",
                                "users": 1800, "dropped": 360, "rate": 0.2}  # fmt: skip
    assert data["recent"]["rate"] == 0.4 and data["recent"]["to"] == "2026-05-19T14:00:00+00:00"
    assert webhook_body(payload) == webhook_body(dict(reversed(list(payload.items()))))  # one byte string per payload
    assert math.isclose(data["p_value"], 2.1e-17)


def _manifest(alerts: Any = None) -> TenantManifest:
    doc = demo_document()
    if alerts is not None:
        doc["alerts"] = alerts
    return TenantManifest.model_validate(doc)


def test_the_alerts_section_keeps_existing_hashes_and_changes_them_when_set() -> None:
    plain = _manifest()
    assert plain.alerts is None
    assert "alerts" not in plain.model_dump(mode="json", exclude_none=True)
    with_alerts = _manifest({"email": ["ops@acme.example"]})
    assert with_alerts.content_hash() != plain.content_hash()
    assert _manifest({"email": ["ops@acme.example"]}).content_hash() == with_alerts.content_hash()


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"email": ["not an address"]}, "pattern"),
        ({"email": ["ops@acme.example", "OPS@acme.example"]}, "repeated"),
        ({"webhook": {"url": "https://hooks.acme.example/fm"}}, "exactly one of secret_env or secret_file"),
        ({"webhook": {"url": "https://hooks.acme.example/fm", "secret_env": "A", "secret_file": "/run/s"}},
         "exactly one"),
        ({"webhook": {"url": "ftp://hooks.acme.example/fm", "secret_env": "ACME_HOOK"}}, "pattern"),
        ({"webhook": {"url": "https://hooks.acme.example/fm", "secret": "s3cr3t"}}, "Extra inputs"),
    ],
)  # fmt: skip
def test_a_bad_alerts_section_is_refused(alerts: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _manifest(alerts)


def test_a_good_alerts_section() -> None:
    spec = _manifest({"email": ["ops@acme.example"], "webhook": {"url": "https://hooks.acme.example/fm",
                      "secret_env": "ACME_ALERT_WEBHOOK_SECRET"}}).alerts  # fmt: skip
    assert spec is not None and spec.enabled and spec.webhook is not None
    assert spec.webhook.secret_env == "ACME_ALERT_WEBHOOK_SECRET" and spec.email == ("ops@acme.example",)
