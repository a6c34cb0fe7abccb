"""Alembic migrations; run with ``firstmile migrate``."""
