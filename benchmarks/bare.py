"""The baseline of ``python -m benchmarks api``: a bare Litestar app with one JSON POST endpoint.

Served exactly like the real API (uvicorn, same worker count, access log off)
so the ratio start-rps / bare-rps shows what the platform costs on top of the
framework: auth, middleware, telemetry, validation and PostgreSQL.

    uvicorn benchmarks.bare:app --workers 2 --no-access-log   # from the repository root
"""

from __future__ import annotations

import msgspec
from litestar import Litestar, get, post


class BareRequest(msgspec.Struct):
    """The same body the benchmark sends to ``POST /v1/onboarding/start``."""

    user_id: str
    traits: dict[str, str | int | float | bool | None] = msgspec.field(default_factory=dict)


class BareResponse(msgspec.Struct):
    user_id: str
    status: str


@post("/v1/bare/start", status_code=201)
async def bare_start(data: BareRequest) -> BareResponse:
    """Decode the JSON body, return a small JSON object: no auth, no database."""
    return BareResponse(user_id=data.user_id, status="in_progress")


@get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar(route_handlers=[bare_start, live], debug=False)
