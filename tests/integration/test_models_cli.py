"""`firstmile models …` on a real registry and database: evaluate writes the docs section, promote
keeps the stage order, drift reads the model's recorded decisions and flags a drop."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.cli import main
from firstmile.ml.cli import DOC_BEGIN, DOC_END
from firstmile.settings import get_settings
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, Database, make_settings
from tests.integration.test_adaptive_planner import adaptive_tenant, running


@pytest.fixture
def registry(tiny_registry: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(tiny_registry, copy)
    return copy


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    get_settings.cache_clear()  # the command reads FIRSTMILE_* from ``env``
    try:
        return CliRunner().invoke(main, ["models", *args], env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def test_evaluate_rewrites_only_its_section_of_the_docs(registry: Path, tmp_path: Path) -> None:
    doc = tmp_path / "models.md"
    doc.write_text(f"# Models\n\nprose stays\n\n{DOC_BEGIN}\nold numbers\n{DOC_END}\n\ntail stays\n")
    result = _invoke("evaluate", "--registry", str(registry), "--sessions", "600", "--write-docs", str(doc))
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "old numbers" not in text
    assert text.startswith("# Models\n\nprose stays\n") and text.rstrip().endswith("tail stays")
    section = text.split(DOC_BEGIN)[1].split(DOC_END)[0]
    assert "| Path selection accuracy (ML planner vs oracle) | ≥ 89.0% |" in section
    assert "Rules (targeting, by priority)" in section
    assert "firstmile models evaluate --sessions 600 --seed 1007" in section
    assert "firstmile models train --sessions 3000 --seed 11" in section


def test_promote_keeps_the_order_unless_forced(registry: Path) -> None:
    reg = Registry(registry)
    current = reg.resolve("stuck_detector", "production")
    assert current is not None
    new = reg.register("stuck_detector", weights=current.weights_path.read_bytes(), config=current.config, metrics={})
    skipped = CliRunner().invoke(
        main, ["models", "promote", "stuck_detector", new.version, "--to", "production", "--registry", str(registry)]
    )
    assert skipped.exit_code != 0
    assert "canary" in skipped.output or "shadow" in skipped.output
    assert reg.stages("stuck_detector").production == current.version
    for stage, extra in (("shadow", []), ("canary", ["--weight", "0.25"]), ("production", [])):
        result = _invoke("promote", "stuck_detector", new.version, "--to", stage, *extra, "--registry", str(registry))
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)[stage] == new.version
    assert reg.stages("stuck_detector").production == new.version
    listed = _invoke("list", "--registry", str(registry)).output
    assert f"stuck_detector             {new.version}" in listed


async def test_drift_reports_psi_and_flags_an_accuracy_drop(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, registry: Path
) -> None:
    tenant = await adaptive_tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    # A shifted population: every new user an executive at a 1001+ company from sales (rare in training).
    async for client in running(app):
        for i in range(60):
            r = await client.post(
                "/v1/onboarding/start",
                json={
                    "user_id": f"exec-{i}",
                    "traits": {"persona": "executive", "company_size": "1001+", "signup_source": "sales_led"},
                },
                headers=tenant.headers,
            )
            assert r.status_code == 201 and r.json()["decision"]["selected_by"] == "model", r.text
    assert isinstance(client, AsyncTestClient)
    env = {"FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url, "FIRSTMILE_DATABASE_URL": database.app_url}
    args = ["drift", "--registry", str(registry), "--tenant", tenant.slug, "--outcome-days", "0", "--json"]
    result = await asyncio.to_thread(_invoke, *args, env=env)  # the command runs its own event loop
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sample"] == 60
    psi = {f["name"]: f for f in report["features"]}
    assert psi["user_persona"]["level"] == "significant"
    assert psi["company_size"]["psi"] > 0.25
    # No one activated: live accuracy is the share predicted below 0.5, against the reference.
    assert report["outcomes"] == 60
    reference = Registry(registry).resolve("path_classifier", "production")
    assert reference is not None
    assert report["reference_accuracy"] == reference.metrics["activation_accuracy"]
    if report["retrain"]:
        flags = Registry(registry).flags("path_classifier")
        assert [f["version"] for f in flags] == [reference.version]
    else:
        assert report["relative_drop"] <= 0.05
