"""The embed API (``/v1/embed``): the embed SDK's checklist and in-app messages of the one user a browser speaks for.

Only a publishable key reaches it (scope ``embed``); the ``auth`` slice has checked the request's origin
against the key's and the identity token, so ``request.user.user_id`` is the user, and no handler takes
a user id from the client. CORS: :mod:`firstmile.embed.cors`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from firstmile.embed.schemas import Checklist
from firstmile.embed.service import EmbedService
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import UUID_PATTERN, UUID_RE, check_id
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.schemas import InAppMessage, InAppMessageList
from firstmile.tenancy.keys import EMBED_SCOPE

_EMBED = [require_scope(EMBED_SCOPE)]
_AUTH_PROBLEMS = {
    401: "invalid-identity (a missing, forged, expired or too long-lived identity token; `reason` says which), "
    "or unauthenticated (an unknown or revoked publishable key)",
    403: "origin-not-allowed (the request's Origin is not one of the key's), or forbidden (not a publishable key)",
}
_NO_USER = {**_AUTH_PROBLEMS, 404: "user-not-found: the user has not started onboarding"}
_NO_MESSAGE = {**_AUTH_PROBLEMS, 404: "message-not-found: not a delivered in-app message of this user"}
SendIdPath = Annotated[
    str,
    PathParameter(
        description="The message's `send_id` (a UUID)",
        schema_extra={"pattern": UUID_PATTERN, "min_length": 36, "max_length": 36},
    ),
]
MessageLimit = Annotated[int, QueryParameter(description="At most this many messages, 1 to 100", ge=1, le=100)]
_json = msgspec.json.Encoder()
EmbedRequest = Request[Principal, Any, Any]


def _user(request: EmbedRequest) -> str:
    user = request.user.user_id
    if user is None:  # a secret key or a token never has a user; the guard admits only publishable keys
        raise ProblemError(403, "forbidden", "the embed API takes a publishable key with an identity token")
    return user


async def _events(
    items: AsyncIterator[Checklist | InAppMessage | str], retry_ms: int
) -> AsyncIterator[ServerSentEventMessage]:
    async for item in items:
        if isinstance(item, str):
            yield ServerSentEventMessage(data=None, comment=item, retry=retry_ms if item == "open" else None)
        elif isinstance(item, Checklist):
            yield ServerSentEventMessage(data=_json.encode(item).decode(), event="checklist")
        else:
            yield ServerSentEventMessage(data=_json.encode(item).decode(), event="message", id=str(item.send_id))


class EmbedController(Controller):
    path = "/v1/embed"
    tags = ["embed"]
    guards = _EMBED

    @get(
        "/checklist",
        summary="The user's checklist (embed SDK)",
        description="The path, progress and each step `completed`, `available` or `locked` (with `waiting_for`) of "
        "the user the identity token names. Needs a publishable key from one of its origins and "
        "`X-Firstmile-Identity`.",
        opt={"problems": _NO_USER},
    )
    async def checklist(
        self, request: EmbedRequest, uow: NamedDependency[UnitOfWork], embed: NamedDependency[EmbedService]
    ) -> Checklist:
        user = _user(request)
        return await uow.run(lambda tx: embed.checklist(tx, user))

    @get(
        "/messages",
        summary="The user's in-app messages (embed SDK)",
        description="Delivered and not dismissed, newest first.",
        opt={"problems": _NO_USER},
    )
    async def messages(
        self,
        request: EmbedRequest,
        uow: NamedDependency[UnitOfWork],
        embed: NamedDependency[EmbedService],
        limit: MessageLimit = 20,
    ) -> InAppMessageList:
        user = _user(request)
        return await uow.run(lambda tx: embed.messages(tx, user, limit))

    @get(
        "/stream",
        summary="The user's checklist and in-app messages, live (Server-Sent Events)",
        description="`text/event-stream`: `event: checklist` (the checklist, first and at each change), then "
        "`: open` (with `retry`), then `event: message` (`id:` the send_id) for each message not yet seen and "
        "each new one; `: keep-alive` while idle. The server ends the stream after "
        "FIRSTMILE_NUDGE_STREAM_SECONDS; the SDK reconnects.",
        media_type="text/event-stream",
        opt={"problems": _NO_USER},
    )
    async def stream(
        self, request: EmbedRequest, uow: NamedDependency[UnitOfWork], embed: NamedDependency[EmbedService]
    ) -> ServerSentEvent:
        user = _user(request)
        await uow.run(lambda tx: embed.checklist(tx, user))  # a 404 now: once streaming, it could not be said
        return ServerSentEvent(_events(embed.stream(uow, user), embed.retry_ms))

    @post(
        "/messages/{send_id:str}/seen",
        status_code=204,
        summary="Mark an in-app message seen (embed SDK)",
        description="The SDK showed the message: the first time records `seen_at` and a `nudge.opened` event.",
        opt={"problems": _NO_MESSAGE},
    )
    async def seen(
        self,
        request: EmbedRequest,
        send_id: SendIdPath,
        uow: NamedDependency[UnitOfWork],
        embed: NamedDependency[EmbedService],
    ) -> None:
        await embed.seen(uow, _user(request), _send_id(send_id))

    @post(
        "/messages/{send_id:str}/dismiss",
        status_code=204,
        summary="Dismiss an in-app message (embed SDK)",
        description="The user dismissed the message: it leaves the list and the stream.",
        opt={"problems": _NO_MESSAGE},
    )
    async def dismiss(
        self,
        request: EmbedRequest,
        send_id: SendIdPath,
        uow: NamedDependency[UnitOfWork],
        embed: NamedDependency[EmbedService],
    ) -> None:
        await embed.dismiss(uow, _user(request), _send_id(send_id))


def _send_id(value: str) -> uuid.UUID:
    return uuid.UUID(check_id(value, UUID_RE, "send_id"))


SCRIPT = "firstmile.js"
"""The SDK's bundle in this package, built by ``make web`` from ``sdk/embed`` (not in git)."""


@cache
def _script() -> bytes | None:
    found = resources.files("firstmile.embed").joinpath(SCRIPT)
    return found.read_bytes() if found.is_file() else None


class EmbedScriptController(Controller):
    """The SDK itself, for the tenant's ``<script src>`` (public: it is the same for everyone)."""

    path = "/embed/v1"
    tags = ["embed"]

    @get(
        "/firstmile.js",
        summary="The embed SDK",
        description="The bundled SDK a tenant's page loads with one script tag (docs/embed.md).",
        media_type="text/javascript",
        opt={"exclude_from_auth": True, "problems": {404: "not-found: this build has no SDK bundle (make web)"}},
    )
    async def script(self) -> Response[bytes]:
        body = _script()
        if body is None:
            raise ProblemError(404, "not-found", "this build has no embed SDK bundle: run `make web`")
        headers = {"Cache-Control": "public, max-age=300", "Cross-Origin-Resource-Policy": "cross-origin",
                   "X-Content-Type-Options": "nosniff"}  # fmt: skip
        return Response(body, media_type="text/javascript; charset=utf-8", headers=headers)


__all__ = ["EmbedController", "EmbedScriptController"]
