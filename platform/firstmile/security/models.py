"""Tables of key management: wrapped tenant data keys and wrapped per-user keys.

Nothing here is ever stored in plaintext: ``tenant_data_keys.wrapped_key`` is wrapped
by the key provider (``purpose='data'``) or by the tenant data key (``purpose='index'``),
``user_keys.wrapped_key`` by the tenant data key of version ``tdk_version``.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID

from firstmile.kit.db import metadata

tenant_data_keys = Table(
    "tenant_data_keys",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("purpose", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("wrapped_key", Text, nullable=False),
    Column("provider_key_version", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("retired_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("purpose IN ('data', 'index')", name="purpose"),
    CheckConstraint("version >= 1", name="version"),
    Index(
        "uq_tenant_data_keys_current",
        "tenant_id",
        "purpose",
        unique=True,
        postgresql_where=text("retired_at IS NULL"),
    ),
)
"""Per tenant: data key versions (one current) and the blind-index key; the app may SELECT and INSERT."""

user_keys = Table(
    "user_keys",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Text, primary_key=True),
    Column("tdk_version", Integer, nullable=False),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
"""One key per end user; deleting the row crypto-shreds every field encrypted under it."""
