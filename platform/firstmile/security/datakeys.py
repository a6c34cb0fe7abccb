"""Tenant data keys and per-user keys in PostgreSQL, with an in-memory cache.

The hierarchy (docs/security.md):

1. the provider's key-encryption key for the tenant (Vault Transit or the local KEK)
2. wraps the tenant data key (TDK, AES-256, versioned) stored in ``tenant_data_keys``
   (``purpose='data'``, ``wrapped_key`` = ``vault:v<n>:…`` or ``local:v<n>:…``);
3. the TDK wraps the tenant's blind-index key (``purpose='index'``,
   ``wrapped_key`` = ``tdk:v<tdk version>:…``) and every per-user key in
   ``user_keys`` (AES-GCM, associated data = tenant, user, TDK version);
4. fields are encrypted under the user's key (or the TDK for rows that belong
   to no user) with :class:`firstmile.security.crypto.FieldKey`.

Only step 2 needs the provider, and its plaintext is cached per process for
``ttl_seconds`` or ``max_uses`` field operations, whichever ends first: one
provider call per tenant per cache lifetime, however many records are written.
Per-user keys are never cached across transactions, so destroying one
(crypto-shredding) takes effect at once in every process.

Functions take an :class:`~sqlalchemy.ext.asyncio.AsyncConnection` whose
transaction is bound to the tenant (:func:`firstmile.kit.db.tenant_transaction`)
and never commit, with one exception: a tenant's first data key is created and
committed in its own short transaction on the service's engine, so a key that
encrypted data can never be lost to the caller's rollback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from firstmile.kit.db import TenantId, tenant_transaction
from firstmile.security.crypto import (
    KEY_BYTES,
    KIND_TENANT,
    KIND_USER,
    DecryptionError,
    FieldContext,
    FieldKey,
    IndexKey,
    encode_aad,
    parse_header,
    unwrap_key,
    wrap_key,
)
from firstmile.security.keys import (
    KeyConfig,
    KeyProvider,
    KeyProviderError,
    ProviderRegistry,
    wrapped_scheme,
    wrapped_version,
)

log = logging.getLogger("firstmile.datakeys")
T = TypeVar("T")

_TDK_WRAPPED = re.compile(r"^tdk:v(?P<version>[1-9][0-9]{0,9}):(?P<body>[A-Za-z0-9+/=]+)$")


class UserKeyMissingError(DecryptionError):
    """The user has no key: never created, or destroyed by an erasure (crypto-shredded)."""


class TenantKeysMissingError(KeyProviderError):
    """The tenant has no data key of the version a ciphertext names."""


# ---------------------------------------------------------------------------
# which provider serves a tenant


class ProviderSource(Protocol):
    """Finds the provider of a tenant, and the provider able to unwrap a given wrapped key."""

    async def provider(self, conn: AsyncConnection, tenant: TenantId) -> KeyProvider: ...

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider: ...


class StaticProviders:
    """Every tenant uses the one provider (tests, benchmarks, single-provider deployments)."""

    def __init__(self, provider: KeyProvider) -> None:
        self._provider = provider

    async def provider(self, conn: AsyncConnection, tenant: TenantId) -> KeyProvider:
        return self._provider

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider:
        return current


class ManifestProviders:
    """The provider named by the tenant's manifest ``keys:`` section, else the platform default.

    Reads ``tenants.manifest -> 'keys'`` (visible to the application role for its own
    tenant) only when the cache misses. Keys wrapped by the local KEK before a tenant
    moved to its own Vault stay readable through the local provider until
    ``firstmile keys rotate`` moves them.
    """

    def __init__(self, registry: ProviderRegistry) -> None:
        self.registry = registry

    async def provider(self, conn: AsyncConnection, tenant: TenantId) -> KeyProvider:
        from firstmile.tenancy.manifest import KeysSpec

        raw = (
            await conn.execute(text("SELECT manifest -> 'keys' FROM tenants WHERE id = :t"), {"t": tenant})
        ).scalar_one_or_none()
        spec = KeysSpec.model_validate(raw) if raw else None
        return self.registry.get(spec)

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider:
        if current.owns(wrapped):
            return current
        if wrapped_scheme(wrapped) == "local":
            return self.registry.local()
        return current


# ---------------------------------------------------------------------------
# SQL

_CURRENT_TDK = text(
    "SELECT version, wrapped_key, true AS current FROM tenant_data_keys "
    "WHERE tenant_id = :t AND purpose = 'data' AND retired_at IS NULL"
)
_TDK_VERSION = text(
    "SELECT version, wrapped_key, retired_at IS NULL AS current FROM tenant_data_keys "
    "WHERE tenant_id = :t AND purpose = 'data' AND version = :v"
)
_INDEX_KEY = text(
    "SELECT wrapped_key FROM tenant_data_keys WHERE tenant_id = :t AND purpose = 'index' AND retired_at IS NULL"
)
_INSERT_TDK = text(
    "INSERT INTO tenant_data_keys (tenant_id, purpose, version, wrapped_key, provider_key_version) "
    "VALUES (:t, :purpose, :v, :w, :pv) ON CONFLICT DO NOTHING RETURNING version"
)
_USER_KEY = text("SELECT tdk_version, wrapped_key FROM user_keys WHERE tenant_id = :t AND user_id = :u")
_USER_KEY_GET_OR_CREATE = text(
    "WITH ins AS ("
    " INSERT INTO user_keys (tenant_id, user_id, tdk_version, wrapped_key) VALUES (:t, :u, :v, :w)"
    " ON CONFLICT (tenant_id, user_id) DO NOTHING RETURNING tdk_version, wrapped_key"
    ") SELECT tdk_version, wrapped_key FROM ins"
    " UNION ALL SELECT tdk_version, wrapped_key FROM user_keys WHERE tenant_id = :t AND user_id = :u"
    " LIMIT 1"
)
_DESTROY_USER_KEY = text("DELETE FROM user_keys WHERE tenant_id = :t AND user_id = :u RETURNING tdk_version")


def _user_key_aad(tenant: uuid.UUID, user_id: str, tdk_version: int) -> bytes:
    return encode_aad(b"firstmile/user-key/v1", str(tenant), user_id, str(tdk_version))


def _index_key_aad(tenant: uuid.UUID, tdk_version: int) -> bytes:
    return encode_aad(b"firstmile/index-key/v1", str(tenant), str(tdk_version))


def _wrap_index(tdk: bytes, tenant: uuid.UUID, tdk_version: int, index_key: bytes) -> str:
    sealed = wrap_key(tdk, index_key, _index_key_aad(tenant, tdk_version))
    return f"tdk:v{tdk_version}:" + base64.b64encode(sealed).decode("ascii")


def _parse_index(wrapped: str) -> tuple[int, bytes]:
    match = _TDK_WRAPPED.match(wrapped)
    if match is None:
        raise KeyProviderError("index key row is not in the tdk:v<n>:<base64> format")
    try:
        return int(match["version"]), base64.b64decode(match["body"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyProviderError("index key row is not valid base64") from exc


async def _call(provider: KeyProvider, fn: Callable[..., T], *args: Any) -> T:
    """Run a provider method; blocking ones (Vault over HTTP) in a worker thread."""
    if provider.blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# ---------------------------------------------------------------------------
# the service


@dataclass(slots=True)
class _Cached:
    key: FieldKey
    raw: bytes
    expires: float


class DataKeyService:
    """Tenant data keys (cached), blind-index keys and per-user keys for one process.

    ``ttl_seconds=0`` disables the cache: every operation unwraps through the provider.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        providers: KeyProvider | ProviderSource,
        *,
        ttl_seconds: float = 300.0,
        max_uses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds < 0 or max_uses < 1:
            raise ValueError("ttl_seconds must be >= 0 and max_uses >= 1")
        self.engine = engine
        self.providers = _as_source(providers)
        self.ttl_seconds = ttl_seconds
        self.max_uses = max_uses
        self._clock = clock
        self._data: dict[tuple[uuid.UUID, int | None], _Cached] = {}
        self._index: dict[uuid.UUID, tuple[IndexKey, float]] = {}
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}

    @classmethod
    def from_config(cls, engine: AsyncEngine, config: KeyConfig) -> DataKeyService:
        """The service as the API builds it: providers from each tenant's manifest, cache from ``config``."""
        return cls(
            engine,
            ManifestProviders(ProviderRegistry(config)),
            ttl_seconds=config.cache_ttl_seconds,
            max_uses=config.cache_max_uses,
        )

    # -- cache ------------------------------------------------------------

    def invalidate(self, tenant: uuid.UUID | None = None) -> None:
        """Forget cached keys (of one tenant, or all)."""
        if tenant is None:
            self._data.clear()
            self._index.clear()
            return
        for cache_key in [k for k in self._data if k[0] == tenant]:
            del self._data[cache_key]
        self._index.pop(tenant, None)

    def _fresh(self, entry: _Cached | None) -> bool:
        return entry is not None and entry.expires > self._clock() and entry.key.uses < self.max_uses

    def _lock(self, tenant: uuid.UUID) -> asyncio.Lock:
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        return lock

    def _remember(self, tenant: uuid.UUID, version: int, raw: bytes, *, current: bool) -> _Cached:
        entry = _Cached(FieldKey(raw, KIND_TENANT, version), raw, self._clock() + self.ttl_seconds)
        if self.ttl_seconds > 0:
            self._data[(tenant, version)] = entry
            if current:
                self._data[(tenant, None)] = entry
        return entry

    # -- tenant data keys -------------------------------------------------

    async def data_key(self, conn: AsyncConnection, tenant: TenantId, version: int | None = None) -> FieldKey:
        """The tenant's current data key (``version=None``, for encryption) or a given version."""
        return (await self._tdk(conn, tenant, version)).key

    async def _tdk(self, conn: AsyncConnection, tenant: TenantId, version: int | None) -> _Cached:
        entry = self._data.get((tenant, version))
        if self._fresh(entry):
            assert entry is not None
            return entry
        async with self._lock(tenant):  # one provider call per miss, however many requests wait
            entry = self._data.get((tenant, version))
            if self._fresh(entry):
                assert entry is not None
                return entry
            row = (
                await conn.execute(_CURRENT_TDK if version is None else _TDK_VERSION, {"t": tenant, "v": version})
            ).first()
            if row is None:
                if version is not None:
                    raise TenantKeysMissingError(f"tenant {tenant} has no data key version {version}")
                return await self._create_first(conn, tenant)
            known = self._data.get((tenant, row.version))
            if known is not None and self._fresh(known):  # cached under its version: now known as current
                if row.current and self.ttl_seconds > 0:
                    self._data[(tenant, None)] = known
                return known
            current = await self.providers.provider(conn, tenant)
            provider = self.providers.for_wrapped(current, row.wrapped_key)
            raw = await _call(provider, provider.unwrap, tenant, row.wrapped_key)
            return self._remember(tenant, row.version, raw, current=bool(row.current))

    async def _create_first(self, conn: AsyncConnection, tenant: TenantId) -> _Cached:
        """Create the tenant's first data and index keys, committed on their own before any use."""
        provider = await self.providers.provider(conn, tenant)
        async with tenant_transaction(self.engine, tenant) as own:
            created = await create_tenant_keys(own, tenant, provider)
            if created is None:  # another process won the race: its row is committed now
                row = (await own.execute(_CURRENT_TDK, {"t": tenant})).one()
                raw = await _call(provider, provider.unwrap, tenant, row.wrapped_key)
                version = row.version
            else:
                version, raw = created
        return self._remember(tenant, version, raw, current=True)

    async def has_tenant_keys(self, conn: AsyncConnection, tenant: TenantId) -> bool:
        """Whether the tenant has a current data key (what ``tenants plan`` asks; no provider call)."""
        return (await conn.execute(_CURRENT_TDK, {"t": tenant})).first() is not None

    async def ensure_tenant_keys(self, conn: AsyncConnection, tenant: TenantId) -> bool:
        """Create the tenant's provider key, first data key and index key if missing (on ``conn``).

        For provisioning (e.g. ``tenants apply``): the caller commits. Nothing is cached.
        Returns True if keys were created.
        """
        if (await conn.execute(_CURRENT_TDK, {"t": tenant})).first() is not None:
            return False
        provider = await self.providers.provider(conn, tenant)
        return await create_tenant_keys(conn, tenant, provider) is not None

    # -- blind index ------------------------------------------------------

    async def index_key(self, conn: AsyncConnection, tenant: TenantId) -> IndexKey:
        """The tenant's blind-index key (stable across data key and provider rotations)."""
        cached = self._index.get(tenant)
        if cached is not None and cached[1] > self._clock() and cached[0].uses < self.max_uses:
            return cached[0]
        wrapped = (await conn.execute(_INDEX_KEY, {"t": tenant})).scalar_one_or_none()
        if wrapped is None:
            await self._tdk(conn, tenant, None)  # creates both keys for a new tenant
            wrapped = (await conn.execute(_INDEX_KEY, {"t": tenant})).scalar_one_or_none()
            if wrapped is None:
                raise TenantKeysMissingError(f"tenant {tenant} has a data key but no index key")
        tdk_version, sealed = _parse_index(wrapped)
        tdk = await self._tdk(conn, tenant, tdk_version)
        tdk.key.uses += 1
        try:
            raw = unwrap_key(tdk.raw, sealed, _index_key_aad(tenant, tdk_version))
        except DecryptionError as exc:
            raise KeyProviderError(f"index key of tenant {tenant} does not unwrap: tampered or misplaced") from exc
        key = IndexKey(raw)
        if self.ttl_seconds > 0:
            self._index[tenant] = (key, self._clock() + self.ttl_seconds)
        return key

    async def blind_index(self, conn: AsyncConnection, tenant: TenantId, field: str, value: str) -> bytes:
        return (await self.index_key(conn, tenant)).blind_index(field, value)

    # -- per-user keys ----------------------------------------------------

    async def user_key(
        self, conn: AsyncConnection, tenant: TenantId, user_id: str, *, create: bool = False
    ) -> FieldKey:
        """The user's field key; ``create=True`` makes one (in the caller's transaction) if missing.

        Without ``create``, a missing key raises :class:`UserKeyMissingError`: the user's
        fields are unreadable for good once it has been destroyed.
        """
        if create:
            current = await self._tdk(conn, tenant, None)
            fresh = os.urandom(KEY_BYTES)
            wrapped = wrap_key(current.raw, fresh, _user_key_aad(tenant, user_id, current.key.version))
            current.key.uses += 1
            params = {"t": tenant, "u": user_id, "v": current.key.version, "w": wrapped}
            row = (await conn.execute(_USER_KEY_GET_OR_CREATE, params)).first()
            if row is None:  # a concurrent transaction inserted it after our snapshot was taken
                row = (await conn.execute(_USER_KEY, {"t": tenant, "u": user_id})).first()
        else:
            row = (await conn.execute(_USER_KEY, {"t": tenant, "u": user_id})).first()
        if row is None:
            raise UserKeyMissingError(
                f"user {user_id!r} has no key: never created, or destroyed by erasure (their fields are unreadable)"
            )
        tdk_version, wrapped_user = int(row[0]), bytes(row[1])
        tdk = await self._tdk(conn, tenant, tdk_version)
        tdk.key.uses += 1
        raw = unwrap_key(tdk.raw, wrapped_user, _user_key_aad(tenant, user_id, tdk_version))
        return FieldKey(raw, KIND_USER, 0)

    async def destroy_user_key(self, conn: AsyncConnection, tenant: TenantId, user_id: str) -> bool:
        """Delete the user's wrapped key (crypto-shredding): irrecoverable once committed."""
        return (await conn.execute(_DESTROY_USER_KEY, {"t": tenant, "u": user_id})).first() is not None

    # -- convenience ------------------------------------------------------

    async def encrypt(
        self,
        conn: AsyncConnection,
        tenant: TenantId,
        value: str | bytes,
        context: FieldContext,
        *,
        user_id: str | None = None,
    ) -> str:
        """Encrypt under the user's key (created if missing) or, without ``user_id``, the current TDK."""
        if context.tenant_id != tenant:
            raise ValueError("context.tenant_id must be the tenant the key belongs to")
        if user_id is None:
            key = await self.data_key(conn, tenant)
        else:
            key = await self.user_key(conn, tenant, user_id, create=True)
        return key.encrypt(value, context)

    async def decrypt(
        self,
        conn: AsyncConnection,
        tenant: TenantId,
        token: str,
        context: FieldContext,
        *,
        user_id: str | None = None,
    ) -> bytes:
        """Decrypt with the key the ciphertext's header names; raises :class:`DecryptionError`."""
        header = parse_header(token)
        if header.kind == KIND_USER:
            if user_id is None:
                raise DecryptionError("this ciphertext is under a user key: pass user_id")
            key = await self.user_key(conn, tenant, user_id)
        elif header.kind == KIND_TENANT:
            key = await self.data_key(conn, tenant, header.key_version)
        else:
            raise DecryptionError(f"unknown key kind {header.kind}")
        return key.decrypt(token, context)


def _as_source(provider: KeyProvider | ProviderSource) -> ProviderSource:
    if hasattr(provider, "for_wrapped"):
        return cast(ProviderSource, provider)
    return StaticProviders(provider)


async def create_tenant_keys(
    conn: AsyncConnection, tenant: TenantId, provider: KeyProvider
) -> tuple[int, bytes] | None:
    """Provider key, TDK v1 and index key v1 for a tenant, inserted on ``conn``.

    Returns ``(version, plaintext)`` of the new TDK, or None if the tenant already had one.
    The provider is called before anything is written: if it is down, nothing is.
    """
    await _call(provider, provider.create_key, tenant)
    data_key = await _call(provider, provider.generate_data_key, tenant)
    inserted = (
        await conn.execute(
            _INSERT_TDK,
            {"t": tenant, "purpose": "data", "v": 1, "w": data_key.wrapped, "pv": data_key.key_version},
        )
    ).first()
    if inserted is None:
        return None
    index_wrapped = _wrap_index(data_key.plaintext, tenant, 1, os.urandom(KEY_BYTES))
    await conn.execute(_INSERT_TDK, {"t": tenant, "purpose": "index", "v": 1, "w": index_wrapped, "pv": None})
    log.info("created tenant data keys", extra={"fields": {"tenant": str(tenant), "provider": provider.kind}})
    return 1, data_key.plaintext


# ---------------------------------------------------------------------------
# rotation (operator side, as the schema owner)


@dataclass(frozen=True)
class RotationResult:
    tenant_id: str
    provider: str
    key_name: str
    provider_key_version: int
    data_keys_rewrapped: int
    data_keys_moved_from: dict[str, int]
    data_key_version: int
    new_data_key: bool
    index_key_rewrapped: bool
    user_keys_untouched: int
    field_ciphertexts_reencrypted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_ALL_TDKS = text(
    "SELECT purpose, version, wrapped_key, retired_at IS NULL AS current FROM tenant_data_keys "
    "WHERE tenant_id = :t ORDER BY purpose, version FOR UPDATE"
)
_UPDATE_WRAPPED = text(
    "UPDATE tenant_data_keys SET wrapped_key = :w, provider_key_version = :pv "
    "WHERE tenant_id = :t AND purpose = :purpose AND version = :v"
)


async def rotate_tenant(
    conn: AsyncConnection,
    tenant: TenantId,
    providers: ProviderSource | KeyProvider,
    *,
    new_data_key: bool = False,
) -> RotationResult:
    """Rotate the tenant's provider key and rewrap every stored TDK under the new version.

    Field ciphertexts and per-user keys are not touched: they are under the TDKs,
    whose plaintexts do not change. Keys wrapped by another provider (the local KEK,
    before the tenant brought its own Vault) are unwrapped there and wrapped by the
    tenant's provider. With ``new_data_key`` a new TDK version becomes current for
    new user keys and tenant-level fields (old versions stay for reading), and the
    index key is rewrapped under it (its value, hence every blind index, is kept).

    Runs in the caller's transaction (the schema owner's, bound to the tenant): all
    rows change or none do. If the provider fails half-way, the transaction rolls
    back and the old wrapped keys, still valid, stay.
    """
    source = _as_source(providers)
    provider = await source.provider(conn, tenant)
    rows = (await conn.execute(_ALL_TDKS, {"t": tenant})).all()
    await _call(provider, provider.create_key, tenant)
    new_version = await _call(provider, provider.rotate, tenant)
    info = await _call(provider, provider.key_info, tenant)

    if not any(r.purpose == "data" for r in rows):
        await create_tenant_keys(conn, tenant, provider)
        return RotationResult(str(tenant), provider.kind, info.name, new_version, 0, {}, 1, False, False, 0)

    rewrapped = 0
    moved: dict[str, int] = {}
    current_wrapped: dict[int, str] = {}
    for row in rows:
        if row.purpose != "data":
            continue
        if provider.owns(row.wrapped_key):
            wrapped = await _call(provider, provider.rewrap, tenant, row.wrapped_key)
        else:
            origin = source.for_wrapped(provider, row.wrapped_key)
            if origin is provider:
                raise KeyProviderError(
                    f"data key v{row.version} of tenant {tenant} is wrapped by a {wrapped_scheme(row.wrapped_key)!r} "
                    f"provider this process cannot reach"
                )
            plaintext = await _call(origin, origin.unwrap, tenant, row.wrapped_key)
            wrapped = await _call(provider, provider.wrap, tenant, plaintext)
            scheme = wrapped_scheme(row.wrapped_key)
            moved[scheme] = moved.get(scheme, 0) + 1
        await conn.execute(
            _UPDATE_WRAPPED,
            {"w": wrapped, "pv": wrapped_version(wrapped), "t": tenant, "purpose": "data", "v": row.version},
        )
        current_wrapped[row.version] = wrapped
        rewrapped += 1

    current = max(r.version for r in rows if r.purpose == "data" and r.current)
    index_rewrapped = False
    if new_data_key:
        old_raw = await _call(provider, provider.unwrap, tenant, current_wrapped[current])
        fresh = await _call(provider, provider.generate_data_key, tenant)
        next_version = max(r.version for r in rows if r.purpose == "data") + 1
        await conn.execute(
            text(
                "UPDATE tenant_data_keys SET retired_at = now() "
                "WHERE tenant_id = :t AND purpose = 'data' AND retired_at IS NULL"
            ),
            {"t": tenant},
        )
        await conn.execute(
            _INSERT_TDK,
            {"t": tenant, "purpose": "data", "v": next_version, "w": fresh.wrapped, "pv": fresh.key_version},
        )
        index_row = next((r for r in rows if r.purpose == "index" and r.current), None)
        if index_row is not None:
            tdk_version, sealed = _parse_index(index_row.wrapped_key)
            tdk_raw = (
                old_raw
                if tdk_version == current
                else await _call(provider, provider.unwrap, tenant, current_wrapped[tdk_version])
            )
            index_raw = unwrap_key(tdk_raw, sealed, _index_key_aad(tenant, tdk_version))
            await conn.execute(
                _UPDATE_WRAPPED,
                {
                    "w": _wrap_index(fresh.plaintext, tenant, next_version, index_raw),
                    "pv": None,
                    "t": tenant,
                    "purpose": "index",
                    "v": index_row.version,
                },
            )
            index_rewrapped = True
        current = next_version

    user_keys = (
        await conn.execute(text("SELECT count(*) FROM user_keys WHERE tenant_id = :t"), {"t": tenant})
    ).scalar_one()
    log.info(
        "rotated tenant keys",
        extra={"fields": {"tenant": str(tenant), "provider_key_version": new_version, "rewrapped": rewrapped}},
    )
    return RotationResult(
        str(tenant),
        provider.kind,
        info.name,
        new_version,
        rewrapped,
        moved,
        current,
        new_data_key,
        index_rewrapped,
        int(user_keys),
    )
