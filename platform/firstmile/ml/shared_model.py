"""The shared warm-start model: trained across the tenants that opt in, on features that carry no tenant data.

``firstmile models train --shared`` reads, as the schema owner, the logged decisions of the tenants whose
manifest says ``planner.training.warm_start: shared`` (and of no other tenant), reduces each decision to the
features that carry no tenant data (:func:`firstmile_inference.warm_start.shared_instance`: the four traits
within the platform's vocabularies, the five behavioural numerics, the activation; no path, no id, no other
trait; the path taken only as an anonymous column number for the per-tenant heads that training discards),
refuses with a message naming the gap when fewer than ``min_tenants`` (3) tenants contribute at least
``min_tenant_decisions`` (200) decisions each (a single tenant's decisions are never a "shared" model), trains
the path-agnostic model on the balanced pool and registers it as :data:`SHARED_MODEL` with the number of
contributing tenants and their decision counts only. The run is audited in each contributing tenant's log
(kind ``model``, ``"action": "models.train_shared"``).

A tenant that opted in then trains its own model from the shared model's production version (else its latest):
:func:`firstmile.ml.tenant_models.register` (docs/models.md#shared-warm-start-model).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import create_async_engine

from firstmile.ml import tenant_models as tm
from firstmile.ml.planner import FeatureReading, model_instance
from firstmile.onboarding import service as onboarding
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion, Registry
    from firstmile_inference.warm_start import TenantShare

SHARED_MODEL: Final = tm.SHARED_MODEL
"""``shared.path_warmstart`` (:data:`firstmile_inference.warm_start.SHARED_MODEL`)."""
MIN_TENANTS: Final = 3
"""Contributing tenants a shared model needs (at least 2 may be asked for; one is never a shared model)."""
MIN_TENANT_DECISIONS: Final = 200
"""Logged decisions (old enough for the horizon) an opted-in tenant needs to contribute."""
AUDIT_ACTION: Final = "models.train_shared"


@dataclass(frozen=True)
class Contributor:
    """An opted-in tenant and its logged decisions (read by tenant id: its own rows only)."""

    tenant_id: uuid.UUID
    slug: str
    rows: Sequence[onboarding.LoggedDecision]


@dataclass(frozen=True)
class SharedData:
    """Every opted-in tenant's decisions: what ``models train --shared`` reads."""

    opted_in: Sequence[Contributor]
    horizon: timedelta
    window: timedelta


async def load_shared_data(admin_url: str, horizon: timedelta, window: timedelta) -> SharedData:
    """The opted-in tenants' logged decisions, as the schema owner; a tenant that did not opt in is not read."""
    engine = create_async_engine(admin_url, pool_size=1, max_overflow=0)
    found = []
    try:
        async with engine.connect() as conn:
            for tenant_id, slug, planner in await tenancy.training_tenants(conn):
                if tm.opts_in_to_warm_start(planner):
                    rows = await onboarding.logged_decisions(conn, tenant_id, horizon, window)
                    found.append(Contributor(tenant_id, slug, rows))
    finally:
        await engine.dispose()
    return SharedData(found, horizon, window)


def shared_row(row: onboarding.LoggedDecision) -> dict[str, Any]:
    """A logged decision's features as the shared model may see them: the nine features the tenant's own model
    reads (:func:`firstmile.ml.planner.model_instance`), reduced by
    :func:`firstmile_inference.warm_start.shared_instance`. The path, the propensity and the traits beyond the
    four are not read."""
    from firstmile_inference.warm_start import shared_instance

    reading = FeatureReading(row.features, "fresh") if row.features is not None else None
    return shared_instance(model_instance(row.traits, reading))


def shares(
    data: SharedData, *, min_tenants: int = MIN_TENANTS, min_tenant_decisions: int = MIN_TENANT_DECISIONS
) -> list[tuple[Contributor, TenantShare]]:
    """The contributing tenants and their reduced decisions, or a
    :class:`~firstmile.ml.tenant_models.TrainingRefusedError` naming the gap: too few tenants opted in with enough
    decisions, too few activations in the pool."""
    from firstmile_inference.warm_start import MIN_TENANTS as FLOOR

    needed = max(FLOOR, min_tenants)
    days = data.horizon.total_seconds() / 86_400
    window_days = data.window.total_seconds() / 86_400
    contributing = [c for c in data.opted_in if len(c.rows) >= min_tenant_decisions]
    if len(contributing) < needed:
        listed = ", ".join(f"{c.slug} ({len(c.rows)})" for c in data.opted_in) or "none"
        raise tm.TrainingRefusedError(
            f"the shared warm-start model needs at least {needed} contributing tenants: tenants that opted in "
            f"(planner.training.warm_start: shared) with at least {min_tenant_decisions} logged decisions at least "
            f"{days:g} days old in the last {window_days:g} days. {len(data.opted_in)} opted in, with these "
            f"decisions: {listed}; {len(contributing)} can contribute. A single tenant's decisions are never a shared "
            "model; nothing is registered."
        )
    activations = sum(1 for c in contributing for r in c.rows if r.activated)
    total = sum(len(c.rows) for c in contributing)
    if activations < tm.MIN_ACTIVATIONS:
        raise tm.TrainingRefusedError(
            f"too few activations for the shared warm-start model: {activations} of the {total} decisions of the "
            f"{len(contributing)} contributing tenants activated within {days:g} days; at least "
            f"{tm.MIN_ACTIVATIONS} are needed. Nothing is registered."
        )
    return [(c, share_of(c.rows)) for c in contributing]


def share_of(rows: Sequence[onboarding.LoggedDecision]) -> TenantShare:
    """One tenant's decisions as the shared model may read them: the reduced features, the activation, and the path
    taken as an anonymous column number (its rank among the tenant's path keys; the keys stay here)."""
    import numpy as np

    from firstmile_inference.warm_start import TenantShare

    column = {key: i for i, key in enumerate(sorted({r.path_key for r in rows}))}
    return TenantShare(
        [shared_row(r) for r in rows],
        np.asarray([float(r.activated) for r in rows], dtype=np.float64),
        np.asarray([column[r.path_key] for r in rows], dtype=np.int64),
        len(column),
    )


def register_shared(
    registry: Registry,
    data: SharedData,
    pairs: Sequence[tuple[Contributor, TenantShare]],
    *,
    seed: int = 7,
    epochs: int | None = None,
) -> ModelVersion:
    """Train the shared model on the pooled ``pairs`` and register it (no stage); its artifact names no tenant."""
    import dataclasses

    from firstmile_inference.warm_start import SHARED_HYPER, train_shared

    hyper = SHARED_HYPER if epochs is None else dataclasses.replace(SHARED_HYPER, epochs=epochs)
    trained = train_shared([share for _, share in pairs], seed=seed, hyper=hyper)
    trained.config["training"] |= {
        "horizon_days": data.horizon.total_seconds() / 86_400,
        "window_days": data.window.total_seconds() / 86_400,
    }
    return registry.register(SHARED_MODEL, weights=trained.state_dict, config=trained.config, metrics=trained.metrics)


def contributed(mv: ModelVersion, share: TenantShare) -> int:
    """How many of a tenant's decisions the version used (after the cap)."""
    return min(share.n, int(mv.config["contributors"]["cap_per_tenant"]))


async def audit_contributors(
    admin_url: str, mv: ModelVersion, pairs: Sequence[tuple[Contributor, TenantShare]]
) -> None:
    """One ``model`` entry in each contributing tenant's log: the version, its decisions used, the pool's size."""
    contributors = mv.config["contributors"]
    for contributor, share in pairs:
        await tm.audit_model_event(admin_url, contributor.tenant_id, f"model:{mv.name}@{mv.version}", {
            "action": AUDIT_ACTION, "model": mv.name, "version": mv.version, "decisions": contributed(mv, share),
            "tenants": contributors["tenants"], "pooled_decisions": mv.config["training"]["decisions"],
        })  # fmt: skip
