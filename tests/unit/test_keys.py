"""API key format, keyed hashing and scope validation."""

from __future__ import annotations

import pytest

from firstmile.tenancy import keys


def test_keys_are_random_prefixed_and_hashed_with_the_pepper() -> None:
    a, b = keys.generate_key(), keys.generate_key()
    assert a != b
    assert a.startswith("fm_") and keys.looks_like_key(a)
    assert keys.hash_key(b"p1", a) == keys.hash_key(b"p1", a)
    assert keys.hash_key(b"p1", a) != keys.hash_key(b"p2", a)
    assert a.encode() not in keys.hash_key(b"p1", a)
    assert keys.display_prefix(a) == a[:10]


def test_scopes_are_validated() -> None:
    assert keys.validate_scopes(["onboarding:write", "onboarding:write"]) == ("onboarding:write",)
    with pytest.raises(ValueError, match="unknown scope"):
        keys.validate_scopes(["onboarding:admin"])
    with pytest.raises(ValueError, match="at least one"):
        keys.validate_scopes([])
