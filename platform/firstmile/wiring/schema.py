"""Import every slice's tables so :data:`firstmile.kit.db.metadata` is complete.

Used by Alembic (``firstmile/migrations/env.py``) and by tests that walk the schema; it
is wiring because it names every slice (``kit`` knows none).
"""

from __future__ import annotations

from firstmile.admin import models as _admin  # noqa: F401
from firstmile.analytics import models as _analytics  # noqa: F401
from firstmile.audit import models as _audit  # noqa: F401
from firstmile.destinations import models as _destinations  # noqa: F401
from firstmile.events import models as _events  # noqa: F401
from firstmile.experiments import models as _experiments  # noqa: F401
from firstmile.kit import outbox as _outbox  # noqa: F401
from firstmile.kit.db import metadata
from firstmile.nudges import models as _nudges  # noqa: F401
from firstmile.onboarding import models as _onboarding  # noqa: F401
from firstmile.security import models as _security  # noqa: F401
from firstmile.sso import models as _sso  # noqa: F401
from firstmile.tenancy import models as _tenancy  # noqa: F401

TENANT_OWNED_TABLES: tuple[str, ...] = tuple(
    sorted(name for name, table in metadata.tables.items() if "tenant_id" in table.c)
)
"""Every table with a ``tenant_id`` column; each must have forced RLS and a policy."""

__all__ = ["TENANT_OWNED_TABLES", "metadata"]
