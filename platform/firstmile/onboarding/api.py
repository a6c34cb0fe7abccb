"""The onboarding API (tenant apps, API key with ``onboarding:write``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from litestar import Controller, Request, Response, get, post
from litestar.params import Body, FromPath
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.db import run_in_tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding.schemas import (
    USER_ID_MAX_LENGTH,
    USER_ID_PATTERN,
    CompleteRequest,
    OnboardingState,
    StartRequest,
)
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.manifest import SLUG_PATTERN

T = TypeVar("T")
USER_ID_RE = re.compile(USER_ID_PATTERN)
_STEP_ID = re.compile(SLUG_PATTERN)  # step ids are manifest slugs


async def unit_of_work(request: Request[Principal, Any, Any], work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """The request's unit of work, bound to the caller's tenant: committed on success, rolled
    back on error, retried on transient database failures (503 once they persist)."""
    return await run_in_tenant_transaction(request.app.state.engine, request.user.tenant_id, work)


def check_id(value: str, pattern: re.Pattern[str], name: str) -> str:
    """A path parameter id, or 400 ``validation-error`` naming it."""
    if len(value) > USER_ID_MAX_LENGTH or not pattern.match(value):
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
        user = request.user
        outcome = await unit_of_work(
            request, lambda conn: service.start(conn, user.tenant_id, user.tenant_revision, data.user_id, data.traits)
        )
        return Response(outcome.state, status_code=201 if outcome.created else 200)

    @get("/{user_id:str}", summary="A user's onboarding state")
    async def state(self, request: Request[Principal, Any, Any], user_id: FromPath[str]) -> OnboardingState:
        check_id(user_id, USER_ID_RE, "user_id")
        service: OnboardingService = request.app.state.onboarding
        tenant_id = request.user.tenant_id
        return await unit_of_work(request, lambda conn: service.get(conn, tenant_id, user_id))

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
        check_id(user_id, USER_ID_RE, "user_id")
        check_id(step_id, _STEP_ID, "step_id")
        service: OnboardingService = request.app.state.onboarding
        occurred_at = data.occurred_at if data is not None else None
        tenant_id = request.user.tenant_id
        return await unit_of_work(
            request, lambda conn: service.complete(conn, tenant_id, user_id, step_id, occurred_at)
        )
