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

Only step 2 needs the provider, and that is a network call (Vault over HTTP). It never
happens inside a database transaction: :meth:`DataKeyService.keys` reads the tenant's
wrapped keys in a short transaction of its own, unwraps them *outside* it (one provider
call per key version per cache lifetime: ``ttl_seconds`` or ``max_uses`` field operations,
whichever ends first) and returns a :class:`TenantKeys`. The caller then opens its
transaction and does everything else (per-user keys, blind indexes, field encryption)
with that object: local crypto and SQL only, so a retried transaction repeats no
provider call. A tenant that has no data key yet (``tenants apply`` makes it) gets one
the same way: provider first, then a short transaction of its own, so a key that
encrypted data is never lost to a caller's rollback.

Per-user keys are never cached across transactions, so destroying one
(crypto-shredding) takes effect at once in every process.
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx, tenant_transaction
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
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
from firstmile.tenancy import service as tenancy
from firstmile.tenancy.manifest import KeysSpec

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

    async def provider(self, tx: TenantTx) -> KeyProvider: ...

    def for_spec(self, spec: KeysSpec | None) -> KeyProvider:
        """The provider a manifest's ``keys:`` section names (``tenants apply``, before the tenant is stored)."""
        ...

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider: ...


class StaticProviders:
    """Every tenant uses the one provider (tests, benchmarks, single-provider deployments)."""

    def __init__(self, provider: KeyProvider) -> None:
        self._provider = provider

    async def provider(self, tx: TenantTx) -> KeyProvider:
        return self._provider

    def for_spec(self, spec: KeysSpec | None) -> KeyProvider:
        return self._provider

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider:
        return current


class ManifestProviders:
    """The provider named by the tenant's manifest ``keys:`` section, else the platform default.

    Reads the section through the tenancy slice's service. Keys wrapped by the local KEK
    before a tenant moved to its own Vault stay readable through the local provider until
    ``firstmile keys rotate`` moves them.
    """

    def __init__(self, registry: ProviderRegistry) -> None:
        self.registry = registry

    async def provider(self, tx: TenantTx) -> KeyProvider:
        return self.registry.get(await tenancy.keys_spec(tx))

    def for_spec(self, spec: KeysSpec | None) -> KeyProvider:
        return self.registry.get(spec)

    def for_wrapped(self, current: KeyProvider, wrapped: str) -> KeyProvider:
        if current.owns(wrapped):
            return current
        if wrapped_scheme(wrapped) == "local":
            return self.registry.local()
        return current


# ---------------------------------------------------------------------------
# SQL

_ALL_WRAPPED = text(
    "SELECT purpose, version, wrapped_key, retired_at IS NULL AS current FROM tenant_data_keys WHERE tenant_id = :t"
)
_CURRENT_TDK = text(
    "SELECT version, wrapped_key, true AS current FROM tenant_data_keys "
    "WHERE tenant_id = :t AND purpose = 'data' AND retired_at IS NULL"
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
_HAS_USER_KEY = text("SELECT 1 FROM user_keys WHERE tenant_id = :t AND user_id = :u")


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
# a tenant's unwrapped keys, for one transaction


@dataclass(slots=True)
class _Cached:
    key: FieldKey
    raw: bytes
    expires: float


@dataclass(frozen=True, slots=True)
class _WrappedRow:
    purpose: str
    version: int
    wrapped: str
    current: bool


@dataclass(slots=True)
class TenantKeys:
    """A tenant's data keys, unwrapped before the transaction that uses them.

    Everything here is local crypto and SQL on ``user_keys``: no provider call, so it
    is safe inside a transaction that may be retried.
    """

    tenant: TenantId
    current_version: int
    _data: dict[int, _Cached]
    _index: IndexKey | None = field(default=None)

    def data_key(self, version: int | None = None) -> FieldKey:
        """The current data key (``None``, for encryption) or a given version (for decryption)."""
        wanted = self.current_version if version is None else version
        entry = self._data.get(wanted)
        if entry is None:
            raise TenantKeysMissingError(f"tenant {self.tenant} has no data key version {wanted}")
        return entry.key

    def _raw(self, version: int) -> bytes:
        entry = self._data.get(version)
        if entry is None:
            raise TenantKeysMissingError(f"tenant {self.tenant} has no data key version {version}")
        entry.key.uses += 1
        return entry.raw

    @property
    def index_key(self) -> IndexKey:
        """The tenant's blind-index key (stable across data key and provider rotations)."""
        if self._index is None:
            raise TenantKeysMissingError(f"tenant {self.tenant} has a data key but no index key")
        return self._index

    def blind_index(self, field_name: str, value: str) -> bytes:
        return self.index_key.blind_index(field_name, value)

    async def user_key(self, tx: TenantTx, user_id: str, *, create: bool = False) -> FieldKey:
        """The user's field key; ``create=True`` makes one (in ``tx``) if missing.

        Without ``create``, a missing key raises :class:`UserKeyMissingError`: the user's
        fields are unreadable for good once it has been destroyed.
        """
        self._check(tx)
        if create:
            fresh = os.urandom(KEY_BYTES)
            version = self.current_version
            wrapped = wrap_key(self._raw(version), fresh, _user_key_aad(self.tenant, user_id, version))
            params = {"t": self.tenant, "u": user_id, "v": version, "w": wrapped}
            row = (await tx.execute(_USER_KEY_GET_OR_CREATE, params)).first()
            if row is None:  # a concurrent transaction inserted it after our snapshot was taken
                row = (await tx.execute(_USER_KEY, {"t": self.tenant, "u": user_id})).first()
        else:
            row = (await tx.execute(_USER_KEY, {"t": self.tenant, "u": user_id})).first()
        if row is None:
            raise UserKeyMissingError(
                f"user {user_id!r} has no key: never created, or destroyed by erasure (their fields are unreadable)"
            )
        tdk_version, wrapped_user = int(row[0]), bytes(row[1])
        raw = unwrap_key(self._raw(tdk_version), wrapped_user, _user_key_aad(self.tenant, user_id, tdk_version))
        return FieldKey(raw, KIND_USER, 0)

    async def encrypt(
        self, tx: TenantTx, value: str | bytes, context: FieldContext, *, user_id: str | None = None
    ) -> str:
        """Encrypt under the user's key (created if missing) or, without ``user_id``, the current TDK."""
        if context.tenant_id != self.tenant:
            raise ValueError("context.tenant_id must be the tenant the key belongs to")
        key = self.data_key() if user_id is None else await self.user_key(tx, user_id, create=True)
        return key.encrypt(value, context)

    async def decrypt(self, tx: TenantTx, token: str, context: FieldContext, *, user_id: str | None = None) -> bytes:
        """Decrypt with the key the ciphertext's header names; raises :class:`DecryptionError`."""
        header = parse_header(token)
        if header.kind == KIND_USER:
            if user_id is None:
                raise DecryptionError("this ciphertext is under a user key: pass user_id")
            key = await self.user_key(tx, user_id)
        elif header.kind == KIND_TENANT:
            key = self.data_key(header.key_version)
        else:
            raise DecryptionError(f"unknown key kind {header.kind}")
        return key.decrypt(token, context)

    def _check(self, tx: TenantTx) -> None:
        if tx.tenant != self.tenant:
            raise ValueError("these keys belong to another tenant than the transaction")


async def destroy_user_key(tx: TenantTx, user_id: str) -> bool:
    """Delete the user's wrapped key (crypto-shredding): irrecoverable once committed."""
    return (await tx.execute(_DESTROY_USER_KEY, {"t": tx.tenant, "u": user_id})).first() is not None


async def has_user_key(tx: TenantTx, user_id: str) -> bool:
    """Whether the user has a key (an export names it; never its value)."""
    return (await tx.execute(_HAS_USER_KEY, {"t": tx.tenant, "u": user_id})).first() is not None


# ---------------------------------------------------------------------------
# the service


class DataKeyService:
    """Tenant data keys (cached per process) for the API and the workers.

    ``ttl_seconds=0`` disables the cache: every :meth:`keys` unwraps through the provider.
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
        self._data: dict[tuple[uuid.UUID, int], _Cached] = {}
        self._index: dict[uuid.UUID, tuple[int, str, IndexKey, float]] = {}  # version, wrapped, key, expires
        self._sets: dict[uuid.UUID, TenantKeys] = {}
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

    def invalidate(self, tenant: uuid.UUID | None = None) -> None:
        """Forget cached keys (of one tenant, or all)."""
        if tenant is None:
            self._data.clear()
            self._index.clear()
            self._sets.clear()
            return
        for cache_key in [k for k in self._data if k[0] == tenant]:
            del self._data[cache_key]
        self._index.pop(tenant, None)
        self._sets.pop(tenant, None)

    def _fresh(self, entry: _Cached | None) -> bool:
        return entry is not None and entry.expires > self._clock() and entry.key.uses < self.max_uses

    def _lock(self, tenant: uuid.UUID) -> asyncio.Lock:
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        return lock

    async def keys(self, uow: UnitOfWork) -> TenantKeys:
        """The tenant's unwrapped data keys, for a transaction the caller opens afterwards.

        A short read transaction finds the wrapped keys; the provider unwraps the ones not
        cached, outside any transaction. A tenant without keys gets them (provider first,
        then a transaction of their own).
        """
        tenant = uow.tenant
        known = self._known(tenant)
        if known is not None:
            return known  # nothing to read or unwrap: no round trip at all
        async with self._lock(tenant):  # one provider call per miss, however many requests wait
            known = self._known(tenant)
            if known is not None:
                return known  # a request that held the lock before this one fetched them
            rows, provider = await uow.run(lambda tx: self._read(tx))
            if not any(r.purpose == "data" for r in rows):
                await self._create_first(uow, provider)
                rows, provider = await uow.run(lambda tx: self._read(tx))
            data: dict[int, _Cached] = {}
            current = 0
            for row in rows:
                if row.purpose != "data":
                    continue
                if row.current:
                    current = row.version
                entry = self._data.get((tenant, row.version))
                if not self._fresh(entry):
                    origin = self.providers.for_wrapped(provider, row.wrapped)
                    raw = await _call(origin, origin.unwrap, tenant, row.wrapped)
                    entry = _Cached(FieldKey(raw, KIND_TENANT, row.version), raw, self._clock() + self.ttl_seconds)
                    if self.ttl_seconds > 0:
                        self._data[(tenant, row.version)] = entry
                assert entry is not None
                data[row.version] = entry
            if current == 0:
                raise TenantKeysMissingError(f"tenant {tenant} has no current data key")
            keys = TenantKeys(tenant, current, data)
            index_row = next((r for r in rows if r.purpose == "index" and r.current), None)
            if index_row is not None:
                keys._index = self._index_key(keys, index_row)
            if self.ttl_seconds > 0:
                self._sets[tenant] = keys
            return keys

    def _known(self, tenant: uuid.UUID) -> TenantKeys | None:
        """The tenant's cached key set if every key in it (the index key included) is still fresh."""
        known = self._sets.get(tenant)
        if known is None or not all(self._fresh(entry) for entry in known._data.values()):
            return None
        index = self._index.get(tenant)
        if known._index is not None and (index is None or index[3] <= self._clock()):
            return None
        return known

    async def run_with_keys(self, uow: UnitOfWork, work: Callable[[TenantTx, TenantKeys], Awaitable[T]]) -> T:
        """``work`` in one transaction of ``uow`` with the tenant's keys, fetched before it opens.

        When the transaction meets a key version the cached keys lack (another process
        rotated the tenant's data key meanwhile), the keys are fetched again and the work
        runs once more: still no provider call inside a transaction.
        """
        keys = await self.keys(uow)
        try:
            return await uow.run(lambda tx: work(tx, keys))
        except TenantKeysMissingError:
            self.invalidate(uow.tenant)
            keys = await self.keys(uow)
            return await uow.run(lambda tx: work(tx, keys))

    async def _read(self, tx: TenantTx) -> tuple[list[_WrappedRow], KeyProvider]:
        rows = [
            _WrappedRow(r[0], int(r[1]), r[2], bool(r[3])) for r in await tx.execute(_ALL_WRAPPED, {"t": tx.tenant})
        ]
        return rows, await self.providers.provider(tx)

    def _index_key(self, keys: TenantKeys, row: _WrappedRow) -> IndexKey:
        cached = self._index.get(keys.tenant)
        if cached is not None and cached[0] == row.version and cached[1] == row.wrapped and cached[3] > self._clock():
            return cached[2]
        tdk_version, sealed = _parse_index(row.wrapped)
        try:
            raw = unwrap_key(keys._raw(tdk_version), sealed, _index_key_aad(keys.tenant, tdk_version))
        except DecryptionError as exc:
            raise KeyProviderError(f"index key of tenant {keys.tenant} does not unwrap: tampered or misplaced") from exc
        key = IndexKey(raw)
        if self.ttl_seconds > 0:
            self._index[keys.tenant] = (row.version, row.wrapped, key, self._clock() + self.ttl_seconds)
        return key

    async def _create_first(self, uow: UnitOfWork, provider: KeyProvider) -> None:
        """Create the tenant's first data and index keys: the provider first, then their own transaction."""
        material = await new_tenant_keys(provider, uow.tenant)
        await uow.run(lambda tx: store_tenant_keys(tx, material))


def as_source(provider: KeyProvider | ProviderSource) -> ProviderSource:
    """A provider source from a single provider (every tenant) or a source as it is."""
    return _as_source(provider)


def _as_source(provider: KeyProvider | ProviderSource) -> ProviderSource:
    if hasattr(provider, "for_wrapped"):
        return cast(ProviderSource, provider)
    return StaticProviders(provider)


# ---------------------------------------------------------------------------
# provisioning (``tenants apply``): provider calls, then SQL


@dataclass(frozen=True, slots=True)
class NewTenantKeys:
    """A new tenant's first data key (wrapped by its provider) and index key (wrapped by the data key)."""

    tenant: uuid.UUID
    data_wrapped: str
    data_provider_version: int | None
    index_wrapped: str
    provider_kind: str
    plaintext: bytes = field(repr=False)


async def new_tenant_keys(provider: KeyProvider, tenant: uuid.UUID) -> NewTenantKeys:
    """Make the tenant's provider key, data key v1 and index key v1 (network; no database)."""
    await _call(provider, provider.create_key, tenant)
    data_key = await _call(provider, provider.generate_data_key, tenant)
    index_wrapped = _wrap_index(data_key.plaintext, tenant, 1, os.urandom(KEY_BYTES))
    return NewTenantKeys(
        tenant, data_key.wrapped, data_key.key_version, index_wrapped, provider.kind, data_key.plaintext
    )


async def store_tenant_keys(tx: TenantTx, keys: NewTenantKeys) -> bool:
    """Insert keys made by :func:`new_tenant_keys`; False if the tenant had a data key already."""
    if keys.tenant != tx.tenant:
        raise ValueError("these keys were made for another tenant")
    params = {"t": tx.tenant, "purpose": "data", "v": 1, "w": keys.data_wrapped, "pv": keys.data_provider_version}
    if (await tx.execute(_INSERT_TDK, params)).first() is None:
        return False
    await tx.execute(_INSERT_TDK, {"t": tx.tenant, "purpose": "index", "v": 1, "w": keys.index_wrapped, "pv": None})
    log.info("created tenant data keys", extra={"fields": {"tenant": str(tx.tenant), "provider": keys.provider_kind}})
    return True


async def has_tenant_keys(tx: TenantTx) -> bool:
    """Whether the tenant has a current data key (what ``tenants plan`` asks; no provider call)."""
    return (await tx.execute(_CURRENT_TDK, {"t": tx.tenant})).first() is not None


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
    "WHERE tenant_id = :t ORDER BY purpose, version"
)
_LOCK_TDKS = text(_ALL_TDKS.text + " FOR UPDATE")
_UPDATE_WRAPPED = text(
    "UPDATE tenant_data_keys SET wrapped_key = :w, provider_key_version = :pv "
    "WHERE tenant_id = :t AND purpose = :purpose AND version = :v"
)
_RETIRE_DATA = text(
    "UPDATE tenant_data_keys SET retired_at = now() WHERE tenant_id = :t AND purpose = 'data' AND retired_at IS NULL"
)
_COUNT_USER_KEYS = text("SELECT count(*) FROM user_keys WHERE tenant_id = :t")


class RotationConflictError(KeyProviderError):
    """The tenant's keys changed while the rotation talked to the provider; nothing was written."""


@dataclass(frozen=True, slots=True)
class _RotationPlan:
    """What the rotation will write, computed with the provider before the write transaction."""

    read: tuple[tuple[str, int, str, bool], ...]
    updates: tuple[tuple[str, int, str], ...]  # (purpose, version, new wrapped key)
    new_data: tuple[int, str, int | None] | None  # (version, wrapped, provider key version)
    moved: dict[str, int]


async def rotate_tenant(
    engine: AsyncEngine,
    tenant: TenantId,
    providers: ProviderSource | KeyProvider,
    *,
    new_data_key: bool = False,
    actor: str,
    subject: str,
) -> RotationResult:
    """Rotate the tenant's provider key and rewrap every stored TDK under the new version.

    Field ciphertexts and per-user keys are not touched: they are under the TDKs,
    whose plaintexts do not change. Keys wrapped by another provider (the local KEK,
    before the tenant brought its own Vault) are unwrapped there and wrapped by the
    tenant's provider. With ``new_data_key`` a new TDK version becomes current for
    new user keys and tenant-level fields (old versions stay for reading), and the
    index key is rewrapped under it (its value, hence every blind index, is kept).

    An operator task on ``engine`` (the schema owner's), in three steps so that no
    provider call happens inside a database transaction: read the wrapped keys; ask the
    provider for the new wrappings; write them all in one transaction that first checks,
    under row locks, that the keys are still the ones read (else
    :class:`RotationConflictError` and nothing changes). If the provider fails half-way,
    nothing was written and the old wrapped keys, still valid, stay. The ``keys.rotate``
    audit entry (``actor``, ``subject``) is written in the same transaction.
    """
    source = _as_source(providers)
    async with tenant_transaction(engine, tenant) as tx:
        rows = tuple((r[0], int(r[1]), str(r[2]), bool(r[3])) for r in await tx.execute(_ALL_TDKS, {"t": tenant}))
        provider = await source.provider(tx)

    await _call(provider, provider.create_key, tenant)
    new_version = await _call(provider, provider.rotate, tenant)
    info = await _call(provider, provider.key_info, tenant)

    if not any(purpose == "data" for purpose, _, _, _ in rows):
        material = await new_tenant_keys(provider, tenant)
        async with tenant_transaction(engine, tenant) as tx:
            await store_tenant_keys(tx, material)
            result = RotationResult(str(tenant), provider.kind, info.name, new_version, 0, {}, 1, False, False, 0)
            await _audit_rotation(tx, result, actor, subject)
        return result

    plan = await _plan_rotation(tenant, rows, provider, source, new_data_key=new_data_key)
    async with tenant_transaction(engine, tenant) as tx:
        locked = tuple((r[0], int(r[1]), str(r[2]), bool(r[3])) for r in await tx.execute(_LOCK_TDKS, {"t": tenant}))
        if locked != rows:
            raise RotationConflictError(
                f"the data keys of tenant {tenant} changed during the rotation (another rotation?); run it again"
            )
        for purpose, version, wrapped in plan.updates:
            params = {"w": wrapped, "t": tenant, "purpose": purpose, "v": version}
            await tx.execute(_UPDATE_WRAPPED, params | {"pv": wrapped_version(wrapped) if purpose == "data" else None})
        current = max(v for purpose, v, _, is_current in rows if purpose == "data" and is_current)
        if plan.new_data is not None:
            next_version, fresh_wrapped, fresh_pv = plan.new_data
            await tx.execute(_RETIRE_DATA, {"t": tenant})
            await tx.execute(
                _INSERT_TDK, {"t": tenant, "purpose": "data", "v": next_version, "w": fresh_wrapped, "pv": fresh_pv}
            )
            current = next_version
        user_keys = int((await tx.execute(_COUNT_USER_KEYS, {"t": tenant})).scalar_one())
        result = RotationResult(
            str(tenant),
            provider.kind,
            info.name,
            new_version,
            sum(1 for purpose, _, _ in plan.updates if purpose == "data"),
            plan.moved,
            current,
            new_data_key,
            any(purpose == "index" for purpose, _, _ in plan.updates),
            user_keys,
        )
        await _audit_rotation(tx, result, actor, subject)
    log.info(
        "rotated tenant keys",
        extra={
            "fields": {
                "tenant": str(tenant),
                "provider_key_version": new_version,
                "rewrapped": result.data_keys_rewrapped,
            }
        },
    )
    return result


async def _plan_rotation(
    tenant: TenantId,
    rows: tuple[tuple[str, int, str, bool], ...],
    provider: KeyProvider,
    source: ProviderSource,
    *,
    new_data_key: bool,
) -> _RotationPlan:
    """The provider's part of a rotation: new wrappings for every data key, and a new data key if asked."""
    updates: list[tuple[str, int, str]] = []
    moved: dict[str, int] = {}
    current_wrapped: dict[int, str] = {}
    for purpose, version, wrapped_key, _ in rows:
        if purpose != "data":
            continue
        if provider.owns(wrapped_key):
            wrapped = await _call(provider, provider.rewrap, tenant, wrapped_key)
        else:
            origin = source.for_wrapped(provider, wrapped_key)
            if origin is provider:
                raise KeyProviderError(
                    f"data key v{version} of tenant {tenant} is wrapped by a {wrapped_scheme(wrapped_key)!r} "
                    f"provider this process cannot reach"
                )
            plaintext = await _call(origin, origin.unwrap, tenant, wrapped_key)
            wrapped = await _call(provider, provider.wrap, tenant, plaintext)
            scheme = wrapped_scheme(wrapped_key)
            moved[scheme] = moved.get(scheme, 0) + 1
        updates.append(("data", version, wrapped))
        current_wrapped[version] = wrapped
    if not new_data_key:
        return _RotationPlan(rows, tuple(updates), None, moved)
    current = max(v for purpose, v, _, is_current in rows if purpose == "data" and is_current)
    old_raw = await _call(provider, provider.unwrap, tenant, current_wrapped[current])
    fresh = await _call(provider, provider.generate_data_key, tenant)
    next_version = max(v for purpose, v, _, _ in rows if purpose == "data") + 1
    index_row = next((r for r in rows if r[0] == "index" and r[3]), None)
    if index_row is not None:
        tdk_version, sealed = _parse_index(index_row[2])
        tdk_raw = (
            old_raw
            if tdk_version == current
            else await _call(provider, provider.unwrap, tenant, current_wrapped[tdk_version])
        )
        index_raw = unwrap_key(tdk_raw, sealed, _index_key_aad(tenant, tdk_version))
        updates.append(("index", index_row[1], _wrap_index(fresh.plaintext, tenant, next_version, index_raw)))
    return _RotationPlan(rows, tuple(updates), (next_version, fresh.wrapped, fresh.key_version), moved)


async def _audit_rotation(tx: TenantTx, result: RotationResult, actor: str, subject: str) -> None:
    await audit.append(tx, "key", actor, subject, {"action": "keys.rotate", **result.as_dict()})
