"""Data-subject requests (API key with ``users:admin``): erase, export, look up by email."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get
from litestar.di import NamedDependency
from litestar.params import FromQuery

from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import UserIdPath, check_user_id
from firstmile.kit.uow import UnitOfWork
from firstmile.privacy.service import PrivacyService
from firstmile.security.personal_data import valid_email


class ErasureResult(msgspec.Struct):
    user_id: str
    key_destroyed: bool
    rows_deleted: dict[str, int]
    event_id: str
    audit_entry_id: str
    """The erasure's audit entry (``GET /v1/audit/entries/{id}/proof``; sequenced within the merge delay)."""
    downstream: str = "the user.erased event is on its way to analytics and features"


def nothing_held(user_id: str) -> ProblemError:
    return ProblemError(404, "user-not-found", f"nothing is held about user {user_id!r}")


class UsersController(Controller):
    path = "/v1/users"
    tags = ["users"]
    guards = [require_scope("users:admin")]

    @delete(
        "/{user_id:str}",
        status_code=202,
        summary="Erase a user (GDPR art. 17, CCPA)",
        description="Destroys the user's key (crypto-shredding), deletes their rows, emits user.erased for "
        "downstream stores, and audits it, in one transaction. 404 when nothing is held about the user.",
        opt={"problems": {404: "user-not-found: nothing is held about the user"}},
    )
    async def erase(
        self,
        request: Request[Principal, Any, Any],
        user_id: UserIdPath,
        uow: NamedDependency[UnitOfWork],
        privacy: NamedDependency[PrivacyService],
    ) -> Response[ErasureResult]:
        check_user_id(user_id)
        done = await privacy.erase(uow, user_id, request.user.actor)
        if done is None:
            raise nothing_held(user_id)
        return Response(
            ErasureResult(
                done.user_id, done.key_destroyed, done.rows_deleted, str(done.event_id), str(done.audit_entry_id)
            ),
            status_code=202,
        )

    @get(
        "/{user_id:str}/export",
        summary="Export everything held about a user (GDPR art. 15/20)",
        description="The profile with personal data decrypted, onboarding progress, whether a personal-data key "
        "exists, the audit entries about the user and their analytics events. 404 when nothing is held; 503 "
        "(nothing exported, not audited) when the analytics store cannot answer in time.",
        opt={
            "problems": {
                404: "user-not-found: nothing is held about the user",
                503: "analytics-unavailable or key-provider-unavailable: nothing was exported",
            }
        },
    )
    async def export(
        self,
        request: Request[Principal, Any, Any],
        user_id: UserIdPath,
        uow: NamedDependency[UnitOfWork],
        privacy: NamedDependency[PrivacyService],
    ) -> dict[str, Any]:
        check_user_id(user_id)
        document = await privacy.export(uow, user_id, request.user.actor)
        if document is None:
            raise nothing_held(user_id)
        return document

    @get(
        "/",
        summary="Find users by email (keyed blind index; the email is never stored in clear)",
        opt={"problems": {503: "key-provider-unavailable: the blind-index key cannot be unwrapped"}},
    )
    async def lookup(
        self, email: FromQuery[str], uow: NamedDependency[UnitOfWork], privacy: NamedDependency[PrivacyService]
    ) -> dict[str, list[str]]:
        if not valid_email(email):
            raise ProblemError(
                400,
                "validation-error",
                "not an email address (at email)",
                errors=[{"key": "email", "message": "not an email address", "source": "query"}],
            )
        return {"user_ids": await privacy.lookup_by_email(uow, email)}
