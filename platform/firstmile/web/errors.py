"""Problems shown to people: an admin page that fails answers a page, not raw problem+json.

Every error of the app is a problem (``kit.errors``). When the request is a browser's navigation to an admin
page (a path under ``/admin`` and an ``Accept`` header that asks for ``text/html``: a link, a typed address, a
form post), :func:`for_people` renders the same problem as ``error.html`` in the admin shell, with the same
status, headers and request id, and ways on (sign in again, the dashboard). Scripts (``fetch`` sends
``Accept: */*``) and API clients still get ``application/problem+json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.types import ExceptionHandlersMap

from firstmile.web.pages import CSP, SECURITY_HEADERS, page_html

Handler = Callable[[Request[Any, Any, Any], Any], Response[Any]]

_KEEP = ("retry-after", "www-authenticate", "allow")
"""Headers of the problem that the page keeps."""


def wants_html(request: Request[Any, Any, Any]) -> bool:
    """A browser navigating to an admin page (not a script's ``fetch``, not an API client)."""
    if not request.url.path.startswith("/admin"):
        return False
    accept = request.headers.get("accept", "")
    return "text/html" in accept


def _page(request: Request[Any, Any, Any], problem: Response[Any]) -> Response[str]:
    body: Any = problem.content
    data = json.loads(body) if isinstance(body, bytes | str) else {}
    status = int(problem.status_code or 500)
    html = page_html("error.html", {"problem": data, "status": status})
    headers = {k: v for k, v in problem.headers.items() if k.lower() in _KEEP}
    headers.update(SECURITY_HEADERS)
    headers["Content-Security-Policy"] = CSP.format(forms="'self'")
    return Response(html, status_code=status, media_type="text/html", headers=headers)


def for_people(handlers: ExceptionHandlersMap) -> ExceptionHandlersMap:
    """The same handlers, each answering a browser's navigation to an admin page with an error page."""

    def wrap(handler: Handler) -> Handler:
        def handle(request: Request[Any, Any, Any], exc: Any) -> Response[Any]:
            problem = handler(request, exc)
            if wants_html(request):
                return _page(request, problem)
            return problem

        return handle

    return {kind: wrap(handler) for kind, handler in handlers.items()}
