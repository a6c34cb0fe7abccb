"""The shared warm-start model end to end (docs/models.md#shared-warm-start-model): real tenants with seeded decisions,
one opted in is refused (never a "shared" model), three opted in train it (a tenant that did not opt in is not read),
the artifact names no tenant, each contributor's log audits the run, and an opted-in tenant's own model records that
it started from it while a tenant that did not opt in trains cold."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.controlplane.service import apply_manifest
from firstmile.ml.planner import tenant_model_name
from firstmile.tenancy.cli import create_key
from firstmile_inference.registry import Registry
from firstmile_inference.warm_start import SHARED_MODEL
from tests.conftest import PEPPER, REGION, Database, TenantFixture, make_settings
from tests.factories import manifest_for
from tests.integration.test_adaptive_planner import registry, running
from tests.integration.test_models_cli import _invoke
from tests.integration.test_tenant_models import EPSILON, _document, _model_audit, _outcomes, _seed

__all__ = ["registry"]

SHARED = {"model": None, "exploration": {"epsilon": EPSILON}, "training": {"warm_start": "shared"}}
NOT_SHARED = {"model": None, "exploration": {"epsilon": EPSILON}, "training": {"schedule_days": 7}}
CHEAP = ("--min-tenant-decisions", "40")


async def _tenant(admin_engine: AsyncEngine, planner: dict[str, Any]) -> TenantFixture:
    slug = f"w-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, _document(planner))
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


def _train(env: dict[str, str], registry: Path, *extra: str) -> Any:
    return _invoke("train", "--registry", str(registry), *extra, env=env)


async def test_opted_in_tenants_share_a_warm_start_and_no_one_else_is_read(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    env = {"FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url, "FIRSTMILE_DATABASE_URL": database.app_url}
    reg = Registry(registry)
    first = await _tenant(admin_engine, SHARED)
    second, third, outsider = [await _tenant(admin_engine, NOT_SHARED) for _ in range(3)]
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        for tenant, users in ((first, 60), (second, 50), (third, 45), (outsider, 70)):
            await _seed(client, tenant, users)
            # half the users the rules put on developer-quickstart activate, no one else: every candidate prefers
            # the path most decisions took, so its held-out decisions overlap the candidate's choices
            await _outcomes(
                admin_engine, tenant, "path_key = 'developer-quickstart' AND right(user_id, 4)::int % 2 = 0"
            )

        # one tenant opted in: refused, naming the gap; nothing registered
        alone = await asyncio.to_thread(_train, env, registry, "--shared", *CHEAP)
        assert alone.exit_code != 0
        assert "at least 3 contributing tenants" in alone.output and "1 opted in" in alone.output, alone.output
        assert f"{first.slug} (60)" in alone.output and outsider.slug not in alone.output
        assert reg.versions(SHARED_MODEL) == []
        conflicting = await asyncio.to_thread(_train, env, registry, "--shared", "--tenant", first.slug)
        assert conflicting.exit_code == 2 and "without --tenant" in conflicting.output

        # a tenant trained before any shared model exists: cold, and it says so
        cold = await asyncio.to_thread(
            _train, env, registry, "--tenant", first.slug, "--min-decisions", "40", "--min-per-path", "1"
        )
        assert cold.exit_code == 0, cold.output
        assert "none is registered" in cold.output and "trained cold" in cold.output
        assert reg.get(tenant_model_name(first.slug), "1.0.0").config["warm_start"] is None

        # three opted in: trained on theirs, the outsider (which opted in to scheduled training only) not read
        for tenant in (second, third):
            await apply_manifest(admin_engine, manifest_for(tenant.slug, REGION, _document(SHARED)))
        trained = await asyncio.to_thread(_train, env, registry, "--shared", *CHEAP)
        assert trained.exit_code == 0, trained.output
        mv = reg.get(SHARED_MODEL, "1.0.0")
        contributors = mv.config["contributors"]
        assert contributors["tenants"] == 3 and contributors["decisions"] == [60, 50, 45]
        assert mv.config["training"]["decisions"] == 155 and mv.config["network"]["outputs"] == 1
        artifact = "".join(p.read_text() for p in mv.path.glob("*.json"))
        for tenant in (first, second, third, outsider):
            assert tenant.slug not in artifact and str(tenant.id) not in artifact
        for key in ("developer-quickstart", "marketing-campaigns", "generic"):  # no path key either
            assert key not in artifact
        assert reg.stages(SHARED_MODEL).production is None

        # an opted-in tenant's model starts from it; a tenant that did not opt in trains cold
        warm = await asyncio.to_thread(
            _train, env, registry, "--tenant", second.slug, "--min-decisions", "40", "--min-per-path", "1"
        )
        assert warm.exit_code == 0, warm.output
        assert f"started from the shared warm-start model {SHARED_MODEL} 1.0.0" in warm.output
        own = reg.get(tenant_model_name(second.slug), "1.0.0")
        assert own.config["warm_start"] == {"model": SHARED_MODEL, "version": "1.0.0"}
        assert own.config["encoder"] == mv.config["encoder"]
        outside = await asyncio.to_thread(
            _train, env, registry, "--tenant", outsider.slug, "--min-decisions", "40", "--min-per-path", "1"
        )
        assert outside.exit_code == 0, outside.output
        assert reg.get(tenant_model_name(outsider.slug), "1.0.0").config["warm_start"] is None
        assert "shared warm-start" not in outside.output

    # the shared run is audited in each contributor's log, and in no other
    for tenant, decisions in ((first, 60), (second, 50), (third, 45)):
        shared = [e for e in await _model_audit(admin_engine, tenant) if e["action"] == "models.train_shared"]
        assert len(shared) == 1, shared
        entry = shared[0]
        assert entry["subject"] == f"model:{SHARED_MODEL}@1.0.0" and entry["actor"] == "operator:cli"
        assert (entry["decisions"], entry["tenants"], entry["pooled_decisions"]) == (decisions, 3, 155)
    outsider_actions = [e["action"] for e in await _model_audit(admin_engine, outsider)]
    assert outsider_actions == ["models.train"]
    trained_second = [e for e in await _model_audit(admin_engine, second) if e["action"] == "models.train"]
    assert trained_second[0]["warm_start"] == {"model": SHARED_MODEL, "version": "1.0.0"}
