"""Event ingestion over HTTP: Segment's tracking API (batch and single calls), Firstmile's batch path, the webhook.

``POST /v1/batch`` and the single-call endpoints ``POST /v1/track``, ``/v1/identify``,
``/v1/page``, ``/v1/screen``, ``/v1/group`` and ``/v1/alias`` are Segment's HTTP tracking
API at the paths its libraries (and RudderStack's) post to, so a library whose host points
at Firstmile works unchanged: they answer ``200`` with ``{"success": true, …}`` as Segment
does, and every problem they answer also carries the ``code`` and ``message`` members that
RudderStack's and Segment's Python libraries read from a refusal (without them a 4xx
was retried for minutes). ``POST /v1/events`` is the same batch at Firstmile's own path,
answered ``202``. Authentication: an API key with ``events:write`` as a Bearer token or as
Segment's Basic write key. ``POST /v1/webhooks/segment/{tenant}`` takes one message from
a Segment webhook destination, signed with the tenant's shared secret (``X-Signature``:
hex HMAC-SHA1 of the body).

The handlers read their raw bodies, bounded: a batch at most ``FIRSTMILE_INGEST_MAX_BATCH_BYTES``
(the wiring passes it to :class:`IngestionService`), a single call 32 KB; a gzip body
(``Content-Encoding: gzip``) is inflated only up to the same bound, so a zip bomb is a 413.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.types import ExceptionHandlersMap

from firstmile.events.segment import MAX_BATCH_MESSAGES, MAX_MESSAGE_BYTES, MAX_MESSAGE_ID, parse_time
from firstmile.events.service import BatchResult, IngestionService, TrackingResult
from firstmile.kit import telemetry
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE, ProblemError, exception_handlers
from firstmile.kit.ids import SLUG_RE, SlugPath
from firstmile.kit.uow import UnitOfWork

WEBHOOK_MAX_BYTES = MAX_MESSAGE_BYTES + 4096  # one message and what a webhook destination wraps around it
_CONTENT_ENCODINGS = ("", "identity", "gzip")


def _too_large(what: str, limit: int) -> ProblemError:
    return ProblemError(
        413,
        "payload-too-large",
        f"{what} is over {limit:,} bytes, the limit (after gzip decoding); send smaller batches",
        limit=limit,
    )


def inflate(raw: bytes, limit: int, what: str) -> bytes:
    """A gzip body inflated to at most ``limit`` bytes: a bigger one (a zip bomb too) is refused after
    ``limit + 1`` bytes of output, never inflated whole."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ProblemError(400, "malformed-body", f"the gzip body cannot be inflated: {exc}") from None
    if len(body) > limit:
        raise _too_large(what, limit)
    if not inflater.eof:
        raise ProblemError(400, "malformed-body", "the gzip body is truncated: its stream does not end")
    if inflater.unused_data:
        raise ProblemError(400, "malformed-body", "the gzip body has data after its stream")
    return body


async def read_body(request: Request[Any, Any, Any], limit: int, what: str = "the batch") -> bytes:
    """The request body, gzip-decoded, of at most ``limit`` bytes (the wire's and the decoded); else 413."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in _CONTENT_ENCODINGS:
        raise ProblemError(415, "unsupported-media-type", f"Content-Encoding {encoding!r}: only gzip is accepted")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte is read
        raise _too_large(what, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(what, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    return inflate(raw, limit, what) if encoding == "gzip" else raw


def _decode(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed-json", f"Request body is not valid JSON: {exc}") from None


def _sent_at(doc: dict[str, Any]) -> datetime | None:
    """The batch's ``sentAt`` (the client's clock when it sent it), or None."""
    value = doc.get("sentAt")
    if value is None:
        return None
    try:
        return parse_time(value, "sentAt")
    except ValueError as bad:
        raise ProblemError(
            400, "validation-error", f"{bad} (at sentAt)", errors=[{"key": "sentAt", "message": str(bad)}]
        ) from None


def _parse_batch(raw: bytes) -> tuple[list[Any], datetime | None]:
    doc = _decode(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("batch"), list):
        raise ProblemError(
            400,
            "validation-error",
            "the body must be an object with a 'batch' array of messages (at batch)",
            errors=[{"key": "batch", "message": "required: an array"}],
        )
    batch: list[Any] = doc["batch"]
    if not batch:
        raise ProblemError(400, "validation-error", "the batch is empty (at batch)", errors=[{"key": "batch"}])
    if len(batch) > MAX_BATCH_MESSAGES:
        raise ProblemError(
            413, "payload-too-large", f"the batch has {len(batch)} messages; the limit is {MAX_BATCH_MESSAGES}"
        )
    return batch, _sent_at(doc)


def _parse_single(raw: bytes, kind: str) -> dict[str, Any]:
    """One message of a single call, its type the path's."""
    message = _decode(raw)
    if not isinstance(message, dict):
        raise ProblemError(
            400,
            "validation-error",
            f"the body must be one {kind} message: an object",
            errors=[{"key": "", "message": "required: an object"}],
        )
    given = message.setdefault("type", kind)
    if given != kind:
        raise ProblemError(
            400,
            "validation-error",
            f"type {given!r} does not match the path: /v1/{kind} takes {kind} messages (at type)",
            errors=[{"key": "type", "message": f"must be {kind!r} or absent"}],
        )
    return message


# ---- what a refusal says to a tracking library ----


def _coded(handler: Callable[[Request[Any, Any, Any], Any], Response[Any]]) -> Any:
    """``handler`` with the problem's ``code`` (its slug) and ``message`` (its detail) added: what RudderStack's
    and Segment's libraries read from an answer that is not 200 (a refusal without them is retried)."""

    def coded(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        response = handler(request, exc)
        if response.media_type == PROBLEM_MEDIA_TYPE and isinstance(response.content, bytes):
            body = msgspec.json.decode(response.content)
            if isinstance(body, dict):
                body.setdefault("code", str(body.get("type", "")).removeprefix(PROBLEM_BASE))
                body.setdefault("message", body.get("detail", ""))
                response.content = msgspec.json.encode(body)
        return response

    return coded


def _tracking_exception_handlers() -> ExceptionHandlersMap:
    """The app's problem handlers, each adding ``code`` and ``message``; on this controller they also render what
    the authentication and rate-limit middleware raise for its paths."""
    return {kind: _coded(handler) for kind, handler in exception_handlers().items()}


# ---- the OpenAPI document: the handlers read raw bodies, so they state them themselves ----


def _json_body(schema: Schema, description: str) -> RequestBody:
    return RequestBody(
        required=True, description=description, content={"application/json": OpenAPIMediaType(schema=schema)}
    )


_MESSAGE = Schema(
    type=OpenAPIType.OBJECT,
    description="A Segment message: track, identify, page, screen, group or alias (events.md#ingestion); "
    "each is checked on its own",
)
_BATCH_BODY = _json_body(
    Schema(
        type=OpenAPIType.OBJECT,
        required=["batch"],
        properties={
            "batch": Schema(type=OpenAPIType.ARRAY, min_items=1, max_items=MAX_BATCH_MESSAGES, items=_MESSAGE),
            "sentAt": Schema(
                type=OpenAPIType.STRING,
                description="The client's clock when it sent the batch (ISO-8601 with a zone): corrects the "
                "messages' timestamps for its skew",
            ),
        },
    ),
    "A Segment batch; other members (context, writeKey, timestamp) are ignored. It may be gzip-encoded.",
)
_WEBHOOK_BODY = _json_body(_MESSAGE, "One Segment message, as a webhook destination posts it")

TRACKING_CALLS = ("track", "identify", "page", "screen", "group", "alias")


def _single_body(kind: str) -> RequestBody:
    return _json_body(
        Schema(
            type=OpenAPIType.OBJECT,
            required=["messageId"],
            properties={
                "type": Schema(type=OpenAPIType.STRING, enum=[kind], description="Implied by the path"),
                "messageId": Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_MESSAGE_ID),
            },
            description=f"One Segment {kind} message (events.md#ingestion); at most 32 KB",
        ),
        f"One {kind} message. It may be gzip-encoded.",
    )


@dataclass
class _BatchOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = _BATCH_BODY


@dataclass
class _WebhookOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = _WEBHOOK_BODY


def _single_operation(kind: str) -> type[Operation]:
    body = _single_body(kind)

    @dataclass
    class _SingleOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return _SingleOperation


_BATCH_PROBLEMS = {
    400: "invalid-events (no message valid), validation-error, malformed-json or malformed-body",
    413: "payload-too-large: the body (gzip-decoded) is over FIRSTMILE_INGEST_MAX_BATCH_BYTES, or over 2,500 messages",
    415: "unsupported-media-type: a Content-Encoding other than gzip",
    503: "key-provider-unavailable (personal data cannot be sealed) or the database",
}
_SINGLE_PROBLEMS = _BATCH_PROBLEMS | {
    400: "invalid-events (the message is not valid), validation-error, malformed-json or malformed-body",
    413: "payload-too-large: the body (gzip-decoded) is over 32 KB",
}
_BATCH_DESCRIPTION = (
    'A Segment batch (`{"batch": [message …], "sentAt": …}`), deduplicated by messageId. Answers the number '
    "accepted, the duplicates and, per rejected message, its index, field and reason; 400 when no message is "
    "valid. Limits: 32 KB a message, FIRSTMILE_INGEST_MAX_BATCH_BYTES (5 MiB) a batch after gzip decoding, "
    "2,500 messages."
)


def _single_description(kind: str) -> str:
    return (
        f"Segment's single `{kind}` call: one message (its type implied by the path), validated as a batch of "
        "one and deduplicated by messageId. 200 with `success`, the counts; 400 invalid-events when the message "
        "is not valid. At most 32 KB."
    )


def _single_call(kind: str) -> HTTPRouteHandler:
    """The handler of one of Segment's single calls (``POST /v1/<kind>``): one message, its ``type`` implied by the
    path, accepted all or nothing; the same answers as ``/v1/batch``. One factory for the six calls, which differ
    only in ``kind``; each still is an operation of its own in the OpenAPI document."""

    async def handler(
        self: Controller,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        ingestion: NamedDependency[IngestionService],
    ) -> TrackingResult:
        message = _parse_single(await read_body(request, MAX_MESSAGE_BYTES, f"the {kind} message"), kind)
        result = await ingestion.accept(uow, request.user.tenant_revision, [message], all_or_nothing=True)
        return TrackingResult.of(result)

    handler.__name__ = handler.__qualname__ = kind  # the operation's id, as when each was written out
    return post(
        f"/{kind}",
        status_code=200,
        guards=[require_scope("events:write")],
        request_max_body_size=None,  # read_body bounds it: 32 KB, gzip-decoded too
        operation_class=_single_operation(kind),
        summary=f"Segment's {kind} call",
        description=_single_description(kind),
        opt={"problems": _SINGLE_PROBLEMS},
    )(handler)


class EventsController(Controller):
    path = "/v1"
    tags = ["events"]
    exception_handlers = _tracking_exception_handlers()

    async def _batch(
        self, request: Request[Principal, Any, Any], uow: UnitOfWork, ingestion: IngestionService
    ) -> BatchResult:
        messages, sent_at = _parse_batch(await read_body(request, ingestion.max_batch_bytes))
        return await ingestion.accept(uow, request.user.tenant_revision, messages, sent_at=sent_at)

    @post(
        "/events",
        status_code=202,
        guards=[require_scope("events:write")],
        request_max_body_size=None,  # read_body bounds it: FIRSTMILE_INGEST_MAX_BATCH_BYTES, gzip-decoded too
        operation_class=_BatchOperation,
        summary="Ingest a batch of Segment messages",
        description=_BATCH_DESCRIPTION + " `202`: Firstmile's own path (`/v1/batch` answers `200`, as Segment).",
        opt={"problems": _BATCH_PROBLEMS},
    )
    async def events(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        ingestion: NamedDependency[IngestionService],
    ) -> Response[BatchResult]:
        return Response(await self._batch(request, uow, ingestion), status_code=202)

    @post(
        "/batch",
        status_code=200,
        guards=[require_scope("events:write")],
        request_max_body_size=None,  # read_body bounds it: FIRSTMILE_INGEST_MAX_BATCH_BYTES, gzip-decoded too
        operation_class=_BatchOperation,
        summary="Segment's batch call",
        description=_BATCH_DESCRIPTION + ' `200` with `"success": true`, as Segment\'s tracking API answers: '
        "the path Segment's and RudderStack's libraries post to.",
        opt={"problems": _BATCH_PROBLEMS},
    )
    async def batch(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        ingestion: NamedDependency[IngestionService],
    ) -> TrackingResult:
        return TrackingResult.of(await self._batch(request, uow, ingestion))

    track = _single_call("track")
    identify = _single_call("identify")
    page = _single_call("page")
    screen = _single_call("screen")
    group = _single_call("group")
    alias = _single_call("alias")

    @post(
        "/webhooks/segment/{tenant:str}",
        status_code=202,
        request_max_body_size=None,  # read_body bounds it: 36 KB, gzip-decoded too
        exclude_from_auth=True,
        operation_class=_WebhookOperation,
        summary="Segment webhook destination",
        description="One Segment message, signed: `X-Signature` is the hex HMAC-SHA1 of the body under the "
        "tenant's shared secret (`firstmile webhooks secret --tenant SLUG`).",
        opt={
            "problems": {
                401: "invalid-signature: the signature is missing or does not match the tenant's secret",
                415: "unsupported-media-type: a Content-Encoding other than gzip",
                421: "wrong-region: the tenant is homed in another region",
            }
        },
    )
    async def segment_webhook(
        self, request: Request[Any, Any, Any], tenant: SlugPath, ingestion: NamedDependency[IngestionService]
    ) -> Response[BatchResult]:
        raw = await read_body(request, WEBHOOK_MAX_BYTES, "the message")
        unauthorised = ProblemError(
            401, "invalid-signature", "the webhook signature is missing or does not match the tenant's secret"
        )
        if not SLUG_RE.match(tenant):
            raise unauthorised
        sender = await ingestion.webhook_sender(tenant, raw, request.headers.get("x-signature", ""))
        if sender is None:
            raise unauthorised
        telemetry.tenant_var.set(tenant)
        message = _decode(raw)
        result = await ingestion.accept(
            ingestion.unit_of_work(sender), sender.tenant_revision, [message], all_or_nothing=True
        )
        return Response(result, status_code=202)
