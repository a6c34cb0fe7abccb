"""The ``nudge_response_predictor`` as the nudge bandit's prior: P(response) of each channel for one user.

The nudge executor asks before its decision's transaction (a network call): the user's online features
(the nine model features, from the feature store through the resilient reader), each candidate channel,
the hour of the decision (UTC) and the user's silence. Any failure (no features, a timeout, an open
breaker, no model deployed, a malformed answer) gives no prior, with the reason: the bandit then starts
every arm from ``Beta(1, 1)`` (the design's fallback: the decision never waits for the model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from firstmile.ml.feature_reader import ResilientFeatureReader
from firstmile.ml.inference import GuardedInference, InferenceError

NUDGE_MODEL = "nudge_response_predictor"


@dataclass(frozen=True, slots=True)
class ResponsePrior:
    """The predicted response probability per channel, or none with the reason."""

    probabilities: Mapping[str, float] = field(default_factory=dict)
    version: str | None = None
    fallback: str | None = None
    """Why there is no prior (``no_features``, ``timeout``, ``circuit_open``, …); None when there is one."""


class ModelResponsePrior:
    """Asks the registry's ``nudge_response_predictor`` (Ray Serve or in-process) through the guarded client."""

    def __init__(
        self, inference: GuardedInference, features: ResilientFeatureReader, *, timeout_s: float = 0.5
    ) -> None:
        self.inference = inference
        self.features = features
        self.timeout_s = timeout_s

    async def predict(self, tenant_id: str, user_id: str, channels: Sequence[str], now: datetime) -> ResponsePrior:
        found = await self.features.read(tenant_id, user_id)
        user = found.model_features(now)
        if user is None or found.features is None:
            return ResponsePrior(fallback="no_features")
        silence = found.features.hours_since_last_activity(now)
        instances: list[dict[str, Any]] = [
            dict(user) | {"channel": channel, "hour_of_day": now.hour, "nudges_sent": 0,
                          "hours_since_last_activity": silence}
            for channel in channels
        ]  # fmt: skip
        try:
            result = await self.inference.predict(NUDGE_MODEL, instances, timeout_s=self.timeout_s)
            probabilities = {c: float(p["response_probability"]) for c, p in zip(channels, result.predictions,
                                                                                  strict=True)}  # fmt: skip
        except InferenceError as exc:
            return ResponsePrior(fallback=exc.reason)
        except (KeyError, TypeError, ValueError) as exc:
            return ResponsePrior(fallback=f"bad_response: {type(exc).__name__}")
        return ResponsePrior(probabilities, result.version)
