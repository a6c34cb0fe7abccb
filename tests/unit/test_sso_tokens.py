"""The pure parts of access-token validation, with keys made here (Keycloak itself: tests/integration)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from firstmile.settings import Settings
from firstmile.sso.tokens import (
    JwksCache,
    RealmNaming,
    TokenError,
    TokenReason,
    TokenValidator,
    parse_unverified,
)
from firstmile.wiring.adapters import token_validator

BASE = "http://127.0.0.1:58080"
NAMING = RealmNaming(BASE)
AUDIENCE = "firstmile-api"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str, alg: str, use: str = "sig") -> dict[str, Any]:
    public = key.public_key()
    entry = (
        RSAAlgorithm.to_jwk(public, as_dict=True) if alg.startswith("RS") else ECAlgorithm.to_jwk(public, as_dict=True)
    )
    return {**entry, "kid": kid, "alg": alg, "use": use}


class Realm:
    """A realm's JWKS as the cache sees it: a fetch function that counts its calls."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.calls = 0
        self.fail = False

    async def fetch(self, url: str) -> Mapping[str, Any]:
        self.calls += 1
        if self.fail:
            raise ValueError("connection refused")
        assert url == NAMING.jwks_url("acme")
        return {"keys": list(self.keys)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": NAMING.issuer("acme"),
        "aud": ["account", AUDIENCE],
        "sub": "service-account-1",
        "azp": "acme-app",
        "typ": "Bearer",
        "iat": now,
        "exp": now + 300,
        "scope": "profile onboarding:write",
        "firstmile_tenant": "acme",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = RSA_KEY, kid: str = "k1", alg: str = "RS256", **header: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, **header})


def validator(realm: Realm, clock: Clock | None = None, **kwargs: Any) -> TokenValidator:
    return TokenValidator(NAMING, audience=AUDIENCE, fetch=realm.fetch, clock=clock or Clock(), **kwargs)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def refused(v: TokenValidator, token: str, tenant: str | None = "acme") -> TokenReason:
    with pytest.raises(TokenError) as caught:
        await v.validate(token, tenant)
    return caught.value.reason


async def test_a_valid_rs256_and_es256_token_pass() -> None:
    v = validator(Realm(jwk(RSA_KEY, "k1", "RS256"), jwk(EC_KEY, "k2", "ES256")))
    token = await v.validate(sign(claims()), "acme")
    assert token.tenant_slug == "acme"
    assert token.client_id == "acme-app"
    assert token.scopes == {"profile", "onboarding:write"}
    assert (await v.validate(sign(claims(), EC_KEY, "k2", "ES256"))).tenant_slug == "acme"  # tenant from iss


async def test_none_and_hmac_are_refused_before_any_key() -> None:
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    v = validator(realm)
    unsigned = f"{b64({'alg': 'none', 'kid': 'k1'})}.{b64(claims())}."
    assert await refused(v, unsigned) == TokenReason.BAD_SIGNATURE
    # the key-confusion attack: HMAC keyed with the realm's public key
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = f"{b64({'alg': 'HS256', 'kid': 'k1', 'typ': 'JWT'})}.{b64(claims())}"
    mac = base64.urlsafe_b64encode(hmac.new(public_pem, forged.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    assert await refused(v, f"{forged}.{mac}") == TokenReason.BAD_SIGNATURE
    assert realm.calls == 0


async def test_tampered_payload_and_foreign_key_are_bad_signatures() -> None:
    v = validator(Realm(jwk(RSA_KEY, "k1", "RS256")))
    head, _, sig = sign(claims()).split(".")
    tampered = f"{head}.{b64(claims(scope='users:admin audit:read'))}.{sig}"
    assert await refused(v, tampered) == TokenReason.BAD_SIGNATURE
    assert await refused(v, sign(claims(), OTHER_RSA_KEY, "k1")) == TokenReason.BAD_SIGNATURE


async def test_times_with_leeway() -> None:
    v = validator(Realm(jwk(RSA_KEY, "k1", "RS256")), leeway=10)
    now = int(time.time())
    assert await refused(v, sign(claims(exp=now - 11))) == TokenReason.EXPIRED
    await v.validate(sign(claims(exp=now + 5)), "acme")
    assert await refused(v, sign(claims(exp=None))) == TokenReason.MALFORMED
    assert await refused(v, sign(claims(nbf=now + 60))) == TokenReason.NOT_YET_VALID
    assert await refused(v, sign(claims(iat=now + 60))) == TokenReason.NOT_YET_VALID
    assert await refused(v, sign(claims(exp="tomorrow"))) == TokenReason.MALFORMED


async def test_audience() -> None:
    v = validator(Realm(jwk(RSA_KEY, "k1", "RS256")))
    assert await refused(v, sign(claims(aud="account"))) == TokenReason.WRONG_AUDIENCE
    assert await refused(v, sign(claims(aud=None))) == TokenReason.WRONG_AUDIENCE
    await v.validate(sign(claims(aud=AUDIENCE)), "acme")


async def test_issuer_and_tenant() -> None:
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    v = validator(realm)
    assert await refused(v, sign(claims(iss=NAMING.issuer("globex")))) == TokenReason.WRONG_TENANT
    assert await refused(v, sign(claims(iss=f"{BASE}/realms/master"))) == TokenReason.WRONG_ISSUER
    assert (
        await refused(v, sign(claims(iss="http://localhost:58080/realms/firstmile-acme"))) == TokenReason.WRONG_ISSUER
    )
    assert await refused(v, sign(claims(iss=NAMING.issuer("acme") + "/"))) == TokenReason.WRONG_ISSUER
    assert await refused(v, sign(claims(iss=f"{BASE}/realms/firstmile-Acme"))) == TokenReason.WRONG_ISSUER
    assert await refused(v, sign(claims(iss=None))) == TokenReason.WRONG_ISSUER
    assert realm.calls == 0  # none of those made us fetch anything
    assert await refused(v, sign(claims(firstmile_tenant="globex"))) == TokenReason.WRONG_TENANT
    assert await refused(v, sign(claims(firstmile_tenant=None))) == TokenReason.WRONG_TENANT
    assert await refused(v, sign(claims(typ="Refresh"))) == TokenReason.WRONG_TYPE
    assert await refused(v, sign(claims(typ="ID"))) == TokenReason.WRONG_TYPE


async def test_malformed_tokens() -> None:
    v = validator(Realm(jwk(RSA_KEY, "k1", "RS256")))
    for token in ("", "abc", "a.b", "a.b.c", "fm_live_123", f"{b64({'alg': 'RS256', 'kid': 'k1'})}.bm90IGpzb24.x"):
        assert await refused(v, token) == TokenReason.MALFORMED, token
    assert await refused(v, sign(claims(), jku="https://evil.example/jwks")) == TokenReason.BAD_SIGNATURE
    assert await refused(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256")) == TokenReason.UNKNOWN_KEY  # no kid


def test_parse_unverified_needs_an_object() -> None:
    with pytest.raises(TokenError) as caught:
        parse_unverified(f"{b64({'alg': 'RS256'})}.{base64.urlsafe_b64encode(b'[1]').decode().rstrip('=')}.x")
    assert caught.value.reason == TokenReason.MALFORMED


async def test_encryption_keys_and_other_algorithms_do_not_verify() -> None:
    realm = Realm(jwk(RSA_KEY, "k1", "RSA-OAEP", use="enc"), jwk(EC_KEY, "k2", "ES256"))
    v = validator(realm, jwks_min_refetch=30)
    assert await refused(v, sign(claims())) == TokenReason.UNKNOWN_KEY  # k1 is an encryption key
    assert await refused(v, sign(claims(), RSA_KEY, "k2")) == TokenReason.UNKNOWN_KEY  # k2 is ES256, not RS256


async def test_unknown_kid_refetches_at_most_once_per_interval() -> None:
    clock = Clock()
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    v = validator(realm, clock, jwks_min_refetch=30, jwks_max_age=600)
    await v.validate(sign(claims()), "acme")
    assert realm.calls == 1
    await v.validate(sign(claims()), "acme")
    assert realm.calls == 1  # cached
    # a forged kid right after the first fetch: no refetch within the interval
    for _ in range(5):
        assert await refused(v, sign(claims(), kid="forged")) == TokenReason.UNKNOWN_KEY
    assert realm.calls == 1
    # the realm rotates in k2; once the interval has passed, the unknown kid refetches once
    realm.keys.append(jwk(EC_KEY, "k2", "ES256"))
    clock.now += 31
    await v.validate(sign(claims(), EC_KEY, "k2", "ES256"), "acme")
    assert realm.calls == 2
    assert await refused(v, sign(claims(), kid="forged")) == TokenReason.UNKNOWN_KEY
    assert realm.calls == 2


async def test_keys_expire_and_a_failing_fetch_keeps_the_keys_held() -> None:
    clock = Clock()
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    v = validator(realm, clock, jwks_min_refetch=30, jwks_max_age=600)
    await v.validate(sign(claims()), "acme")
    clock.now += 601
    realm.fail = True
    await v.validate(sign(claims()), "acme")  # Keycloak down: the keys held still serve
    assert realm.calls == 2
    await v.validate(sign(claims()), "acme")
    assert realm.calls == 2  # and the next attempt waits the interval
    realm.fail = False
    realm.keys = [jwk(EC_KEY, "k2", "ES256")]  # k1 removed from the realm
    clock.now += 31
    assert await refused(v, sign(claims())) == TokenReason.UNKNOWN_KEY
    assert realm.calls == 3


async def test_no_keys_at_all_is_jwks_unavailable_and_not_retried_at_once() -> None:
    clock = Clock()
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    realm.fail = True
    v = validator(realm, clock, jwks_min_refetch=30)
    assert await refused(v, sign(claims())) == TokenReason.JWKS_UNAVAILABLE
    assert await refused(v, sign(claims())) == TokenReason.JWKS_UNAVAILABLE
    assert realm.calls == 1
    realm.fail = False
    clock.now += 30
    await v.validate(sign(claims()), "acme")


async def test_the_cache_holds_a_bounded_number_of_realms() -> None:
    realm = Realm(jwk(RSA_KEY, "k1", "RS256"))
    cache = JwksCache(realm.fetch, max_age=600, min_refetch=30, max_realms=2, clock=Clock())
    url = NAMING.jwks_url("acme")
    await cache.key(url, "k1", "RS256")
    for other in ("b", "c"):
        cache._entries[other] = cache._entries[url]
    assert len(cache._entries) == 3
    await cache.key(url, "k1", "RS256")  # a known realm is no new entry
    realm.fail = True
    with pytest.raises(TokenError):
        await cache.key("x", "k1", "RS256")
    assert len(cache._entries) <= 2


def test_realm_naming() -> None:
    naming = RealmNaming("https://sso.example.com/", "firstmile-")
    assert naming.issuer("acme") == "https://sso.example.com/realms/firstmile-acme"
    assert naming.jwks_url("acme").endswith("/realms/firstmile-acme/protocol/openid-connect/certs")
    assert naming.tenant_of_issuer("https://sso.example.com/realms/firstmile-acme") == "acme"
    assert naming.tenant_of_issuer("https://sso.example.com/realms/firstmile-acme/x") is None
    assert naming.tenant_of_issuer("https://sso.example.com/realms/master") is None


def test_from_settings() -> None:
    # without FIRSTMILE_KEYCLOAK_URL there is no validator (the wiring then refuses every token)
    assert token_validator(Settings()) is None
    v = token_validator(Settings(keycloak_url=BASE, sso_audience="x", sso_leeway_seconds=3))  # type: ignore[call-arg]
    assert v is not None
    assert (v.audience, v.leeway, v.naming.issuer("a1")) == ("x", 3, f"{BASE}/realms/firstmile-a1")
