"""``firstmile audit``: verify a tenant's log, sign a checkpoint now, print the public key.

Assembled into ``firstmile`` by :mod:`firstmile.cli`. Runs as the operator
(``FIRSTMILE_DATABASE_ADMIN_URL``), whose ``firstmile_admin`` policies see every tenant.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit.signing import AuditSigner
from firstmile.kit.cli import run, services
from firstmile.kit.scope import TenantId

T = TypeVar("T")


class AuditCommandDeps(Protocol):
    """What ``firstmile audit`` needs from the platform (the wiring provides it)."""

    def operator_engine(self) -> AbstractAsyncContextManager[AsyncEngine]:
        """An engine of the schema owner, whose ``firstmile_admin`` policies see every tenant."""
        ...

    async def operator_tenant(self, engine: AsyncEngine, name: str) -> TenantId:
        """The tenant named by slug or id, as an operator scope (a ClickException when there is none)."""
        ...

    def audit_signer(self, key_file: Path | None) -> AuditSigner:
        """``key_file``, else the region's configured signing key (a ClickException when there is none)."""
        ...


def _deps() -> AuditCommandDeps:
    found: AuditCommandDeps = services()
    return found


async def _with_engine(work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async with _deps().operator_engine() as engine:
        return await work(engine)


_KEY_FILE = click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Signing key file (default: FIRSTMILE_AUDIT_SIGNING_KEY_FILE, or the embedded one).",
)


@click.group()
def audit() -> None:
    """The audit log: verify, checkpoint, public-key."""


@audit.command("verify")
@click.option("--tenant", required=True, help="Tenant slug or id.")
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trusted public key file (PEM, hex or base64); repeat for several. Default: this region's key.",
)
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON of checkpoints kept outside the database (from GET /v1/audit/checkpoints); repeatable.",
)
@_KEY_FILE
@click.option("--all-proofs", is_flag=True, help="Verify an audit path for every entry (slow for large logs).")
@click.option("--proof-samples", default=256, show_default=True, help="Audit paths verified when not --all-proofs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def audit_verify(
    tenant: str,
    public_keys: tuple[Path, ...],
    checkpoint_files: tuple[Path, ...],
    key_file: Path | None,
    all_proofs: bool,
    proof_samples: int,
    as_json: bool,
) -> None:
    """Recompute the tenant's hash chain and Merkle roots and check every checkpoint.

    Exit status 1 names the first bad entry; 0 means the log verified.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from firstmile.audit.signing import load_public_key
    from firstmile.audit.verify import VerifyReport, load_checkpoints, verify_tenant

    keys: list[Ed25519PublicKey] = []
    try:
        keys.extend(load_public_key(path.read_bytes()) for path in public_keys)
    except ValueError as exc:
        raise click.ClickException(f"public key: {exc}") from exc
    if not keys:
        keys.append(_deps().audit_signer(key_file).public_key)

    def progress(done: int, total: int) -> None:
        click.echo(f"verified {done}/{total} entries", err=True)

    async def work(engine: AsyncEngine) -> VerifyReport:
        tenant_id = await _deps().operator_tenant(engine, tenant)
        known = []
        for path in checkpoint_files:
            try:
                known.extend(load_checkpoints(tenant_id, json.loads(path.read_text(encoding="utf-8"))))
            except ValueError as exc:
                raise click.ClickException(f"{path}: {exc}") from exc
        return await verify_tenant(
            engine,
            tenant_id,
            keys,
            progress=progress,
            proof_samples=proof_samples,
            all_proofs=all_proofs,
            known_checkpoints=known,
        )

    report = run(_with_engine(work))
    if as_json:
        first = report.first_bad
        doc = {
            "tenant_id": str(report.tenant_id),
            "ok": report.ok,
            "entries": report.entries,
            "checkpoints": report.checkpoints,
            "latest_checkpoint": report.latest_checkpoint,
            "proofs_checked": report.proofs_checked,
            "queued": report.queued,
            "first_bad_seq": report.first_bad_seq,
            "first_bad_reason": None if first is None else first.reason,
            "problems": [
                {
                    "seq": p.seq,
                    "checkpoint": p.checkpoint,
                    "queued": None if p.queued is None else str(p.queued),
                    "reason": p.reason,
                    "detail": p.detail,
                }
                for p in report.problems
            ],
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@audit.command("checkpoint")
@click.option("--tenant", required=True, help="Tenant slug or id.")
@_KEY_FILE
def audit_checkpoint(tenant: str, key_file: Path | None) -> None:
    """Sequence the tenant's queued entries, then sign a checkpoint over its whole log now (if it grew
    since the last one)."""
    from firstmile.audit.repository import CheckpointRow
    from firstmile.audit.service import AuditIntegrityError, Sequencer, create_checkpoint
    from firstmile.kit.db import tenant_transaction

    signer = _deps().audit_signer(key_file)

    async def work(engine: AsyncEngine) -> CheckpointRow | None:
        tenant_id = await _deps().operator_tenant(engine, tenant)
        sequencer = Sequencer(engine)
        placed = await sequencer.sequence_tenant(uuid.UUID(str(tenant_id)))
        if placed:
            click.echo(f"sequenced {placed} queued entries", err=True)
        if sequencer.failing:
            raise AuditIntegrityError("a queued entry no longer matches its leaf hash (see the log)")
        async with tenant_transaction(engine, tenant_id) as tx:
            return await create_checkpoint(tx, signer)

    try:
        checkpoint = run(_with_engine(work))
    except AuditIntegrityError as exc:
        raise click.ClickException(f"not signed: {exc}") from exc
    if checkpoint is None:
        click.echo("nothing to sign: the latest checkpoint covers the whole log (or the log is empty)")
        return
    click.echo(f"checkpoint {checkpoint.tree_size} root {checkpoint.root_hash.hex()} signed by key {checkpoint.key_id}")


@audit.command("public-key")
@_KEY_FILE
def audit_public_key(key_file: Path | None) -> None:
    """Print this region's checkpoint public key (PEM) and its key id."""
    signer = _deps().audit_signer(key_file)
    click.echo(signer.public_key_pem, nl=False)
    click.echo(f"key id {signer.key_id}", err=True)
