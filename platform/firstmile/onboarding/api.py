"""The onboarding API (tenant apps, API key with ``onboarding:write``)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.params import Body, FromPath
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.db import tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding.schemas import CompleteRequest, OnboardingState, StartRequest
from firstmile.onboarding.service import OnboardingService

_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,127}$")
_STEP_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}[a-z0-9]$")


@asynccontextmanager
async def request_transaction(request: Request[Principal, Any, Any]) -> AsyncIterator[AsyncConnection]:
    """The request's unit of work, bound to the caller's tenant: commit on success, else roll back."""
    async with tenant_transaction(request.app.state.engine, request.user.tenant_id) as conn:
        yield conn


def _check(value: str, pattern: re.Pattern[str], name: str) -> str:
    if not pattern.match(value):
        raise ProblemError(
            400,
            "validation-error",
            f"{name} {value[:140]!r} is not a valid id (at {name})",
            errors=[{"key": name, "message": "invalid id", "source": "path"}],
        )
    return value


class OnboardingController(Controller):
    path = "/v1/onboarding"
    tags = ["onboarding"]
    guards = [require_scope("onboarding:write")]

    @post(
        "/start",
        status_code=201,
        summary="Start a user's onboarding",
        description="Chooses a path for the user and returns its state: 201 when new, "
        "200 with the existing state when the user already started.",
    )
    async def start(
        self,
        request: Request[Principal, Any, Any],
        data: Annotated[StartRequest, Body(description="The user and their traits")],
    ) -> Response[OnboardingState]:
        service: OnboardingService = request.app.state.onboarding
        async with request_transaction(request) as conn:
            outcome = await service.start(
                conn, request.user.tenant_id, request.user.tenant_revision, data.user_id, data.traits
            )
        return Response(outcome.state, status_code=201 if outcome.created else 200)

    @get("/{user_id:str}", summary="A user's onboarding state")
    async def state(self, request: Request[Principal, Any, Any], user_id: FromPath[str]) -> OnboardingState:
        _check(user_id, _USER_ID, "user_id")
        service: OnboardingService = request.app.state.onboarding
        async with request_transaction(request) as conn:
            return await service.get(conn, request.user.tenant_id, user_id)

    @post(
        "/{user_id:str}/steps/{step_id:str}/complete",
        status_code=200,
        summary="Complete a step",
        description="Idempotent: completing a completed step returns the unchanged state.",
    )
    async def complete(
        self,
        request: Request[Principal, Any, Any],
        user_id: FromPath[str],
        step_id: FromPath[str],
        data: Annotated[CompleteRequest | None, Body(description="Optional: when it happened")] = None,
    ) -> OnboardingState:
        _check(user_id, _USER_ID, "user_id")
        _check(step_id, _STEP_ID, "step_id")
        service: OnboardingService = request.app.state.onboarding
        occurred_at = data.occurred_at if data is not None else None
        async with request_transaction(request) as conn:
            return await service.complete(conn, request.user.tenant_id, user_id, step_id, occurred_at)
