"""The audit API (auditors and the admin UI, API key with ``audit:read``).

Every endpoint answers for the caller's tenant only: the unit of work (``uow``) is bound
to the authenticated principal's tenant, and the service (``audit_log``, an
:class:`~firstmile.audit.service.AuditService`) is injected by the wiring.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import PathParameter, QueryParameter

from firstmile.audit import schemas
from firstmile.audit.service import (
    KIND_PATTERN,
    MAX_TEXT,
    AuditIntegrityError,
    AuditNotFoundError,
    AuditService,
    EntryFilter,
    NotCheckpointedError,
    PendingError,
)
from firstmile.kit.auth import require_scope
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError
from firstmile.kit.uow import UnitOfWork

T = TypeVar("T")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_INT = re.compile(r"^[0-9]{1,18}$")
MAX_SEQ = 10**18 - 1
"""Sequence numbers and tree sizes are at most 18 digits (every one fits PostgreSQL's bigint)."""

Str = Annotated[str | None, QueryParameter(schema_extra={"max_length": MAX_TEXT})]
KindQ = Annotated[str | None, QueryParameter(schema_extra={"pattern": KIND_PATTERN.pattern})]
# What ``_Errors.integer`` accepts, stated exactly in the OpenAPI document (the fuzzing holds it to that):
_SEQ = {"pattern": _INT.pattern}  # 0..MAX_SEQ
_POSITIVE = {"pattern": r"^0*[1-9][0-9]*$", "max_length": 18}  # 1..MAX_SEQ
_LIMIT = {"pattern": r"^0*([1-9][0-9]{0,2}|1000)$", "max_length": 18}  # 1..MAX_LIMIT
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_REF = {"pattern": f"{_INT.pattern}|{_UUID.pattern}"}  # a seq, or an entry id


class _Errors:
    def __init__(self, source: str = "query") -> None:
        self.items: list[dict[str, str]] = []
        self.source = source

    def add(self, key: str, message: str) -> None:
        self.items.append({"key": key, "message": message, "source": self.source})

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            raise ProblemError(
                400, "validation-error", f"{first['message']} (at {first['key']})", errors=list(self.items)
            )

    def integer(self, value: str | None, key: str, low: int, high: int = MAX_SEQ) -> int | None:
        if value is None:
            return None
        if not _INT.fullmatch(value) or not low <= int(value) <= high:
            self.add(key, f"must be an integer in {low}..{high}")
            return None
        return int(value)

    def moment(self, value: str | None, key: str) -> datetime | None:
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value.strip().replace(" ", "+").replace("Z", "+00:00"))
        except ValueError:
            self.add(key, "must be an RFC 3339 / ISO 8601 datetime")
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    def text(self, value: str | None, key: str) -> str | None:
        if value is not None and (len(value) > MAX_TEXT or "\x00" in value):
            self.add(key, f"must be at most {MAX_TEXT} characters")
            return None
        return value


async def read_log(uow: NamedDependency[UnitOfWork], work: Callable[[TenantTx], Awaitable[T]]) -> T:
    """Run ``work`` on the log; its errors as the API answers them (404, 409 not-checkpointed, 500 integrity)."""
    try:
        return await uow.run(work)
    except AuditNotFoundError as exc:
        raise ProblemError(404, "not-found", str(exc), resource=exc.what) from exc
    except NotCheckpointedError as exc:
        raise ProblemError(409, "not-checkpointed", str(exc)) from exc
    except AuditIntegrityError as exc:
        raise ProblemError(500, "audit-integrity", f"the stored audit log failed a check: {exc}") from exc


class AuditController(Controller):
    path = "/v1/audit"
    tags = ["audit"]
    guards = [require_scope("audit:read")]

    @get(
        "/entries",
        summary="List audit entries",
        description="Entries in seq order, filtered; cursor pagination with `after_seq` (`next_after_seq`).",
    )
    async def entries(
        self,
        uow: NamedDependency[UnitOfWork],
        audit_log: NamedDependency[AuditService],
        kind: KindQ = None,
        actor: Str = None,
        subject: Str = None,
        from_: Annotated[
            str | None,
            QueryParameter(name="from", description="created_at >= (RFC 3339)", schema_extra={"min_length": 10}),
        ] = None,
        to: Annotated[
            str | None, QueryParameter(description="created_at < (RFC 3339)", schema_extra={"min_length": 10})
        ] = None,
        after_seq: Annotated[
            str | None, QueryParameter(description="Only entries with a larger seq", schema_extra=_SEQ)
        ] = None,
        limit: Annotated[
            str | None, QueryParameter(description=f"1..{MAX_LIMIT}, default {DEFAULT_LIMIT}", schema_extra=_LIMIT)
        ] = None,
    ) -> schemas.EntryPage:
        errors = _Errors()
        if kind is not None and not KIND_PATTERN.match(kind):
            errors.add("kind", f"must match {KIND_PATTERN.pattern}")
        where = EntryFilter(
            kind=kind,
            actor=errors.text(actor, "actor"),
            subject=errors.text(subject, "subject"),
            created_from=errors.moment(from_, "from"),
            created_to=errors.moment(to, "to"),
            after_seq=errors.integer(after_seq, "after_seq", 0),
        )
        size = errors.integer(limit, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
        errors.raise_if_any()
        rows = await read_log(uow, lambda tx: audit_log.entries(tx, where, size + 1))
        more = len(rows) > size
        rows = rows[:size]
        return schemas.EntryPage(
            entries=[schemas.entry_out(r) for r in rows], next_after_seq=rows[-1].seq if more else None
        )

    @get(
        "/entries/{ref:str}/proof",
        summary="An entry's inclusion proof",
        description="RFC 9162 audit path of the entry (by its seq, or by the id it was given when written) in the "
        "checkpoint of `tree_size` (default: the latest). An entry that is still queued answers 202 with its leaf "
        "hash (`status: pending`): every entry is sequenced within the maximum merge delay (docs/audit.md). "
        "404 for an unknown entry or checkpoint size, 409 when no checkpoint covers the entry yet.",
        responses={
            202: ResponseSpec(
                schemas.PendingEntry, description="The entry is queued: its leaf hash, no place in the log yet"
            )
        },
        opt={
            "problems": {
                404: "not-found: no such entry or checkpoint",
                409: "not-checkpointed: no signed checkpoint covers the entry yet",
                500: "audit-integrity: the stored log failed a check",
            }
        },
    )
    async def proof(
        self,
        uow: NamedDependency[UnitOfWork],
        audit_log: NamedDependency[AuditService],
        ref: Annotated[
            str, PathParameter(description="The entry's seq (0, 1, …) or its id (a UUID)", schema_extra=_REF)
        ],
        tree_size: Annotated[
            str | None, QueryParameter(description="A checkpoint's tree size", schema_extra=_POSITIVE)
        ] = None,
    ) -> Response[schemas.InclusionProof | schemas.PendingEntry]:
        errors = _Errors()
        size = errors.integer(tree_size, "tree_size", 1)
        path_errors = _Errors("path")
        lookup: int | uuid.UUID = 0
        if _UUID.fullmatch(ref):
            lookup = uuid.UUID(ref)
        elif _INT.fullmatch(ref) and int(ref) <= MAX_SEQ:
            lookup = int(ref)
        else:
            path_errors.add("ref", f"must be a seq in 0..{MAX_SEQ} or an entry id (UUID)")
        path_errors.items.extend(errors.items)
        path_errors.raise_if_any()
        try:
            found = await read_log(uow, lambda tx: audit_log.inclusion_proof(tx, lookup, size))
        except PendingError as exc:
            return Response(schemas.pending_out(exc.entry), status_code=202)
        return Response(
            schemas.InclusionProof(
                leaf_index=found.entry.seq,
                tree_size=found.checkpoint.tree_size,
                leaf_hash=found.entry.leaf_hash.hex(),
                audit_path=[p.hex() for p in found.path],
                root_hash=found.checkpoint.root_hash.hex(),
                entry=schemas.entry_out(found.entry),
                checkpoint=schemas.checkpoint_out(found.checkpoint),
            )
        )

    @get("/checkpoints", summary="Signed checkpoints", description="In tree-size order, with the region's public key.")
    async def checkpoints(
        self,
        uow: NamedDependency[UnitOfWork],
        audit_log: NamedDependency[AuditService],
        after_size: Annotated[
            str | None, QueryParameter(description="Only larger tree sizes", schema_extra=_SEQ)
        ] = None,
        limit: Annotated[
            str | None, QueryParameter(description=f"1..{MAX_LIMIT}, default {DEFAULT_LIMIT}", schema_extra=_LIMIT)
        ] = None,
    ) -> schemas.CheckpointPage:
        errors = _Errors()
        after = errors.integer(after_size, "after_size", 0)
        size = errors.integer(limit, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
        errors.raise_if_any()
        rows = await read_log(uow, lambda tx: audit_log.checkpoints(tx, -1 if after is None else after, size + 1))
        more = len(rows) > size
        rows = rows[:size]
        signer = audit_log.signer
        return schemas.CheckpointPage(
            checkpoints=[schemas.checkpoint_out(r) for r in rows],
            next_after_size=rows[-1].tree_size if more else None,
            algorithm="Ed25519",
            key_id=signer.key_id,
            public_key=signer.public_key_raw.hex(),
        )

    @get(
        "/consistency",
        summary="Consistency proof between two checkpoints",
        description="RFC 9162 consistency proof from the checkpoint of size `first` to that of size `second`.",
        opt={
            "problems": {
                404: "not-found: no checkpoint of that size",
                500: "audit-integrity: the stored log failed a check",
            }
        },
    )
    async def consistency(
        self,
        uow: NamedDependency[UnitOfWork],
        audit_log: NamedDependency[AuditService],
        first: Annotated[
            str | None, QueryParameter(description="The smaller tree size", required=True, schema_extra=_POSITIVE)
        ] = None,
        second: Annotated[
            str | None, QueryParameter(description="The larger tree size", required=True, schema_extra=_POSITIVE)
        ] = None,
    ) -> schemas.ConsistencyProof:
        errors = _Errors()
        low = errors.integer(first, "first", 1)
        high = errors.integer(second, "second", 1)
        if first is None:
            errors.add("first", "is required")
        if second is None:
            errors.add("second", "is required")
        if low is not None and high is not None and low > high:
            errors.add("first", "must not exceed second")
        errors.raise_if_any()
        assert low is not None and high is not None
        found = await read_log(uow, lambda tx: audit_log.consistency_proof(tx, low, high))
        return schemas.ConsistencyProof(
            first=low,
            second=high,
            first_root=found.first.root_hash.hex(),
            second_root=found.second.root_hash.hex(),
            proof=[p.hex() for p in found.path],
            first_checkpoint=schemas.checkpoint_out(found.first),
            second_checkpoint=schemas.checkpoint_out(found.second),
        )

    @get("/public-key", summary="The region's checkpoint signing public key")
    async def public_key(self, audit_log: NamedDependency[AuditService]) -> schemas.PublicKey:
        return schemas.public_key_out(audit_log.signer)
