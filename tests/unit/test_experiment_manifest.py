"""The manifest's ``experiments:`` section: what it accepts and what it refuses, with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from firstmile.tenancy.manifest import TenantManifest
from tests.factories import demo_document

VARIANTS: list[dict[str, Any]] = [{"name": "quickstart", "path": "developer-quickstart"},
                                  {"name": "analytics", "path": "product-analytics", "weight": 2}]  # fmt: skip
BASE: dict[str, Any] = {"id": "first-path", "control": "quickstart",
        "variants": VARIANTS}  # fmt: skip


NUDGE_VARIANTS: list[dict[str, Any]] = [{"name": "bandit"}, {"name": "benefit-email", "template": "benefit",
                                                               "channel": "email"}]  # fmt: skip
NUDGE: dict[str, Any] = {"id": "nudge-wording", "kind": "nudge", "trigger": "stuck", "control": "bandit",
                         "variants": NUDGE_VARIANTS}  # fmt: skip


def _with(*experiments: dict[str, Any], holdout: float = 0.0) -> dict[str, Any]:
    doc = demo_document()
    doc["experiments"] = {"holdout_percent": holdout, "experiments": list(experiments)}
    return doc


def _as_of_d536ce6(doc: dict[str, Any]) -> dict[str, Any]:
    """The demo document as it was at commit d536ce6: its security-review step became a review step since."""
    for path in doc["paths"]:
        for step in path["steps"]:
            if step["id"] == "security-review" and step.pop("validation", None) == "review":
                step["title"], step["completion"] = "Download the security pack", {"event": "Security Pack Downloaded"}
    return doc


def test_an_experiment_gets_its_defaults() -> None:
    manifest = TenantManifest.model_validate(_with(BASE, holdout=5))
    assert manifest.experiments is not None and manifest.experiments.holdout_percent == 5
    [spec] = manifest.experiments.experiments
    assert (spec.allocation_seed, spec.traffic_percent, spec.metric, spec.planned_days) == (
        "first-path",
        100,
        "activation",
        14,
    )
    assert spec.thresholds.chance_to_beat == 0.95 and spec.guardrails == ("stuck_rate",)
    salted = TenantManifest.model_validate(_with({**BASE, "seed": "salt-1"})).experiments
    assert salted is not None and salted.experiments[0].allocation_seed == "salt-1"


@pytest.mark.parametrize(
    ("experiments", "message"),
    [
        ([{**BASE, "variants": [VARIANTS[0], {"name": "no", "path": "nowhere"}]}], "names unknown path nowhere"),
        ([{**BASE, "control": "ghost"}], "control ghost is not one of its variants"),
        ([{**BASE, "variants": [VARIANTS[0], VARIANTS[0]]}], "variant names must be unique"),
        ([{**BASE, "variants": [VARIANTS[0]]}], "at least 2 items"),
        ([{**BASE, "traffic_percent": 101}], "less than or equal to 100"),
        ([{**BASE, "traffic_percent": -1}], "greater than or equal to 0"),
        ([{**BASE, "metric": "step:no-such-step"}], "names no step of its paths"),
        ([BASE, BASE], "ids must be unique"),
        ([{**BASE, "layer": {"name": "first", "range": [0, 60]}},
          {**BASE, "id": "other", "layer": {"name": "first", "range": [50, 100]}}], "overlap in layer first"),
        ([{**BASE, "layer": {"name": "first", "range": [60, 40]}}], "0 <= start < end <= 100"),
        ([{**BASE, "variants": [{**VARIANTS[0], "weight": 0}, VARIANTS[1]]}], "greater than 0"),
        ([{**BASE, "variants": [VARIANTS[0], {"name": "pathless"}]}],
         "every variant of a path experiment names a path"),
        ([{**BASE, "trigger": "stuck"}], "trigger, template and channel are for nudge experiments"),
        ([{**NUDGE, "variants": [{"name": "bandit", "path": "developer-quickstart"}, NUDGE_VARIANTS[1]]}],
         "the variants of a nudge experiment name no path"),
        ([{**NUDGE, "variants": [*NUDGE_VARIANTS, {**NUDGE_VARIANTS[1], "name": "again"}]}],
         "two variants use the same template and channel"),
        ([{**NUDGE, "trigger": "no-such-trigger"}], "trigger no-such-trigger is not `stuck`"),
        ([{**NUDGE, "variants": [NUDGE_VARIANTS[0], {"name": "fax", "channel": "fax"}]}], "Input should be 'email'"),
    ],
)  # fmt: skip
def test_a_bad_experiment_is_refused_with_the_reason(experiments: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        TenantManifest.model_validate(_with(*experiments))
    assert message in str(refused.value)


def test_experiments_in_one_layer_with_disjoint_ranges_are_accepted() -> None:
    first = {**BASE, "layer": {"name": "first", "range": [0, 50]}}
    second = {**BASE, "id": "other", "layer": {"name": "first", "range": [50, 100]}, "metric": "step:create-api-key"}
    manifest = TenantManifest.model_validate(_with(first, second))
    assert manifest.experiments is not None
    assert [e.id for e in manifest.experiments.experiments] == ["first-path", "other"]


def test_a_nudge_experiment_names_templates_or_channels_and_leaves_a_path_experiments_hash_alone() -> None:
    manifest = TenantManifest.model_validate(_with(BASE, {**NUDGE, "metric": "step:create-api-key"}))
    assert manifest.experiments is not None
    path, nudge = manifest.experiments.experiments
    assert (path.kind, nudge.kind, nudge.trigger) == ("path", "nudge", "stuck")
    assert [(v.template, v.channel) for v in nudge.variants] == [(None, None), ("benefit", "email")]
    # a manifest written before nudge experiments keeps its hash (the fields added since are left out while
    # unset): the hash the manifest code of commit d536ce6 gave this document; an explicit `kind: path` is the same
    before = TenantManifest.model_validate(_as_of_d536ce6(_with(BASE))).content_hash()
    assert before == "5039f76170cb58f747fdbc3275a8b59d51eb8e5be8a72405873a7c9d7717794d"
    assert TenantManifest.model_validate(_as_of_d536ce6(_with({**BASE, "kind": "path"}))).content_hash() == before
    assert TenantManifest.model_validate(_as_of_d536ce6(_with(BASE, NUDGE))).content_hash() != before
