"""Allocation of users to experiment variants: deterministic hashing, no shared state (pure: no I/O).

A user's place in an experiment is a function of the experiment's seed and the user's id only, so every
process in every region computes the same variant with nothing to look up. Each decision is made of
independent uniform draws in ``[0, 1)``: 8 bytes of a SHA-256 digest read as a big-endian integer over
2**64. The holdout and the layer draw ``SHA-256("<salt>:<purpose>:<user_id>")`` (:func:`unit`); an
experiment's traffic and variant draws are the first and the second 8 bytes of one digest,
``SHA-256("<seed>:<user_id>")`` (:func:`pair`: disjoint bits of a cryptographic hash are independent):

1. **Holdout** (tenant-wide, salt ``holdout:<tenant seed>``): a user with ``u < holdout_percent / 100`` is in
   no experiment at all; the global holdout measures the effect of experimenting itself.
2. **Layer** (salt = the layer's name, shared by every experiment of the layer): each experiment of a layer
   owns a range ``[start, end)`` of percent, and the manifest refuses overlapping ranges, so a user lands in at
   most one experiment of a layer. An experiment without a layer is alone in a layer of its own (0-100).
3. **Targeting**: the experiment's predicates over the user's traits (as a path's targeting).
4. **Traffic** (the first draw of the experiment's seed): in when ``u < traffic_percent / 100``.
5. **Variant** (the second draw): the variant whose cumulative weight interval contains ``u``.

The variant draw does not depend on the traffic draw, so raising the traffic only adds users and never
moves one; lowering it removes users from the experiment without moving the others (and an exposure
already recorded stays what it was: the orchestrator reads it before allocating). Changing the weights
or the seed does move users: the manifest treats a running experiment's seed and variants as fixed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from firstmile.onboarding.rules import matches

SCALE = float(2**64)


def unit(salt: str, purpose: str, user_id: str) -> float:
    """A uniform draw in ``[0, 1)`` that is a pure function of its arguments (SHA-256, first 8 bytes)."""
    digest = hashlib.sha256(f"{salt}:{purpose}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / SCALE


def pair(seed: str, user_id: str) -> tuple[float, float]:
    """Two independent uniform draws in ``[0, 1)``: bytes 0-7 and 8-15 of ``SHA-256("<seed>:<user_id>")``."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / SCALE, int.from_bytes(digest[8:16], "big") / SCALE


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float
    """Relative share of the experiment's traffic (the weights need not sum to anything)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One targeting predicate: ``traits[field] <op> value``."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class Experiment:
    """What allocation needs to know of one running experiment."""

    id: str
    seed: str
    variants: tuple[Variant, ...]
    traffic_percent: float = 100.0
    layer: str | None = None
    layer_range: tuple[float, float] = (0.0, 100.0)
    """``[start, end)`` in percent of the layer."""
    targeting: tuple[Rule, ...] = ()
    bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)
    """The variants' cumulative shares (computed)."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError(f"experiment {self.id}: no variants")
        if any(v.weight <= 0 for v in self.variants):
            raise ValueError(f"experiment {self.id}: every variant's weight must be positive")
        if not 0.0 <= self.traffic_percent <= 100.0:
            raise ValueError(f"experiment {self.id}: traffic_percent must be within 0-100")
        start, end = self.layer_range
        if not 0.0 <= start < end <= 100.0:
            raise ValueError(f"experiment {self.id}: the layer range must satisfy 0 <= start < end <= 100")
        total, running, bounds = sum(v.weight for v in self.variants), 0.0, []
        for variant in self.variants:
            running += variant.weight / total
            bounds.append(running)
        object.__setattr__(self, "bounds", tuple(bounds))

    @property
    def layer_name(self) -> str:
        """The layer's name: its own (``experiment:<id>``) when the experiment names none."""
        return self.layer if self.layer is not None else f"experiment:{self.id}"


@dataclass(frozen=True, slots=True)
class Allocation:
    """A user's variant in an experiment, with the hash inputs that gave it (recorded with the exposure)."""

    experiment: str
    variant: str
    inputs: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Why a user is or is not in an experiment: ``allocated``, ``holdout``, ``layer``, ``targeting``, ``traffic``."""

    reason: str
    allocation: Allocation | None = None


def allocate(
    experiment: Experiment, user_id: str, traits: Mapping[str, Any], layers: dict[str, float] | None = None
) -> Outcome:
    """The user's place in ``experiment`` (the holdout is the caller's: :func:`in_holdout`). ``layers``: the
    user's layer draws already made (by layer name), shared by the experiments of one layer."""
    start, end = experiment.layer_range
    layer_u = None
    if start != 0.0 or end != 100.0:  # alone in its layer, or owning all of it: no draw needed
        name = experiment.layer_name
        layer_u = layers.get(name) if layers is not None else None
        if layer_u is None:
            layer_u = unit(name, "layer", user_id)
            if layers is not None:
                layers[name] = layer_u
        if not start / 100.0 <= layer_u < end / 100.0:
            return Outcome("layer")
    if experiment.targeting and not all(matches(r.field, r.op, r.value, traits) for r in experiment.targeting):
        return Outcome("targeting")
    traffic_u, variant_u = pair(experiment.seed, user_id)
    if traffic_u >= experiment.traffic_percent / 100.0:
        return Outcome("traffic")
    chosen = experiment.variants[-1]
    for variant, bound in zip(experiment.variants, experiment.bounds, strict=True):
        if variant_u < bound:
            chosen = variant
            break
    inputs = {
        "seed": experiment.seed,
        "layer": experiment.layer_name,
        "layer_u": None if layer_u is None else round(layer_u, 12),
        "traffic_u": round(traffic_u, 12),
        "variant_u": round(variant_u, 12),
        "hash": "sha256",
    }
    return Outcome("allocated", Allocation(experiment.id, chosen.name, inputs))


def in_holdout(tenant_seed: str, holdout_percent: float, user_id: str) -> bool:
    """Whether the user is in the tenant's global holdout (in no experiment)."""
    return holdout_percent > 0 and unit(f"holdout:{tenant_seed}", "holdout", user_id) < holdout_percent / 100.0


def allocate_all(
    experiments: Sequence[Experiment], user_id: str, traits: Mapping[str, Any], *,
    tenant_seed: str = "", holdout_percent: float = 0.0,
) -> list[Allocation]:  # fmt: skip
    """Every experiment the user is in (at most one per layer, by the ranges' construction)."""
    if in_holdout(tenant_seed, holdout_percent, user_id):
        return []
    found: list[Allocation] = []
    layers: dict[str, float] = {}
    for experiment in experiments:
        outcome = allocate(experiment, user_id, traits, layers)
        if outcome.allocation is not None:
            found.append(outcome.allocation)
    return found


def overlapping(experiments: Sequence[Experiment]) -> list[tuple[str, str, str]]:
    """Pairs of experiments of one layer whose ranges overlap: ``(layer, first id, second id)``."""
    clashes: list[tuple[str, str, str]] = []
    by_layer: dict[str, list[Experiment]] = {}
    for experiment in experiments:
        by_layer.setdefault(experiment.layer_name, []).append(experiment)
    for layer, members in by_layer.items():
        ordered = sorted(members, key=lambda e: e.layer_range)
        for i, first in enumerate(ordered):
            clashes += [(layer, first.id, s.id) for s in ordered[i + 1 :] if s.layer_range[0] < first.layer_range[1]]
    return clashes
