"""Data-subject requests (API key with ``users:admin``): erase, export, look up by email."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get
from litestar.params import FromPath, FromQuery
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.analytics.queries import build_user_events
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.db import run_in_tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding.api import USER_ID_RE, check_id
from firstmile.onboarding.pii import valid_email
from firstmile.privacy import service


def _user_id(value: str) -> str:
    return check_id(value, USER_ID_RE, "user_id")


def _actor(principal: Principal) -> str:
    return principal.actor


class ErasureResult(msgspec.Struct):
    user_id: str
    key_destroyed: bool
    rows_deleted: dict[str, int]
    event_id: str
    audit_seq: int
    downstream: str = "the user.erased event is on its way to analytics and features"


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
    )
    async def erase(self, request: Request[Principal, Any, Any], user_id: FromPath[str]) -> Response[ErasureResult]:
        _user_id(user_id)
        principal = request.user
        keyring = request.app.state.keyring

        async def work(conn: AsyncConnection) -> service.Erasure | None:
            return await service.erase(conn, keyring, principal.tenant_id, user_id, _actor(principal))

        done = await run_in_tenant_transaction(request.app.state.engine, principal.tenant_id, work)
        if done is None:
            raise ProblemError(404, "user-not-found", f"nothing is held about user {user_id!r}")
        return Response(
            ErasureResult(done.user_id, done.key_destroyed, done.rows_deleted, str(done.event_id), done.audit_seq),
            status_code=202,
        )

    @get("/{user_id:str}/export", summary="Export everything held about a user (GDPR art. 15/20)")
    async def export(self, request: Request[Principal, Any, Any], user_id: FromPath[str]) -> dict[str, Any]:
        _user_id(user_id)
        principal = request.user
        keyring = request.app.state.keyring

        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            return await service.export(conn, keyring, principal.tenant_id, user_id, _actor(principal))

        document = await run_in_tenant_transaction(request.app.state.engine, principal.tenant_id, work)
        if document is None:
            raise ProblemError(404, "user-not-found", f"nothing is held about user {user_id!r}")
        query = build_user_events(principal.tenant_id, user_id)
        store = request.app.state.analytics_store
        document["events"] = await asyncio.to_thread(store.query, query.sql, query.params)
        return document

    @get("/", summary="Find users by email (keyed blind index; the email is never stored in clear)")
    async def lookup(self, request: Request[Principal, Any, Any], email: FromQuery[str]) -> dict[str, list[str]]:
        if not valid_email(email):
            raise ProblemError(
                400,
                "validation-error",
                "not an email address (at email)",
                errors=[{"key": "email", "message": "not an email address", "source": "query"}],
            )
        principal = request.user
        keyring = request.app.state.keyring

        async def work(conn: AsyncConnection) -> list[str]:
            return await service.lookup_by_email(conn, keyring, principal.tenant_id, email)

        return {"user_ids": await run_in_tenant_transaction(request.app.state.engine, principal.tenant_id, work)}
