"""The ``firstmile`` command: it only assembles the groups the slices and the wiring own.

Each slice's group lives in its ``cli.py`` and reaches the platform through the
:class:`~firstmile.wiring.operator.OperatorServices` put on the click context here; the
process-level commands (``serve``, ``dev``, ``migrate``, ``relay``, ``consume``, ``scheduler``, ``sequencer``,
``embedded``) are the wiring's (:mod:`firstmile.wiring.commands`).
"""

from __future__ import annotations

import click

from firstmile.admin.cli import admin
from firstmile.analytics.cli import analytics
from firstmile.audit.cli import audit
from firstmile.controlplane.cli import tenants
from firstmile.destinations.cli import destinations
from firstmile.events.cli import events, webhooks
from firstmile.ml.cli import models, stuck
from firstmile.security.cli import rotate
from firstmile.sso.cli import sso
from firstmile.tenancy.cli import keys
from firstmile.wiring.commands import consume, dev, embedded, migrate, relay, scheduler, sequencer, serve
from firstmile.wiring.operator import OperatorServices


@click.group()
@click.version_option(package_name="firstmile")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Firstmile: adaptive onboarding for B2B SaaS."""
    ctx.obj = OperatorServices()


keys.add_command(rotate)
for command in (
    serve,
    dev,
    migrate,
    relay,
    consume,
    scheduler,
    sequencer,
    embedded,
    tenants,
    keys,
    admin,
    analytics,
    audit,
    destinations,
    events,
    webhooks,
    models,
    stuck,
    sso,
):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
