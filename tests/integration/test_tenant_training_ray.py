"""A tenant's own path model trained as a Ray task (docs/models.md#training-on-ray), against the private loopback
Ray of ``deploy/local/ray.sh start test`` (reused when a module before this one left it running; stopped at the end
only when this module started it). ``models train --tenant --ray`` and the scheduler's ``TenantTrainer`` register
a version whose config and audit entry record where it trained; the same seed gives the same weights and the same
off-policy report as in process; a configured cluster that cannot be reached is a refusal naming its address
(non-zero exit, audited, nothing registered), never a silent fallback; ``--in-process`` trains locally whatever is
configured. Every Ray call is bounded (FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS, the driver's connect timeout)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.ml.planner import tenant_model_name
from firstmile.ml.tenant_models import RayTraining
from firstmile.ml.tenant_training import TenantTrainer, opted_in
from firstmile_inference.registry import ModelVersion, Registry
from tests.conftest import PEPPER, Database, make_settings
from tests.factories import ROOT
from tests.integration.test_adaptive_planner import registry, running
from tests.integration.test_tenant_models import EPSILON, _model_audit, _outcomes, _seed, _tenant, _train
from tests.integration.test_tenant_training import _opted_in

__all__ = ["registry"]

pytestmark = pytest.mark.xdist_group("ray")  # one Ray node at a time, with test_ray_serve.py and the chaos test

RAY_SH = ROOT / "deploy" / "local" / "ray.sh"
TASK_TIMEOUT_S = "300"  # no test waits longer than this for a task (queueing for a CPU included)
CHEAP = ("--min-decisions", "100", "--min-per-path", "8")


@dataclass(frozen=True)
class RayCluster:
    address: str  # the GCS on loopback: this machine is the cluster's node


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RAY_SH), *args], capture_output=True, text=True, timeout=600, check=False, cwd=ROOT
    )


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    was_running = _ray("status", "test").returncode == 0
    if not was_running:
        started = _ray("start", "test")
        assert started.returncode == 0, f"ray.sh start test exited {started.returncode}:\n{started.stderr}"
    port = int(os.environ.get("FIRSTMILE_TEST_RAY_PORT", "64100"))
    # the instance's token authentication: Ray's own variables, which the driver (a child process) inherits
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN_PATH", str(ROOT / ".firstmile" / "services" / "ray-test" / "auth_token"))
        try:
            yield RayCluster(f"127.0.0.1:{port}")
        finally:
            if not was_running:
                stopped = _ray("stop", "test")
                assert stopped.returncode == 0, stopped.stderr


def _dead_address() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def _weights(mv: ModelVersion) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(mv.weights_path, map_location="cpu", weights_only=True)
    return state


def _same_model(a: ModelVersion, b: ModelVersion) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a.version} and {b.version}"
    assert a.metrics["ope"] == b.metrics["ope"]
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    config_a, config_b = dict(a.config), dict(b.config)
    for config in (config_a, config_b):
        config["training"] = {
            k: v for k, v in config["training"].items() if k not in {"seconds", "trained_on", "ray_address"}
        }
    assert config_a == config_b


async def test_models_train_on_ray_matches_in_process_and_a_dead_cluster_is_refused(
    database: Database,
    analytics_store: ChdbStore,
    admin_engine: AsyncEngine,
    registry: Path,
    ray_cluster: RayCluster,
) -> None:
    env = {
        "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
        "FIRSTMILE_DATABASE_URL": database.app_url,
        "FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS": TASK_TIMEOUT_S,
    }
    reg = Registry(registry)
    tenant = await _tenant(admin_engine)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        await _seed(client, tenant, 300)
    await _outcomes(admin_engine, tenant, "path_key = 'generic'")
    name = tenant_model_name(tenant.slug)

    # --ray: a Ray task on the cluster; the version records where it trained
    on_ray = await asyncio.to_thread(_train, env, registry, tenant.slug, *CHEAP, "--ray", ray_cluster.address)
    assert on_ray.exit_code == 0, on_ray.output
    assert f"as a Ray task on {ray_cluster.address}" in on_ray.output and "it passes" in on_ray.output
    ray_version = reg.get(name, "1.0.0")
    assert ray_version.config["training"]["trained_on"] == "ray"
    assert ray_version.config["training"]["ray_address"] == ray_cluster.address
    assert ray_version.config["training"]["decisions"] == 300

    # the setting points at a cluster that is not there: refused, naming it; audited; nothing registered
    dead = _dead_address()
    refused = await asyncio.to_thread(_train, env | {"FIRSTMILE_TRAINING_RAY_ADDRESS": dead}, registry, tenant.slug,
                                      *CHEAP)  # fmt: skip
    assert refused.exit_code != 0
    assert f"cannot reach the Ray cluster at {dead}" in refused.output, refused.output
    assert "keeps serving" in refused.output
    assert [v.version for v in reg.versions(name)] == ["1.0.0"]

    # --in-process wins over the setting: the same seed gives the very same model as on Ray
    local = await asyncio.to_thread(_train, env | {"FIRSTMILE_TRAINING_RAY_ADDRESS": dead}, registry, tenant.slug,
                                    *CHEAP, "--in-process")  # fmt: skip
    assert local.exit_code == 0, local.output
    assert "in process on 300 logged decisions" in local.output
    local_version = reg.get(name, "1.1.0")
    assert local_version.config["training"]["trained_on"] == "in_process"
    assert local_version.config["training"]["ray_address"] is None
    _same_model(ray_version, local_version)

    audit = await _model_audit(admin_engine, tenant)
    trained = [e for e in audit if e["action"] == "models.train"]
    assert [(e.get("version"), e.get("refused", False), e["trained_on"]) for e in trained] == [
        ("1.0.0", False, "ray"),
        (None, True, "ray"),
        ("1.1.0", False, "in_process"),
    ]
    assert trained[0]["ray_address"] == ray_cluster.address and trained[1]["ray_address"] == dead
    assert dead in trained[1]["reason"] and trained[1]["subject"] == f"model:{name}"

    # bad input: refused before anything is read or trained
    for args, message in [
        (("--ray", "ray://user:secret@head:10001"), "is not a Ray address"),
        (("--ray", ray_cluster.address, "--in-process"), "exclude each other"),
    ]:
        bad = await asyncio.to_thread(_train, env, registry, tenant.slug, *CHEAP, *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert len(reg.versions(name)) == 2


async def _trainer_run(trainer: TenantTrainer, database: Database, slug: str) -> Any:
    tenant = next(t for t in await opted_in(database.admin_url) if t.slug == slug)
    return await trainer.run_tenant(tenant, datetime.now(UTC))


async def test_the_scheduled_task_trains_on_ray_and_audits_a_dead_cluster_as_refused(
    database: Database,
    analytics_store: ChdbStore,
    admin_engine: AsyncEngine,
    registry: Path,
    tmp_path: Path,
    ray_cluster: RayCluster,
) -> None:
    planner = {"model": None, "exploration": {"epsilon": EPSILON}, "training": {"schedule_days": 7}}
    tenant, other = await _opted_in(admin_engine, planner), await _opted_in(admin_engine, planner)
    app = create_app(
        make_settings(model_registry_uri=str(registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async for client in running(app):
        await _seed(client, tenant, 300)
        await _seed(client, other, 300)
    await _outcomes(admin_engine, tenant, "path_key = 'generic'")
    await _outcomes(admin_engine, other, "path_key = 'generic'")
    cheap: dict[str, Any] = {"min_decisions": 100, "min_per_path": 8, "epochs": 3}

    reg = Registry(registry)
    on_ray = TenantTrainer(database.admin_url, reg, ray=RayTraining(ray_cluster.address, 300), **cheap)
    run = await _trainer_run(on_ray, database, tenant.slug)
    assert (run.trigger, run.outcome, run.version) == ("first", "registered", "1.0.0"), run
    name = tenant_model_name(tenant.slug)
    mv = reg.get(name, "1.0.0")
    assert (mv.config["training"]["trained_on"], mv.config["training"]["ray_address"]) == ("ray", ray_cluster.address)
    assert reg.stages(name).production is None  # never promoted by itself

    # the same tenant, the same seed, in process (another registry): the same model
    local_reg = Registry(tmp_path / "local-models")
    local = TenantTrainer(database.admin_url, local_reg, **cheap)
    local_run = await _trainer_run(local, database, tenant.slug)
    assert local_run.outcome == "registered", local_run
    local_mv = local_reg.get(name, "1.0.0")
    assert local_mv.config["training"]["trained_on"] == "in_process"
    _same_model(mv, local_mv)

    # a dead cluster: the run is refused and audited with the reason, nothing registered, no fallback
    dead = _dead_address()
    down = TenantTrainer(database.admin_url, reg, ray=RayTraining(dead, 300), **cheap)
    refused = await _trainer_run(down, database, other.slug)
    assert refused.outcome == "refused", refused
    assert f"cannot reach the Ray cluster at {dead}" in str(refused.reason)
    assert reg.versions(tenant_model_name(other.slug)) == []

    entries = await _model_audit(admin_engine, tenant)
    assert [(e["action"], e["refused"], e["trained_on"], e["ray_address"]) for e in entries] == [
        ("models.train", False, "ray", ray_cluster.address),
        ("models.train", False, "in_process", None),
    ]
    assert entries[0]["actor"] == "worker:tenant-model-training"
    refusal = await _model_audit(admin_engine, other)
    assert len(refusal) == 1 and refusal[0]["refused"] is True and refusal[0]["scheduled"] is True
    assert (refusal[0]["trained_on"], refusal[0]["ray_address"]) == ("ray", dead)
    assert f"cannot reach the Ray cluster at {dead}" in refusal[0]["reason"]
    assert "keeps serving" in refusal[0]["reason"]
