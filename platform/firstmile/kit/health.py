"""Liveness, readiness and the Prometheus scrape endpoint (public, no key)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.errors import ProblemError
from firstmile.kit.supervisor import Supervisor
from firstmile.kit.telemetry import metrics_payload


class Readiness:
    """Whether this process can serve: the database answers and no background task keeps failing.

    A worker without a pool of its own (the outbox relay holds one connection, a consumer of
    analytics none) passes no engine: its readiness is that of its supervised tasks.
    """

    def __init__(self, engine: AsyncEngine | None, region: str, supervisor: Supervisor | None = None) -> None:
        self.engine = engine
        self.region = region
        self.supervisor = supervisor

    async def check(self) -> dict[str, Any]:
        """The readiness document; a 503 problem naming what is down otherwise."""
        checks: dict[str, Any] = {}
        if self.engine is not None:
            try:
                async with asyncio.timeout(2.0):
                    async with self.engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
            except Exception as exc:
                raise ProblemError(
                    503, "service-unavailable", f"database: {type(exc).__name__}", checks={"database": "down"}
                ) from exc
            checks["database"] = "ok"
        tasks: dict[str, str] = {}
        if self.supervisor is not None:
            tasks = {name: state.summary() for name, state in self.supervisor.states().items()}
            failing = self.supervisor.failing()
            if failing:
                names = ", ".join(sorted(failing))
                raise ProblemError(
                    503, "service-unavailable", f"background task failing: {names}", checks=checks, tasks=tasks
                )
        return {"status": "ok", "region": self.region, "checks": checks, "tasks": tasks}


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]

    @get("/live", summary="The process is up")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/ready",
        summary="The process can serve: the database answers, no background task keeps failing",
        opt={"problems": {503: "service-unavailable: the database is down or a background task keeps failing"}},
    )
    async def ready(self, readiness: NamedDependency[Readiness]) -> dict[str, Any]:
        return await readiness.check()


@get("/metrics", include_in_schema=False, media_type="text/plain; version=0.0.4; charset=utf-8")
async def metrics() -> Response[bytes]:
    return Response(metrics_payload(), media_type="text/plain; version=0.0.4; charset=utf-8")
