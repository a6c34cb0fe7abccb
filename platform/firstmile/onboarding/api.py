"""The onboarding API (tenant apps: `onboarding:write` to start and complete, `onboarding:read` or write to read,
`reviews:write` to set a user's path by hand).

Handlers get the caller's unit of work (``uow``, bound to the principal's tenant) and the
:class:`~firstmile.onboarding.service.OnboardingService` (``onboarding``) by dependency
injection; the service decides what runs in the transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import strict_body
from firstmile.kit.ids import SLUG_RE, SlugPath, UserIdPath, check_id, check_user_id
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.schemas import CompleteRequest, OnboardingState, OverrideRequest, StartRequest
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
        description="Idempotent: completing a completed step returns the unchanged state. 202 when the completion "
        "waits for a person's review instead (a `validation: review` step, or a completion that could not be "
        "decided: docs/review.md): the step is not completed, and its `pending_review` is true.",
        responses={
            202: ResponseSpec(
                OnboardingState,
                description="The completion went to the review queue: the state, the step still open and its review "
                "pending (a step the user's path version does not have: not in the state)",
                generate_examples=False,
            )
        },
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
    ) -> Response[OnboardingState]:
        check_user_id(user_id)
        check_id(step_id, SLUG_RE, "step_id")  # step ids are manifest slugs
        occurred_at = data.occurred_at if data is not None else None
        state = await uow.run(lambda tx: onboarding.complete(tx, user_id, step_id, occurred_at))
        step = next((s for s in state.steps if s.id == step_id), None)
        # not completed and not refused: it waits for a review (of a step not on the user's version: not listed)
        queued = step is None or (not step.completed and step.pending_review)
        return Response(state, status_code=202 if queued else 200)

    @put(
        "/{user_id:str}/path",
        guards=[require_scope("reviews:write")],
        status_code=200,
        summary="Set a user's path by hand",
        description="A manual override: the user moves to the path's current version (keeping the completions of "
        "the steps both have), recorded as the decision with `selected_by: human`, the planner's own choice as "
        "its `shadow`, and audited. A path whose targeting the user does not meet is refused (409) unless `force` "
        "with a `reason`. Needs reviews:write.",
        opt={
            "problems": {
                404: "user-not-found (the user has not started), or path-not-found (no such current path)",
                409: "path-not-eligible: the user does not meet the path's targeting (force it with a reason)",
            }
        },
    )
    async def set_path(
        self,
        request: Request[Principal, Any, Any],
        user_id: UserIdPath,
        data: Annotated[OverrideRequest, Body(description="The path, and force with a reason")],
        uow: NamedDependency[UnitOfWork],
        onboarding: NamedDependency[OnboardingService],
    ) -> OnboardingState:
        check_user_id(user_id)
        data = strict_body(await request.body(), OverrideRequest)  # "true" is not a boolean
        principal = request.user
        return await onboarding.override_user(
            uow, principal.tenant_revision, user_id, data.path_id, actor=principal.actor, force=data.force,
            reason=data.reason,
        )  # fmt: skip
