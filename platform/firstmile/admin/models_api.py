"""The models page's API under ``/admin/api/models`` (behind the admin session and its guard), which the models
page (``/admin/models``) calls (docs/admin-ui.md#models).

For the signed-in tenant: the path models its planner may use, the platform's shared ``path_classifier`` and the
tenant's own ``tenant-<slug>.path_classifier`` (docs/models.md#per-tenant-models), each with its versions, their
metrics, the stages (canary weight included), the stage history and the retraining flags ``models drift`` wrote,
and for the tenant's own model the last drift check's report (``drift``: PSI per feature, live calibration,
verdict, when; :mod:`firstmile.ml.drift`); each tenant version with its off-policy report (IPS, SNIPS and DR with
their intervals and effective sample sizes, the logged activation rate, whether it passes the gate).

Roles (``admin/rbac.py``): the analyst and up read (``models:read``); the owner promotes the tenant's own versions
and rolls back (``models:promote``). The shared models are read-only here: a tenant never stages the platform's
models, and no route takes a model's name, only a version of the tenant's own.

A promotion is ``firstmile models promote --tenant``'s: into canary or production only when the version's stored
off-policy report passes the gate (the DR lower bound beats the logged activation rate), else ``409
model-gate-failed`` with the report and nothing staged; the stage order shadow → canary → production as for any
model (``409 model-stage-order``). A rollback promotes an older version than the one in production back into
production with ``force`` (docs/models.md#the-registry), behind the same gate. Each promotion, passed or refused by
the gate, is a ``model`` entry in the tenant's audit log (actor ``admin:<subject>``), as the CLI writes it; a
passed one is appended in the transaction that stages it, so a failed stage change leaves no entry.

The registry is a directory: every read and write runs on a worker thread (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from firstmile.admin.rbac import Permission
from firstmile.admin.sessions import AdminSession
from firstmile.audit import service as audit
from firstmile.kit.db import TenantTx
from firstmile.kit.errors import ProblemError, strict_body
from firstmile.kit.uow import UnitOfWork
from firstmile.ml import drift, tenant_models
from firstmile.ml.inference import StageReader
from firstmile.ml.planner import PATH_MODEL, tenant_model_name
from firstmile.tenancy import service as tenancy

if TYPE_CHECKING:
    from firstmile_inference.registry import ModelVersion, Registry

STAGES: Final = ("shadow", "canary", "production")
GATED: Final = ("canary", "production")
MAX_HISTORY: Final = 50
"""The stage changes shown per model, newest first."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A tenant version about to be promoted: its model, the stages now, its off-policy report."""

    name: str
    version: str
    production: str | None
    report: dict[str, Any]


def _version_key(version: str) -> tuple[int, int, int]:
    from firstmile_inference.registry import parse_version

    return parse_version(version)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """A version's headline figures: its numbers and flags (the off-policy report is shown on its own)."""
    return {k: v for k, v in sorted(metrics.items()) if isinstance(v, int | float | bool | str) or v is None}


def report_view(name: str, version: str, report: dict[str, Any]) -> dict[str, Any]:
    """An off-policy report as the API answers it and the page shows it: the stored report, the gate's two
    numbers, and the text ``models promote`` prints."""
    figures = tenant_models.gate_figures(report)
    bar = (
        f"the current model {figures['current_version']}'s DR estimate"
        if figures["gate_against"] == "current_model"
        else "the logged activation rate"
    )
    return report | {
        **{k: figures[k] for k in ("dr_low", "logged_rate", "gate_against", "gate_threshold", "current_version")},
        "gate_bar": bar,  # what the candidate's lower bound had to beat, in words
        "text": tenant_models.report_text(name, version, report),
    }


class ModelAdmin:
    """The registry as the admin UI reads and stages it (the planner's registry: :class:`StageReader`'s URI)."""

    def __init__(self, stages: StageReader) -> None:
        self.stages = stages
        self._registry: Registry | None = None

    def registry(self) -> Registry:
        if self._registry is None:
            from firstmile_inference.registry import Registry

            self._registry = Registry(self.stages.registry_uri)
        return self._registry

    # ---- reads (blocking: on a worker thread)

    def _model(self, name: str, scope: str) -> dict[str, Any]:
        registry = self.registry()
        stages = registry.stages(name)
        flags = registry.flags(name)
        flagged: dict[str, list[dict[str, Any]]] = {}
        for flag in flags:
            flagged.setdefault(str(flag.get("version")), []).append(flag)
        versions = []
        for mv in reversed(registry.versions(name)):
            report = mv.metrics.get("ope")
            versions.append({
                "version": mv.version,
                "created_at": mv.created_at,
                "stage": stages.stage_of(mv.version),
                "metrics": _scalars(mv.metrics),
                "flags": flagged.get(mv.version, []),
                "ope": report_view(name, mv.version, report) if isinstance(report, dict) else None,
                "trained_on": mv.config.get("training", {}).get("decisions") if scope == "tenant" else None,
                "older_than_production": stages.production is not None
                and _version_key(mv.version) < _version_key(stages.production),
            })  # fmt: skip
        return {
            "name": name,
            "scope": scope,
            "stages": stages.to_json(),
            "versions": versions,
            "history": list(reversed(registry.history(name)))[:MAX_HISTORY],
            "flags": list(reversed(flags)),
            "drift": drift.last_report(registry, name) if scope == "tenant" else None,
        }

    def read(self, slug: str) -> dict[str, Any]:
        """The shared path model and the tenant's own, as the page shows them."""
        return {
            "shared": self._model(PATH_MODEL, "shared"),
            "own": self._model(tenant_model_name(slug), "tenant"),
        }

    def candidate(self, slug: str, version: str) -> Candidate:
        """The tenant's ``version`` with its report; ``404 model-version-not-found`` and ``409 model-report-missing``
        as problems."""
        name = tenant_model_name(slug)
        registry = self.registry()
        try:
            mv: ModelVersion = registry.get(name, version)
        except KeyError:
            known = ", ".join(v.version for v in registry.versions(name)) or "none"
            raise ProblemError(404, "model-version-not-found",
                               f"your tenant's model {name} has no version {version} (registered: {known})",
                               model=name, version=version) from None  # fmt: skip
        try:
            report = tenant_models.report_of(mv)
        except KeyError:
            raise ProblemError(409, "model-report-missing",
                               f"{name} {version} has no off-policy report: it was not trained by "
                               "firstmile models train --tenant, and is not promoted", model=name,
                               version=version) from None  # fmt: skip
        return Candidate(name, version, registry.stages(name).production, report)

    def promote(
        self, name: str, version: str, stage: str, *, weight: float | None, force: bool, actor: str
    ) -> dict[str, Any]:
        """Stage ``version`` (the registry's order unless ``force``), then refresh the planner's cached stages."""
        from firstmile_inference.registry import PromotionError

        try:
            stages = self.registry().promote(name, version, stage, weight=weight, actor=actor, force=force)
        except PromotionError as exc:
            raise ProblemError(409, "model-stage-order", str(exc), model=name, version=version) from None
        self.stages.read(name)
        return stages.to_json()

    # ---- the same, off the event loop

    async def overview(self, slug: str) -> dict[str, Any]:
        """:meth:`read` on a worker thread; a registry that cannot be read is said, not raised."""
        try:
            return await asyncio.to_thread(self.read, slug)
        except (OSError, ValueError) as exc:
            return {"shared": None, "own": None, "registry_error": f"the model registry cannot be read: {exc}"}


class Promotion(msgspec.Struct, forbid_unknown_fields=True):
    """Into ``shadow``, ``canary`` (with ``weight``, the share of users, in (0, 1]; default 0.1) or
    ``production``; ``force`` skips the shadow → canary → production order."""

    stage: str
    weight: float | None = None
    force: bool = False


def _actor(request: Request[Any, Any, Any]) -> tuple[str, str]:
    session = request.user
    assert isinstance(session, AdminSession)
    return f"admin:{session.subject}", session.tenant_slug


def _version(value: str) -> str:
    try:
        _version_key(value)
    except ValueError:
        message = "a model version (MAJOR.MINOR.PATCH, e.g. 1.0.0)"
        raise ProblemError(400, "validation-error", f"version must be {message}",
                           errors=[{"key": "version", "message": message, "source": "path"}]) from None  # fmt: skip
    return value


def _check(body: Promotion) -> None:
    def bad(key: str, message: str) -> ProblemError:
        return ProblemError(400, "validation-error", f"{key}: {message}",
                            errors=[{"key": key, "message": message, "source": "body"}])  # fmt: skip

    if body.stage not in STAGES:
        raise bad("stage", f"one of {', '.join(STAGES)}")
    if body.weight is not None and (body.stage != "canary" or not 0.0 < body.weight <= 1.0):
        raise bad("weight", "the canary's share of users, above 0 and at most 1 (canary only)")


async def stage_version(
    uow: UnitOfWork,
    models: ModelAdmin,
    slug: str,
    actor: str,
    version: str,
    stage: str,
    *,
    weight: float | None,
    force: bool,
    action: str,
) -> dict[str, Any]:
    """The gate, then the promotion and its audit entry in one transaction; a refusal by the gate is audited and
    answered ``409 model-gate-failed`` with the report."""
    found = await asyncio.to_thread(models.candidate, slug, version)
    if action == "models.rollback" and (
        found.production is None or _version_key(version) >= _version_key(found.production)
    ):
        now = found.production or "none"
        raise ProblemError(409, "model-not-older",
                           f"a rollback brings back a version older than the one in production (now: {now}); "
                           f"promote {version} instead", model=found.name, version=version)  # fmt: skip
    report = report_view(found.name, version, found.report)
    subject = f"model:{found.name}@{version}"
    payload = {"action": action, "model": found.name, "version": version, "stage": stage,
               **tenant_models.gate_figures(found.report), "force": force, "weight": weight}  # fmt: skip
    if stage in GATED and not report["gate_passed"]:

        async def refused(tx: TenantTx) -> None:
            await audit.append(tx, tenant_models.AUDIT_KIND, actor, subject, payload | {"refused": True})

        await uow.run(refused)
        raise ProblemError(
            409, "model-gate-failed",
            f"{found.name} {version} stays out of {stage}: its DR lower bound {report['dr_low']:.3f} does not beat "
            f"{report['gate_bar']} {report['gate_threshold']:.3f}; the current model keeps serving",
            model=found.name, version=version, stage=stage, report=report,
        )  # fmt: skip

    staged: list[dict[str, Any]] = []  # a transaction retried after a transient failure stages once

    async def promote(tx: TenantTx) -> dict[str, Any]:
        await audit.append(tx, tenant_models.AUDIT_KIND, actor, subject, payload | {"refused": False})
        if not staged:
            staged.append(await asyncio.to_thread(
                models.promote, found.name, version, stage, weight=weight, force=force, actor=actor
            ))  # fmt: skip
        return staged[0]

    stages = await uow.run(promote)
    return {"model": found.name, "version": version, "stage": stage, "stages": stages, "report": report}


class ModelsAdminController(Controller):
    path = "/admin/api/models"
    tags = ["admin"]

    @get(summary="The tenant's path models: the shared one (read-only) and its own, with reports and history",
         opt={"permission": Permission.MODELS_READ})  # fmt: skip
    async def overview(
        self,
        request: Request[Any, Any, Any],
        uow: NamedDependency[UnitOfWork],
        model_admin: NamedDependency[ModelAdmin],
    ) -> dict[str, Any]:
        _, slug = _actor(request)
        _, _, _, planner_model, exploration = await uow.run(tenancy.path_settings)
        found = await model_admin.overview(slug)
        return {"tenant": slug, "planner_model": planner_model, "exploration": exploration} | found

    @post("/{version:str}/promote", summary="Promote a version of the tenant's own model (behind the off-policy gate)",
          status_code=200, opt={"permission": Permission.MODELS_PROMOTE})  # fmt: skip
    async def promote(
        self,
        request: Request[Any, Any, Any],
        version: FromPath[str],
        data: JSONBody[Promotion],
        uow: NamedDependency[UnitOfWork],
        model_admin: NamedDependency[ModelAdmin],
    ) -> dict[str, Any]:
        checked = _version(version)
        body = strict_body(await request.body(), Promotion)
        _check(body)
        actor, slug = _actor(request)
        return await stage_version(uow, model_admin, slug, actor, checked, body.stage, weight=body.weight,
                                   force=body.force, action="models.promote")  # fmt: skip

    @post("/{version:str}/rollback", summary="Bring an older version of the tenant's own model back into production",
          status_code=200, opt={"permission": Permission.MODELS_PROMOTE})  # fmt: skip
    async def rollback(
        self,
        request: Request[Any, Any, Any],
        version: FromPath[str],
        uow: NamedDependency[UnitOfWork],
        model_admin: NamedDependency[ModelAdmin],
    ) -> dict[str, Any]:
        checked = _version(version)
        actor, slug = _actor(request)
        return await stage_version(uow, model_admin, slug, actor, checked, "production", weight=None, force=True,
                                   action="models.rollback")  # fmt: skip
