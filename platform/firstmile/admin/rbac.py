"""Roles of the admin UI and what each may do.

The four roles are a ladder: each has everything of the role below it. Every
admin API handler names exactly one :class:`Permission` with :func:`requires`;
a test walks the routes and fails on a handler that names none.

================== ====== ======= ====== =====
permission         viewer analyst editor owner
================== ====== ======= ====== =====
paths:read         yes    yes     yes    yes
analytics:read     yes    yes     yes    yes
audit:read                yes     yes    yes
users:export              yes     yes    yes
alerts:acknowledge        yes     yes    yes
destinations:read         yes     yes    yes
reviews:read              yes     yes    yes
models:read               yes     yes    yes
paths:write                       yes    yes
destinations:manage               yes    yes
reviews:decide                    yes    yes
overrides:manage                  yes    yes
users:erase                              yes
models:promote                           yes
================== ====== ======= ====== =====
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from firstmile.tenancy.manifest import ADMIN_ROLES


class Permission(enum.StrEnum):
    PATHS_READ = "paths:read"
    ANALYTICS_READ = "analytics:read"
    AUDIT_READ = "audit:read"
    USERS_EXPORT = "users:export"
    PATHS_WRITE = "paths:write"
    USERS_ERASE = "users:erase"
    EXPERIMENTS_READ = "experiments:read"
    EXPERIMENTS_WRITE = "experiments:write"
    EXPERIMENTS_APPROVE = "experiments:approve"
    ALERTS_ACKNOWLEDGE = "alerts:acknowledge"
    DESTINATIONS_READ = "destinations:read"
    """The destinations page: state, queue, lag, the vendors' error answers (docs/admin-ui.md#destinations)."""
    DESTINATIONS_MANAGE = "destinations:manage"
    """Enable, disable and replay a destination's dead letters from the admin UI."""
    REVIEWS_READ = "reviews:read"
    """The review queue and the segment pins in force, read-only (docs/admin-ui.md#the-review-queue). Not the
    viewer's: a review holds a user's id and what their events carried, as the audit log does."""
    REVIEWS_DECIDE = "reviews:decide"
    """Approve or reject a completion, judge a model's decision right or wrong (docs/review.md)."""
    OVERRIDES_MANAGE = "overrides:manage"
    """Revoke a segment pin (a manual path override) from the admin UI."""
    MODELS_READ = "models:read"
    """The models page: the shared and the tenant's own path model, versions, stages, off-policy reports, history
    and retraining flags, read-only (docs/admin-ui.md#models)."""
    MODELS_PROMOTE = "models:promote"
    """Promote a version of the tenant's own path model (behind the off-policy gate) and roll back."""


_VIEWER = frozenset({Permission.PATHS_READ, Permission.ANALYTICS_READ, Permission.EXPERIMENTS_READ})
_ANALYST = _VIEWER | {Permission.AUDIT_READ, Permission.USERS_EXPORT, Permission.ALERTS_ACKNOWLEDGE,
                      Permission.DESTINATIONS_READ, Permission.REVIEWS_READ, Permission.MODELS_READ}  # fmt: skip
_EDITOR = _ANALYST | {Permission.PATHS_WRITE, Permission.EXPERIMENTS_WRITE, Permission.DESTINATIONS_MANAGE,
                      Permission.REVIEWS_DECIDE, Permission.OVERRIDES_MANAGE}  # fmt: skip
_OWNER = _EDITOR | {Permission.USERS_ERASE, Permission.EXPERIMENTS_APPROVE, Permission.MODELS_PROMOTE}

GRANTS: dict[str, frozenset[Permission]] = {
    "viewer": _VIEWER,
    "analyst": frozenset(_ANALYST),
    "editor": frozenset(_EDITOR),
    "owner": frozenset(_OWNER),
}
assert set(GRANTS) == set(ADMIN_ROLES)


def admin_roles(values: Iterable[object]) -> tuple[str, ...]:
    """The admin roles among ``values`` (a token's realm roles), highest first; others are ignored."""
    present = {v for v in values if isinstance(v, str)}
    return tuple(role for role in ADMIN_ROLES if role in present)


def permissions(roles: Iterable[str]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in roles:
        granted |= GRANTS.get(role, frozenset())
    return frozenset(granted)
