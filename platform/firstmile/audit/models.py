"""The audit log's tables (migration ``0004``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Index, LargeBinary, Table, Text, text
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id"), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("entry_hash", LargeBinary, nullable=False),
    Column("leaf_hash", LargeBinary, nullable=False),
    Column("entry_id", UUID(as_uuid=True), nullable=True),
    Column("sequenced_at", DateTime(timezone=True), nullable=True),
    Index("ix_audit_entries_tenant_id_subject_seq", "tenant_id", "subject", "seq"),
    Index("ix_audit_entries_tenant_id_created_at", "tenant_id", "created_at"),
    Index(
        "uq_audit_entries_tenant_id_entry_id",
        "tenant_id",
        "entry_id",
        unique=True,
        postgresql_where=text("entry_id IS NOT NULL"),
    ),
)
"""Append-only (trigger + privileges). ``entry_hash = SHA-256(prev_hash || canonical)``,
``leaf_hash = SHA-256(0x00 || canonical)``; see :mod:`firstmile.audit.canonical`. Entries
with an ``entry_id`` were queued first (canonical version 2); ``sequenced_at - created_at``
is their merge delay."""

audit_queue = Table(
    "audit_queue",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id"), primary_key=True),
    Column("created_at", DateTime(timezone=True), primary_key=True),
    Column("entry_id", UUID(as_uuid=True), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("leaf_hash", LargeBinary, nullable=False),
)
"""Entries written but not yet sequenced (migration ``0011``): no UPDATE; a DELETE only of
entries sequenced in the same transaction, through ``firstmile_audit_dequeue``. ``payload`` is
the JCS text the writer hashed (migration ``0012``); it becomes ``jsonb`` in ``audit_entries``."""

audit_heads = Table(
    "audit_heads",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id"), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("entry_hash", LargeBinary, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
"""Each tenant's last sequenced entry (seq and hashes); its row lock serialises the sequencers."""

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id"), primary_key=True),
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary, nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", Text, nullable=False),
)
"""Signed tree heads: Ed25519 over :func:`firstmile.audit.checkpoint.checkpoint_body`."""
