"""``make run``'s demo experiment: a running experiment between two demo paths with synthetic results.

:func:`seed_demo_experiment` drafts, approves and starts (as ``operator:demo``, audited like any other)
``demo-quickstart-vs-analytics`` for the demo tenant's developers (half of them: 50% traffic), started ten
days ago, and writes synthetic exposures and activations of 3,000 users to the analytics store, the
variant activating more (about 44% against 32%), so the experiment manager's result page shows a verdict
at once. Users started through the API meanwhile are allocated into it for real. Never for a real
tenant: ``firstmile dev`` calls it for the demo tenant only, and it does nothing when the experiment
exists already.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta

from firstmile.analytics.rows import ACTIVATED, EXPOSED, AnalyticsEvent
from firstmile.analytics.store import AnalyticsStore
from firstmile.experiments import repository as repo
from firstmile.experiments import service
from firstmile.kit.db import TenantTx
from firstmile.tenancy.manifest import ExperimentSpec

DEMO_EXPERIMENT = "demo-quickstart-vs-analytics"
ACTOR = "operator:demo"
USERS = 3_000
RATES = {"quickstart": 0.32, "analytics": 0.44}


def demo_spec() -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "id": DEMO_EXPERIMENT,
            "description": "Demo: developers on the quickstart against the product-analytics path (synthetic data).",
            "control": "quickstart",
            "variants": [
                {"name": "quickstart", "path": "developer-quickstart"},
                {"name": "analytics", "path": "product-analytics"},
            ],
            "targeting": [{"field": "persona", "op": "eq", "value": "developer"}],
            "traffic_percent": 50,
        }
    )


async def start_demo_experiment(tx: TenantTx, now: datetime) -> datetime | None:
    """Draft, approve and start the demo experiment (started ten days before ``now``); None when it exists."""
    if await repo.get(tx, DEMO_EXPERIMENT) is not None:
        return None
    began = now - timedelta(days=10)
    await service.draft(tx, demo_spec(), ACTOR)
    await service.approve(tx, DEMO_EXPERIMENT, ACTOR)
    await service.start(tx, DEMO_EXPERIMENT, ACTOR, began)
    return began


def demo_results(tenant_id: uuid.UUID, began: datetime, seed: int = 16) -> list[AnalyticsEvent]:
    """Synthetic exposures (alternating variants, spread over the days since ``began``) and activations."""
    rng = random.Random(seed)
    rows: list[AnalyticsEvent] = []
    for i in range(USERS):
        variant = "analytics" if i % 2 else "quickstart"
        user = f"demo-exp-{i:05d}"
        exposed = began + timedelta(seconds=rng.uniform(60, 9 * 86_400))
        path = "product-analytics" if variant == "analytics" else "developer-quickstart"
        rows.append(
            AnalyticsEvent(tenant_id=tenant_id, event_id=uuid.uuid5(tenant_id, f"{user}:exposed"), event_type=EXPOSED,
                           event_name=DEMO_EXPERIMENT, user_id=user, anonymous_id="", occurred_at=exposed,
                           received_at=exposed, path_key=path, variant=variant)
        )  # fmt: skip
        if rng.random() < RATES[variant]:
            done = exposed + timedelta(hours=rng.uniform(0.2, 30))
            rows.append(AnalyticsEvent(tenant_id=tenant_id, event_id=uuid.uuid5(tenant_id, f"{user}:activated"),
                                       event_type=ACTIVATED, event_name="", user_id=user, anonymous_id="",
                                       occurred_at=done, received_at=done, path_key=path))  # fmt: skip
    return rows


def seed_demo_results(store: AnalyticsStore, tenant_id: uuid.UUID, began: datetime) -> int:
    """Write :func:`demo_results` to the analytics store; how many rows."""
    return store.insert(demo_results(tenant_id, began))
