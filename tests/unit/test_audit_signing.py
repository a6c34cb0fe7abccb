"""Checkpoint signing: key files, key id, the signed body."""

from __future__ import annotations

import base64
import hashlib
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import SecretStr

from firstmile.audit.signing import (
    AuditSigner,
    SigningKeyError,
    checkpoint_body,
    load_public_key,
    verify_signature,
)
from firstmile.settings import DatabaseSettings, Settings
from firstmile.wiring.adapters import audit_signer


def test_body_layout() -> None:
    tenant = uuid.UUID("9a0f1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b")
    root = bytes(range(32))
    body = checkpoint_body(tenant, 1234, root, datetime(2026, 11, 27, 8, 0, 0, 42, tzinfo=UTC))
    assert body == (
        b"firstmile.dev/audit/9a0f1c2e-3b4d-4e5f-8a6b-7c8d9e0f1a2b\n1234\n"
        + base64.b64encode(root)
        + b"\n2026-11-27T08:00:00.000042Z\n"
    )


def test_embedded_key_is_generated_once_private_and_stable(tmp_path: Path) -> None:
    one = AuditSigner.embedded(tmp_path)
    path = tmp_path / "secrets" / "audit_signing_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    two = AuditSigner.embedded(tmp_path)
    assert one.key_id == two.key_id == hashlib.sha256(one.public_key_raw).hexdigest()
    assert len(path.read_text().strip()) == 64


def test_sign_and_verify_with_every_public_key_form(tmp_path: Path) -> None:
    signer = AuditSigner(Ed25519PrivateKey.generate())
    body = b"firstmile.dev/audit/x\n1\nAAAA\n2026-01-01T00:00:00.000000Z\n"
    signature = signer.sign(body)
    for form in (signer.public_key_pem, signer.public_key_raw.hex(), base64.b64encode(signer.public_key_raw).decode()):
        key = load_public_key(form)
        assert verify_signature(key, signature, body)
        assert not verify_signature(key, signature, body + b"x")
    other = Ed25519PrivateKey.generate().public_key()
    assert not verify_signature(other, signature, body)
    with pytest.raises(ValueError):
        load_public_key("not a key")


def test_key_files_hex_and_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    hex_file = tmp_path / "hex"
    hex_file.write_text(seed.hex() + "\n")
    pem_file = tmp_path / "pem"
    pem_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    expected = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert AuditSigner.from_file(hex_file).public_key_raw == expected
    assert AuditSigner.from_file(pem_file).public_key_raw == expected
    assert isinstance(AuditSigner.from_file(pem_file).public_key, Ed25519PublicKey)
    bad = tmp_path / "bad"
    bad.write_text("abcd")
    with pytest.raises(SigningKeyError):
        AuditSigner.from_file(bad)
    with pytest.raises(SigningKeyError):
        AuditSigner.from_file(tmp_path / "missing")


def test_resolve_signer(tmp_path: Path) -> None:
    embedded = Settings(data_dir=tmp_path)
    assert audit_signer(embedded).key_id == AuditSigner.embedded(tmp_path).key_id
    external = Settings(data_dir=tmp_path, database=DatabaseSettings(url=SecretStr("postgresql+asyncpg://x@h/db")))
    with pytest.raises(SigningKeyError):
        audit_signer(external)
    key_file = tmp_path / "k"
    key_file.write_text(bytes(32).hex())
    assert audit_signer(external, key_file).key_id == AuditSigner.from_file(key_file).key_id
