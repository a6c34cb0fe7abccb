"""The links in a nudge: the tracked link and the one-click unsubscribe (public: the signed link is the credential).

``GET /v1/nudges/l/{token}`` records a click and says where to continue. ``GET /v1/nudges/u/{token}``
shows a confirmation page whose button posts to ``POST /v1/nudges/u/{token}``, the RFC 8058
one-click unsubscribe that mail clients call from the ``List-Unsubscribe-Post`` header (a GET never
unsubscribes: mail scanners follow links). A link that was not issued here, or not for that, is
a 404 problem.

``/v1/users/{user_id}/messages`` are the user's in-app messages (a tenant API key:
``onboarding:read`` or ``onboarding:write`` to read, ``onboarding:write`` to mark seen or
dismissed): the list, the live stream (Server-Sent Events) and the two marks (nudges/inapp.py).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from html import escape
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put, route
from litestar.di import NamedDependency
from litestar.enums import HttpMethod
from litestar.params import Body, PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from firstmile.kit.auth import require_scope
from firstmile.kit.errors import ProblemError, strict_body
from firstmile.kit.ids import UUID_PATTERN, UUID_RE, UserIdPath, check_id, check_user_id
from firstmile.kit.uow import UnitOfWork
from firstmile.nudges.inapp import OPEN, InAppInbox, Watched
from firstmile.nudges.links import UNSUBSCRIBE, BadLinkError
from firstmile.nudges.schemas import (
    ConsentIn,
    ConsentList,
    ConsentOut,
    InAppMessage,
    InAppMessageList,
    PushSubscriptionIn,
    PushSubscriptionOut,
)
from firstmile.nudges.service import (
    InvalidSubscriptionError,
    NudgeLinks,
    NudgeWebhooks,
    PushNotConfiguredError,
    PushSubscriptions,
    UnknownUserError,
    consents,
    set_consent,
)
from firstmile.nudges.webhooks import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, TWILIO_SIGNATURE, WebhookRefusedError

log = logging.getLogger("firstmile.nudges.webhooks")

_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
    'content="width=device-width, initial-scale=1"><title>{title}</title></head>'
    '<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; padding: 0 1rem">'
    '<h1 style="font-size: 1.4rem">{title}</h1>{body}</body></html>'
)
LinkToken = Annotated[
    str,
    PathParameter(
        description="The signed link from the message",
        schema_extra={"pattern": "^[A-Za-z0-9_-]{60,80}$", "min_length": 60, "max_length": 80},
    ),
]


_PUBLIC = {"exclude_from_auth": True, "problems": {404: "link-not-found: not a link of a nudge sent here"}}


def _page(title: str, body: str, status: int = 200) -> Response[str]:
    html = _PAGE.format(title=escape(title), body=body)
    return Response(html, status_code=status, media_type="text/html", headers={"Cache-Control": "no-store"})


def _not_ours(exc: BadLinkError) -> ProblemError:
    return ProblemError(404, "link-not-found", str(exc))


class NudgeLinksController(Controller):
    path = "/v1/nudges"
    tags = ["nudges"]
    opt = _PUBLIC

    @get("/l/{token:str}", summary="A nudge's tracked link", description="Records the click (once) and shows the "
         "next step.", media_type="text/html", opt=_PUBLIC)  # fmt: skip
    async def click(self, token: LinkToken, nudge_links: NamedDependency[NudgeLinks]) -> Response[str]:
        try:
            await nudge_links.click(token)
        except BadLinkError as exc:
            raise _not_ours(exc) from exc
        return _page("Thanks", "<p>Pick up where you left off in the app.</p>")

    @route(
        "/u/{token:str}",
        http_method=[HttpMethod.GET, HttpMethod.POST],
        summary="Unsubscribe: the confirmation page (GET) and the one-click unsubscribe (POST, RFC 8058)",
        description="GET shows a page whose button posts here; POST is what a mail client sends "
        "(`List-Unsubscribe=One-Click`) and withdraws consent for the nudge's channel; idempotent.",
        status_code=200,
        media_type="text/html",
        opt=_PUBLIC,
    )
    async def unsubscribe(
        self, request: Request[Any, Any, Any], token: LinkToken, nudge_links: NamedDependency[NudgeLinks]
    ) -> Response[str]:
        try:
            if request.method == HttpMethod.GET:  # a GET never unsubscribes: mail scanners follow links
                nudge_links.signer.check(token, UNSUBSCRIBE)
            else:
                await nudge_links.unsubscribe(token)
        except BadLinkError as exc:
            raise _not_ours(exc) from exc
        if request.method == HttpMethod.GET:
            form = (
                "<p>Stop these onboarding messages on this channel?</p>"
                f'<form method="post" action="{escape(token)}">'
                '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
                '<button type="submit">Unsubscribe</button></form>'
            )
            return _page("Unsubscribe", form)
        return _page("Unsubscribed", "<p>You will not get these messages on this channel any more.</p>")


# ---- in-app messages (tenant API) ----

SendIdPath = Annotated[
    str,
    PathParameter(
        description="The message's `send_id` (a UUID)",
        schema_extra={"pattern": UUID_PATTERN, "min_length": 36, "max_length": 36},
    ),
]
MessageLimit = Annotated[int, QueryParameter(description="At most this many messages, 1 to 100", ge=1, le=100)]
_READ = [require_scope("onboarding:read", "onboarding:write")]
_WRITE = [require_scope("onboarding:write")]
_NO_USER = {404: "user-not-found: the user is not known here"}
_NO_MESSAGE = {404: "message-not-found: not a delivered in-app message of this user"}


def _send_id(value: str) -> uuid.UUID:
    return uuid.UUID(check_id(value, UUID_RE, "send_id"))


async def _events(
    items: AsyncIterator[InAppMessage | str | Watched], retry_ms: int
) -> AsyncIterator[ServerSentEventMessage]:
    async for item in items:
        if isinstance(item, Watched):  # only streams given a watch yield these
            continue
        if isinstance(item, str):  # a comment: the opening one tells the client how long to wait before reconnecting
            yield ServerSentEventMessage(data=None, comment=item, retry=retry_ms if item == OPEN else None)
        else:
            yield ServerSentEventMessage(data=msgspec.json.encode(item).decode(), id=str(item.send_id))


class InAppMessagesController(Controller):
    path = "/v1/users/{user_id:str}/messages"
    tags = ["messages"]

    @get(
        guards=_READ,
        summary="A user's in-app messages",
        description="The in-app nudges delivered to the user and not dismissed, newest first (`send_id`, "
        "`subject`, `body`, `sent_at`, `seen_at`). Needs onboarding:read or onboarding:write.",
        opt={"problems": _NO_USER},
    )
    async def messages(
        self,
        user_id: UserIdPath,
        uow: NamedDependency[UnitOfWork],
        inbox: NamedDependency[InAppInbox],
        limit: MessageLimit = 50,
    ) -> InAppMessageList:
        check_user_id(user_id)
        return await uow.run(lambda tx: inbox.messages(tx, user_id, limit))

    @get(
        "/stream",
        guards=_READ,
        summary="A user's in-app messages, live (Server-Sent Events)",
        description="`text/event-stream`: first the messages not yet seen nor dismissed (oldest first), then a "
        "`: open` comment (with `retry`), then each new message as it is delivered (`id:` the send_id, `data:` "
        "the message as JSON), each at most once per stream; `: keep-alive` comments while idle. The server ends "
        "the stream after FIRSTMILE_NUDGE_STREAM_SECONDS (an EventSource reconnects by itself). Needs "
        "onboarding:read or onboarding:write.",
        media_type="text/event-stream",
        opt={"problems": _NO_USER},
    )
    async def stream(
        self, user_id: UserIdPath, uow: NamedDependency[UnitOfWork], inbox: NamedDependency[InAppInbox]
    ) -> ServerSentEvent:
        check_user_id(user_id)
        await uow.run(lambda tx: inbox.check_user(tx, user_id))
        return ServerSentEvent(_events(inbox.stream(uow, user_id), inbox.retry_ms))

    @post(
        "/{send_id:str}/seen",
        guards=_WRITE,
        status_code=204,
        summary="Mark an in-app message seen",
        description="The app showed the message: the first time records `seen_at` and a `nudge.opened` event; "
        "idempotent. Needs onboarding:write.",
        opt={"problems": _NO_MESSAGE},
    )
    async def seen(
        self,
        user_id: UserIdPath,
        send_id: SendIdPath,
        uow: NamedDependency[UnitOfWork],
        inbox: NamedDependency[InAppInbox],
    ) -> None:
        check_user_id(user_id)
        await inbox.seen(uow, user_id, _send_id(send_id))

    @post(
        "/{send_id:str}/dismiss",
        guards=_WRITE,
        status_code=204,
        summary="Dismiss an in-app message",
        description="The user dismissed the message: it leaves the list and the stream; idempotent. Needs "
        "onboarding:write.",
        opt={"problems": _NO_MESSAGE},
    )
    async def dismiss(
        self,
        user_id: UserIdPath,
        send_id: SendIdPath,
        uow: NamedDependency[UnitOfWork],
        inbox: NamedDependency[InAppInbox],
    ) -> None:
        check_user_id(user_id)
        await inbox.dismiss(uow, user_id, _send_id(send_id))


_WEBHOOK = {
    "exclude_from_auth": True,
    "problems": {
        400: "webhook-malformed: the body is not the provider's format, or names no send of ours",
        401: "webhook-refused: the signature does not hold, or the request is stale (signed over 5 minutes from now)",
        409: "webhook-replayed: this signed request was received before",
    },
}
_REFUSED = {"malformed": (400, "webhook-malformed"), "bad-signature": (401, "webhook-refused"),
            "stale": (401, "webhook-refused"), "replayed": (409, "webhook-replayed")}  # fmt: skip


async def _believed(provider: str, applying: Awaitable[int]) -> None:
    """Apply a provider's webhook; a request that is not believed is logged and answered with its problem."""
    try:
        await applying
    except WebhookRefusedError as exc:
        status, kind = _REFUSED[exc.reason]
        log.warning("nudge webhook refused", extra={"fields": {"provider": provider, "reason": exc.reason}})
        raise ProblemError(status, kind, str(exc)) from exc


class NudgeWebhooksController(Controller):
    """The providers' delivery reports (public: the provider's signature is the credential)."""

    path = "/v1/nudges/webhooks"
    tags = ["nudges"]
    opt = _WEBHOOK

    @post(
        "/sendgrid",
        status_code=204,
        summary="SendGrid's Signed Event Webhook",
        description="Delivery reports of e-mail nudges sent through SendGrid: delivered, open, click, bounce, "
        "dropped, spamreport, unsubscribe. Verified with FIRSTMILE_NUDGE_SENDGRID_WEBHOOK_KEY (ECDSA over the "
        "timestamp header and the body); a replay is refused. Events about mail that is not a nudge are ignored.",
        opt=_WEBHOOK,
    )
    async def sendgrid(self, request: Request[Any, Any, Any], nudge_webhooks: NamedDependency[NudgeWebhooks]) -> None:
        body = await request.body()
        signature = request.headers.get(SENDGRID_SIGNATURE, "")
        timestamp = request.headers.get(SENDGRID_TIMESTAMP, "")
        await _believed("sendgrid", nudge_webhooks.sendgrid(body, signature, timestamp))

    @post(
        "/twilio",
        status_code=204,
        summary="Twilio's signed SMS status callback",
        description="The status of an SMS nudge (delivered, undelivered, failed, read), posted by Twilio to the "
        "StatusCallback the send named. Verified with the account's auth token (X-Twilio-Signature over the full "
        "URL and the form); a replay is refused.",
        opt=_WEBHOOK,
    )
    async def twilio(self, request: Request[Any, Any, Any], nudge_webhooks: NamedDependency[NudgeWebhooks]) -> None:
        body = await request.body()
        query = request.url.query
        requested = request.url.path + (f"?{query}" if query else "")
        await _believed("twilio", nudge_webhooks.twilio(requested, body, request.headers.get(TWILIO_SIGNATURE, "")))

    @route(
        "/vonage",
        http_method=[HttpMethod.GET, HttpMethod.POST],
        status_code=204,
        summary="Vonage's signed SMS delivery receipt",
        description="The status of an SMS nudge sent through Vonage (delivered, failed, rejected, expired), sent "
        "by Vonage to the callback the send named, as a GET query, a POST form or a POST JSON object (the "
        "account's choice). Verified with FIRSTMILE_NUDGE_VONAGE_SIGNATURE_SECRET (sig over every parameter, and "
        "timestamp within 5 minutes of now); a replay is refused.",
        opt=_WEBHOOK,
    )
    async def vonage(self, request: Request[Any, Any, Any], nudge_webhooks: NamedDependency[NudgeWebhooks]) -> None:
        await _believed("vonage", nudge_webhooks.vonage(await _vonage_params(request)))


async def _vonage_params(request: Request[Any, Any, Any]) -> dict[str, str]:
    """A delivery receipt's parameters, as Vonage sent them: the query (GET), a form or a JSON object (POST)."""
    if request.method == "GET":
        return {name: values[-1] for name, values in parse_qs(request.url.query, keep_blank_values=True).items()}
    body = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise ProblemError(400, "webhook-malformed", "the body is not JSON") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                               for v in parsed.values()):  # fmt: skip
        raise ProblemError(400, "webhook-malformed", "the body is not an object of parameters")
    return {str(name): str(value) for name, value in parsed.items()}


_HASH_PATTERN = "^[0-9a-f]{64}$"
_HASH_RE = re.compile(_HASH_PATTERN)
SubscriptionIdPath = Annotated[
    str,
    PathParameter(
        description="The subscription's id (as POST answered it)",
        schema_extra={"pattern": _HASH_PATTERN, "min_length": 64, "max_length": 64},
    ),
]


def _no_such_user(user_id: str) -> ProblemError:
    return ProblemError(404, "user-not-found", f"user {user_id!r} is not known here")


_PUSH_PROBLEMS = {
    400: "invalid-subscription: not a push subscription this platform can send to (endpoint, keys)",
    404: "user-not-found: the user is not known here",
    409: "push-not-configured: web push is off (no VAPID key)",
}


class PushSubscriptionsController(Controller):
    """Where a user's push nudges go: their browser's push subscription (sealed under the user's key)."""

    path = "/v1/users/{user_id:str}/push-subscriptions"
    tags = ["messages"]

    @post(
        guards=_WRITE,
        status_code=201,
        summary="Add a browser push subscription of the user",
        description="The `PushSubscription.toJSON()` of the user's browser (endpoint and keys); the newest is where "
        "push nudges go. Stored sealed under the user's key and erased with the user. Answers its "
        "`subscription_id` (the SHA-256 of the endpoint), the same for the same endpoint. Needs onboarding:write.",
        opt={"problems": _PUSH_PROBLEMS},
    )
    async def add(
        self,
        user_id: UserIdPath,
        data: Annotated[PushSubscriptionIn, Body(description="The browser's PushSubscription.toJSON()")],
        uow: NamedDependency[UnitOfWork],
        push_subscriptions: NamedDependency[PushSubscriptions],
        request: Request[Any, Any, Any],
    ) -> PushSubscriptionOut:
        check_user_id(user_id)
        data = strict_body(await request.body(), PushSubscriptionIn)  # "5" is not an expirationTime
        subscription = {"endpoint": data.endpoint, "keys": {"p256dh": data.keys.p256dh, "auth": data.keys.auth}}
        try:
            return PushSubscriptionOut(await push_subscriptions.add(uow, user_id, subscription))
        except InvalidSubscriptionError as exc:
            raise ProblemError(400, "invalid-subscription", str(exc)) from exc
        except UnknownUserError as exc:
            raise _no_such_user(user_id) from exc
        except PushNotConfiguredError as exc:
            raise ProblemError(409, "push-not-configured", str(exc)) from exc

    @delete(
        "/{subscription_id:str}",
        guards=_WRITE,
        status_code=204,
        summary="Forget a push subscription of the user",
        description="The browser unsubscribed: no push nudge goes there any more. Idempotent. Needs onboarding:write.",
    )
    async def drop(
        self,
        user_id: UserIdPath,
        subscription_id: SubscriptionIdPath,
        uow: NamedDependency[UnitOfWork],
        push_subscriptions: NamedDependency[PushSubscriptions],
    ) -> None:
        check_user_id(user_id)
        await push_subscriptions.drop(uow, user_id, check_id(subscription_id, _HASH_RE, "subscription_id"))


_CHANNEL_PATTERN = "^(email|sms|in_app|push)$"
_CATEGORY_PATTERN = "^[a-z][a-z0-9_-]{0,62}$"
_CHANNEL_RE, _CATEGORY_RE = re.compile(_CHANNEL_PATTERN), re.compile(_CATEGORY_PATTERN)
ChannelPath = Annotated[
    str, PathParameter(description="email, sms, in_app or push", schema_extra={"pattern": _CHANNEL_PATTERN})
]
CategoryPath = Annotated[
    str,
    PathParameter(
        description="The nudges' category (`onboarding` for stuck and path nudges)",
        schema_extra={"pattern": _CATEGORY_PATTERN, "min_length": 1, "max_length": 63},
    ),
]


class ConsentsController(Controller):
    """The user's consent per channel and category: what the policy reads before any nudge (audited)."""

    path = "/v1/users/{user_id:str}/consents"
    tags = ["messages"]

    @get(
        guards=_READ,
        summary="A user's recorded consents",
        description="Each channel and category the user answered (granted or not, an unsubscribe included). "
        "Needs onboarding:read or onboarding:write.",
        opt={"problems": _NO_USER},
    )
    async def list_consents(self, user_id: UserIdPath, uow: NamedDependency[UnitOfWork]) -> ConsentList:
        check_user_id(user_id)
        try:
            found = await uow.run(lambda tx: consents(tx, user_id))
        except UnknownUserError as exc:
            raise _no_such_user(user_id) from exc
        return ConsentList(user_id, [ConsentOut(c.channel, c.category, c.granted) for c in found])

    @put(
        "/{channel:str}/{category:str}",
        guards=_WRITE,
        status_code=204,
        summary="Record a user's consent for a channel and category",
        description='`{"granted": true|false, "source": "…"}`: the user\'s answer, as the tenant\'s app '
        "has it (a preference centre, a sign-up checkbox). A change is a `consent` entry in the audit log; the "
        "next nudge's policy reads it. Idempotent. Needs onboarding:write.",
        opt={"problems": _NO_USER},
    )
    async def set_user_consent(
        self,
        user_id: UserIdPath,
        channel: ChannelPath,
        category: CategoryPath,
        data: Annotated[ConsentIn, Body(description="The user's answer")],
        uow: NamedDependency[UnitOfWork],
        request: Request[Any, Any, Any],
    ) -> None:
        check_user_id(user_id)
        data = strict_body(await request.body(), ConsentIn)  # "true" or 1 is not a boolean
        check_id(channel, _CHANNEL_RE, "channel")
        check_id(category, _CATEGORY_RE, "category")
        source = data.source.strip()[:64] or "api"
        try:
            await uow.run(lambda tx: set_consent(tx, user_id, channel, category, data.granted, source))
        except UnknownUserError as exc:
            raise _no_such_user(user_id) from exc
