"""Firstmile's models behind Ray Serve: one Serve application per model, each its own HTTP ingress.

Serve's HTTP proxy routes a request straight to the replica of the model it
names (longest route prefix wins), so a prediction is one hop: proxy -> model
replica. The applications:

- ``path_classifier``, ``stuck_detector``, ``nudge_response_predictor``
  (``build_model_app``, route prefix ``/v1/models/<name>``): one
  :class:`ModelServer` deployment each, which answers HTTP itself. A replica
  loads, from the model registry, the versions staged as production, canary and
  shadow (whichever exist) with ``load_predictor`` (on ``cuda`` when the
  deployment asks for GPUs and one is visible, else ``cpu``) and answers
  predictions with dynamic batching: every request in flight joins one queue
  (``@serve.batch``, sized in instances), and a batch is run grouped by model
  version.
- ``index`` (``build_index_app``, route prefix ``/``): a tiny :class:`ModelIndex`
  that answers what no model application matches: ``GET /v1/models`` (it asks
  each model application through a DeploymentHandle; not on the prediction
  path), and problem documents for unknown models and paths.

HTTP API (JSON; errors are ``application/problem+json``, RFC 9457)::

    GET  /v1/models                      the loaded models, versions, stages and batching counters (index)
    GET  /v1/models/{name}               one of them (the model's own application)
    POST /v1/models/{name}/predict       {"instances": [...], "version"?: "1.2.0", "stage"?: "production"}
                                      -> {"model", "version", "stage", "predictions": [...]}
    GET  /-/healthz                      Ray Serve's own (the HTTP proxy is up)

Without ``version`` or ``stage`` a request is answered by the production version.
Canary and shadow traffic is the caller's decision (the platform's planner picks
the canary slice per user and mirrors to the shadow itself): it asks for
``"stage": "canary"`` or ``"stage": "shadow"`` explicitly.

Run: ``serve deploy inference/serve_config.yaml`` (every application), locally
``deploy/local/ray.sh``; from Python, ``serve.run`` each of ``applications(args)``.
After a promotion in the registry, deploy again with a new ``reload_token`` in
each model deployment's ``user_config`` (``deploy/local/ray.sh deploy`` writes
one): Serve calls ``reconfigure`` on every running replica, which loads the newly
staged versions in place, without a restart. Or set ``registry_poll_s`` and let
each replica re-read the stages on its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Protocol, cast

import msgspec
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from firstmile_inference.predictor import Predictor
from firstmile_inference.schema import MODEL_NAMES

log = logging.getLogger("ray.serve.firstmile")

STAGES: Final = ("production", "canary", "shadow")
PROBLEM_BASE: Final = "https://firstmile.dev/problems/"
PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
ENV_PREFIX: Final = "FIRSTMILE_SERVE_"
JSON_MEDIA_TYPE: Final = "application/json"
INDEX_APP: Final = "index"  # the application answering GET /v1/models and unknown paths, at route prefix /

# A valid instance per model: the health check predicts it with the production version.
PROBES: Final[dict[str, dict[str, Any]]] = {
    "path_classifier": {
        "user_persona": "developer",
        "signup_source": "organic",
        "company_size": "11-50",
        "use_case": "product_analytics",
        "engagement_score": 40.0,
        "time_since_signup": 2.0,
        "steps_completed": 1.0,
        "session_count": 2.0,
        "avg_session_duration": 300.0,
    },
    "stuck_detector": {
        "user_persona": "analyst",
        "signup_source": "paid_search",
        "company_size": "51-200",
        "use_case": "reporting",
        "engagement_score": 20.0,
        "time_since_signup": 30.0,
        "steps_completed": 1.0,
        "session_count": 1.0,
        "avg_session_duration": 120.0,
        "path": "analyst-reports",
        "step_index": 1.0,
        "steps_total": 4.0,
        "hours_since_last_activity": 20.0,
        "hours_on_current_step": 22.0,
        "events_last_24h": 0.0,
    },
    "nudge_response_predictor": {
        "user_persona": "marketer",
        "signup_source": "referral",
        "company_size": "1-10",
        "use_case": "marketing",
        "engagement_score": 55.0,
        "time_since_signup": 48.0,
        "steps_completed": 2.0,
        "session_count": 3.0,
        "avg_session_duration": 240.0,
        "channel": "email",
        "hour_of_day": 10.0,
        "nudges_sent": 0.0,
        "hours_since_last_activity": 26.0,
    },
}


# ---- configuration ----


@dataclass(frozen=True)
class ServeSettings:
    """The applications' arguments (``build_model_app(args)``, ``build_index_app(args)``).

    Each also reads ``FIRSTMILE_SERVE_<NAME>``.

    Precedence: an argument, else the environment variable of the process that
    builds the application (for ``serve deploy`` the Serve controller, which
    inherits the environment of ``ray start`` on the head node), else the default.
    """

    registry_uri: str = ""  # file:///abs/dir or /abs/dir (required)
    model: str = ""  # the model a model application serves (build_model_app; required there)
    models: tuple[str, ...] = MODEL_NAMES  # the model applications deployed (the index lists these)
    num_gpus: float = 0.0  # GPUs per model replica (fractions share one GPU: 0.3 fits three models on one)
    num_cpus: float = 0.5  # logical CPUs per model replica
    index_num_cpus: float = 0.05  # logical CPUs of the index replica (GET /v1/models, unknown paths)
    torch_threads: int = 0  # torch intra-op threads per CPU model replica (0: floor(num_cpus), at least 1)
    max_batch_size: int = 32  # instances per model call, across requests
    batch_wait_timeout_s: float = 0.0  # how long a partial batch waits for more (0: takes what is queued)
    max_ongoing_requests: int = 0  # requests in flight per model replica (0: 2 x max_batch_size, at least 64)
    min_replicas: int = 1  # autoscaling floor per model
    max_replicas: int = 2  # autoscaling ceiling per model
    target_ongoing_requests: float = 8.0  # autoscaling target: requests in flight per replica
    health_check_period_s: float = 10.0  # how often Serve calls check_health on each replica
    health_check_timeout_s: float = 30.0  # a check slower than this counts as failed
    max_instances: int = 1024  # instances per HTTP request (more: 400)
    registry_poll_s: float = 0.0  # re-read the registry's stages this often (0: only on reconfigure)

    @classmethod
    def from_args(
        cls,
        args: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        require_registry: bool = True,
    ) -> ServeSettings:
        args = dict(args or {})
        env = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown application arguments {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name in known:
            raw: Any
            if name in args and args[name] is not None:
                raw = args[name]
            elif (ENV_PREFIX + name.upper()) in env:
                raw = env[ENV_PREFIX + name.upper()]
            else:
                continue
            values[name] = _coerce(name, raw, getattr(cls, name))
        settings = cls(**values)
        settings.validate(require_registry=require_registry)
        return settings

    def validate(self, *, require_registry: bool = True) -> None:
        problems: list[str] = []
        if require_registry and not self.registry_uri:
            problems.append("registry_uri is required (file:///abs/dir or /abs/dir)")
        bad_models = [m for m in self.models if m not in MODEL_NAMES]
        if bad_models or not self.models:
            problems.append(f"models must be a non-empty subset of {list(MODEL_NAMES)}, got {list(self.models)}")
        if self.model and self.model not in MODEL_NAMES:
            problems.append(f"model must be one of {list(MODEL_NAMES)}, got {self.model!r}")
        if self.num_gpus < 0 or self.num_cpus < 0 or self.index_num_cpus < 0 or self.torch_threads < 0:
            problems.append("num_gpus, num_cpus, index_num_cpus and torch_threads must be >= 0")
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            problems.append("num_gpus above 1 must be a whole number")
        if self.max_batch_size < 1 or self.max_instances < 1:
            problems.append("max_batch_size and max_instances must be >= 1")
        if self.batch_wait_timeout_s < 0 or self.registry_poll_s < 0:
            problems.append("batch_wait_timeout_s and registry_poll_s must be >= 0")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            problems.append("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 0:
            problems.append("target_ongoing_requests must be > 0 and max_ongoing_requests >= 0")
        if self.health_check_period_s <= 0 or self.health_check_timeout_s <= 0:
            problems.append("health_check_period_s and health_check_timeout_s must be > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def effective_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or max(64, 2 * self.max_batch_size)

    @property
    def effective_torch_threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def runtime_config(self) -> dict[str, Any]:
        """What a model replica reads at run time; a deployment's ``user_config`` overrides any of it in place."""
        return {
            "registry_uri": self.registry_uri,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "registry_poll_s": self.registry_poll_s,
            "max_instances": self.max_instances,
            "torch_threads": self.effective_torch_threads,
        }


# Keys a model deployment's ``user_config`` may set (``deployments[].user_config`` in the Serve config).
# Serve applies a changed user_config to running replicas (``reconfigure``) without restarting them,
# while a change of the application's ``args`` rebuilds the application and replaces every replica.
USER_CONFIG_KEYS: Final = ("reload_token", "registry_uri", "max_batch_size", "batch_wait_timeout_s", "registry_poll_s")


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Arguments from ``serve run ... key=value`` and environment variables arrive as strings."""
    try:
        if isinstance(default, tuple):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if isinstance(default, bool):
            raise TypeError("no boolean settings")
        if isinstance(default, int):
            number = float(raw)
            if not number.is_integer():
                raise ValueError(f"{raw!r} is not a whole number")
            return int(number)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(f"{raw!r} is not finite")
            return value
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"application argument {name}: {exc}") from exc


# ---- ingress ----

INGRESS_MODES: Final = ("haproxy", "proxy")


def ingress_environment(mode: str, http_port: int, state_dir: str) -> dict[str, str]:
    """The environment of ``ray start`` (every Ray process inherits it) for an ingress mode.

    ``haproxy`` (Serve's direct ingress behind HAProxy, Ray 2.60 feature flags): each
    application's ingress replica runs its own HTTP server on a port of
    ``http_port + 10 .. http_port + 39`` (gRPC ``+ 40 .. + 69``) and HAProxy, started by
    Serve on every node, listens on ``http_port`` and routes by route prefix straight to
    those ports. A request is then loopback HTTP to HAProxy and to the replica: no Python
    proxy, and no actor call back from the replica to the proxy for the request body.
    HAProxy's stats and metrics ports (``http_port + 1``, ``+ 2``) and its files (config,
    admin socket, server state under ``state_dir``) are set per instance, so several Ray
    instances on one machine do not share them (Ray's defaults are fixed: 8404, 9101,
    /tmp/haproxy-serve). Serve puts HAProxy's unix sockets in ``<state_dir>/<56-character
    node id>/`` and HAProxy allows 97 bytes for a socket path: keep ``state_dir`` under about
    25 characters. ``proxy`` is Serve's Python HTTP proxy (Ray's default): nothing set.
    """
    if mode == "proxy":
        return {}
    if mode != "haproxy":
        raise ValueError(f"ingress must be one of {list(INGRESS_MODES)}, got {mode!r}")
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port + 10),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 39),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(http_port + 40),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(http_port + 69),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(http_port + 1),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(http_port + 2),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state_dir}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state_dir}/metrics.sock",
    }


# ---- problems (RFC 9457) ----


class ProblemError(Exception):
    """An answer with a problem document instead of predictions."""

    TITLES: Final = {
        "malformed-json": "Request body is not valid JSON",
        "validation-error": "Request body or parameters are invalid",
        "model-not-found": "No such model is served",
        "version-not-loaded": "That model version is not loaded",
        "stage-empty": "No model version is staged there",
        "not-found": "Resource not found",
        "method-not-allowed": "Method not allowed",
        "service-unavailable": "The model deployment is unavailable",
        "internal-error": "Internal server error",
    }

    def __init__(self, status: int, slug: str, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.extensions = extensions

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.slug,
            "title": self.TITLES.get(self.slug, self.slug),
            "status": self.status,
            "detail": self.detail,
            **self.extensions,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ProblemError:
        extensions = {k: v for k, v in body.items() if k not in ("type", "title", "status", "detail")}
        return cls(int(body["status"]), str(body["type"]).removeprefix(PROBLEM_BASE), str(body["detail"]), **extensions)


def problem_response(problem: ProblemError) -> Response:
    """The problem document; a 405 carries ``Allow`` (from the problem's ``allow`` extension, not in the body)."""
    body = problem.body()
    allow = body.pop("allow", None)
    return Response(
        msgspec.json.encode(body),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers={"Allow": str(allow)} if allow else None,
    )


def json_response(body: Any) -> Response:
    # msgspec: several times faster than the stdlib json that starlette's JSONResponse uses
    return Response(msgspec.json.encode(body), media_type=JSON_MEDIA_TYPE)


def allow_only(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise ProblemError(405, "method-not-allowed", f"{path} allows {allowed} only", allow=allowed)


def route_path(scope: Mapping[str, Any]) -> str:
    """The request path below the application's route prefix (Serve puts the prefix in ``root_path``)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


# ---- requests ----


@dataclass(frozen=True)
class PredictRequest:
    instances: list[dict[str, Any]]
    version: str | None = None
    stage: str | None = None


def parse_predict_body(raw: bytes, max_instances: int) -> PredictRequest:
    """The body of ``POST /v1/models/{name}/predict``, or a 400 problem saying what is wrong."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed-json", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ProblemError(400, "validation-error", "the body must be a JSON object with an 'instances' list")
    unknown = sorted(set(body) - {"instances", "version", "stage"})
    if unknown:
        raise ProblemError(400, "validation-error", f"unknown fields {unknown}; allowed: instances, version, stage")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ProblemError(400, "validation-error", "'instances' must be a non-empty list of objects")
    if len(instances) > max_instances:
        raise ProblemError(400, "validation-error", f"{len(instances)} instances; at most {max_instances} per request")
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise ProblemError(
                400, "validation-error", f"instances[{i}] must be an object, got {type(instance).__name__}"
            )
    version = body.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise ProblemError(400, "validation-error", "'version' must be a non-empty string such as \"1.2.0\"")
    stage = body.get("stage")
    if stage is not None and stage not in STAGES:
        raise ProblemError(400, "validation-error", f"'stage' must be one of {list(STAGES)}, got {stage!r}")
    return PredictRequest(instances, version, stage)


# ---- the versions a replica holds ----


class RegistryLike(Protocol):
    """What serving reads from :class:`firstmile_inference.registry.Registry`."""

    def resolve(self, name: str, stage: str) -> Any: ...

    def stages(self, name: str) -> Any: ...


@dataclass(frozen=True)
class ModelSet:
    """One model's loaded versions and which stage each holds (a replica swaps the whole set on reload)."""

    name: str
    predictors: dict[str, Predictor] = field(default_factory=dict)  # version -> predictor
    stages: dict[str, str] = field(default_factory=dict)  # stage -> version
    canary_weight: float = 0.0
    loaded_at: float = 0.0

    def select(self, version: str | None, stage: str | None) -> tuple[Predictor, str]:
        """The predictor a request asks for and the stage it answers as; a 404 problem otherwise."""
        if version is not None:
            predictor = self.predictors.get(version)
            if predictor is None:
                raise ProblemError(
                    404,
                    "version-not-loaded",
                    f"{self.name} {version} is not loaded; loaded: {self.describe_stages()}",
                )
            held = [s for s in STAGES if self.stages.get(s) == version]
            if stage is not None and stage not in held:
                raise ProblemError(404, "stage-empty", f"{self.name} {version} is not the {stage} version")
            return predictor, stage or held[0]
        wanted = stage or "production"
        staged = self.stages.get(wanted)
        if staged is None or staged not in self.predictors:
            raise ProblemError(404, "stage-empty", f"no {wanted} version of {self.name} is loaded")
        return self.predictors[staged], wanted

    def describe_stages(self) -> str:
        return ", ".join(f"{s}={v}" for s, v in self.stages.items()) or "none"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stages": {**{s: self.stages.get(s) for s in STAGES}, "canary_weight": self.canary_weight},
            "versions": [
                {
                    "version": v,
                    "stages": [s for s in STAGES if self.stages.get(s) == v],
                    "device": str(p.device),
                }
                for v, p in sorted(self.predictors.items())
            ],
            "loaded_at": self.loaded_at,
        }


def load_model_set(
    registry: RegistryLike,
    name: str,
    load: Callable[[Any], Predictor],
    previous: ModelSet | None = None,
) -> ModelSet:
    """Load the versions staged for ``name``; versions already loaded in ``previous`` are reused."""
    stages: dict[str, str] = {}
    predictors: dict[str, Predictor] = {}
    for stage in STAGES:
        mv = registry.resolve(name, stage)
        if mv is None:
            continue
        version = str(mv.version)
        stages[stage] = version
        if version in predictors:
            continue
        reuse = previous.predictors.get(version) if previous is not None else None
        predictors[version] = reuse if reuse is not None else load(mv)
    weight = 0.0
    if "canary" in stages:
        weight = float(getattr(registry.stages(name), "canary_weight", 0.0) or 0.0)
    return ModelSet(name, predictors, stages, weight, time.time())


# ---- batching ----


@dataclass(frozen=True)
class Item:
    """One instance waiting in the batch queue, with the predictor its request selected."""

    predictor: Predictor
    instance: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    prediction: dict[str, Any] | None = None
    error: str | None = None  # the predictor's ValueError: this instance is bad
    failure: str | None = None  # anything else: the model failed


def predict_grouped(items: Sequence[Item]) -> list[Outcome]:
    """Run a batch: one ``predict`` per model version, in arrival order within each.

    A ``ValueError`` (a bad instance) makes that version's group run one instance
    at a time, so one bad instance fails only its own request.
    """
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(item.predictor), []).append(index)
    out: list[Outcome] = [Outcome(failure="not run")] * len(items)
    for indices in groups.values():
        predictor = items[indices[0]].predictor
        try:
            predictions = predictor.predict([items[i].instance for i in indices])
            if len(predictions) != len(indices):
                raise RuntimeError(f"{len(predictions)} predictions for {len(indices)} instances")
            for i, prediction in zip(indices, predictions, strict=True):
                out[i] = Outcome(prediction=prediction)
        except ValueError:
            for i in indices:
                out[i] = _predict_one(predictor, items[i].instance)
        except Exception as exc:
            log.exception("%s %s failed on a batch of %d", predictor.name, predictor.version, len(indices))
            for i in indices:
                out[i] = Outcome(failure=f"{type(exc).__name__}: {exc}")
    return out


def _predict_one(predictor: Predictor, instance: Mapping[str, Any]) -> Outcome:
    try:
        return Outcome(prediction=predictor.predict([instance])[0])
    except ValueError as exc:
        message = str(exc)
        for prefix in ("instance 0: ", "instances[0]: ", "instance 0 ", "instances[0] "):
            message = message.removeprefix(prefix)
        return Outcome(error=message)
    except Exception as exc:
        return Outcome(failure=f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Chunk:
    """A request's instances (at most ``max_batch_size`` of them) waiting in the batch queue as one item."""

    predictor: Predictor
    instances: Sequence[Mapping[str, Any]]


def chunk_instances(chunks: Sequence[Chunk]) -> int:
    """``@serve.batch``'s ``batch_size_fn``: a batch's size is its instances, not its requests."""
    return sum(len(chunk.instances) for chunk in chunks)


def predict_chunks(chunks: Sequence[Chunk]) -> list[list[Outcome]]:
    """Run a batch of chunks as one batch of instances (:func:`predict_grouped`); outcomes per chunk."""
    outcomes = predict_grouped([Item(chunk.predictor, instance) for chunk in chunks for instance in chunk.instances])
    out: list[list[Outcome]] = []
    start = 0
    for chunk in chunks:
        out.append(outcomes[start : start + len(chunk.instances)])
        start += len(chunk.instances)
    return out


BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class BatchStats:
    """Batch sizes this replica ran (``GET /v1/models`` shows them; Ray exports ``serve_batch_size`` too)."""

    batches: int = 0
    instances: int = 0
    max_batch_size_seen: int = 0
    histogram: dict[str, int] = field(default_factory=lambda: {f"le_{b}": 0 for b in BATCH_BUCKETS})

    def record(self, size: int) -> None:
        self.batches += 1
        self.instances += size
        self.max_batch_size_seen = max(self.max_batch_size_seen, size)
        for bound in BATCH_BUCKETS:
            if size <= bound:
                self.histogram[f"le_{bound}"] += 1
        # sizes above the last bucket are counted in batches and instances only

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["mean_batch_size"] = round(self.instances / self.batches, 3) if self.batches else 0.0
        return body


class _BatchControls(Protocol):
    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


# ---- the deployments ----


def choose_device(num_gpus: float) -> str:
    if num_gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_registry(uri: str) -> RegistryLike:
    from firstmile_inference.registry import Registry

    return cast(RegistryLike, Registry(uri))


class ModelServer:
    """One model: its staged versions, loaded, behind a dynamic batch queue; the HTTP ingress of its application."""

    def __init__(self, name: str, num_gpus: float = 0.0, base_config: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.device = choose_device(num_gpus)
        self.models = ModelSet(name)
        self.base_config = dict(base_config or {})
        self.config: dict[str, Any] = dict(self.base_config)
        self.max_instances = int(self.base_config.get("max_instances", 1024))
        self.stats = BatchStats()
        self.errors = 0
        self.failures = 0
        self._poller: asyncio.Task[None] | None = None
        threads = int(self.base_config.get("torch_threads", 0))
        if threads > 0 and self.device == "cpu":
            import torch

            # Ray sets OMP_NUM_THREADS from num_cpus; say it to torch too: on a small or shared CPU node
            # more threads than cores make every small batch slower.
            torch.set_num_threads(threads)
        try:
            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside a replica (unit tests)
            self.replica = "local"

    # -- lifecycle --

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this when a replica starts and whenever ``user_config`` changes (a redeploy).

        ``user_config`` overrides the application's arguments (``USER_CONFIG_KEYS``); any
        change, ``reload_token`` alone included, re-reads the registry's stages.
        """
        unknown = sorted(set(user_config or {}) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown user_config keys {unknown}; allowed: {list(USER_CONFIG_KEYS)}")
        self.config = {**self.base_config, **(user_config or {})}
        batched = cast(_BatchControls, self._batched)
        batched.set_max_batch_size(int(self.config.get("max_batch_size", 32)))
        batched.set_batch_wait_timeout_s(float(self.config.get("batch_wait_timeout_s", 0.0)))
        self.reload()
        poll = float(self.config.get("registry_poll_s", 0.0))
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if poll > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(poll))

    def reload(self) -> bool:
        """Re-read the registry's stages and load what changed; ``True`` when anything did."""
        from firstmile_inference.models import load_predictor

        registry = open_registry(str(self.config["registry_uri"]))
        previous = self.models
        self.models = load_model_set(registry, self.name, lambda mv: load_predictor(mv, device=self.device), previous)
        changed = self.models.stages != previous.stages or self.models.canary_weight != previous.canary_weight
        if changed:
            log.info("%s stages: %s (device %s)", self.name, self.models.describe_stages(), self.device)
        return changed

    async def _poll(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                log.exception("re-reading the registry for %s failed; keeping %s", self.name, self.models.stages)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``: no production model, or a failing probe, fails it."""
        predictor, _ = self.models.select(None, "production")  # raises ProblemError: no production version
        predictions = predictor.predict([PROBES[self.name]])
        if len(predictions) != 1:
            raise RuntimeError(f"{self.name} {predictor.version}: probe gave {len(predictions)} predictions")

    # -- HTTP (the application's route prefix is /v1/models/<name>) --

    async def __call__(self, request: Request) -> Response:
        """``GET /v1/models/<name>`` and ``POST /v1/models/<name>/predict``, straight from Serve's HTTP proxy."""
        try:
            rest = route_path(request.scope).strip("/")
            if rest == "predict":
                allow_only(request.method, "POST", request.scope["path"])
                body = parse_predict_body(await request.body(), self.max_instances)
                answer = await self.predict(body.instances, body.version, body.stage)
                if "problem" in answer:
                    raise ProblemError.from_body(answer["problem"])
                return json_response(answer)
            if rest == "":
                allow_only(request.method, "GET", request.scope["path"])
                return json_response(await self.describe())
            raise ProblemError(404, "not-found", f"no route {request.scope['path']}; see GET /v1/models")
        except ProblemError as problem:
            return problem_response(problem)
        except Exception as exc:
            log.exception("request %s %s failed", request.method, request.scope.get("path"))
            return problem_response(ProblemError(500, "internal-error", f"{type(exc).__name__}: {exc}"[:500]))

    # -- requests --

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=chunk_instances)  # reconfigure sets both
    async def _batched(self, chunks: list[Chunk]) -> list[list[Outcome]]:
        self.stats.record(chunk_instances(chunks))
        return predict_chunks(chunks)

    async def predict(
        self, instances: list[dict[str, Any]], version: str | None = None, stage: str | None = None
    ) -> dict[str, Any]:
        """Predictions for a request, or ``{"problem": {...}}``.

        The request joins the batch queue as one item per ``max_batch_size`` instances; a batch
        holds at most ``max_batch_size`` instances, from as many requests as fit.
        """
        try:
            predictor, answered_as = self.models.select(version, stage)
        except ProblemError as problem:
            return {"problem": problem.body()}
        size = max(1, int(self.config.get("max_batch_size", 32)))
        if len(instances) <= size:
            outcomes = await self._batched(Chunk(predictor, instances))
        else:
            parts = await asyncio.gather(
                *(self._batched(Chunk(predictor, instances[i : i + size])) for i in range(0, len(instances), size))
            )
            outcomes = [o for part in parts for o in part]
        failures = [o.failure for o in outcomes if o.failure is not None]
        if failures:
            self.failures += 1
            return {
                "problem": ProblemError(500, "internal-error", f"{self.name} {predictor.version}: {failures[0]}").body()
            }
        errors = [{"index": i, "detail": o.error} for i, o in enumerate(outcomes) if o.error is not None]
        if errors:
            self.errors += 1
            first = errors[0]
            detail = f"instances[{first['index']}]: {first['detail']}"
            if len(errors) > 1:
                detail += f" (and {len(errors) - 1} more)"
            return {"problem": ProblemError(400, "validation-error", detail, errors=errors).body()}
        return {
            "model": self.name,
            "version": predictor.version,
            "stage": answered_as,
            "predictions": [o.prediction for o in outcomes],
        }

    async def describe(self) -> dict[str, Any]:
        return {
            **self.models.describe(),
            "device": self.device,
            "replica": self.replica,
            "batching": {
                "max_batch_size": int(self.config.get("max_batch_size", 0)),
                "batch_wait_timeout_s": float(self.config.get("batch_wait_timeout_s", 0.0)),
                **self.stats.as_dict(),
            },
            "requests_rejected": self.errors,
            "requests_failed": self.failures,
        }


class ModelIndex:
    """The ``index`` application (route prefix ``/``): what no model application's prefix matches.

    ``GET /v1/models`` asks each model application for its description (a DeploymentHandle
    call per model: the index is never on the prediction path); any other path under
    ``/v1/models/<name>`` reaching it names a model that is not served (or not routed yet):
    404 ``model-not-found``, which the platform reads as "not deployed".
    """

    def __init__(self, models: Sequence[str], timeout_s: float = 10.0) -> None:
        self.models = tuple(models)
        self.timeout_s = timeout_s
        self._handles: dict[str, DeploymentHandle[Any]] = {}

    def handle(self, name: str) -> DeploymentHandle[Any]:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = serve.get_deployment_handle(name, app_name=name)
        return handle

    async def __call__(self, request: Request) -> Response:
        path = str(request.scope.get("path", ""))
        try:
            return await self._route(request.method, path)
        except ProblemError as problem:
            return problem_response(problem)
        except Exception as exc:
            log.exception("request %s %s failed", request.method, path)
            detail = f"{type(exc).__name__}: {exc}"[:500]  # a RayTaskError carries the remote traceback
            return problem_response(ProblemError(503, "service-unavailable", detail))

    async def _route(self, method: str, path: str) -> Response:
        parts = [p for p in path.split("/") if p]
        if parts[:2] != ["v1", "models"] or len(parts) > 4:
            raise ProblemError(404, "not-found", f"no route {path}; see GET /v1/models")
        if len(parts) == 2:
            allow_only(method, "GET", path)
            described = await asyncio.wait_for(
                asyncio.gather(*(self.handle(name).describe.remote() for name in self.models)), self.timeout_s
            )
            return json_response({"models": list(described)})
        name = parts[2]
        if name in self.models:
            # the model's own application answers its paths; reaching here, it is not running (yet)
            raise ProblemError(404, "model-not-found", f"{name} is not running here (deploying, or it failed)")
        raise ProblemError(404, "model-not-found", f"no model {name!r}; served: {sorted(self.models)}")


# ---- the applications ----


def model_route_prefix(name: str) -> str:
    return f"/v1/models/{name}"


def build_model_app(args: dict[str, Any]) -> Application:
    """One model's application: ``import_path: firstmile_inference.serve:build_model_app`` with ``model: <name>``.

    Deploy it with ``route_prefix: /v1/models/<name>`` and the application name ``<name>`` (the
    index finds it by that name).
    """
    settings = ServeSettings.from_args(args)
    if not settings.model:
        raise ValueError(f"model is required: the model this application serves, one of {list(MODEL_NAMES)}")
    deployment = serve.deployment()(ModelServer).options(
        name=settings.model,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "initial_replicas": max(1, settings.min_replicas),
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        },
        max_ongoing_requests=settings.effective_max_ongoing_requests,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        user_config={"reload_token": ""},  # set: Serve calls reconfigure when a replica starts
    )
    return deployment.bind(settings.model, settings.num_gpus, settings.runtime_config())


def build_index_app(args: dict[str, Any]) -> Application:
    """The index: ``import_path: firstmile_inference.serve:build_index_app``, ``route_prefix: /``, name ``index``."""
    settings = ServeSettings.from_args(args, require_registry=False)
    index = serve.deployment()(ModelIndex).options(
        name=INDEX_APP,
        num_replicas=1,
        ray_actor_options={"num_cpus": settings.index_num_cpus},
        max_ongoing_requests=64,
    )
    return index.bind(settings.models)


@dataclass(frozen=True)
class AppSpec:
    name: str
    route_prefix: str
    app: Application


def applications(args: dict[str, Any]) -> list[AppSpec]:
    """Every application of the config file, for ``serve.run(spec.app, name=spec.name, route_prefix=...)``."""
    settings = ServeSettings.from_args(args)
    specs = [
        AppSpec(name, model_route_prefix(name), build_model_app({**args, "model": name})) for name in settings.models
    ]
    specs.append(AppSpec(INDEX_APP, "/", build_index_app(args)))
    return specs
