"""Field encryption: the format round-trips, and any change of key, context or bytes is refused."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from firstmile.security.crypto import (
    KIND_TENANT,
    KIND_USER,
    PREFIX,
    DecryptionError,
    FieldContext,
    FieldKey,
    IndexKey,
    MalformedCiphertextError,
    blind_index,
    encode_aad,
    normalise,
    parse_header,
    unwrap_key,
    wrap_key,
)

TENANT = uuid.UUID("6f1c2a7e-0000-4000-8000-000000000001")
OTHER_TENANT = uuid.UUID("6f1c2a7e-0000-4000-8000-000000000002")
CTX = FieldContext(TENANT, "end_users", "email", "user-42")


@pytest.fixture
def key() -> FieldKey:
    return FieldKey(os.urandom(32), KIND_USER, 0)


def _raw(token: str) -> bytearray:
    body = token[len(PREFIX) :]
    return bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _token(raw: bytes | bytearray) -> str:
    return PREFIX + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("value", ["alice@example.com", "", "Zoë Ünïcødé 名前 🙂", "x" * 10_000])
def test_round_trip(key: FieldKey, value: str) -> None:
    token = key.encrypt(value, CTX)
    assert token.startswith(PREFIX)
    assert value.encode() not in token.encode() or value == ""
    assert key.decrypt_text(token, CTX) == value


def test_bytes_round_trip_and_fresh_nonce_each_time(key: FieldKey) -> None:
    value = os.urandom(100)
    first, second = key.encrypt(value, CTX), key.encrypt(value, CTX)
    assert first != second  # random nonce: equal plaintexts do not give equal ciphertexts
    assert key.decrypt(first, CTX) == key.decrypt(second, CTX) == value


def test_header_names_the_key() -> None:
    tdk = FieldKey(os.urandom(32), KIND_TENANT, 7)
    header = parse_header(tdk.encrypt("x", CTX))
    assert (header.kind, header.key_version) == (KIND_TENANT, 7)
    assert len(_raw(tdk.encrypt("", CTX))) == 1 + 4 + 12 + 16  # header, nonce, tag: no padding


@pytest.mark.parametrize(
    "wrong",
    [
        FieldContext(OTHER_TENANT, "end_users", "email", "user-42"),
        FieldContext(TENANT, "audit_entries", "email", "user-42"),
        FieldContext(TENANT, "end_users", "phone", "user-42"),
        FieldContext(TENANT, "end_users", "email", "user-43"),
        # the length prefixes keep these apart although the concatenations are equal
        FieldContext(TENANT, "end_usersemail", "", "user-42"),
        FieldContext(TENANT, "end_users", "emailuser-42", ""),
    ],
)
def test_wrong_associated_data_is_refused(key: FieldKey, wrong: FieldContext) -> None:
    token = key.encrypt("alice@example.com", CTX)
    with pytest.raises(DecryptionError, match="failed authentication"):
        key.decrypt(token, wrong)


def test_wrong_key_is_refused(key: FieldKey) -> None:
    token = key.encrypt("alice@example.com", CTX)
    with pytest.raises(DecryptionError):
        FieldKey(os.urandom(32), KIND_USER, 0).decrypt(token, CTX)


@pytest.mark.parametrize(
    ("where", "offset"),
    [("nonce", 5), ("nonce", 16), ("ciphertext", 17), ("ciphertext", 20), ("tag", -1), ("tag", -16)],
)
def test_tampered_bytes_are_refused(key: FieldKey, where: str, offset: int) -> None:
    raw = _raw(key.encrypt("alice@example.com", CTX))
    raw[offset] ^= 0x01
    with pytest.raises(DecryptionError, match="failed authentication"):
        key.decrypt(_token(raw), CTX)


def test_tampered_header_is_refused() -> None:
    raw_key = os.urandom(32)
    v3, v4 = FieldKey(raw_key, KIND_TENANT, 3), FieldKey(raw_key, KIND_TENANT, 4)
    raw = _raw(v3.encrypt("alice@example.com", CTX))
    raw[4] = 4  # the header now claims version 4
    forged = _token(raw)
    with pytest.raises(DecryptionError, match="version 4"):
        v3.decrypt(forged, CTX)
    # a key that matches the forged header still cannot authenticate it: the header is in the AAD
    with pytest.raises(DecryptionError, match="failed authentication"):
        v4.decrypt(forged, CTX)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("alice@example.com", "prefix"),
        ("fm2:AAAA", "prefix"),
        ("fm1:", "too short"),
        ("fm1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"[:30], "too short"),
        ("fm1:!!!!" + "A" * 60, "base64"),
    ],
)
def test_malformed_ciphertexts(key: FieldKey, token: str, message: str) -> None:
    with pytest.raises(MalformedCiphertextError, match=message):
        key.decrypt(token, CTX)


def test_truncated_ciphertext_is_refused(key: FieldKey) -> None:
    token = key.encrypt("alice@example.com", CTX)
    with pytest.raises(DecryptionError):
        key.decrypt(token[:-4], CTX)


def test_keys_never_show_their_material() -> None:
    material = os.urandom(32)
    field_key, index_key = FieldKey(material, KIND_TENANT, 1), IndexKey(material)
    for shown in (repr(field_key), str(field_key), repr(index_key)):
        assert material.hex() not in shown
        assert base64.b64encode(material).decode() not in shown


def test_keys_count_their_uses(key: FieldKey) -> None:
    token = key.encrypt("a", CTX)
    key.decrypt(token, CTX)
    assert key.uses == 2


def test_bad_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        FieldKey(os.urandom(16), KIND_TENANT, 1)
    with pytest.raises(ValueError, match="kind"):
        FieldKey(os.urandom(32), 9, 1)
    with pytest.raises(ValueError, match="32 bytes"):
        IndexKey(b"short")


def test_aad_encoding_is_unambiguous() -> None:
    assert encode_aad("ab", "c") != encode_aad("a", "bc")
    assert encode_aad("", "x") != encode_aad("x", "")
    assert encode_aad("a") == b"\x00\x00\x00\x01a"
    assert encode_aad(b"\x00", "é") == b"\x00\x00\x00\x01\x00\x00\x00\x00\x02\xc3\xa9"


def test_wrapped_keys_are_bound_to_their_context() -> None:
    kek, secret = os.urandom(32), os.urandom(32)
    wrapped = wrap_key(kek, secret, b"user:1")
    assert unwrap_key(kek, wrapped, b"user:1") == secret
    with pytest.raises(DecryptionError):
        unwrap_key(kek, wrapped, b"user:2")
    with pytest.raises(DecryptionError):
        unwrap_key(os.urandom(32), wrapped, b"user:1")
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        unwrap_key(kek, bytes(tampered), b"user:1")
    with pytest.raises(MalformedCiphertextError):
        unwrap_key(kek, b"short", b"user:1")


def test_blind_index_is_stable_normalised_and_keyed() -> None:
    key = os.urandom(32)
    value = blind_index(key, "email", "Alice@Example.com")
    assert len(value) == 32
    assert blind_index(key, "email", "  alice@example.COM \n") == value  # trimmed, lower-cased
    assert blind_index(key, "email", "\uff41\uff4c\uff49\uff43\uff45@example.com") == value  # NFKC: full-width letters
    assert blind_index(key, "email", "alice@example.org") != value
    assert blind_index(os.urandom(32), "email", "alice@example.com") != value  # keyed: per tenant
    assert blind_index(key, "username", "alice@example.com") != value  # per field
    assert IndexKey(key).blind_index("email", "ALICE@example.com") == value
    assert value.hex() not in "alice@example.com"


def test_normalisation() -> None:
    assert normalise("email", "  Bob@Example.COM ") == "bob@example.com"
    assert normalise("phone", "+33 6 12-34 56 78") == "+33612345678"
    assert normalise("phone", "(415) 555 2671") == "4155552671"
    assert normalise("name", "  Zoë  ") == "Zoë"
