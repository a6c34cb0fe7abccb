"""Event ingestion over HTTP: a Segment-compatible batch endpoint and the Segment webhook.

``POST /v1/events`` (and ``POST /v1/batch``, the path Segment's own libraries
post to, so ``analytics.host = "https://firstmile…"`` works unchanged) takes a
Segment batch, authenticated by an API key with ``events:write`` as a Bearer
token or as Segment's Basic write key. ``POST /v1/webhooks/segment/{tenant}``
takes one message from a Segment webhook destination, signed with the tenant's
shared secret (``X-Signature``: hex HMAC-SHA1 of the body).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType

from firstmile.events.segment import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_MESSAGE_BYTES
from firstmile.events.service import BatchResult, IngestionService
from firstmile.kit import telemetry
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import SLUG_RE, SlugPath
from firstmile.kit.uow import UnitOfWork

_BODY_LIMIT = MAX_BATCH_BYTES + 4096  # the batch plus its envelope (sentAt, writeKey, context)


async def _body(request: Request[Any, Any, Any], limit: int) -> bytes:
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=31)
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise ProblemError(400, "malformed-body", f"the gzip body cannot be inflated: {exc}") from None
    elif encoding not in ("", "identity"):
        raise ProblemError(415, "unsupported-media-type", f"Content-Encoding {encoding!r}: only gzip is accepted")
    if len(raw) > limit:
        raise ProblemError(
            413, "payload-too-large", f"the batch is over {limit // 1024} KB; send at most 500 KB a batch", limit=limit
        )
    return raw


def _messages(raw: bytes) -> list[Any]:
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed-json", f"Request body is not valid JSON: {exc}") from None
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
    return batch


def _json_body(schema: Schema, description: str) -> RequestBody:
    return RequestBody(
        required=True, description=description, content={"application/json": OpenAPIMediaType(schema=schema)}
    )


_MESSAGE = Schema(
    type=OpenAPIType.OBJECT,
    description="A Segment track, identify or page message (events.md#ingestion); each is checked on its own",
)
_BATCH_BODY = _json_body(
    Schema(
        type=OpenAPIType.OBJECT,
        required=["batch"],
        properties={"batch": Schema(type=OpenAPIType.ARRAY, min_items=1, max_items=MAX_BATCH_MESSAGES, items=_MESSAGE)},
    ),
    "A Segment batch; other members (sentAt, context, writeKey) are ignored. It may be gzip-encoded.",
)
_WEBHOOK_BODY = _json_body(_MESSAGE, "One Segment message, as a webhook destination posts it")


# The handlers read their raw bodies (gzip, a byte limit, a signature over the bytes), so Litestar
# sees no ``data`` to document: these operations state the body themselves.
@dataclass
class _BatchOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = _BATCH_BODY


@dataclass
class _WebhookOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = _WEBHOOK_BODY


class EventsController(Controller):
    path = "/v1"
    tags = ["events"]

    @post(
        ["/events", "/batch"],
        status_code=202,
        guards=[require_scope("events:write")],
        request_max_body_size=_BODY_LIMIT,
        operation_class=_BatchOperation,
        summary="Ingest a batch of Segment messages",
        description='A Segment batch (`{"batch": [track|identify|page …]}`), deduplicated by messageId. '
        "202 with the number accepted, the duplicates and, per rejected message, its index, field and reason; "
        "400 when no message is valid. Limits: 32 KB a message, 500 KB a batch. `/v1/batch` is the same "
        "endpoint at the path Segment's libraries use.",
        opt={
            "problems": {
                400: "invalid-events (no message valid), validation-error, malformed-json or malformed-body",
                415: "unsupported-media-type: a Content-Encoding other than gzip",
                503: "key-provider-unavailable (personal data cannot be sealed) or the database",
            }
        },
    )
    async def batch(
        self,
        request: Request[Principal, Any, Any],
        uow: NamedDependency[UnitOfWork],
        ingestion: NamedDependency[IngestionService],
    ) -> Response[BatchResult]:
        messages = _messages(await _body(request, _BODY_LIMIT))
        result = await ingestion.accept(uow, request.user.tenant_revision, messages)
        return Response(result, status_code=202)

    @post(
        "/webhooks/segment/{tenant:str}",
        status_code=202,
        request_max_body_size=MAX_MESSAGE_BYTES + 4096,
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
        raw = await _body(request, MAX_MESSAGE_BYTES + 4096)
        unauthorised = ProblemError(
            401, "invalid-signature", "the webhook signature is missing or does not match the tenant's secret"
        )
        if not SLUG_RE.match(tenant):
            raise unauthorised
        sender = await ingestion.webhook_sender(tenant, raw, request.headers.get("x-signature", ""))
        if sender is None:
            raise unauthorised
        telemetry.tenant_var.set(tenant)
        try:
            message = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ProblemError(400, "malformed-json", f"Request body is not valid JSON: {exc}") from None
        result = await ingestion.accept(
            ingestion.unit_of_work(sender), sender.tenant_revision, [message], all_or_nothing=True
        )
        return Response(result, status_code=202)
