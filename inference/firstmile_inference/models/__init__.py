"""The three models and ``load_predictor``: a registered version → a ready :class:`Predictor`.

Each model is a :class:`~firstmile_inference.models.network.TabularNet` (an
embedding per categorical feature plus an MLP) behind a predictor that encodes
JSON instances with the encoder stored in the version's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from firstmile_inference.features import Encoder
from firstmile_inference.models.base import TorchPredictor
from firstmile_inference.models.network import TabularNet, build_network
from firstmile_inference.models.nudge_response_predictor import NudgeResponsePredictor
from firstmile_inference.models.path_classifier import PathClassifierPredictor
from firstmile_inference.models.stuck_detector import StuckDetectorPredictor
from firstmile_inference.predictor import Predictor
from firstmile_inference.registry import ModelVersion

PREDICTORS: dict[str, type[TorchPredictor]] = {
    "path_classifier": PathClassifierPredictor,
    "stuck_detector": StuckDetectorPredictor,
    "nudge_response_predictor": NudgeResponsePredictor,
}

__all__ = [
    "PREDICTORS",
    "NudgeResponsePredictor",
    "PathClassifierPredictor",
    "StuckDetectorPredictor",
    "TabularNet",
    "TorchPredictor",
    "build_predictor",
    "load_predictor",
]


def build_predictor(
    name: str,
    version: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    device: str = "cpu",
) -> TorchPredictor:
    """A predictor from a config and weights in memory (what ``load_predictor`` does after reading files)."""
    kind = str(config.get("model", name))
    if kind not in PREDICTORS:
        raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(PREDICTORS)}")
    network = build_network(config["network"])
    network.load_state_dict(dict(state_dict))
    return PREDICTORS[kind](
        name=name,
        version=version,
        device=device,
        config=config,
        network=network,
        encoder=Encoder.from_config(config["encoder"]),
    )


def load_predictor(mv: ModelVersion, device: str = "cpu") -> Predictor:
    """Load a registered version: weights (``weights_only=True``) on ``device``, eval mode."""
    state = torch.load(mv.weights_path, map_location=device, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{mv.name} {mv.version}: weights.pt does not hold a state dict")
    predictor: Predictor = build_predictor(mv.name, mv.version, mv.config, state, device)
    return predictor
