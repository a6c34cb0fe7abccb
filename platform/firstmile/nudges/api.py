"""The links in a nudge: the tracked link and the one-click unsubscribe (public: the signed link is the credential).

``GET /v1/nudges/l/{token}`` records a click and says where to continue. ``GET /v1/nudges/u/{token}``
shows a confirmation page whose button posts to ``POST /v1/nudges/u/{token}``, the RFC 8058
one-click unsubscribe that mail clients call from the ``List-Unsubscribe-Post`` header (a GET never
unsubscribes: mail scanners follow links). A link that was not issued here, or not for that, is
a 404 problem.
"""

from __future__ import annotations

from html import escape
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, route
from litestar.di import NamedDependency
from litestar.enums import HttpMethod
from litestar.params import PathParameter

from firstmile.kit.errors import ProblemError
from firstmile.nudges.links import UNSUBSCRIBE, BadLinkError
from firstmile.nudges.service import NudgeLinks

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
