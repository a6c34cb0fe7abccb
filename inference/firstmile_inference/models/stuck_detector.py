"""The stuck detector: P(the user will not progress within 48 h absent intervention).

Its decision threshold is chosen at training time on a validation split: the
lowest threshold whose precision reaches the target (0.92), i.e. the one with
the highest recall at that precision; it is stored in the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from firstmile_inference.features import Encoder, stuck_encoder
from firstmile_inference.models.base import TorchPredictor

NAME: Final = "stuck_detector"
TARGET_PRECISION: Final = 0.92


def make_encoder(paths: Sequence[str]) -> Encoder:
    return stuck_encoder(paths)


class StuckDetectorPredictor(TorchPredictor):
    """``predict`` → :class:`~firstmile_inference.schema.StuckPrediction` per instance."""

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        probs = self.probabilities(self.encoder.encode(instances))[:, 0].tolist()
        threshold = self.threshold
        return [{"stuck_probability": float(p), "stuck": bool(p >= threshold)} for p in probs]
