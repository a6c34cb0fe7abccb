"""Tenant scope: the type that proves a tenant was authorised, and the only two places that mint it.

A :data:`TenantId` is a plain UUID that has passed one of two doors:

1. :func:`tenant_of` — an **authenticated principal** (an API key or a client-credentials
   token resolved by the ``auth`` slice, or an admin session of the ``admin`` slice) names
   its tenant; whatever it names, it was authorised for.
2. :meth:`OperatorContext.tenant` — an **explicit operator context**: a command an operator
   runs (``firstmile keys create --tenant …``) or a worker acting on rows that already carry
   their tenant (the relay's consumers, the stuck scan, the audit checkpointer). The context
   names who acts, and audit entries written under it say so.

Repositories and services accept only :class:`~firstmile.kit.db.TenantTx` (a transaction
bound to a ``TenantId``) or a :class:`~firstmile.kit.uow.UnitOfWork`, so a tenant id that
came from a request parameter cannot reach SQL without passing a door. PostgreSQL row-level
security is the second wall. ``tests/unit/test_architecture.py`` checks that ``TenantId(``
is called nowhere else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import NewType, Protocol

TenantId = NewType("TenantId", uuid.UUID)
"""A tenant id that has been authorised: minted only by :func:`tenant_of` and :meth:`OperatorContext.tenant`."""


class AuthenticatedPrincipal(Protocol):
    """Whoever an authentication middleware let in: it names the one tenant it acts for."""

    @property
    def authenticated_tenant(self) -> uuid.UUID: ...


def tenant_of(principal: AuthenticatedPrincipal) -> TenantId:
    """Door 1: the tenant an authenticated principal acts for."""
    return TenantId(principal.authenticated_tenant)


@dataclass(frozen=True, slots=True)
class OperatorContext:
    """Door 2: an operator or a worker acting on tenants it names explicitly.

    ``actor`` is how logs and audit entries name it: ``operator:cli`` for a person at the
    CLI (the schema owner), ``worker:<name>`` for a background process that acts on rows
    which already carry their tenant (written earlier under an authorised scope).
    """

    actor: str

    def __post_init__(self) -> None:
        kind, _, name = self.actor.partition(":")
        if kind not in ("operator", "worker") or not name:
            raise ValueError(f"an operator context is operator:<who> or worker:<name>, not {self.actor!r}")

    def tenant(self, tenant_id: uuid.UUID) -> TenantId:
        """The scope of a tenant this operator or worker acts on."""
        if not isinstance(tenant_id, uuid.UUID):
            raise TypeError(f"a tenant id is a UUID, not {type(tenant_id).__name__}")
        return TenantId(tenant_id)


OPERATOR_CLI = OperatorContext("operator:cli")
"""A person at the ``firstmile`` command line, as the schema owner."""

__all__ = ["OPERATOR_CLI", "AuthenticatedPrincipal", "OperatorContext", "TenantId", "tenant_of"]
