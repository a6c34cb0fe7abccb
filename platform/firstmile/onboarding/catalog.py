"""Per-process cache of each tenant's path definitions, keyed by tenant revision, bounded.

``firstmile tenants apply`` (and the admin path editor) bump the tenant's revision
whenever a path changes (so does a segment pin, which the catalog holds); the revision
arrives with the resolved API key, so a new revision reloads the catalog. Old path
versions stay immutable and are loaded on demand for users still on them. Both caches
are LRU-bounded (``max_tenants`` catalogs, ``max_versions`` path versions),
so a process serving many tenants keeps a fixed amount.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from firstmile.kit.db import TenantTx
from firstmile.kit.scope import TenantId
from firstmile.onboarding import repository as repo
from firstmile.onboarding.domain import PathDef
from firstmile.onboarding.review import Pin, pins_of
from firstmile.security.personal_data import BUILTIN_PII_TRAITS
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import OWN_MODEL, own_model_name


def catalog_fingerprint(versions: Mapping[str, int]) -> str:
    """A short, stable fingerprint of a path catalog (path key → version): equal fingerprints, the same catalog.

    A tenant model records the catalog it was trained on (``config.catalog``); the planner asks it only while the
    tenant's current catalog has the same fingerprint (docs/models.md#serving-keyed-by-the-path-catalog).
    """
    canonical = json.dumps({str(k): int(v) for k, v in versions.items()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class PathCatalog:
    revision: int
    default_key: str
    current: tuple[PathDef, ...]
    pii_traits: frozenset[str] = frozenset()
    planner_model: str | None = None  # the registry model the planner asks first; None: rules only
    exploration: float = 0.0  # the planner's epsilon-greedy exploration share (manifest planner.exploration)
    pins: tuple[Pin, ...] = ()  # segment pins in force when loaded, newest first (docs/review.md)
    own_model: bool = False  # planner.model: own (planner_model is then the tenant's own; rules until it has one)
    fingerprint: str = field(init=False, default="")  # catalog_fingerprint of the current paths, once per revision

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", catalog_fingerprint({p.key: p.version for p in self.current}))

    def pin_for(self, traits: Mapping[str, Any], now: datetime) -> Pin | None:
        """The newest segment pin that applies to a user with ``traits`` at ``now``."""
        return next((p for p in self.pins if p.applies(traits, now)), None)


class CatalogCache:
    """Catalogs and path versions of the tenants this process served lately."""

    def __init__(self, *, max_tenants: int = 10_000, max_versions: int = 50_000) -> None:
        if max_tenants < 1 or max_versions < 1:
            raise ValueError("the catalog cache needs room for at least one tenant and one version")
        self.max_tenants = max_tenants
        self.max_versions = max_versions
        self._catalogs: OrderedDict[TenantId, PathCatalog] = OrderedDict()
        self._versions: OrderedDict[tuple[TenantId, str, int], PathDef] = OrderedDict()

    def __len__(self) -> int:
        """How many entries are held (catalogs and versions)."""
        return len(self._catalogs) + len(self._versions)

    def cached(self, tenant_id: TenantId, revision: int) -> PathCatalog | None:
        """The tenant's catalog if one at least as new as ``revision`` is cached (no database)."""
        found = self._catalogs.get(tenant_id)
        if found is None or found.revision < revision:
            return None
        self._catalogs.move_to_end(tenant_id)
        return found

    async def catalog(self, tx: TenantTx, revision: int) -> PathCatalog:
        return self.cached(tx.tenant, revision) or await self.reload(tx)

    async def reload(self, tx: TenantTx) -> PathCatalog:
        """Read the tenant's current catalog (for callers that do not know the revision)."""
        default_key, tenant_revision, pii_traits, planner_model, exploration = await tenancy.path_settings(tx)
        rows = await repo.current_path_definitions(tx)
        pins = pins_of(await repo.active_pins(tx, datetime.now(UTC)))
        current = tuple(PathDef.from_definition(key, version, definition) for key, version, definition in rows)
        for path in current:
            self._remember_version((tx.tenant, path.key, path.version), path)
        own = planner_model == OWN_MODEL
        if own:  # planner.model: own names the tenant's own model (its slug: read once per revision)
            planner_model = own_model_name(str((await tenancy.manifest(tx))["tenant"]["slug"]))
        catalog = PathCatalog(
            revision=tenant_revision,
            default_key=default_key,
            current=current,
            pii_traits=BUILTIN_PII_TRAITS | frozenset(pii_traits),
            planner_model=planner_model,
            exploration=exploration,
            pins=pins,
            own_model=own,
        )
        self._catalogs[tx.tenant] = catalog
        self._catalogs.move_to_end(tx.tenant)
        while len(self._catalogs) > self.max_tenants:
            self._catalogs.popitem(last=False)
        return catalog

    async def version(self, tx: TenantTx, key: str, version: int) -> PathDef:
        cache_key = (tx.tenant, key, version)
        cached = self._versions.get(cache_key)
        if cached is not None:
            self._versions.move_to_end(cache_key)
            return cached
        path = PathDef.from_definition(key, version, await repo.path_definition(tx, key, version))
        self._remember_version(cache_key, path)
        return path

    def _remember_version(self, cache_key: tuple[TenantId, str, int], path: PathDef) -> None:
        self._versions[cache_key] = path
        self._versions.move_to_end(cache_key)
        while len(self._versions) > self.max_versions:
            self._versions.popitem(last=False)
