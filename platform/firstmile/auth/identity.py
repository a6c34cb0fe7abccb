"""Identity tokens: how a tenant's backend proves to Firstmile which user a browser speaks for (pure).

A publishable key is public, so it cannot say who the user is. The tenant's backend, which has signed
its user in, signs a short-lived token for the embed SDK: a JWT (RFC 7519) with

* header ``{"alg": "HS256", "typ": "JWT"}`` (no other algorithm is accepted, ``none`` least of all);
* ``sub``: the user's id, as the tenant sends it to ``/v1/onboarding/start``;
* ``exp``: when it expires (seconds since the epoch), at most ``max_lifetime_s`` after ``iat`` (or after
  now, without ``iat``);
* optionally ``iat`` (issued at) and ``nbf`` (not before);

signed with HMAC-SHA256 under the key's identity secret (``fmid_…``, :func:`~firstmile.tenancy.keys.identity_secret`),
its text as the HMAC key. This is Intercom's identity verification scheme in JWT form: a user cannot make a
token for another user without the secret, which never leaves the tenant's backend. ``docs/embed.md`` has
the signing code in Python and Node.js.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import jwt

from firstmile.kit.ids import USER_ID_MAX_LENGTH, USER_ID_RE

LEEWAY_S = 30
"""Clock skew tolerated between the tenant's backend and Firstmile, in seconds."""


class IdentityReason(enum.StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    TOO_LONG = "lifetime-too-long"
    NOT_YET = "not-yet-valid"


class IdentityError(ValueError):
    def __init__(self, reason: IdentityReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    expires_at: int


def verify_identity(token: str | None, secret: str, *, max_lifetime_s: int, now: float | None = None) -> Identity:
    """The user a token speaks for, or :class:`IdentityError` saying why not."""
    if not token:
        raise IdentityError(IdentityReason.MISSING, "send the user's identity token as 'X-Firstmile-Identity'")
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise IdentityError(IdentityReason.MALFORMED, "the identity token is not a JWT") from None
    if header.get("alg") != "HS256":
        raise IdentityError(IdentityReason.MALFORMED, "the identity token must be signed with HS256")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["sub", "exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidSignatureError:
        raise IdentityError(IdentityReason.BAD_SIGNATURE, "the identity token's signature does not hold") from None
    except jwt.PyJWTError as exc:
        raise IdentityError(IdentityReason.MALFORMED, f"the identity token is not accepted: {exc}") from None
    sub, exp, iat, nbf = claims.get("sub"), claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not isinstance(sub, str) or not all(isinstance(v, int) for v in (exp, iat or 0, nbf or 0)):
        raise IdentityError(IdentityReason.MALFORMED, "sub must be a string and exp, iat, nbf whole seconds")
    assert isinstance(exp, int)
    if len(sub) > USER_ID_MAX_LENGTH or not USER_ID_RE.fullmatch(sub):
        raise IdentityError(IdentityReason.MALFORMED, "sub is not a valid user id")
    if exp < now - LEEWAY_S:
        raise IdentityError(IdentityReason.EXPIRED, "the identity token has expired: the backend signs a new one")
    if isinstance(nbf, int) and nbf > now + LEEWAY_S:
        raise IdentityError(IdentityReason.NOT_YET, "the identity token is not valid yet (nbf)")
    issued = iat if isinstance(iat, int) else now
    if isinstance(iat, int) and iat > now + LEEWAY_S:
        raise IdentityError(IdentityReason.NOT_YET, "the identity token was issued in the future (iat)")
    if exp - issued > max_lifetime_s:
        raise IdentityError(
            IdentityReason.TOO_LONG, f"an identity token may live at most {max_lifetime_s} s (exp - iat)"
        )
    return Identity(sub, exp)


__all__ = ["LEEWAY_S", "Identity", "IdentityError", "IdentityReason", "verify_identity"]
