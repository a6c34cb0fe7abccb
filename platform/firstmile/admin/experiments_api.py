"""The experiment manager's API under ``/admin/api/experiments`` (behind the admin session and its guard).

Roles as elsewhere: everyone signed in sees experiments (``experiments:read``); an editor drafts, starts
and stops them (``experiments:write``); an owner approves them (``experiments:approve``). Every change is
an ``experiment`` audit entry naming the admin; a change the lifecycle does not allow (start without
approval, approve twice, …) is ``409 experiment-state`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from pydantic import ValidationError

from firstmile.admin.rbac import Permission
from firstmile.admin.sessions import AdminSession
from firstmile.analytics.service import AnalyticsService
from firstmile.experiments import service as experiments
from firstmile.experiments.analysis import analyse
from firstmile.experiments.service import ExperimentRow
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import SLUG_RE, check_id
from firstmile.kit.uow import UnitOfWork
from firstmile.tenancy.manifest import ExperimentSpec


def _actor(request: Request[Any, Any, Any]) -> str:
    session = request.user
    assert isinstance(session, AdminSession)
    return f"admin:{session.subject}"


def experiment_view(row: ExperimentRow, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """An experiment as the API and the experiment manager's pages show it."""

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "status": row.status,
        "definition": dict(row.definition),
        "approved_by": row.approved_by,
        "started_by": row.started_by,
        "started_at": iso(row.started_at),
        "planned_end_at": iso(row.planned_end_at),
        "extensions": row.extensions,
        "stopped_at": iso(row.stopped_at),
        "concluded_at": iso(row.concluded_at),
        "verdict": dict(row.verdict) if row.verdict is not None else None,
        "exposures": counts or {},
    }


async def _change(uow: UnitOfWork, work: Any) -> dict[str, Any]:
    try:
        row: ExperimentRow = await uow.run(work)
    except experiments.ExperimentError as exc:
        raise ProblemError(exc.status, exc.slug, exc.detail) from exc
    return experiment_view(row)


Action = Callable[[TenantTx, str, datetime], Awaitable[ExperimentRow]]
"""A lifecycle change of one experiment: given the transaction, the acting admin and the time."""


async def _act(request: Request[Any, Any, Any], uow: UnitOfWork, experiment_id: str, action: Action) -> dict[str, Any]:
    """Check the id, then run ``action`` as the signed-in admin; an :class:`ExperimentError` becomes its problem."""
    check_id(experiment_id, SLUG_RE, "experiment_id")
    actor, now = _actor(request), datetime.now(UTC)
    return await _change(uow, lambda tx: action(tx, actor, now))


class ExperimentsAdminController(Controller):
    path = "/admin/api/experiments"
    tags = ["admin"]

    @get(
        summary="The tenant's experiments, their status and exposures", opt={"permission": Permission.EXPERIMENTS_READ}
    )
    async def list_experiments(self, uow: NamedDependency[UnitOfWork]) -> list[dict[str, Any]]:
        async def work(tx: TenantTx) -> list[dict[str, Any]]:
            rows = await experiments.experiments(tx)
            return [experiment_view(r, await experiments.exposure_counts(tx, r.id)) for r in rows]

        return await uow.run(work)

    @post(summary="Draft an experiment", status_code=201, opt={"permission": Permission.EXPERIMENTS_WRITE})
    async def draft(self, request: Request[Any, Any, Any], uow: NamedDependency[UnitOfWork]) -> dict[str, Any]:
        try:
            spec = ExperimentSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            errors = [{"key": ".".join(str(p) for p in e["loc"]), "message": e["msg"], "source": "body"}
                      for e in exc.errors()]  # fmt: skip
            first = errors[0] if errors else {"key": "", "message": "invalid"}
            raise ProblemError(400, "validation-error", f"{first['message']} (at {first['key']})",
                               errors=errors) from None  # fmt: skip
        actor = _actor(request)

        return await _change(uow, lambda tx: experiments.draft(tx, spec, actor))

    @post("/{experiment_id:str}/approve", summary="Approve a draft (owner)", status_code=200,
          opt={"permission": Permission.EXPERIMENTS_APPROVE})  # fmt: skip
    async def approve(
        self, request: Request[Any, Any, Any], experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork]
    ) -> dict[str, Any]:
        return await _act(
            request, uow, experiment_id, lambda tx, actor, _: experiments.approve(tx, experiment_id, actor)
        )

    @post("/{experiment_id:str}/start", summary="Start an approved experiment", status_code=200,
          opt={"permission": Permission.EXPERIMENTS_WRITE})  # fmt: skip
    async def start(
        self, request: Request[Any, Any, Any], experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork]
    ) -> dict[str, Any]:
        return await _act(
            request, uow, experiment_id, lambda tx, actor, now: experiments.start(tx, experiment_id, actor, now)
        )

    @post("/{experiment_id:str}/stop", summary="Stop a running experiment", status_code=200,
          opt={"permission": Permission.EXPERIMENTS_WRITE})  # fmt: skip
    async def stop(
        self, request: Request[Any, Any, Any], experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork]
    ) -> dict[str, Any]:
        return await _act(
            request, uow, experiment_id, lambda tx, actor, now: experiments.stop(tx, experiment_id, actor, now)
        )

    @get("/{experiment_id:str}/results", summary="An experiment's results and the verdict of this look",
         opt={"permission": Permission.EXPERIMENTS_READ})  # fmt: skip
    async def results(
        self, experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
    ) -> dict[str, Any]:  # fmt: skip
        row = await _existing(uow, experiment_id)
        return (await analyse(analytics, uow.tenant, row, datetime.now(UTC))).as_dict()

    @post("/{experiment_id:str}/declare", summary="Conclude with the winner the analysis found", status_code=200,
          opt={"permission": Permission.EXPERIMENTS_WRITE})  # fmt: skip
    async def declare(
        self, request: Request[Any, Any, Any], experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork],
        analytics: NamedDependency[AnalyticsService],
    ) -> dict[str, Any]:  # fmt: skip
        row = await _existing(uow, experiment_id)
        now, actor = datetime.now(UTC), _actor(request)
        result = await analyse(analytics, uow.tenant, row, now)
        verdict = result.verdict | {"arms": result.arms, "srm": result.srm, "computed_at": result.computed_at}
        return await _change(uow, lambda tx: experiments.declare(tx, experiment_id, actor, now, verdict))

    @post("/{experiment_id:str}/promote", summary="Make the declared winner the control audience's path (owner)",
          status_code=200, opt={"permission": Permission.EXPERIMENTS_APPROVE})  # fmt: skip
    async def promote(
        self, request: Request[Any, Any, Any], experiment_id: FromPath[str], uow: NamedDependency[UnitOfWork]
    ) -> dict[str, Any]:
        return await _act(
            request, uow, experiment_id, lambda tx, actor, _: experiments.promote(tx, experiment_id, actor)
        )


async def _existing(uow: UnitOfWork, experiment_id: str) -> ExperimentRow:
    check_id(experiment_id, SLUG_RE, "experiment_id")
    row = await uow.run(lambda tx: experiments.experiment(tx, experiment_id))
    if row is None:
        raise ProblemError(404, "experiment-not-found", f"no experiment {experiment_id!r}")
    return row
