"""Field encryption: the ciphertext format, associated data, AES-256-GCM, the blind index.

Pure: no I/O, no key storage. Keys come from :mod:`firstmile.security.datakeys`.

Ciphertext (text, safe in ``text`` and ``jsonb`` columns)::

    fm1:<base64url without padding of: kind (1 byte) | key_version (4 bytes, big-endian) |
                                       nonce (12 bytes) | AES-256-GCM ciphertext | tag (16 bytes)>

``kind`` is 1 for a field under the tenant data key (``key_version`` is that key's
version) and 2 for a field under a per-user key (``key_version`` is 0: a user has
one live key, found by the row's user id). The associated data is a length-prefixed
encoding of the format, the header, the tenant, the table, the column and the row
id, so a ciphertext moved to another tenant, table, column or row, or with an
edited header, fails authentication.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX: Final = "fm1:"
KIND_TENANT: Final = 1
KIND_USER: Final = 2
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_HEADER: Final = struct.Struct(">BI")
_FIELD_DOMAIN: Final = b"firstmile/field/v1"
_INDEX_DOMAIN: Final = b"firstmile/blind-index/v1"
_MIN_RAW: Final = _HEADER.size + NONCE_BYTES + TAG_BYTES


class DecryptionError(ValueError):
    """A ciphertext that does not decrypt: wrong key, wrong context, tampered, or malformed."""


class MalformedCiphertextError(DecryptionError):
    """Not a Firstmile field ciphertext at all (wrong prefix, bad base64, too short)."""


def encode_aad(*parts: str | bytes) -> bytes:
    """Unambiguous encoding of ``parts``: each is a 4-byte big-endian length then its bytes.

    ``("ab", "c")`` and ``("a", "bc")`` encode differently, so no field can borrow
    bytes from its neighbour. Strings are UTF-8.
    """
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        out += struct.pack(">I", len(data))
        out += data
    return bytes(out)


@dataclass(frozen=True, slots=True)
class FieldContext:
    """Where a value lives: the associated data binds a ciphertext to exactly this place.

    ``row_id`` must be known before the row is written and never change: a natural
    key such as the tenant's ``user_id``, or a UUID chosen by the application.
    """

    tenant_id: uuid.UUID
    table: str
    column: str
    row_id: str

    def aad(self, header: bytes) -> bytes:
        return encode_aad(_FIELD_DOMAIN, header, str(self.tenant_id), self.table, self.column, self.row_id)


@dataclass(frozen=True, slots=True)
class Header:
    """The clear part of a field ciphertext: which key encrypted it."""

    kind: int
    key_version: int


def parse_header(token: str) -> Header:
    """Which key a ciphertext needs, without decrypting it."""
    raw = _decode(token)
    kind, version = _HEADER.unpack_from(raw)
    return Header(kind, version)


def _decode(token: str) -> bytes:
    if not isinstance(token, str) or not token.startswith(PREFIX):
        raise MalformedCiphertextError(f"not a field ciphertext (expected the {PREFIX!r} prefix)")
    body = token[len(PREFIX) :]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedCiphertextError("field ciphertext is not valid base64url") from exc
    if len(raw) < _MIN_RAW:
        raise MalformedCiphertextError("field ciphertext is too short")
    return raw


class FieldKey:
    """An AES-256-GCM key for fields, with its kind and version; counts its uses.

    ``uses`` lets the data key cache retire a key after a maximum number of
    operations (see :class:`firstmile.security.datakeys.DataKeyService`).
    """

    __slots__ = ("_aead", "_header", "kind", "uses", "version")

    def __init__(self, key: bytes, kind: int, version: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"field keys are {KEY_BYTES} bytes, got {len(key)}")
        if kind not in (KIND_TENANT, KIND_USER):
            raise ValueError(f"unknown key kind {kind}")
        self._aead = AESGCM(key)
        self.kind = kind
        self.version = version
        self._header = _HEADER.pack(kind, version)
        self.uses = 0

    def __repr__(self) -> str:  # never the key
        return f"FieldKey(kind={self.kind}, version={self.version}, uses={self.uses})"

    def encrypt(self, plaintext: str | bytes, context: FieldContext) -> str:
        """``fm1:…`` ciphertext of ``plaintext`` bound to ``context``; a fresh random nonce each time."""
        self.uses += 1
        data = plaintext.encode("utf-8") if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, data, context.aad(self._header))
        return PREFIX + base64.urlsafe_b64encode(self._header + nonce + sealed).rstrip(b"=").decode("ascii")

    def decrypt(self, token: str, context: FieldContext) -> bytes:
        """The plaintext, or :class:`DecryptionError` if key, context or bytes do not match."""
        self.uses += 1
        raw = _decode(token)
        header = raw[: _HEADER.size]
        if header != self._header:
            kind, version = _HEADER.unpack(header)
            raise DecryptionError(
                f"ciphertext was made with key kind {kind} version {version}, "
                f"not this key (kind {self.kind} version {self.version})"
            )
        nonce = raw[_HEADER.size : _HEADER.size + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, raw[_HEADER.size + NONCE_BYTES :], context.aad(header))
        except InvalidTag:
            raise DecryptionError(
                "field ciphertext failed authentication: wrong key, wrong context "
                "(tenant, table, column, row) or tampered bytes"
            ) from None

    def decrypt_text(self, token: str, context: FieldContext) -> str:
        return self.decrypt(token, context).decode("utf-8")


def wrap_key(wrapping_key: bytes, key: bytes, aad: bytes) -> bytes:
    """``nonce | AES-256-GCM(key) | tag`` under ``wrapping_key``: how user and index keys are stored."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, key, aad)


def unwrap_key(wrapping_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_key`; :class:`DecryptionError` on any mismatch."""
    if len(wrapped) < NONCE_BYTES + TAG_BYTES:
        raise MalformedCiphertextError("wrapped key is too short")
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionError("wrapped key failed authentication: wrong wrapping key or context") from None


def normalise(field: str, value: str) -> str:
    """The canonical form a blind index is computed over.

    ``email``: Unicode NFKC, trimmed, lower-cased. ``phone``: the digits, with a
    leading ``+`` kept (callers should pass E.164). Anything else: NFKC, trimmed.
    """
    text = unicodedata.normalize("NFKC", value).strip()
    if field == "email":
        return text.lower()
    if field == "phone":
        digits = "".join(ch for ch in text if ch.isdigit())
        return ("+" + digits) if text.startswith("+") else digits
    return text


class IndexKey:
    """The tenant's blind-index key: HMAC-SHA256 over a normalised value, per field."""

    __slots__ = ("_key", "uses")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"index keys are {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.uses = 0

    def __repr__(self) -> str:
        return f"IndexKey(uses={self.uses})"

    def blind_index(self, field: str, value: str) -> bytes:
        """32 bytes; equal for equal normalised values of the same field, unlinkable across fields and tenants."""
        self.uses += 1
        return blind_index(self._key, field, value)


def blind_index(index_key: bytes, field: str, value: str) -> bytes:
    """``HMAC-SHA256(index_key, encode(domain, field, normalise(field, value)))``."""
    message = encode_aad(_INDEX_DOMAIN, field, normalise(field, value))
    return hmac.new(index_key, message, hashlib.sha256).digest()
