"""Audit queue: the payload as the canonical text its writer hashed, not ``jsonb``.

A queued entry's leaf hash is over the RFC 8785 (JCS) text of its payload. With the
payload stored as ``jsonb``, the sequencer had to read it back, parse it and canonicalise
it again for every entry before it could check the hash: in `make bench`'s profile of the
embedded API that was about two thirds of the sequencer's CPU. Stored as the exact text
the writer hashed, checking a queued entry is one SHA-256 over bytes it already has.

The queue is transient (an entry leaves it when it is sequenced, within the merge delay),
so ``jsonb``'s checking of the text is not lost: the sequencer casts it to ``jsonb`` when
it moves the entry into ``audit_entries``, whose payload stays ``jsonb``.

Rows queued before this migration (or by a writer of an earlier release during a rolling
upgrade: ``jsonb`` assigns to ``text``) hold ``jsonb``'s text form, which is not JCS; the
sequencer and ``audit verify`` canonicalise those from the parsed payload, as before
(``QueuedEntry.checked_canonical``). Changing the column's type rewrites the table without
firing the queue's row triggers, and the rewrite keeps every row's content.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE audit_queue ALTER COLUMN payload TYPE text USING payload::text")


def downgrade() -> None:
    # JCS text is valid JSON, so every row converts back.
    op.execute("ALTER TABLE audit_queue ALTER COLUMN payload TYPE jsonb USING payload::jsonb")
