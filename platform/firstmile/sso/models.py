"""Tables of the SSO slice: how far each tenant realm's Keycloak events were copied into the audit log."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Table, Text, func, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from firstmile.kit.db import metadata

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
