"""Per-tenant training: the time to train a tenant's own path model per 100k logged decisions, and its evaluation.

One tenant (the demo manifest, opted in to scheduled training) gets ``decisions`` logged path decisions in the
bench PostgreSQL, COPYed in: users drawn by the simulator (:func:`firstmile_inference.simulate.generate`, its
traits and behaviour), paths chosen as the platform's planner does with exploration (the demo's targeting rules,
epsilon-greedy over the eligible paths, the propensity recorded), activation drawn from the simulator's exact
activation probability of the user on the path taken, and the decisions aged past the 14-day horizon.

Measured:

* **end to end**: the ``tenant-model-training`` task on that tenant (what ``firstmile models train --tenant``
  runs): read the decisions as the schema owner, build the training set (refusal checks, eligibility), train,
  the off-policy report, register the candidate, audit;
* its **parts**, each again on its own: the read, the build, the off-policy evaluation (IPS, SNIPS and DR with
  their intervals on the 30% held out);
* the **baseline**, in the same run: training the same model (same hyper-parameters, one thread) on the same
  decisions held in memory (:class:`~firstmile_inference.tenant.LoggedData` built from the simulator's arrays,
  no database, no registry), so the ratio end to end / baseline is what the platform adds around training.

With ``ray_address`` (``--ray``; ``make bench-tenant-training`` starts the bench instance of ``deploy/local/ray.sh``
and passes its GCS address), the same run also measures training **on Ray**
(:func:`firstmile_inference.ray_train.train_on_ray`: the driver child process, its connection, the task on a worker,
the result back) on the same in-memory decisions against the same baseline, and the end-to-end task again with
``FIRSTMILE_TRAINING_RAY_ADDRESS`` (a second registry); it checks the Ray task's weights equal the baseline's.

Torch runs on one thread (as the scheduler's worker thread does), warmed up by one untimed epoch first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import platform
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError, _log, demo_manifest
from benchmarks.database import BenchDatabase, fresh_bench_database

BENCH_DB = "firstmile_bench_training"
EPSILON = 0.3
SEED = 23


@dataclass(frozen=True)
class Decisions:
    """The logged decisions, as columns (one row per user)."""

    traits: list[dict[str, str]]
    features: list[dict[str, Any]]
    paths: list[str]
    propensities: np.ndarray[Any, np.dtype[np.float64]]
    activated: np.ndarray[Any, np.dtype[np.bool_]]
    eligible: list[tuple[str, ...]]


def simulate_decisions(n: int, seed: int = SEED, epsilon: float = EPSILON) -> Decisions:
    """``n`` users of the simulator, each started on a path by the rules with epsilon-greedy exploration."""
    from firstmile_inference.schema import NUMERIC_FEATURES
    from firstmile_inference.simulate import DEMO_CATALOG, demo_eligible, demo_rules_policy, generate

    data = generate(n, seed, exploration=0.0)
    rng = np.random.default_rng(seed + 1)
    keys = DEMO_CATALOG.keys
    traits: list[dict[str, str]] = []
    features: list[dict[str, Any]] = []
    paths: list[str] = []
    eligible: list[tuple[str, ...]] = []
    propensities = np.empty(n)
    activated = np.empty(n, dtype=np.bool_)
    explore = rng.random(n) < epsilon
    picks = rng.random(n)
    outcomes = rng.random(n)
    for i in range(n):
        t = {
            "persona": str(data.persona[i]), "signup_source": str(data.signup_source[i]),
            "company_size": str(data.company_size[i]), "use_case": str(data.use_case[i]), "role": str(data.role[i]),
        }  # fmt: skip
        greedy = demo_rules_policy(t)
        options = demo_eligible(t)
        chosen = options[int(picks[i] * len(options))] if explore[i] else greedy
        share = epsilon / len(options)
        propensities[i] = share + (1.0 - epsilon if chosen == greedy else 0.0)
        activated[i] = outcomes[i] < data.expected[i, keys.index(chosen)]
        f: dict[str, Any] = {
            "user_persona": t["persona"], "signup_source": t["signup_source"], "company_size": t["company_size"],
            "use_case": t["use_case"],
        }  # fmt: skip
        f |= {name: round(float(data.numeric[i, j]), 3) for j, name in enumerate(NUMERIC_FEATURES)}
        traits.append(t)
        features.append(f)
        paths.append(chosen)
        eligible.append(options)
    return Decisions(traits, features, paths, propensities, activated, eligible)


def in_memory(decisions: Decisions) -> Any:
    """The baseline's training set: the same decisions as a LoggedData, straight from the arrays."""
    from firstmile_inference.simulate import DEMO_CATALOG
    from firstmile_inference.tenant import LoggedData

    keys = DEMO_CATALOG.keys
    index = {k: i for i, k in enumerate(keys)}
    eligible = np.zeros((len(decisions.paths), len(keys)), dtype=np.bool_)
    for i, options in enumerate(decisions.eligible):
        eligible[i, [index[k] for k in options]] = True
    return LoggedData(
        features=decisions.features,
        actions=np.asarray([index[p] for p in decisions.paths], dtype=np.int64),
        rewards=decisions.activated.astype(np.float64),
        propensities=decisions.propensities,
        eligible=eligible,
        paths=tuple(keys),
    )


async def _provision(db: BenchDatabase) -> tuple[uuid.UUID, str]:
    """The demo manifest, opted in to scheduled training."""
    import yaml

    from firstmile.controlplane.service import apply_manifest
    from firstmile.kit.db import create_engine
    from firstmile.tenancy.manifest import TenantManifest

    document = yaml.safe_load(demo_manifest().read_text(encoding="utf-8"))
    document["planner"] = {"model": None, "exploration": {"epsilon": EPSILON}, "training": {"schedule_days": 7}}
    manifest = TenantManifest.model_validate(document)
    engine = create_engine(db.admin_url, pool_size=1, max_overflow=0, application_name="firstmile-bench")
    try:
        applied = await apply_manifest(engine, manifest)
    finally:
        await engine.dispose()
    return applied.tenant_id, manifest.tenant.slug


async def _insert(db: BenchDatabase, tenant_id: uuid.UUID, decisions: Decisions) -> float:
    """COPY the users and their decisions in (as the superuser); the seconds it took."""
    import asyncpg

    now = datetime.now(UTC)
    began = time.perf_counter()
    conn = await asyncpg.connect(db.admin_dsn)
    try:
        versions: dict[str, int] = {
            str(r[0]): int(r[1])
            for r in await conn.fetch(
                "SELECT path_key, max(version) FROM onboarding_paths WHERE tenant_id = $1 GROUP BY path_key", tenant_id
            )
        }
        users = io.BytesIO()
        progress = io.BytesIO()
        for i, path in enumerate(decisions.paths):
            user = f"u-{i:07d}"
            started = now - timedelta(days=30, seconds=i * 17 % (20 * 86_400))
            activated = started + timedelta(hours=20) if decisions.activated[i] else None
            decision = {
                "decided_by": "rules", "propensity": float(decisions.propensities[i]), "epsilon": EPSILON,
                "explored": bool(decisions.propensities[i] < 1 - EPSILON), "features": decisions.features[i],
            }  # fmt: skip
            users.write(f"{tenant_id}\t{user}\t{_copy_json(decisions.traits[i])}\t{started.isoformat()}\n".encode())
            progress.write(
                "\t".join([
                    str(tenant_id), user, path, str(versions[path]), "activated" if activated else "in_progress",
                    _copy_json(decision), started.isoformat(), activated.isoformat() if activated else "\\N",
                    (activated or started).isoformat(),
                ]).encode() + b"\n"
            )  # fmt: skip
        users.seek(0)
        progress.seek(0)
        await conn.copy_to_table(
            "end_users", source=users, columns=["tenant_id", "user_id", "traits", "created_at"], format="text"
        )
        await conn.copy_to_table(
            "user_progress",
            source=progress,
            columns=[
                "tenant_id",
                "user_id",
                "path_key",
                "path_version",
                "status",
                "decision",
                "started_at",
                "activated_at",
                "updated_at",
            ],
            format="text",
        )
        await conn.execute("ANALYZE end_users; ANALYZE user_progress")
    finally:
        await conn.close()
    return time.perf_counter() - began


def _copy_json(value: Any) -> str:
    """JSON for COPY's text format (its backslashes escaped)."""
    return json.dumps(value, separators=(",", ":")).replace("\\", "\\\\")


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - began


@dataclass(frozen=True)
class OnRay:
    """The Ray measurements of one run."""

    address: str
    task_s: float  # train_on_ray on the in-memory decisions: driver, connect, task, result back
    end_to_end_s: float  # the tenant-model-training task with the Ray address
    identical: bool  # the task's weights equal the in-memory baseline's (same seed)


def _on_ray(address: str, db_url: str, slug: str, baseline: Any, reference: Any) -> OnRay:
    import torch

    from firstmile.ml.tenant_models import RayTraining
    from firstmile.ml.tenant_training import TenantTrainer
    from firstmile_inference.ray_train import RayTrainingError, train_on_ray
    from firstmile_inference.registry import Registry

    _log(f"on Ray ({address}): the same training as a Ray task")
    try:
        trained, task_s = _timed(train_on_ray, address, baseline, seed=7)
    except RayTrainingError as exc:
        raise BenchError(str(exc)) from exc
    identical = trained.state_dict.keys() == reference.state_dict.keys() and all(
        torch.equal(trained.state_dict[k], reference.state_dict[k]) for k in reference.state_dict
    )
    with tempfile.TemporaryDirectory(prefix="firstmile-bench-training-ray-") as tmp:
        trainer = TenantTrainer(db_url, Registry(Path(tmp) / "models"), ray=RayTraining(address))
        _log("on Ray: the tenant-model-training task end to end")
        runs, end_to_end_s = _timed(asyncio.run, trainer.run_once())
    run = next((r for r in runs if r.slug == slug), None)
    if run is None or run.outcome != "registered":
        raise BenchError(f"the training task on Ray did not register a model: {runs}")
    return OnRay(address, task_s, end_to_end_s, identical)


def run_tenant_training_benchmark(admin: str, *, decisions: int = 100_000, ray_address: str | None = None) -> str:
    """Run the benchmark (see the module docstring); the markdown report."""
    import torch

    from firstmile.ml import tenant_models as tm
    from firstmile.ml.planner import tenant_model_name
    from firstmile.ml.tenant_training import TenantTrainer
    from firstmile_inference.registry import Registry
    from firstmile_inference.tenant import TENANT_HYPER, off_policy_report, train_logged

    torch.set_num_threads(1)
    db = fresh_bench_database(admin, BENCH_DB)
    tenant_id, slug = asyncio.run(_provision(db))
    _log(f"simulating {decisions:,} decisions")
    logged_rows, simulate_s = _timed(simulate_decisions, decisions)
    _log("inserting them (COPY)")
    insert_s = asyncio.run(_insert(db, tenant_id, logged_rows))
    horizon, window = timedelta(days=tm.DEFAULT_HORIZON_DAYS), timedelta(days=tm.DEFAULT_WINDOW_DAYS)

    _log("warming torch up (one epoch on 2,000 decisions, not timed)")
    train_logged(in_memory(simulate_decisions(2_000, seed=SEED + 7)), hyper=dataclasses.replace(TENANT_HYPER, epochs=1))

    baseline = in_memory(logged_rows)
    _log("baseline (before): the same model on the same decisions in memory")
    reference, baseline_before = _timed(train_logged, baseline, seed=7)

    with tempfile.TemporaryDirectory(prefix="firstmile-bench-training-") as tmp:
        registry = Registry(Path(tmp) / "models")
        trainer = TenantTrainer(db.admin_url, registry)
        _log("end to end: the tenant-model-training task (read, build, train, report, register, audit)")
        runs, end_to_end_s = _timed(asyncio.run, trainer.run_once())
        run = next((r for r in runs if r.slug == slug), None)
        if run is None or run.outcome != "registered":
            raise BenchError(f"the training task did not register a model: {runs}")
        mv = registry.get(tenant_model_name(slug), str(run.version))
    train_s = float(mv.metrics["train_seconds"])
    report = mv.metrics["ope"]

    _log("the parts: read, build, evaluation")
    data, read_s = _timed(asyncio.run, tm.load_tenant_data(db.admin_url, slug, horizon, window))
    if len(data.rows) != decisions:
        raise BenchError(f"read {len(data.rows)} logged decisions, inserted {decisions}")
    logged, build_s = _timed(tm.logged_data, data)
    n_eval = round(TENANT_HYPER.val_fraction * logged.n)
    rows = np.sort(np.random.default_rng(0).permutation(logged.n)[:n_eval]).astype(np.int64)
    q = np.random.default_rng(1).random((logged.n, len(logged.paths)))[rows]
    _, ope_s = _timed(off_policy_report, logged, rows, q)

    on_ray: OnRay | None = None
    if ray_address is not None:
        on_ray = _on_ray(ray_address, db.admin_url, slug, baseline, reference)

    _log("baseline (after): the same model on the same decisions in memory")
    trained, baseline_after = _timed(train_logged, baseline, seed=7)
    baseline_s = (baseline_before + baseline_after) / 2  # before and after: the machine's load drifts meanwhile

    per_100k = 100_000 / decisions
    lines = [
        f"# Per-tenant training ({datetime.now(UTC):%Y-%m-%d})",
        "",
        f"{decisions:,} logged decisions of one tenant (the demo catalog, 7 paths; epsilon-greedy {EPSILON} over "
        f"the eligible paths; {int(logged_rows.activated.sum()):,} activated within the horizon) in PostgreSQL "
        f"{db.server.settings.get('server_version', '?')}; torch {torch.__version__} on one thread; "
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}.",
        "",
        "| step | seconds | per 100k decisions | vs baseline |",
        "|---|---:|---:|---:|",
        f"| **end to end** (`tenant-model-training` = `models train --tenant`) | {end_to_end_s:.1f} | "
        f"{end_to_end_s * per_100k:.1f} | **{end_to_end_s / baseline_s:.2f}x** |",
        f"| read (logged decisions joined to users, as the schema owner) | {read_s:.1f} | {read_s * per_100k:.1f} | "
        f"{read_s / baseline_s:.2f}x |",
        f"| build (refusal checks, eligibility, features) | {build_s:.1f} | {build_s * per_100k:.1f} | "
        f"{build_s / baseline_s:.2f}x |",
        f"| train + off-policy report (the model's own `train_seconds`) | {train_s:.1f} | {train_s * per_100k:.1f} | "
        f"{train_s / baseline_s:.2f}x |",
        f"| of which the evaluation (IPS, SNIPS, DR with intervals on {n_eval:,} held out) | {ope_s:.2f} | "
        f"{ope_s * per_100k:.2f} | {ope_s / baseline_s:.3f}x |",
        f"| baseline: the same training on the same decisions in memory (mean of two) | {baseline_s:.1f} | "
        f"{baseline_s * per_100k:.1f} | 1.00x |",
    ]
    if on_ray is not None:
        lines += [
            f"| **on Ray**: the same training as a Ray task (driver, connect, task, result back) | "
            f"{on_ray.task_s:.1f} | {on_ray.task_s * per_100k:.1f} | **{on_ray.task_s / baseline_s:.2f}x** |",
            f"| on Ray: end to end (`tenant-model-training` with `FIRSTMILE_TRAINING_RAY_ADDRESS`) | "
            f"{on_ray.end_to_end_s:.1f} | {on_ray.end_to_end_s * per_100k:.1f} | "
            f"{on_ray.end_to_end_s / baseline_s:.2f}x |",
        ]
    lines += [
        "",
        f"The baseline is the mean of two runs, one before the end-to-end run and one after ({baseline_before:.1f} s "
        f"and {baseline_after:.1f} s): the machine is shared, so its load drifts.",
        "",
        f"Set-up (not timed above): simulating the decisions {simulate_s:.1f} s, COPY into PostgreSQL "
        f"{insert_s:.1f} s. The candidate: DR {report['estimates']['dr']['value']:.3f} "
        f"[{report['estimates']['dr']['low']:.3f}, {report['estimates']['dr']['high']:.3f}] against the logging "
        f"policy's {report['logging_policy']['value']:.3f} (gate {'passes' if report['gate_passed'] else 'fails'}); "
        f"the baseline's DR {trained.metrics['ope']['estimates']['dr']['value']:.3f}.",
        "",
    ]
    if on_ray is not None:
        lines += [
            f"On Ray: the GCS at {on_ray.address} (`deploy/local/ray.sh start bench`, a node on this machine, one CPU "
            f"for the task); the Ray task's weights are {'identical to' if on_ray.identical else 'NOT the same as'} "
            "the in-memory baseline's (same seed).",
            "",
        ]
    return "\n".join(lines)
