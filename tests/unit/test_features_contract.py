"""The feature-store contract (tests/unit/features_contract.py) against the in-process store: events
applied in random batch sizes give the state the same events give one at a time. No services; the
same cases against Redis (the Lua script and its Python twin) are in tests/integration/test_feature_store.py.
"""

from __future__ import annotations

import pytest

from firstmile.ml.feature_stores import InProcessFeatureStore
from tests.unit import features_contract as contract


@pytest.mark.parametrize("seed", range(25))
async def test_batches_and_single_events_agree_on_random_sequences(seed: int) -> None:
    await contract.random_sequence(InProcessFeatureStore(), seed)


async def test_batches_and_single_events_agree_on_the_boundaries() -> None:
    await contract.the_boundaries(InProcessFeatureStore())


async def test_batches_and_single_events_agree_on_a_long_history() -> None:
    await contract.a_long_history(InProcessFeatureStore())


async def test_forget_agrees() -> None:
    await contract.forget(InProcessFeatureStore())
