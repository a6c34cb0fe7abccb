"""All SQL of the experiments slice (its tables: ``experiments``, ``experiment_exposures``)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.experiments.models import experiment_exposures, experiment_looks, experiments
from firstmile.kit.db import TenantTx


@dataclass(frozen=True, slots=True)
class ExperimentRow:
    id: str
    definition: Mapping[str, Any]
    status: str
    approved_by: str | None
    started_by: str | None
    started_at: datetime | None
    planned_end_at: datetime | None
    extensions: int
    stopped_at: datetime | None
    concluded_at: datetime | None
    verdict: Mapping[str, Any] | None


_COLUMNS = (
    experiments.c.id,
    experiments.c.definition,
    experiments.c.status,
    experiments.c.approved_by,
    experiments.c.started_by,
    experiments.c.started_at,
    experiments.c.planned_end_at,
    experiments.c.extensions,
    experiments.c.stopped_at,
    experiments.c.concluded_at,
    experiments.c.verdict,
)


def _row(row: Any) -> ExperimentRow:
    return ExperimentRow(*row)


async def all_experiments(tx: TenantTx) -> list[ExperimentRow]:
    rows = await tx.execute(select(*_COLUMNS).where(experiments.c.tenant_id == tx.tenant).order_by(experiments.c.id))
    return [_row(r) for r in rows]


async def get(tx: TenantTx, experiment_id: str, *, for_update: bool = False) -> ExperimentRow | None:
    query = select(*_COLUMNS).where(experiments.c.tenant_id == tx.tenant, experiments.c.id == experiment_id)
    row = (await tx.execute(query.with_for_update() if for_update else query)).first()
    return _row(row) if row is not None else None


async def insert_draft(tx: TenantTx, experiment_id: str, definition: Mapping[str, Any]) -> bool:
    """A new experiment, as a draft; False when it exists already."""
    result = await tx.execute(
        insert(experiments)
        .values(tenant_id=tx.tenant, id=experiment_id, definition=dict(definition), status="draft")
        .on_conflict_do_nothing()
        .returning(experiments.c.id)
    )
    return result.first() is not None


async def set_definition(tx: TenantTx, experiment_id: str, definition: Mapping[str, Any]) -> None:
    await tx.execute(
        update(experiments)
        .where(experiments.c.tenant_id == tx.tenant, experiments.c.id == experiment_id)
        .values(definition=dict(definition), updated_at=func.now())
    )


async def transition(tx: TenantTx, experiment_id: str, allowed_from: Sequence[str], to: str, **values: Any) -> bool:
    """Move the experiment to ``to`` when its status is one of ``allowed_from``; False otherwise."""
    result = await tx.execute(
        update(experiments)
        .where(
            experiments.c.tenant_id == tx.tenant,
            experiments.c.id == experiment_id,
            experiments.c.status.in_(list(allowed_from)),
        )
        .values(status=to, updated_at=func.now(), **values)
        .returning(experiments.c.id)
    )
    return result.first() is not None


async def set_verdict(tx: TenantTx, experiment_id: str, verdict: Mapping[str, Any]) -> None:
    await tx.execute(
        update(experiments)
        .where(experiments.c.tenant_id == tx.tenant, experiments.c.id == experiment_id)
        .values(verdict=dict(verdict), updated_at=func.now())
    )


async def extend(tx: TenantTx, experiment_id: str, extensions: int, until: datetime) -> bool:
    """One more extension of a running experiment that has had ``extensions``; False when that changed meanwhile."""
    result = await tx.execute(
        update(experiments)
        .where(
            experiments.c.tenant_id == tx.tenant,
            experiments.c.id == experiment_id,
            experiments.c.status == "running",
            experiments.c.extensions == extensions,
        )
        .values(extensions=extensions + 1, planned_end_at=until, updated_at=func.now())
        .returning(experiments.c.id)
    )
    return result.first() is not None


async def running(tx: TenantTx) -> list[ExperimentRow]:
    rows = await tx.execute(
        select(*_COLUMNS)
        .where(experiments.c.tenant_id == tx.tenant, experiments.c.status == "running")
        .order_by(experiments.c.id)
    )
    return [_row(r) for r in rows]


async def insert_exposure(
    tx: TenantTx, experiment_id: str, user_id: str, variant: str, at: datetime, inputs: Mapping[str, Any]
) -> bool:
    """The user's exposure to the experiment; False when one is recorded already (it stays what it was)."""
    result = await tx.execute(
        insert(experiment_exposures)
        .values(
            tenant_id=tx.tenant,
            experiment_id=experiment_id,
            user_id=user_id,
            variant=variant,
            exposed_at=at,
            inputs=dict(inputs),
        )
        .on_conflict_do_nothing()
        .returning(experiment_exposures.c.user_id)
    )
    return result.first() is not None


async def user_exposures(tx: TenantTx, user_id: str, experiment_ids: list[str]) -> dict[str, str]:
    """The variants the user was exposed to, of ``experiment_ids``, by experiment."""
    rows = await tx.execute(
        select(experiment_exposures.c.experiment_id, experiment_exposures.c.variant).where(
            experiment_exposures.c.tenant_id == tx.tenant,
            experiment_exposures.c.experiment_id.in_(experiment_ids),
            experiment_exposures.c.user_id == user_id,
        )
    )
    return {str(r[0]): str(r[1]) for r in rows}


async def exposure(tx: TenantTx, experiment_id: str, user_id: str) -> str | None:
    """The variant the user was exposed to, or None."""
    row = (
        await tx.execute(
            select(experiment_exposures.c.variant).where(
                experiment_exposures.c.tenant_id == tx.tenant,
                experiment_exposures.c.experiment_id == experiment_id,
                experiment_exposures.c.user_id == user_id,
            )
        )
    ).first()
    return str(row[0]) if row is not None else None


async def exposure_counts(tx: TenantTx, experiment_id: str) -> dict[str, int]:
    rows = await tx.execute(
        select(experiment_exposures.c.variant, func.count())
        .where(experiment_exposures.c.tenant_id == tx.tenant, experiment_exposures.c.experiment_id == experiment_id)
        .group_by(experiment_exposures.c.variant)
    )
    return {str(variant): int(count) for variant, count in rows}


async def exposures_of(tx: TenantTx, user_id: str) -> list[tuple[str, str, datetime]]:
    """The user's exposures, oldest first: (experiment, variant, exposed at)."""
    rows = await tx.execute(
        select(experiment_exposures.c.experiment_id, experiment_exposures.c.variant, experiment_exposures.c.exposed_at)
        .where(experiment_exposures.c.tenant_id == tx.tenant, experiment_exposures.c.user_id == user_id)
        .order_by(experiment_exposures.c.exposed_at, experiment_exposures.c.experiment_id)
    )
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


async def delete_user(tx: TenantTx, user_id: str) -> dict[str, int]:
    """Delete the user's exposures (an erasure); how many rows."""
    result = await tx.execute(
        experiment_exposures.delete().where(
            experiment_exposures.c.tenant_id == tx.tenant, experiment_exposures.c.user_id == user_id
        )
    )
    return {"experiment_exposures": int(result.rowcount or 0)}


async def running_tenants(conn: AsyncConnection) -> list[uuid.UUID]:
    """Tenants with a running experiment (through the SECURITY DEFINER function of migration 0019)."""
    return [r[0] for r in await conn.execute(text("SELECT tenant_id FROM firstmile_running_experiment_tenants()"))]


async def record_look(tx: TenantTx, *, experiment_id: str, day: int, at: datetime, look: Mapping[str, Any]) -> bool:
    """The day's look at the experiment; False when the day has one already (the first look of a day stays)."""
    result = await tx.execute(
        insert(experiment_looks)
        .values(tenant_id=tx.tenant, experiment_id=experiment_id, day=day, looked_at=at, look=dict(look))
        .on_conflict_do_nothing()
        .returning(experiment_looks.c.day)
    )
    return result.first() is not None


async def looks(tx: TenantTx, experiment_id: str) -> list[tuple[int, Mapping[str, Any]]]:
    """The experiment's daily looks, oldest first."""
    rows = await tx.execute(
        select(experiment_looks.c.day, experiment_looks.c.look)
        .where(experiment_looks.c.tenant_id == tx.tenant, experiment_looks.c.experiment_id == experiment_id)
        .order_by(experiment_looks.c.day)
    )
    return [(int(day), look) for day, look in rows]
