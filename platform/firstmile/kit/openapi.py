"""The OpenAPI document says every answer: the problem responses of each operation, and what inputs it refuses.

Litestar documents the success response of each handler from its return type. The failures
are ours (RFC 9457 problems, :mod:`firstmile.kit.errors`), so :func:`document_problems` adds
them to each operation of the generated document, as ``application/problem+json`` with the
shared ``Problem`` schema:

- every operation: 500 ``internal-error``, and 503 (``service-unavailable`` while the database
  is down; a handler adds its other 503s in ``opt["problems"]``);
- operations behind the API key: 401 ``unauthenticated``/``invalid-token``, 403 ``forbidden``
  (the credentials lack the scope), 421 ``wrong-region``, 429 ``rate-limited`` (with its
  ``Retry-After``, ``RateLimit-Policy`` and ``RateLimit`` headers);
- operations with parameters or a body: 400 ``validation-error`` (and ``malformed-json``);
  with a body: 413 ``payload-too-large``;
- what one handler adds, declared next to it: ``opt={"problems": {404: "user-not-found", …}}``.

Request bodies that refuse unknown fields (msgspec structs with ``forbid_unknown_fields``) are
documented with ``additionalProperties: false``, so a client generated from the document
knows the server rejects them. Public operations (health, metrics) carry no security.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    PathItem,
    Reference,
    Schema,
)
from litestar.openapi.spec.enums import OpenAPIType
from litestar.routes import HTTPRoute

from firstmile.kit.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    description=(
        "An RFC 9457 problem. `type` is stable per kind of problem; other members (`errors`, `missing`, "
        "`home_region`, `required_scope`, …) depend on the type."
    ),
    required=["type", "title", "status", "detail", "instance"],
    properties={
        "type": Schema(type=OpenAPIType.STRING, format=None, description=f"`{PROBLEM_BASE}<slug>`"),
        "title": Schema(type=OpenAPIType.STRING),
        "status": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING, description="What went wrong with this request."),
        "instance": Schema(type=OpenAPIType.STRING, description="The request path."),
        "request_id": Schema(type=OpenAPIType.STRING),
        "errors": Schema(
            type=OpenAPIType.ARRAY,
            description="Every invalid input at once (validation-error).",
            items=Schema(
                type=OpenAPIType.OBJECT,
                properties={
                    "key": Schema(type=OpenAPIType.STRING),
                    "message": Schema(type=OpenAPIType.STRING),
                    "source": Schema(type=OpenAPIType.STRING, enum=["body", "query", "path", "header"]),
                },
            ),
        ),
    },
    additional_properties=True,
)

DESCRIPTIONS: Mapping[int, str] = {
    400: "validation-error or malformed-json: the input is refused; nothing changed",
    401: "unauthenticated or invalid-token: no credentials, or not accepted",
    403: "forbidden: the credentials lack the scope this operation needs",
    404: "not found",
    409: "conflict",
    413: "payload-too-large: the body is over the limit",
    415: "unsupported-media-type",
    421: "wrong-region: the tenant is homed in another region (home_region names it)",
    429: "rate-limited: the credential's or the tenant's rate limit is spent (violated_policies); see Retry-After",
    500: "internal-error: a fault of the server (logged with its request id)",
    503: "service-unavailable: a dependency is down (the database; Redis for admin sessions); retry later",
}


RATE_LIMIT_HEADERS: Mapping[str, OpenAPIHeader | Reference] = {
    "Retry-After": OpenAPIHeader(
        description="Seconds until the request would be admitted.", schema=Schema(type=OpenAPIType.INTEGER)
    ),
    "RateLimit-Policy": OpenAPIHeader(
        description='The quota policies (IETF RateLimit header fields): `"key";q=1000;w=1, "tenant";q=5000;w=1`.',
        schema=Schema(type=OpenAPIType.STRING),
    ),
    "RateLimit": OpenAPIHeader(
        description='What is left of each policy: `"key";r=0;t=1, "tenant";r=4210;t=1`.',
        schema=Schema(type=OpenAPIType.STRING),
    ),
}


def _problem(description: str, headers: Mapping[str, OpenAPIHeader | Reference] | None = None) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={PROBLEM_MEDIA_TYPE: OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))},
        headers=dict(headers) if headers else None,
    )


def _operations(item: PathItem, methods: Iterable[str]) -> Iterable[Operation]:
    for method in methods:
        operation = getattr(item, method.lower(), None)
        if isinstance(operation, Operation):
            yield operation


def _has_body(handler: HTTPRouteHandler) -> bool:
    return "data" in handler.parsed_fn_signature.parameters or any(m in handler.http_methods for m in ("POST",))


def _strict_bodies(handler: HTTPRouteHandler) -> Iterable[type[Any]]:
    """The msgspec structs of the handler's body that refuse unknown fields."""
    data = handler.parsed_fn_signature.parameters.get("data")
    if data is None:
        return
    for candidate in (data.annotation, *data.inner_types):
        annotation = getattr(candidate, "annotation", candidate)
        strict = isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)
        if strict and annotation.__struct_config__.forbid_unknown_fields:
            yield annotation


def document_problems(app: Litestar, *, public: Iterable[str]) -> None:
    """Add the problem responses and input constraints to ``app``'s OpenAPI document (see the module docstring).

    ``public``: regular expressions of the paths that need no credentials (the middleware's exclusions).
    """
    openapi = app.openapi_schema
    public_paths = [re.compile(p) for p in public]
    components = openapi.components
    components.schemas = {**(components.schemas or {}), "Problem": PROBLEM_SCHEMA}
    paths = openapi.paths or {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        item = paths.get(route.path_format or "/")
        if item is None:
            continue
        for handler in route.route_handlers:
            if not handler.resolve_include_in_schema():
                continue
            is_public = any(p.match(route.path) for p in public_paths) or bool(handler.opt.get("exclude_from_auth"))
            declared: Mapping[int, str] = handler.opt.get("problems", {})
            for operation in _operations(item, handler.http_methods):
                statuses: dict[int, str] = {500: DESCRIPTIONS[500]}
                if not is_public:
                    statuses |= {s: DESCRIPTIONS[s] for s in (401, 403, 421, 429, 503)}
                if operation.parameters or _has_body(handler):
                    statuses[400] = DESCRIPTIONS[400]
                if _has_body(handler):
                    statuses[413] = DESCRIPTIONS[413]
                for status, slugs in declared.items():
                    general = DESCRIPTIONS.get(status, "")
                    statuses[status] = f"{slugs}" + (f" ({general.split(':')[0]})" if status == 503 else "")
                responses = dict(operation.responses or {})
                for status, description in sorted(statuses.items()):
                    # replaces Litestar's own 400 (a JSON body we never send): every failure is a problem
                    responses[str(status)] = _problem(description, RATE_LIMIT_HEADERS if status == 429 else None)
                operation.responses = responses
                if is_public:
                    operation.security = []
            for struct in _strict_bodies(handler):
                schema = components.schemas.get(struct.__name__)
                if isinstance(schema, Schema):
                    schema.additional_properties = False


__all__ = ["PROBLEM_SCHEMA", "RATE_LIMIT_HEADERS", "document_problems"]
