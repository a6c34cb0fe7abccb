"""The nudge response predictor: P(the user responds to this nudge: channel, hour, fatigue, silence)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from firstmile_inference.features import Encoder, nudge_encoder
from firstmile_inference.models.base import TorchPredictor

NAME: Final = "nudge_response_predictor"


def make_encoder() -> Encoder:
    return nudge_encoder()


class NudgeResponsePredictor(TorchPredictor):
    """``predict`` → :class:`~firstmile_inference.schema.NudgePrediction` per instance."""

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        probs = self.probabilities(self.encoder.encode(instances))[:, 0].tolist()
        return [{"response_probability": float(p)} for p in probs]
