"""The path classifier: one activation logit per path key from the nine user features.

Trained on logged data (the path a user was given and whether they activated)
with a binary cross-entropy on the logged path's output only, so each output
estimates P(activate | features, path). The ML planner picks the argmax among
the tenant's current candidate paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from firstmile_inference.features import Encoder, user_encoder
from firstmile_inference.models.base import TorchPredictor

NAME: Final = "path_classifier"


def make_encoder() -> Encoder:
    return user_encoder()


class PathClassifierPredictor(TorchPredictor):
    """``predict`` → :class:`~firstmile_inference.schema.PathPrediction` per instance."""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.config["paths"])

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        keys = self.paths
        index = {k: i for i, k in enumerate(keys)}
        allowed: list[list[int]] = []
        for i, instance in enumerate(instances):
            candidates = instance.get("candidates") if isinstance(instance, Mapping) else None
            if candidates is None:
                allowed.append(list(range(len(keys))))
                continue
            if not isinstance(candidates, list | tuple) or not all(isinstance(c, str) for c in candidates):
                raise ValueError(f"instance {i}: field 'candidates' must be a list of path keys")
            chosen = list(dict.fromkeys(index[c] for c in candidates if c in index))
            if not chosen:
                raise ValueError(
                    f"instance {i}: none of the candidates {list(candidates)} is a path this model knows "
                    f"({', '.join(keys)})"
                )
            allowed.append(chosen)
        probs = self.probabilities(self.encoder.encode(instances)).tolist()
        out: list[dict[str, Any]] = []
        for row, chosen in zip(probs, allowed, strict=True):
            scores = {keys[j]: float(row[j]) for j in chosen}
            best = max(chosen, key=lambda j: row[j])
            out.append({"scores": scores, "path": keys[best], "confidence": float(row[best])})
        return out
