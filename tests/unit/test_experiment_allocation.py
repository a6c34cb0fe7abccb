"""Allocation of users to experiment variants: deterministic across processes, sticky when the traffic
changes, exclusive within a layer, with a holdout and targeting."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest

from firstmile.experiments.allocation import (
    Experiment,
    Rule,
    Variant,
    allocate,
    allocate_all,
    in_holdout,
    overlapping,
    pair,
    unit,
)

USERS = [f"user-{i}" for i in range(20_000)]
AB = (Variant("control", 1), Variant("treatment", 1))


def _experiment(**changes: object) -> Experiment:
    values: dict[str, object] = {"id": "checklist-order", "seed": "checklist-order-2026", "variants": AB} | changes
    return Experiment(**values)  # type: ignore[arg-type]


def _variants(experiment: Experiment) -> dict[str, str]:
    found: dict[str, str] = {}
    for user in USERS:
        outcome = allocate(experiment, user, {})
        if outcome.allocation is not None:
            found[user] = outcome.allocation.variant
    return found


def test_the_draw_is_a_fixed_function_of_its_inputs() -> None:
    # A change of formula would move every user of every running experiment: these values are the contract.
    assert pair("checklist-order-2026", "user-1") == (0.6160352999194788, 0.044107954353476087)  # traffic, variant
    assert unit("first", "layer", "user-1") == 0.47096687545151167
    assert unit("a", "b", "c") != unit("a", "b", "d") and 0.0 <= unit("", "", "") < 1.0
    [allocation] = allocate_all([_experiment(traffic_percent=62.0)], "user-1", {})  # 0.616 < 0.62: admitted
    assert allocation.variant == "control" and allocation.inputs["variant_u"] == round(0.044107954353476087, 12)
    assert allocate(_experiment(traffic_percent=61.0), "user-1", {}).reason == "traffic"


def _in_another_process(experiment: Experiment) -> dict[str, str]:
    return _variants(experiment)


def test_two_processes_allocate_every_user_identically() -> None:
    experiment = _experiment(traffic_percent=60.0)
    here = _variants(experiment)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.apply(_in_another_process, (experiment,))
    assert here == there and 0.55 < len(here) / len(USERS) < 0.65


def test_variants_follow_their_weights() -> None:
    experiment = _experiment(variants=(Variant("control", 2), Variant("a", 1), Variant("b", 1)))
    counts = Counter(_variants(experiment).values())
    n = sum(counts.values())
    assert n == len(USERS)
    for name, share in (("control", 0.5), ("a", 0.25), ("b", 0.25)):
        assert abs(counts[name] / n - share) < 0.015, counts


def test_raising_the_traffic_never_moves_an_allocated_user_and_lowering_it_moves_none_of_the_rest() -> None:
    at_20 = _variants(_experiment(traffic_percent=20.0))
    at_50 = _variants(_experiment(traffic_percent=50.0))
    at_10 = _variants(_experiment(traffic_percent=10.0))
    assert 0.18 < len(at_20) / len(USERS) < 0.22 and 0.48 < len(at_50) / len(USERS) < 0.52
    assert all(at_50[user] == variant for user, variant in at_20.items())  # everyone kept, same variant
    assert set(at_10) < set(at_20) and all(at_20[user] == variant for user, variant in at_10.items())
    # the variant is drawn independently of the traffic: shares hold among the few in the experiment too
    assert abs(Counter(at_10.values())["control"] / len(at_10) - 0.5) < 0.05


def test_a_user_is_in_at_most_one_experiment_of_a_layer() -> None:
    first = _experiment(id="first", seed="s1", layer="checklist", layer_range=(0.0, 40.0))
    second = _experiment(id="second", seed="s2", layer="checklist", layer_range=(40.0, 100.0))
    elsewhere = _experiment(id="copy", seed="s3")  # its own layer: independent of the others
    both = 0
    counts: Counter[str] = Counter()
    for user in USERS:
        found = {a.experiment for a in allocate_all([first, second, elsewhere], user, {})}
        counts.update(found)
        both += {"first", "second"} <= found
    assert both == 0 and counts["copy"] == len(USERS)
    assert abs(counts["first"] / len(USERS) - 0.4) < 0.015 and abs(counts["second"] / len(USERS) - 0.6) < 0.015
    assert overlapping([first, second, elsewhere]) == []
    clash = _experiment(id="clash", seed="s4", layer="checklist", layer_range=(30.0, 50.0))
    assert overlapping([first, second, clash]) == [("checklist", "first", "clash"), ("checklist", "clash", "second")]


def test_the_holdout_is_in_no_experiment() -> None:
    held = [u for u in USERS if in_holdout("tenant-seed", 10.0, u)]
    assert abs(len(held) / len(USERS) - 0.10) < 0.01
    assert all(
        allocate_all([_experiment()], u, {}, tenant_seed="tenant-seed", holdout_percent=10.0) == [] for u in held
    )
    assert not any(in_holdout("tenant-seed", 0.0, u) for u in USERS[:1000])
    outside = next(u for u in USERS if u not in held)
    [allocation] = allocate_all([_experiment()], outside, {}, tenant_seed="tenant-seed", holdout_percent=10.0)
    assert allocation.inputs["hash"] == "sha256" and allocation.inputs["seed"] == "checklist-order-2026"


def test_targeting_admits_only_matching_users() -> None:
    experiment = _experiment(targeting=(Rule("persona", "eq", "developer"), Rule("company_size", "in", ["1-10"])))
    assert allocate(experiment, "u-1", {"persona": "developer", "company_size": "1-10"}).reason == "allocated"
    assert allocate(experiment, "u-1", {"persona": "marketer", "company_size": "1-10"}).reason == "targeting"
    assert allocate(experiment, "u-1", {"persona": "developer"}).reason == "targeting"
    assert allocate(_experiment(traffic_percent=0.0), "u-1", {}).reason == "traffic"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": ()}, "no variants"),
        ({"variants": (Variant("control", 1), Variant("b", 0))}, "weight must be positive"),
        ({"traffic_percent": 100.5}, "traffic_percent"),
        ({"traffic_percent": -1.0}, "traffic_percent"),
        ({"layer_range": (50.0, 50.0)}, "layer range"),
        ({"layer_range": (0.0, 101.0)}, "layer range"),
    ],
)
def test_an_impossible_experiment_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _experiment(**changes)
