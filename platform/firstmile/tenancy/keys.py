"""API keys: generation, the keyed hash they are stored under, scopes (pure)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "fm_"
SCOPES: tuple[str, ...] = (
    "onboarding:write",
    "onboarding:read",
    "events:write",
    "analytics:read",
    "users:admin",
    "audit:read",
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
