"""Wire types of the audit API. Hashes, signatures and raw keys are lower-case hex."""

from __future__ import annotations

from typing import Any

import msgspec

from firstmile.audit.canonical import format_timestamp
from firstmile.audit.repository import AuditEntry, CheckpointRow, QueuedEntry
from firstmile.audit.signing import ALGORITHM, AuditSigner, checkpoint_body


class Entry(msgspec.Struct, kw_only=True):
    seq: int
    id: str | None
    """The id the entry was given when written (a UUID); null for entries written before the queue."""
    kind: str
    actor: str
    subject: str
    payload: Any
    created_at: str
    """RFC 3339 UTC with 6 fractional digits, exactly as in the canonical encoding."""
    prev_hash: str
    entry_hash: str
    leaf_hash: str
    sequenced_at: str | None
    """When the sequencer placed it in the log (null for entries written before the queue)."""


class PendingEntry(msgspec.Struct, kw_only=True):
    """An entry that is written (committed) but not yet sequenced: no place, no proof yet."""

    status: str
    """Always ``pending``."""
    id: str
    kind: str
    actor: str
    subject: str
    payload: Any
    created_at: str
    leaf_hash: str
    """``SHA-256(0x00 || canonical)``: the leaf that the entry will be in the tree."""


class EntryPage(msgspec.Struct, kw_only=True):
    entries: list[Entry]
    next_after_seq: int | None
    """Pass as ``after_seq`` for the next page; null on the last page."""


class Checkpoint(msgspec.Struct, kw_only=True):
    tree_size: int
    root_hash: str
    signed_at: str
    key_id: str
    signature: str
    """Ed25519 signature (hex) over ``body``'s UTF-8 bytes."""
    body: str
    """The signed checkpoint text (four lines, each ending in a newline)."""


class CheckpointPage(msgspec.Struct, kw_only=True):
    checkpoints: list[Checkpoint]
    next_after_size: int | None
    algorithm: str
    key_id: str
    public_key: str
    """This region's current public key (raw 32 bytes, hex); checkpoints name the key that signed them."""


class InclusionProof(msgspec.Struct, kw_only=True):
    leaf_index: int
    tree_size: int
    leaf_hash: str
    audit_path: list[str]
    """RFC 9162 inclusion proof, leaf-side sibling first."""
    root_hash: str
    entry: Entry
    checkpoint: Checkpoint


class ConsistencyProof(msgspec.Struct, kw_only=True):
    first: int
    second: int
    first_root: str
    second_root: str
    proof: list[str]
    """RFC 9162 consistency proof."""
    first_checkpoint: Checkpoint
    second_checkpoint: Checkpoint


class PublicKey(msgspec.Struct, kw_only=True):
    algorithm: str
    key_id: str
    """Hex SHA-256 of the raw public key."""
    public_key: str
    """Raw 32-byte Ed25519 public key, hex."""
    public_key_pem: str


def entry_out(entry: AuditEntry) -> Entry:
    return Entry(
        seq=entry.seq,
        id=None if entry.entry_id is None else str(entry.entry_id),
        kind=entry.kind,
        actor=entry.actor,
        subject=entry.subject,
        payload=entry.payload,
        created_at=format_timestamp(entry.created_at),
        prev_hash=entry.prev_hash.hex(),
        entry_hash=entry.entry_hash.hex(),
        leaf_hash=entry.leaf_hash.hex(),
        sequenced_at=None if entry.sequenced_at is None else format_timestamp(entry.sequenced_at),
    )


def pending_out(entry: QueuedEntry) -> PendingEntry:
    return PendingEntry(
        status="pending",
        id=str(entry.entry_id),
        kind=entry.kind,
        actor=entry.actor,
        subject=entry.subject,
        payload=entry.payload,
        created_at=format_timestamp(entry.created_at),
        leaf_hash=entry.leaf_hash.hex(),
    )


def checkpoint_out(cp: CheckpointRow) -> Checkpoint:
    return Checkpoint(
        tree_size=cp.tree_size,
        root_hash=cp.root_hash.hex(),
        signed_at=format_timestamp(cp.signed_at),
        key_id=cp.key_id,
        signature=cp.signature.hex(),
        body=checkpoint_body(cp.tenant_id, cp.tree_size, cp.root_hash, cp.signed_at).decode("utf-8"),
    )


def public_key_out(signer: AuditSigner) -> PublicKey:
    return PublicKey(
        algorithm=ALGORITHM,
        key_id=signer.key_id,
        public_key=signer.public_key_raw.hex(),
        public_key_pem=signer.public_key_pem,
    )
