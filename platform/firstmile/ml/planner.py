"""The path planner agent: the model's choice first, then the rules, then the default path.

Recovery, as the seed design and ARCHITECTURE.md §4 state it, in code:

1. the tenant's manifest names no model → the rules decide (nothing is attempted);
2. online features: fresh from the feature store, else cached (≤ 5 min old, marked
   stale); the store down with nothing cached → the rules
   (``feature_store_unavailable``); a user with no events yet is not a failure:
   the model sees the request's traits and *unknown* behaviour (imputed with the
   training means by the model's encoder, not claimed to be zero);
3. the model, behind a hard timeout and a circuit breaker (:mod:`firstmile.ml.inference`):
   timeout, open breaker, model down or not deployed, or an answer naming a path
   the tenant does not have → the rules, with the reason on the record;
4. no targeting rule matches → the tenant's default path.

A tenant's own model (``tenant-<slug>.path_classifier``, or ``planner.model: own``) is asked only when the
version that would answer was trained on the tenant's current path catalog (``catalog_changed`` otherwise) and,
for ``own``, once it has a production version (``no_own_model`` until then): docs/models.md#the-automatic-switch.

Then the tenant's exploration (manifest ``planner.exploration``, epsilon-greedy over the
user's eligible paths, :func:`firstmile.onboarding.planner.explore`) may take another
eligible path; every decision records its ``propensity`` either way.

Canary: a deterministic slice of users (by tenant and user id) is served by the
canary version. Shadow: the shadow version is asked concurrently, its answer is
recorded beside production's and never reaches the user.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from firstmile.kit import telemetry
from firstmile.ml.features import FeatureStoreUnavailable
from firstmile.ml.inference import (
    GuardedInference,
    InferenceError,
    Prediction,
    Stage,
    StageInfo,
    StageReader,
    in_canary,
)
from firstmile.onboarding import planner as rules
from firstmile.onboarding.catalog import PathCatalog
from firstmile.tenancy.manifest import own_model_name

__all__ = [
    "AdaptivePlanner",
    "FeatureReader",
    "FeatureReading",
    "FeatureStoreUnavailable",
    "is_tenant_model",
    "model_instance",
    "tenant_model_name",
]

PATH_MODEL = "path_classifier"
NUMERIC_FEATURES: tuple[str, ...] = (
    "engagement_score",
    "time_since_signup",
    "steps_completed",
    "session_count",
    "avg_session_duration",
)
TRAIT_FEATURES: Mapping[str, str] = {
    "persona": "user_persona",
    "signup_source": "signup_source",
    "company_size": "company_size",
    "use_case": "use_case",
}

FeatureSourceKind = Literal["fresh", "stale", "absent"]


def tenant_model_name(slug: str) -> str:
    """The registry name of a tenant's own path model (docs/models.md#per-tenant-models)."""
    return own_model_name(slug)


def is_tenant_model(name: str) -> bool:
    """Whether ``name`` is a tenant's own path model (trained on its logged decisions)."""
    return name.startswith("tenant-") and name.endswith(f".{PATH_MODEL}")


@dataclass(frozen=True, slots=True)
class FeatureReading:
    """A user's model features (the nine keys, or ``None`` when the user has no events yet)."""

    features: Mapping[str, Any] | None
    source: FeatureSourceKind
    age_s: float = 0.0


class FeatureReader(Protocol):
    async def read(self, tenant_id: str, user_id: str, now: datetime) -> FeatureReading:
        """Raises :class:`FeatureStoreUnavailable` when neither the store nor the cache can answer."""
        ...


def model_instance(traits: Mapping[str, Any], reading: FeatureReading | None) -> dict[str, Any]:
    """The path classifier's nine features: the request's traits win over stored ones; behaviour the
    store does not know is ``None`` (unknown)."""
    stored = dict(reading.features) if reading is not None and reading.features is not None else {}
    instance: dict[str, Any] = {}
    for trait, feature in TRAIT_FEATURES.items():
        value = traits.get(trait)
        instance[feature] = value if isinstance(value, str) else stored.get(feature)
    for feature in NUMERIC_FEATURES:
        value = stored.get(feature)
        instance[feature] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return instance


class AdaptivePlanner:
    """Chooses a user's path: model → rules → default path, and says which one decided and why."""

    def __init__(
        self,
        inference: GuardedInference | None,
        stages: StageReader | None,
        features: FeatureReader | None,
        rng: random.Random | None = None,
    ) -> None:
        self.inference = inference
        self.stages = stages
        self.features = features
        self.rng = rng or random.Random()  # the exploration draws; tests pass a seeded one

    async def plan(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> rules.Decision:
        greedy = await self._greedy(tenant_id, user_id, catalog, traits, now)
        return rules.explore(greedy, catalog.current, catalog.default_key, traits, catalog.exploration, self.rng)

    async def _greedy(
        self, tenant_id: str, user_id: str, catalog: PathCatalog, traits: Mapping[str, Any], now: datetime
    ) -> rules.Decision:
        """The planner's own choice (model → rules → default path), before exploration."""
        by_rules = rules.plan(catalog.current, catalog.default_key, traits)
        model = catalog.planner_model
        if model is None:
            return by_rules
        if self.inference is None:
            return self._fallback(by_rules, model, "not_deployed")
        info = self.stages.stages(model) if self.stages is not None else None
        stage: Stage = "production"
        if info is not None and info.canary is not None and in_canary(info.canary_weight, tenant_id, user_id):
            stage = "canary"
        if is_tenant_model(model):  # asked only once it has a version trained on the tenant's current catalog
            gap = _tenant_model_gap(model, catalog, info, stage)
            if gap is not None:
                return self._fallback(by_rules, model, gap[0], **gap[1])
        reading: FeatureReading | None = None
        if self.features is not None:
            try:
                reading = await self.features.read(tenant_id, user_id, now)
            except FeatureStoreUnavailable as exc:
                return self._fallback(by_rules, model, "feature_store_unavailable", error=str(exc)[:200])
        instance = model_instance(traits, reading)
        candidates = [p.key for p in catalog.current]
        if is_tenant_model(model):  # a tenant's own model chooses among the eligible paths: the policy its OPE judged
            eligible = rules.eligible_paths(catalog.current, catalog.default_key, traits, by_rules.path_key)
            candidates = [p.key for p in eligible]
        request = instance | {"candidates": candidates}
        shadow_call = None
        if info is not None and info.shadow is not None and not _catalog_differs(model, catalog, info, info.shadow):
            shadow_call = asyncio.ensure_future(self.inference.predict(model, [request], stage="shadow", count=False))
        began = time.perf_counter()
        answer: Prediction | InferenceError
        try:
            answer = await self.inference.predict(model, [request], stage=stage)
        except InferenceError as exc:
            answer = exc
        latency_ms = round((time.perf_counter() - began) * 1000, 2)
        details: dict[str, Any] = {
            "stage": stage,
            "features": instance,
            "feature_source": reading.source if reading is not None else "absent",
            "inference": self.inference.client.kind,
            "latency_ms": latency_ms,
        }
        if shadow_call is not None:
            details["shadow"] = await _shadow_result(shadow_call, info.shadow if info else None)
        if isinstance(answer, InferenceError):
            return self._fallback(by_rules, model, answer.reason, error=answer.detail[:200], **details)
        chosen = answer.predictions[0] if answer.predictions else {}
        path_key = chosen.get("path")
        path = next((p for p in catalog.current if p.key == path_key), None)
        if path is None:
            return self._fallback(by_rules, model, "invalid_prediction", predicted=str(path_key)[:80], **details)
        scores = chosen.get("scores") or {}
        top = sorted(scores.items(), key=lambda kv: -float(kv[1]))[:3]
        details["scores"] = {k: round(float(v), 4) for k, v in top}
        confidence = float(chosen.get("confidence", scores.get(path.key, 0.0)))
        return rules.Decision(
            path_key=path.key,
            path_version=path.version,
            selected_by="model",
            rule=None,
            priority=None,
            candidates=len(candidates),
            planner=f"{model}@{answer.version}",
            model=model,
            model_version=answer.version,
            confidence=round(confidence, 4),
            details=details,
        )

    @staticmethod
    def _fallback(decision: rules.Decision, model: str, reason: str, **details: Any) -> rules.Decision:
        telemetry.PLANNER_FALLBACKS.labels(reason).inc()
        return decision.after_model_failure(model, reason, **details)


def _catalog_differs(model: str, catalog: PathCatalog, info: StageInfo, version: str) -> bool:
    """Whether ``version`` of a tenant model was trained on another catalog than the tenant's current one (a path
    added, removed or at another version). Both fingerprints are computed once (per model version read, per catalog
    revision): this is a string comparison."""
    recorded = info.catalogs.get(version)
    return is_tenant_model(model) and recorded is not None and recorded != catalog.fingerprint


def _tenant_model_gap(
    model: str, catalog: PathCatalog, info: StageInfo | None, stage: Stage
) -> tuple[str, dict[str, Any]] | None:
    """Why the tenant model must not be asked (the fallback reason and what the record adds), or None.

    ``not_deployed``: its stages are not read yet; ``no_own_model``: ``planner.model: own`` and no production
    version yet; ``catalog_changed``: the version that would answer was trained on another path catalog.
    """
    if info is None:
        return "not_deployed", {"error": f"the stages of {model} are not read yet"}
    if catalog.own_model and info.production is None:
        return "no_own_model", {}
    version = info.canary if stage == "canary" else info.production
    if version is not None and _catalog_differs(model, catalog, info, version):
        found = {"model_version": version, "trained_on": info.catalogs.get(version), "current": catalog.fingerprint}
        return "catalog_changed", {"stage": stage, "catalog": found}
    return None


async def _shadow_result(call: asyncio.Future[Prediction], version: str | None) -> dict[str, Any]:
    try:
        result = await call
    except InferenceError as exc:
        return {"version": version, "error": exc.reason}
    chosen = result.predictions[0] if result.predictions else {}
    confidence = chosen.get("confidence")
    return {
        "version": result.version,
        "path": chosen.get("path"),
        "confidence": round(float(confidence), 4) if isinstance(confidence, int | float) else None,
    }
