"""Audit log: a queue that writers append to, and a sequencer that gives entries their place.

Until now every audited transaction upserted its tenant's ``audit_heads`` row to chain
its entry, so a tenant's audited requests queued on that row lock until each commit
(one tenant topped out near 260 starts/s). As in a transparency log (Trillian, Certificate
Transparency), writing and sequencing are now split:

* the writer's transaction inserts the entry into ``audit_queue`` with its leaf hash, over
  a canonical form that holds the entry's own id instead of a sequence number
  (:mod:`firstmile.audit.canonical`, version 2), so it commits or rolls back with the
  change it describes and takes no shared lock;
* the sequencer (``firstmile sequencer``, or a task of ``serve`` in embedded mode) takes
  the tenant's head row lock, moves a batch of queued entries into ``audit_entries`` with
  consecutive ``seq``, extends the chain and deletes them from the queue, all in one
  transaction.

``audit_queue`` is as immutable as the log: a trigger refuses UPDATE and TRUNCATE for
every role, and refuses a DELETE unless the row's entry was inserted into
``audit_entries`` by the same transaction (so a queued entry leaves the queue only by
being sequenced). Only ``firstmile_audit_sequencer`` (NOLOGIN) holds the DELETE
privilege, and it deletes only through ``firstmile_audit_dequeue``, a SECURITY DEFINER
function it owns, which the application role may execute: the application role itself
cannot delete from the queue, and the function is bound by the trigger like anyone else.

``audit_entries`` gains ``entry_id`` (null for version 1 entries, unique per tenant
otherwise) and ``sequenced_at`` (when the sequencer placed it: ``sequenced_at -
created_at`` is the entry's merge delay). ``firstmile_audit_queued`` lets the sequencer,
which runs as the application role and so sees one tenant at a time, find the tenants
with queued entries.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIN = "firstmile_admin"
SCHEDULER = "firstmile_audit_scheduler"
SEQUENCER = "firstmile_audit_sequencer"
TENANT_EXPR = "(SELECT nullif(current_setting('firstmile.tenant_id', true), '')::uuid)"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def upgrade() -> None:
    app = _app_role()
    op.add_column("audit_entries", sa.Column("entry_id", postgresql.UUID(as_uuid=True), nullable=True))
    op.add_column("audit_entries", sa.Column("sequenced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "uq_audit_entries_tenant_id_entry_id",
        "audit_entries",
        ["tenant_id", "entry_id"],
        unique=True,
        postgresql_where=sa.text("entry_id IS NOT NULL"),
    )
    op.create_table(
        "audit_queue",
        sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entry_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_audit_queue_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "created_at", "entry_id", name=op.f("pk_audit_queue")),
    )

    op.execute(
        """
        CREATE FUNCTION firstmile_audit_queue_guard() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP = 'DELETE' AND EXISTS (
            SELECT 1 FROM audit_entries e
            WHERE e.tenant_id = OLD.tenant_id AND e.entry_id = OLD.entry_id
              AND e.xmin::text = (pg_current_xact_id()::text::numeric % 4294967296)::text
          ) THEN
            RETURN OLD;
          END IF;
          RAISE EXCEPTION 'audit queue: % on % refused (an entry leaves the queue only by being sequenced)',
            TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_queue_guard BEFORE UPDATE OR DELETE ON audit_queue "
        "FOR EACH ROW EXECUTE FUNCTION firstmile_audit_queue_guard()"
    )
    op.execute(
        "CREATE TRIGGER audit_queue_no_truncate BEFORE TRUNCATE ON audit_queue "
        "FOR EACH STATEMENT EXECUTE FUNCTION firstmile_audit_immutable()"
    )

    op.execute("ALTER TABLE audit_queue ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE audit_queue FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON audit_queue "
        f"USING (tenant_id = {TENANT_EXPR}) WITH CHECK (tenant_id = {TENANT_EXPR})"
    )
    op.execute(f"CREATE POLICY platform_admin ON audit_queue TO {ADMIN} USING (true) WITH CHECK (true)")
    op.execute(f"GRANT SELECT, INSERT ON audit_queue TO {app}")

    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SEQUENCER}') THEN
            CREATE ROLE {SEQUENCER} NOLOGIN NOBYPASSRLS;
          END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        """
    )
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE 'GRANT {SEQUENCER} TO ' || quote_ident(current_user);
          END IF;
        END $$;
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {SEQUENCER}")
    op.execute(f"GRANT SELECT, DELETE ON audit_queue TO {SEQUENCER}")
    op.execute(f"GRANT SELECT ON audit_entries TO {SEQUENCER}")  # the guard's check; row-level security applies
    op.execute(
        """
        CREATE FUNCTION firstmile_audit_dequeue(p_tenant uuid, p_created_at timestamptz[], p_entry_ids uuid[])
        RETURNS bigint
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          WITH gone AS (
            DELETE FROM public.audit_queue q
            USING unnest(p_created_at, p_entry_ids) AS u(created_at, entry_id)
            WHERE q.tenant_id = p_tenant AND q.created_at = u.created_at AND q.entry_id = u.entry_id
            RETURNING 1
          )
          SELECT count(*) FROM gone
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SEQUENCER}")
    op.execute(f"ALTER FUNCTION firstmile_audit_dequeue(uuid, timestamptz[], uuid[]) OWNER TO {SEQUENCER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SEQUENCER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_audit_dequeue(uuid, timestamptz[], uuid[]) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_audit_dequeue(uuid, timestamptz[], uuid[]) TO {app}, {ADMIN}")

    op.execute(f"GRANT SELECT (tenant_id, created_at) ON audit_queue TO {SCHEDULER}")
    op.execute(f"CREATE POLICY audit_scheduler ON audit_queue FOR SELECT TO {SCHEDULER} USING (true)")
    op.execute(
        """
        CREATE FUNCTION firstmile_audit_queued()
        RETURNS TABLE (tenant_id uuid, queued bigint, oldest timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT q.tenant_id, count(*), min(q.created_at) FROM public.audit_queue q GROUP BY q.tenant_id
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {SCHEDULER}")
    op.execute(f"ALTER FUNCTION firstmile_audit_queued() OWNER TO {SCHEDULER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {SCHEDULER}")
    op.execute("REVOKE ALL ON FUNCTION firstmile_audit_queued() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION firstmile_audit_queued() TO {app}, {ADMIN}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS firstmile_audit_dequeue(uuid, timestamptz[], uuid[])")
    op.execute("DROP FUNCTION IF EXISTS firstmile_audit_queued()")
    op.drop_table("audit_queue")
    op.execute("DROP FUNCTION IF EXISTS firstmile_audit_queue_guard()")
    op.drop_index("uq_audit_entries_tenant_id_entry_id", table_name="audit_entries")
    op.drop_column("audit_entries", "sequenced_at")
    op.drop_column("audit_entries", "entry_id")
    op.execute(f"REVOKE ALL ON SCHEMA public FROM {SEQUENCER}")
