"""The tenant manifest schema: what it accepts, what it refuses, and its exported JSON Schema."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from firstmile.tenancy.keys import SCOPES
from firstmile.tenancy.manifest import ADMIN_ROLES, ManifestError, TenantManifest, json_schema, load_manifest
from tests.factories import DEMO_MANIFEST, ROOT, demo_document


def test_demo_manifest_meets_the_product_requirements() -> None:
    manifest = load_manifest(DEMO_MANIFEST)
    targeted = [p for p in manifest.paths if p.targeting]
    fields = {pred.field for p in targeted for pred in p.targeting}
    assert len(targeted) >= 6
    assert {"persona", "use_case"} <= fields
    assert manifest.default_path == "generic"
    assert all(4 <= len(p.steps) <= 8 for p in manifest.paths)
    assert any(s.optional for p in manifest.paths for s in p.steps)
    assert any(s.completion.where for p in manifest.paths for s in p.steps)


def test_exported_schema_is_up_to_date() -> None:
    on_disk = json.loads((ROOT / "tenants" / "manifest.schema.json").read_text(encoding="utf-8"))
    assert on_disk == json_schema(), "run: firstmile tenants schema -o tenants/manifest.schema.json"


def _mutated(change: Any) -> dict[str, Any]:
    doc = demo_document()
    change(doc)
    return doc


def _path(doc: dict[str, Any], key: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in doc["paths"] if p["id"] == key)
    return found


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(surprise=1), "Extra inputs are not permitted"),
        (lambda d: d.update(default_path="nope"), "default_path nope is not one of the paths"),
        (lambda d: _path(d, "generic").update(targeting=[{"field": "persona", "value": "x"}]), "must not have"),
        (lambda d: _path(d, "analyst-reports").update(priority=100), "distinct priorities"),
        (lambda d: _path(d, "generic").update(steps=_path(d, "generic")["steps"][:3]), "at least 4"),
        (lambda d: _path(d, "generic").update(activation_step="invite-teammate"), "cannot be optional"),
        (lambda d: _path(d, "generic").update(activation_step="missing"), "is not one of its steps"),
        (lambda d: _path(d, "generic")["steps"][0].update(prerequisites=["take-tour"]), "must come before"),
        (lambda d: _path(d, "generic")["steps"][1].update(prerequisites=["ghost"]), "unknown prerequisite"),
        (lambda d: _path(d, "generic")["steps"][1].update(id="complete-profile"), "unique"),
        (lambda d: d["tenant"].update(home_region="mars"), "String should match pattern"),
        (lambda d: _path(d, "developer-quickstart")["targeting"][0].update(op="in"), "needs a list"),
        (lambda d: _path(d, "developer-quickstart")["targeting"][0].update(op="like"), "Input should be"),
        (
            lambda d: _path(d, "enterprise-rollout")["targeting"][0].update(value=["huge"]),
            "company_size values ['huge']",
        ),
        (lambda d: d.update(sso={"roles": {"boss": "x"}}), "Input should be 'owner', 'editor', 'analyst' or 'viewer'"),
        (lambda d: d.update(sso={"group_roles": {"Admins": "root"}}), "Input should be 'owner'"),
        (lambda d: d.update(sso={"group_roles": {"a/b": "owner"}}), "String should match pattern"),
        (
            lambda d: d.update(sso={"saml": {"entity_id": "urn:idp"}}),
            "saml needs exactly one of metadata_url or metadata_xml",
        ),
        (
            lambda d: d.update(
                sso={"saml": {"entity_id": "urn:idp", "metadata_url": "https://i/x", "metadata_xml": "<x/>"}}
            ),
            "saml needs exactly one of metadata_url or metadata_xml",
        ),
        (
            lambda d: d.update(sso={"saml": {"entity_id": "urn:idp", "metadata_xml": "<html/>"}}),
            "not SAML metadata",
        ),
        (lambda d: d.update(sso={"saml": {"entity_id": "x", "metadata_url": "ftp://i/x"}}), "should match pattern"),
        (
            lambda d: d.update(
                sso={"saml": {"entity_id": "x", "metadata_url": "https://i", "attributes": {"mail": "m"}}}
            ),
            "Extra inputs",
        ),
        (
            lambda d: d.update(sso={"machine_clients": [{"client_id": "app", "scopes": ["admin:everything"]}]}),
            "unknown scope(s) ['admin:everything']",
        ),
        (lambda d: d.update(sso={"machine_clients": [{"client_id": "app", "scopes": []}]}), "at least 1 item"),
        (
            lambda d: d.update(
                sso={"machine_clients": [{"client_id": "app", "scopes": ["events:write", "events:write"]}]}
            ),
            "scopes must be unique",
        ),
        (
            lambda d: d.update(sso={"machine_clients": [{"client_id": "Billing Sync", "scopes": ["events:write"]}]}),
            "String should match pattern",
        ),
        (
            lambda d: d.update(sso={"machine_clients": [{"client_id": "admin-cli", "scopes": ["events:write"]}]}),
            "built-in Keycloak client",
        ),
        (
            lambda d: d.update(
                sso={
                    "machine_clients": [
                        {"client_id": "app", "scopes": ["events:write"]},
                        {"client_id": "app", "scopes": ["analytics:read"]},
                    ]
                }
            ),
            "machine client ids must be unique; repeated: ['app']",
        ),
        (
            lambda d: d.update(
                sso={"machine_clients": [{"client_id": "app", "scopes": ["events:write"], "secret": "s3cr3t"}]}
            ),
            "Extra inputs",
        ),
    ],
)
def test_invalid_manifests_are_refused_with_the_reason(change: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        TenantManifest.model_validate(_mutated(change))
    assert message in str(err.value)


def test_load_manifest_reports_file_and_location(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("api_version: firstmile/v1\ntenant: {slug: x1, name: X, home_region: eu-west-1}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    assert str(bad) in str(err.value)
    assert "paths: Field required" in str(err.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("paths: [unclosed")
    with pytest.raises(ManifestError):
        load_manifest(broken)


def test_content_hash_changes_only_with_content() -> None:
    a = TenantManifest.model_validate(demo_document())
    b = TenantManifest.model_validate(demo_document())
    assert a.content_hash() == b.content_hash()
    assert a.paths[0].content_hash() == b.paths[0].content_hash()
    changed = demo_document()
    changed["paths"][0]["steps"][0]["title"] = "Something else"
    c = TenantManifest.model_validate(changed)
    assert c.paths[0].content_hash() != a.paths[0].content_hash()
    assert c.paths[1].content_hash() == a.paths[1].content_hash()


def test_sso_section_defaults_and_hash() -> None:
    plain = TenantManifest.model_validate(demo_document())
    doc = demo_document()
    doc["sso"] = {
        "roles": {"viewer": "Looks only."},
        "group_roles": {"Acme Admins": "owner", "Acme Analysts": "analyst"},
        "saml": {"metadata_url": "https://idp.acme.example/metadata", "entity_id": "https://idp.acme.example"},
    }
    with_sso = TenantManifest.model_validate(doc)
    assert with_sso.sso is not None and with_sso.sso.saml is not None
    assert with_sso.sso.saml.attributes.groups == "groups"
    descriptions = with_sso.sso.role_descriptions()
    assert list(descriptions) == ["owner", "editor", "analyst", "viewer"] and descriptions["viewer"] == "Looks only."
    # an unset sso section leaves the hash of existing manifests as it was; a set one changes it
    assert "sso" not in plain.model_dump(mode="json", exclude_none=True)
    assert with_sso.content_hash() != plain.content_hash()
    assert plain.content_hash() == TenantManifest.model_validate(demo_document()).content_hash()


def test_demo_sso_section_and_machine_clients() -> None:
    demo = load_manifest(DEMO_MANIFEST)
    assert demo.sso is not None and demo.sso.saml is None  # the saml block is an example, commented out
    assert set(demo.sso.group_roles.values()) <= set(ADMIN_ROLES)
    [client] = demo.sso.machine_clients
    assert set(client.scopes) <= set(SCOPES) and client.description
    # demo_document() leaves sso out unless asked, like planner
    assert "sso" not in demo_document() and demo_document(sso=True)["sso"]["machine_clients"]


def test_machine_clients_change_the_hash_only_when_set() -> None:
    doc = demo_document()
    doc["sso"] = {"group_roles": {"Acme Admins": "owner"}}
    without = TenantManifest.model_validate(doc)
    # sso sections written before machine_clients existed keep their revision
    canonical = without.model_dump(
        mode="json", exclude={"keys", "planner", "pii_traits", "limits", "experiments", "alerts", "destinations"}
    )
    del canonical["sso"]["machine_clients"]
    _drop_auto_validation(canonical)  # steps written before `validation` existed keep theirs too
    # and so do nudges sections written before consent categories existed
    del canonical["nudges"]["policy"]["default_categories"]
    for trigger in canonical["nudges"]["triggers"]:
        assert trigger.pop("category") == "onboarding"
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert without.content_hash() == hashlib.sha256(encoded).hexdigest()
    doc["sso"]["machine_clients"] = [{"client_id": "billing-sync", "scopes": ["events:write"]}]
    with_client = TenantManifest.model_validate(doc)
    assert with_client.content_hash() != without.content_hash()
    assert with_client.sso is not None and with_client.sso.machine_clients[0].description == ""


def test_planner_exploration_is_bounded_and_leaves_existing_hashes_alone(tmp_path: Path) -> None:
    with_planner = demo_document(planner=True)
    before = TenantManifest.model_validate(with_planner)
    assert before.planner is not None and before.planner.exploration is None
    # a planner section written before exploration existed keeps its hash (its revision)
    canonical = before.model_dump(
        mode="json", exclude={"keys", "pii_traits", "sso", "limits", "experiments", "alerts", "destinations"}
    )
    assert canonical["planner"].pop("exploration") is None
    assert canonical["planner"].pop("training") is None  # added later still (scheduled training)
    _drop_auto_validation(canonical)
    del canonical["nudges"]["policy"]["default_categories"]
    for trigger in canonical["nudges"]["triggers"]:
        trigger.pop("category")
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert before.content_hash() == hashlib.sha256(encoded).hexdigest()
    # setting it changes the hash; epsilon 0 to 0.5, epsilon_greedy only
    with_planner["planner"]["exploration"] = {"epsilon": 0.1}
    exploring = TenantManifest.model_validate(with_planner)
    assert exploring.planner is not None and exploring.planner.exploration is not None
    assert (exploring.planner.exploration.policy, exploring.planner.exploration.epsilon) == ("epsilon_greedy", 0.1)
    assert exploring.content_hash() != before.content_hash()
    rules_only = TenantManifest.model_validate(_mutated(lambda d: d.update(planner={"model": None,
                                                       "exploration": {"epsilon": 0.5}})))  # fmt: skip
    assert rules_only.planner is not None and rules_only.planner.model is None
    for bad, message in (
        ({"epsilon": 0.6}, "less than or equal to 0.5"),
        ({"epsilon": -0.1}, "greater than or equal to 0"),
        ({"policy": "thompson", "epsilon": 0.1}, "epsilon_greedy"),
        ({"epsilon": 0.1, "share": 0.2}, "Extra inputs are not permitted"),
    ):
        path = tmp_path / "m.yaml"
        doc = demo_document(planner=True)
        doc["planner"]["exploration"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(ManifestError, match=message) as err:
            load_manifest(path)
        assert "planner.exploration" in str(err.value)


def _drop_auto_validation(canonical: dict[str, Any]) -> None:
    """What content_hash leaves out of every path: a step's `validation` at its default (added later)."""
    for path in canonical["paths"]:
        for step in path["steps"]:
            if step.get("validation") == "auto":
                del step["validation"]


def test_a_steps_validation_changes_the_hash_only_when_review() -> None:
    doc = demo_document()
    for path in doc["paths"]:
        for step in path["steps"]:
            step.pop("validation", None)
    plain = TenantManifest.model_validate(doc).content_hash()
    doc["paths"][0]["steps"][0]["validation"] = "auto"
    assert TenantManifest.model_validate(doc).content_hash() == plain  # the default, written out: same revision
    doc["paths"][0]["steps"][0]["validation"] = "review"
    assert TenantManifest.model_validate(doc).content_hash() != plain
