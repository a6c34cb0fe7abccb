"""What every slice's command group shares: the operator services the wiring builds, and running async work.

Each slice owns its ``click`` group (``audit/cli.py``, ``tenancy/cli.py``, …) and declares what
it needs from the platform as a ``Protocol`` (e.g. :class:`firstmile.audit.cli.AuditCommandDeps`).
The root command (:mod:`firstmile.cli`) only assembles the groups and puts the wiring's
:class:`firstmile.wiring.operator.OperatorServices` on the click context; that class
implements every slice's protocol (checked by mypy in ``firstmile.wiring.operator``). Nothing is
built until a command asks: ``firstmile --help`` opens no database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

T = TypeVar("T")


def services() -> Any:
    """The operator services of this invocation; annotate the result with the slice's protocol."""
    context = click.get_current_context()
    found = context.find_root().obj
    if found is None:
        raise click.UsageError("run this command through `firstmile`: it needs the platform's services")
    return found


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh event loop (a command's async part)."""
    return asyncio.run(work)


__all__ = ["run", "services"]
