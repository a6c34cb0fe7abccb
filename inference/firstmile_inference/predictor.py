"""What serving needs from a trained model: a loaded predictor over JSON instances.

The Ray Serve deployments and the platform's in-process client both hold a
:class:`Predictor` and call :meth:`Predictor.predict` with a batch of instances
(the shapes of :mod:`firstmile_inference.schema`). Loading goes through the model
registry: ``load_predictor(registry.get(name, version), device)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Predictor(Protocol):
    """One model version, loaded and ready (weights on ``device``, eval mode)."""

    name: str  # "path_classifier" | "stuck_detector" | "nudge_response_predictor"
    version: str  # semantic version, "1.2.0"
    device: str  # "cpu" | "cuda" | "cuda:0"

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One prediction per instance, in order; a bad instance raises ``ValueError`` naming its index."""
        ...
