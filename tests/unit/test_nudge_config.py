"""The manifest's ``nudges:`` section: what it accepts and refuses (with line and column), which wording a user
gets, and how the tenant's policy overrides the platform's."""

from __future__ import annotations

from datetime import time, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from firstmile.nudges.config import tenant_nudges
from firstmile.nudges.content import language_of, wordings
from firstmile.nudges.policy import NudgePolicy
from firstmile.tenancy.manifest import ManifestError, NudgesSpec, NudgeTemplateSpec, TenantManifest, load_manifest
from tests.factories import demo_document

PLATFORM = NudgePolicy()
CHANNELS = ("email", "sms", "in_app", "push")


def _template(**fields: Any) -> NudgeTemplateSpec:
    return NudgeTemplateSpec.model_validate(
        {"variant": "plain", "channel": "in_app", "body": "Next: {{ step.title }}", "subject": "s"} | fields
    )


def test_the_demo_manifest_declares_triggers_and_wordings() -> None:
    manifest = TenantManifest.model_validate(demo_document())
    assert manifest.nudges is not None
    assert {t.when for t in manifest.nudges.triggers} == {"step_idle", "event_missing"}
    assert {t.locale for t in manifest.nudges.templates} == {"en", "de"}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"body": "Hello {{ user.name }}"}, "'user' is undefined"),
        ({"body": "{% if link %}unclosed"}, "template line 1"),
        ({"body": "{{ ''.__class__ }}"}, "not allowed in a template"),
        ({"channel": "email", "subject": None}, "e-mail needs a subject"),
        ({"channel": "sms", "html": "<p>x</p>"}, "only e-mail has an html part"),
        ({"channel": "sms", "body": "x" * 1601}, "more than the 1600 a sms message takes"),
        ({"channel": "fax"}, "Input should be 'email', 'sms', 'in_app' or 'push'"),
        ({"locale": "english"}, "String should match pattern"),
    ],
)
def test_a_template_that_does_not_render_is_refused(template: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        _template(**template)
    assert message in str(err.value)


def _with_nudges(change: Any) -> dict[str, Any]:
    doc = demo_document()
    change(doc["nudges"])
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda n: n["triggers"][0].update(step="no-such-step"), "no-such-step is not a step of path"),
        (lambda n: n["triggers"][0].update(path="nowhere"), "names unknown path nowhere"),
        (lambda n: n["triggers"][0].pop("after"), "when step_idle takes after, step"),
        (lambda n: n["triggers"][1].update(step="install-sdk"), "when event_missing takes after, event"),
        (lambda n: n["triggers"][0].update(after="2w"), "String should match pattern"),
        (lambda n: n["triggers"][1].update(id="sdk-idle"), "trigger ids must be unique"),
        (lambda n: n["templates"].append(dict(n["templates"][0])), "templates repeated"),
        (lambda n: n["templates"][0].update(trigger="ghost"), "templates name unknown triggers ['ghost']"),
        (lambda n: n["policy"].update(default_time_zone="Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
        (lambda n: n["policy"].update(daily_cap=21), "less than or equal to 20"),
        (lambda n: n.update(channels=["email", "email"]), "channels repeated"),
        (lambda n: n["triggers"][0].update(category="Product News"), "String should match pattern"),
        (lambda n: n["policy"].update(default_categories=["onboarding", "x" * 64]), "String should match pattern"),
    ],
)
def test_an_invalid_nudges_section_is_refused_with_the_reason(change: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        TenantManifest.model_validate(_with_nudges(change))
    assert message in str(err.value)


def test_tenants_plan_names_the_line_and_column_of_a_bad_template(tmp_path: Path) -> None:
    doc = demo_document()
    doc["nudges"]["templates"][2]["subject"] = "{{ step.tilte }}"
    manifest = tmp_path / "acme.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    lines = manifest.read_text(encoding="utf-8").splitlines()
    templates = lines.index("  templates:")
    third = [i for i, line in enumerate(lines) if i > templates and line.startswith("  - ")][2]
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    message = str(err.value)
    assert f"{manifest}:{third + 1}:5: nudges.templates.2: " in message and "'dict object' has no attribute" in message


def test_the_user_gets_their_language_and_persona_else_the_fallbacks() -> None:
    templates = [
        _template(variant="alpha", persona="*", locale="en", body="any en"),
        _template(variant="alpha", persona="developer", locale="en", body="dev en v1"),
        _template(variant="alpha", persona="developer", locale="en", version=2, body="dev en v2"),
        _template(variant="beta", persona="*", locale="de", body="alle de"),
        _template(variant="gamma", trigger="other", body="other trigger"),
    ]

    def in_app(trigger: str, persona: str, locale: str) -> set[tuple[str, str]]:
        return {(w.variant, w.template.body) for w in wordings(templates, trigger, persona, locale)
                if w.channel == "in_app"}  # fmt: skip

    assert in_app("stuck", "developer", "en") == {("alpha", "dev en v2")}  # the persona's own, highest version
    assert in_app("stuck", "analyst", "en") == {("alpha", "any en")}
    assert in_app("stuck", "developer", "de") == {("beta", "alle de")}
    assert in_app("stuck", "developer", "fr") == {("alpha", "dev en v2")}
    assert in_app("ghost", "developer", "en") == {("alpha", "dev en v2")}  # a trigger without its own: stuck's
    assert in_app("other", "developer", "en") == {("gamma", "other trigger")}
    # channel by channel: e-mail has no manifest wording here, so it gets the built-ins, all the others too
    other_channels = [w for w in wordings(templates, "stuck", "developer", "en") if w.channel != "in_app"]
    assert {w.source for w in other_channels} == {"builtin"} and {w.channel for w in other_channels} == {
        "email", "sms", "push"}  # fmt: skip
    builtin = wordings(templates[4:], "ghost", "developer", "en")  # no template of its own nor stuck's: built-ins
    assert {w.source for w in builtin} == {"builtin"} and {w.channel for w in builtin} == set(CHANNELS)
    first = next(w for w in wordings(templates, "stuck", "developer", "en") if w.channel == "in_app")
    assert first.describe() == {
        "source": "manifest", "variant": "alpha", "channel": "in_app", "persona": "developer", "locale": "en",
        "version": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "language"),
    [("de-AT", "de"), ("pt_BR", "pt"), ("EN", "en"), (None, "en"), (42, "en"), ("", "en"), ("x1-y", "en")],
)
def test_the_locale_trait_gives_the_language(value: object, language: str) -> None:
    assert language_of(value) == language


def test_the_tenant_policy_overrides_the_platform_field_by_field() -> None:
    assert tenant_nudges(None, PLATFORM, CHANNELS, "UTC").policy == PLATFORM
    spec = NudgesSpec.model_validate(
        {"channels": ["push", "email"], "policy": {"daily_cap": 3, "quiet_hours": "none",
                                                  "default_time_zone": "Asia/Tokyo"}}
    )  # fmt: skip
    setup = tenant_nudges(spec, PLATFORM, CHANNELS, "UTC")
    assert setup.channels == ("email", "push")  # the platform's order, the tenant's choice
    assert setup.policy.daily_cap == 3 and setup.policy.quiet_start is None and setup.policy.quiet_end is None
    assert setup.policy.max_delay == PLATFORM.max_delay and setup.default_time_zone == "Asia/Tokyo"
    hours = NudgesSpec.model_validate({"policy": {"quiet_hours": {"start": "22:30", "end": "07:15"},
                                                  "max_delay_hours": 6}})  # fmt: skip
    shaped = tenant_nudges(hours, PLATFORM, CHANNELS, "UTC").policy
    assert (shaped.quiet_start, shaped.quiet_end, shaped.max_delay) == (time(22, 30), time(7, 15), timedelta(hours=6))
    assert tenant_nudges(NudgesSpec(enabled=False), PLATFORM, CHANNELS, "UTC").enabled is False
    assert shaped.default_categories == PLATFORM.default_categories == frozenset({"onboarding"})
    opted = NudgesSpec.model_validate({"policy": {"default_categories": ["onboarding", "product"]}})
    assert tenant_nudges(opted, PLATFORM, CHANNELS, "UTC").policy.default_categories == {"onboarding", "product"}
    none = NudgesSpec.model_validate({"policy": {"default_categories": []}})  # every category needs a grant
    assert tenant_nudges(none, PLATFORM, CHANNELS, "UTC").policy.default_categories == frozenset()


def test_a_trigger_is_in_the_onboarding_category_unless_it_names_another() -> None:
    doc = demo_document()
    doc["nudges"]["triggers"][0]["category"] = "product"
    triggers = TenantManifest.model_validate(doc).nudges.triggers  # type: ignore[union-attr]
    assert [t.category for t in triggers] == ["product"] + ["onboarding"] * (len(triggers) - 1)


def test_a_stored_section_is_read_back_without_rendering_again() -> None:
    stored = {"templates": [{"variant": "plain", "channel": "in_app", "body": "{{ gone_variable }}"}]}
    with pytest.raises(ValidationError):
        NudgesSpec.model_validate(stored)
    assert NudgesSpec.model_validate(stored, context={"stored": True}).templates[0].body == "{{ gone_variable }}"
