"""RFC 9457 problem details: every 4xx and 5xx the API sends.

Each problem has a stable ``type`` URI (``https://firstmile.dev/problems/<slug>``)
that clients can switch on; ``title`` is fixed per type, ``detail`` says what
went wrong with this request.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    SerializationException,
    ValidationException,
)
from litestar.types import ExceptionHandlersMap

from firstmile.kit import telemetry
from firstmile.kit.db import DatabaseUnavailableError

PROBLEM_BASE = "https://firstmile.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("firstmile.errors")
T = TypeVar("T")

_TITLES: dict[str, str] = {
    "validation-error": "Request body or parameters are invalid",
    "malformed-json": "Request body is not valid JSON",
    "payload-too-large": "Request body is too large",
    "unsupported-media-type": "Request body must be JSON",
    "unauthenticated": "Missing or invalid credentials",
    "invalid-token": "The access token is not accepted",
    "forbidden": "The credentials do not allow this action",
    "wrong-region": "Tenant is homed in another region",
    "not-found": "Resource not found",
    "user-not-found": "End user not found",
    "step-not-found": "Step not found on the user's path",
    "link-not-found": "Not a link of a nudge sent here",
    "step-prerequisites-unmet": "Step prerequisites are not complete",
    "method-not-allowed": "Method not allowed",
    "conflict": "Conflicting request",
    "rate-limited": "Too many requests for this credential or tenant",
    "service-unavailable": "A dependency is unavailable",
    "invalid-events": "No message in the batch is valid",
    "invalid-signature": "Webhook signature missing or wrong",
    "malformed-body": "Request body cannot be decoded",
    "path-not-found": "Path not found",
    "path-not-eligible": "Path not eligible",
    "review-not-found": "Review not found",
    "review-decided": "Review decided",
    "override-not-found": "Override not found",
    "model-gate-failed": "Model gate failed",
    "key-provider-unavailable": "The tenant's key provider is unavailable",
    "not-checkpointed": "No signed checkpoint covers this yet",
    "audit-integrity": "The audit log failed an integrity check",
    "analytics-unavailable": "Analytics are unavailable and nothing is cached",
    "internal-error": "Internal server error",
}


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self, status: int, slug: str, detail: str, *, headers: dict[str, str] | None = None, **extensions: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.slug


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    slug: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response[bytes]:
    """Build the ``application/problem+json`` response for one problem."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": _TITLES.get(slug, slug.replace("-", " ").capitalize()),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    body.update(extensions)
    telemetry.ERRORS.labels(type=slug, status=str(status)).inc()
    return Response(
        content=msgspec.json.encode(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _on_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[bytes]:
    return problem_response(request, exc.status, exc.slug, exc.detail, exc.headers, **exc.extensions)


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    detail = str(exc.detail)
    if _is_malformed_json(exc):
        return problem_response(request, 400, "malformed-json", f"Request body is not valid JSON: {detail}")
    errors = exc.extra if isinstance(exc.extra, list) else []
    return problem_response(request, 400, "validation-error", _first_message(detail, errors), errors=errors)


def _first_message(detail: str, errors: list[Any]) -> str:
    if errors and isinstance(errors[0], dict):
        first = errors[0]
        where = first.get("key", "")
        message = first.get("message", detail)
        return f"{message} (at {where})" if where else str(message)
    return detail


def strict_body(raw: bytes, struct: type[T]) -> T:
    """``raw`` decoded as ``struct`` with JSON's own types, or 400 ``validation-error``.

    Litestar converts a handler's ``data`` leniently (msgspec ``strict=False``), so ``"true"`` or ``1``
    passes as a boolean and ``"5"`` as an integer, which the OpenAPI document says is refused. A handler
    whose body has typed non-string fields decodes the same bytes again with this before acting on them.
    """
    try:
        return msgspec.json.decode(raw, type=struct, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        text, _, where = message.partition(" - at `")
        key = where.rstrip("`").removeprefix("$.").removeprefix("$") or ""
        detail = f"{text} (at {key})" if key else text
        raise ProblemError(
            400, "validation-error", detail, errors=[{"key": key, "message": text, "source": "body"}]
        ) from exc
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed-json", f"Request body is not valid JSON: {exc}") from exc


def _on_serialization(request: Request[Any, Any, Any], exc: SerializationException) -> Response[bytes]:
    return problem_response(request, 400, "malformed-json", str(exc) or "Request body is not valid JSON")


def _is_malformed_json(exc: BaseException) -> bool:
    """Litestar wraps msgspec's DecodeError (not its ValidationError) for unparsable bodies."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, msgspec.DecodeError) and not isinstance(cause, msgspec.ValidationError):
            return True
        cause = cause.__cause__
    return False


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if _is_malformed_json(exc):
        return problem_response(request, 400, "malformed-json", f"Request body is not valid JSON: {exc.detail}")
    status = exc.status_code
    slug = {
        400: "validation-error",
        401: "unauthenticated",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        409: "conflict",
        413: "payload-too-large",
        415: "unsupported-media-type",
        503: "service-unavailable",
    }.get(status, "internal-error" if status >= 500 else "bad-request")
    if status >= 500:
        log.error("server error", exc_info=exc)
    detail = str(exc.detail) if status < 500 else "The server could not handle this request"
    if status == 413:
        detail = "Request body exceeds the size limit"
    return problem_response(request, status, slug, detail, exc.headers)


def _on_database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("database unavailable", exc_info=exc)
    return problem_response(
        request, 503, "service-unavailable", "the database is unavailable; retry later", headers={"Retry-After": "1"}
    )


class DependencyUnavailableError(RuntimeError):
    """A dependency other than the database (Redis, ...) is down and the request has no fallback: 503.

    Adapters raise it for their connection errors, so a dependency that is down answers like the
    database does (503 ``service-unavailable`` with ``Retry-After``) instead of a 500.
    """

    def __init__(self, dependency: str) -> None:
        super().__init__(f"{dependency} is unavailable")
        self.dependency = dependency


def _on_dependency_unavailable(request: Request[Any, Any, Any], exc: DependencyUnavailableError) -> Response[bytes]:
    log.error("dependency unavailable: %s", exc.dependency, exc_info=exc)
    return problem_response(
        request,
        503,
        "service-unavailable",
        f"{exc.dependency} is unavailable; retry later",
        headers={"Retry-After": "1"},
    )


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(request, 500, "internal-error", "The server could not handle this request")


def exception_handlers() -> ExceptionHandlersMap:
    """The handlers the app installs: everything becomes problem+json."""
    return {
        ProblemError: _on_problem,
        ValidationException: _on_validation,
        SerializationException: _on_serialization,
        NotAuthorizedException: _on_http,
        PermissionDeniedException: _on_http,
        NotFoundException: _on_http,
        MethodNotAllowedException: _on_http,
        HTTPException: _on_http,
        DatabaseUnavailableError: _on_database_unavailable,
        DependencyUnavailableError: _on_dependency_unavailable,
        Exception: _on_unexpected,
    }


__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_MEDIA_TYPE",
    "DependencyUnavailableError",
    "ProblemError",
    "exception_handlers",
    "problem_response",
    "strict_body",
]
