"""A tenant's logged decisions → training set, refusals naming the gap, and the off-policy report's gate
(docs/models.md#per-tenant-models), without a database: the rows are what ``logged_decisions`` returns."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta

import numpy as np
import pytest

from firstmile.ml.tenant_models import TenantData, TrainingRefusedError, feature_coverage, logged_data, report_text
from firstmile.onboarding.catalog import PathCatalog
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.planner import explore, plan
from firstmile.onboarding.service import LoggedDecision
from firstmile.tenancy.manifest import load_manifest
from firstmile_inference.tenant import train_logged
from tests.factories import ROOT

EPSILON = 0.3


def _catalog(version_of_generic: int = 1) -> PathCatalog:
    manifest = load_manifest(ROOT / "tenants" / "demo.yaml")
    paths = tuple(
        PathDef.from_definition(
            p.id, version_of_generic if p.id == "generic" else 1, p.model_dump(mode="json", exclude_none=True)
        )
        for p in manifest.paths
    )
    return PathCatalog(revision=1, default_key=manifest.default_path, current=paths, exploration=EPSILON)


def _rows(n: int, reward: str, *, seed: int = 3, company_size: bool = True) -> list[LoggedDecision]:
    """``n`` logged decisions of the rules with epsilon-greedy exploration, as the planner logs them."""
    catalog = _catalog()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        traits = {"persona": "developer", "use_case": "marketing", "signup_source": "organic"}
        if company_size:
            traits["company_size"] = ("1-10", "11-50")[i % 2]
        greedy = plan(catalog.current, catalog.default_key, traits)
        taken = explore(greedy, catalog.current, catalog.default_key, traits, EPSILON, rng)
        activated = taken.path_key == "generic" if reward == "generic" else rng.random() < 0.3
        rows.append(
            LoggedDecision(
                taken.path_key, taken.path_version, None, float(taken.details["propensity"]), traits, activated
            )
        )
    return rows


def _data(rows: list[LoggedDecision], catalog: PathCatalog | None = None) -> TenantData:
    return TenantData(uuid.uuid4(), "acme", catalog or _catalog(), rows, timedelta(days=14), timedelta(days=90))


def test_too_few_decisions_are_refused_with_the_count() -> None:
    with pytest.raises(TrainingRefusedError, match=r"has 120 logged decisions .* at least 500 are needed"):
        logged_data(_data(_rows(120, "generic")))


def test_a_catalog_change_within_the_window_names_the_old_versions() -> None:
    with pytest.raises(TrainingRefusedError, match=r"generic@1 \(\d+ decisions; current version 2\)"):
        logged_data(_data(_rows(200, "generic"), _catalog(version_of_generic=2)), min_decisions=100)


def test_a_feature_missing_from_the_logs_is_named() -> None:
    with pytest.raises(TrainingRefusedError, match=r"company_size \(0 of 200 decisions carry it\)"):
        logged_data(_data(_rows(200, "generic", company_size=False)), min_decisions=100)


def test_a_path_taken_too_rarely_is_named() -> None:
    with pytest.raises(TrainingRefusedError, match=r"too few decisions on a path: .*generic \(taken \d+ times"):
        logged_data(_data(_rows(200, "generic")), min_decisions=100, min_per_path=60)


def test_the_training_set_carries_propensities_eligibility_and_rewards() -> None:
    rows = _rows(300, "generic")
    data = logged_data(_data(rows), min_decisions=100, min_per_path=10)
    assert data.n == 300 and data.paths[data.actions[0]] == rows[0].path_key
    eligible = {data.paths[k] for k in np.flatnonzero(data.eligible.any(axis=0))}
    assert eligible == {"developer-quickstart", "marketing-campaigns", "generic"}
    assert set(np.round(data.propensities, 4)) == {round(1 - EPSILON + EPSILON / 3, 4), round(EPSILON / 3, 4)}
    assert data.rewards.sum() == sum(r.activated for r in rows)
    coverage = feature_coverage(data)
    assert coverage["company_size"] == 1.0 and coverage["engagement_score"] == 0.0  # rules decisions: traits only


def test_the_gate_passes_a_better_policy_and_refuses_one_no_better() -> None:
    better = train_logged(logged_data(_data(_rows(300, "generic")), min_decisions=100, min_per_path=10), seed=7)
    report = better.metrics["ope"]
    assert report["gate_passed"] and report["estimates"]["dr"]["low"] > report["logging_policy"]["value"]
    assert set(report["estimates"]) == {"ips", "snips", "dr"} and report["level"] == 0.95
    assert "it passes" in report_text("tenant-acme.path_classifier", "1.0.0", report)
    # activation that does not depend on the path: nothing to gain over the logging policy
    same = train_logged(logged_data(_data(_rows(300, "noise", seed=5)), min_decisions=100, min_per_path=10), seed=7)
    assert not same.metrics["ope"]["gate_passed"]
    assert "it fails" in report_text("tenant-acme.path_classifier", "1.0.0", same.metrics["ope"])


def test_a_candidate_that_never_chose_a_logged_path_is_refused_with_the_gap() -> None:
    from firstmile_inference.tenant import LoggedData, NoOverlapError, off_policy_report

    n = 6
    data = LoggedData(
        features=[{} for _ in range(n)],
        actions=np.zeros(n, dtype=np.int64),  # every held-out decision took path a
        rewards=np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
        propensities=np.full(n, 0.9),
        eligible=np.ones((n, 2), dtype=np.bool_),
        paths=("a", "b"),
    )
    q = np.tile([0.2, 0.8], (n, 1))  # the candidate always takes b
    with pytest.raises(NoOverlapError, match="chose none of the paths logged for its 6 held-out decisions") as refused:
        off_policy_report(data, np.arange(n, dtype=np.int64), q)
    assert str(refused.value).endswith("(logged: a 6; the candidate chose: b 6)")  # what to look at next
    q[2] = [0.9, 0.1]  # one decision where it agrees: an estimate exists
    assert off_policy_report(data, np.arange(n, dtype=np.int64), q)["evaluation_decisions"] == n
