"""API keys: generation, the keyed hash they are stored under, scopes (pure)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from urllib.parse import urlsplit

KEY_PREFIX = "fm_"
SCOPES: tuple[str, ...] = (
    "onboarding:write",
    "onboarding:read",
    "events:write",
    "analytics:read",
    "users:admin",
    "audit:read",
    "reviews:read",
    "reviews:write",
)


def generate_key() -> str:
    """A new key: ``fm_`` and 43 URL-safe characters (256 bits of randomness)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(pepper: bytes, key: str) -> bytes:
    """HMAC-SHA256 of the key under the server's pepper: the only form stored.

    Keys carry 256 bits of entropy, so a fast keyed hash is enough: without the
    pepper a stolen table cannot even be checked against guesses.
    """
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).digest()


def display_prefix(key: str) -> str:
    """The first characters of a key, safe to show in listings and logs."""
    return key[:10]


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 100


def validate_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; known: {list(SCOPES)}")
    if not scopes:
        raise ValueError(f"at least one scope is needed; known: {list(SCOPES)}")
    return tuple(dict.fromkeys(scopes))


# ---- publishable keys (the embed SDK's; docs/embed.md) ------------------------------------------------------

PUBLISHABLE_PREFIX = "fmpk_"
EMBED_SCOPE = "embed"
"""The one scope of a publishable key: the embed API (one user's own checklist and in-app messages)."""
IDENTITY_SECRET_PREFIX = "fmid_"
MAX_ORIGINS = 20
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_IDENTITY_CONTEXT = b"firstmile/embed-identity/v1\x00"


def generate_publishable_key() -> str:
    """A new publishable key: ``fmpk_`` and 32 URL-safe characters (192 bits; it is public, not a secret)."""
    return PUBLISHABLE_PREFIX + secrets.token_urlsafe(24)


def looks_like_publishable(value: str) -> bool:
    return value.startswith(PUBLISHABLE_PREFIX) and 20 <= len(value) <= 100


def identity_secret(pepper: bytes, key_id: uuid.UUID) -> str:
    """The secret the tenant's backend signs identity tokens for the publishable key ``key_id`` with.

    Derived, never stored: HMAC-SHA256 under the server's pepper of a fixed context and the key id, so it
    is as safe as the pepper, can be shown again by an operator (``firstmile keys identity-secret``), and
    changes only with a new key. Its 256 bits are the HS256 key, as its URL-safe base64 text.
    """
    digest = hmac.new(pepper, _IDENTITY_CONTEXT + key_id.bytes, hashlib.sha256).digest()
    return IDENTITY_SECRET_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def normalise_origin(value: str) -> str:
    """A web origin as browsers send it (``https://app.example.com``, ``http://localhost:3000``), or ValueError.

    ``https`` always; ``http`` only for loopback hosts (development). No path, query, user or wildcard.
    """
    parsed = urlsplit(value.strip())
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("https", "http") or not host or "*" in value:
        raise ValueError(f"{value!r} is not an origin: write scheme://host[:port], e.g. https://app.example.com")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ValueError(f"{value!r} is not an origin: no path, query, fragment or credentials")
    shown = f"[{host}]" if ":" in host else host
    if parsed.scheme == "http" and shown not in _LOOPBACK_HOSTS:
        raise ValueError(f"{value!r}: http is allowed only for localhost, 127.0.0.1 and [::1]; use https")
    try:
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: the port is not a number from 0 to 65535") from exc
    default = 443 if parsed.scheme == "https" else 80
    return f"{parsed.scheme}://{shown}" + (f":{port}" if port not in (None, default) else "")


def validate_origins(origins: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The origins of a publishable key, normalised and deduplicated; at least one, at most MAX_ORIGINS."""
    if not origins:
        raise ValueError("a publishable key needs at least one origin (--origin https://app.example.com)")
    valid = tuple(dict.fromkeys(normalise_origin(o) for o in origins))
    if len(valid) > MAX_ORIGINS:
        raise ValueError(f"at most {MAX_ORIGINS} origins per key; got {len(valid)}")
    return valid
