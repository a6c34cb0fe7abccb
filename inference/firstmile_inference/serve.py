"""Firstmile's models behind Ray Serve: one application, one HTTP ingress, one deployment per model.

The application (``build_app``) has four deployments:

- ``path_classifier``, ``stuck_detector``, ``nudge_response_predictor``: one
  :class:`ModelServer` each. A replica loads, from the model registry, the
  versions staged as production, canary and shadow (whichever exist) with
  ``load_predictor`` (on ``cuda`` when the deployment asks for GPUs and one is
  visible, else ``cpu``) and answers predictions with dynamic batching: every
  instance of every request in flight joins one queue (``@serve.batch``), and a
  batch is run grouped by model version.
- ``router``: the HTTP ingress (:class:`Router`), a small JSON API that validates
  requests and forwards them to the model deployments through DeploymentHandles.

HTTP API (JSON; errors are ``application/problem+json``, RFC 9457)::

    GET  /v1/models                      the loaded models, versions, stages and batching counters
    GET  /v1/models/{name}               one of them
    POST /v1/models/{name}/predict       {"instances": [...], "version"?: "1.2.0", "stage"?: "production"}
                                      -> {"model", "version", "stage", "predictions": [...]}
    GET  /-/healthz                      Ray Serve's own (the HTTP proxy is up)

Without ``version`` or ``stage`` a request is answered by the production version.
Canary and shadow traffic is the caller's decision (the platform's planner picks
the canary slice per user and mirrors to the shadow itself): it asks for
``"stage": "canary"`` or ``"stage": "shadow"`` explicitly.

Run: ``serve run firstmile_inference.serve:build_app registry_uri=/abs/dir`` or
``serve deploy inference/serve_config.yaml``; locally ``deploy/local/ray.sh``.
After a promotion in the registry, deploy again with a new ``reload_token`` in
each model deployment's ``user_config`` (``deploy/local/ray.sh deploy`` writes
one): Serve calls ``reconfigure`` on every running replica, which loads the newly
staged versions in place, without a restart. Or set ``registry_poll_s`` and let
each replica re-read the stages on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Protocol, cast

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from firstmile_inference.predictor import Predictor
from firstmile_inference.schema import MODEL_NAMES

log = logging.getLogger("ray.serve.firstmile")

STAGES: Final = ("production", "canary", "shadow")
PROBLEM_BASE: Final = "https://firstmile.dev/problems/"
PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
ENV_PREFIX: Final = "FIRSTMILE_SERVE_"

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
    """The application's arguments (``build_app(args)``); each also reads ``FIRSTMILE_SERVE_<NAME>``.

    Precedence: an argument, else the environment variable of the process that
    builds the application (for ``serve deploy`` the Serve controller, which
    inherits the environment of ``ray start`` on the head node), else the default.
    """

    registry_uri: str = ""  # file:///abs/dir or /abs/dir (required)
    models: tuple[str, ...] = MODEL_NAMES  # which model deployments the application has
    num_gpus: float = 0.0  # GPUs per model replica (fractions share one GPU: 0.3 fits three models on one)
    num_cpus: float = 0.5  # logical CPUs per model replica
    router_num_cpus: float = 0.1  # logical CPUs of the HTTP ingress replica
    router_replicas: int = 1  # ingress replicas (stateless; more for more HTTP throughput)
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
        cls, args: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
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
        settings.validate()
        return settings

    def validate(self) -> None:
        problems: list[str] = []
        if not self.registry_uri:
            problems.append("registry_uri is required (file:///abs/dir or /abs/dir)")
        bad_models = [m for m in self.models if m not in MODEL_NAMES]
        if bad_models or not self.models:
            problems.append(f"models must be a non-empty subset of {list(MODEL_NAMES)}, got {list(self.models)}")
        if self.num_gpus < 0 or self.num_cpus < 0 or self.router_num_cpus < 0:
            problems.append("num_gpus, num_cpus and router_num_cpus must be >= 0")
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            problems.append("num_gpus above 1 must be a whole number")
        if self.max_batch_size < 1 or self.max_instances < 1 or self.router_replicas < 1:
            problems.append("max_batch_size, max_instances and router_replicas must be >= 1")
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

    def runtime_config(self) -> dict[str, Any]:
        """What a model replica reads at run time; a deployment's ``user_config`` overrides any of it in place."""
        return {
            "registry_uri": self.registry_uri,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "registry_poll_s": self.registry_poll_s,
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


def problem_response(problem: ProblemError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(problem.body()), status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


# ---- requests ----


@dataclass(frozen=True)
class PredictRequest:
    instances: list[dict[str, Any]]
    version: str | None = None
    stage: str | None = None


def parse_predict_body(raw: bytes, max_instances: int) -> PredictRequest:
    """The body of ``POST /v1/models/{name}/predict``, or a 400 problem saying what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    """One model: its staged versions, loaded, behind a dynamic batch queue (a Serve deployment per model)."""

    def __init__(self, name: str, num_gpus: float = 0.0, base_config: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.device = choose_device(num_gpus)
        self.models = ModelSet(name)
        self.base_config = dict(base_config or {})
        self.config: dict[str, Any] = dict(self.base_config)
        self.stats = BatchStats()
        self.errors = 0
        self.failures = 0
        self._poller: asyncio.Task[None] | None = None
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

    # -- requests --

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # reconfigure sets both from the config
    async def _batched(self, items: list[Item]) -> list[Outcome]:
        self.stats.record(len(items))
        return predict_grouped(items)

    async def predict(
        self, instances: list[dict[str, Any]], version: str | None = None, stage: str | None = None
    ) -> dict[str, Any]:
        """Predictions for a request, or ``{"problem": {...}}``; each instance joins the batch queue."""
        try:
            predictor, answered_as = self.models.select(version, stage)
        except ProblemError as problem:
            return {"problem": problem.body()}
        outcomes = await asyncio.gather(*(self._batched(Item(predictor, instance)) for instance in instances))
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


class Router:
    """The HTTP ingress: validates JSON, forwards to the model deployments, answers problems."""

    def __init__(self, models: dict[str, DeploymentHandle[Any]], max_instances: int = 1024) -> None:
        self.models = models
        self.max_instances = max_instances

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ProblemError as problem:
            allow = problem.extensions.pop("allow", None)
            return problem_response(problem, {"Allow": str(allow)} if allow else None)
        except Exception as exc:
            log.exception("request %s %s failed", request.method, request.url.path)
            detail = f"{type(exc).__name__}: {exc}"[:500]  # a RayTaskError carries the remote traceback
            return problem_response(ProblemError(503, "service-unavailable", detail))

    async def _route(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        if parts[:2] != ["v1", "models"] or len(parts) > 4:
            raise ProblemError(404, "not-found", f"no route {request.url.path}; see GET /v1/models")
        if len(parts) == 2:
            self._allow(request, "GET")
            described = await asyncio.gather(*(h.describe.remote() for h in self.models.values()))
            return JSONResponse({"models": list(described)})
        name = parts[2]
        handle = self.models.get(name)
        if handle is None:
            raise ProblemError(404, "model-not-found", f"no model {name!r}; served: {sorted(self.models)}")
        if len(parts) == 3:
            self._allow(request, "GET")
            return JSONResponse(await handle.describe.remote())
        if parts[3] != "predict":
            raise ProblemError(404, "not-found", f"no route {request.url.path}")
        self._allow(request, "POST")
        body = parse_predict_body(await request.body(), self.max_instances)
        answer: dict[str, Any] = await handle.predict.remote(body.instances, body.version, body.stage)
        if "problem" in answer:
            raise ProblemError.from_body(answer["problem"])
        return JSONResponse(answer)

    @staticmethod
    def _allow(request: Request, method: str) -> None:
        if request.method != method:
            raise ProblemError(405, "method-not-allowed", f"{request.url.path} allows {method} only", allow=method)


# ---- the application ----


def build_app(args: dict[str, Any]) -> Application:
    """``serve run firstmile_inference.serve:build_app registry_uri=...``, or ``import_path`` in a config file."""
    settings = ServeSettings.from_args(args)
    handles: dict[str, Application] = {}
    for name in settings.models:
        deployment = serve.deployment()(ModelServer).options(
            name=name,
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
        handles[name] = deployment.bind(name, settings.num_gpus, settings.runtime_config())
    router = serve.deployment()(Router).options(
        name="router",
        num_replicas=settings.router_replicas,
        ray_actor_options={"num_cpus": settings.router_num_cpus},
        max_ongoing_requests=max(256, 4 * settings.effective_max_ongoing_requests),
    )
    return router.bind(handles, settings.max_instances)
