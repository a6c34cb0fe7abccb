"""Audit log: hash-chained entries, per-tenant heads, signed Merkle checkpoints.

``audit_entries`` is append-only: a trigger refuses UPDATE, DELETE and TRUNCATE
for every role (the owner and superusers included, unless they disable the
trigger, which ``audit verify`` is there to catch), and the application role is
granted only SELECT and INSERT. ``audit_checkpoints`` is protected the same way.
``audit_heads`` holds each tenant's last sequence number and hash; appends
upsert it, which serialises them per tenant under its row lock.

The checkpointer runs as the application role, which sees one tenant at a time;
it finds the tenants that need a checkpoint through the SECURITY DEFINER
function ``firstmile_audit_pending`` owned by ``firstmile_audit_scheduler``,
which may only read ``audit_heads``, ``audit_checkpoints`` and the
``tenant_id, seq, created_at`` columns of ``audit_entries``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_audit_scheduler"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"
TABLES = ("audit_entries", "audit_heads", "audit_checkpoints")
IMMUTABLE = ("audit_entries", "audit_checkpoints")


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def _hash(name: str) -> sa.Column[bytes]:
    return sa.Column(name, sa.LargeBinary(), nullable=False)


def upgrade() -> None:
    app = _app_role()
    op.create_table(
        "audit_entries",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _hash("prev_hash"),
        _hash("entry_hash"),
        _hash("leaf_hash"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_audit_entries_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "seq", name=op.f("pk_audit_entries")),
    )
    op.create_index(op.f("ix_audit_entries_tenant_id_subject_seq"), "audit_entries", ["tenant_id", "subject", "seq"])
    op.create_index(op.f("ix_audit_entries_tenant_id_created_at"), "audit_entries", ["tenant_id", "created_at"])
    op.create_table(
        "audit_heads",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        _hash("entry_hash"),
        _hash("prev_hash"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_audit_heads_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_audit_heads")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        _hash("root_hash"),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        _hash("signature"),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_audit_checkpoints_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "tree_size", name=op.f("pk_audit_checkpoints")),
    )

    op.execute(
        """
        CREATE FUNCTION firstmile_audit_immutable() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    for table in IMMUTABLE:
        op.execute(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION firstmile_audit_immutable()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION firstmile_audit_immutable()"
        )

    op.execute(f"GRANT SELECT, INSERT ON audit_entries, audit_checkpoints TO {app}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON audit_heads TO {app}")
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
        )
        op.execute(f"CREATE POLICY platform_admin ON {table} TO {ADMIN} USING (true) WITH CHECK (true)")

    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SCHEDULER}') THEN
            CREATE ROLE {SCHEDULER} NOLOGIN NOBYPASSRLS;
          END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        """
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'GRANT {SCHEDULER} TO ' || quote_ident(current_user);
          END IF;
        END $$;
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"GRANT SELECT ON audit_heads, audit_checkpoints TO {SCHEDULER}")
    op.execute(f"GRANT SELECT (tenant_id, seq, created_at) ON audit_entries TO {SCHEDULER}")
    for table in TABLES:
        op.execute(f"CREATE POLICY audit_scheduler ON {table} FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_audit_pending(p_every_entries bigint, p_every_seconds double precision)
        RETURNS TABLE (tenant_id uuid, log_size bigint, checkpoint_size bigint)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT h.tenant_id, h.seq + 1, coalesce(c.tree_size, 0)
          FROM public.audit_heads h
          LEFT JOIN LATERAL (
            SELECT cp.tree_size FROM public.audit_checkpoints cp
            WHERE cp.tenant_id = h.tenant_id ORDER BY cp.tree_size DESC LIMIT 1
          ) c ON true
          WHERE h.seq + 1 > coalesce(c.tree_size, 0)
            AND (h.seq + 1 - coalesce(c.tree_size, 0) >= p_every_entries
                 OR (SELECT e.created_at FROM public.audit_entries e
                     WHERE e.tenant_id = h.tenant_id AND e.seq = coalesce(c.tree_size, 0))
                    <= now() - make_interval(secs => p_every_seconds))
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_audit_pending(bigint, double precision) OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_audit_pending(bigint, double precision) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_audit_pending(bigint, double precision) TO {app}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_audit_pending(bigint, double precision)")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_heads")
    op.drop_index(op.f("ix_audit_entries_tenant_id_created_at"), table_name="audit_entries")
    op.drop_index(op.f("ix_audit_entries_tenant_id_subject_seq"), table_name="audit_entries")
    op.drop_table("audit_entries")
    op.execute("DROP FUNCTION IF EXISTS firstmile_audit_immutable()")
    op.execute(f"REVOKE ALL ON SCHEMA public FROM {SCHEDULER}")
