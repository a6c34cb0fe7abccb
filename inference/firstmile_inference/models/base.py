"""What the three predictors share: a network and an encoder rebuilt from a registered version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch

from firstmile_inference.features import Encoded, Encoder
from firstmile_inference.models.network import TabularNet

BATCH_SIZE: Final = 4096


class TorchPredictor:
    """A loaded model version: network on ``device`` in eval mode, plus the encoder of its config."""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        device: str,
        config: Mapping[str, Any],
        network: TabularNet,
        encoder: Encoder,
    ) -> None:
        self.name = name
        self.version = version
        self.device = device
        self.config = dict(config)
        self.network = network.to(device).eval()
        self.encoder = encoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} {self.version} on {self.device})"

    def predict(self, instances: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One prediction per instance (see the subclasses)."""
        raise NotImplementedError

    def probabilities(self, batch: Encoded) -> torch.Tensor:
        """Sigmoid of the network's logits, ``(n, outputs)`` on the CPU, computed in batches."""
        outputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(batch), BATCH_SIZE):
                part = batch.rows(slice(start, start + BATCH_SIZE)).to(self.device)
                outputs.append(torch.sigmoid(self.network.logits(part)).float().cpu())
        if not outputs:
            return torch.zeros((0, int(self.config["network"]["outputs"])))
        return torch.cat(outputs)
