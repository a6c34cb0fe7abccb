"""Event ingestion over HTTP: a Segment-compatible batch endpoint and the Segment webhook.

``POST /v1/events`` (and ``POST /v1/batch``, the path Segment's own libraries
post to, so ``analytics.host = "https://firstmile…"`` works unchanged) takes a
Segment batch, authenticated by an API key with ``events:write`` as a Bearer
token or as Segment's Basic write key. ``POST /v1/webhooks/segment/{tenant}``
takes one message from a Segment webhook destination, signed with the tenant's
shared secret (``X-Signature``: hex HMAC-SHA1 of the body).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import zlib
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.params import FromPath
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.events import ingest as ingestion
from firstmile.events.segment import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_MESSAGE_BYTES, Message, parse_batch
from firstmile.kit import telemetry
from firstmile.kit.auth import Principal, require_scope
from firstmile.kit.db import TenantId, authorise_tenant, retry_transient, run_in_tenant_transaction
from firstmile.kit.errors import ProblemError
from firstmile.onboarding.pii import extract_message_pii
from firstmile.security.crypto import FieldContext, FieldKey
from firstmile.security.datakeys import DataKeyService, UserKeyMissingError
from firstmile.settings import Settings
from firstmile.tenancy.manifest import SLUG_PATTERN

_SLUG = re.compile(SLUG_PATTERN)
_BODY_LIMIT = MAX_BATCH_BYTES + 4096  # the batch plus its envelope (sentAt, writeKey, context)


class BatchResult(msgspec.Struct):
    accepted: int
    duplicates: int
    rejected: list[dict[str, Any]]


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


def _stripped(message: Message, pii_names: frozenset[str]) -> tuple[Message, dict[str, Any]]:
    """The message without its personal fields (copied where changed; the parsed batch is not touched)."""
    payload = dict(message.payload)
    if isinstance(payload.get("context"), dict):
        payload["context"] = dict(payload["context"])
    found = extract_message_pii(payload, pii_names)
    return (dataclasses.replace(message, payload=payload), found) if found else (message, found)


async def _seal_personal_data(
    conn: AsyncConnection, state: State, tenant_id: TenantId, revision: int, messages: list[Message]
) -> list[Message]:
    """Each message with its personal fields moved into one ciphertext under its user's key (``payload.pii``)."""
    catalog = await state.onboarding.catalogs.catalog(conn, tenant_id, revision)
    keyring: DataKeyService = state.keyring
    keys: dict[str, FieldKey] = {}  # one key look-up per user and batch
    sealed: list[Message] = []
    for message in messages:
        clean, found = _stripped(message, catalog.pii_traits)
        if found:
            key = keys.get(message.subject)
            if key is None:
                try:  # most users already have a key: read it rather than draw and wrap a new one
                    key = await keyring.user_key(conn, tenant_id, message.subject)
                except UserKeyMissingError:
                    key = await keyring.user_key(conn, tenant_id, message.subject, create=True)
                keys[message.subject] = key
            context = FieldContext(tenant_id, "events", "pii", str(message.event_id))
            clean.payload["pii"] = key.encrypt(msgspec.json.encode(found), context)
        sealed.append(clean)
    return sealed


async def accept(
    state: State, tenant_id: TenantId, revision: int, messages: list[Any], *, all_or_nothing: bool = False
) -> BatchResult:
    """Validate and store a batch: 202 content, or 400 when nothing in it is valid."""
    now = datetime.now(UTC)
    parsed = parse_batch(tenant_id, messages, now)
    for rejection in parsed.rejected:
        telemetry.EVENTS_REJECTED.labels(rejection.field or "message").inc()
    rejected = [r.as_json() for r in parsed.rejected]
    if not parsed.messages or (all_or_nothing and rejected):
        first = parsed.rejected[0]
        raise ProblemError(
            400,
            "invalid-events",
            f"no message accepted; message {first.index}: {first.reason}"
            + (f" (at {first.field})" if first.field else ""),
            rejected=rejected,
        )

    async def work(conn: AsyncConnection) -> ingestion.IngestResult:
        sealed = await _seal_personal_data(conn, state, tenant_id, revision, parsed.messages)
        return await ingestion.ingest(conn, tenant_id, sealed, now)

    result = await run_in_tenant_transaction(state.engine, tenant_id, work)
    return BatchResult(
        accepted=result.accepted, duplicates=result.duplicates + parsed.duplicates_in_batch, rejected=rejected
    )


class EventsController(Controller):
    path = "/v1"
    tags = ["events"]

    @post(
        ["/events", "/batch"],
        status_code=202,
        guards=[require_scope("events:write")],
        request_max_body_size=_BODY_LIMIT,
        summary="Ingest a batch of Segment messages",
        description='A Segment batch (`{"batch": [track|identify|page …]}`), deduplicated by messageId. '
        "202 with the number accepted, the duplicates and, per rejected message, its index, field and reason; "
        "400 when no message is valid. Limits: 32 KB a message, 500 KB a batch. `/v1/batch` is the same "
        "endpoint at the path Segment's libraries use.",
    )
    async def batch(self, request: Request[Principal, Any, Any]) -> Response[BatchResult]:
        messages = _messages(await _body(request, _BODY_LIMIT))
        user = request.user
        result = await accept(request.app.state, user.tenant_id, user.tenant_revision, messages)
        return Response(result, status_code=202)

    @post(
        "/webhooks/segment/{tenant:str}",
        status_code=202,
        request_max_body_size=MAX_MESSAGE_BYTES + 4096,
        exclude_from_auth=True,
        summary="Segment webhook destination",
        description="One Segment message, signed: `X-Signature` is the hex HMAC-SHA1 of the body under the "
        "tenant's shared secret (`firstmile webhooks secret --tenant SLUG`).",
    )
    async def segment_webhook(self, request: Request[Any, Any, Any], tenant: FromPath[str]) -> Response[BatchResult]:
        raw = await _body(request, MAX_MESSAGE_BYTES + 4096)
        settings: Settings = request.app.state.settings
        unauthorised = ProblemError(
            401, "invalid-signature", "the webhook signature is missing or does not match the tenant's secret"
        )
        if not _SLUG.match(tenant):
            raise unauthorised

        async def lookup() -> ingestion.WebhookTenant | None:
            async with request.app.state.engine.connect() as conn:
                return await ingestion.resolve_webhook(conn, tenant, "segment")

        found = await retry_transient(lookup)
        signature = request.headers.get("x-signature", "")
        if found is None:
            raise unauthorised
        expected = hmac.new(found.secret.encode(), raw, hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise unauthorised
        if found.home_region != settings.region:
            raise ProblemError(
                421,
                "wrong-region",
                f"tenant {tenant} is homed in {found.home_region}; this is {settings.region}",
                home_region=found.home_region,
            )
        telemetry.tenant_var.set(tenant)
        try:
            message = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ProblemError(400, "malformed-json", f"Request body is not valid JSON: {exc}") from None
        result = await accept(
            request.app.state, authorise_tenant(found.tenant_id), found.revision, [message], all_or_nothing=True
        )
        return Response(result, status_code=202)
