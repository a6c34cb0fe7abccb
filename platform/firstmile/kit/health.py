"""Liveness, readiness and the Prometheus scrape endpoint (public, no key)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Request, Response, get
from sqlalchemy import text

from firstmile.kit.errors import ProblemError
from firstmile.kit.telemetry import metrics_payload


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]

    @get("/live", summary="The process is up")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", summary="The process can serve: the database answers")
    async def ready(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        engine = request.app.state.engine
        try:
            async with asyncio.timeout(2.0):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise ProblemError(
                503, "service-unavailable", f"database: {type(exc).__name__}", checks={"database": "down"}
            ) from exc
        return {"status": "ok", "region": request.app.state.settings.region, "checks": {"database": "ok"}}


@get("/metrics", include_in_schema=False, media_type="text/plain; version=0.0.4; charset=utf-8")
async def metrics() -> Response[bytes]:
    return Response(metrics_payload(), media_type="text/plain; version=0.0.4; charset=utf-8")
