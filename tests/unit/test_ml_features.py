"""Encoders: vocabulary indices (0 = unknown), numeric transforms and standardisation, validation errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from firstmile_inference.features import Encoder, nudge_encoder, stuck_encoder, user_encoder
from firstmile_inference.schema import DEMO_PATHS, PERSONAS
from firstmile_inference.simulate import generate

BASE: dict[str, Any] = {
    "user_persona": "developer",
    "signup_source": "organic",
    "company_size": "11-50",
    "use_case": "product_analytics",
    "engagement_score": 55.0,
    "time_since_signup": 2.0,
    "steps_completed": 1,
    "session_count": 3,
    "avg_session_duration": 300.0,
}


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return user_encoder().fit(generate(500, seed=4).user_columns())


def test_categoricals_index_their_vocabulary_and_zero_is_unknown(encoder: Encoder) -> None:
    rows = [
        BASE,
        {**BASE, "user_persona": None},
        {**BASE, "user_persona": "astronaut"},
        {k: v for k, v in BASE.items() if k != "user_persona"},
    ]
    cats = encoder.encode(rows).categorical
    assert cats[0, 0].item() == PERSONAS.index("developer") + 1
    assert cats[1:, 0].tolist() == [0, 0, 0]
    assert encoder.cardinalities[0] == len(PERSONAS) + 1


def test_numerics_are_log_transformed_and_standardised(encoder: Encoder) -> None:
    data = generate(500, seed=4)
    encoded = encoder.encode_columns(data.user_columns())
    assert torch.allclose(encoded.numeric.mean(dim=0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(encoded.numeric.std(dim=0, unbiased=False), torch.ones(5), atol=1e-3)
    one = encoder.encode([BASE]).numeric[0]
    expected = (math.log1p(2.0) - encoder.mean[1]) / encoder.std[1]
    assert one[1].item() == pytest.approx(expected, rel=1e-5)
    # the instance path and the columnar path agree
    rows = data.user_rows()[:50]
    assert torch.allclose(encoder.encode(rows).numeric, encoded.numeric[:50])
    assert torch.equal(encoder.encode(rows).categorical, encoded.categorical[:50])


def test_absent_numerics_are_imputed_with_the_training_mean(encoder: Encoder) -> None:
    absent = {k: v for k, v in BASE.items() if k != "steps_completed"}
    explicit_none = {**BASE, "steps_completed": None}
    zero = {**BASE, "steps_completed": 0}
    a, b, c = (encoder.encode([r]).numeric for r in (absent, explicit_none, zero))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # unknown is not "none at all"
    column = sum(spec.width for spec in encoder.numeric[: [s.name for s in encoder.numeric].index("steps_completed")])
    assert a[0, column].item() == 0.0  # the training mean, standardised
    others = [i for i in range(a.shape[1]) if i != column]
    assert torch.equal(a[0, others], c[0, others])  # the other features are untouched


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("engagement_score", "high", "must be a finite number"),
        ("session_count", True, "must be a finite number"),
        ("session_count", [3], "must be a finite number"),
        ("time_since_signup", float("nan"), "must be a finite number"),
        ("avg_session_duration", float("inf"), "must be a finite number"),
        ("steps_completed", -1, "is a count and cannot be negative"),
        ("session_count", -2.0, "is a count and cannot be negative"),
        ("time_since_signup", -0.5, "is a duration and cannot be negative"),
        ("engagement_score", 101, "must be within 0..100"),
        ("user_persona", 7, "must be a string or null"),
    ],
)
def test_bad_values_name_the_instance_and_field(encoder: Encoder, field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=rf"instance 2: field '{field}' {message}"):
        encoder.encode([BASE, BASE, {**BASE, field: value}])


def test_non_object_instances_are_rejected(encoder: Encoder) -> None:
    with pytest.raises(ValueError, match="instance 1: expected a JSON object"):
        encoder.encode([BASE, ["not", "a", "dict"]])  # type: ignore[list-item]


def test_hour_of_day_is_cyclic_and_validated() -> None:
    data = generate(400, seed=8)
    enc = nudge_encoder().fit(data.nudge_columns())
    row = {**BASE, "channel": "email", "hour_of_day": 23.0, "nudges_sent": 0, "hours_since_last_activity": 20.0}
    near = enc.encode([row, {**row, "hour_of_day": 0.0}, {**row, "hour_of_day": 12.0}]).numeric
    hour = slice(5, 7)  # sin and cos follow the five user numerics
    assert torch.dist(near[0, hour], near[1, hour]) < torch.dist(near[0, hour], near[2, hour])
    with pytest.raises(ValueError, match="instance 0: field 'hour_of_day' must be within"):
        enc.encode([{**row, "hour_of_day": 24}])
    with pytest.raises(ValueError, match="instance 0: field 'nudges_sent' is a count"):
        enc.encode([{**row, "nudges_sent": -1}])


def test_stuck_encoder_knows_the_model_paths() -> None:
    data = generate(300, seed=8)
    enc = stuck_encoder(DEMO_PATHS).fit(data.stuck_columns())
    row = {**BASE, "path": "generic", "step_index": 1, "steps_total": 3, "hours_since_last_activity": 30.0,
           "hours_on_current_step": 40.0, "events_last_24h": 0}  # fmt: skip
    cats = enc.encode([row, {**row, "path": "brand-new-path"}]).categorical
    assert cats[:, -1].tolist() == [DEMO_PATHS.index("generic") + 1, 0]


def test_config_round_trip_and_unfitted_encoders(encoder: Encoder) -> None:
    restored = Encoder.from_config(encoder.to_config())
    assert restored == encoder
    assert torch.equal(restored.encode([BASE]).numeric, encoder.encode([BASE]).numeric)
    with pytest.raises(ValueError, match="no fitted statistics"):
        user_encoder().encode([BASE])
    assert np.isfinite(encoder.std).all()
