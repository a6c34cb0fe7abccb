"""The Ray Serve application against a private Ray (deploy/local/ray.sh start test), and its pure parts.

The module fixture trains three tiny models into a temporary registry, stages
them, starts Ray once (it is the slow part: about a minute on two cores) and
stops it at the end, failures included. Every test of this module runs on one
xdist worker (``--dist loadgroup``).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile_inference.registry import Registry
from firstmile_inference.schema import MODEL_NAMES
from firstmile_inference.serve import (
    PROBES,
    BatchStats,
    Chunk,
    Item,
    ModelServer,
    ModelSet,
    ProblemError,
    ServeSettings,
    applications,
    chunk_instances,
    load_model_set,
    parse_predict_body,
    predict_chunks,
    predict_grouped,
    route_path,
)
from tests.conftest import PEPPER, Database, TenantFixture, make_settings
from tests.factories import ROOT
from tests.integration.test_adaptive_planner import adaptive_tenant
from tests.support.inference import RecordingClient

pytestmark = pytest.mark.xdist_group("ray")

RAY_SH = ROOT / "deploy" / "local" / "ray.sh"
PROBLEM = "application/problem+json"


# ---------------------------------------------------------------- test doubles (pure parts)


class EchoPredictor:
    """A Predictor that echoes ``x`` and rejects instances holding ``bad`` (naming the index, as real ones do)."""

    def __init__(self, version: str, name: str = "path_classifier", fail: bool = False) -> None:
        self.name = name
        self.version = version
        self.device = "cpu"
        self.fail = fail
        self.calls: list[int] = []

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append(len(instances))
        if self.fail:
            raise RuntimeError("weights on fire")
        for i, instance in enumerate(instances):
            if "bad" in instance:
                raise ValueError(f"instance {i}: field 'bad' is not allowed")
        return [{"x": instance.get("x"), "version": self.version} for instance in instances]


@dataclass
class FakeVersion:
    name: str
    version: str


@dataclass
class FakeStages:
    production: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    shadow: str | None = None


class FakeRegistry:
    def __init__(self, stages: FakeStages) -> None:
        self._stages = stages

    def resolve(self, name: str, stage: str) -> FakeVersion | None:
        version = getattr(self._stages, stage)
        return None if version is None else FakeVersion(name, version)

    def stages(self, name: str) -> FakeStages:
        return self._stages


# ---------------------------------------------------------------- pure parts


def test_settings_from_args_coerce_strings_and_read_the_environment() -> None:
    s = ServeSettings.from_args(
        {"registry_uri": "/r", "num_gpus": "1", "max_batch_size": "16", "models": "path_classifier"},
        environ={"FIRSTMILE_SERVE_BATCH_WAIT_TIMEOUT_S": "0.02", "FIRSTMILE_SERVE_NUM_GPUS": "0"},
    )
    assert (s.num_gpus, s.max_batch_size, s.batch_wait_timeout_s, s.models) == (1.0, 16, 0.02, ("path_classifier",))
    assert s.effective_max_ongoing_requests == 64
    assert s.runtime_config()["registry_uri"] == "/r"
    assert (s.effective_torch_threads, ServeSettings(num_cpus=2.5).effective_torch_threads) == (1, 2)
    env_only = ServeSettings.from_args({}, environ={"FIRSTMILE_SERVE_REGISTRY_URI": "file:///m"})
    assert env_only.registry_uri == "file:///m"
    index_only = ServeSettings.from_args({"models": "stuck_detector"}, environ={}, require_registry=False)
    assert index_only.models == ("stuck_detector",)


def test_one_application_per_model_plus_the_index() -> None:
    specs = applications({"registry_uri": "/r", "models": "path_classifier,stuck_detector"})
    assert [(s.name, s.route_prefix) for s in specs] == [
        ("path_classifier", "/v1/models/path_classifier"),
        ("stuck_detector", "/v1/models/stuck_detector"),
        ("index", "/"),
    ]
    assert route_path({"path": "/v1/models/path_classifier/predict", "root_path": "/v1/models/path_classifier"}) == (
        "/predict"
    )
    assert route_path({"path": "/predict", "root_path": ""}) == "/predict"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "registry_uri is required"),
        ({"registry_uri": "/r", "bogus": 1}, "unknown application arguments ['bogus']"),
        ({"registry_uri": "/r", "max_batch_size": "2.5"}, "max_batch_size"),
        ({"registry_uri": "/r", "min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
        ({"registry_uri": "/r", "models": "path_classifier,nope"}, "models must be"),
        ({"registry_uri": "/r", "num_gpus": 1.5}, "whole number"),
        ({"registry_uri": "/r", "model": "nope"}, "model must be one of"),
        ({"registry_uri": "/r", "router_replicas": 2}, "unknown application arguments ['router_replicas']"),
    ],
)
def test_settings_refuse_bad_arguments(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServeSettings.from_args(args, environ={})


@pytest.mark.parametrize(
    ("raw", "slug", "detail"),
    [
        (b"{", "malformed-json", "not JSON"),
        (b"[]", "validation-error", "JSON object"),
        (b'{"instances": []}', "validation-error", "non-empty list"),
        (b'{"instances": [1]}', "validation-error", "instances[0] must be an object"),
        (b'{"instances": [{}], "stage": "staging"}', "validation-error", "'stage' must be one of"),
        (b'{"instances": [{}], "version": 3}', "validation-error", "'version' must be"),
        (b'{"instances": [{}], "instance": {}}', "validation-error", "unknown fields ['instance']"),
        (b'{"instances": [{}, {}, {}]}', "validation-error", "at most 2"),
    ],
)
def test_predict_body_problems(raw: bytes, slug: str, detail: str) -> None:
    with pytest.raises(ProblemError) as caught:
        parse_predict_body(raw, max_instances=2)
    assert caught.value.status == 400
    body = caught.value.body()
    assert body["type"].endswith("/" + slug)
    assert detail in body["detail"]


def test_model_set_selects_by_version_and_stage() -> None:
    prod, canary = EchoPredictor("1.0.0"), EchoPredictor("1.1.0")
    models = ModelSet("path_classifier", {"1.0.0": prod, "1.1.0": canary}, {"production": "1.0.0", "canary": "1.1.0"})
    assert models.select(None, None) == (prod, "production")
    assert models.select(None, "canary") == (canary, "canary")
    assert models.select("1.1.0", None) == (canary, "canary")
    assert models.select("1.0.0", "production") == (prod, "production")
    for version, stage, slug in [
        (None, "shadow", "stage-empty"),
        ("9.9.9", None, "version-not-loaded"),
        ("1.0.0", "canary", "stage-empty"),
    ]:
        with pytest.raises(ProblemError) as caught:
            models.select(version, stage)
        assert (caught.value.status, caught.value.slug) == (404, slug)


def test_batches_run_one_call_per_version_and_isolate_bad_instances() -> None:
    a, b = EchoPredictor("1.0.0"), EchoPredictor("1.1.0")
    items = [Item(a, {"x": 1}), Item(b, {"x": 2}), Item(a, {"x": 3}), Item(a, {"bad": 1, "x": 4})]
    out = predict_grouped(items)
    assert [o.prediction for o in out[:3]] == [
        {"x": 1, "version": "1.0.0"},
        {"x": 2, "version": "1.1.0"},
        {"x": 3, "version": "1.0.0"},
    ]
    assert out[3].error == "field 'bad' is not allowed"  # the single-instance retry's "instance 0: " is dropped
    assert b.calls == [1]
    assert a.calls == [3, 1, 1, 1]  # the group failed on the bad one, then one at a time

    broken = predict_grouped([Item(EchoPredictor("2.0.0", fail=True), {"x": 1})])
    assert broken[0].failure == "RuntimeError: weights on fire"


def test_a_batch_of_requests_is_one_batch_of_instances() -> None:
    a, b = EchoPredictor("1.0.0"), EchoPredictor("1.1.0")
    chunks = [Chunk(a, [{"x": 1}, {"x": 2}]), Chunk(b, [{"x": 3}]), Chunk(a, [{"x": 4}, {"bad": 1}])]
    assert chunk_instances(chunks) == 5
    out = predict_chunks(chunks)
    assert [len(o) for o in out] == [2, 1, 2]
    assert [o.prediction["x"] for o in out[0] if o.prediction] == [1, 2]
    assert out[1][0].prediction == {"x": 3, "version": "1.1.0"}
    assert out[2][0].prediction is not None and out[2][1].error == "field 'bad' is not allowed"
    assert (a.calls[0], b.calls) == (4, [1])  # one call per version for the whole batch


def test_reload_reuses_loaded_versions_and_reads_the_canary_weight() -> None:
    loaded: list[str] = []

    def load(mv: Any) -> EchoPredictor:
        loaded.append(mv.version)
        return EchoPredictor(mv.version)

    first = load_model_set(FakeRegistry(FakeStages(production="1.0.0")), "path_classifier", load)
    second = load_model_set(
        FakeRegistry(FakeStages(production="1.0.0", canary="1.1.0", canary_weight=0.2, shadow="1.1.0")),
        "path_classifier",
        load,
        first,
    )
    assert loaded == ["1.0.0", "1.1.0"]
    assert second.predictors["1.0.0"] is first.predictors["1.0.0"]
    assert second.canary_weight == 0.2
    described = second.describe()
    assert described["stages"] == {"production": "1.0.0", "canary": "1.1.0", "shadow": "1.1.0", "canary_weight": 0.2}
    assert described["versions"][1] == {"version": "1.1.0", "stages": ["canary", "shadow"], "device": "cpu"}


def test_health_check_needs_a_production_model_that_predicts() -> None:
    server = ModelServer("path_classifier")
    with pytest.raises(ProblemError, match="no production version"):
        server.check_health()
    server.models = ModelSet("path_classifier", {"1.0.0": EchoPredictor("1.0.0", fail=True)}, {"production": "1.0.0"})
    with pytest.raises(RuntimeError, match="weights on fire"):
        server.check_health()
    server.models = ModelSet("path_classifier", {"1.0.0": EchoPredictor("1.0.0")}, {"production": "1.0.0"})
    server.check_health()


def test_batch_stats_histogram() -> None:
    stats = BatchStats()
    for size in (1, 3, 3, 40):
        stats.record(size)
    body = stats.as_dict()
    assert (body["batches"], body["instances"], body["max_batch_size_seen"]) == (4, 47, 40)
    assert (body["histogram"]["le_1"], body["histogram"]["le_4"], body["histogram"]["le_64"]) == (1, 3, 4)


# ---------------------------------------------------------------- against Ray Serve


@dataclass(frozen=True)
class Served:
    url: str
    registry: Registry
    registry_dir: Path


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RAY_SH), *args], capture_output=True, text=True, timeout=600, check=False, cwd=ROOT
    )


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def _train_tiny(registry: Registry) -> None:
    from firstmile_inference.simulate import generate
    from firstmile_inference.train import Hyper, register_all, train_all

    data = generate(400, seed=11)
    hyper: dict[str, Hyper] = {name: Hyper(epochs=1, batch_size=256, hidden=(16,)) for name in MODEL_NAMES}
    trained = train_all(data, seed=11, hyper=hyper, threads=1)
    register_all(registry, trained, promote_to="production")  # 1.0.0 of each
    # a second path classifier (same weights, its own version) as the canary
    pc = trained["path_classifier"]
    mv = registry.register(
        "path_classifier", weights=pc.state_dict, config=pc.config, metrics=pc.metrics, reference=pc.reference
    )
    registry.promote("path_classifier", mv.version, "canary", weight=0.25, force=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    registry_dir = tmp_path_factory.mktemp("registry")
    registry = Registry(registry_dir)
    _train_tiny(registry)
    try:
        _check(_ray("start", "test"))
        # one replica per model, so the batching counters of GET /v1/models are the whole story
        _check(
            _ray(
                "deploy",
                "test",
                f"file://{registry_dir}",
                "min_replicas=1",
                "max_replicas=1",
                "batch_wait_timeout_s=0.02",
                "health_check_period_s=2",
            )
        )
        url = _ray("url", "test").stdout.strip()
        yield Served(url, registry, registry_dir)
    finally:
        stopped = _ray("stop", "test")
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["type"] == f"https://firstmile.dev/problems/{slug}"
    assert body["status"] == status
    return body


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_predict_each_model_over_http(client: httpx.Client, name: str) -> None:
    instances = [PROBES[name], {**PROBES[name], "engagement_score": 90.0}, {}]
    response = client.post(f"/v1/models/{name}/predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["stage"]) == (name, "1.0.0", "production")
    assert len(body["predictions"]) == 3
    first = body["predictions"][0]
    if name == "path_classifier":
        assert first["path"] in first["scores"] and 0.0 <= first["confidence"] <= 1.0
    elif name == "stuck_detector":
        assert isinstance(first["stuck"], bool) and 0.0 <= first["stuck_probability"] <= 1.0
    else:
        assert 0.0 <= first["response_probability"] <= 1.0


def test_path_classifier_candidates(client: httpx.Client) -> None:
    candidates = ["analyst-reports", "generic"]
    response = client.post(
        "/v1/models/path_classifier/predict",
        json={"instances": [{**PROBES["path_classifier"], "candidates": candidates}]},
    )
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert set(prediction["scores"]) == set(candidates) and prediction["path"] in candidates


def test_version_and_stage_selection(client: httpx.Client) -> None:
    instance = PROBES["path_classifier"]
    url = "/v1/models/path_classifier/predict"
    canary = client.post(url, json={"instances": [instance], "stage": "canary"}).json()
    assert (canary["version"], canary["stage"]) == ("1.1.0", "canary")
    by_version = client.post(url, json={"instances": [instance], "version": "1.1.0"}).json()
    assert (by_version["version"], by_version["stage"]) == ("1.1.0", "canary")
    production = client.post(url, json={"instances": [instance], "version": "1.0.0", "stage": "production"}).json()
    assert (production["version"], production["stage"]) == ("1.0.0", "production")
    # same weights under two versions: same scores
    assert canary["predictions"] == production["predictions"]

    listing = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listing] == list(MODEL_NAMES)
    pc = client.get("/v1/models/path_classifier").json()
    assert pc["stages"] == {"production": "1.0.0", "canary": "1.1.0", "shadow": None, "canary_weight": 0.25}
    assert [v["version"] for v in pc["versions"]] == ["1.0.0", "1.1.0"]
    assert pc["device"] == "cpu"


def test_problems(client: httpx.Client) -> None:
    url = "/v1/models/path_classifier/predict"
    _problem(client.post("/v1/models/nope/predict", json={"instances": [{}]}), 404, "model-not-found")
    _problem(client.get("/v1/models/nope"), 404, "model-not-found")
    _problem(client.post(url, json={"instances": [{}], "stage": "shadow"}), 404, "stage-empty")
    _problem(client.post(url, json={"instances": [{}], "version": "7.0.0"}), 404, "version-not-loaded")
    _problem(client.post(url, content=b"{nope", headers={"content-type": "application/json"}), 400, "malformed-json")
    _problem(client.post(url, json={"instances": {}}), 400, "validation-error")
    _problem(client.post(url, json={"instances": [{}], "stage": "qa"}), 400, "validation-error")
    bad = _problem(
        client.post(url, json={"instances": [PROBES["path_classifier"], {"engagement_score": "lots"}]}),
        400,
        "validation-error",
    )
    assert bad["detail"].startswith("instances[1]: ") and "engagement_score" in bad["detail"]
    assert [e["index"] for e in bad["errors"]] == [1]
    not_allowed = client.get(url)
    _problem(not_allowed, 405, "method-not-allowed")
    assert not_allowed.headers["allow"] == "POST"
    _problem(client.get("/v2/anything"), 404, "not-found")
    _problem(client.get("/v1/models/path_classifier/explain"), 404, "not-found")
    not_allowed = client.post("/v1/models/path_classifier", json={})
    _problem(not_allowed, 405, "method-not-allowed")
    assert not_allowed.headers["allow"] == "GET"


def test_health(client: httpx.Client) -> None:
    response = client.get("/-/healthz")
    assert response.status_code == 200
    status = _ray("status", "test")
    _check(status)
    for app in ("index", *MODEL_NAMES):
        assert f"serve application {app}: RUNNING" in status.stdout, status.stdout
    for name in (*MODEL_NAMES, "index"):
        assert f"{name}: HEALTHY" in status.stdout, status.stdout
    # each model is its own application's HTTP ingress: no router in between
    routes = client.get("/-/routes").json()
    assert routes == {"/": "index", **{f"/v1/models/{name}": name for name in MODEL_NAMES}}


async def test_concurrent_requests_share_batches(served: Served) -> None:
    """Single-instance requests in flight together are answered from shared batches."""
    name = "nudge_response_predictor"
    async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        before = (await c.get(f"/v1/models/{name}")).json()["batching"]
        responses = await asyncio.gather(
            *(c.post(f"/v1/models/{name}/predict", json={"instances": [PROBES[name]]}) for _ in range(96))
        )
        assert {r.status_code for r in responses} == {200}
        after = (await c.get(f"/v1/models/{name}")).json()["batching"]
    instances = after["instances"] - before["instances"]
    batches = after["batches"] - before["batches"]
    assert instances == 96
    assert batches < instances, f"{batches} batches for {instances} instances: nothing was batched"
    assert after["max_batch_size_seen"] > 1
    assert after["max_batch_size_seen"] <= after["max_batch_size"]


def test_one_request_with_many_instances_is_batched(client: httpx.Client) -> None:
    name = "stuck_detector"
    before = client.get(f"/v1/models/{name}").json()["batching"]
    response = client.post(f"/v1/models/{name}/predict", json={"instances": [PROBES[name]] * 40})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 40
    after = client.get(f"/v1/models/{name}").json()["batching"]
    assert after["instances"] - before["instances"] == 40
    assert after["batches"] - before["batches"] < 40  # at most 32 a batch: two batches, barring timing


def test_promotion_reaches_serving_after_a_redeploy(served: Served, client: httpx.Client) -> None:
    name = "stuck_detector"
    current = served.registry.resolve(name, "production")
    assert current is not None
    mv = served.registry.register(
        name,
        weights=current.weights_path.read_bytes(),
        config=current.config,
        metrics=current.metrics,
        reference=current.reference(),
    )
    served.registry.promote(name, mv.version, "production", force=True)
    before = client.get(f"/v1/models/{name}").json()
    assert before["stages"]["production"] == "1.0.0"  # not before a reconfigure
    _check(
        _ray(
            "deploy",
            "test",
            f"file://{served.registry_dir}",
            "min_replicas=1",
            "max_replicas=1",
            "batch_wait_timeout_s=0.02",
            "health_check_period_s=2",
        )
    )
    described = client.get(f"/v1/models/{name}").json()
    assert described["stages"]["production"] == mv.version
    assert [v["version"] for v in described["versions"]] == [mv.version]  # 1.0.0 was let go
    response = client.post(f"/v1/models/{name}/predict", json={"instances": [PROBES[name]]})
    assert response.json()["version"] == mv.version
    assert described["replica"] == before["replica"]  # reconfigured in place, not replaced


def test_deploy_writes_the_config_it_deployed(served: Served) -> None:
    config = yaml.safe_load((ROOT / ".firstmile" / "services" / "ray-test" / "serve_config.yaml").read_text())
    assert (config["http_options"]["host"], config["http_options"]["port"]) == ("127.0.0.1", int(served.url[-5:]))
    apps = {a["name"]: a for a in config["applications"]}
    assert list(apps) == ["index", *MODEL_NAMES]
    assert (apps["index"]["import_path"], apps["index"]["route_prefix"]) == (
        "firstmile_inference.serve:build_index_app",
        "/",
    )
    tokens = {}
    for name in MODEL_NAMES:
        app = apps[name]
        assert app["import_path"] == "firstmile_inference.serve:build_model_app"
        assert (app["route_prefix"], app["args"]["model"]) == (f"/v1/models/{name}", name)
        (deployment,) = app["deployments"]
        tokens[name] = deployment["user_config"]["reload_token"]
    for app in apps.values():
        args = app["args"]
        assert (args["registry_uri"], args["max_replicas"], args["num_gpus"]) == (f"file://{served.registry_dir}", 1, 0)
        assert args["models"] == list(MODEL_NAMES)
    assert len(set(tokens.values())) == 1 and float(tokens["path_classifier"]) > 0


def test_bench_summaries() -> None:
    from benchmarks import inference as bench

    point = bench.summarise("serve", 4, [0.010, 0.012, 0.011, 0.020], wall_s=0.053)
    assert (point.calls, point.p50_ms, point.instances_per_s) == (4, 11.5, round(16 / 0.053, 1))
    base = bench.summarise("in-process", 4, [0.001, 0.001, 0.001, 0.001], wall_s=0.004)
    (row,) = bench.overhead([base], [point])
    assert (row["overhead_p50_ms"], row["ratio_p50"]) == (10.5, 11.5)
    hist = {f"le_{b}": 0 for b in (1, 2, 4, 8)}
    before = {"batches": 1, "instances": 1, "max_batch_size_seen": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    after = {**before, "batches": 4, "instances": 9}
    delta = bench._delta(
        {**before, "histogram": {**hist, "le_1": 1, "le_2": 1, "le_4": 1, "le_8": 1}},
        {**after, "histogram": {**hist, "le_1": 1, "le_2": 2, "le_4": 4, "le_8": 4}},
    )
    assert (delta["batches"], delta["mean_batch_size"], delta["largest_batch_at_most"]) == (3, 2.67, 4)


# ---------------------------------------------------------------- the platform's planner through Ray Serve
# Keep these last in the module: the final test kills this module's Ray.


async def _ray_app(served: Served, database: Database, analytics_store: ChdbStore) -> Litestar:
    settings = make_settings(model_registry_uri=str(served.registry_dir), inference_url=served.url)
    return create_app(settings, database.app_url, PEPPER, analytics=analytics_store)


async def _start_user(client: AsyncTestClient[Litestar], tenant: TenantFixture, user_id: str) -> dict[str, Any]:
    response = await client.post(
        "/v1/onboarding/start",
        json={"user_id": user_id, "traits": {"persona": "developer", "company_size": "11-50"}},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_start_request_is_decided_by_the_model_through_ray_serve(
    served: Served, database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = await _ray_app(served, database, analytics_store)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        ray = RecordingClient.install(app)
        body = await _start_user(client, tenant, "through-ray")
    decision = body["decision"]
    assert decision["selected_by"] == "model"
    assert decision["fallback"] is None
    async with admin_engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT decision FROM user_progress WHERE tenant_id = :t AND user_id = 'through-ray'"),
                {"t": tenant.id},
            )
        ).one()[0]
    assert stored["inference"] == "ray-serve"
    assert isinstance(stored["latency_ms"], int | float)  # recorded; how fast is for benchmarks/
    assert [(c.model, c.stage, c.outcome) for c in ray.calls] == [("path_classifier", stored["stage"], "answered")]
    # earlier tests may have staged a canary: the user's deterministic slice decides which one answered
    stages = served.registry.stages("path_classifier")
    expected = stages.canary if stored["stage"] == "canary" else stages.production
    assert stored["stage"] in {"production", "canary"}
    assert decision["model_version"] == expected


async def test_with_ray_killed_starts_still_succeed_through_the_fallback(
    served: Served, database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = await _ray_app(served, database, analytics_store)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
        ray = RecordingClient.install(app)
        assert (await _start_user(client, tenant, "before-kill"))["decision"]["selected_by"] == "model"
        stopped = _ray("stop", "test")  # SIGTERM, then SIGKILL: the whole Ray node goes away
        assert stopped.returncode == 0, stopped.stderr
        reasons = []
        for i in range(7):
            body = await _start_user(client, tenant, f"after-kill-{i}")
            decision = body["decision"]
            assert (decision["selected_by"], body["path"]["id"]) == ("rules", "developer-quickstart")
            assert decision["fallback"] == "rules"
            assert decision["model"] == "path_classifier"
            reasons.append(decision["fallback_reason"])
    assert set(reasons[:5]) <= {"unavailable", "timeout"}
    assert reasons[5:] == ["circuit_open", "circuit_open"]
    # No start waited on Ray: each of the first five calls ended as soon as the connection failed, or was
    # cancelled by the guard's timeout, and with the breaker open the last two never reached Ray at all.
    cut_short = ["cancelled" if reason == "timeout" else reason for reason in reasons[:5]]
    assert ray.outcomes == ["answered", *cut_short]
