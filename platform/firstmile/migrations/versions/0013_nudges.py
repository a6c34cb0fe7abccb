"""Nudges: the sends (decision and delivery state), the bandit's counts, consent and suppression.

Every table is tenant-owned with forced row-level security, like the others. The delivery
worker runs as the application role, which sees one tenant at a time; it finds the tenants
with sends due through the SECURITY DEFINER function ``firstmile_nudges_due``, owned by
``firstmile_progress_scheduler`` (migration 0007), which may read only the ``tenant_id,
status, send_at, claimed_until`` columns of ``nudge_sends``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_progress_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("nudge_sends", "nudge_arm_stats", "nudge_consents", "nudge_suppressions")


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
        "nudge_sends",
        *_tenant("nudge_sends"),
        sa.Column("send_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("trigger_key", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("arm", sa.Text(), nullable=False),
        sa.Column("segment", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("send_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("decision", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("provider_message_id", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "send_id", name=op.f("pk_nudge_sends")),
        sa.UniqueConstraint(
            "tenant_id", "user_id", "trigger_key", name=op.f("uq_nudge_sends_tenant_id_user_id_trigger_key")
        ),
    )
    op.create_index(
        "ix_nudge_sends_tenant_id_due",
        "nudge_sends",
        ["tenant_id", "send_at"],
        postgresql_where=sa.text("status IN ('scheduled', 'sending')"),
    )
    op.create_index("ix_nudge_sends_tenant_id_user_id_sent_at", "nudge_sends", ["tenant_id", "user_id", "sent_at"])
    op.create_table(
        "nudge_arm_stats",
        *_tenant("nudge_arm_stats"),
        sa.Column("segment", sa.Text(), nullable=False),
        sa.Column("arm", sa.Text(), nullable=False),
        sa.Column("successes", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "segment", "arm", name=op.f("pk_nudge_arm_stats")),
    )
    op.create_table(
        "nudge_consents",
        *_tenant("nudge_consents"),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", "channel", "category", name=op.f("pk_nudge_consents")),
    )
    op.create_table(
        "nudge_suppressions",
        *_tenant("nudge_suppressions"),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", "channel", name=op.f("pk_nudge_suppressions")),
    )
    for table in TABLES:
        # DELETE: a user's erasure removes their nudges, consents and suppressions with the rest
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {app}")
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")

    op.execute(f"GRANT SELECT (tenant_id, status, send_at, claimed_until) ON nudge_sends TO {SCHEDULER}")
    op.execute(f"CREATE POLICY nudges_scheduler ON nudge_sends FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_nudges_due()
        RETURNS TABLE (tenant_id uuid, due bigint)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT s.tenant_id, count(*) FROM public.nudge_sends s
          WHERE (s.status = 'scheduled' AND s.send_at <= now())
             OR (s.status = 'sending' AND s.claimed_until <= now())
          GROUP BY s.tenant_id
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_nudges_due() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_nudges_due() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_nudges_due() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_nudges_due()")
    for table in reversed(TABLES):
        op.drop_table(table)
