"""Key providers: who holds the key-encryption key that wraps each tenant's data keys.

Two adapters behind one :class:`KeyProvider` port:

- :class:`LocalKekProvider`: a keyring file of 32-byte KEKs (hex, one version per
  line, mode 0600), the embedded default. Each tenant's wrapping key is derived
  from the KEK with HKDF-SHA256 over the tenant id.
- :class:`VaultTransitProvider`: a Vault Transit key per tenant
  (``firstmile-<tenant_id>``, or the manifest's ``key_name``) through ``hvac``,
  logged in with AppRole; the tenant may bring its own Vault (address,
  namespace, mount, AppRole) in its manifest.

Provider methods are synchronous (``hvac`` is); :mod:`firstmile.security.datakeys`
calls the blocking ones through :func:`asyncio.to_thread`. Each provider counts
its operations in ``calls`` so tests and the benchmark can check the cache.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from firstmile.security.crypto import KEY_BYTES, DecryptionError, encode_aad, unwrap_key, wrap_key

if TYPE_CHECKING:
    from firstmile.tenancy.manifest import KeysSpec

log = logging.getLogger("firstmile.keys")
T = TypeVar("T")

_WRAPPED = re.compile(r"^(?P<scheme>[a-z]+):v(?P<version>[1-9][0-9]{0,9}):(?P<body>[A-Za-z0-9+/=_-]+)$")


class KeyProviderError(RuntimeError):
    """A key operation failed; the message says which and why (never with key material)."""


class KeyProviderUnavailableError(KeyProviderError):
    """The provider cannot be reached or answered 5xx/timed out: retry later (HTTP 503)."""


class KeyProviderPermissionError(KeyProviderError):
    """The provider refused: bad AppRole credentials, or the token's policy lacks a capability."""


class KeyProviderConfigError(KeyProviderError):
    """The provider is misconfigured: missing secret, unknown key, unreadable KEK file."""


class DataKey(NamedTuple):
    """A fresh data key: its plaintext (keep in memory only), its wrapped form, the provider key version."""

    plaintext: bytes
    wrapped: str
    key_version: int

    def __repr__(self) -> str:  # never the plaintext
        return f"DataKey(wrapped={self.wrapped[:16]}…, key_version={self.key_version})"


@dataclass(frozen=True)
class KeyInfo:
    """What the provider knows about a tenant's key-encryption key."""

    provider: str
    name: str
    latest_version: int
    min_decryption_version: int
    versions: tuple[int, ...]


def wrapped_version(wrapped: str) -> int:
    """The provider key version in a wrapped key (``vault:v3:…`` or ``local:v3:…``)."""
    match = _WRAPPED.match(wrapped)
    if match is None:
        raise KeyProviderError("wrapped key is not in the <provider>:v<version>:<base64> format")
    return int(match["version"])


def wrapped_scheme(wrapped: str) -> str:
    match = _WRAPPED.match(wrapped)
    return match["scheme"] if match else ""


class KeyProvider(Protocol):
    """The port: create, wrap and unwrap, rotate and rewrap a tenant's key-encryption key."""

    kind: str
    """``local`` or ``vault``: the scheme of the wrapped keys this provider makes."""
    blocking: bool
    """True when calls do network I/O and must run in a worker thread."""
    calls: Counter[str]
    """Operations performed, by name (``generate_data_key``, ``unwrap``, …)."""

    def create_key(self, tenant: uuid.UUID) -> None:
        """Make sure the tenant's key-encryption key exists (idempotent)."""

    def generate_data_key(self, tenant: uuid.UUID) -> DataKey:
        """A new random 256-bit data key, with its wrapped form."""

    def unwrap(self, tenant: uuid.UUID, wrapped: str) -> bytes:
        """The plaintext of a wrapped data key."""

    def wrap(self, tenant: uuid.UUID, plaintext: bytes) -> str:
        """Wrap an existing key under the latest version (used to move keys between providers)."""

    def rewrap(self, tenant: uuid.UUID, wrapped: str) -> str:
        """The same key wrapped under the latest version; the plaintext never leaves the provider (Vault)."""

    def rotate(self, tenant: uuid.UUID) -> int:
        """Add a new key version; returns it. Older versions still unwrap."""

    def key_info(self, tenant: uuid.UUID) -> KeyInfo:
        """Name, versions and minimum decryption version of the tenant's key."""

    def owns(self, wrapped: str) -> bool:
        """Whether ``wrapped`` was made by a provider of this kind."""


# ---------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class KeyConfig:
    """Key-management settings (the wiring builds them from ``settings.keys``)."""

    data_dir: Path = Path(".firstmile")
    provider: Literal["local", "vault"] = "local"
    kek_file: Path | None = None
    create_kek: bool = True
    cache_ttl_seconds: float = 300.0
    cache_max_uses: int = 100_000
    vault_addr: str | None = None
    vault_namespace: str | None = None
    vault_mount: str = "transit"
    vault_role_id: str | None = None
    vault_secret_id_file: Path | None = None
    vault_timeout_seconds: float = 5.0

    @property
    def kek_path(self) -> Path:
        return self.kek_file if self.kek_file is not None else self.data_dir / "secrets" / "kek"


# ---------------------------------------------------------------------------
# local KEK


class LocalKekProvider:
    """Wraps data keys under a KEK kept in a keyring file on this host.

    The file holds one 64-hex-digit KEK per line; line *n* is version *n* and the
    last line is current. ``rotate`` appends a line (atomic replace, mode 0600)
    under an exclusive lock, and other processes reload the file when they meet a
    version they do not know. A tenant's wrapping key is
    ``HKDF-SHA256(KEK_v, info="firstmile/local-kek/v1" | tenant id)``, so tenants'
    wrapped keys are not interchangeable even under the one KEK.
    """

    kind = "local"
    blocking = False

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._keys: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._derived: dict[tuple[int, uuid.UUID], bytes] = {}
        if not path.exists():
            if not create:
                raise KeyProviderConfigError(
                    f"KEK file {path} does not exist: provision it (32 random bytes, hex) on every API host, "
                    "or set FIRSTMILE_KEK_FILE to where it is"
                )
            self._create()
        self._load()

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(KEY_BYTES))
        log.info("created local KEK file", extra={"fields": {"path": str(self.path)}})

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyProviderConfigError(f"cannot read KEK file {self.path}: {exc.strerror}") from exc
        keys: list[bytes] = []
        for number, line in enumerate(text.split(), start=1):
            try:
                key = bytes.fromhex(line)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise KeyProviderConfigError(f"KEK file {self.path}: version {number} is not 64 hex digits")
            keys.append(key)
        if not keys:
            raise KeyProviderConfigError(f"KEK file {self.path} is empty")
        self._keys = keys
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise KeyProviderConfigError(f"cannot read KEK file {self.path}: {exc.strerror}") from exc
        if (stat.st_mtime_ns, stat.st_size) != self._stamp:
            self._load()

    def _wrapping_key(self, version: int, tenant: uuid.UUID) -> bytes:
        cached = self._derived.get((version, tenant))
        if cached is None:
            if version > len(self._keys):
                self._load()
            if not 1 <= version <= len(self._keys):
                raise KeyProviderConfigError(f"KEK version {version} is not in {self.path}")
            hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_local_info(tenant))
            cached = hkdf.derive(self._keys[version - 1])
            self._derived[(version, tenant)] = cached
        return cached

    def _wrap(self, tenant: uuid.UUID, plaintext: bytes) -> str:
        version = len(self._keys)
        sealed = wrap_key(self._wrapping_key(version, tenant), plaintext, _local_aad(tenant, version))
        return f"local:v{version}:" + base64.b64encode(sealed).decode("ascii")

    def create_key(self, tenant: uuid.UUID) -> None:
        self.calls["create_key"] += 1

    def generate_data_key(self, tenant: uuid.UUID) -> DataKey:
        self.calls["generate_data_key"] += 1
        with self._lock:
            self._refresh()
            plaintext = os.urandom(KEY_BYTES)
            wrapped = self._wrap(tenant, plaintext)
        return DataKey(plaintext, wrapped, wrapped_version(wrapped))

    def unwrap(self, tenant: uuid.UUID, wrapped: str) -> bytes:
        self.calls["unwrap"] += 1
        match = _WRAPPED.match(wrapped)
        if match is None or match["scheme"] != "local":
            raise KeyProviderError("not a key wrapped by the local KEK (expected local:v<n>:…)")
        version = int(match["version"])
        try:
            sealed = base64.b64decode(match["body"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyProviderError("wrapped key is not valid base64") from exc
        with self._lock:
            wrapping = self._wrapping_key(version, tenant)
        try:
            return unwrap_key(wrapping, sealed, _local_aad(tenant, version))
        except DecryptionError as exc:
            raise KeyProviderError(
                f"local KEK version {version} cannot unwrap this key for tenant {tenant}: "
                "another tenant's key, another KEK file, or tampered"
            ) from exc

    def wrap(self, tenant: uuid.UUID, plaintext: bytes) -> str:
        self.calls["wrap"] += 1
        with self._lock:
            self._refresh()
            return self._wrap(tenant, plaintext)

    def rewrap(self, tenant: uuid.UUID, wrapped: str) -> str:
        self.calls["rewrap"] += 1
        plaintext = self.unwrap(tenant, wrapped)
        self.calls["unwrap"] -= 1  # internal to rewrap
        with self._lock:
            self._refresh()
            return self._wrap(tenant, plaintext)

    def rotate(self, tenant: uuid.UUID) -> int:
        """Append a new KEK version (the one keyring serves every tenant that uses the local KEK)."""
        self.calls["rotate"] += 1
        lock_path = self.path.with_name(self.path.name + ".lock")
        with self._lock, lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                lines = [key.hex() for key in self._keys] + [secrets.token_hex(KEY_BYTES)]
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write("\n".join(lines) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
                self._load()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        log.info("rotated local KEK", extra={"fields": {"version": len(self._keys), "tenant": str(tenant)}})
        return len(self._keys)

    def key_info(self, tenant: uuid.UUID) -> KeyInfo:
        self.calls["key_info"] += 1
        with self._lock:
            self._refresh()
            count = len(self._keys)
        return KeyInfo("local", str(self.path), count, 1, tuple(range(1, count + 1)))

    def owns(self, wrapped: str) -> bool:
        return wrapped.startswith("local:")


def _local_info(tenant: uuid.UUID) -> bytes:
    return b"firstmile/local-kek/v1|" + tenant.bytes


def _local_aad(tenant: uuid.UUID, version: int) -> bytes:
    return encode_aad(b"firstmile/local-kek/v1", str(tenant), f"v{version}")


# ---------------------------------------------------------------------------
# Vault Transit


@dataclass(frozen=True)
class VaultSettings:
    """One Vault Transit endpoint and the AppRole that logs in to it."""

    address: str
    role_id: str
    secret_id_env: str | None = None
    secret_id_file: Path | None = None
    namespace: str | None = None
    mount: str = "transit"
    auth_mount: str = "approle"
    key_name: str | None = None
    tls_ca_file: Path | None = None
    timeout_seconds: float = 5.0


class VaultTransitProvider:
    """Data keys wrapped by a Vault Transit key per tenant, through ``hvac``.

    Endpoints used (relative to the mount; see docs/security.md for the policy):
    ``GET/POST keys/:name``, ``POST keys/:name/rotate``, ``POST datakey/plaintext/:name``,
    ``POST decrypt/:name``, ``POST encrypt/:name``, ``POST rewrap/:name``; plus
    ``POST auth/<approle>/login`` and ``POST auth/token/renew-self``.

    The token is renewed once two thirds of its lease have passed, or replaced by a
    fresh login if it cannot be; a 403 triggers one re-login and retry (the token
    may have expired or been revoked), and a second 403 is a missing capability.
    Connection errors, timeouts and 5xx answers raise
    :class:`KeyProviderUnavailableError`.
    """

    kind = "vault"
    blocking = True

    def __init__(self, settings: VaultSettings) -> None:
        import hvac  # imported lazily: only Vault tenants need it

        self.settings = settings
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        verify: bool | str = str(settings.tls_ca_file) if settings.tls_ca_file is not None else True
        # token="" keeps hvac from picking up VAULT_TOKEN or ~/.vault-token: we log in ourselves
        self._client: Any = hvac.Client(
            url=settings.address,
            token="",
            namespace=settings.namespace,
            timeout=settings.timeout_seconds,  # type: ignore[arg-type]  # requests takes a float
            verify=verify,
        )
        self._renew_at: float | None = None
        self._renewable = False

    def __repr__(self) -> str:
        s = self.settings
        return f"VaultTransitProvider({s.address}, namespace={s.namespace!r}, mount={s.mount!r})"

    def key_name(self, tenant: uuid.UUID) -> str:
        return self.settings.key_name or f"firstmile-{tenant}"

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self._client.adapter.close()

    # -- authentication ---------------------------------------------------

    def _secret_id(self) -> str:
        s = self.settings
        if s.secret_id_env is not None:
            value = os.environ.get(s.secret_id_env)
            if not value:
                raise KeyProviderConfigError(f"AppRole secret_id: environment variable {s.secret_id_env} is not set")
            return value.strip()
        if s.secret_id_file is not None:
            try:
                return s.secret_id_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KeyProviderConfigError(
                    f"AppRole secret_id: cannot read {s.secret_id_file}: {exc.strerror}"
                ) from exc
        raise KeyProviderConfigError("AppRole secret_id: neither secret_id_env nor secret_id_file is configured")

    def _set_lease(self, auth: dict[str, Any]) -> None:
        lease = float(auth.get("lease_duration") or 0)
        self._renewable = bool(auth.get("renewable"))
        self._renew_at = time.monotonic() + lease * 2 / 3 if lease > 0 else None

    def _login(self) -> None:
        self.calls["login"] += 1
        s = self.settings
        try:
            response = self._client.auth.approle.login(
                role_id=s.role_id, secret_id=self._secret_id(), mount_point=s.auth_mount
            )
        except KeyProviderError:
            raise
        except Exception as exc:
            raise self._translate(exc, "login", f"auth/{s.auth_mount}/login", login=True) from exc
        self._set_lease(response["auth"])

    def _ensure_token(self) -> None:
        with self._lock:
            if not self._client.token:
                self._login()
                return
            if self._renew_at is None or time.monotonic() < self._renew_at:
                return
            if self._renewable:
                self.calls["renew"] += 1
                try:
                    self._set_lease(self._client.auth.token.renew_self()["auth"])
                    return
                except Exception as exc:  # renewal refused or failed: a fresh login decides
                    log.info("vault token renewal failed, logging in again", extra={"fields": {"error": str(exc)}})
            self._login()

    def _drop_token(self) -> None:
        with self._lock:
            self._client.token = ""
            self._renew_at = None

    # -- requests ---------------------------------------------------------

    def _translate(self, exc: Exception, op: str, path: str, *, login: bool = False) -> KeyProviderError:
        import hvac.exceptions as vault_errors
        import requests

        where = f"Vault {self.settings.address}"
        if self.settings.namespace:
            where += f" (namespace {self.settings.namespace})"
        if isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError):
            return KeyProviderUnavailableError(f"{where} unreachable during {op}: {type(exc).__name__}")
        if isinstance(
            exc,
            vault_errors.VaultDown
            | vault_errors.InternalServerError
            | vault_errors.BadGateway
            | vault_errors.RateLimitExceeded
            | vault_errors.VaultNotInitialized
            | vault_errors.UnexpectedError,
        ):
            return KeyProviderUnavailableError(f"{where} failed {op} on {path}: {_vault_errors(exc)}")
        if login and isinstance(exc, vault_errors.InvalidRequest | vault_errors.Forbidden | vault_errors.Unauthorized):
            return KeyProviderPermissionError(f"{where} refused the AppRole login: {_vault_errors(exc)}")
        if isinstance(exc, vault_errors.Forbidden | vault_errors.Unauthorized):
            return KeyProviderPermissionError(
                f"{where} denied {op} on {path}: the AppRole's policy lacks the capability "
                "(docs/security.md lists the policy Firstmile needs)"
            )
        if isinstance(exc, vault_errors.VaultError):
            return KeyProviderConfigError(f"{where} refused {op} on {path}: {_vault_errors(exc)}")
        return KeyProviderError(f"{where}: {op} failed: {type(exc).__name__}")

    def _request(self, op: str, path: str, call: Callable[[], T]) -> T:
        import hvac.exceptions as vault_errors

        self.calls[op] += 1
        for attempt in (1, 2):
            self._ensure_token()
            try:
                return call()
            except vault_errors.Forbidden as exc:
                if attempt == 1:  # expired or revoked token: log in again once
                    self._drop_token()
                    continue
                raise self._translate(exc, op, f"{self.settings.mount}/{path}") from exc
            except Exception as exc:
                raise self._translate(exc, op, f"{self.settings.mount}/{path}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _data(self, response: Any) -> dict[str, Any]:
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise KeyProviderError("unexpected Vault response (no data object)")
        return data

    # -- the port ---------------------------------------------------------

    def create_key(self, tenant: uuid.UUID) -> None:
        """Read the key; create it (aes256-gcm96) only if Vault says it does not exist."""
        import hvac.exceptions as vault_errors

        name, mount = self.key_name(tenant), self.settings.mount

        def read_or_none() -> Any:
            try:
                return self._client.secrets.transit.read_key(name=name, mount_point=mount)
            except vault_errors.InvalidPath:
                return None

        if self._request("read_key", f"keys/{name}", read_or_none) is not None:
            return
        self._request(
            "create_key",
            f"keys/{name}",
            lambda: self._client.secrets.transit.create_key(name=name, key_type="aes256-gcm96", mount_point=mount),
        )
        log.info("created vault transit key", extra={"fields": {"key": name, "mount": mount}})

    def generate_data_key(self, tenant: uuid.UUID) -> DataKey:
        name = self.key_name(tenant)
        data = self._data(
            self._request(
                "generate_data_key",
                f"datakey/plaintext/{name}",
                lambda: self._client.secrets.transit.generate_data_key(
                    name=name, key_type="plaintext", bits=256, mount_point=self.settings.mount
                ),
            )
        )
        plaintext = base64.b64decode(data["plaintext"])
        if len(plaintext) != KEY_BYTES:
            raise KeyProviderError(f"Vault returned a {len(plaintext)}-byte data key, expected {KEY_BYTES}")
        wrapped = str(data["ciphertext"])
        return DataKey(plaintext, wrapped, wrapped_version(wrapped))

    def unwrap(self, tenant: uuid.UUID, wrapped: str) -> bytes:
        name = self.key_name(tenant)
        data = self._data(
            self._request(
                "unwrap",
                f"decrypt/{name}",
                lambda: self._client.secrets.transit.decrypt_data(
                    name=name, ciphertext=wrapped, mount_point=self.settings.mount
                ),
            )
        )
        return base64.b64decode(data["plaintext"])

    def wrap(self, tenant: uuid.UUID, plaintext: bytes) -> str:
        name = self.key_name(tenant)
        data = self._data(
            self._request(
                "wrap",
                f"encrypt/{name}",
                lambda: self._client.secrets.transit.encrypt_data(
                    name=name, plaintext=base64.b64encode(plaintext).decode("ascii"), mount_point=self.settings.mount
                ),
            )
        )
        return str(data["ciphertext"])

    def rewrap(self, tenant: uuid.UUID, wrapped: str) -> str:
        name = self.key_name(tenant)
        data = self._data(
            self._request(
                "rewrap",
                f"rewrap/{name}",
                lambda: self._client.secrets.transit.rewrap_data(
                    name=name, ciphertext=wrapped, mount_point=self.settings.mount
                ),
            )
        )
        return str(data["ciphertext"])

    def rotate(self, tenant: uuid.UUID) -> int:
        name = self.key_name(tenant)
        self._request(
            "rotate",
            f"keys/{name}/rotate",
            lambda: self._client.secrets.transit.rotate_key(name=name, mount_point=self.settings.mount),
        )
        return self.key_info(tenant).latest_version

    def key_info(self, tenant: uuid.UUID) -> KeyInfo:
        name = self.key_name(tenant)
        data = self._data(
            self._request(
                "key_info",
                f"keys/{name}",
                lambda: self._client.secrets.transit.read_key(name=name, mount_point=self.settings.mount),
            )
        )
        versions = tuple(sorted(int(v) for v in (data.get("keys") or {})))
        return KeyInfo(
            "vault",
            f"{self.settings.mount}/keys/{name}",
            int(data["latest_version"]),
            int(data.get("min_decryption_version") or 1),
            versions,
        )

    def owns(self, wrapped: str) -> bool:
        return wrapped.startswith("vault:")


def _vault_errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------
# choosing a provider


def provider_for(keys: KeysSpec | None, config: KeyConfig) -> KeyProvider:
    """The provider for a tenant's manifest ``keys:`` section (``None``: the platform default)."""
    if keys is None:
        if config.provider == "local":
            return LocalKekProvider(config.kek_path, create=config.create_kek)
        if not (config.vault_addr and config.vault_role_id and config.vault_secret_id_file):
            raise KeyProviderConfigError(
                "FIRSTMILE_KEY_PROVIDER=vault needs FIRSTMILE_VAULT_ADDR, FIRSTMILE_VAULT_ROLE_ID "
                "and FIRSTMILE_VAULT_SECRET_ID_FILE"
            )
        return VaultTransitProvider(
            VaultSettings(
                address=config.vault_addr,
                role_id=config.vault_role_id,
                secret_id_file=config.vault_secret_id_file,
                namespace=config.vault_namespace,
                mount=config.vault_mount,
                timeout_seconds=config.vault_timeout_seconds,
            )
        )
    if keys.provider == "local":
        return LocalKekProvider(config.kek_path, create=config.create_kek)
    assert keys.address is not None and keys.approle is not None  # the manifest model checks this
    return VaultTransitProvider(
        VaultSettings(
            address=keys.address,
            role_id=keys.approle.role_id,
            secret_id_env=keys.approle.secret_id_env,
            secret_id_file=Path(keys.approle.secret_id_file) if keys.approle.secret_id_file else None,
            namespace=keys.namespace,
            mount=keys.mount,
            auth_mount=keys.approle.mount,
            key_name=keys.key_name,
            tls_ca_file=Path(keys.tls_ca_file) if keys.tls_ca_file else None,
            timeout_seconds=config.vault_timeout_seconds,
        )
    )


class ProviderRegistry:
    """One provider per distinct configuration, shared by every tenant that uses it (and its Vault token)."""

    def __init__(self, config: KeyConfig) -> None:
        self.config = config
        self._providers: dict[str, KeyProvider] = {}
        self._lock = threading.Lock()

    def get(self, keys: KeysSpec | None) -> KeyProvider:
        cache_key = "default" if keys is None else keys.model_dump_json()
        if keys is not None and keys.provider == "local":
            cache_key = "local"
        if keys is None and self.config.provider == "local":
            cache_key = "local"
        with self._lock:
            provider = self._providers.get(cache_key)
            if provider is None:
                provider = provider_for(keys, self.config)
                self._providers[cache_key] = provider
            return provider

    def close(self) -> None:
        """Close every provider's connections (Vault sessions)."""
        with self._lock:
            providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            close = getattr(provider, "close", None)
            if close is not None:
                close()

    def local(self) -> KeyProvider:
        """The local KEK provider (to read keys wrapped before a tenant moved to Vault)."""
        from firstmile.tenancy.manifest import KeysSpec

        return self.get(KeysSpec(provider="local"))
