"""The cost model (benchmarks/cost.py, docs/cost.md): its arithmetic, the page against the data, bad data refused,
and the footprint against the Terraform region module's defaults."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from benchmarks.__main__ import main as benchmarks_main
from benchmarks.cost import (
    BEGIN,
    DOC,
    END,
    PRICES,
    USAGE,
    CostModelError,
    Scenario,
    generated_part,
    load,
    marginals,
    met_from,
    month,
    parse_model,
    render,
    setup,
    splice,
)
from tests.factories import ROOT

# ---- (1) the arithmetic, on a model small enough to work out by hand ----


def _price(usd: float, unit: str) -> dict[str, Any]:
    return {"usd": usd, "unit": unit, "what": unit, "region": "r", "entered": "2026-01-01", "page": "p"}


HAND_PRICES: dict[str, Any] = {
    "currency": "USD",
    "prices": {"ec2:n": _price(0.36, "hour"), "fx:thing": _price(10, "month"), "io:req": _price(1, "million-requests")},
}


def _measured(use: str, amount: float, unit: str) -> dict[str, Any]:
    return {"use": use, "amount": amount, "unit": unit, "kind": "measured", "source": "hand", "date": "2026-01-01"}


def _assumed(use: str, amount: float, unit: str) -> dict[str, Any]:
    return {"use": use, "amount": amount, "unit": unit, "kind": "assumed", "why": "hand"}


HAND_USAGE: dict[str, Any] = {
    "hours_per_month": 1000,
    "volumes": [1000],
    "regions": {"value": 1, "why": "hand"},
    "peak_to_average": {"value": 2, "why": "hand"},
    "targets": {"source": "hand", "per_user": 0.039, "per_1k_events": 1.0, "per_1k_inferences": 1.0},
    "pools": {
        "cpu": {
            "what": "cpu nodes",
            "node": "ec2:n",
            "slot": "vcpu",
            "slots_per_node": 2,
            "min_nodes": 1,
            "disk_gb": 0,
            "replication": 1,
            "utilisation": 0.5,
            "owner": "users",
        }
    },
    "fixed": [{"name": "things", "price": "fx:thing", "quantity": 3, "owner": "users", "source": "hand"}],
    "units": {
        "api": {"what": "a request", "class": "users", "draws": [_assumed("io:req", 1, "requests")]},
        "start": {
            "what": "a start",
            "class": "users",
            "draws": [_measured("cpu", 1000, "vcpu-us"), _assumed("io:req", 2, "requests")],
        },
        "event": {
            "what": "an event",
            "class": "events",
            "includes": {"api": 0.5},
            "draws": [_measured("cpu", 500, "vcpu-us")],
        },
        "infer": {"what": "a prediction", "class": "inferences", "inference": "single"},
    },
    "inference": {
        "mode": "m",
        "modes": {
            "m": {
                "what": "here",
                "single": [_measured("cpu", 1000, "per-vcpu-second")],
                "batched": [_measured("cpu", 4000, "per-vcpu-second")],
            }
        },
    },
    "user": {
        "start": {"count": 1, "why": "hand"},
        "event": {"count": 4, "why": "hand"},
        "infer": {"count": 2, "why": "hand"},
    },
}

# Worked by hand. A slot-microsecond costs 0.36 $/h / 3600 / 2 slots / 1e6 x replication 1 x peak 2 / utilisation 0.5
# = 2e-10 $. Marginal: start 1000 us (2e-7) + 2 requests (2e-6) = 2.2e-6; event 500 us (1e-7) + half a request
# (5e-7) = 6e-7; prediction 1e6 / 1000 per second = 1000 us = 2e-7; a user 2.2e-6 + 4 x 6e-7 + 2 x 2e-7 = 5e-6.
# A month of 1,000 users: the pool's demand is 1 (start) + 4,000 x 500 us = 2 (events) + 2,000 x 1,000 us = 2
# (inferences) = 5 slot-seconds, far under its one node, which costs 0.36 x 1000 h = 360 $ and is shared
# 1/5 (72 $), 2/5 (144 $), 2/5 (144 $). Fixed: 3 x 10 $ = 30 $ (users). Per use: 1,000 x 2 requests = 0.002 $
# (users), 4,000 x 0.5 requests = 0.002 $ (events). Total 390.004 $.


def _hand_model() -> Any:
    return parse_model(copy.deepcopy(HAND_PRICES), copy.deepcopy(HAND_USAGE))


def test_marginal_cost_of_each_unit_and_of_a_user() -> None:
    model = _hand_model()
    m = marginals(model, setup(model))
    assert sum(m.per_unit["start"].values()) == pytest.approx(2.2e-6)
    assert sum(m.per_unit["event"].values()) == pytest.approx(6e-7)
    assert sum(m.per_unit["infer"].values()) == pytest.approx(2e-7)
    assert m.per_unit["start"] == pytest.approx({"pool:cpu": 2e-7, "use:io:req": 2e-6})
    assert m.per_user == pytest.approx(5e-6)
    assert m.per_1k["events"] == pytest.approx(6e-4)
    assert m.per_1k["inferences"] == pytest.approx(2e-4)


def test_a_month_shares_the_pool_by_demand_and_adds_fixed_and_per_use_lines() -> None:
    model = _hand_model()
    mo = month(model, setup(model), 1000)
    assert mo.nodes == {"cpu": 1.0}
    assert mo.needed["cpu"] == pytest.approx(5 * 2 / (0.5 * 2 * 3.6e6))
    assert mo.lines["pool:cpu"] == pytest.approx({"users": 72.0, "events": 144.0, "inferences": 144.0})
    assert mo.lines["fixed:things"] == pytest.approx({"users": 30.0})
    assert mo.lines["use:io:req"] == pytest.approx({"users": 0.002, "events": 0.002})
    assert mo.total == pytest.approx(390.004)
    assert mo.per_user() == pytest.approx(0.390004)
    assert mo.per_1k("events") == pytest.approx(144.002 / 4000 * 1000)
    assert mo.per_1k("inferences") == pytest.approx(72.0)


def test_past_its_minimum_a_pool_grows_and_the_cost_per_user_tends_to_the_marginal() -> None:
    model = _hand_model()
    # 5,000 slot-us per user x 2 / (0.5 x 2 x 3.6e6 s) fills one node at 3.6e8 users; 3.6e9 need 10 nodes.
    mo = month(model, setup(model), 3.6e9)
    assert mo.nodes["cpu"] == pytest.approx(10.0)
    assert mo.per_user() == pytest.approx(5e-6 + 30 / 3.6e9)


def test_met_from_and_scenarios() -> None:
    model = _hand_model()
    knobs = setup(model)
    # Under the pool's minimum the cost per user is (360 + 30) / V + the per-use 2.004 $ per 1,000 users.
    expected = 390 / (0.039 - 2.004e-6)
    found = met_from(lambda v: month(model, knobs, v).per_user(), 0.039)
    assert found == pytest.approx(expected, rel=1e-3)
    assert met_from(lambda v: month(model, knobs, v).per_user(), 1e-7) is None  # under the marginal 5e-6
    two = setup(model, Scenario("two regions", regions=2, min_nodes={"cpu": 2}))
    assert month(model, two, 1000).total == pytest.approx(2 * 2 * 360 + 2 * 30 + 0.004)


# ---- (2) docs/cost.md holds what the committed data gives ----


def test_the_page_holds_what_the_data_gives() -> None:
    page = DOC.read_text(encoding="utf-8")
    assert generated_part(page) == render(load(PRICES, USAGE)), (
        "docs/cost.md differs from deploy/cost/*.yaml: run `make cost` and commit the page"
    )


def test_splice_replaces_only_between_the_markers() -> None:
    page = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert splice(page, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    assert generated_part(splice(page, "new\n")) == "new\n"
    with pytest.raises(CostModelError, match="markers"):
        splice("no markers here", "x")


# ---- (3) bad data is refused with a message that names the entry ----


def _committed() -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        yaml.safe_load(PRICES.read_text(encoding="utf-8")),
        yaml.safe_load(USAGE.read_text(encoding="utf-8")),
    )


def _missing_price(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    del prices["prices"]["ec2:m7i.xlarge"]


def _negative_figure(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["units"]["start"]["draws"][0]["amount"] = -4498


def _negative_price(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    prices["prices"]["ebs:gp3"]["usd"] = -0.08


def _unknown_draw_unit(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["units"]["event"]["draws"][0]["unit"] = "vcpu-ms"


def _unknown_price_unit(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    prices["prices"]["kms:key"]["unit"] = "fortnight"


def _unit_that_does_not_fit(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["units"]["api_request"]["draws"][0]["unit"] = "bytes"


def _measured_without_date(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    del usage["units"]["start"]["draws"][0]["date"]


def _zero_throughput(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["inference"]["modes"]["serve_gpu"]["single"][0]["amount"] = 0


def _unknown_unit_in_the_user(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["user"]["nudge"] = {"count": 1, "why": "later"}


def _misspelt_key(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["pools"]["general"]["utilization"] = usage["pools"]["general"].pop("utilisation")


def _utilisation_over_one(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["pools"]["aurora"]["utilisation"] = 1.5


def _include_cycle(prices: dict[str, Any], usage: dict[str, Any]) -> None:
    usage["units"]["api_request"]["includes"] = {"start": 1}


BAD = [
    (_missing_price, r"usage\.pools\.general\.node: names the price 'ec2:m7i\.xlarge', which deploy/cost/prices\.yaml"),
    (_negative_figure, r"usage\.units\.start\.draws\[0\]\.amount: must be >= 0, got -4498"),
    (_negative_price, r"prices\.ebs:gp3\.usd: must be >= 0, got -0\.08"),
    (_unknown_draw_unit, r"usage\.units\.event\.draws\[0\]\.unit: unknown unit 'vcpu-ms' for a pool"),
    (_unknown_price_unit, r"prices\.kms:key\.unit: unknown value 'fortnight' \(known: hour, "),
    (_unit_that_does_not_fit, r"usage\.units\.api_request\.draws\[0\]\.unit: bytes does not fit the price 'waf:req"),
    (_measured_without_date, r"usage\.units\.start\.draws\[0\]: a measured figure needs source and date"),
    (_zero_throughput, r"usage\.inference\.modes\.serve_gpu\.single\[0\]\.amount: must be > 0, got 0"),
    (_unknown_unit_in_the_user, r"usage\.user\.nudge: unknown unit 'nudge'"),
    (_misspelt_key, r"usage\.pools\.general: missing utilisation"),
    (_utilisation_over_one, r"usage\.pools\.aurora\.utilisation: must be <= 1\.0, got 1\.5"),
    (_include_cycle, r"includes itself"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD, ids=[spoil.__name__.strip("_") for spoil, _ in BAD])
def test_bad_data_is_refused(spoil: Any, message: str) -> None:
    prices, usage = _committed()
    parse_model(copy.deepcopy(prices), copy.deepcopy(usage))  # the committed data itself is good
    spoil(prices, usage)
    with pytest.raises(CostModelError, match=message):
        parse_model(prices, usage)


def test_the_command_refuses_bad_data_and_checks_the_page(tmp_path: Path) -> None:
    prices, usage = _committed()
    _negative_figure(prices, usage)
    bad = tmp_path / "usage.yaml"
    bad.write_text(yaml.safe_dump(usage), encoding="utf-8")
    result = CliRunner().invoke(benchmarks_main, ["cost", "--usage", str(bad)])
    assert result.exit_code == 1
    assert "usage.units.start.draws[0].amount: must be >= 0, got -4498" in result.output
    good = CliRunner().invoke(benchmarks_main, ["cost", "--check"])
    assert good.exit_code == 0, good.output
    assert "#### Against the targets" in good.output


# ---- (4) the footprint is the Terraform region module's defaults ----

VARIABLES = ROOT / "terraform" / "modules" / "region" / "variables.tf"


def _block(text: str, start: str, end: str) -> str:
    assert start in text, f"{VARIABLES.relative_to(ROOT)} has no {start!r}"
    block = text[text.index(start) :]
    return block[: block.index(end)]


def _default(block: str, field: str) -> str:
    found = re.search(rf'\b{field}\s*=\s*optional\((?:list\(string\)|string|number),\s*\[?"?([\w.\-]+)"?', block)
    assert found, f"no default for {field} in {VARIABLES.relative_to(ROOT)}"
    return found.group(1)


def test_the_pools_are_the_terraform_defaults() -> None:
    assert VARIABLES.exists(), f"{VARIABLES.relative_to(ROOT)} is missing: the cost model's footprint is read from it"
    text = VARIABLES.read_text(encoding="utf-8")
    pools = load().pools
    for name, key in (("general", "general_nodes"), ("gpu", "gpu_nodes")):
        block = _block(text, f"{key} = optional(object({{", "}), {})")
        assert pools[name].node == f"ec2:{_default(block, 'instance_types')}", name
        assert pools[name].min_nodes == float(_default(block, "min_size")), name
        assert pools[name].disk_gb == float(_default(block, "disk_size_gb")), name
    aurora = _block(text, 'variable "aurora"', "default")
    assert pools["aurora"].node == f"rds:{_default(aurora, 'instance_class')}"
    assert pools["aurora"].min_nodes == float(_default(aurora, "instance_count"))
    msk = _block(text, 'variable "msk"', "default")
    assert pools["msk"].node == f"msk:{_default(msk, 'broker_instance_type')}"
    assert pools["msk"].min_nodes == 3 * float(_default(msk, "brokers_per_zone"))  # one per zone, three zones
    assert pools["msk"].disk_gb == float(_default(msk, "broker_volume_size_gb"))
    redis = _block(text, 'variable "redis"', "default")
    assert pools["redis"].node == f"elasticache:{_default(redis, 'node_type')}"
    assert pools["redis"].min_nodes == 1 + float(_default(redis, "replicas"))  # a primary and its replicas
    directory = _block(text, 'variable "directory"', "nullable")
    acu = [f.quantity for f in load().fixed if f.price == "rds:aurora-serverless-v2"]
    assert acu == [2 * float(_default(directory, "min_capacity_acu"))]  # two db.serverless instances
