"""Tables of the admin slice: who logged in to the admin UI."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Column, DateTime, ForeignKey, Table, Text, func
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
