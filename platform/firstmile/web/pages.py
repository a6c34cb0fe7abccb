"""Pages of the admin UI. Data comes from the same services as ``/admin/api``; every page is
served with a strict Content-Security-Policy (no inline script) and may not be framed."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, TypeVar, get_args
from urllib.parse import urlencode

import jinja2
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, URLEncodedBody
from litestar.response import Redirect

from firstmile.admin.api import check_audit_filter, check_csrf
from firstmile.admin.experiments_api import experiment_view
from firstmile.admin.models_api import ModelAdmin
from firstmile.admin.oidc import LoginError
from firstmile.admin.paths import PathEditor
from firstmile.admin.paths import preview as path_preview
from firstmile.admin.rbac import Permission, permissions
from firstmile.admin.reviews_api import STATUSES as REVIEW_STATUSES
from firstmile.admin.reviews_api import age as review_age
from firstmile.admin.reviews_api import find_reviews, pin_view, pins_and_paths, review_filter, review_view
from firstmile.admin.service import AdminAuth, read_bootstrap_token
from firstmile.admin.sessions import AdminSession
from firstmile.analytics import alerting
from firstmile.analytics.alerts import Alert
from firstmile.analytics.service import AnalyticsService
from firstmile.audit.service import AuditService
from firstmile.destinations import service as destinations
from firstmile.experiments import service as experiments
from firstmile.experiments.analysis import analyse
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import SLUG_RE, check_id, check_user_id
from firstmile.nudges import service as nudges
from firstmile.onboarding import paths, review
from firstmile.onboarding.review import OverrideRow, ReviewRow
from firstmile.privacy.service import PrivacyService
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import Operator

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


_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_PERSONA = re.compile(r"^(\*|[A-Za-z0-9_-]{1,64})$")
_LOCALE = re.compile(r"^[a-z]{2,3}$")
STATIC_TYPES = {
    "admin.js": "text/javascript",
    "audit-verify.js": "text/javascript",
    "path-editor.js": "text/javascript",
    "admin-api.js": "text/javascript",
    "reviews.js": "text/javascript",
    "models.js": "text/javascript",
    "analytics.bundle.js": "text/javascript",
    "admin.css": "text/css",
    "favicon.svg": "image/svg+xml",
}  # Litestar adds "; charset=utf-8" to text/*


@cache
def _static(name: str) -> bytes:
    """An asset's bytes, read from the package once per process (never a file read per request)."""
    return resources.files("firstmile.web").joinpath(name).read_bytes()


OPERATORS = get_args(Operator)
"""The predicate operators the editor offers (the manifest's)."""

SECTIONS = {"dashboard.html": "dashboard", "path.html": "dashboard", "experiments.html": "experiments",
            "experiment.html": "experiments", "nudges.html": "nudges", "audit.html": "audit",
            "users.html": "users", "analytics.html": "analytics", "destinations.html": "destinations",
            "reviews.html": "reviews", "models.html": "models"}  # fmt: skip
"""The navigation entry each page belongs to (marked ``aria-current``)."""


def page_html(template: str, context: dict[str, Any]) -> str:
    """A page in the shell of ``base.html``: the navigation the session's roles may use, sign-out, the section."""
    session = context.setdefault("session", None)
    context.setdefault("csrf_token", None)
    context.setdefault("section", SECTIONS.get(template))
    context["nav_permissions"] = {str(p) for p in permissions(session.roles)} if session is not None else set()
    return _environment().get_template(template).render(**context)


def render(auth: AdminAuth | None, template: str, status: int = 200, **context: Any) -> Response[str]:
    html = page_html(template, context)
    oidc = auth.oidc if auth is not None else None
    forms = "'self'" if oidc is None else f"'self' {oidc.naming.keycloak_url.rstrip('/')}"
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": CSP.format(forms=forms)}
    return Response(html, status_code=status, media_type="text/html", headers=headers)


class SignInFirstError(Exception):
    """A page asked for without a session: the controller answers with a redirect to the sign-in page."""


def _to_sign_in(request: Request[Any, Any, Any], exc: SignInFirstError) -> Response[Any]:
    return Redirect("/admin/signin", status_code=303)


async def _session_with(
    auth: AdminAuth, request: Request[Any, Any, Any], permission: Permission, route: str, what: str, verb: str = "read"
) -> AdminSession:
    """The signed-in session; :class:`SignInFirstError` (a 303 to the sign-in page) without one, and a ``403``
    (audited as ``admin.forbidden``) when its roles lack ``permission`` ("your role cannot ``verb`` ``what``")."""
    session = await auth.session(request.cookies.get(auth.policy.cookie))
    if session is None:
        raise SignInFirstError
    if permission not in permissions(session.roles):
        await auth.record_for(
            session,
            "admin.forbidden",
            f"admin:{session.subject}",
            route,
            {"permission": str(permission), "roles": list(session.roles)},
        )
        raise ProblemError(403, "forbidden", f"your role cannot {verb} {what}", required_permission=str(permission))
    return session


def _log_row(r: Any) -> dict[str, Any]:
    """One nudge of the log as the page shows it (``r``: a ``nudges.repository.LogRow``)."""
    decision = r.send.decision
    prior = decision.get("prior") or {}
    verdicts = {}
    for channel, v in (decision.get("policy") or {}).items():
        reasons = f" ({', '.join(v['reasons'])})" if v.get("reasons") else ""
        verdicts[channel] = ("allowed" if v.get("allowed") else "denied") + reasons
    return {
        "created_at": r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        "trigger": r.send.trigger_key,
        "channel": r.send.channel,
        "arm": r.send.arm,
        "status": r.send.status,
        "send_at": r.send.send_at.strftime("%Y-%m-%d %H:%M"),
        "verdicts": verdicts,
        "content": decision.get("content") or {},
        "written_by": (decision.get("personalisation") or {}).get("path", "static"),
        "prior": prior.get("version") or prior.get("fallback"),
        "delivery": r.delivery_status or "",
        "clicked": r.clicked_at is not None,
        "converted": r.converted_at is not None,
        "subject": r.send.subject or "",
        "body": r.send.body,
    }


def _when(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value is not None else None


def _lag(seconds: float | None) -> str:
    """The age of a destination's oldest pending event, for people ("none" when nothing waits)."""
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} d"


def _destination_row(found: destinations.DestinationStatus, by: destinations.DisabledBy | None) -> dict[str, Any]:
    """One destination as the page shows it (the numbers are the service's, as ``destinations status`` prints)."""
    if not found.enabled:
        state, why = "disabled", "turned off in the tenant's manifest (enabled: false): nothing is queued for it"
    elif found.disabled_at is not None:
        who = "" if by is None else " automatically, after sustained failure," if by.automatic else f" by {by.actor}"
        state, why = "disabled", f"disabled{who} at {_when(found.disabled_at)} UTC"
    elif found.credentials_version is None:
        state, why = "no credentials", "no credentials stored: nothing is sent until an operator sets them"
    elif found.failing_since is not None:
        state, why = "failing", f"every attempt has failed since {_when(found.failing_since)} UTC"
    else:
        state, why = "ok", "delivering"
    return {
        "name": found.name, "kind": found.kind, "state": state, "why": why,
        "reason": found.disabled_reason if found.disabled_at is not None else None,
        "disabled": found.disabled_at is not None, "automatic": by is not None and by.automatic,
        "pending": found.pending, "due": found.due, "dead": found.dead, "delivered": found.delivered,
        "lag": _lag(found.oldest_pending_age_s),
        "lag_seconds": "" if found.oldest_pending_age_s is None else f"{found.oldest_pending_age_s:.0f}",
        "last_success": _when(found.last_success_at), "last_error": found.last_error,
        "last_error_at": _when(found.last_error_at),
        "errors": [{"event": d.name, "kind": d.kind, "status": d.status, "attempts": d.attempts, "error": d.error,
                    "at": _when(d.at), "event_id": str(d.event_id)} for d in found.dead_letters],
    }  # fmt: skip


def _review_row(row: ReviewRow, now: datetime) -> dict[str, Any]:
    """One review as the queue page shows it: the API's view, with its times and details for people."""
    return review_view(row, now) | {
        "occurred": _when(row.occurred_at),
        "decided": _when(row.decided_at),
        "details_json": json.dumps(row.details, indent=2, sort_keys=True, ensure_ascii=False),
    }


_DONE = {"enabled": "{name} is enabled: what waited is delivered in order.",
         "not-disabled": "{name} was not disabled: nothing changed.",
         "disabled": "{name} is disabled: its events keep queueing until it is enabled.",
         "already-disabled": "{name} was disabled already: nothing changed.",
         "replayed": "{events} dead letters of {name} are queued again."}  # fmt: skip
"""What the page says after an action (the redirect's ``done``; anything else is not shown)."""


def _notice(done: str | None, name: str | None, events: str | None) -> str | None:
    if done not in _DONE or name is None or not SLUG_RE.fullmatch(name):
        return None
    count = events if events is not None and events.isdigit() and len(events) < 10 else "0"
    return _DONE[done].format(name=name, events=count)


T = TypeVar("T")


async def _manage_destination(
    auth: AdminAuth,
    request: Request[Any, Any, Any],
    name: str,
    action: str,
    csrf_token: str | None,
    work: Callable[[TenantTx, str], Awaitable[T]],
) -> T:
    """``work(tx, actor)`` on the destination ``name`` for a session allowed to ``action`` it
    (``destinations:manage``, the form's CSRF token, a valid name: each refusal is a problem, the first two
    audited); a name the manifest lacks is 404 ``destination-not-found``."""
    route = f"POST /admin/destinations/{{name}}/{action}"
    session = await _session_with(auth, request, Permission.DESTINATIONS_MANAGE, route, "destinations", action)
    await check_csrf(auth, request, session, csrf_token)
    check_id(name, SLUG_RE, "name")
    actor = f"admin:{session.subject}"
    try:
        return await auth.unit_of_work(session).run(lambda tx: work(tx, actor))
    except destinations.DestinationError:
        raise ProblemError(
            404, "destination-not-found", f"your tenant's manifest has no destination {name!r}"
        ) from None


class PagesController(Controller):
    path = "/admin"
    exception_handlers = {SignInFirstError: _to_sign_in}
    include_in_schema = False

    @get("/", summary="The admin dashboard")
    async def dashboard(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        path_editor: NamedDependency[PathEditor],
    ) -> Response[Any]:
        auth = admin_auth
        session = await auth.session(request.cookies.get(auth.policy.cookie))
        if session is None:
            return Redirect("/admin/signin", status_code=303)
        tenant = await auth.tenant(session.tenant_slug)
        granted = permissions(session.roles)

        async def read(tx: TenantTx) -> tuple[str, list[dict[str, Any]]]:
            listed = await path_editor.list_paths(tx) if Permission.PATHS_READ in granted else []
            return await path_editor.tenant_name(tx), listed

        tenant_name, paths = await auth.unit_of_work(session).run(read)
        return render(
            auth,
            "dashboard.html",
            session=session,
            csrf_token=session.csrf_token,
            tenant_name=tenant_name,
            home_region=tenant.home_region,
            permissions=sorted(str(p) for p in granted),
            paths=paths,
            can_edit=Permission.PATHS_WRITE in granted,
        )

    @get("/paths/{key:str}", summary="The path editor: a path's steps and targeting, preview, versions, revert")
    async def path_page(
        self,
        request: Request[Any, Any, Any],
        key: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        path_editor: NamedDependency[PathEditor],
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.PATHS_READ, "GET /admin/paths/{key}", "paths")
        check_id(key, SLUG_RE, "key")

        async def read(tx: TenantTx) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            current = await path_editor.definition(tx, key)
            return current, await path_editor.versions(tx, key)

        current, versions = await auth.unit_of_work(session).run(read)
        definition = current["definition"]
        return render(
            auth, "path.html", session=session, csrf_token=session.csrf_token, key=key, version=current["version"],
            definition=definition, versions=versions,
            preview=path_preview(definition), can_edit=Permission.PATHS_WRITE in permissions(session.roles),
            operators=OPERATORS,
        )  # fmt: skip

    @get("/analytics", summary="The analytics dashboard: funnel, drop-off, cohorts, activation (analytics:read)")
    async def analytics_page(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        path_editor: NamedDependency[PathEditor],
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.ANALYTICS_READ, "GET /admin/analytics", "analytics")

        async def read(tx: TenantTx) -> tuple[list[dict[str, Any]], list[Alert]]:
            return await path_editor.list_paths(tx), await alerting.open_alerts(tx)

        listed, alerts = await auth.unit_of_work(session).run(read)
        query = dict(request.query_params)
        return render(auth, "analytics.html", session=session, csrf_token=session.csrf_token, paths=listed,
                      query=query, path=query.get("path") or (listed[0]["key"] if listed else ""), alerts=alerts,
                      can_acknowledge=Permission.ALERTS_ACKNOWLEDGE in permissions(session.roles))  # fmt: skip

    @post(
        "/analytics/alerts/{alert_id:str}/acknowledge",
        summary="Acknowledge (dismiss) a drop-off alert (alerts:acknowledge; the form's CSRF token; audited)",
        status_code=303,
    )
    async def acknowledge_alert(
        self,
        request: Request[Any, Any, Any],
        alert_id: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        auth = admin_auth
        route = "POST /admin/analytics/alerts/{alert_id}/acknowledge"
        session = await _session_with(auth, request, Permission.ALERTS_ACKNOWLEDGE, route, "alerts", "acknowledge")
        await check_csrf(auth, request, session, data.get("csrf_token"))
        try:
            alert = uuid.UUID(alert_id)
        except ValueError:
            raise ProblemError(400, "validation-error", "alert_id must be an alert's id (a UUID)") from None
        actor, now = f"admin:{session.subject}", datetime.now(UTC)
        try:
            await auth.unit_of_work(session).run(lambda tx: alerting.acknowledge(tx, alert, actor, now))
        except alerting.AlertNotFoundError:
            raise ProblemError(404, "alert-not-found", "no open alert of your tenant has this id") from None
        return Redirect("/admin/analytics", status_code=303)

    @get("/destinations", summary="The tenant's destinations: state, queue, lag, last errors (destinations:read)")
    async def destinations_page(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        done: FromQuery[str | None] = None,
        name: FromQuery[str | None] = None,
        events: FromQuery[str | None] = None,
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.DESTINATIONS_READ, "GET /admin/destinations",
                                      "the destinations")  # fmt: skip

        async def read(tx: TenantTx) -> list[dict[str, Any]]:
            found = await destinations.status(tx, datetime.now(UTC), last_errors=5)
            return [
                _destination_row(f, await destinations.disabled_by(tx, f.name) if f.disabled_at else None)
                for f in found
            ]

        rows = await auth.unit_of_work(session).run(read)
        return render(
            auth, "destinations.html", session=session, csrf_token=session.csrf_token, destinations=rows,
            can_manage=Permission.DESTINATIONS_MANAGE in permissions(session.roles),
            notice=_notice(done, name, events),
        )  # fmt: skip

    @post("/destinations/{name:str}/enable", status_code=303,
          summary="Turn a disabled destination back on (destinations:manage; CSRF; audited)")  # fmt: skip
    async def enable_destination(
        self,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        changed = await _manage_destination(
            admin_auth, request, name, "enable", data.get("csrf_token"),
            lambda tx, actor: destinations.enable(tx, name, actor),
        )  # fmt: skip
        return Redirect(f"/admin/destinations?done={'enabled' if changed else 'not-disabled'}&name={name}",
                        status_code=303)  # fmt: skip

    @post("/destinations/{name:str}/disable", status_code=303,
          summary="Stop delivering to a destination, with a reason (destinations:manage; CSRF; audited)")  # fmt: skip
    async def disable_destination(
        self,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        reason = " ".join((data.get("reason") or "").split())

        async def disable(tx: TenantTx, actor: str) -> bool:
            if not reason or len(reason) > 500:  # checked after the session's permission and CSRF token
                raise ProblemError(400, "validation-error", "reason: say why the destination is disabled (1 to 500 "
                                   "characters)", errors=[{"key": "reason", "message": "1 to 500 characters",
                                                           "source": "body"}])  # fmt: skip
            return await destinations.disable(tx, name, reason, actor)

        changed = await _manage_destination(admin_auth, request, name, "disable", data.get("csrf_token"), disable)
        return Redirect(f"/admin/destinations?done={'disabled' if changed else 'already-disabled'}&name={name}",
                        status_code=303)  # fmt: skip

    @post("/destinations/{name:str}/replay", status_code=303,
          summary="Queue a destination's dead letters again (destinations:manage; CSRF; audited)")  # fmt: skip
    async def replay_destination(
        self,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        data: URLEncodedBody[dict[str, str]],
    ) -> Redirect:
        moved = await _manage_destination(
            admin_auth, request, name, "replay", data.get("csrf_token"),
            lambda tx, actor: destinations.replay(tx, name, None, actor),
        )  # fmt: skip
        return Redirect(f"/admin/destinations?done=replayed&name={name}&events={moved}", status_code=303)

    @get("/reviews", summary="The review queue: filters, decisions, bulk decisions, the pins in force (reviews:read)")
    async def reviews_page(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        status: FromQuery[str | None] = None,
        kind: FromQuery[str | None] = None,
        path: FromQuery[str | None] = None,
        step: FromQuery[str | None] = None,
        older_than: FromQuery[str | None] = None,
        before_id: FromQuery[str | None] = None,
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.REVIEWS_READ, "GET /admin/reviews",
                                      "the review queue")  # fmt: skip
        wanted = review_filter(status=status, kind=kind, path=path, step=step, older_than=older_than,
                               before_id=before_id)  # fmt: skip
        now = datetime.now(UTC)

        async def read(
            tx: TenantTx,
        ) -> tuple[list[ReviewRow], list[OverrideRow], list[str], dict[str, tuple[int, datetime]]]:
            rows = await find_reviews(tx, wanted, now)
            pins, keys = await pins_and_paths(tx, now)
            return rows, pins, keys, await review.queue_summary(tx)

        rows, pins, keys, summary = await auth.unit_of_work(session).run(read)
        granted = permissions(session.roles)
        oldest = min((at for _, at in summary.values()), default=None)
        query = wanted.as_query()
        next_page = None
        if len(rows) == wanted.limit:
            next_page = "/admin/reviews?" + urlencode(query | {"before_id": str(rows[-1].id)})
        can_decide = Permission.REVIEWS_DECIDE in granted
        listed = [_review_row(r, now) for r in rows]
        return render(
            auth, "reviews.html", session=session, csrf_token=session.csrf_token, reviews=listed, filter=wanted,
            filtered=bool(query) or wanted.before_id is not None, statuses=REVIEW_STATUSES, kinds=review.KINDS,
            path_choices=sorted(set(keys) | ({wanted.path} if wanted.path else set())), next_page=next_page,
            pins=[pin_view(p) | {"expires": _when(p.expires_at)} for p in pins], summary=summary,
            oldest=None if oldest is None else review_age((now - oldest).total_seconds()),
            can_decide=can_decide, can_revoke=Permission.OVERRIDES_MANAGE in granted,
            selectable=any(r.status == "pending" and r.kind != "decision" for r in rows),
        )  # fmt: skip

    @get("/models", summary="The tenant's path models: versions, stages, off-policy reports, history (models:read)")
    async def models_page(
        self, request: Request[Any, Any, Any], admin_auth: NamedDependency[AdminAuth],
        model_admin: NamedDependency[ModelAdmin],
    ) -> Response[Any]:  # fmt: skip
        auth = admin_auth
        session = await _session_with(auth, request, Permission.MODELS_READ, "GET /admin/models", "the models")
        settings = await auth.unit_of_work(session).run(tenancy.path_settings)
        found = await model_admin.overview(session.tenant_slug)
        return render(
            auth, "models.html", session=session, csrf_token=session.csrf_token, planner_model=settings[3],
            exploration=settings[4], shared=found["shared"], own=found["own"],
            registry_error=found.get("registry_error"),
            can_promote=Permission.MODELS_PROMOTE in permissions(session.roles),
        )  # fmt: skip

    @get("/audit", summary="The tenant's audit log, newest first (audit:read)")
    async def audit(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        audit_log: NamedDependency[AuditService],
        kind: FromQuery[str | None] = None,
        subject: FromQuery[str | None] = None,
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.AUDIT_READ, "GET /admin/audit", "the audit log")
        kind, subject = kind or None, subject or None  # an empty field of the form: no filter
        check_audit_filter(kind, subject)
        entries = await auth.unit_of_work(session).run(lambda tx: audit_log.latest(tx, kind, 200, subject))
        rows = [
            {
                "seq": e.seq,
                "created_at": e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                "kind": e.kind,
                "actor": e.actor,
                "subject": e.subject,
                "payload": json.dumps(e.payload, indent=2, sort_keys=True, ensure_ascii=False),
            }
            for e in entries
        ]
        return render(auth, "audit.html", session=session, entries=rows, kind=kind, subject=subject)

    @get("/nudges", summary="The nudge log of a user and a preview of the tenant's wordings (audit:read)")
    async def nudges(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        user: FromQuery[str | None] = None,
        trigger: FromQuery[str] = "stuck",
        persona: FromQuery[str] = "*",
        locale: FromQuery[str] = "en",
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.AUDIT_READ, "GET /admin/nudges", "the nudge log")
        problems = [
            f"{name} {why}"
            for name, value, pattern, why in (
                ("user", user or "x", _USER, "must be 1 to 255 printable characters"),
                ("trigger", trigger, _NAME, "must be `stuck` or a trigger id"),
                ("persona", persona, _PERSONA, "must be `*` or a persona (letters, digits, - and _)"),
                ("locale", locale, _LOCALE, "must be a language code such as en or de"),
            )
            if not pattern.match(value)
        ]
        if problems:
            raise ProblemError(400, "validation-error", "; ".join(problems))

        async def read(tx: TenantTx) -> tuple[list[Any], list[nudges.Preview]]:
            log = await nudges.nudge_log(tx, user) if user else []
            return log, await nudges.preview(tx, trigger, persona, locale)

        log, previews = await auth.unit_of_work(session).run(read)
        rows = [_log_row(r) for r in log]
        return render(
            auth, "nudges.html", session=session, user=user or "", rows=rows, previews=previews, trigger=trigger,
            persona=persona, locale=locale,
        )  # fmt: skip

    @get("/users", summary="Look up an end user by id or e-mail: path, progress, decision, nudges, exposures")
    async def users(
        self,
        request: Request[Any, Any, Any],
        admin_auth: NamedDependency[AdminAuth],
        privacy: NamedDependency[PrivacyService],
        q: FromQuery[str | None] = None,
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.USERS_EXPORT, "GET /admin/users", "end users")
        q = (q or "").strip()
        uow, actor = auth.unit_of_work(session), f"admin:{session.subject}"
        matches: list[str] = []
        user: dict[str, Any] | None = None
        if "@" in q:  # an e-mail: found through its blind index, never stored or shown in clear
            if len(q) > 320:
                raise ProblemError(400, "validation-error", "an e-mail address has at most 320 characters")
            matches = await privacy.lookup_by_email(uow, q)
        elif q:
            matches = [check_user_id(q)]
        if len(matches) == 1:
            user = await privacy.overview(uow, matches[0], actor)
            if user is not None:
                user = user | {"nudges": [_log_row(r) for r in user["nudges"]]}
        granted = permissions(session.roles)
        return render(
            auth, "users.html", session=session, csrf_token=session.csrf_token, q=q, matches=matches, user=user,
            can_erase=Permission.USERS_ERASE in granted,
        )  # fmt: skip

    @get("/experiments", summary="The experiment manager: the tenant's experiments and their lifecycle")
    async def experiments_page(
        self, request: Request[Any, Any, Any], admin_auth: NamedDependency[AdminAuth]
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.EXPERIMENTS_READ, "GET /admin/experiments",
                                      "the experiments")  # fmt: skip
        granted = permissions(session.roles)

        async def read(tx: TenantTx) -> tuple[list[dict[str, Any]], list[str]]:
            rows = await experiments.experiments(tx)
            listed = [experiment_view(r, await experiments.exposure_counts(tx, r.id)) for r in rows]
            return listed, sorted(key for key, _, _ in await paths.current_paths(tx))

        listed, path_keys = await auth.unit_of_work(session).run(read)
        return render(
            auth, "experiments.html", session=session, csrf_token=session.csrf_token, experiments=listed,
            paths=path_keys, can_write=Permission.EXPERIMENTS_WRITE in granted,
            can_approve=Permission.EXPERIMENTS_APPROVE in granted,
        )  # fmt: skip

    @get("/experiments/{experiment_id:str}", summary="An experiment's result page")
    async def experiment_page(
        self,
        request: Request[Any, Any, Any],
        experiment_id: FromPath[str],
        admin_auth: NamedDependency[AdminAuth],
        analytics: NamedDependency[AnalyticsService],
    ) -> Response[Any]:
        auth = admin_auth
        session = await _session_with(auth, request, Permission.EXPERIMENTS_READ, "GET /admin/experiments/{id}",
                                      "the experiments")  # fmt: skip
        check_id(experiment_id, SLUG_RE, "experiment_id")
        granted = permissions(session.roles)
        uow = auth.unit_of_work(session)

        async def read(tx: TenantTx) -> tuple[Any, list[tuple[int, Any]]]:
            found = await experiments.experiment(tx, experiment_id)
            return found, await experiments.history(tx, experiment_id) if found is not None else []

        row, looks = await uow.run(read)
        if row is None:
            raise ProblemError(404, "experiment-not-found", f"no experiment {experiment_id!r}")
        result = await analyse(analytics, uow.tenant, row, datetime.now(UTC))
        return render(
            auth, "experiment.html", session=session, csrf_token=session.csrf_token,
            experiment=experiment_view(row), result=result.as_dict(), history=looks,
            can_write=Permission.EXPERIMENTS_WRITE in granted, can_approve=Permission.EXPERIMENTS_APPROVE in granted,
        )  # fmt: skip

    @get("/signin", summary="Sign-in page")
    async def signin(self, admin_auth: NamedDependency[AdminAuth]) -> Response[str]:
        return render(admin_auth, "signin.html", sso=admin_auth.oidc is not None)

    @get("/logged-out", summary="Signed-out page")
    async def logged_out(self, admin_auth: NamedDependency[AdminAuth]) -> Response[str]:
        return render(admin_auth, "logged_out.html")

    @get("/bootstrap", summary="Confirm a one-time bootstrap link (embedded mode)")
    async def bootstrap(self, admin_auth: NamedDependency[AdminAuth], token: FromQuery[str]) -> Response[str]:
        # GET only shows the link's tenant and role; the POST redeems it, so link scanners cannot spend it
        try:
            claims = read_bootstrap_token(admin_auth.bootstrap_signing_key, token)
        except LoginError as exc:
            raise ProblemError(400, "login-failed", exc.detail, reason=exc.reason) from None
        return render(admin_auth, "bootstrap.html", tenant=claims["t"], role=claims["r"], token=token)

    @get("/static/{name:str}", summary="Admin UI assets")
    async def static(self, name: FromPath[str]) -> Response[bytes]:
        if name not in STATIC_TYPES:
            return Response(b"", status_code=404)
        return Response(_static(name), media_type=STATIC_TYPES[name], headers={"Cache-Control": "max-age=300"})
