"""The network shared by the three models: an embedding per categorical feature plus an MLP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from firstmile_inference.features import Encoded


class TabularNet(nn.Module):
    """``outputs`` logits from categorical indices (embedded) and standardised numerics."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        numeric_width: int,
        outputs: int,
        *,
        embedding_dim: int = 8,
        hidden: Sequence[int] = (64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(int(c), embedding_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        width = embedding_dim * len(cardinalities) + numeric_width
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, outputs))
        self.mlp = nn.Sequential(*layers)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        parts.append(numeric)
        out = self.mlp(torch.cat(parts, dim=1))
        assert isinstance(out, torch.Tensor)
        return out

    def logits(self, batch: Encoded) -> torch.Tensor:
        return self.forward(batch.categorical, batch.numeric)


def network_config(
    cardinalities: Sequence[int],
    numeric_width: int,
    outputs: int,
    *,
    embedding_dim: int = 8,
    hidden: Sequence[int] = (64, 64),
    dropout: float = 0.0,
) -> dict[str, Any]:
    return {
        "cardinalities": [int(c) for c in cardinalities],
        "numeric_width": int(numeric_width),
        "outputs": int(outputs),
        "embedding_dim": int(embedding_dim),
        "hidden": [int(h) for h in hidden],
        "dropout": float(dropout),
    }


def build_network(config: Mapping[str, Any]) -> TabularNet:
    return TabularNet(
        config["cardinalities"],
        int(config["numeric_width"]),
        int(config["outputs"]),
        embedding_dim=int(config["embedding_dim"]),
        hidden=tuple(int(h) for h in config["hidden"]),
        dropout=float(config.get("dropout", 0.0)),
    )
