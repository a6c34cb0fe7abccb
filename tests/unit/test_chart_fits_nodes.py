"""The chart's Ray worker pods fit the nodes the Terraform region module gives them.

A pod whose requests exceed a node's allocatable stays Pending forever, and no schema or dry-run
sees it: the chart (helm/firstmile/values.yaml) and the node groups
(terraform/modules/region/variables.tf) are checked together here.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.factories import ROOT

VALUES = ROOT / "helm" / "firstmile" / "values.yaml"
REGION_VARIABLES = ROOT / "terraform" / "modules" / "region" / "variables.tf"

# vCPU and memory (GiB) and EKS's max pods (VPC CNI, no prefix delegation) of the instance types the
# node groups may name; a type missing here fails the test instead of passing unchecked.
SHAPES: dict[str, tuple[int, int, int]] = {
    "g6.xlarge": (4, 16, 58),
    "g5.xlarge": (4, 16, 58),
    "g5.2xlarge": (8, 32, 58),
    "m7i.xlarge": (4, 16, 58),
    "m6i.xlarge": (4, 16, 58),
}
# What the node's DaemonSets (VPC CNI, kube-proxy, EBS CSI node, NVIDIA device plugin) request, together.
DAEMONSETS_CPU_M = 250
DAEMONSETS_MEMORY_MI = 600


def allocatable(instance_type: str) -> tuple[int, int]:
    """CPU (millicores) and memory (MiB) left for pods, by the EKS AMI's kubelet reservation."""
    vcpus, gib, max_pods = SHAPES[instance_type]
    # kube-reserved CPU: 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% above.
    reserved_cpu = 60 + (10 if vcpus > 1 else 0) + 5 * min(max(vcpus - 2, 0), 2) + 2.5 * max(vcpus - 4, 0)
    # kube-reserved memory 255Mi + 11Mi per pod, eviction threshold 100Mi; EC2 reports ~3% less than
    # the nominal GiB as the node's capacity.
    capacity_mi = int(gib * 1024 * 0.97)
    reserved_mi = 255 + 11 * max_pods + 100
    return vcpus * 1000 - int(reserved_cpu) - DAEMONSETS_CPU_M, capacity_mi - reserved_mi - DAEMONSETS_MEMORY_MI


def millicores(value: str | int | float) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def mebibytes(value: str) -> int:
    units = {"Mi": 1, "Gi": 1024, "M": 1000 / 1.048576 / 1000, "G": 1000**3 / 1024**2}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", str(value))
    assert match, f"memory quantity {value!r} not understood"
    return int(float(match[1]) * units[match[2]])


def node_group_types(group: str) -> list[str]:
    text = REGION_VARIABLES.read_text()
    match = re.search(
        group + r" = optional\(object\(\{\s*instance_types\s*=\s*optional\(list\(string\), \[([^\]]*)\]", text
    )
    assert match, f"{group}.instance_types default not found in {REGION_VARIABLES}"
    return re.findall(r'"([^"]+)"', match[1])


def worker(group: str) -> dict[str, str]:
    values = yaml.safe_load(VALUES.read_text())
    requests: dict[str, str] = values["inference"][group]["resources"]["requests"]
    return requests


@pytest.mark.parametrize(
    ("group", "node_group"), [("gpu", "gpu_nodes"), ("cpu", "general_nodes"), ("head", "general_nodes")]
)
def test_ray_pods_fit_every_instance_type_of_their_node_group(group: str, node_group: str) -> None:
    requests = worker(group)
    types = node_group_types(node_group)
    assert types, node_group
    for instance_type in types:
        assert instance_type in SHAPES, f"{instance_type} (terraform {node_group}) has no shape in this test"
        cpu, memory = allocatable(instance_type)
        assert millicores(requests["cpu"]) <= cpu, (
            f"{group} requests {requests['cpu']} CPU; {instance_type} leaves {cpu}m"
        )
        assert mebibytes(requests["memory"]) <= memory, (
            f"{group} requests {requests['memory']}; {instance_type} leaves {memory}Mi"
        )


def test_a_whole_node_request_does_not_fit() -> None:
    # The check itself can fail: a request of the node's nominal size never fits.
    cpu, memory = allocatable("g6.xlarge")
    assert millicores("4") > cpu
    assert mebibytes("16Gi") > memory


def test_production_environment_names_only_known_shapes() -> None:
    tfvars = (ROOT / "terraform" / "envs" / "production" / "terraform.tfvars").read_text()
    named = set(re.findall(r'"([a-z][a-z0-9]*\.[0-9]*x?large)"', tfvars))
    assert named, "no instance type found in terraform.tfvars"
    unknown = sorted(t for t in named if t not in SHAPES)
    assert not unknown, f"terraform.tfvars names instance types this test cannot size: {unknown}"
    gpu = yaml.safe_load(VALUES.read_text())["inference"]["gpu"]["resources"]["requests"]
    for instance_type in named:
        cpu, memory = allocatable(instance_type)
        if instance_type.startswith("g"):
            assert millicores(gpu["cpu"]) <= cpu and mebibytes(gpu["memory"]) <= memory, instance_type
