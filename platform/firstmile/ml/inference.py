"""The inference port: ask a model for predictions, over Ray Serve or in-process.

Two adapters speak the same wire shapes (:mod:`firstmile_inference.schema`):

- :class:`RayServeClient` posts ``{"instances", "stage"}`` to the Ray Serve
  application's ``/v1/models/{name}/predict`` (production);
- :class:`InProcessClient` loads the registry's staged versions into this
  process and runs the same model code (embedded mode, ``make run``).

:class:`GuardedInference` wraps either one with the seed design's protection: a
hard timeout per call and a circuit breaker per model. Every failure surfaces
as :class:`InferenceError` with a ``reason`` the caller records as the fallback
cause; nothing here decides what the fallback is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import httpx

from firstmile.kit import telemetry
from firstmile.onboarding.catalog import catalog_fingerprint

if TYPE_CHECKING:
    from firstmile_inference.predictor import Predictor
    from firstmile_inference.registry import Registry

log = logging.getLogger(__name__)

Stage = Literal["production", "canary", "shadow"]
STAGES: tuple[Stage, ...] = ("production", "canary", "shadow")
FailureReason = Literal["timeout", "circuit_open", "unavailable", "not_deployed", "bad_response"]


class InferenceError(Exception):
    """A model could not answer; ``reason`` is what the decision record names as the fallback cause."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Prediction:
    """A model's answer for a batch of instances."""

    model: str
    version: str
    stage: str
    predictions: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StageInfo:
    """Which versions of a model are staged (read from the registry)."""

    production: str | None
    canary: str | None
    canary_weight: float
    shadow: str | None
    catalogs: Mapping[str, str] = field(default_factory=dict)
    """Staged version → the fingerprint of the path catalog it was trained on (tenant models record one)."""


class InferenceClient(Protocol):
    """A way to reach the models."""

    kind: str  # "ray-serve" | "in-process"

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction: ...

    async def close(self) -> None: ...


# ---- stages (the registry is the source of truth for canary weights and shadows) ----


class StageReader:
    """The registry's stages per model, cached and refreshed off the event loop.

    Reading the registry imports it (and torch with it) and reads ``stages.json``: blocking
    work that must never run on the event loop of a request. :meth:`load` reads on a worker
    thread (the app awaits it at startup); :meth:`stages`, which the planner calls on the
    loop, only returns what is cached and, when that is older than ``ttl_s``, starts one
    refresh on a worker thread. A registry that cannot be read leaves the last known stages
    in place (or none): the planner then asks for production only.
    """

    def __init__(self, registry_uri: str, ttl_s: float = 10.0) -> None:
        self.registry_uri = registry_uri
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, StageInfo | None]] = {}
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        self._refreshing: set[str] = set()
        self._catalogs: dict[tuple[str, str], str | None] = {}  # (model, version) → its catalog's fingerprint

    def _open(self) -> Registry:
        with self._lock:
            if self._registry is None:
                from firstmile_inference.registry import Registry

                self._registry = Registry(self.registry_uri)
            return self._registry

    def read(self, model: str) -> StageInfo | None:
        """Read the model's stages from the registry now (blocking: call it on a worker thread)."""
        hit = self._cache.get(model)
        try:
            s = self._open().stages(model)
            staged = [v for v in (s.production, s.canary, s.shadow) if v is not None]
            catalogs = {v: c for v in staged if (c := self._catalog_of(model, v)) is not None}
            info: StageInfo | None = StageInfo(s.production, s.canary, float(s.canary_weight), s.shadow, catalogs)
        except Exception as exc:  # an unreadable registry must not fail a request
            log.warning("model registry %s unreadable: %s", self.registry_uri, exc)
            info = hit[1] if hit is not None else None
        self._cache[model] = (time.monotonic(), info)
        return info

    def _catalog_of(self, model: str, version: str) -> str | None:
        """The fingerprint of the catalog ``version`` recorded (``config.catalog``), read once per version."""
        key = (model, version)
        if key not in self._catalogs:
            recorded = self._open().get(model, version).config.get("catalog")
            self._catalogs[key] = catalog_fingerprint(recorded) if isinstance(recorded, Mapping) else None
        return self._catalogs[key]

    async def load(self, models: Sequence[str]) -> dict[str, StageInfo | None]:
        """Read the stages of ``models`` on a worker thread (startup, before the first request)."""
        return await asyncio.to_thread(lambda: {model: self.read(model) for model in models})

    def stages(self, model: str) -> StageInfo | None:
        """The cached stages (non-blocking); a stale entry is refreshed in the background."""
        hit = self._cache.get(model)
        if hit is None or time.monotonic() - hit[0] >= self.ttl_s:
            self._refresh_soon(model)
        return hit[1] if hit is not None else None

    def _refresh_soon(self, model: str) -> None:
        with self._lock:
            if model in self._refreshing:
                return
            self._refreshing.add(model)

        def refresh() -> None:
            try:
                self.read(model)
            finally:
                with self._lock:
                    self._refreshing.discard(model)

        threading.Thread(target=refresh, name=f"stages-{model}", daemon=True).start()


def in_canary(weight: float, *parts: str) -> bool:
    """Deterministic canary assignment: the same user always lands on the same side."""
    if weight <= 0:
        return False
    digest = hashlib.sha256(":".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < weight


# ---- adapters ----


class RayServeClient:
    """The Ray Serve application's HTTP JSON API."""

    kind = "ray-serve"

    def __init__(self, base_url: str, *, max_connections: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(10.0),
        )

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction:
        try:
            response = await self._http.post(
                f"/v1/models/{model}/predict", json={"instances": list(instances), "stage": stage}
            )
        except httpx.HTTPError as exc:
            raise InferenceError("unavailable", f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            raise InferenceError("not_deployed", f"{model} ({stage}) is not served at {self.base_url}")
        if response.status_code != 200:
            raise InferenceError("unavailable", f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
            predictions = body["predictions"]
            if not isinstance(predictions, list) or len(predictions) != len(instances):
                raise ValueError("predictions do not match the instances")
            return Prediction(str(body["model"]), str(body["version"]), str(body.get("stage", stage)), predictions)
        except (ValueError, KeyError, TypeError) as exc:
            raise InferenceError("bad_response", str(exc)) from exc

    async def close(self) -> None:
        await self._http.aclose()


@dataclass
class _Loaded:
    version: str
    predictor: Predictor


class InProcessClient:
    """The registry's staged models, loaded into this process (same model code as Ray Serve).

    Loading (torch import, weights) happens on a worker thread, started by
    :meth:`warm` or on first use; until a model is loaded, calls fail with
    ``not_deployed`` so the planner falls back instead of waiting. Promotions are
    picked up within the stage reader's TTL.

    A batch of up to ``inline_max`` instances is predicted on the event loop itself
    (a fraction of a millisecond for these models): handing it to a worker thread
    cost ~5 ms under load, the interpreter's GIL switch interval, which is more than
    the prediction. Larger batches (the stuck scan's) go to a worker thread.
    """

    kind = "in-process"

    def __init__(self, stages: StageReader, *, device: str = "cpu", inline_max: int = 64) -> None:
        self.stages = stages
        self.device = device
        self.inline_max = inline_max
        self._loaded: dict[tuple[str, str], Predictor] = {}
        self._loading: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._failed: dict[tuple[str, str], str] = {}

    def _version_for(self, model: str, stage: Stage) -> str | None:
        info = self.stages.stages(model)
        if info is None:
            return None
        return {"production": info.production, "canary": info.canary, "shadow": info.shadow}[stage]

    def _load(self, model: str, version: str) -> None:
        key = (model, version)
        try:
            import torch

            from firstmile_inference.models import load_predictor

            # One intra-op thread: these models are tiny, and in a busy API process OpenMP's extra
            # threads only spin against the event loop for the same cores.
            torch.set_num_threads(1)

            predictor = load_predictor(self.stages._open().get(model, version), device=self.device)
            with self._lock:
                self._loaded[key] = predictor
        except Exception as exc:
            log.exception("loading %s %s failed", model, version)
            with self._lock:
                self._failed[key] = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._loading.discard(key)

    def _ensure(self, model: str, version: str) -> Predictor | None:
        key = (model, version)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None or key in self._loading or key in self._failed:
                return hit
            self._loading.add(key)
        threading.Thread(target=self._load, args=(model, version), name=f"load-{model}", daemon=True).start()
        return None

    def warm(self, models: Sequence[str], *, wait_s: float = 0.0) -> bool:
        """Start loading each model's staged versions; with ``wait_s``, wait until production is loaded.

        Blocking (it reads the registry): call it on a worker thread, as :meth:`warm_up` does.
        """
        for model in models:
            self.stages.read(model)
        for model in models:
            for stage in STAGES:
                version = self._version_for(model, stage)
                if version is not None:
                    self._ensure(model, version)
        deadline = time.monotonic() + wait_s
        while True:
            ready = all((m, v) in self._loaded for m in models if (v := self._version_for(m, "production")) is not None)
            if ready or time.monotonic() >= deadline:
                return ready
            time.sleep(0.05)

    async def warm_up(self, models: Sequence[str], *, wait_s: float = 60.0) -> bool:
        """Load each model's staged versions before the first request, off the event loop.

        True when every model with a production version has it loaded within ``wait_s``; a model
        that fails to load (or a registry that holds none) leaves the planner on its rules.
        """
        return await asyncio.to_thread(self.warm, models, wait_s=wait_s)

    async def predict(self, model: str, instances: Sequence[Mapping[str, Any]], *, stage: Stage) -> Prediction:
        version = self._version_for(model, stage)
        if version is None:
            raise InferenceError("not_deployed", f"no {stage} version of {model} in {self.stages.registry_uri}")
        predictor = self._ensure(model, version)
        if predictor is None:
            failed = self._failed.get((model, version))
            raise InferenceError("not_deployed", failed or f"{model} {version} is still loading")
        try:
            if len(instances) <= self.inline_max:
                predictions = predictor.predict(list(instances))
            else:
                predictions = await asyncio.to_thread(predictor.predict, list(instances))
        except ValueError as exc:
            raise InferenceError("bad_response", str(exc)) from exc
        return Prediction(model, version, stage, predictions)

    async def close(self) -> None:
        return None


# ---- protection: timeout and circuit breaker ----


@dataclass
class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures → half-open after ``reset_s`` (one trial call)."""

    failures: int = 5
    reset_s: float = 30.0
    _consecutive: int = 0
    _opened_at: float | None = None
    _trial_in_flight: bool = False
    clock: Any = field(default=time.monotonic, repr=False)

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_in_flight = False

    def failure(self) -> None:
        self._consecutive += 1
        if self._trial_in_flight or self._consecutive >= self.failures:
            self._opened_at = self.clock()
        self._trial_in_flight = False


class GuardedInference:
    """A client behind a hard timeout and one circuit breaker per model."""

    def __init__(self, client: InferenceClient, *, timeout_s: float, failures: int = 5, reset_s: float = 30.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._failures = failures
        self._reset_s = reset_s
        self.breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, model: str) -> CircuitBreaker:
        b = self.breakers.get(model)
        if b is None:
            b = self.breakers[model] = CircuitBreaker(self._failures, self._reset_s)
        return b

    async def predict(
        self,
        model: str,
        instances: Sequence[Mapping[str, Any]],
        *,
        stage: Stage = "production",
        timeout_s: float | None = None,
        count: bool = True,
    ) -> Prediction:
        """Predict or raise :class:`InferenceError`; ``count=False`` (shadow calls) leaves the breaker alone.

        Every call, answered or not, is measured in ``firstmile_inference_seconds{model,outcome}``.
        """
        began = time.perf_counter()
        outcome = "ok"
        try:
            return await self._predict(model, instances, stage, timeout_s or self.timeout_s, count, began)
        except InferenceError as exc:
            outcome = exc.reason
            raise
        finally:
            telemetry.INFERENCE_LATENCY.labels(model, outcome).observe(time.perf_counter() - began)

    async def _predict(
        self,
        model: str,
        instances: Sequence[Mapping[str, Any]],
        stage: Stage,
        limit: float,
        count: bool,
        began: float,
    ) -> Prediction:
        breaker = self.breaker(model)
        if count and not breaker.allow():
            raise InferenceError("circuit_open", f"{model}: {breaker.failures} consecutive failures")
        try:
            async with asyncio.timeout(limit):
                result = await self.client.predict(model, instances, stage=stage)
            if time.perf_counter() - began > limit:
                # An answer computed on the event loop cannot be interrupted; past the limit it is
                # discarded all the same, so the rule is one: answer within the timeout or fall back.
                raise TimeoutError
        except TimeoutError as exc:
            if count:
                breaker.failure()
            raise InferenceError("timeout", f"{model} took over {limit * 1000:.3g} ms") from exc
        except InferenceError:
            if count:
                breaker.failure()
            raise
        if count:
            breaker.success()
        return result

    async def close(self) -> None:
        await self.client.close()
