"""Destinations: the delivery queue of each tenant's destinations, their credentials and their state.

``destination_queue``: what each destination has to receive (lifecycle events and erasures), unique per
destination, event and kind; ``destination_credentials``: each destination's credentials, encrypted with the
tenant's data key; ``destination_state``: failures, successes and whether it is disabled (docs/destinations.md).
Tenant-owned with forced row-level security, like every table.

The delivery worker runs as the application role, which sees one tenant at a time; it finds the destinations with
events to send through the SECURITY DEFINER function ``firstmile_destinations_due``, and those with finished rows
past their retention through ``firstmile_destinations_finished``, both owned by ``firstmile_progress_scheduler``
(migration 0007), which may read only the ``tenant_id, destination, status, next_attempt_at, claimed_until,
created_at, finished_at`` columns of ``destination_queue``.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("destination_queue", "destination_credentials", "destination_state")
_COLUMNS = "tenant_id, destination, status, next_attempt_at, claimed_until, created_at, finished_at"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def _tenant(table: str) -> list[sa.Column[object] | sa.ForeignKeyConstraint]:
    return [
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"), ondelete="CASCADE"
        ),
    ]


def upgrade() -> None:
    app = _app_role()
    now = sa.text("now()")
    op.create_table(
        "destination_queue",
        *_tenant("destination_queue"),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("claim_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcome", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_destination_queue")),
        sa.UniqueConstraint("tenant_id", "destination", "event_id", "kind", name="uq_destination_queue_once"),
    )
    op.create_index(
        "ix_destination_queue_pending",
        "destination_queue",
        ["tenant_id", "destination", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_destination_queue_pending_user",
        "destination_queue",
        ["tenant_id", "destination", "user_id", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_destination_queue_finished",
        "destination_queue",
        ["tenant_id", "finished_at"],
        postgresql_where=sa.text("status <> 'pending'"),
    )
    op.create_index("ix_destination_queue_tenant_id_user_id", "destination_queue", ["tenant_id", "user_id"])
    op.create_table(
        "destination_credentials",
        *_tenant("destination_credentials"),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("previous", sa.Text(), nullable=True),
        sa.Column("previous_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("updated_by", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "destination", name=op.f("pk_destination_credentials")),
    )
    op.create_table(
        "destination_state",
        *_tenant("destination_state"),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "destination", name=op.f("pk_destination_state")),
    )
    for table in TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {app}")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")

    op.execute(f"GRANT SELECT ({_COLUMNS}) ON destination_queue TO {SCHEDULER}")
    op.execute(f"CREATE POLICY destinations_scheduler ON destination_queue FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_destinations_due()
        RETURNS TABLE (tenant_id uuid, destination text, due bigint, pending bigint, oldest timestamptz,
                       oldest_due timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT q.tenant_id, q.destination,
                 count(*) FILTER (WHERE q.next_attempt_at <= now()
                                  AND (q.claimed_until IS NULL OR q.claimed_until <= now())),
                 count(*), min(q.created_at),
                 min(q.created_at) FILTER (WHERE q.next_attempt_at <= now()
                                           AND (q.claimed_until IS NULL OR q.claimed_until <= now()))
          FROM public.destination_queue q
          WHERE q.status = 'pending'
          GROUP BY q.tenant_id, q.destination
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION firstmile_destinations_finished(before timestamptz)
        RETURNS TABLE (tenant_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT DISTINCT q.tenant_id FROM public.destination_queue q
          WHERE q.status <> 'pending' AND q.finished_at < before
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    for function in ("firstmile_destinations_due()", "firstmile_destinations_finished(timestamptz)"):
        op.execute(f"ALTER FUNCTION {function} OWNER TO {SCHEDULER}")
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {app}, {ADMIN}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_destinations_finished(timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS firstmile_destinations_due()")
    for table in reversed(TABLES):
        op.drop_table(table)
