"""The destinations' pure parts: the manifest section, the lifecycle events' mapping, the retry schedule,
the credentials' shape."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from firstmile.destinations.mapping import (
    EVENT_TYPES,
    TRACK_NAMES,
    identify_id,
    outbound,
    personal_wanted,
    webhook_type,
)
from firstmile.destinations.policy import (
    CREDENTIAL_FIELDS,
    RetryPolicy,
    check_credentials,
    new_webhook_secret,
    webhook_secret_bytes,
)
from firstmile.tenancy.manifest import LIFECYCLE_EVENTS, DestinationSpec, TenantManifest, json_schema
from tests.factories import ROOT, demo_document

TENANT = uuid.uuid4()
AT = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)


def spec(**fields: Any) -> DestinationSpec:
    return DestinationSpec.model_validate({"name": "hooks", "kind": "webhook", "url": "https://acme.example/h"}
                                          | fields)  # fmt: skip


# ------------------------------------------------------------------ the manifest


def test_a_manifest_without_destinations_keeps_its_hash_and_one_with_them_changes_it() -> None:
    doc = demo_document()
    plain = TenantManifest.model_validate(doc)
    later = {"keys", "planner", "pii_traits", "limits", "experiments", "alerts", "destinations", "sso"}
    canonical = plain.model_dump(mode="json", exclude=later)
    if plain.nudges is not None:  # fields added to nudges later, left out at their defaults
        canonical["nudges"]["policy"].pop("default_categories", None)
        for trigger in canonical["nudges"]["triggers"]:
            trigger.pop("category")
    for path in canonical["paths"]:  # a step's validation, added later, left out at its default (auto)
        for step in path["steps"]:
            if step.get("validation") == "auto":
                del step["validation"]
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert plain.content_hash() == hashlib.sha256(encoded).hexdigest()
    doc["destinations"] = [{"name": "hooks", "kind": "webhook", "url": "https://acme.example/h"}]
    assert TenantManifest.model_validate(doc).content_hash() != plain.content_hash()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://acme.example/h"}, "url must be https"),
        ({"url": "https://user:pw@acme.example/h"}, "must not carry credentials"),
        ({"url": "ftp://acme.example/h"}, "must be an https:// URL"),
        ({"url": None}, "a webhook needs url"),
        ({"region": "eu"}, "region and host are for vendors"),
        ({"kind": "segment", "url": None, "region": "in"}, "region 'in' is not one of"),
        ({"kind": "mixpanel"}, "url is for webhooks"),
        ({"kind": "amplitude", "url": None, "host": "http://proxy.example"}, "host must be https"),
        ({"kind": "salesforce"}, "Input should be"),
        ({"events": ["onboarding.started", "user.created"]}, "Input should be"),
        ({"events": []}, "at least 1 item"),
        ({"max_batch": 0}, "greater than or equal to 1"),
        ({"name": "Hooks"}, "String should match pattern"),
    ],
)
def test_a_destination_that_cannot_work_is_refused_with_the_reason(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_loopback_endpoints_may_be_plain_http_and_names_are_unique() -> None:
    assert spec(url="http://127.0.0.1:9000/h").url == "http://127.0.0.1:9000/h"
    assert spec(kind="segment", url=None, host="http://localhost:8080").host == "http://localhost:8080"
    doc = demo_document()
    doc["destinations"] = [{"name": "hooks", "kind": "webhook", "url": "https://a.example/h"},
                           {"name": "hooks", "kind": "segment"}]  # fmt: skip
    with pytest.raises(ValidationError, match="names repeated"):
        TenantManifest.model_validate(doc)


def test_the_exported_schema_has_the_destinations_section() -> None:
    exported = json.loads((ROOT / "tenants" / "manifest.schema.json").read_text("utf-8"))
    assert exported == json.loads(json.dumps(json_schema()))
    assert "destinations" in exported["properties"]
    kinds = exported["$defs"]["DestinationSpec"]["properties"]["kind"]["enum"]
    assert set(kinds) == set(CREDENTIAL_FIELDS)


# ------------------------------------------------------------------ the mapping


def test_every_lifecycle_event_has_a_readable_name_and_a_webhook_type() -> None:
    assert set(TRACK_NAMES) == set(LIFECYCLE_EVENTS)
    assert TRACK_NAMES["onboarding.step_completed"] == "Onboarding Step Completed"
    for kind in LIFECYCLE_EVENTS:
        track = outbound(spec(), TENANT, uuid.uuid4(), kind, {"user_id": "u-1"}, AT)[-1]
        assert webhook_type(track) == kind and EVENT_TYPES[track.name] == kind


def test_a_start_is_an_identify_with_the_allowed_traits_then_a_track_without_personal_data() -> None:
    event_id = uuid.uuid4()
    payload = {
        "user_id": "u-1", "path_id": "developer", "path_version": 3, "current_step": "create-api-key",
        "decision": {"selected_by": "model", "confidence": 0.9}, "traits": {"persona": "developer", "plan": "pro",
        "seat_count": 4, "nickname": "Al"},
    }  # fmt: skip
    identify, track = outbound(spec(), TENANT, event_id, "onboarding.started", payload, AT, pii_traits=["nickname"])
    assert identify.kind == "identify" and identify.event_id == identify_id(event_id) != event_id
    assert identify.traits == {"persona": "developer", "plan": "pro", "seat_count": 4}  # nickname is personal
    assert identify.properties == {}
    assert track.kind == "track" and track.name == "Onboarding Started" and track.event_id == event_id
    assert track.properties == {"path_id": "developer", "path_version": 3, "current_step": "create-api-key",
                                "selected_by": "model"}  # fmt: skip
    assert track.traits == {} and track.occurred_at == AT
    # an allow-list lets through exactly what it names; personal traits it names are read elsewhere (sealed)
    listed = spec(traits=["plan", "email", "nickname"])
    identify, _ = outbound(listed, TENANT, event_id, "onboarding.started", payload, AT, pii_traits=["nickname"])
    assert identify.traits == {"plan": "pro"}
    assert personal_wanted(listed, ["nickname"]) == ("email", "nickname")
    assert personal_wanted(spec(), ["nickname"]) == ()


def test_properties_are_the_listed_scalars_and_the_events_own_time() -> None:
    payload = {"user_id": "u-1", "path_id": "dev", "path_version": 1, "step_id": "s1", "source": "api",
               "occurred_at": "2026-12-01T08:00:00+01:00", "current_step": None, "extra": "no",
               "traits": {"email": "a@b.c"}}  # fmt: skip
    [track] = outbound(spec(), TENANT, uuid.uuid4(), "onboarding.step_completed", payload, AT)
    assert track.properties == {"path_id": "dev", "path_version": 1, "step_id": "s1", "source": "api"}
    assert track.occurred_at == datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    nudge = {"user_id": "u-1", "send_id": "s", "channel": "email", "arm": "a", "trigger": "stuck", "category": "x"}
    [unsub] = outbound(spec(), TENANT, uuid.uuid4(), "nudge.unsubscribed", nudge, AT)
    assert unsub.properties == {"send_id": "s", "channel": "email", "arm": "a", "trigger": "stuck", "category": "x"}


def test_review_events_carry_no_note_nor_reviewer_and_have_their_own_time() -> None:
    payload = {"review_id": 7, "kind": "step", "reason": "review_step", "status": "rejected", "user_id": "u-1",
               "path_id": "dev", "path_version": 2, "step_id": "sign-contract", "occurred_at": "2026-11-01T08:00:00Z",
               "decided_by": "admin:jane@acme.example", "note": "Jane: the contract is unsigned",
               "better_path": None}  # fmt: skip
    [track] = outbound(spec(), TENANT, uuid.uuid4(), "onboarding.review_decided", payload, AT)
    assert track.name == "Onboarding Review Decided"
    assert track.properties == {"review_id": 7, "kind": "step", "reason": "review_step", "status": "rejected",
                                "path_id": "dev", "path_version": 2, "step_id": "sign-contract"}  # fmt: skip
    assert track.occurred_at == AT  # the decision's time, not the reviewed completion's
    changed = {"user_id": "u-1", "path_id": "generic", "path_version": 3, "current_step": "tour",
               "previous": {"path_id": "dev", "path_version": 2}, "decision": {"selected_by": "human"}}  # fmt: skip
    [track] = outbound(spec(), TENANT, uuid.uuid4(), "onboarding.path_changed", changed, AT)
    assert track.properties == {"path_id": "generic", "path_version": 3, "current_step": "tour", "selected_by": "human",
                                "previous_path_id": "dev", "previous_path_version": 2}  # fmt: skip


def test_a_destination_gets_only_the_events_it_takes_and_only_about_a_user() -> None:
    only = spec(events=["onboarding.activated"])
    assert outbound(only, TENANT, uuid.uuid4(), "onboarding.step_completed", {"user_id": "u"}, AT) == []
    assert len(outbound(only, TENANT, uuid.uuid4(), "onboarding.activated", {"user_id": "u"}, AT)) == 1
    assert outbound(spec(), TENANT, uuid.uuid4(), "track", {"user_id": "u"}, AT) == []
    assert outbound(spec(), TENANT, uuid.uuid4(), "onboarding.activated", {"user_id": ""}, AT) == []


# ------------------------------------------------------------------ retries and credentials


def test_the_retry_schedule_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_s=5, cap_s=3600, max_attempts=15)
    assert policy.schedule()[:5] == [5, 10, 20, 40, 80] and policy.schedule()[-1] == 3600
    assert len(policy.schedule()) == 14
    rng = random.Random(1)
    for attempt in range(1, 15):
        waits = [policy.delay(attempt, rng) for _ in range(200)]
        assert policy.ceiling(attempt) / 2 <= min(waits) and max(waits) <= policy.ceiling(attempt)
        assert len(set(waits)) > 100  # jittered: a recovered destination is not hit by every event at once
    assert policy.delay(3, rng, after_s=42) == 42 and policy.delay(3, rng, after_s=86_400) == 3600
    assert not policy.exhausted(14) and policy.exhausted(15)
    with pytest.raises(ValueError):
        RetryPolicy(base_s=10, cap_s=5)


def test_credentials_fit_their_kind() -> None:
    check_credentials("segment", {"write_key": "wk"})
    check_credentials("mixpanel", {"project_token": "t", "api_secret": "s"})
    check_credentials("webhook", {"secret": new_webhook_secret()})
    for kind, values, message in [
        ("segment", {"api_key": "x", "write_key": "y"}, "no credential field api_key"),
        ("amplitude", {"secret_key": "s"}, "needs api_key"),
        ("intercom", {"access_token": " padded "}, "spaces or control characters"),
        ("webhook", {"secret": "plain"}, "whsec_"),
        ("salesforce", {"token": "t"}, "unknown destination kind"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_credentials(kind, values)
    assert len(webhook_secret_bytes(new_webhook_secret())) == 32
