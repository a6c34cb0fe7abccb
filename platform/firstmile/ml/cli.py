"""``firstmile models train|evaluate|promote|list|drift|labels`` and ``firstmile stuck scan``.

Training and evaluation run :mod:`firstmile_inference` on simulated onboarding
(the platform only adds its real rules planner as the baseline and the database
side of drift). Every command takes ``--registry`` (default
``FIRSTMILE_MODEL_REGISTRY_URI``, else ``<data_dir>/models``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import click

from firstmile.kit.cli import run, services
from firstmile.onboarding.stuck import StuckScanner

if TYPE_CHECKING:
    from firstmile.ml.drift import DriftResult, TenantDriftResult
    from firstmile.ml.tenant_models import RayTraining
    from firstmile_inference.registry import Registry
    from firstmile_inference.simulate import Dataset

MODEL_NAMES = ("path_classifier", "stuck_detector", "nudge_response_predictor")
DOC_BEGIN = "<!-- evaluation:begin (written by `firstmile models evaluate --write-docs`) -->"
DOC_END = "<!-- evaluation:end -->"
DEMO_MANIFEST = Path("tenants/demo.yaml")


def _say(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


class ModelCommandDeps(Protocol):
    """What ``firstmile models`` and ``firstmile stuck`` need from the platform (the wiring provides it)."""

    def model_registry_uri(self) -> str:
        """``FIRSTMILE_MODEL_REGISTRY_URI``, else ``<data_dir>/models``."""
        ...

    def operator_database_url(self) -> str:
        """The schema owner's URL (``models drift`` and ``models labels`` read every tenant's decisions)."""
        ...

    def stuck_scanner(self) -> AbstractAsyncContextManager[StuckScanner]:
        """The region's stuck scanner with its detector and feature store, closed afterwards."""
        ...

    def training_ray(self) -> tuple[str | None, float]:
        """``FIRSTMILE_TRAINING_RAY_ADDRESS`` (None: in process) and ``FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS``."""
        ...


def _deps() -> ModelCommandDeps:
    found: ModelCommandDeps = services()
    return found


def registry_uri(given: str | None) -> str:
    """``given``, else the configured registry (read only when needed)."""
    return given or _deps().model_registry_uri()


def _registry(given: str | None) -> Registry:
    from firstmile_inference.registry import Registry

    return Registry(registry_uri(given))


def rules_policy(manifest: Path) -> Callable[[Mapping[str, Any]], str]:
    """The platform's own targeting-rules planner over ``manifest``'s paths, as an evaluation policy."""
    from firstmile.onboarding.domain import PathDef
    from firstmile.onboarding.planner import plan
    from firstmile.tenancy.manifest import load_manifest

    loaded = load_manifest(manifest)
    paths = [PathDef.from_definition(p.id, 1, p.model_dump(mode="json", exclude_none=True)) for p in loaded.paths]

    def choose(traits: Mapping[str, Any]) -> str:
        return plan(paths, loaded.default_path, traits).path_key

    return choose


def activation_accuracy(data: Dataset, scores: Sequence[Mapping[str, Any]]) -> float:
    """Share of sessions where the predicted activation of the *logged* path (≥ 0.5) matches the outcome.

    The one accuracy that can be measured live (the oracle path is never observed),
    so it is the reference that ``models drift`` compares live traffic against.
    """
    keys = data.path_keys
    hits = 0
    for i, prediction in enumerate(scores):
        p = float(prediction["scores"][keys[int(data.assigned[i])]])
        hits += int((p >= 0.5) == bool(data.activated[i]))
    return hits / max(1, len(scores))


@click.group()
def models() -> None:
    """Train, evaluate, promote and watch the models (docs/models.md)."""


@models.command("train")
@click.option("--registry", "registry_arg", default=None, help="Registry URI (default: the configured one).")
@click.option("--sessions", type=click.IntRange(1_000, 2_000_000), default=50_000, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the simulated data and of training.")
@click.option("--exploration", type=click.FloatRange(0.05, 1.0), default=0.4, show_default=True)
@click.option(
    "--promote",
    type=click.Choice(["shadow", "canary", "production"]),
    default=None,
    help="Also move the new versions into this stage (forced: skips the order).",
)
@click.option("--model", "only", multiple=True, type=click.Choice(MODEL_NAMES), help="Train only these (repeatable).")
@click.option("--tenant", default=None, help="Train this tenant's own path model on its logged decisions (slug).")
@click.option("--horizon-days", type=click.FloatRange(0.01, 365), default=14.0, show_default=True,
              help="--tenant: activated within this many days of the start counts as activated.")  # fmt: skip
@click.option("--window-days", type=click.FloatRange(0.01, 3650), default=90.0, show_default=True,
              help="--tenant: decisions started within this many days are read.")  # fmt: skip
@click.option("--min-decisions", type=click.IntRange(10), default=500, show_default=True,
              help="--tenant: refuse below this many logged decisions.")  # fmt: skip
@click.option("--min-per-path", type=click.IntRange(1), default=50, show_default=True,
              help="--tenant: refuse when an eligible path was taken fewer times.")  # fmt: skip
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="--tenant: train as a Ray task on this cluster (ray://host:port, or host:port from a node of it); "
                   "default: FIRSTMILE_TRAINING_RAY_ADDRESS.")  # fmt: skip
@click.option("--in-process", is_flag=True, default=False,
              help="--tenant: train in this process even when FIRSTMILE_TRAINING_RAY_ADDRESS is set.")  # fmt: skip
@click.option("--shared", is_flag=True, default=False,
              help="Train the shared warm-start model on the pooled decisions of the tenants that opt in "
                   "(planner.training.warm_start: shared), on features that carry no tenant data.")  # fmt: skip
@click.option("--min-tenants", type=click.IntRange(2), default=3, show_default=True,
              help="--shared: refuse with fewer contributing tenants.")  # fmt: skip
@click.option("--min-tenant-decisions", type=click.IntRange(1), default=200, show_default=True,
              help="--shared: an opted-in tenant contributes only with this many logged decisions.")  # fmt: skip
def models_train(
    registry_arg: str | None, sessions: int, seed: int, exploration: float, promote: str | None, only: tuple[str, ...],
    tenant: str | None, horizon_days: float, window_days: float, min_decisions: int, min_per_path: int,
    ray_address: str | None, in_process: bool, shared: bool, min_tenants: int, min_tenant_decisions: int,
) -> None:  # fmt: skip
    """Simulate SESSIONS onboarding sessions, train the models on them and register new versions; with --tenant,
    train that tenant's own path model on its logged decisions instead (docs/models.md#per-tenant-models), on Ray
    where configured (--ray, FIRSTMILE_TRAINING_RAY_ADDRESS), in process otherwise."""
    if tenant is None and (ray_address is not None or in_process):
        raise click.UsageError("--ray and --in-process choose where a tenant's model trains: they need --tenant")
    if shared:
        if tenant is not None:
            raise click.UsageError("--shared trains the model shared across tenants: give it without --tenant")
        train_shared(registry_arg, timedelta(days=horizon_days), timedelta(days=window_days), seed=seed,
                     min_tenants=min_tenants, min_tenant_decisions=min_tenant_decisions)  # fmt: skip
        return
    if tenant is not None:
        ray = ray_training(ray_address, in_process)
        train_tenant(registry_arg, tenant, timedelta(days=horizon_days), timedelta(days=window_days),
                     min_decisions=min_decisions, min_per_path=min_per_path, seed=seed, ray=ray)  # fmt: skip
        return
    train_models(registry_arg, sessions=sessions, seed=seed, exploration=exploration, promote=promote, only=only)


def ray_training(address: str | None, in_process: bool) -> RayTraining | None:
    """Where ``models train --tenant`` trains: ``--in-process``, else on ``--ray ADDRESS``, else on
    ``FIRSTMILE_TRAINING_RAY_ADDRESS`` when set (with ``FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS``), else in process."""
    from firstmile.ml.tenant_models import RayTraining
    from firstmile_inference.ray_train import check_address

    if in_process and address is not None:
        raise click.UsageError("--ray and --in-process exclude each other")
    if in_process:
        return None
    configured, timeout_s = _deps().training_ray()
    if address is None:
        return None if configured is None else RayTraining(check_address(configured), timeout_s)
    try:
        return RayTraining(check_address(address), timeout_s)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ray") from exc


def train_tenant(
    registry_arg: str | None, slug: str, horizon: timedelta, window: timedelta, *, min_decisions: int,
    min_per_path: int, seed: int, ray: RayTraining | None = None,
) -> None:  # fmt: skip
    """Read the tenant's logged decisions, refuse what cannot support a model, train (in process, or as a Ray task
    with ``ray``), register, audit. A Ray cluster that cannot be reached or a task that fails is refused (audited,
    nothing registered), never trained in process instead."""
    from firstmile.ml import tenant_models as tm
    from firstmile.ml.planner import tenant_model_name

    registry = _registry(registry_arg)
    admin_url = _deps().operator_database_url()
    began = time.perf_counter()
    try:
        data = run(tm.load_tenant_data(admin_url, slug, horizon, window))
    except tm.TrainingRefusedError as exc:  # no such tenant: no log to write to
        raise click.ClickException(str(exc)) from exc
    span = {"horizon_days": horizon.total_seconds() / 86_400, "window_days": window.total_seconds() / 86_400}

    def refused(exc: Exception, **figures: Any) -> click.ClickException:
        """Every refusal of a known tenant's training is audited in its log (nothing registered), then said."""
        run(tm.audit_model_event(admin_url, data.tenant_id, f"model:{tenant_model_name(slug)}", {
            "action": "models.train", "model": tenant_model_name(slug), "refused": True, "reason": str(exc),
            **figures, **span, **tm.where_trained(ray),
        }))  # fmt: skip
        return click.ClickException(str(exc))

    try:
        logged = tm.logged_data(data, min_decisions=min_decisions, min_per_path=min_per_path)
    except tm.TrainingRefusedError as exc:  # too little data, a catalog change, a feature missing from the logs
        raise refused(exc) from exc
    where = "in process" if ray is None else f"as a Ray task on {ray.address}"
    _say(f"training {slug}'s path model {where} on {logged.n} logged decisions ({len(logged.paths)} paths)")
    try:
        mv = tm.register(registry, data, logged, seed=seed, ray=ray)
    except tm.TrainingRefusedError as exc:  # no overlap to evaluate; the Ray cluster unreachable, or its task failed
        raise refused(exc, decisions=logged.n) from exc
    report = tm.report_of(mv)
    run(tm.audit_model_event(admin_url, data.tenant_id, f"model:{mv.name}@{mv.version}", {
        "action": "models.train", "model": mv.name, "version": mv.version, "decisions": logged.n,
        **span, **tm.where_trained(ray), "catalog": mv.config["catalog"], **tm.gate_figures(report),
        "warm_start": mv.config.get("warm_start"),
    }))  # fmt: skip
    warm = mv.config.get("warm_start")
    if warm:
        _say(f"started from the shared warm-start model {warm['model']} {warm['version']} (its trunk; the paths' "
             "outputs learned from this tenant's decisions)")  # fmt: skip
    elif data.warm_start:
        _say(f"{slug} opted in to the shared warm-start model, but none is registered (firstmile models train "
             "--shared): trained cold")  # fmt: skip
    _say(tm.report_text(mv.name, mv.version, report))
    _say(f"registered {mv.name} {mv.version} (no stage: firstmile models promote --tenant {slug} {mv.version} "
         f"--to shadow|canary|production) in {time.perf_counter() - began:.1f}s")  # fmt: skip


def train_shared(
    registry_arg: str | None, horizon: timedelta, window: timedelta, *, seed: int, min_tenants: int,
    min_tenant_decisions: int,
) -> None:  # fmt: skip
    """Read the opted-in tenants' decisions, refuse too few tenants or decisions, train the shared warm-start model
    in process, register it (no stage), audit the run in each contributing tenant's log."""
    from firstmile.ml import shared_model as sm
    from firstmile.ml import tenant_models as tm

    registry = _registry(registry_arg)
    admin_url = _deps().operator_database_url()
    began = time.perf_counter()
    try:
        data = run(sm.load_shared_data(admin_url, horizon, window))
        pairs = sm.shares(data, min_tenants=min_tenants, min_tenant_decisions=min_tenant_decisions)
    except tm.TrainingRefusedError as exc:
        raise click.ClickException(str(exc)) from exc
    _say(f"training the shared warm-start model in process on the decisions of {len(pairs)} tenants "
         f"({sum(share.n for _, share in pairs)} decisions before the cap)")  # fmt: skip
    mv = sm.register_shared(registry, data, pairs, seed=seed)
    run(sm.audit_contributors(admin_url, mv, pairs))
    contributors = mv.config["contributors"]
    _say(f"registered {mv.name} {mv.version}: {contributors['tenants']} tenants, decisions "
         f"{', '.join(map(str, contributors['decisions']))} (at most {contributors['cap_per_tenant']} each), "
         f"validation AUC {mv.metrics['val_auc'] or float('nan'):.3f}; the opted-in tenants' next "
         f"`models train --tenant` starts from it (its production version once promoted, else the latest) "
         f"in {time.perf_counter() - began:.1f}s")  # fmt: skip


def train_models(
    registry_arg: str | None,
    *,
    sessions: int = 50_000,
    seed: int = 7,
    exploration: float = 0.4,
    promote: str | None = None,
    only: Sequence[str] = (),
) -> None:
    """Simulate, train, measure the activation accuracy on unseen sessions, register (and stage)."""
    from firstmile_inference.simulate import generate
    from firstmile_inference.train import register_all, simulate_training_set, train_all

    registry = _registry(registry_arg)
    began = time.perf_counter()
    _say(f"simulating {sessions} sessions (seed {seed}, exploration {exploration})")
    data = simulate_training_set(sessions, seed=seed, exploration=exploration)
    _say(f"simulated in {time.perf_counter() - began:.1f}s")
    trained = train_all(data, seed=seed, progress=_say, models=tuple(only) or MODEL_NAMES)
    if "path_classifier" in trained:
        # The live-measurable accuracy, on sessions the model never saw, for `models drift`.
        check = generate(max(2_000, sessions // 10), seed=seed + 50_000, exploration=exploration)
        predictor = trained["path_classifier"].predictor()
        instances = [dict(check.user_features(i)) for i in range(check.n)]
        acc = activation_accuracy(check, predictor.predict(instances))
        trained["path_classifier"].metrics["activation_accuracy"] = round(acc, 4)
        _say(f"path_classifier activation accuracy on {check.n} unseen sessions: {acc:.3f}")
    versions = register_all(registry, trained, promote_to=promote)
    for name, mv in versions.items():
        stage = f", now {promote}" if promote else " (no stage: `firstmile models promote`)"
        _say(f"registered {name} {mv.version}{stage}")
    _say(f"done in {time.perf_counter() - began:.1f}s; registry {registry.root}")


def _seed_list(_ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``"7,8,9"`` → ``(7, 8, 9)``."""
    if value is None:
        return None
    try:
        return tuple(int(item.strip()) for item in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integer seeds", param=param) from None


def _note(line: str) -> None:
    """Progress of `models evaluate`: on stderr, so that stdout holds only the report (or only JSON)."""
    click.echo(line, err=True)


@models.command("evaluate")
@click.option("--registry", "registry_arg", default=None, help="Registry URI (default: the configured one).")
@click.option("--stage", type=click.Choice(["production", "canary", "shadow"]), default="production", show_default=True)
@click.option(
    "--sessions",
    type=click.IntRange(500, 1_000_000),
    default=10_000,
    show_default=True,
    help="Held-out sessions (per held-out seed).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Held-out seed of a single run (default 1007; never a training or tuning seed).",
)
@click.option(
    "--seed-robust",
    is_flag=True,
    help="Train in process on every --train-seeds, score on every "
    "--heldout-seeds, report mean ± sd (implied by either option).",
)
@click.option("--train-seeds", callback=_seed_list, default=None, help="At least five (default 7,8,9,10,11).")
@click.option("--heldout-seeds", callback=_seed_list, default=None, help="At least three (default 1007,1008,1009).")
@click.option(
    "--train-sessions",
    type=click.IntRange(1_000, 2_000_000),
    default=None,
    help="Simulated training sessions per training seed (default 100000).",
)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEMO_MANIFEST)
@click.option("--write-docs", type=click.Path(dir_okay=False, path_type=Path), default=None, help="docs/models.md")
@click.option("--json", "as_json", is_flag=True, help="Print only the report as JSON on stdout (progress: stderr).")
def models_evaluate(
    registry_arg: str | None, stage: str, sessions: int, seed: int | None, seed_robust: bool,
    train_seeds: tuple[int, ...] | None, heldout_seeds: tuple[int, ...] | None, train_sessions: int | None,
    manifest: Path, write_docs: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Evaluate the staged models (or, with --seed-robust, models trained on five seeds) on held-out simulated
    sets against the rules planner and random choice."""
    if seed_robust or train_seeds is not None or heldout_seeds is not None or train_sessions is not None:
        if seed is not None:
            raise click.UsageError(
                "--seed is the held-out seed of a single run; with --seed-robust use --heldout-seeds"
            )
        _evaluate_over_seeds(train_seeds, heldout_seeds, train_sessions, sessions, manifest, write_docs, as_json)
        return
    from firstmile_inference.evaluate import evaluate
    from firstmile_inference.models import load_predictor
    from firstmile_inference.seed_study import refused_heldout_seeds
    from firstmile_inference.simulate import generate

    seed = 1_007 if seed is None else seed
    registry = _registry(registry_arg)
    versions = {}
    for name in MODEL_NAMES:
        mv = registry.resolve(name, stage)
        if mv is None:
            raise click.ClickException(f"no {stage} version of {name}; train and promote first (docs/models.md)")
        versions[name] = mv
    used = {int(s) for mv in versions.values() for k in ("seed", "data_seed")
            if isinstance(s := mv.config.get("training", {}).get(k), int)}  # fmt: skip
    refused = refused_heldout_seeds(used)
    if seed in refused:
        raise click.BadParameter(f"{seed} was used for training or tuning: {refused[seed]}", param_hint="--seed")
    predictors = {}
    for name, mv in versions.items():
        predictors[name] = load_predictor(mv, device="cpu")
        _note(f"{name} {mv.version} ({stage})")
    _note(f"simulating {sessions} held-out sessions (seed {seed})")
    heldout = generate(sessions, seed=seed)
    command = f"firstmile models evaluate --sessions {sessions} --seed {seed} --stage {stage}"
    training = versions["path_classifier"].config.get("training", {})
    train_command = (
        f"firstmile models train --sessions {training.get('sessions', '?')} --seed {training.get('seed', '?')} "
        f"--exploration {training.get('exploration', '?')} --promote production   # the models evaluated"
    )
    report = evaluate(
        heldout,
        predictors,
        rules_policy=rules_policy(manifest),
        commands=[train_command, command + (f" --write-docs {write_docs}" if write_docs else "")],
        train_seconds={n: float(mv.metrics.get("train_seconds", 0.0)) for n, mv in versions.items()},
        progress=_note,
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_markdown())
    if write_docs is not None:
        replace_section(write_docs, report.to_markdown())
        _note(f"wrote the evaluation into {write_docs}")


def _evaluate_over_seeds(
    train_seeds: tuple[int, ...] | None, heldout_seeds: tuple[int, ...] | None, train_sessions: int | None,
    sessions: int, manifest: Path, write_docs: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """`models evaluate --seed-robust`: refuse a used seed before anything runs, then train, score, aggregate."""
    from firstmile_inference import seed_study as study_mod

    train = train_seeds if train_seeds is not None else study_mod.DEFAULT_TRAIN_SEEDS
    heldout = heldout_seeds if heldout_seeds is not None else study_mod.DEFAULT_HELDOUT_SEEDS
    size = train_sessions if train_sessions is not None else study_mod.DEFAULT_TRAIN_SESSIONS
    try:
        study_mod.check_heldout_seeds(heldout, train)
    except study_mod.SeedError as exc:
        raise click.BadParameter(str(exc), param_hint="--heldout-seeds / --train-seeds") from exc
    command = (
        f"firstmile models evaluate --seed-robust --train-seeds {','.join(map(str, train))} --heldout-seeds "
        f"{','.join(map(str, heldout))} --train-sessions {size} --sessions {sessions}"
        + (f" --write-docs {write_docs}" if write_docs else "")
    )
    study = study_mod.seed_study(
        train_seeds=train, heldout_seeds=heldout, train_sessions=size, sessions=sessions,
        rules_policy=rules_policy(manifest), commands=[command], progress=_note,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(study.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(study.to_markdown())
    if write_docs is not None:
        replace_section(write_docs, study.to_markdown())
        _note(f"wrote the evaluation into {write_docs}")


def replace_section(doc: Path, body: str) -> None:
    """Put ``body`` between the evaluation markers of ``doc`` (appended with markers when absent)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{DOC_BEGIN}\n{body.rstrip()}\n{DOC_END}"
    if DOC_BEGIN in text and DOC_END in text:
        text = re.sub(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


@models.command("promote")
@click.argument("arguments", nargs=-1, required=True, metavar="[NAME] VERSION")
@click.option("--to", "stage", type=click.Choice(["shadow", "canary", "production"]), required=True)
@click.option("--weight", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, help="Canary share.")
@click.option("--force", is_flag=True, help="Skip the shadow → canary → production order (rollbacks).")
@click.option("--registry", "registry_arg", default=None, help="Registry URI (default: the configured one).")
@click.option("--tenant", default=None, help="Promote this tenant's own path model (slug): behind the off-policy gate.")
def models_promote(
    arguments: tuple[str, ...], stage: str, weight: float | None, force: bool, registry_arg: str | None,
    tenant: str | None,
) -> None:  # fmt: skip
    """Move VERSION of NAME into a stage: shadow → canary → production. With --tenant (NAME omitted), the tenant's
    own model, into canary or production only when its off-policy report passes the gate."""
    from firstmile_inference.registry import PromotionError

    if tenant is not None:
        if len(arguments) != 1:
            raise click.UsageError("with --tenant, give only VERSION: firstmile models promote --tenant SLUG VERSION")
        promote_tenant(registry_arg, tenant, arguments[0], stage, weight=weight, force=force)
        return
    from firstmile.ml.tenant_models import SHARED_MODEL  # the shared warm-start model: its production version serves

    if len(arguments) != 2 or arguments[0] not in (*MODEL_NAMES, SHARED_MODEL):
        raise click.UsageError(
            f"give NAME VERSION, NAME one of {', '.join((*MODEL_NAMES, SHARED_MODEL))} (or --tenant SLUG VERSION)"
        )
    name, version = arguments
    registry = _registry(registry_arg)
    try:
        stages = registry.promote(name, version, stage, weight=weight, actor="cli", force=force)
    except (PromotionError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    click.echo(json.dumps({"model": name, **stages.to_json()}, sort_keys=True))


def promote_tenant(
    registry_arg: str | None, slug: str, version: str, stage: str, *, weight: float | None, force: bool
) -> None:
    """The off-policy gate, then the promotion (audited in the tenant's log either way)."""
    from firstmile.ml import tenant_models as tm
    from firstmile.ml.planner import tenant_model_name
    from firstmile_inference.registry import PromotionError

    registry = _registry(registry_arg)
    name = tenant_model_name(slug)
    admin_url = _deps().operator_database_url()
    tenant_id = run(tm.tenant_id_of(admin_url, slug))
    if tenant_id is None:
        raise click.ClickException(f"no tenant {slug!r} (firstmile tenants directory lists them)")
    try:
        report = tm.report_of(registry.get(name, version))
    except (KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    text = tm.report_text(name, version, report)
    gated = stage in ("canary", "production")
    subject = f"model:{name}@{version}"
    payload = {"action": "models.promote", "model": name, "version": version, "stage": stage,
               **tm.gate_figures(report)}  # fmt: skip
    if gated and not report["gate_passed"]:
        run(tm.audit_model_event(admin_url, tenant_id, subject, payload | {"refused": True}))
        refusal = f"{text}\nrefused: {name} {version} stays out of {stage}; the current model keeps serving"
        raise click.ClickException(refusal)
    try:
        stages = registry.promote(name, version, stage, weight=weight, actor="cli", force=force)
    except (PromotionError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from exc
    run(tm.audit_model_event(admin_url, tenant_id, subject, payload | {"refused": False}))
    _say(text)
    click.echo(json.dumps({"model": name, **stages.to_json()}, sort_keys=True))


@models.command("list")
@click.option("--registry", "registry_arg", default=None, help="Registry URI (default: the configured one).")
def models_list(registry_arg: str | None) -> None:
    """Every registered version with its stage, key metrics and retraining flags (tenants' own models after, with
    the fingerprint of the path catalog each was trained on)."""
    from firstmile.onboarding.catalog import catalog_fingerprint

    registry = _registry(registry_arg)
    for name in (*MODEL_NAMES, *(n for n in registry.names() if n not in MODEL_NAMES)):
        stages = registry.stages(name)
        flagged = {f["version"] for f in registry.flags(name)}
        for mv in registry.versions(name):
            stage = stages.stage_of(mv.version) or "-"
            shown = {k: v for k, v in mv.metrics.items() if isinstance(v, float) and k != "train_seconds"}
            metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items()))
            flag = "  RETRAIN" if mv.version in flagged else ""
            recorded = mv.config.get("catalog")  # a tenant version's path catalog, as a short fingerprint
            catalog = f"  catalog={catalog_fingerprint(recorded)}" if isinstance(recorded, dict) else ""
            click.echo(f"{name:26} {mv.version:8} {stage:10} {metrics}{catalog}{flag}")


@models.command("drift")
@click.option("--registry", "registry_arg", default=None, help="Registry URI (default: the configured one).")
@click.option(
    "--tenant", default=None,
    help="Only this tenant's decisions (slug); when its own model decides its starts, that model is checked.",
)  # fmt: skip
@click.option("--days", type=click.FloatRange(0.01, 365), default=7.0, show_default=True, help="Recent window.")
@click.option(
    "--outcome-days", type=click.FloatRange(0.0, 365), default=None,
    help="Decisions at least this old count for live accuracy (activated within it or not). Default: 14; a "
    "tenant's own model: its training horizon.",
)  # fmt: skip
@click.option("--flag/--no-flag", default=True, show_default=True, help="Flag the model for retraining on a drop.")
@click.option("--json", "as_json", is_flag=True)
def models_drift(
    registry_arg: str | None, tenant: str | None, days: float, outcome_days: float | None, flag: bool, as_json: bool
) -> None:
    """PSI per feature (training vs recent decisions) and live accuracy against outcomes.

    With --tenant, when the tenant's latest start decided by a model was decided by its own model, that model's
    production version is checked instead (calibration against its held-out figures; audited in its log)."""
    from firstmile.ml.drift import NoProductionVersionError

    registry = _registry(registry_arg)
    admin_url = _deps().operator_database_url()
    try:
        result = run(_drift(registry, admin_url, tenant, timedelta(days=days), outcome_days, flag))
    except NoProductionVersionError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(result.to_text())


async def _drift(
    registry: Registry, admin_url: str, tenant: str | None, window: timedelta, outcome_days: float | None, flag: bool
) -> DriftResult | TenantDriftResult:
    """The tenant's own model's check when it decides the tenant's starts, else the shared path_classifier's."""
    from firstmile.ml.drift import assess, load_inputs, tenant_drift

    horizon = None if outcome_days is None else timedelta(days=outcome_days)
    if tenant is not None:
        own = await tenant_drift(admin_url, registry, tenant, window=window, horizon=horizon, flag=flag)
        if own is not None:
            return own
    production = registry.resolve("path_classifier", "production")
    if production is None:
        raise click.ClickException("no production path_classifier to compare against")
    inputs = await load_inputs(admin_url, tenant, window, timedelta(days=14) if horizon is None else horizon)
    result = assess(production, inputs)
    if flag and result.retrain:
        registry.flag("path_classifier", production.version, result.reason)
    return result


@models.command("labels")
@click.option(
    "--model", type=click.Choice(["path_classifier"]), default="path_classifier", show_default=True,
    help="The model whose reviewed decisions to export (reviewers judge the path model's decisions).",
)  # fmt: skip
@click.option("--tenant", default=None, help="Only this tenant's reviews (slug).")
@click.option(
    "--days", type=click.FloatRange(0.01, 3650), default=90.0, show_default=True, help="Reviews decided within."
)
@click.option("--json", "as_json", is_flag=True, help="Print only JSON: the summary and every label.")
def models_labels(model: str, tenant: str | None, days: float, as_json: bool) -> None:
    """Export the reviewed low-confidence decisions as labels (features, chosen path, verdict, corrected target).

    Training runs on simulated onboarding and does not read them (docs/review.md)."""
    from firstmile.ml.labels import UnknownTenantError, load_labels, review_summary

    try:
        labels = run(load_labels(_deps().operator_database_url(), model, timedelta(days=days), tenant))
    except UnknownTenantError as exc:
        raise click.ClickException(f"no tenant {exc.args[0]!r} (firstmile tenants directory lists them)") from exc
    summary = review_summary(labels)
    if as_json:
        report = {"model": model, "tenant": tenant, "days": days, "summary": summary,
                  "labels": [label.to_json() for label in labels]}  # fmt: skip
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    accuracy = summary["reviewer_accuracy"]
    click.echo(
        f"{model}: {summary['reviewed']} reviewed decisions in the last {days:g} days, {summary['right']} right, "
        f"{summary['wrong']} wrong" + (f" (reviewer accuracy {accuracy:.3f})" if accuracy is not None else "")
    )
    for label in labels:
        target = label.target or "-"
        confidence = f"{label.confidence:.3f}" if label.confidence is not None else "-"
        click.echo(
            f"{label.decided_at:%Y-%m-%d %H:%M}  {label.chosen_path}@{label.path_version:<3} {confidence:>6}  "
            f"{label.verdict:5}  target {target}"
        )


def ensure_demo_models(uri: str) -> None:
    """`make run`: with no production models in the registry at ``uri``, train them once (about a
    minute) so the demo is adaptive from its first request; later runs reuse them."""
    try:
        from firstmile_inference.registry import Registry
    except ImportError:
        _say("firstmile_inference is not installed (pip install '.[inference]'): paths are chosen by rules")
        return
    registry = Registry(uri)
    if all(registry.resolve(name, "production") is not None for name in MODEL_NAMES):
        return
    _say(f"no production models in {uri}: training them once on simulated onboarding (progress below)")
    train_models(uri, promote="production")


@click.group()
def stuck() -> None:
    """Stuck-user detection (docs/models.md)."""


@stuck.command("scan")
def stuck_scan() -> None:
    """Scan every tenant of this region once; flagged users become onboarding.stuck events."""

    async def scan() -> list[dict[str, Any]]:
        async with _deps().stuck_scanner() as scanner:
            flags = await scanner.run_once()
        return [dataclasses.asdict(f) for f in flags]

    for row in run(scan()):
        click.echo(json.dumps(row, sort_keys=True, default=str))
