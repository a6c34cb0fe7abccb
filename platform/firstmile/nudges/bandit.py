"""Thompson sampling over a nudge's arms (template variant, channel, send time), per segment, with no I/O.

Each arm's response rate has a Beta posterior. Its prior comes from the registered
``nudge_response_predictor`` when it gave a probability ``p`` for the arm: ``Beta(1 + k·p,
1 + k·(1 - p))`` with ``k`` pseudo-observations (``prior_strength``), so the model steers the first
decisions of a segment and the segment's own outcomes take over as they accumulate; without a
prediction the prior is ``Beta(1, 1)``. A decision draws one sample from each eligible arm's
posterior and takes the largest: arms are tried in proportion to the chance that they are the
best, which is Thompson sampling. The reward is 1 when the delivery loop reports a click or the
nudged step completed within the window, else 0; the caller keeps the counts per (tenant,
segment, arm) and passes them in.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArmStats:
    """What a segment has seen of one arm."""

    key: str
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        if self.successes < 0 or self.failures < 0:
            raise ValueError("arm counts must not be negative")


@dataclass(frozen=True, slots=True)
class Choice:
    """One decision: the chosen arm and what it was chosen from (for the audit log)."""

    arm: str
    samples: Mapping[str, float]
    posterior_means: Mapping[str, float]
    priors: Mapping[str, tuple[float, float]]


class ThompsonSampler:
    """Chooses among arms by Thompson sampling; ``rng`` makes it reproducible in tests and simulations."""

    def __init__(self, rng: random.Random | None = None, prior_strength: float = 10.0) -> None:
        if prior_strength < 0:
            raise ValueError("prior_strength must not be negative")
        self.rng = rng or random.SystemRandom()
        self.prior_strength = prior_strength

    def prior(self, predicted: float | None) -> tuple[float, float]:
        """The Beta prior of an arm whose predicted response rate is ``predicted`` (None: uniform)."""
        if predicted is None:
            return (1.0, 1.0)
        p = min(1.0, max(0.0, float(predicted)))
        return (1.0 + self.prior_strength * p, 1.0 + self.prior_strength * (1.0 - p))

    def choose(self, arms: Sequence[ArmStats], predicted: Mapping[str, float] | None = None) -> Choice:
        """Sample each arm's posterior and take the largest draw (ties: the first arm listed)."""
        if not arms:
            raise ValueError("no arm to choose from")
        keys = [a.key for a in arms]
        if len(set(keys)) != len(keys):
            raise ValueError("arm keys must be unique")
        predicted = predicted or {}
        samples: dict[str, float] = {}
        means: dict[str, float] = {}
        priors: dict[str, tuple[float, float]] = {}
        for arm in arms:
            a0, b0 = self.prior(predicted.get(arm.key))
            priors[arm.key] = (a0, b0)
            a, b = a0 + arm.successes, b0 + arm.failures
            samples[arm.key] = self.rng.betavariate(a, b)
            means[arm.key] = a / (a + b)
        best = max(keys, key=lambda k: samples[k])
        return Choice(best, samples, means, priors)
