"""Tables of the admin slice: who logged in to the admin UI, and the Keycloak event cursor."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Column, DateTime, ForeignKey, Table, Text, func, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from firstmile.kit.db import metadata

admin_identities = Table(
    "admin_identities",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("origin", Text, nullable=False),
    Column("roles", ARRAY(Text), nullable=False),
    Column("first_login_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_login_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("origin IN ('sso', 'bootstrap')", name="origin"),
)
"""Per tenant, each admin who logged in (the realm's subject, never an email) and the roles of their last login."""

sso_event_cursors = Table(
    "sso_event_cursors",
    metadata,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("realm", Text, primary_key=True),
    Column("last_event_time", BigInteger, nullable=False),
    Column("last_event_ids", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
"""How far a tenant realm's Keycloak events have been copied into the audit log."""
