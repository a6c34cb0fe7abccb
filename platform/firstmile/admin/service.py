"""Admin login, logout and the embedded bootstrap login; every outcome is an audit entry.

:class:`AdminAuth` is what the admin routes call. It starts logins (state, nonce and
PKCE kept server-side, bound to the browser by a cookie), finishes them (one-time
state, code exchange, token validation, roles), creates and ends sessions, and
writes the audit entries: ``admin.login``, ``admin.login_failed``, ``admin.logout``,
``admin.role_change``, ``admin.csrf_refused``, ``admin.forbidden``.

Without Keycloak (the embedded default) there is no OIDC: ``firstmile dev`` prints a
one-time bootstrap link, an HMAC-signed token naming a tenant and a role, that
opens the same kind of session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.admin.oidc import IDP_HINT, LoginError, OidcClient, new_pkce
from firstmile.admin.sessions import AdminSession, LoginState, SessionStore, digest
from firstmile.audit import service as audit
from firstmile.auth.resolver import KeyResolver
from firstmile.kit.auth import wrong_region
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.ids import SLUG_PATTERN
from firstmile.kit.scope import OperatorContext, TenantId, tenant_of
from firstmile.kit.uow import UnitOfWork
from firstmile.sso.tokens import TokenError
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import ADMIN_ROLES
from firstmile.tenancy.service import ResolvedTenant

log = logging.getLogger("firstmile.admin")

STATE_TTL = 600.0
WORKER = OperatorContext("worker:admin-auth")
"""Audits what happens before a session exists (refused logins) for the tenant the login named."""
BOOTSTRAP_TTL = 900.0
_BOOTSTRAP_CONTEXT = b"firstmile admin bootstrap link v1"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    lifetime: float = 8 * 3600.0  # absolute
    idle: float = 1800.0
    secure_cookies: bool = True

    @property
    def cookie(self) -> str:
        # __Host-: Secure, Path=/, no Domain; the browser refuses to let another site or a subdomain set it
        return "__Host-fm_admin" if self.secure_cookies else "fm_admin"

    @property
    def login_cookie(self) -> str:
        return "__Host-fm_login" if self.secure_cookies else "fm_login"


@dataclass(frozen=True, slots=True)
class StartedLogin:
    redirect: str
    browser_secret: str


def _safe_next(value: str | None) -> str:
    """Only same-site admin paths: no open redirect through ``next``."""
    if value and value.startswith("/admin/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/admin/"


class AdminAuth:
    def __init__(
        self,
        engine: AsyncEngine,
        resolver: KeyResolver,
        store: SessionStore,
        policy: SessionPolicy,
        *,
        public_url: str,
        region: str,
        oidc: OidcClient | None,
        pepper: bytes,
    ) -> None:
        self.engine = engine
        self.resolver = resolver
        self.store = store
        self.policy = policy
        self.public_url = public_url.rstrip("/")
        self.region = region
        self.oidc = oidc
        self.bootstrap_signing_key = bootstrap_key(pepper)

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/admin/callback"

    @property
    def logged_out_uri(self) -> str:
        return f"{self.public_url}/admin/logged-out"

    # ------------------------------------------------------------ tenants and audit

    async def tenant(self, slug: str) -> ResolvedTenant:
        """The tenant, served by this region; 404 or 421 problems otherwise."""
        if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
            raise ProblemError(400, "validation-error", "tenant must be a tenant slug (a-z, 0-9, -)")
        tenant = await self.resolver.tenant(slug)
        if tenant is None:
            home = await self.resolver.directory.home_region(slug) if self.resolver.directory else None
            if home is not None and home != self.region:
                raise wrong_region(slug, home, self.region, f"tenant {slug} is homed in {home}; sign in there")
            raise ProblemError(404, "tenant-not-found", f"no tenant {slug!r} is served here")
        if tenant.home_region != self.region:
            raise wrong_region(
                slug, tenant.home_region, self.region, f"tenant {slug} is homed in {tenant.home_region}; sign in there"
            )
        return tenant

    def unit_of_work(self, session: AdminSession) -> UnitOfWork:
        """The unit of work of a signed-in admin: bound to the tenant of the session."""
        return UnitOfWork(self.engine, tenant_of(session))

    async def record(self, tenant_id: str | uuid.UUID, kind: str, actor: str, subject: str, payload: Any) -> None:
        """One audit entry in its own transaction; a failure is logged, never hides the outcome it records."""
        await self._record(WORKER.tenant(uuid.UUID(str(tenant_id))), kind, actor, subject, payload)

    async def record_for(self, session: AdminSession, kind: str, actor: str, subject: str, payload: Any) -> None:
        """:meth:`record` for a signed-in admin's own tenant (refusals of their requests)."""
        await self._record(tenant_of(session), kind, actor, subject, payload)

    async def _record(self, tenant: TenantId, kind: str, actor: str, subject: str, payload: Any) -> None:
        async def work(tx: TenantTx) -> None:
            await audit.append(tx, kind, actor, subject, payload)

        try:
            await UnitOfWork(self.engine, tenant).run(work)
        except Exception:
            log.exception("could not audit %s", kind)

    async def refused(
        self, tenant_id: str | uuid.UUID, reason: str, detail: str, *, shown: str | None = None, **payload: Any
    ) -> LoginError:
        """Audit a refused login as ``admin.login_failed``; the error to raise (message ``shown``, else ``detail``)."""
        await self.record(
            tenant_id,
            "admin.login_failed",
            "admin:anonymous",
            f"login:{reason}",
            payload
            | {
                "reason": reason,
                "detail": detail[:500],
            },
        )
        return LoginError(reason, shown or detail)

    # ------------------------------------------------------------ OIDC login

    async def start_login(self, slug: str, next_path: str | None) -> StartedLogin:
        if self.oidc is None:
            raise ProblemError(
                404, "sso-not-configured", "no Keycloak is configured here: use the bootstrap link printed at start"
            )
        tenant = await self.tenant(slug)
        state, nonce, browser = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        pkce = new_pkce()
        login = LoginState(
            tenant_slug=tenant.tenant_slug,
            tenant_id=str(tenant.tenant_id),
            verifier=pkce.verifier,
            nonce=nonce,
            browser=digest(browser),
            next_path=_safe_next(next_path),
        )
        await self.store.put_state(state, login, STATE_TTL)
        hint = IDP_HINT if await self._has_customer_idp(tenant) else None
        url = self.oidc.authorization_url(
            tenant.tenant_slug,
            redirect_uri=self.redirect_uri,
            state=state,
            nonce=nonce,
            challenge=pkce.challenge,
            idp_hint=hint,
        )
        return StartedLogin(url, browser)

    async def _has_customer_idp(self, tenant: ResolvedTenant) -> bool:
        return await UnitOfWork(self.engine, WORKER.tenant(tenant.tenant_id)).run(tenancy.has_customer_idp)

    async def finish_login(
        self, *, state: str | None, code: str | None, error: str | None, browser_secret: str | None
    ) -> tuple[str, AdminSession, str]:
        """(session id, session, where to go next); :class:`LoginError` after auditing the refusal."""
        if self.oidc is None:
            raise LoginError("sso_not_configured", "no Keycloak is configured here")
        if not state or len(state) > 256:
            raise LoginError("missing_state", "the callback carries no state")
        login, replayed = await self.store.take_state(state)
        if login is None:
            raise LoginError("unknown_state", "no login was started with this state, or it expired")
        if replayed:
            raise await self.refused(login.tenant_id, "replayed_state", "this login state was already used")
        if browser_secret is None or not hmac.compare_digest(digest(browser_secret), login.browser):
            raise await self.refused(login.tenant_id, "browser_mismatch", "the login was started in another browser")
        if error or not code:
            raise await self.refused(
                login.tenant_id, "idp_error", f"the identity provider answered {error or 'no code'}"
            )
        try:
            tokens = await self.oidc.exchange(
                login.tenant_slug, code=code[:4096], verifier=login.verifier, redirect_uri=self.redirect_uri
            )
            identity = await self.oidc.identity(login.tenant_slug, tokens, login.nonce)
        except LoginError as exc:
            await self.refused(login.tenant_id, exc.reason, exc.detail)
            raise
        if not identity.roles:
            raise await self.refused(
                login.tenant_id,
                "no_role",
                "the user has no admin role in this tenant",
                shown="your account has no Firstmile role in this tenant; ask its owner",
                subject=identity.subject,
            )
        now = time.time()
        session = AdminSession(
            tenant_id=login.tenant_id,
            tenant_slug=login.tenant_slug,
            subject=identity.subject,
            name=identity.name,
            email=identity.email,
            roles=identity.roles,
            origin="sso",
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + self.policy.lifetime,
            realm_session=identity.realm_session,
            id_token=identity.id_token,
        )
        session_id = await self._open(session)
        return session_id, session, login.next_path

    async def _open(self, session: AdminSession) -> str:
        session_id = secrets.token_urlsafe(32)  # a new id at every login: no session fixation
        await self.store.save(session_id, session, self.policy.idle)
        actor = f"admin:{session.subject}"

        async def work(tx: TenantTx) -> None:
            tid = tx.tenant
            previous = (
                await tx.execute(
                    text("SELECT roles FROM admin_identities WHERE tenant_id = :t AND subject = :s FOR UPDATE"),
                    {"t": tid, "s": session.subject},
                )
            ).scalar()
            await tx.execute(
                text(
                    "INSERT INTO admin_identities (tenant_id, subject, origin, roles) VALUES (:t, :s, :o, :r) "
                    "ON CONFLICT (tenant_id, subject) DO UPDATE SET roles = EXCLUDED.roles, "
                    "origin = EXCLUDED.origin, last_login_at = now()"
                ),
                {"t": tid, "s": session.subject, "o": session.origin, "r": list(session.roles)},
            )
            await audit.append(
                tx,
                "admin.login",
                actor,
                f"session:{digest(session_id)[:16]}",
                {"origin": session.origin, "roles": list(session.roles), "realm_session": session.realm_session},
            )
            if previous is not None and sorted(previous) != sorted(session.roles):
                await audit.append(
                    tx,
                    "admin.role_change",
                    "identity-provider" if session.origin == "sso" else "operator:bootstrap",
                    f"admin:{session.subject}",
                    {"from": sorted(previous), "to": sorted(session.roles)},
                )

        try:
            await self.unit_of_work(session).run(work)
        except BaseException:
            await self.store.delete(session_id)  # no session without its audit entry
            raise
        return session_id

    # ------------------------------------------------------------ sessions and logout

    async def session(self, session_id: str | None) -> AdminSession | None:
        if not session_id or len(session_id) > 128:
            return None
        return await self.store.load(session_id, self.policy.idle)

    async def logout(self, session_id: str, session: AdminSession) -> str:
        """End the session; where the browser goes next (Keycloak's end-session, or the logged-out page)."""
        await self.store.delete(session_id)
        await self.record(
            session.tenant_id,
            "admin.logout",
            f"admin:{session.subject}",
            f"session:{digest(session_id)[:16]}",
            {"how": "user", "origin": session.origin},
        )
        if session.origin == "sso" and self.oidc is not None:
            return self.oidc.end_session_url(
                session.tenant_slug, id_token=session.id_token, post_logout_redirect_uri=self.logged_out_uri
            )
        return "/admin/logged-out"

    async def backchannel_logout(self, logout_token: str) -> int:
        """End the sessions a back-channel logout token names; :class:`TokenError` when it is not valid."""
        if self.oidc is None:
            raise LoginError("sso_not_configured", "no Keycloak is configured here")
        try:
            request = await self.oidc.logout_request(logout_token)
        except TokenError as exc:
            await self._audit_refused_logout(logout_token, exc)
            raise
        if not await self.store.claim(f"logout-jti:{request.tenant_slug}:{request.jti}", 3600):
            raise LoginError("replayed_logout_token", "this logout token was already used")
        ended = await self.store.end_realm_session(request.tenant_slug, request.sid, request.subject)
        for session in ended:
            await self.record(
                session.tenant_id,
                "admin.logout",
                "identity-provider",
                f"admin:{session.subject}",
                {"how": "backchannel", "realm_session": request.sid},
            )
        return len(ended)

    async def _audit_refused_logout(self, token: str, exc: TokenError) -> None:
        """A refused logout token whose issuer names a tenant here is audited for that tenant."""
        if self.oidc is None:
            return
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            slug = self.oidc.naming.tenant_of_issuer(str(claims.get("iss")))
        except (ValueError, IndexError):
            return
        tenant = await self.resolver.tenant(slug) if slug else None
        if tenant is not None:
            await self.record(
                tenant.tenant_id,
                "admin.logout_refused",
                "anonymous",
                "backchannel-logout",
                {"reason": exc.reason.value, "detail": exc.detail[:500]},
            )

    # ------------------------------------------------------------ the embedded bootstrap login

    def bootstrap_link(self, slug: str, role: str = "owner", ttl: float = BOOTSTRAP_TTL) -> str:
        return f"{self.public_url}/admin/bootstrap?{urlencode({'token': self.bootstrap_token(slug, role, ttl)})}"

    def bootstrap_token(self, slug: str, role: str = "owner", ttl: float = BOOTSTRAP_TTL) -> str:
        return mint_bootstrap_token(self.bootstrap_signing_key, slug, role, ttl)

    async def redeem_bootstrap(self, token: str) -> tuple[str, AdminSession]:
        if self.oidc is not None:
            raise LoginError("bootstrap_disabled", "bootstrap links work only without Keycloak (embedded mode)")
        claims = read_bootstrap_token(self.bootstrap_signing_key, token)
        tenant = await self.tenant(claims["t"])
        if not await self.store.claim(f"bootstrap:{claims['n']}", BOOTSTRAP_TTL * 2):
            raise await self.refused(
                tenant.tenant_id, "replayed_bootstrap_link", "this bootstrap link was already used"
            )
        now = time.time()
        role = str(claims["r"])
        session = AdminSession(
            tenant_id=str(tenant.tenant_id),
            tenant_slug=tenant.tenant_slug,
            subject=f"bootstrap-{role}",
            name=f"Local {role}",
            email="",
            roles=(role,),
            origin="bootstrap",
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + self.policy.lifetime,
        )
        return await self._open(session), session


_SLUG = re.compile(SLUG_PATTERN)


def bootstrap_key(pepper: bytes) -> bytes:
    return hmac.new(pepper, _BOOTSTRAP_CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_bootstrap_token(key: bytes, slug: str, role: str, ttl: float) -> str:
    if role not in ADMIN_ROLES:
        raise ValueError(f"role must be one of {', '.join(ADMIN_ROLES)}")
    if not _SLUG.fullmatch(slug):
        raise ValueError("not a tenant slug")
    body = _b64(
        json.dumps(
            {"t": slug, "r": role, "n": secrets.token_urlsafe(16), "e": int(time.time() + ttl)},
            separators=(",", ":"),
        ).encode()
    )
    return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"


def read_bootstrap_token(key: bytes, token: str) -> dict[str, Any]:
    """The claims of a bootstrap token this installation signed and that has not expired."""
    body, _, mac = (token or "").partition(".")
    if not body or not mac or len(token) > 512:
        raise LoginError("bad_bootstrap_link", "not a bootstrap link token")
    if not hmac.compare_digest(mac, _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())):
        raise LoginError("bad_bootstrap_link", "the bootstrap link is not signed by this installation")
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    if float(claims.get("e", 0)) < time.time():
        raise LoginError("expired_bootstrap_link", "the bootstrap link has expired; restart or mint a new one")
    if claims.get("r") not in ADMIN_ROLES or not _SLUG.fullmatch(str(claims.get("t"))):
        raise LoginError("bad_bootstrap_link", "the bootstrap link names no valid tenant and role")
    return claims


__all__ = [
    "AdminAuth",
    "LoginError",
    "SessionPolicy",
    "StartedLogin",
    "bootstrap_key",
    "mint_bootstrap_token",
    "read_bootstrap_token",
]
