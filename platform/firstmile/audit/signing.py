"""Checkpoint signing: the region's Ed25519 key and the signed checkpoint body.

The key file holds the 32-byte Ed25519 private seed as 64 hex characters (what
:func:`firstmile.kit.secrets.secret_file` generates for the embedded default,
``<data_dir>/secrets/audit_signing_key``, mode 0600), or a PKCS#8 PEM private
key. The key id is the hex SHA-256 of the raw 32-byte public key.

A checkpoint body, which the signature covers, is four lines of UTF-8, each
ending in ``\\n``, in the style of a C2SP ``tlog-checkpoint`` / RFC 9162 STH::

    firstmile.dev/audit/<tenant uuid>
    <tree size, decimal>
    <root hash, standard base64>
    <signed_at, RFC 3339 UTC with 6 fractional digits and Z>
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firstmile.audit.canonical import format_timestamp

ORIGIN_PREFIX = "firstmile.dev/audit/"
ALGORITHM = "Ed25519"


class SigningKeyError(RuntimeError):
    """The signing key file is missing or unreadable."""


def checkpoint_body(tenant_id: uuid.UUID, tree_size: int, root_hash: bytes, signed_at: datetime) -> bytes:
    """The exact bytes an Ed25519 checkpoint signature covers (see the module docstring)."""
    return (
        f"{ORIGIN_PREFIX}{tenant_id}\n{tree_size}\n{base64.b64encode(root_hash).decode('ascii')}\n"
        f"{format_timestamp(signed_at)}\n"
    ).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(data: bytes | str) -> Ed25519PublicKey:
    """A public key from 64 hex characters (raw key), standard base64 of the raw key, or PEM."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    text = text.strip()
    if "BEGIN" in text:
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("public key must be PEM, 64 hex characters or base64 of 32 bytes") from exc
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, body: bytes) -> bool:
    try:
        public_key.verify(signature, body)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class AuditSigner:
    """The region's checkpoint signing key."""

    private_key: Ed25519PrivateKey

    @classmethod
    def from_file(cls, path: Path) -> AuditSigner:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"audit signing key {path}: {exc.strerror or exc}") from exc
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "key") -> AuditSigner:
        text = data.strip()
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise SigningKeyError(f"audit signing key {where}: not an Ed25519 private key")
            return cls(key)
        try:
            seed = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SigningKeyError(f"audit signing key {where}: expected 64 hex characters or PEM") from exc
        if len(seed) != 32:
            raise SigningKeyError(f"audit signing key {where}: an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def embedded(cls, data_dir: Path) -> AuditSigner:
        """The embedded default: ``<data_dir>/secrets/audit_signing_key``, generated once (0600)."""
        from firstmile.kit.secrets import secret_file

        return cls.from_file(secret_file(data_dir, "audit_signing_key"))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def public_key_raw(self) -> bytes:
        return raw_public_key(self.public_key)

    @property
    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def sign(self, body: bytes) -> bytes:
        return self.private_key.sign(body)


def resolve_signer(key_file: Path | None, *, embedded_data_dir: Path | None) -> AuditSigner:
    """The region's signer: ``key_file`` when one is configured, else (embedded mode only, when
    ``embedded_data_dir`` is given) ``<data_dir>/secrets/audit_signing_key``, generated once."""
    if key_file is not None:
        return AuditSigner.from_file(Path(key_file))
    if embedded_data_dir is None:
        raise SigningKeyError("FIRSTMILE_AUDIT_SIGNING_KEY_FILE must be set when FIRSTMILE_DATABASE_URL is")
    return AuditSigner.embedded(embedded_data_dir)
