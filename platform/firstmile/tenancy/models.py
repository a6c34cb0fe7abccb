"""Tables of the tenancy slice."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from firstmile.kit.db import metadata

tenants = Table(
    "tenants",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("slug", Text, nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("home_region", Text, nullable=False),
    Column("manifest", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("manifest_hash", Text, nullable=False),
    Column("revision", Integer, nullable=False, server_default=text("1")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("prefix", Text, nullable=False),
    Column("key_hash", LargeBinary, nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("region", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # secret (fm_, server to server) or publishable (fmpk_, the embed SDK's: docs/embed.md)
    Column("kind", Text, nullable=False, server_default="secret"),
    # the web origins a publishable key may be used from (https://app.example.com); empty for secret keys
    Column("origins", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    UniqueConstraint("tenant_id", "key_hash"),
    CheckConstraint("kind IN ('secret', 'publishable')", name="kind"),
    Index("ix_api_keys_key_hash", "key_hash"),
    Index("ix_api_keys_tenant_id_created_at", "tenant_id", "created_at"),
)
