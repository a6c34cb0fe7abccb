"""Publishable keys: a second kind of API key, safe to ship in a web page, with the origins it may be used from.

``api_keys.kind`` is ``secret`` (the ``fm_`` keys every key so far is) or ``publishable`` (``fmpk_``,
the embed SDK's key: one user's own checklist and in-app messages, and only from ``origins``).
``firstmile_resolve_api_key`` returns both columns, so the resolver learns the kind and the origins in
the one look-up it already makes. The function is recreated with the same owner and grants as 0002.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESOLVER = "firstmile_key_resolver"
_SIGNATURE = "firstmile_resolve_api_key(bytea)"


def _app_role() -> str:
    role = str(context.config.attributes.get("app_role", "firstmile_app"))
    if not role.replace("_", "").isalnum():
        raise ValueError(f"invalid application role name {role!r}")
    return role


def _resolver(columns: str, selected: str) -> None:
    """(Re)create the SECURITY DEFINER key resolver returning ``columns``, owned and granted as in 0002."""
    app = _app_role()
    op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
    op.execute(
        f"""
        CREATE FUNCTION firstmile_resolve_api_key(p_hash bytea)
        RETURNS TABLE ({columns})
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public
        AS $$
          SELECT {selected}
          FROM public.api_keys k JOIN public.tenants t ON t.id = k.tenant_id
          WHERE k.key_hash = p_hash
          LIMIT 1
        $$
        """
    )
    op.execute(f"GRANT CREATE ON SCHEMA public TO {RESOLVER}")
    op.execute(f"ALTER FUNCTION {_SIGNATURE} OWNER TO {RESOLVER}")
    op.execute(f"REVOKE CREATE ON SCHEMA public FROM {RESOLVER}")
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO {app}")


_BASE_COLUMNS = (
    "key_id uuid, tenant_id uuid, tenant_slug text, home_region text, "
    "tenant_revision integer, scopes text[], key_region text, revoked boolean"
)
_BASE_SELECTED = "k.id, k.tenant_id, t.slug, t.home_region, t.revision, k.scopes, k.region, k.revoked_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("kind", sa.Text(), server_default="secret", nullable=False))
    op.add_column(
        "api_keys",
        sa.Column("origins", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
    )
    op.create_check_constraint(op.f("ck_api_keys_kind"), "api_keys", "kind IN ('secret', 'publishable')")
    _resolver(f"{_BASE_COLUMNS}, kind text, origins text[]", f"{_BASE_SELECTED}, k.kind, k.origins")


def downgrade() -> None:
    _resolver(_BASE_COLUMNS, _BASE_SELECTED)
    op.drop_constraint(op.f("ck_api_keys_kind"), "api_keys", type_="check")
    op.drop_column("api_keys", "origins")
    op.drop_column("api_keys", "kind")
