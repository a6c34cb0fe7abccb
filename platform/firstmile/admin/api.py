"""Admin routes: the login flow under ``/admin`` and the session-authenticated API under ``/admin/api``.

Every ``/admin/api`` handler declares the permission it needs in ``opt["permission"]``
(``"session"``: any signed-in admin); the router's guard refuses handlers that declare
none (fail closed), checks the role, and checks CSRF on every state-changing method:
the ``X-CSRF-Token`` header must equal the session's token and a cross-site
``Origin``/``Sec-Fetch-Site`` is refused. Refusals are audited.

Handlers get :class:`~firstmile.admin.service.AdminAuth` (``admin_auth``), the path editor,
the privacy and audit services and the session's unit of work (``uow``) by dependency
injection. The middleware and the guard run before injection, so :func:`admin_api_router`
hands them the ``AdminAuth`` as a function of the wiring's.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
from litestar import Controller, Request, Response, Router, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter, URLEncodedBody
from litestar.response import Redirect
from litestar.types import ASGIApp, Guard

from firstmile.admin.experiments_api import ExperimentsAdminController
from firstmile.admin.models_api import ModelsAdminController
from firstmile.admin.oidc import LoginError
from firstmile.admin.paths import PathEditor
from firstmile.admin.rbac import Permission, permissions
from firstmile.admin.reviews_api import OverridesAdminController, ReviewsAdminController
from firstmile.admin.service import STATE_TTL, AdminAuth
from firstmile.admin.sessions import AdminSession
from firstmile.analytics.api import AnalyticsController
from firstmile.audit import schemas
from firstmile.audit.api import read_log
from firstmile.audit.service import KIND_PATTERN, MAX_TEXT, AuditService
from firstmile.audit.signing import ALGORITHM
from firstmile.kit import telemetry
from firstmile.kit.auth import is_preflight
from firstmile.kit.errors import ProblemError, strict_body
from firstmile.kit.ids import SLUG_RE, check_id, check_user_id
from firstmile.kit.uow import UnitOfWork
from firstmile.privacy.api import nothing_held
from firstmile.privacy.service import PrivacyService
from firstmile.sso.tokens import TokenError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "x-csrf-token"


AuthSource = Callable[[], AdminAuth]
"""The wiring's ``AdminAuth``, for the parts that run before dependency injection (middleware, guard)."""


def session_cookie(auth: AdminAuth, session_id: str, max_age: int) -> Cookie:
    return Cookie(
        key=auth.policy.cookie,
        value=session_id,
        path="/",
        httponly=True,
        secure=auth.policy.secure_cookies,
        samesite="lax",  # sent on the top-level redirect back from Keycloak, not on cross-site POSTs
        max_age=max_age,
    )


def expired_cookie(key: str, secure: bool) -> Cookie:
    return Cookie(key=key, value="", path="/", httponly=True, secure=secure, samesite="lax", max_age=0)


# ---------------------------------------------------------------- authentication and authorisation


class AdminSessionMiddleware(AbstractAuthenticationMiddleware):
    """``request.user`` is the :class:`AdminSession` of the session cookie; no live session is a 401."""

    def __init__(self, app: ASGIApp, auth: AuthSource) -> None:
        super().__init__(app=app)
        self.auth = auth

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        auth = self.auth()
        session_id = connection.cookies.get(auth.policy.cookie)
        session = await auth.session(session_id)
        if session is None or session_id is None:
            raise ProblemError(401, "unauthenticated", "sign in to the admin UI first: /admin/signin")
        telemetry.tenant_var.set(session.tenant_slug)
        return AuthenticationResult(user=session, auth=session_id)


def _same_origin(value: str | None, public_url: str) -> bool:
    if not value or value == "null":
        return value is None
    mine, theirs = urlsplit(public_url), urlsplit(value)
    return (mine.scheme, mine.netloc) == (theirs.scheme, theirs.netloc)


async def check_csrf(
    auth: AdminAuth, connection: ASGIConnection[Any, Any, Any, Any], session: AdminSession, token: str | None
) -> None:
    """The synchroniser token of the session, and no cross-site origin; refusals are audited (403)."""
    reason = None
    if connection.headers.get("sec-fetch-site") == "cross-site":
        reason = "cross_site_request"
    elif not _same_origin(connection.headers.get("origin"), auth.public_url):
        reason = "foreign_origin"
    elif not token or not hmac.compare_digest(token.encode(), session.csrf_token.encode()):
        reason = "missing_or_wrong_token"
    if reason is None:
        return
    await auth.record_for(
        session,
        "admin.csrf_refused",
        f"admin:{session.subject}",
        f"{connection.scope.get('method', '?')} {connection.url.path}"[:1024],
        {"reason": reason},
    )
    raise ProblemError(403, "csrf-failed", f"the request failed the CSRF check ({reason}); nothing was changed")


def authorizer(auth: AuthSource) -> Guard:
    """The router guard of ``/admin/api``: the declared permission, then CSRF on state-changing methods."""

    async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        await _authorize(auth(), connection, handler)

    return authorize


async def _authorize(
    auth: AdminAuth, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    if is_preflight(connection):
        return
    session = connection.user
    if not isinstance(session, AdminSession):
        raise ProblemError(401, "unauthenticated", "sign in to the admin UI first: /admin/signin")
    needed = handler.opt.get("permission")
    if needed is None:  # fail closed: an endpoint that declares nothing is nobody's
        raise ProblemError(403, "forbidden", "this endpoint declares no permission")
    if needed != "session" and Permission(needed) not in permissions(session.roles):
        await auth.record_for(
            session,
            "admin.forbidden",
            f"admin:{session.subject}",
            f"{connection.scope.get('method', '?')} {connection.url.path}"[:1024],
            {"permission": str(needed), "roles": list(session.roles)},
        )
        raise ProblemError(
            403,
            "forbidden",
            f"your role ({', '.join(session.roles)}) lacks the permission {needed}",
            required_permission=str(needed),
        )
    if connection.scope.get("method") not in SAFE_METHODS:
        await check_csrf(auth, connection, session, connection.headers.get(CSRF_HEADER))


# ---------------------------------------------------------------- the login flow (no session needed)


class LoginController(Controller):
    path = "/admin"
    tags = ["admin"]
    include_in_schema = False

    @get("/login", summary="Start an SSO login to a tenant (OIDC code + PKCE)")
    async def login(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        tenant: FromQuery[str],
        next_: Annotated[str | None, QueryParameter(name="next")] = None,
    ) -> Redirect:
        auth = admin_auth
        started = await auth.start_login(tenant, next_)
        cookie = Cookie(
            key=auth.policy.login_cookie,
            value=started.browser_secret,
            path="/",
            httponly=True,
            secure=auth.policy.secure_cookies,
            samesite="lax",
            max_age=int(STATE_TTL),
        )
        return Redirect(started.redirect, status_code=302, cookies=[cookie])

    @get("/callback", summary="Finish an SSO login")
    async def callback(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        state_: Annotated[str | None, QueryParameter(name="state")] = None,
        code: FromQuery[str | None] = None,
        error: FromQuery[str | None] = None,
    ) -> Response[Any]:
        auth = admin_auth
        try:
            session_id, _, next_path = await auth.finish_login(
                state=state_,
                code=code,
                error=error,
                browser_secret=request.cookies.get(auth.policy.login_cookie),
            )
        except LoginError as exc:
            raise ProblemError(
                403 if exc.reason == "no_role" else 400,
                "login-failed",
                f"the login did not complete: {exc.detail}",
                reason=exc.reason,
            ) from None
        return Redirect(
            next_path,
            status_code=303,
            cookies=[
                session_cookie(auth, session_id, int(auth.policy.lifetime)),
                expired_cookie(auth.policy.login_cookie, auth.policy.secure_cookies),
            ],
        )

    @post("/logout", summary="End the admin session (and the realm session)", status_code=303)
    async def logout(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        auth = admin_auth
        session_id = request.cookies.get(auth.policy.cookie)
        session = await auth.session(session_id)
        if session is None or session_id is None:
            return Redirect("/admin/signin", status_code=303)
        await check_csrf(auth, request, session, data.get("csrf_token") or request.headers.get(CSRF_HEADER))
        target = await auth.logout(session_id, session)
        return Redirect(
            target, status_code=303, cookies=[expired_cookie(auth.policy.cookie, auth.policy.secure_cookies)]
        )

    @post(
        "/backchannel-logout",
        summary="OpenID Connect back-channel logout from Keycloak",
        status_code=200,
    )
    async def backchannel_logout(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Response[dict[str, Any]]:
        auth = admin_auth
        token = data.get("logout_token")
        if not token:
            raise ProblemError(400, "validation-error", "logout_token is required")
        try:
            ended = await auth.backchannel_logout(token)
        except TokenError as exc:
            raise ProblemError(
                400, "invalid-logout-token", f"the logout token is refused: {exc.reason.value}"
            ) from None
        except LoginError as exc:
            raise ProblemError(400, "invalid-logout-token", exc.detail, reason=exc.reason) from None
        return Response({"sessions_ended": ended}, headers={"Cache-Control": "no-store"})

    @post("/bootstrap/redeem", summary="Redeem a one-time bootstrap link (embedded mode)", status_code=303)
    async def bootstrap(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        auth = admin_auth
        try:
            session_id, _ = await auth.redeem_bootstrap(data.get("token", ""))
        except LoginError as exc:
            raise ProblemError(400, "login-failed", exc.detail, reason=exc.reason) from None
        return Redirect(
            "/admin/", status_code=303, cookies=[session_cookie(auth, session_id, int(auth.policy.lifetime))]
        )


# ---------------------------------------------------------------- the admin API


class MeOut(msgspec.Struct):
    tenant: dict[str, str]
    user: dict[str, str]
    roles: list[str]
    permissions: list[str]
    csrf_token: str
    expires_at: float
    origin: str


class PathEdit(msgspec.Struct, forbid_unknown_fields=True):
    """What an edit changes (omitted: kept); the shapes inside targeting and steps are the manifest's, checked
    by its rules (``PathSpec``)."""

    name: str | None = None
    description: str | None = None
    priority: int | None = None
    targeting: list[dict[str, Any]] | None = None
    activation_step: str | None = None
    steps: list[dict[str, Any]] | None = None


class PathRevert(msgspec.Struct, forbid_unknown_fields=True):
    version: int


def _changes(data: PathEdit) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}


def _session(request: Request[Any, Any, Any]) -> AdminSession:
    session = request.user
    assert isinstance(session, AdminSession)
    return session


class AdminApiController(Controller):
    path = "/admin/api"
    tags = ["admin"]

    @get("/me", summary="The signed-in admin, their tenant, roles and CSRF token", opt={"permission": "session"})
    async def me(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        uow: NamedDependency[UnitOfWork],
        path_editor: NamedDependency[PathEditor],
    ) -> MeOut:
        session = _session(request)
        tenant = await admin_auth.tenant(session.tenant_slug)
        name = await uow.run(path_editor.tenant_name)
        return MeOut(
            tenant={"slug": session.tenant_slug, "name": name, "home_region": tenant.home_region},
            user={"subject": session.subject, "email": session.email, "name": session.name},
            roles=list(session.roles),
            permissions=sorted(str(p) for p in permissions(session.roles)),
            csrf_token=session.csrf_token,
            expires_at=session.expires_at,
            origin=session.origin,
        )

    @get("/paths", summary="The tenant's current onboarding paths", opt={"permission": Permission.PATHS_READ})
    async def paths(
        self, uow: NamedDependency[UnitOfWork], path_editor: NamedDependency[PathEditor]
    ) -> list[dict[str, Any]]:
        return await uow.run(path_editor.list_paths)

    @patch(
        "/paths/{key:str}",
        summary="Edit a path: any of its fields but the id (a new version; 400 with every error at its field)",
        opt={"permission": Permission.PATHS_WRITE},
    )
    async def edit_path(
        self,
        request: Request[Any, Any, Any],
        key: FromPath[str],
        data: JSONBody[PathEdit],
        uow: NamedDependency[UnitOfWork],
        path_editor: NamedDependency[PathEditor],
    ) -> dict[str, Any]:
        session = _session(request)
        data = strict_body(await request.body(), PathEdit)  # "5" is not a priority
        changes = _changes(data)
        return await uow.run(lambda tx: path_editor.edit(tx, key, changes, actor=f"admin:{session.subject}"))

    @post(
        "/paths/{key:str}/validate",
        summary="Check an edit without publishing it; the checklist a new user would see",
        status_code=200,
        opt={"permission": Permission.PATHS_WRITE},
    )
    async def validate_path(
        self,
        request: Request[Any, Any, Any],
        key: FromPath[str],
        data: JSONBody[PathEdit],
        uow: NamedDependency[UnitOfWork],
        path_editor: NamedDependency[PathEditor],
    ) -> dict[str, Any]:
        changes = _changes(strict_body(await request.body(), PathEdit))
        return await uow.run(lambda tx: path_editor.validate(tx, key, changes))

    @get("/paths/{key:str}/versions", summary="A path's versions, newest first",
         opt={"permission": Permission.PATHS_READ})  # fmt: skip
    async def path_versions(
        self, key: FromPath[str], uow: NamedDependency[UnitOfWork], path_editor: NamedDependency[PathEditor]
    ) -> list[dict[str, Any]]:
        check_id(key, SLUG_RE, "key")
        return await uow.run(lambda tx: path_editor.versions(tx, key))

    @get("/paths/{key:str}/versions/{version:int}", summary="One stored version of a path",
         opt={"permission": Permission.PATHS_READ})  # fmt: skip
    async def path_version(
        self, key: FromPath[str], version: FromPath[int], uow: NamedDependency[UnitOfWork],
        path_editor: NamedDependency[PathEditor],
    ) -> dict[str, Any]:  # fmt: skip
        check_id(key, SLUG_RE, "key")
        return await uow.run(lambda tx: path_editor.definition(tx, key, version))

    @get("/paths/{key:str}/diff", summary="What changed between two versions of a path",
         opt={"permission": Permission.PATHS_READ})  # fmt: skip
    async def path_diff(
        self, key: FromPath[str], uow: NamedDependency[UnitOfWork], path_editor: NamedDependency[PathEditor],
        first: Annotated[int, QueryParameter(name="from", ge=1)],
        second: Annotated[int, QueryParameter(name="to", ge=1)],
    ) -> dict[str, Any]:  # fmt: skip
        check_id(key, SLUG_RE, "key")
        return await uow.run(lambda tx: path_editor.diff(tx, key, first, second))

    @post("/paths/{key:str}/revert", summary="Publish an earlier version's definition as a new version",
          status_code=200, opt={"permission": Permission.PATHS_WRITE})  # fmt: skip
    async def revert_path(
        self, request: Request[Any, Any, Any], key: FromPath[str], data: JSONBody[PathRevert],
        uow: NamedDependency[UnitOfWork], path_editor: NamedDependency[PathEditor],
    ) -> dict[str, Any]:  # fmt: skip
        check_id(key, SLUG_RE, "key")
        session = _session(request)
        version = strict_body(await request.body(), PathRevert).version
        return await uow.run(lambda tx: path_editor.revert(tx, key, version, actor=f"admin:{session.subject}"))

    @get(
        "/users/{user_id:str}/export",
        summary="Export everything held about an end user",
        opt={"permission": Permission.USERS_EXPORT},
    )
    async def export_user(
        self,
        request: Request[Any, Any, Any],
        user_id: FromPath[str],
        uow: NamedDependency[UnitOfWork],
        privacy: NamedDependency[PrivacyService],
    ) -> dict[str, Any]:
        check_user_id(user_id)
        session = _session(request)
        document = await privacy.export(uow, user_id, f"admin:{session.subject}")
        if document is None:
            raise nothing_held(user_id)
        return document

    @delete(
        "/users/{user_id:str}",
        summary="Erase an end user (crypto-shredding)",
        status_code=202,
        opt={"permission": Permission.USERS_ERASE},
    )
    async def erase_user(
        self,
        request: Request[Any, Any, Any],
        user_id: FromPath[str],
        uow: NamedDependency[UnitOfWork],
        privacy: NamedDependency[PrivacyService],
    ) -> dict[str, Any]:
        check_user_id(user_id)
        session = _session(request)
        done = await privacy.erase(uow, user_id, f"admin:{session.subject}")
        if done is None:
            raise nothing_held(user_id)
        return {
            "user_id": done.user_id,
            "key_destroyed": done.key_destroyed,
            "audit_entry_id": str(done.audit_entry_id),
        }

    @get("/audit", summary="The tenant's latest audit entries", opt={"permission": Permission.AUDIT_READ})
    async def audit(
        self,
        uow: NamedDependency[UnitOfWork],
        audit_log: NamedDependency[AuditService],
        kind: FromQuery[str | None] = None,
        subject: FromQuery[str | None] = None,
        limit: FromQuery[int] = 50,
    ) -> list[dict[str, Any]]:
        if not 1 <= limit <= 500:
            raise ProblemError(400, "validation-error", "limit must be in 1..500")
        check_audit_filter(kind, subject)
        entries = await uow.run(lambda tx: audit_log.latest(tx, kind, limit, subject))
        return [
            {
                "seq": e.seq,
                "kind": e.kind,
                "actor": e.actor,
                "subject": e.subject,
                "created_at": e.created_at.isoformat(),
                "payload": e.payload,
            }
            for e in entries
        ]

    @get(
        "/audit/{seq:str}/proof",
        summary="What the audit viewer verifies in the browser: an entry, its inclusion proof, the signed checkpoint",
        opt={"permission": Permission.AUDIT_READ},
    )
    async def audit_proof(
        self, seq: FromPath[str], uow: NamedDependency[UnitOfWork], audit_log: NamedDependency[AuditService]
    ) -> dict[str, Any]:
        if not seq.isascii() or not seq.isdigit() or len(seq) > 18:
            raise ProblemError(400, "validation-error", "seq must be an entry's sequence number (0, 1, …)")
        found = await read_log(uow, lambda tx: audit_log.inclusion_proof(tx, int(seq), None))
        signer = audit_log.signer
        return {
            "tenant": str(uow.tenant),
            "entry": msgspec.to_builtins(schemas.entry_out(found.entry)),
            "leaf_index": found.entry.seq,
            "leaf_hash": found.entry.leaf_hash.hex(),
            "tree_size": found.checkpoint.tree_size,
            "audit_path": [p.hex() for p in found.path],
            "root_hash": found.checkpoint.root_hash.hex(),
            "checkpoint": msgspec.to_builtins(schemas.checkpoint_out(found.checkpoint)),
            "algorithm": ALGORITHM,
            "key_id": signer.key_id,
            "public_key": signer.public_key_raw.hex(),
        }


def check_audit_filter(kind: str | None, subject: str | None) -> None:
    """A 400 for a kind or subject the log cannot hold (the audit viewer's filters)."""
    if kind is not None and not KIND_PATTERN.match(kind):
        raise ProblemError(400, "validation-error", f"kind must match {KIND_PATTERN.pattern}")
    if subject is not None and not 1 <= len(subject) <= MAX_TEXT:
        raise ProblemError(400, "validation-error", f"subject must be 1..{MAX_TEXT} characters")


async def _no_store(response: Response[Any]) -> Response[Any]:
    # answers carry the CSRF token and personal data (exports): never kept by a browser or proxy cache
    response.headers["Cache-Control"] = "no-store"
    return response


class AdminAnalyticsController(AnalyticsController):
    """The analytics API's handlers for the admin UI's dashboard: behind the admin session (``analytics:read``)
    instead of an API key; same parameters, same answers."""

    path = "/admin/api/analytics"
    guards = []
    opt = {"permission": Permission.ANALYTICS_READ}


def admin_api_router(auth: AuthSource) -> Router:
    """``/admin/api`` behind the session middleware and the permission guard (the login routes are outside it)."""
    return Router(
        path="/",
        route_handlers=[
            AdminApiController,
            ExperimentsAdminController,
            AdminAnalyticsController,
            ReviewsAdminController,
            OverridesAdminController,
            ModelsAdminController,
        ],
        middleware=[DefineMiddleware(AdminSessionMiddleware, auth=auth)],
        guards=[authorizer(auth)],
        after_request=_no_store,
        include_in_schema=False,
    )
