"""The unit of work: one tenant-bound transaction, retried whole, committed by its owner.

A request gets its :class:`UnitOfWork` from the dependency provider of the wiring
(``firstmile.wiring.providers``), bound to the tenant of the authenticated principal;
a worker or an operator command makes one from an explicit
:class:`~firstmile.kit.scope.OperatorContext`. Either way the rules are the same:

- :meth:`UnitOfWork.run` opens the transaction, passes the :class:`~firstmile.kit.db.TenantTx`
  to the work, commits when it returns and rolls back when it raises;
- a transient database failure (a lost connection, a serialisation conflict) retries the
  **whole** work with backoff, then answers 503 (:class:`~firstmile.kit.db.DatabaseUnavailableError`);
- so the work must do nothing but database statements: anything that talks to the network
  (the feature store, a model, the key provider, Keycloak) happens *before* ``run`` and its
  result is passed in, so a retry never repeats it and no lock is held while the network is slow.

Services and repositories never commit: they take the ``TenantTx`` (or, when they must do
network work first, the ``UnitOfWork`` itself and call :meth:`run` once for their writes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.kit.db import TenantTx, retry_transient, tenant_transaction
from firstmile.kit.scope import TenantId

T = TypeVar("T")


class UnitOfWork:
    """Transactions of one tenant on one engine, with the retry policy of the platform."""

    __slots__ = ("_attempts", "_engine", "tenant")

    def __init__(self, engine: AsyncEngine, tenant: TenantId, *, attempts: int = 3) -> None:
        self._engine = engine
        self.tenant = tenant
        self._attempts = attempts

    async def run(self, work: Callable[[TenantTx], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction bound to the tenant; retried whole on transient failures.

        ``work`` must be idempotent, as the platform's writes are (``ON CONFLICT DO NOTHING``):
        a commit whose answer was lost may have landed.
        """

        async def once() -> T:
            async with tenant_transaction(self._engine, self.tenant) as tx:
                return await work(tx)

        return await retry_transient(once, attempts=self._attempts)


__all__ = ["UnitOfWork"]
