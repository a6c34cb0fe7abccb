"""Encoders from the JSON instances of :mod:`firstmile_inference.schema` to tensors.

A categorical feature becomes an index into its vocabulary, shifted by one:
index 0 is *unknown* (absent, ``None`` or outside the vocabulary). A numeric
feature is validated, transformed (``log1p`` for skewed counts and durations,
``sin``/``cos`` for the hour of day) and standardised with a mean and a standard
deviation fitted on the training data; the fitted statistics travel in the
model's config (:meth:`Encoder.to_config`), so serving encodes exactly as
training did.

Validation (:meth:`Encoder.encode`): a numeric value that is not a number (a
string, a boolean, a list, NaN or infinity), a negative count or duration, an
engagement score outside 0..100 or an hour outside [0, 24) raises
``ValueError`` naming the instance's index and the field. An absent numeric
(or ``None``) is *unknown* and imputed with the training mean (0 after
standardisation): a platform that has not seen a user's sessions yet says so
instead of claiming zero engagement. A categorical value that is not a string
(a number, a list) is an error too; an unknown string is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from firstmile_inference.schema import (
    CATEGORICAL_FEATURES,
    CHANNELS,
    NUMERIC_FEATURES,
    VOCABULARIES,
)

Kind = Literal["score", "count", "duration", "hour"]
Transform = Literal["identity", "log1p", "cyclic"]


@dataclass(frozen=True)
class NumericField:
    """A numeric input: what it measures (for validation) and how it is transformed."""

    name: str
    kind: Kind
    transform: Transform

    @property
    def width(self) -> int:
        return 2 if self.transform == "cyclic" else 1


USER_NUMERIC: Final = (
    NumericField("engagement_score", "score", "identity"),
    NumericField("time_since_signup", "duration", "log1p"),
    NumericField("steps_completed", "count", "log1p"),
    NumericField("session_count", "count", "log1p"),
    NumericField("avg_session_duration", "duration", "log1p"),
)
STUCK_NUMERIC: Final = (
    NumericField("step_index", "count", "identity"),
    NumericField("steps_total", "count", "identity"),
    NumericField("hours_since_last_activity", "duration", "log1p"),
    NumericField("hours_on_current_step", "duration", "log1p"),
    NumericField("events_last_24h", "count", "log1p"),
)
NUDGE_NUMERIC: Final = (
    NumericField("hour_of_day", "hour", "cyclic"),
    NumericField("nudges_sent", "count", "identity"),
    NumericField("hours_since_last_activity", "duration", "log1p"),
)
assert tuple(f.name for f in USER_NUMERIC) == NUMERIC_FEATURES


@dataclass(frozen=True)
class Encoded:
    """A batch as tensors: ``categorical`` (n, C) int64 indices, ``numeric`` (n, D) float32."""

    categorical: torch.Tensor
    numeric: torch.Tensor

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def to(self, device: str | torch.device) -> Encoded:
        return Encoded(self.categorical.to(device), self.numeric.to(device))

    def rows(self, index: torch.Tensor | slice) -> Encoded:
        return Encoded(self.categorical[index], self.numeric[index])


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Encoder:
    """Categorical vocabularies plus numeric fields, with the fitted standardisation statistics."""

    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    numeric: tuple[NumericField, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, vocab in self.categorical:
            self._lookup[name] = {v: i + 1 for i, v in enumerate(vocab)}

    # ---- shape
    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.categorical)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Embedding table sizes: vocabulary plus the unknown index 0."""
        return tuple(len(vocab) + 1 for _, vocab in self.categorical)

    @property
    def numeric_width(self) -> int:
        return sum(f.width for f in self.numeric)

    @property
    def fields(self) -> tuple[str, ...]:
        return self.categorical_names + tuple(f.name for f in self.numeric)

    @property
    def fitted(self) -> bool:
        return len(self.mean) == self.numeric_width

    # ---- fitting and (de)serialisation
    def fit(self, columns: Mapping[str, Any]) -> Encoder:
        """A copy with the standardisation statistics fitted on ``columns`` (trusted training data)."""
        raw = self._transform(self._numeric_columns(columns))
        mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        for j, _ in enumerate(mean):
            if self._is_cyclic_column(j):  # sin/cos are already on a unit scale
                mean[j], std[j] = 0.0, 1.0
        std = np.where(std < 1e-6, 1.0, std)
        return Encoder(self.categorical, self.numeric, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def _is_cyclic_column(self, column: int) -> bool:
        j = 0
        for f in self.numeric:
            if j <= column < j + f.width:
                return f.transform == "cyclic"
            j += f.width
        return False

    def to_config(self) -> dict[str, Any]:
        return {
            "categorical": [[name, list(vocab)] for name, vocab in self.categorical],
            "numeric": [[f.name, f.kind, f.transform] for f in self.numeric],
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Encoder:
        return cls(
            categorical=tuple((str(name), tuple(str(v) for v in vocab)) for name, vocab in config["categorical"]),
            numeric=tuple(NumericField(str(n), k, t) for n, k, t in config["numeric"]),
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
        )

    # ---- encoding
    def encode(self, instances: Sequence[Mapping[str, Any]]) -> Encoded:
        """Validate and encode JSON instances; a bad one raises ``ValueError`` naming its index and field."""
        cats = np.zeros((len(instances), len(self.categorical)), dtype=np.int64)
        nums = np.zeros((len(instances), len(self.numeric)), dtype=np.float64)
        missing = np.zeros((len(instances), len(self.numeric)), dtype=bool)
        for i, instance in enumerate(instances):
            if not isinstance(instance, Mapping):
                raise ValueError(f"instance {i}: expected a JSON object, got {type(instance).__name__}")
            for c, (name, _) in enumerate(self.categorical):
                value = instance.get(name)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ValueError(f"instance {i}: field {name!r} must be a string or null, got {value!r}")
                cats[i, c] = self._lookup[name].get(value, 0)
            for j, spec in enumerate(self.numeric):
                value = instance.get(spec.name)
                if value is None:
                    missing[i, j] = True
                else:
                    nums[i, j] = self._validated(i, spec, value)
        return self._finish(cats, nums, missing)

    def encode_columns(self, columns: Mapping[str, Any]) -> Encoded:
        """Encode trusted columnar data (a simulated dataset): categoricals as string lists, numerics as arrays."""
        n = len(columns[self.fields[0]])
        cats = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for c, (name, _) in enumerate(self.categorical):
            lookup = self._lookup[name]
            cats[:, c] = [lookup.get(v, 0) if isinstance(v, str) else 0 for v in columns[name]]
        return self._finish(cats, self._numeric_columns(columns))

    def _numeric_columns(self, columns: Mapping[str, Any]) -> NDArray[np.float64]:
        return np.stack([np.asarray(columns[f.name], dtype=np.float64) for f in self.numeric], axis=1)

    @staticmethod
    def _validated(index: int, spec: NumericField, value: Any) -> float:
        if value is None:
            return 0.0
        number = _finite_number(value)
        if number is None:
            raise ValueError(f"instance {index}: field {spec.name!r} must be a finite number, got {value!r}")
        if spec.kind == "score" and not 0.0 <= number <= 100.0:
            raise ValueError(f"instance {index}: field {spec.name!r} must be within 0..100, got {value!r}")
        if spec.kind == "hour" and not 0.0 <= number < 24.0:
            raise ValueError(f"instance {index}: field {spec.name!r} must be within [0, 24), got {value!r}")
        if spec.kind in ("count", "duration") and number < 0:
            what = "count" if spec.kind == "count" else "duration"
            raise ValueError(f"instance {index}: field {spec.name!r} is a {what} and cannot be negative, got {value!r}")
        return number

    def _transform(self, nums: NDArray[np.float64]) -> NDArray[np.float64]:
        parts: list[NDArray[np.float64]] = []
        for j, spec in enumerate(self.numeric):
            column = nums[:, j]
            if spec.transform == "log1p":
                parts.append(np.log1p(np.maximum(column, 0.0))[:, None])
            elif spec.transform == "cyclic":
                angle = 2.0 * math.pi * column / 24.0
                parts.append(np.stack([np.sin(angle), np.cos(angle)], axis=1))
            else:
                parts.append(column[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(nums), 0))

    def _finish(
        self, cats: NDArray[np.int64], nums: NDArray[np.float64], missing: NDArray[np.bool_] | None = None
    ) -> Encoded:
        if not self.fitted:
            raise ValueError("the encoder has no fitted statistics: call fit() on training data first")
        values = (self._transform(nums) - np.asarray(self.mean)) / np.asarray(self.std)
        if missing is not None and missing.any():
            offset = 0
            for j, spec in enumerate(self.numeric):  # unknown: the training mean, 0 once standardised
                values[missing[:, j], offset : offset + spec.width] = 0.0
                offset += spec.width
        return Encoded(torch.from_numpy(cats), torch.from_numpy(values.astype(np.float32)))


def _vocab(name: str) -> tuple[str, ...]:
    return tuple(VOCABULARIES[name])


def user_encoder() -> Encoder:
    """The nine features (the path classifier's input)."""
    return Encoder(tuple((name, _vocab(name)) for name in CATEGORICAL_FEATURES), USER_NUMERIC)


def stuck_encoder(paths: Sequence[str]) -> Encoder:
    """User features, the path (vocabulary: the model's paths) and the progress state."""
    cats = (*((name, _vocab(name)) for name in CATEGORICAL_FEATURES), ("path", tuple(paths)))
    return Encoder(cats, USER_NUMERIC + STUCK_NUMERIC)


def nudge_encoder() -> Encoder:
    """User features, the channel and the timing of the nudge."""
    cats = (*((name, _vocab(name)) for name in CATEGORICAL_FEATURES), ("channel", tuple(CHANNELS)))
    return Encoder(cats, USER_NUMERIC + NUDGE_NUMERIC)
