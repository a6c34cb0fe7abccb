"""The scheduled training's decision rule (docs/models.md#scheduled-training): first, drift, schedule, not due."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from firstmile.ml.tenant_training import due, flag_times
from firstmile.tenancy.manifest import TenantManifest
from firstmile_inference.registry import Registry
from tests.factories import demo_document

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def test_a_tenant_never_trained_nor_tried_is_due_at_once() -> None:
    assert due(NOW, WEEK, None, None, []) == "first"


def test_the_schedule_counts_from_the_later_of_the_last_model_and_the_last_attempt() -> None:
    assert due(NOW, WEEK, NOW - timedelta(days=8), None, []) == "schedule"
    assert due(NOW, WEEK, NOW - WEEK, None, []) == "schedule"
    assert due(NOW, WEEK, NOW - timedelta(days=6), None, []) is None
    # a refusal two days ago: tried again only once the schedule has passed since, not on every pass
    assert due(NOW, WEEK, None, NOW - timedelta(days=2), []) is None
    assert due(NOW, WEEK, NOW - timedelta(days=30), NOW - timedelta(days=2), []) is None
    assert due(NOW, WEEK, NOW - timedelta(days=2), NOW - timedelta(days=30), []) is None


def test_a_drift_flag_after_the_last_run_trains_before_the_schedule() -> None:
    last = NOW - timedelta(days=1)
    assert due(NOW, WEEK, last, None, [NOW - timedelta(hours=1)]) == "drift"
    assert due(NOW, WEEK, None, last, [NOW - timedelta(hours=1)]) == "drift"
    # a flag raised before the last model (already answered by it) does not
    assert due(NOW, WEEK, last, None, [last - timedelta(hours=1)]) is None


def test_flag_times_reads_the_registry_flags_of_each_model_once(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    # the layout ``models drift`` writes (Registry.flag): one JSON line per flag, ``time`` in ISO 8601
    for name, stamp in (("tenant-acme.path_classifier", "2026-12-07T10:00:00.000+00:00"),
                        ("path_classifier", "2026-12-06T10:00:00.000+00:00")):  # fmt: skip
        (tmp_path / name).mkdir()
        line = json.dumps({"time": stamp, "version": "1.0.0", "reason": "live accuracy dropped"})
        (tmp_path / name / "flags.jsonl").write_text(line + "\n", encoding="utf-8")
    times = flag_times(registry, ["tenant-acme.path_classifier", "path_classifier", "path_classifier", "nothing"])
    assert sorted(times) == [NOW - timedelta(days=1, hours=2), NOW - timedelta(hours=2)]
    assert due(NOW, WEEK, NOW - timedelta(days=1), None, times) == "drift"


def test_planner_training_is_optional_and_leaves_the_hash_of_existing_manifests_alone() -> None:
    doc = demo_document()
    doc["planner"] = {"model": "path_classifier", "exploration": {"epsilon": 0.1}}
    plain = TenantManifest.model_validate(doc)
    assert plain.planner is not None and plain.planner.training is None
    # the hash as it was before the field existed: the planner without it
    canonical = plain.model_dump(mode="json", exclude=plain_exclusions(plain))
    assert "training" not in canonical["planner"]
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert plain.content_hash() == hashlib.sha256(encoded).hexdigest()
    doc["planner"]["training"] = {"schedule_days": 3}
    opted = TenantManifest.model_validate(doc)
    assert opted.planner is not None and opted.planner.training is not None
    assert opted.planner.training.schedule_days == 3
    assert opted.content_hash() != plain.content_hash()


def plain_exclusions(manifest: TenantManifest) -> dict[str, Any]:
    """What content_hash leaves out of a manifest with a planner and no training (sections added later)."""
    later = {"keys", "pii_traits", "limits", "experiments", "alerts", "destinations", "sso"}
    excluded: dict[str, Any] = {name: True for name in later if getattr(manifest, name) is None}
    excluded["planner"] = {"training": True}
    auto = {i: {"steps": {j: {"validation": True} for j, s in enumerate(p.steps) if s.validation == "auto"}}
            for i, p in enumerate(manifest.paths)}  # fmt: skip
    excluded["paths"] = {i: a for i, a in auto.items() if a["steps"]}
    if manifest.nudges is not None:
        nudges: dict[str, Any] = {}
        if manifest.nudges.policy is not None and manifest.nudges.policy.default_categories is None:
            nudges["policy"] = {"default_categories": True}
        triggers = {i: {"category": True} for i, t in enumerate(manifest.nudges.triggers) if t.category == "onboarding"}
        if triggers:
            nudges["triggers"] = triggers
        if nudges:
            excluded["nudges"] = nudges
    return excluded


def test_the_task_is_wired_only_with_the_schema_owners_url(tmp_path: Path) -> None:
    from firstmile.ml.tenant_training import TenantTrainer
    from firstmile.wiring.container import Container
    from tests.conftest import PEPPER, make_settings

    key = tmp_path / "audit_signing_key"
    key.touch(mode=0o600)
    key.write_text(secrets.token_hex(32), encoding="ascii")

    app_url = "postgresql+asyncpg://firstmile_app@127.0.0.1:1/firstmile"
    owner_url = "postgresql+asyncpg://postgres@127.0.0.1:1/firstmile"
    common = {
        "model_registry_uri": str(tmp_path / "models"), "tenant_training_seconds": 600, "database_url": app_url,
        "audit_signing_key_file": str(key),
    }  # fmt: skip
    with_owner = Container(make_settings(**common, database_admin_url=owner_url), app_url, PEPPER)
    trainer = with_owner._tenant_trainer()
    assert isinstance(trainer, TenantTrainer) and trainer.admin_url == owner_url
    assert str(trainer.registry.root) == str(tmp_path / "models")
    assert Container(make_settings(**common), app_url, PEPPER)._tenant_trainer() is None
    assert make_settings().models.tenant_training_seconds == 0  # off by default


async def test_a_tenant_still_training_is_not_trained_again(tmp_path: Path) -> None:
    import asyncio
    import uuid

    from firstmile.ml.tenant_training import OptedIn, TenantTrainer

    trainer = TenantTrainer("postgresql+asyncpg://nobody@127.0.0.1:1/none", Registry(tmp_path))
    acme = OptedIn(uuid.uuid4(), "acme", WEEK, "path_classifier")
    unfinished: asyncio.Future[tuple[object, int]] = asyncio.get_running_loop().create_future()
    trainer._threads["acme"] = unfinished  # a thread a cancelled pass left running
    assert (await trainer.run_tenant(acme, NOW)).outcome == "running"
    unfinished.cancel()
    assert trainer.trigger(acme, NOW) == "first"  # once it is done, the rule decides again
