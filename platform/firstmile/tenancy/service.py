"""The tenancy slice's public service: tenants, their applied manifests, and API keys.

Other slices read what they need of a tenant here (its path settings, name, key
provider section, SSO section) and never touch the ``tenants`` or ``api_keys`` tables.
Everything runs in the caller's :class:`~firstmile.kit.db.TenantTx` and never commits;
the two cross-tenant look-ups (:func:`find_tenant`, :func:`resolve_key`,
:func:`resolve_tenant`) take a plain connection because they run before a tenant is known.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx
from firstmile.tenancy import keys as keylib
from firstmile.tenancy import repository as repo
from firstmile.tenancy.manifest import ExperimentsSpec, KeysSpec, LimitsSpec, NudgesSpec, TenantManifest
from firstmile.tenancy.repository import KeyRow, ResolvedKey, ResolvedTenant, TenantRow

__all__ = [
    "CreatedKey",
    "KeyRow",
    "ResolvedKey",
    "ResolvedTenant",
    "TenancyError",
    "TenantRow",
    "bump_revision",
    "create_key",
    "create_publishable_key",
    "create_tenant",
    "experiments_spec",
    "find_tenant",
    "find_tenant_by_slug_or_id",
    "has_customer_idp",
    "keys_spec",
    "limits_spec",
    "list_keys",
    "manifest",
    "nudges_spec",
    "path_settings",
    "resolve_key",
    "resolve_tenant",
    "revision",
    "revoke_key",
    "tenant_name",
    "update_tenant",
]


class TenancyError(ValueError):
    """An operator request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class CreatedKey:
    key: str
    key_id: uuid.UUID
    tenant_slug: str
    scopes: tuple[str, ...]
    region: str
    origins: tuple[str, ...] = ()
    identity_secret: str | None = None
    """A publishable key's identity secret (the tenant's backend signs identity tokens with it)."""


# ---------------------------------------------------------------- before a tenant is known


async def training_tenants(conn: AsyncConnection) -> list[tuple[uuid.UUID, str, dict[str, Any]]]:
    """The tenants whose manifest opts in to scheduled model training, with their planner settings (an operator
    read across tenants, as the schema owner)."""
    return await repo.training_tenants(conn)


async def find_tenant(conn: AsyncConnection, slug: str) -> TenantRow | None:
    """The tenant of ``slug`` (operator commands, as the schema owner)."""
    return await repo.tenant_by_slug(conn, slug)


async def find_tenant_by_slug_or_id(conn: AsyncConnection, name: str) -> TenantRow | None:
    """The tenant named by slug or by id (``firstmile audit --tenant``)."""
    try:
        by_id: uuid.UUID | None = uuid.UUID(name)
    except ValueError:
        by_id = None
    return await repo.tenant_by_slug(conn, name, by_id)


async def resolve_key(conn: AsyncConnection, key_hash: bytes) -> ResolvedKey | None:
    """An API key by its keyed hash, with its tenant (no tenant context needed)."""
    return await repo.resolve_key(conn, key_hash)


async def resolve_tenant(conn: AsyncConnection, slug: str) -> ResolvedTenant | None:
    """A tenant by slug if this region's database holds it (no tenant context needed)."""
    return await repo.resolve_tenant(conn, slug)


# ---------------------------------------------------------------- a tenant's own settings


async def path_settings(tx: TenantTx) -> tuple[str, int, tuple[str, ...], str | None, float]:
    """The tenant's default path, manifest revision, PII trait names, path model and exploration share (epsilon),
    for the onboarding catalog."""
    return await repo.path_settings(tx)


async def revision(tx: TenantTx) -> int:
    """The tenant's revision: what a process compares with the one its cache was read at."""
    return await repo.revision(tx)


async def tenant_name(tx: TenantTx) -> str:
    return await repo.tenant_name(tx)


async def manifest(tx: TenantTx) -> dict[str, Any]:
    """The tenant's applied manifest, as a document."""
    return await repo.manifest(tx)


async def keys_spec(tx: TenantTx) -> KeysSpec | None:
    """The manifest's ``keys:`` section (which key provider serves the tenant), or None for the platform's."""
    raw = await repo.manifest_section(tx, "keys")
    return KeysSpec.model_validate(raw) if raw else None


async def limits_spec(tx: TenantTx) -> LimitsSpec | None:
    """The manifest's ``limits:`` section (the tenant's API rate limits), or None for the platform's defaults."""
    raw = await repo.manifest_section(tx, "limits")
    return LimitsSpec.model_validate(raw) if raw else None


async def nudges_spec(tx: TenantTx) -> NudgesSpec | None:
    """The manifest's ``nudges:`` section, or None for the platform's defaults (its templates are not rendered
    again: they were when the manifest was applied)."""
    raw = await repo.manifest_section(tx, "nudges")
    return NudgesSpec.model_validate(raw, context={"stored": True}) if raw else None


async def experiments_spec(tx: TenantTx) -> ExperimentsSpec | None:
    """The manifest's ``experiments:`` section, or None when it declares no experiments."""
    raw = await repo.manifest_section(tx, "experiments")
    return ExperimentsSpec.model_validate(raw) if raw else None


async def has_customer_idp(tx: TenantTx) -> bool:
    """Whether the manifest brokers the tenant's own SAML identity provider (``sso.saml``)."""
    sso = await repo.manifest_section(tx, "sso")
    return isinstance(sso, dict) and sso.get("saml") is not None


async def bump_revision(tx: TenantTx) -> int:
    """Bump the tenant's revision: every process reloads its cached paths within a request."""
    return await repo.bump_revision(tx)


# ---------------------------------------------------------------- the operator's changes


async def create_tenant(tx: TenantTx, manifest: TenantManifest) -> None:
    """Insert the tenant of ``manifest`` with the id ``tx`` is bound to."""
    spec = manifest.tenant
    await repo.insert_tenant(
        tx, spec.slug, spec.name, spec.home_region, manifest.model_dump(mode="json"), manifest.content_hash()
    )


async def update_tenant(tx: TenantTx, manifest: TenantManifest) -> None:
    """Store a changed manifest (name and document) and bump the revision."""
    await repo.update_tenant(tx, manifest.tenant.name, manifest.model_dump(mode="json"), manifest.content_hash())


async def create_key(
    tx: TenantTx, tenant: TenantRow, pepper: bytes, scopes: list[str], name: str, *, actor: str
) -> CreatedKey:
    """A key bound to the tenant and its home region, audited; the plaintext is returned once."""
    try:
        valid = keylib.validate_scopes(scopes)
    except ValueError as exc:
        raise TenancyError(str(exc)) from exc
    key = keylib.generate_key()
    key_id = await repo.insert_key(
        tx, name, keylib.display_prefix(key), keylib.hash_key(pepper, key), valid, tenant.home_region
    )
    await audit.append(
        tx,
        "admin",
        actor,
        f"api_key:{key_id}",
        {"action": "keys.create", "name": name, "scopes": list(valid), "region": tenant.home_region},
    )
    return CreatedKey(key, key_id, tenant.slug, valid, tenant.home_region)


async def create_publishable_key(
    tx: TenantTx, tenant: TenantRow, pepper: bytes, origins: list[str], name: str, *, actor: str
) -> CreatedKey:
    """A publishable key (the embed SDK's, ``docs/embed.md``) for ``origins``, audited; returned once with the
    identity secret the tenant's backend signs identity tokens with."""
    try:
        valid = keylib.validate_origins(origins)
    except ValueError as exc:
        raise TenancyError(str(exc)) from exc
    key = keylib.generate_publishable_key()
    key_id = uuid.uuid4()
    scopes = (keylib.EMBED_SCOPE,)
    await repo.insert_key(
        tx, name, keylib.display_prefix(key), keylib.hash_key(pepper, key), scopes, tenant.home_region,
        kind="publishable", origins=valid, key_id=key_id,
    )  # fmt: skip
    await audit.append(
        tx,
        "admin",
        actor,
        f"api_key:{key_id}",
        {"action": "keys.create", "kind": "publishable", "name": name, "origins": list(valid),
         "region": tenant.home_region},
    )  # fmt: skip
    secret = keylib.identity_secret(pepper, key_id)
    return CreatedKey(key, key_id, tenant.slug, scopes, tenant.home_region, valid, secret)


async def revoke_key(tx: TenantTx, key_id: uuid.UUID, *, actor: str) -> bool:
    revoked = await repo.revoke_key(tx, key_id)
    if revoked:
        await audit.append(tx, "admin", actor, f"api_key:{key_id}", {"action": "keys.revoke"})
    return revoked


async def list_keys(tx: TenantTx) -> list[KeyRow]:
    return await repo.list_keys(tx)
