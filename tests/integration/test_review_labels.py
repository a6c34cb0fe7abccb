"""Sampled reviews of the path model's decisions become labels (docs/review.md): with every low-confidence decision
sampled, starts through the API queue decision reviews; reviewers' verdicts are counted in `firstmile models drift`
and exported by `firstmile models labels`, with the corrected target where a better path was named."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.cli import main
from firstmile.kit.db import TenantTx
from firstmile.kit.scope import OPERATOR_CLI
from firstmile.kit.uow import UnitOfWork
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.settings import get_settings
from tests.conftest import PEPPER, Database, make_settings
from tests.integration.test_adaptive_planner import adaptive_tenant, running


@pytest.fixture
def registry(tiny_registry: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(tiny_registry, copy)
    return copy


def _invoke(*args: str, env: dict[str, str]) -> Any:
    get_settings.cache_clear()  # the command reads FIRSTMILE_* from ``env``
    try:
        return CliRunner().invoke(main, ["models", *args], env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


async def test_reviewed_decisions_are_counted_in_drift_and_exported_as_labels(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, app_engine: AsyncEngine, registry: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    settings = make_settings(model_registry_uri=str(registry), review_confidence_threshold=1.0, review_sample_rate=1.0)
    app = create_app(settings, database.app_url, PEPPER, analytics=analytics_store)
    started: dict[str, dict[str, Any]] = {}
    async for client in running(app):
        for i in range(6):
            r = await client.post(
                "/v1/onboarding/start",
                json={"user_id": f"rev-{i}", "traits": {"persona": "analyst", "company_size": "11-50"}},
                headers=tenant.headers,
            )
            assert r.status_code == 201 and r.json()["decision"]["selected_by"] == "model", r.text
            started[f"rev-{i}"] = r.json()
    async with admin_engine.connect() as conn:
        queued = await conn.execute(
            text("SELECT id, user_id, path_key, details FROM onboarding_reviews WHERE tenant_id = :t"
                 " AND kind = 'decision' ORDER BY user_id"), {"t": tenant.id},
        )  # fmt: skip
        reviews = {r[1]: (r[0], r[2], r[3]) for r in queued}
    assert sorted(reviews) == sorted(started)  # every decision below a confidence of 1: each sampled
    chosen = {user: path for user, (_id, path, _details) in reviews.items()}
    better = next(p for p in ("enterprise-rollout", "developer-quickstart") if p != chosen["rev-3"])

    # reviewers: three right, two wrong (one naming the better path), one left pending
    verdicts = {"rev-0": ("right", None), "rev-1": ("right", None), "rev-2": ("right", None),
                "rev-3": ("wrong", better), "rev-4": ("wrong", None)}  # fmt: skip
    service = OnboardingService(CatalogCache())
    uow = UnitOfWork(app_engine, OPERATOR_CLI.tenant(tenant.id))
    for user, (verdict, better_path) in verdicts.items():

        async def decide(tx: TenantTx, user: str = user, verdict: str = verdict, better_path: str | None = better_path
                         ) -> None:  # fmt: skip
            await service.decide_review(tx, reviews[user][0], verdict, reviewer="editor@acme.example",
                                        better_path=better_path)  # fmt: skip

        await uow.run(decide)

    env = {"FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url, "FIRSTMILE_DATABASE_URL": database.app_url}
    args = ["drift", "--registry", str(registry), "--tenant", tenant.slug, "--no-flag", "--json"]
    drift = await asyncio.to_thread(_invoke, *args, env=env)  # the command runs its own event loop
    assert drift.exit_code == 0, drift.output
    report = json.loads(drift.output)  # --json: only JSON
    assert report["reviews"] == {"reviewed": 5, "right": 3, "wrong": 2, "reviewer_accuracy": 0.6,
                                 "better_paths": {better: 1}}  # fmt: skip
    text_report = await asyncio.to_thread(_invoke, *args[:-1], env=env)
    assert f"reviews: 5 reviewed, 3 right, 2 wrong (reviewer accuracy 0.600); better paths named: {better} 1" in (
        text_report.output
    )

    labels = await asyncio.to_thread(_invoke, "labels", "--tenant", tenant.slug, "--json", env=env)
    assert labels.exit_code == 0, labels.output
    exported = json.loads(labels.output)
    assert exported["model"] == "path_classifier" and exported["summary"] == report["reviews"]
    rows = exported["labels"]
    assert len(rows) == 5
    by_target = sorted((row["chosen_path"], row["verdict"], row["target"] or "-") for row in rows)
    expected = [(chosen[u], v, chosen[u] if v == "right" else b or "-") for u, (v, b) in verdicts.items()]
    assert by_target == sorted(expected)  # right: the chosen path; wrong: the better path named, else none
    stored = {user: details for user, (_id, _path, details) in reviews.items()}
    assert sorted(json.dumps(row["features"], sort_keys=True) for row in rows) == sorted(
        json.dumps(stored[u]["features"], sort_keys=True) for u in verdicts
    )  # the features the model decided on, as logged with the decision
    assert all(row["features"] and 0 < row["confidence"] < 1 for row in rows)
    assert "user_id" not in json.dumps(rows)

    # another tenant's reviews are not this one's; an unknown tenant is an error the operator can fix
    unknown = await asyncio.to_thread(_invoke, "labels", "--tenant", "no-such-tenant", "--json", env=env)
    assert unknown.exit_code != 0 and "no tenant 'no-such-tenant'" in unknown.output
