"""The onboarding API (tenant apps: `onboarding:write` to start and complete, `onboarding:read` or write to read).

Handlers get the caller's unit of work (``uow``, bound to the principal's tenant) and the
:class:`~firstmile.onboarding.service.OnboardingService` (``onboarding``) by dependency
injection; the service decides what runs in the transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.ids import SLUG_RE, SlugPath, UserIdPath, check_id, check_user_id
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.schemas import CompleteRequest, OnboardingState, StartRequest
from firstmile.onboarding.service import OnboardingService


class OnboardingController(Controller):
    path = "/v1/onboarding"
    tags = ["onboarding"]

    @post(
        "/start",
        guards=[require_scope("onboarding:write")],
        status_code=201,
        summary="Start a user's onboarding",
        description="Chooses a path for the user and returns its state: 201 when new, "
        "200 with the existing state when the user already started.",
        responses={
            200: ResponseSpec(
                OnboardingState,
                description="The user had already started: the existing state, unchanged",
                generate_examples=False,
            )
        },
        opt={"problems": {503: "key-provider-unavailable (personal traits cannot be sealed) or the database"}},
    )
    async def start(
        self,
        request: Request[Principal, Any, Any],
        data: Annotated[StartRequest, Body(description="The user and their traits")],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> Response[OnboardingState]:
        outcome = await onboarding.start(uow, request.user.tenant_revision, data.user_id, data.traits)
        return Response(outcome.state, status_code=201 if outcome.created else 200)

    @get(
        "/{user_id:str}",
        guards=[require_scope("onboarding:read", "onboarding:write")],
        summary="A user's onboarding state",
        description="Needs onboarding:read (a key that only shows a checklist) or onboarding:write.",
        opt={"problems": {404: "user-not-found: the user has not started onboarding"}},
    )
    async def state(
        self, user_id: UserIdPath, uow: NamedDependency[UnitOfWork], onboarding: NamedDependency[OnboardingService]
    ) -> OnboardingState:
        check_user_id(user_id)
        return await uow.run(lambda tx: onboarding.get(tx, user_id))

    @post(
        "/{user_id:str}/steps/{step_id:str}/complete",
        guards=[require_scope("onboarding:write")],
        status_code=200,
        summary="Complete a step",
        description="Idempotent: completing a completed step returns the unchanged state.",
        opt={
            "problems": {
                404: "user-not-found, or step-not-found (not a step of the user's path version)",
                409: "step-prerequisites-unmet (missing names the steps to complete first)",
            }
        },
    )
    async def complete(
        self,
        user_id: UserIdPath,
        step_id: SlugPath,
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
        data: Annotated[CompleteRequest | None, Body(description="Optional: when it happened")] = None,
    ) -> OnboardingState:
        check_user_id(user_id)
        check_id(step_id, SLUG_RE, "step_id")  # step ids are manifest slugs
        occurred_at = data.occurred_at if data is not None else None
        return await uow.run(lambda tx: onboarding.complete(tx, user_id, step_id, occurred_at))
