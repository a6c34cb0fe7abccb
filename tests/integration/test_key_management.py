"""Key management on the real PostgreSQL, with the local KEK and with Vault (the stand-in, through hvac).

Each tenant's data key is wrapped by its provider and cached; per-user keys are
wrapped by the data key; rotation rewraps without touching data; a provider
outage fails writes that need a new key and writes nothing; destroying a user's
key makes exactly that user's fields unreadable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.cli import main
from firstmile.controlplane.service import apply_manifest
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import TenantId
from firstmile.kit.uow import UnitOfWork
from firstmile.security.cli import KeyRotationError, rotate_tenant_keys
from firstmile.security.crypto import DecryptionError, FieldContext
from firstmile.security.datakeys import (
    DataKeyService,
    ManifestProviders,
    TenantKeys,
    UserKeyMissingError,
    destroy_user_key,
    has_tenant_keys,
    new_tenant_keys,
    store_tenant_keys,
)
from firstmile.security.keys import (
    KeyConfig,
    KeyProvider,
    KeyProviderConfigError,
    KeyProviderError,
    KeyProviderPermissionError,
    KeyProviderUnavailableError,
    LocalKekProvider,
    ProviderRegistry,
    VaultSettings,
    VaultTransitProvider,
)
from firstmile.settings import get_settings
from firstmile.tenancy.manifest import KeysSpec, TenantManifest
from firstmile.wiring.adapters import key_config
from tests.conftest import Database, make_settings
from tests.factories import db_snapshot, demo_document, manifest_for
from tests.support.vault_transit import FULL_TRANSIT, VaultTransitStandIn, allowed

REGION = "eu-west-1"
T = TypeVar("T")

# what docs/security.md tells operators to grant (app + operator policies), as the stand-in checks it
APP_POLICY = {
    "transit/keys/firstmile-*": {"read", "update"},
    "transit/datakey/plaintext/firstmile-*": {"update"},
    "transit/decrypt/firstmile-*": {"update"},
}
OPERATOR_POLICY = {
    **APP_POLICY,
    "transit/rewrap/firstmile-*": {"update"},
    "transit/encrypt/firstmile-*": {"update"},
}


@pytest.fixture(scope="module")
def vault() -> Iterator[VaultTransitStandIn]:
    with VaultTransitStandIn() as server:
        yield server


_OPEN: list[Any] = []


def _track(closable: T) -> T:
    """Close it after the test (hvac sessions hold sockets)."""
    _OPEN.append(closable)
    return closable


def _registry(config: KeyConfig) -> ProviderRegistry:
    return _track(ProviderRegistry(config))


@pytest.fixture(autouse=True)
def vault_running(vault: VaultTransitStandIn) -> Iterator[None]:
    yield
    vault.start()  # a test that stopped it leaves it running for the next
    vault.sealed = False
    vault.latency = 0.0
    while _OPEN:
        _OPEN.pop().close()


@dataclass
class Keyed:
    """A tenant, the provider its manifest names, and a service as the API would build it."""

    kind: str
    id: TenantId
    slug: str
    config: KeyConfig
    registry: ProviderRegistry
    provider: KeyProvider
    service: DataKeyService

    def ctx(self, column: str, row: str, table: str = "end_users") -> FieldContext:
        return FieldContext(self.id, table, column, row)

    async def keys(self, engine: AsyncEngine, service: DataKeyService | None = None) -> TenantKeys:
        """The tenant's keys from ``service`` (default: this tenant's), unwrapped before any transaction."""
        return await (service or self.service).keys(UnitOfWork(engine, self.id))


async def _keyed_tenant(
    kind: str,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    vault: VaultTransitStandIn,
    tmp_path: Path,
    *,
    policy: dict[str, set[str]] | None = None,
    **service_options: Any,
) -> Keyed:
    slug = f"k-{uuid.uuid4().hex[:10]}"
    document = demo_document()
    if kind == "vault":
        role_id, secret_id = vault.add_role(policy if policy is not None else OPERATOR_POLICY)
        secret_file = tmp_path / f"{slug}.secret_id"
        secret_file.write_text(secret_id + "\n", encoding="utf-8")
        document["keys"] = {
            "provider": "vault",
            "address": vault.url,
            "approle": {"role_id": role_id, "secret_id_file": str(secret_file)},
        }
    manifest = manifest_for(slug, REGION, document)
    tenant = (await apply_manifest(admin_engine, manifest)).tenant_id
    config = key_config(make_settings(data_dir=tmp_path))
    registry = _registry(config)
    provider = registry.get(manifest.keys)
    service = DataKeyService(app_engine, ManifestProviders(registry), **service_options)
    return Keyed(kind, tenant, slug, config, registry, provider, service)


@pytest.fixture(params=["local", "vault"])
async def keyed(
    request: pytest.FixtureRequest,
    admin_engine: AsyncEngine,
    app_engine: AsyncEngine,
    vault: VaultTransitStandIn,
    tmp_path: Path,
) -> Keyed:
    return await _keyed_tenant(request.param, admin_engine, app_engine, vault, tmp_path)


def _calls(provider: KeyProvider) -> int:
    return sum(provider.calls.values())


async def _provision(k: Keyed, engine: AsyncEngine) -> bool:
    """Create the tenant's provider key, first data key and index key if missing, as `tenants apply` does:
    the provider first, then the rows in a transaction of their own. True if keys were created."""
    async with tenant_transaction(engine, k.id) as tx:
        if await has_tenant_keys(tx):
            return False
    material = await new_tenant_keys(k.provider, k.id)
    async with tenant_transaction(engine, k.id) as tx:
        return await store_tenant_keys(tx, material)


async def _key_rows(admin_engine: AsyncEngine, tenant: uuid.UUID) -> dict[str, list[tuple[Any, ...]]]:
    async with admin_engine.connect() as conn:
        data = (
            await conn.execute(
                text(
                    "SELECT purpose, version, wrapped_key, provider_key_version, retired_at IS NULL "
                    "FROM tenant_data_keys WHERE tenant_id = :t ORDER BY purpose, version"
                ),
                {"t": tenant},
            )
        ).all()
        users = (
            await conn.execute(
                text("SELECT user_id, tdk_version, wrapped_key FROM user_keys WHERE tenant_id = :t ORDER BY user_id"),
                {"t": tenant},
            )
        ).all()
    return {"data": [tuple(r) for r in data], "users": [(r[0], r[1], bytes(r[2])) for r in users]}


async def _write_users(k: Keyed, engine: AsyncEngine, users: list[str]) -> dict[str, dict[str, str]]:
    """Encrypt email and name of each user under their own key; returns the ciphertexts."""
    out: dict[str, dict[str, str]] = {}
    keys = await k.keys(engine)
    async with tenant_transaction(engine, k.id) as tx:
        for user in users:
            key = await keys.user_key(tx, user, create=True)
            out[user] = {
                "email": key.encrypt(f"{user}@example.com", k.ctx("email", user)),
                "name": key.encrypt(f"Name of {user}", k.ctx("name", user)),
            }
    return out


async def _read_user(k: Keyed, engine: AsyncEngine, user: str, tokens: dict[str, str]) -> dict[str, str]:
    keys = await k.keys(engine)
    async with tenant_transaction(engine, k.id) as tx:
        key = await keys.user_key(tx, user)
        return {column: key.decrypt_text(token, k.ctx(column, user)) for column, token in tokens.items()}


# ---------------------------------------------------------------------------


async def test_fields_round_trip_and_nothing_is_stored_in_plaintext(
    keyed: Keyed, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tokens = await _write_users(keyed, app_engine, ["alice", "bob"])
    keys = await keyed.keys(app_engine)
    async with tenant_transaction(app_engine, keyed.id) as tx:
        tenant_field = await keys.encrypt(tx, "ACME Corp", keyed.ctx("company", "t", "tenants"))
        index = keys.blind_index("email", " Alice@Example.com")

    rows = await _key_rows(admin_engine, keyed.id)
    assert [(r[0], r[1]) for r in rows["data"]] == [("data", 1), ("index", 1)]
    scheme = "vault:v1:" if keyed.kind == "vault" else "local:v1:"
    assert rows["data"][0][2].startswith(scheme) and rows["data"][0][3] == 1
    assert rows["data"][1][2].startswith("tdk:v1:")
    assert [u[:2] for u in rows["users"]] == [("alice", 1), ("bob", 1)]
    assert all(len(u[2]) == 12 + 32 + 16 for u in rows["users"])  # nonce, key, tag: wrapped, never raw

    # the data key's plaintext is nowhere in the database
    plaintext_tdk = keyed.provider.unwrap(keyed.id, rows["data"][0][2])
    async with admin_engine.connect() as conn:
        dump = (
            await conn.execute(
                text("SELECT string_agg(t::text, '|') FROM (SELECT * FROM tenant_data_keys WHERE tenant_id = :t) t"),
                {"t": keyed.id},
            )
        ).scalar_one()
    assert plaintext_tdk.hex() not in dump
    assert "alice@example.com" not in str(tokens) and "ACME" not in tenant_field

    # a fresh process (cold cache, built as the API builds it) reads everything back
    fresh = DataKeyService.from_config(app_engine, keyed.config)
    _track(cast(ManifestProviders, fresh.providers).registry)
    keyed.service = fresh
    assert await _read_user(keyed, app_engine, "alice", tokens["alice"]) == {
        "email": "alice@example.com",
        "name": "Name of alice",
    }
    fresh_keys = await keyed.keys(app_engine, fresh)
    async with tenant_transaction(app_engine, keyed.id) as tx:
        ctx = keyed.ctx("company", "t", "tenants")
        assert await fresh_keys.decrypt(tx, tenant_field, ctx) == b"ACME Corp"
        assert fresh_keys.blind_index("email", "alice@example.com") == index
        with pytest.raises(DecryptionError, match="failed authentication"):  # wrong row: refused
            await fresh_keys.decrypt(tx, tenant_field, keyed.ctx("company", "other", "tenants"))
        with pytest.raises(DecryptionError, match="pass user_id"):
            await fresh_keys.decrypt(tx, tokens["bob"]["email"], keyed.ctx("email", "bob"))
        assert await fresh_keys.decrypt(tx, tokens["bob"]["email"], keyed.ctx("email", "bob"), user_id="bob")


async def test_tenants_keys_are_isolated(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path
) -> None:
    for kind in ("local", "vault"):
        a = await _keyed_tenant(kind, admin_engine, app_engine, vault, tmp_path)
        b = await _keyed_tenant(kind, admin_engine, app_engine, vault, tmp_path)
        tokens = await _write_users(a, app_engine, ["same-user"])
        await _write_users(b, app_engine, ["same-user"])
        keys_a, keys_b = await a.keys(app_engine), await b.keys(app_engine)
        async with tenant_transaction(app_engine, a.id) as tx:
            index_a = keys_a.blind_index("email", "x@example.com")
            wrapped_a = (
                await tx.execute(text("SELECT wrapped_key FROM tenant_data_keys WHERE purpose = 'data'"))
            ).scalar_one()
        async with tenant_transaction(app_engine, b.id) as tx:
            assert keys_b.blind_index("email", "x@example.com") != index_a
            # RLS: tenant b sees only its own key rows, and cannot plant one for tenant a
            seen = {r[0] for r in await tx.execute(text("SELECT tenant_id FROM tenant_data_keys"))}
            assert seen == {b.id}
            key_b = await keys_b.user_key(tx, "same-user")
            with pytest.raises(DecryptionError):  # a's ciphertext, even claimed for b's row, is not b's
                key_b.decrypt(tokens["same-user"]["email"], b.ctx("email", "same-user"))
        with pytest.raises(DBAPIError, match="row-level security"):
            async with tenant_transaction(app_engine, b.id) as tx:
                await tx.execute(
                    text(
                        "INSERT INTO user_keys (tenant_id, user_id, tdk_version, wrapped_key) VALUES (:a, 'x', 1, '')"
                    ),
                    {"a": a.id},
                )
        # a's wrapped data key does not unwrap as b's: per-tenant Transit keys, per-tenant local wrapping keys
        with pytest.raises(KeyProviderError):
            b.provider.unwrap(b.id, wrapped_a)
        assert a.provider.unwrap(a.id, wrapped_a)
    names = {name for (_, _, name) in vault.keys}
    assert len([n for n in names if n.startswith("firstmile-")]) >= 2


async def test_cache_honours_ttl_and_max_uses(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path
) -> None:
    now = [1000.0]
    k = await _keyed_tenant("vault", admin_engine, app_engine, vault, tmp_path)
    assert await _provision(k, app_engine)
    service = DataKeyService(
        app_engine, ManifestProviders(k.registry), ttl_seconds=10, max_uses=5, clock=lambda: now[0]
    )
    vault.reset_counts()

    def unwraps() -> int:
        return k.provider.calls["unwrap"]

    before = unwraps()
    key = (await k.keys(app_engine, service)).data_key()
    assert unwraps() == before + 1
    assert (await k.keys(app_engine, service)).data_key() is key  # cached
    now[0] += 9.9
    await k.keys(app_engine, service)
    assert unwraps() == before + 1
    now[0] += 0.2  # TTL over: unwrapped again
    key = (await k.keys(app_engine, service)).data_key()
    assert unwraps() == before + 2
    for n in range(5):  # five uses: the limit
        key.encrypt("x", k.ctx("email", str(n)))
    assert (await k.keys(app_engine, service)).data_key() is not key
    assert unwraps() == before + 3
    # concurrent misses share one provider call
    service.invalidate(k.id)
    await asyncio.gather(*(k.keys(app_engine, service) for _ in range(10)))
    assert unwraps() == before + 4
    assert vault.operations["decrypt"] == 4  # the server agrees

    uncached = DataKeyService(app_engine, ManifestProviders(k.registry), ttl_seconds=0)
    for _ in range(3):
        (await k.keys(app_engine, uncached)).data_key()
    assert unwraps() == before + 7


async def test_at_most_one_provider_call_per_thousand_records(keyed: Keyed, app_engine: AsyncEngine) -> None:
    await _provision(keyed, app_engine)  # provisioning, as `tenants apply` would
    service = DataKeyService(app_engine, ManifestProviders(keyed.registry))
    before = _calls(keyed.provider)
    for batch in range(10):
        keys = await keyed.keys(app_engine, service)
        async with tenant_transaction(app_engine, keyed.id) as tx:
            index = keys.index_key
            for n in range(100):
                user = f"u{batch}-{n}"
                key = await keys.user_key(tx, user, create=True)
                for column in ("email", "name", "phone"):
                    key.encrypt(f"{column} of {user}", keyed.ctx(column, user))
                index.blind_index("email", f"{user}@example.com")
    assert _calls(keyed.provider) - before <= 1  # one unwrap of the data key, logins included
    async with tenant_transaction(app_engine, keyed.id) as tx:
        count = (await tx.execute(text("SELECT count(*) FROM user_keys"))).scalar_one()
    assert count == 1000


async def test_rotation_rewraps_without_reencrypting(
    keyed: Keyed, app_engine: AsyncEngine, admin_engine: AsyncEngine, database: Database, vault: VaultTransitStandIn
) -> None:
    tokens = await _write_users(keyed, app_engine, ["ann", "ben"])
    keys = await keyed.keys(app_engine)
    async with tenant_transaction(app_engine, keyed.id) as tx:
        tenant_field = await keys.encrypt(tx, "plan: gold", keyed.ctx("plan", "t", "tenants"))
        index_before = keys.blind_index("email", "ann@example.com")
    before = await _key_rows(admin_engine, keyed.id)

    result = await rotate_tenant_keys(database.admin_url, keyed.slug, keyed.config)
    assert result["provider_key_version"] == 2
    assert result["data_keys_rewrapped"] == 1
    assert result["field_ciphertexts_reencrypted"] == 0
    assert result["user_keys_untouched"] == 2

    after = await _key_rows(admin_engine, keyed.id)
    assert after["users"] == before["users"]  # user keys untouched
    data_before, data_after = before["data"][0], after["data"][0]
    assert data_after[2] != data_before[2] and data_after[2].startswith(f"{keyed.kind}:v2:")
    assert data_after[3] == 2
    assert after["data"][1] == before["data"][1]  # index key is under the TDK: untouched
    if keyed.kind == "vault":
        assert vault.key(f"firstmile-{keyed.id}").latest == 2
        assert vault.operations["rewrap"] >= 1
    else:
        assert len(keyed.config.kek_path.read_text().split()) == 2

    # a cold cache unwraps the rewrapped key: old data reads as before
    keyed.service = DataKeyService(app_engine, ManifestProviders(_registry(keyed.config)))
    assert await _read_user(keyed, app_engine, "ann", tokens["ann"]) == {
        "email": "ann@example.com",
        "name": "Name of ann",
    }
    assert (await keyed.keys(app_engine)).blind_index("email", "ann@example.com") == index_before

    # and a new data key version for new writes: old versions stay readable, blind indexes do not change
    result = await rotate_tenant_keys(database.admin_url, keyed.slug, keyed.config, new_data_key=True)
    assert result["provider_key_version"] == 3
    assert (result["data_key_version"], result["data_keys_rewrapped"], result["index_key_rewrapped"]) == (2, 1, True)
    rows = await _key_rows(admin_engine, keyed.id)
    assert [(r[0], r[1], r[4]) for r in rows["data"]] == [("data", 1, False), ("data", 2, True), ("index", 1, True)]
    assert rows["data"][2][2].startswith("tdk:v2:")
    service = DataKeyService(app_engine, ManifestProviders(_registry(keyed.config)))
    keyed.service = service
    new_tokens = await _write_users(keyed, app_engine, ["cid"])
    assert {u[0]: u[1] for u in (await _key_rows(admin_engine, keyed.id))["users"]} == {
        "ann": 1,
        "ben": 1,
        "cid": 2,
    }
    assert (await _read_user(keyed, app_engine, "ben", tokens["ben"]))["email"] == "ben@example.com"
    assert (await _read_user(keyed, app_engine, "cid", new_tokens["cid"]))["email"] == "cid@example.com"
    keys = await keyed.keys(app_engine, service)
    async with tenant_transaction(app_engine, keyed.id) as tx:
        ctx = keyed.ctx("plan", "t", "tenants")
        assert await keys.decrypt(tx, tenant_field, ctx) == b"plan: gold"
        assert keys.blind_index("email", "ann@example.com") == index_before


async def test_rotation_moves_local_keys_into_the_tenants_own_vault(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path, database: Database
) -> None:
    k = await _keyed_tenant("local", admin_engine, app_engine, vault, tmp_path)
    tokens = await _write_users(k, app_engine, ["dee"])
    # the tenant brings its own key: the manifest gains a keys section
    role_id, secret_id = vault.add_role(OPERATOR_POLICY)
    os.environ["FIRSTMILE_TEST_BYOK_SECRET"] = secret_id
    document = demo_document()
    document["keys"] = {
        "provider": "vault",
        "address": vault.url,
        "approle": {"role_id": role_id, "secret_id_env": "FIRSTMILE_TEST_BYOK_SECRET"},
    }
    await apply_manifest(admin_engine, manifest_for(k.slug, REGION, document))
    # until rotation the local-wrapped key still reads, through the local provider
    k.service = DataKeyService(app_engine, ManifestProviders(_registry(k.config)))
    assert (await _read_user(k, app_engine, "dee", tokens["dee"]))["email"] == "dee@example.com"

    result = await rotate_tenant_keys(database.admin_url, k.slug, k.config)
    assert result["provider"] == "vault" and result["data_keys_moved_from"] == {"local": 1}
    rows = await _key_rows(admin_engine, k.id)
    assert rows["data"][0][2].startswith("vault:v2:")
    k.service = DataKeyService(app_engine, ManifestProviders(_registry(k.config)))
    assert (await _read_user(k, app_engine, "dee", tokens["dee"]))["email"] == "dee@example.com"
    with pytest.raises(KeyRotationError, match="no tenant"):
        await rotate_tenant_keys(database.admin_url, "no-such-tenant", k.config)


async def test_provider_down_fails_new_keys_and_writes_nothing(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path
) -> None:
    k = await _keyed_tenant("vault", admin_engine, app_engine, vault, tmp_path)
    before = await db_snapshot(admin_engine, k.id)
    vault_provider = cast(VaultTransitProvider, k.provider)
    impatient = _track(VaultTransitProvider(dataclasses.replace(vault_provider.settings, timeout_seconds=0.3)))
    # Each outage is told apart at the first answer (or its absence): a refused connection, Vault's 503, and
    # for a Vault slower (1.5 s) than the client's timeout (0.3 s), the client's own timeout, not Vault's answer.
    expected = {
        "stopped": r"unreachable during \w+: ConnectionError",
        "sealed": r"failed \w+ on .*: Vault is sealed",
        "slow": r"unreachable during \w+: ReadTimeout",
    }
    for outage, reason in expected.items():
        if outage == "stopped":
            vault.stop()
        elif outage == "sealed":
            vault.sealed = True
        else:
            vault.latency = 1.5
            k.service = DataKeyService(app_engine, impatient)
        provider = impatient if outage == "slow" else vault_provider
        asked = Counter(provider.calls)
        with pytest.raises(KeyProviderUnavailableError, match=reason):
            keys = await k.keys(app_engine)  # the provider is asked before the write's transaction opens
            async with tenant_transaction(app_engine, k.id) as tx:
                await tx.execute(text("INSERT INTO end_users (tenant_id, user_id) VALUES (:t, 'eve')"), {"t": k.id})
                await keys.encrypt(tx, "eve@example.com", k.ctx("email", "eve"), user_id="eve")
        assert set((provider.calls - asked).values()) == {1}, (outage, provider.calls)  # each step tried once
        assert await db_snapshot(admin_engine, k.id) == before, outage  # nothing written, no key, no user
        vault.start()
        vault.sealed = False
        vault.latency = 0.0

    # back up: the same write succeeds; then, with the data key cached, an outage does not stop writes
    k.service = DataKeyService(app_engine, ManifestProviders(_registry(k.config)))
    await _write_users(k, app_engine, ["eve"])
    vault.stop()
    tokens = await _write_users(k, app_engine, ["fay"])
    assert (await _read_user(k, app_engine, "fay", tokens["fay"]))["email"] == "fay@example.com"
    cold = DataKeyService(app_engine, ManifestProviders(_registry(k.config)))
    with pytest.raises(KeyProviderUnavailableError, match="unreachable"):
        (await k.keys(app_engine, cold)).data_key()
    vault.start()


async def test_missing_vault_capability_is_a_clear_error(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path
) -> None:
    no_datakey = {p: c for p, c in APP_POLICY.items() if "datakey" not in p}
    k = await _keyed_tenant("vault", admin_engine, app_engine, vault, tmp_path, policy=no_datakey)
    before = await db_snapshot(admin_engine, k.id)
    with pytest.raises(KeyProviderPermissionError, match=r"denied generate_data_key on transit/datakey/plaintext/"):
        (await k.keys(app_engine)).data_key()
    assert await db_snapshot(admin_engine, k.id) == before

    # the app policy cannot rewrap: rotation is the operator's
    app = await _keyed_tenant("vault", admin_engine, app_engine, vault, tmp_path, policy=APP_POLICY)
    (await app.keys(app_engine)).data_key()
    wrapped = (await _key_rows(admin_engine, app.id))["data"][0][2]
    with pytest.raises(KeyProviderPermissionError, match="rewrap"):
        await asyncio.to_thread(app.provider.rewrap, app.id, wrapped)

    # wrong credentials and missing secrets are named as such
    role_id, _ = vault.add_role(FULL_TRANSIT)
    bad = tmp_path / "bad_secret"
    bad.write_text("not-the-secret", encoding="utf-8")
    wrong = _track(VaultTransitProvider(VaultSettings(address=vault.url, role_id=role_id, secret_id_file=bad)))
    with pytest.raises(KeyProviderPermissionError, match="refused the AppRole login: invalid role or secret ID"):
        wrong.generate_data_key(k.id)
    unset = _track(
        VaultTransitProvider(VaultSettings(address=vault.url, role_id=role_id, secret_id_env="FIRSTMILE_NOPE_X"))
    )
    with pytest.raises(KeyProviderConfigError, match="FIRSTMILE_NOPE_X is not set"):
        unset.generate_data_key(k.id)
    with pytest.raises(KeyProviderConfigError, match="encryption key not found"):
        app.provider.unwrap(uuid.uuid4(), wrapped)  # another tenant's Transit key does not exist


async def test_token_expiry_relogin_and_renewal(vault: VaultTransitStandIn, tmp_path: Path) -> None:
    tenant = uuid.uuid4()
    role_id, secret_id = vault.add_role(FULL_TRANSIT, token_ttl=3)
    secret = tmp_path / "secret"
    secret.write_text(secret_id, encoding="utf-8")
    provider = _track(VaultTransitProvider(VaultSettings(address=vault.url, role_id=role_id, secret_id_file=secret)))
    provider.create_key(tenant)
    data_key = provider.generate_data_key(tenant)
    vault.revoke_tokens()  # what an expired or revoked token looks like: 403 -> one new login, then success
    assert provider.unwrap(tenant, data_key.wrapped) == data_key.plaintext
    assert provider.calls["login"] == 2
    await asyncio.sleep(2.1)  # past two thirds of the 3 s lease: renewed, not a new login
    assert provider.unwrap(tenant, data_key.wrapped) == data_key.plaintext
    assert (provider.calls["renew"], provider.calls["login"]) == (1, 2)


async def test_vault_namespaces_are_honoured(vault: VaultTransitStandIn, tmp_path: Path) -> None:
    tenant = uuid.uuid4()
    role_id, secret_id = vault.add_role(FULL_TRANSIT, namespace="acme/prod")
    secret = tmp_path / "secret"
    secret.write_text(secret_id, encoding="utf-8")
    settings = VaultSettings(address=vault.url, role_id=role_id, secret_id_file=secret, namespace="acme/prod")
    provider = _track(VaultTransitProvider(settings))
    provider.create_key(tenant)
    assert ("acme/prod", "transit", f"firstmile-{tenant}") in vault.keys
    outside = _track(VaultTransitProvider(VaultSettings(address=vault.url, role_id=role_id, secret_id_file=secret)))
    with pytest.raises(KeyProviderPermissionError, match="AppRole login"):  # the role lives in the namespace
        outside.create_key(tenant)


async def test_destroying_a_user_key_shreds_only_that_user(
    keyed: Keyed, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    tokens = await _write_users(keyed, app_engine, ["gil", "hal"])
    async with tenant_transaction(app_engine, keyed.id) as tx:
        assert await destroy_user_key(tx, "gil")
        assert not await destroy_user_key(tx, "nobody")
    with pytest.raises(UserKeyMissingError, match="destroyed by erasure"):
        await _read_user(keyed, app_engine, "gil", tokens["gil"])
    assert (await _read_user(keyed, app_engine, "hal", tokens["hal"]))["name"] == "Name of hal"
    # the erased user signing up again gets a new key, which cannot open the old ciphertexts
    keys = await keyed.keys(app_engine)
    async with tenant_transaction(app_engine, keyed.id) as tx:
        key = await keys.user_key(tx, "gil", create=True)
        with pytest.raises(DecryptionError):
            key.decrypt(tokens["gil"]["email"], keyed.ctx("email", "gil"))
    # nothing but the wrapped key was needed: the data key and the provider are unchanged
    assert [r[0] for r in (await _key_rows(admin_engine, keyed.id))["users"]] == ["gil", "hal"]


async def test_application_role_cannot_change_stored_keys(keyed: Keyed, app_engine: AsyncEngine) -> None:
    await _write_users(keyed, app_engine, ["ivy"])
    refused = [
        "UPDATE tenant_data_keys SET wrapped_key = 'x'",
        "DELETE FROM tenant_data_keys",
        "UPDATE user_keys SET wrapped_key = ''",
        "TRUNCATE user_keys",
    ]
    for statement in refused:
        with pytest.raises(DBAPIError, match="permission denied"):
            async with tenant_transaction(app_engine, keyed.id) as tx:
                await tx.execute(text(statement))


async def test_user_key_rows_are_bound_to_their_user(
    keyed: Keyed, app_engine: AsyncEngine, admin_engine: AsyncEngine
) -> None:
    """A database writer who swaps two users' wrapped keys gets unreadable keys, not the other user's data."""
    tokens = await _write_users(keyed, app_engine, ["jo", "kim"])
    async with admin_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE user_keys SET wrapped_key = (SELECT wrapped_key FROM user_keys "
                "WHERE tenant_id = :t AND user_id = 'kim') WHERE tenant_id = :t AND user_id = 'jo'"
            ),
            {"t": keyed.id},
        )
    with pytest.raises(DecryptionError, match="wrapped key failed authentication"):
        await _read_user(keyed, app_engine, "jo", tokens["jo"])


def test_local_kek_file_is_created_once_private_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "kek"
    provider = LocalKekProvider(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text())) == 32
    first = path.read_text()
    LocalKekProvider(path)  # existing file: kept
    assert path.read_text() == first
    tenant, other = uuid.uuid4(), uuid.uuid4()
    data_key = provider.generate_data_key(tenant)
    assert data_key.wrapped.startswith("local:v1:") and data_key.key_version == 1
    assert "plaintext" not in repr(data_key) and data_key.plaintext.hex() not in repr(data_key)
    with pytest.raises(KeyProviderError, match="cannot unwrap"):
        provider.unwrap(other, data_key.wrapped)

    other_process = LocalKekProvider(path)  # loaded before the rotation
    assert provider.rotate(tenant) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rewrapped = provider.rewrap(tenant, data_key.wrapped)
    assert rewrapped.startswith("local:v2:")
    assert other_process.unwrap(tenant, rewrapped) == data_key.plaintext  # reloads the keyring for v2
    assert provider.unwrap(tenant, data_key.wrapped) == data_key.plaintext  # v1 still unwraps
    assert provider.key_info(tenant).versions == (1, 2)

    with pytest.raises(KeyProviderConfigError, match="provision it"):
        LocalKekProvider(tmp_path / "missing", create=False)
    (tmp_path / "broken").write_text("zz", encoding="utf-8")
    with pytest.raises(KeyProviderConfigError, match="not 64 hex digits"):
        LocalKekProvider(tmp_path / "broken")


def test_manifest_keys_section() -> None:
    base = demo_document()

    def with_keys(keys: dict[str, Any]) -> TenantManifest:
        return TenantManifest.model_validate({**base, "keys": keys})

    approle = {"role_id": "r-1", "secret_id_file": "/run/secrets/vault_secret_id"}
    manifest = with_keys({"provider": "vault", "address": "https://vault.acme.example:8200", "approle": approle})
    assert manifest.keys is not None and manifest.keys.mount == "transit" and manifest.keys.approle is not None
    assert manifest.keys.approle.mount == "approle"
    assert TenantManifest.model_validate(base).keys is None
    refused: list[tuple[dict[str, Any], str]] = [
        ({"provider": "vault", "address": "https://v", "approle": {**approle, "secret_id": "s3cr3t"}}, "Extra inputs"),
        ({"provider": "vault", "address": "https://v", "approle": {"role_id": "r"}}, "exactly one"),
        (
            {"provider": "vault", "address": "https://v", "approle": {**approle, "secret_id_env": "X"}},
            "exactly one",
        ),
        ({"provider": "vault", "approle": approle}, "needs address and approle"),
        ({"provider": "local", "address": "https://v"}, "takes no Vault settings"),
        ({"provider": "vault", "address": "ftp://v", "approle": approle}, "String should match"),
        ({"provider": "vault", "address": "https://v", "mount": "../sys", "approle": approle}, "String should match"),
        ({"provider": "kms"}, "Input should be"),
    ]
    for keys, message in refused:
        with pytest.raises(ValidationError, match=message):
            with_keys(keys)
    assert KeysSpec(provider="local").model_dump_json()


def test_policy_matching_follows_vault_globs() -> None:
    assert allowed(APP_POLICY, "transit/datakey/plaintext/firstmile-abc", "update")
    assert not allowed(APP_POLICY, "transit/datakey/wrapped/firstmile-abc", "update")
    assert not allowed(APP_POLICY, "transit/rewrap/firstmile-abc", "update")
    assert not allowed(APP_POLICY, "transit/decrypt/other-key", "update")
    assert allowed({"transit/keys/+/rotate": {"update"}}, "transit/keys/k/rotate", "update")
    assert not allowed({"transit/keys/+/rotate": {"update"}}, "transit/keys/k/x/rotate", "update")
    assert not allowed({"transit/*": {"update"}, "transit/rewrap/*": {"deny"}}, "transit/rewrap/k", "update")


async def test_keys_rotate_command(
    admin_engine: AsyncEngine, app_engine: AsyncEngine, vault: VaultTransitStandIn, tmp_path: Path, database: Database
) -> None:
    k = await _keyed_tenant("vault", admin_engine, app_engine, vault, tmp_path)
    (await k.keys(app_engine)).data_key()
    env = {
        "FIRSTMILE_DATABASE_URL": database.app_url,
        "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
        "FIRSTMILE_API_KEY_PEPPER": "test-pepper",
        "FIRSTMILE_DATA_DIR": str(tmp_path),
    }
    get_settings.cache_clear()
    try:  # the command runs its own event loop: give it a thread
        done = await asyncio.to_thread(CliRunner().invoke, main, ["keys", "rotate", "--tenant", k.slug], env=env)
        missing = await asyncio.to_thread(
            CliRunner().invoke, main, ["keys", "rotate", "--tenant", "no-such-tenant"], env=env
        )
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["tenant"] == k.slug and report["provider"] == "vault"
    assert (report["provider_key_version"], report["data_keys_rewrapped"], report["field_ciphertexts_reencrypted"]) == (
        2,
        1,
        0,
    )
    assert missing.exit_code == 1 and "no tenant 'no-such-tenant'" in missing.output
