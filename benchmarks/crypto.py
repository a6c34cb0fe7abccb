"""Field encryption and key-provider benchmark: ``run_crypto_benchmark()`` returns markdown.

Measured in one run, on one core:

- field encrypt/decrypt per second with a cached data key, against raw AES-256-GCM of
  the same bytes (random nonce, fixed associated data) as the baseline;
- the same with an uncached data key: every operation first unwraps the data key
  through the provider (local KEK; the Vault stand-in over HTTP through ``hvac``);
- blind index computations per second;
- with a PostgreSQL URL: key-provider calls per 1,000 records written through
  :class:`~firstmile.security.datakeys.DataKeyService` (each record: get-or-create the
  user's key, encrypt email, name and phone, compute the email blind index), from a
  cold cache on a new tenant, for both providers.

The Vault stand-in lives in ``tests/support`` (a repository checkout, not the wheel);
without it the Vault rows are skipped. Run with ``python -m benchmarks crypto`` from the
repository root (``FIRSTMILE_BENCH_ADMIN_URL``, a superuser URL, adds the provider-calls table).
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import bench_tenant
from benchmarks.database import fresh_bench_database
from firstmile.security.crypto import KIND_TENANT, FieldContext, FieldKey, IndexKey
from firstmile.security.keys import KeyProvider, LocalKekProvider, VaultSettings, VaultTransitProvider

BENCH_DB = "firstmile_bench_crypto"
EMAIL = "alice.martin@example-corp.com"


def _rate(op: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``op`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(64):
        op()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            op()
        count += 64
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def _vault_standin() -> Any | None:
    try:
        from tests.support.vault_transit import VaultTransitStandIn
    except ImportError:
        return None
    return VaultTransitStandIn()


def _vault_provider(standin: Any) -> VaultTransitProvider:
    role_id, secret_id = standin.add_role()
    secret = Path(tempfile.mkdtemp(prefix="firstmile-bench-")) / "secret_id"
    secret.write_text(secret_id, encoding="utf-8")
    return VaultTransitProvider(
        VaultSettings(address=standin.url, role_id=role_id, secret_id_file=secret, timeout_seconds=5.0)
    )


def _field_rows(seconds: float, providers: dict[str, KeyProvider]) -> list[tuple[str, float, float]]:
    tenant = uuid.uuid4()
    context = FieldContext(tenant, "end_users", "email", "user-000123")
    value = EMAIL.encode()
    aad = context.aad(b"\x01\x00\x00\x00\x01")
    raw_key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(raw_key)
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, value, aad)
    key = FieldKey(raw_key, KIND_TENANT, 1)
    token = key.encrypt(value, context)

    rows: list[tuple[str, float, float]] = []
    baseline_enc = _rate(lambda: aead.encrypt(os.urandom(12), value, aad), seconds)
    baseline_dec = _rate(lambda: aead.decrypt(nonce, sealed, aad), seconds)
    rows.append(("raw AES-256-GCM, same bytes (baseline)", baseline_enc, baseline_dec))
    rows.append(
        (
            "field, cached data key",
            _rate(lambda: key.encrypt(value, context), seconds),
            _rate(lambda: key.decrypt(token, context), seconds),
        )
    )
    for name, provider in providers.items():
        provider.create_key(tenant)
        data_key = provider.generate_data_key(tenant)
        cold = FieldKey(data_key.plaintext, KIND_TENANT, 1)
        cold_token = cold.encrypt(value, context)
        wrapped = data_key.wrapped

        def encrypt_uncached(p: KeyProvider = provider, w: str = wrapped) -> str:
            return FieldKey(p.unwrap(tenant, w), KIND_TENANT, 1).encrypt(value, context)

        def decrypt_uncached(p: KeyProvider = provider, w: str = wrapped, t: str = cold_token) -> bytes:
            return FieldKey(p.unwrap(tenant, w), KIND_TENANT, 1).decrypt(t, context)

        rows.append(
            (
                f"field, uncached data key ({name}: unwrap per operation)",
                _rate(encrypt_uncached, seconds),
                _rate(decrypt_uncached, seconds),
            )
        )
    return rows


async def _records(admin_url: str, provider: KeyProvider, records: int) -> tuple[int, int, int]:
    """Provision a new tenant, then write ``records`` records from a cold cache.

    Returns (provider calls to provision, provider calls while writing, milliseconds writing).
    Calls include Vault logins and token renewals.
    """
    from sqlalchemy import text

    from firstmile.kit.db import create_engine, tenant_transaction
    from firstmile.kit.uow import UnitOfWork
    from firstmile.security.datakeys import DataKeyService, new_tenant_keys, store_tenant_keys

    engine = create_engine(admin_url, pool_size=2, max_overflow=0, application_name="firstmile-bench")
    tenant = bench_tenant(uuid.uuid4())
    try:
        before = sum(provider.calls.values())
        material = await new_tenant_keys(provider, tenant)  # the provider first, then one transaction
        async with tenant_transaction(engine, tenant) as tx:
            await tx.execute(
                text(
                    "INSERT INTO tenants (id, slug, name, home_region, manifest_hash) "
                    "VALUES (:id, :slug, 'Bench', 'eu-west-1', '-')"
                ),
                {"id": tenant, "slug": f"bench-{tenant.hex[:12]}"},
            )
            await store_tenant_keys(tx, material)
        provisioned = sum(provider.calls.values())
        service = DataKeyService(engine, provider, ttl_seconds=300, max_uses=1_000_000)
        uow = UnitOfWork(engine, tenant)
        start = time.perf_counter()
        batch = 100
        fields = (("email", "{user}@example.com"), ("name", "Alice Martin"), ("phone", "+33612345678"))
        for first in range(0, records, batch):
            keys = await service.keys(uow)  # unwrapped before the transaction (cached after the first)
            async with tenant_transaction(engine, tenant) as tx:
                index = keys.index_key
                for n in range(first, min(first + batch, records)):
                    user = f"user-{n:07d}"
                    key = await keys.user_key(tx, user, create=True)
                    for column, value in fields:
                        key.encrypt(value.format(user=user), FieldContext(tenant, "end_users", column, user))
                    index.blind_index("email", f"{user}@example.com")
        elapsed = time.perf_counter() - start
        written = sum(provider.calls.values())
        return provisioned - before, written - provisioned, int(elapsed * 1000)
    finally:
        await engine.dispose()


def run_crypto_benchmark(admin_url: str | None = None, *, seconds: float = 1.0, records: int = 5000) -> str:
    """The benchmark as a markdown section; ``admin_url`` (a superuser URL) adds the provider-calls table."""
    workdir = Path(tempfile.mkdtemp(prefix="firstmile-bench-kek-"))
    providers: dict[str, KeyProvider] = {"local KEK": LocalKekProvider(workdir / "kek")}
    standin = _vault_standin()
    if standin is not None:
        standin.start()
        providers["Vault stand-in over HTTP"] = _vault_provider(standin)
    try:
        rows = _field_rows(seconds, providers)
        index = IndexKey(os.urandom(32))
        index_rate = _rate(lambda: index.blind_index("email", EMAIL), seconds)
        record_rows: list[tuple[str, int, int, int]] = []
        if admin_url is not None:
            url = fresh_bench_database(admin_url, BENCH_DB).admin_url
            for name, provider in providers.items():
                setup, calls, millis = asyncio.run(_records(url, provider, records))
                record_rows.append((name, setup, calls, millis))
    finally:
        if standin is not None:
            standin.stop()

    baseline_enc, baseline_dec = rows[0][1], rows[0][2]
    lines = [
        "### Field encryption and key-provider calls",
        "",
        f"`python -m benchmarks crypto`, Python {platform.python_version()} on {platform.machine()}, one core, "
        f"{seconds:g} s per figure; value: a {len(EMAIL)}-byte email; ratio: baseline ÷ row (1.0 = as fast).",
        "",
        "| operation | encrypt/s | decrypt/s | encrypt ratio | decrypt ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, enc, dec in rows:
        lines.append(f"| {label} | {_fmt(enc)} | {_fmt(dec)} | {baseline_enc / enc:.1f} | {baseline_dec / dec:.1f} |")
    lines += ["", f"Blind index (HMAC-SHA256 over the normalised email): {_fmt(index_rate)} per second.", ""]
    if record_rows:
        lines += [
            f"Records written through `DataKeyService` ({records:,} users of a freshly provisioned tenant, "
            "cold cache, 100 per transaction; each record: user key get-or-create, 3 fields encrypted, "
            "1 blind index). Provider calls include Vault logins:",
            "",
            "| provider | calls to provision the tenant | calls while writing | calls per 1,000 records | records/s |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, setup, calls, millis in record_rows:
            per_thousand = calls * 1000 / records
            lines.append(
                f"| {name} | {setup} | {calls} | {per_thousand:.2f} | {_fmt(records / max(millis, 1) * 1000)} |"
            )
        lines += [
            "",
            "Target: at most 1 provider call per 1,000 records. Writing needs one unwrap of the tenant data key "
            "per cache lifetime (TTL or use limit); user keys and the index key are unwrapped locally under it.",
        ]
    else:
        lines.append("Provider calls per 1,000 records: pass a PostgreSQL superuser URL to measure.")
    return "\n".join(lines) + "\n"
