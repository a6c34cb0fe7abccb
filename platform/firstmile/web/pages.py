"""Pages of the admin UI. Data comes from the same services as ``/admin/api``; every page is
served with a strict Content-Security-Policy (no inline script) and may not be framed."""

from __future__ import annotations

import uuid
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from litestar import Controller, Request, Response, get
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect
from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.admin import paths as path_editor
from firstmile.admin.oidc import LoginError
from firstmile.admin.rbac import Permission, permissions
from firstmile.admin.service import AdminAuth, read_bootstrap_token
from firstmile.audit import repository as audit_repo
from firstmile.audit.service import KIND_PATTERN
from firstmile.kit.db import authorise_tenant, run_in_tenant_transaction
from firstmile.kit.errors import ProblemError

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action {forms}; frame-ancestors 'none'; base-uri 'none'"
)
"""Forms post to this origin, and (the logout form's redirect) to Keycloak when SSO is configured."""
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("firstmile.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def _auth(request: Request[Any, Any, Any]) -> AdminAuth:
    auth: AdminAuth = request.app.state.admin
    return auth


def render(request: Request[Any, Any, Any], template: str, status: int = 200, **context: Any) -> Response[str]:
    context.setdefault("csrf_token", None)
    html = _environment().get_template(template).render(**context)
    oidc = _auth(request).oidc
    forms = "'self'" if oidc is None else f"'self' {oidc.naming.keycloak_url.rstrip('/')}"
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": CSP.format(forms=forms)}
    return Response(html, status_code=status, media_type="text/html; charset=utf-8", headers=headers)


class PagesController(Controller):
    path = "/admin"
    include_in_schema = False

    @get("/", summary="The admin dashboard")
    async def dashboard(self, request: Request[Any, Any, Any]) -> Response[Any]:
        auth = _auth(request)
        session = await auth.session(request.cookies.get(auth.policy.cookie))
        if session is None:
            return Redirect("/admin/signin", status_code=303)
        tenant = await auth.tenant(session.tenant_slug)
        tenant_id = authorise_tenant(uuid.UUID(session.tenant_id))
        granted = permissions(session.roles)
        return render(
            request,
            "dashboard.html",
            session=session,
            csrf_token=session.csrf_token,
            tenant_name=await path_editor.tenant_name(request.app.state.engine, tenant_id),
            home_region=tenant.home_region,
            permissions=sorted(str(p) for p in granted),
            paths=await path_editor.list_paths(request.app.state.engine, tenant_id)
            if Permission.PATHS_READ in granted
            else [],
            can_edit=Permission.PATHS_WRITE in granted,
        )

    @get("/audit", summary="The tenant's audit log, newest first (audit:read)")
    async def audit(self, request: Request[Any, Any, Any], kind: FromQuery[str | None] = None) -> Response[Any]:
        auth = _auth(request)
        session = await auth.session(request.cookies.get(auth.policy.cookie))
        if session is None:
            return Redirect("/admin/signin", status_code=303)
        if Permission.AUDIT_READ not in permissions(session.roles):
            await auth.record(
                session.tenant_id,
                "admin.forbidden",
                f"admin:{session.subject}",
                "GET /admin/audit",
                {"permission": str(Permission.AUDIT_READ), "roles": list(session.roles)},
            )
            raise ProblemError(
                403, "forbidden", "your role cannot read the audit log", required_permission="audit:read"
            )
        if kind is not None and not KIND_PATTERN.match(kind):
            raise ProblemError(400, "validation-error", f"kind must match {KIND_PATTERN.pattern}")
        tenant_id = authorise_tenant(uuid.UUID(session.tenant_id))

        async def work(conn: AsyncConnection) -> list[Any]:
            return await audit_repo.latest_entries(conn, tenant_id, kind, 200)

        entries = await run_in_tenant_transaction(request.app.state.engine, tenant_id, work)
        rows = [
            {
                "seq": e.seq,
                "created_at": e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                "kind": e.kind,
                "actor": e.actor,
                "subject": e.subject,
            }
            for e in entries
        ]
        return render(request, "audit.html", session=session, entries=rows, kind=kind)

    @get("/signin", summary="Sign-in page")
    async def signin(self, request: Request[Any, Any, Any]) -> Response[str]:
        return render(request, "signin.html", sso=_auth(request).oidc is not None)

    @get("/logged-out", summary="Signed-out page")
    async def logged_out(self, request: Request[Any, Any, Any]) -> Response[str]:
        return render(request, "logged_out.html")

    @get("/bootstrap", summary="Confirm a one-time bootstrap link (embedded mode)")
    async def bootstrap(self, request: Request[Any, Any, Any], token: FromQuery[str]) -> Response[str]:
        # GET only shows the link's tenant and role; the POST redeems it, so link scanners cannot spend it
        auth = _auth(request)
        try:
            claims = read_bootstrap_token(auth.bootstrap_signing_key, token)
        except LoginError as exc:
            raise ProblemError(400, "login-failed", exc.detail, reason=exc.reason) from None
        return render(request, "bootstrap.html", tenant=claims["t"], role=claims["r"], token=token)

    @get("/static/{name:str}", summary="Admin UI assets")
    async def static(self, name: FromPath[str]) -> Response[bytes]:
        types = {"admin.js": "text/javascript; charset=utf-8", "admin.css": "text/css; charset=utf-8"}
        if name not in types:
            return Response(b"", status_code=404)
        body = resources.files("firstmile.web").joinpath(name).read_bytes()
        return Response(body, media_type=types[name], headers={"Cache-Control": "max-age=300"})
