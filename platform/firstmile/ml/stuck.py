"""The stuck detector model behind the onboarding slice's :class:`~firstmile.onboarding.stuck.StuckDetector` port."""

from __future__ import annotations

from typing import Any

from firstmile.ml.inference import GuardedInference, InferenceError
from firstmile.onboarding.stuck import STUCK_MODEL, DetectorUnavailableError, Verdict, Verdicts


class ModelStuckDetector:
    """Asks the registry's ``stuck_detector`` (Ray Serve or in-process) through the guarded client.

    ``timeout_s`` bounds one batch (the scan's batches are larger than a start's single
    instance, so the bound is its own, not the planner's).
    """

    def __init__(self, inference: GuardedInference, *, timeout_s: float = 2.0) -> None:
        self.inference = inference
        self.timeout_s = timeout_s

    async def detect(self, instances: list[dict[str, Any]]) -> Verdicts:
        try:
            result = await self.inference.predict(STUCK_MODEL, instances, timeout_s=self.timeout_s)
        except InferenceError as exc:
            raise DetectorUnavailableError(exc.reason, exc.detail) from exc
        try:
            verdicts = [Verdict(bool(p["stuck"]), float(p["stuck_probability"])) for p in result.predictions]
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectorUnavailableError("bad_response", str(exc)) from exc
        return Verdicts(result.version, verdicts)
