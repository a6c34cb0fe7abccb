"""The chart's dashboards and alert rules use only metrics the platform exports.

A dashboard panel or an alert over a metric that does not exist shows nothing and never fires, and
nothing else would tell. These tests read every PromQL expression of the Grafana dashboards
(helm/firstmile/dashboards/*.json) and of the Prometheus rules (helm/firstmile/rules/firstmile.rules.yaml),
start the real app, make it serve a few requests, and check against its ``/metrics`` that

* every metric named in an expression is exported (histogram series by their family name; names the
  rules themselves record, and Prometheus' own ``up``, are not the platform's);
* every label matcher written on a metric (``metric{label=…}``) names one of its labels, or one
  Prometheus attaches to every target;
* the latency SLO's threshold is a bucket boundary of the API histogram.

The dashboards are also checked as Grafana documents (uid, title, schemaVersion, the ``datasource``
variable on every query).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import yaml
from litestar import Litestar
from litestar.testing import AsyncTestClient

CHART = Path(__file__).resolve().parents[2] / "helm" / "firstmile"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "rules" / "firstmile.rules.yaml"

# Labels Prometheus (and the chart's ServiceMonitor/PodMonitor relabelings) put on every series of a target.
TARGET_LABELS = frozenset(
    ["namespace", "job", "instance", "pod", "container", "endpoint", "service", "component", "consumer_group"]
)
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    ]
)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_PLACEHOLDER = re.compile(r"__[A-Z][A-Z_]*__")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords or labels."""
    text = _PLACEHOLDER.sub("0", _VARIABLE.sub("1m", expr))
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name, call in _IDENTIFIER.findall(text) if not call and name.lower() not in KEYWORDS}


def label_matchers(expr: str) -> Iterator[tuple[str, str]]:
    """(metric, label) for every matcher written on a metric selector."""
    text = _PLACEHOLDER.sub("placeholder", _VARIABLE.sub("1m", expr))
    for metric, body in _SELECTOR.findall(text):
        for label in _MATCHER.findall(_STRING.sub('""', body)):
            yield metric, label


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _panel_exprs(panels: list[dict[str, object]]) -> Iterator[str]:
    for panel in panels:
        for target in panel.get("targets") or []:  # type: ignore[attr-defined]
            yield target["expr"]
        yield from _panel_exprs(panel.get("panels") or [])  # type: ignore[arg-type]


def dashboard_exprs(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    exprs = list(_panel_exprs(board["panels"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def every_expression() -> list[tuple[str, str]]:
    """(where, expr) of every dashboard query and every rule; label_values(m, l) queries count as m."""
    found = []
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            expr = re.sub(r"label_values\(\s*([^,()]+)\s*,[^)]*\)", r"\1", expr)
            found.append((f"dashboards/{path.name}", expr))
    for rule in rules():
        found.append((f"rules: {rule.get('record') or rule.get('alert')}", str(rule["expr"])))
    return found


def test_the_extractor_finds_metrics_and_only_metrics() -> None:
    expr = (
        'sum by (namespace, le) (rate(a_seconds_bucket{job="x", le="0.5"}[5m])) / ignoring (le) b_total offset 5m'
        ' > bool 0.5 or on (job) absent(up{job=~"__JOB_PREFIX__-.+"}) unless c:recorded:ratio[$__range]'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "up", "c:recorded:ratio"}
    assert set(label_matchers(expr)) == {("a_seconds_bucket", "job"), ("a_seconds_bucket", "le"), ("up", "job")}


def test_the_sources_have_expressions() -> None:
    assert {p.stem for p in DASHBOARDS} == {"ops", "product", "ml", "experiment"}
    for path in DASHBOARDS:
        assert dashboard_exprs(path), f"{path.name} has no query"
    assert any("alert" in r for r in rules()) and any("record" in r for r in rules())


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_a_grafana_document(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == f"firstmile-{path.stem}" and board["title"].startswith("Firstmile / ")
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = []

    def walk(panels: list[dict[str, object]]) -> Iterator[dict[str, object]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels") or [])  # type: ignore[arg-type]

    for panel in walk(board["panels"]):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert isinstance(grid, dict) and {"h", "w", "x", "y"} <= grid.keys() and grid["x"] + grid["w"] <= 24
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert isinstance(targets, list) and targets, panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"] and target["expr"]
    assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"


@pytest.fixture(scope="module")
async def exposition(client: AsyncTestClient[Litestar]) -> str:
    """/metrics of the running app after requests that go through the middleware and the error path."""
    for path in ("/health/live", "/health/ready", "/v1/onboarding/u-1", "/no-such-route"):
        await client.get(path)
    await client.post("/v1/onboarding/start", json={"user_id": "u-1"})
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def exported_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_metric_the_dashboards_and_rules_use_is_exported(exposition: str) -> None:
    exported = exported_names(exposition)
    recorded = {str(r["record"]) for r in rules() if "record" in r}
    missing: dict[str, set[str]] = {}
    for where, expr in every_expression():
        for name in metric_names(expr) - recorded - {"up"}:
            if name not in exported and family(name) not in exported:
                missing.setdefault(name, set()).add(where)
    assert not missing, "not exported by the platform: " + "; ".join(
        f"{name} (used by {', '.join(sorted(places))})" for name, places in sorted(missing.items())
    )


async def test_every_label_matcher_names_a_label_of_its_metric(exposition: str) -> None:
    # The registry has no public lookup by name; its labels are what the metric really carries.
    collectors = prometheus_client.REGISTRY._names_to_collectors
    recorded = {str(r["record"]) for r in rules() if "record" in r}
    wrong = set()
    for where, expr in every_expression():
        for metric, label in label_matchers(expr):
            if metric in recorded or metric == "up" or label in TARGET_LABELS:
                continue
            collector = collectors.get(metric)
            assert collector is not None, f"{where}: {metric} is not registered"
            allowed = set(getattr(collector, "_labelnames", ()))
            if metric.endswith("_bucket"):
                allowed.add("le")
            if label not in allowed:
                wrong.add(f"{where}: {metric}{{{label}}} (its labels: {', '.join(sorted(allowed)) or 'none'})")
    assert not wrong, "label matchers on labels the metric does not have: " + "; ".join(sorted(wrong))


async def test_latency_objective_is_a_bucket_boundary(exposition: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    slo = schema["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]["slo"]["properties"]
    allowed = slo["latencyThresholdSeconds"]["enum"]
    default = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]["slo"]
    buckets = set(re.findall(r'^firstmile_api_request_duration_seconds_bucket\{[^}]*le="([^"]+)"', exposition, re.M))
    assert default["latencyThresholdSeconds"] == "0.5"
    assert set(allowed) <= buckets, f"thresholds the schema allows but the histogram lacks: {set(allowed) - buckets}"
