"""Nudge experiments on the real stack: the manifest declares one on the stuck trigger's channel, the lifecycle runs,
each decision asks the orchestrator, the send uses the allocated variant's channel, the exposure is recorded once
(row, ``experiment.exposed`` event, the decision's audit entry), a traffic change moves no one already exposed, a
user for whom a variant is impossible is not exposed, and a failing allocation leaves the decision to the bandit."""

from __future__ import annotations

import json
import random
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.controlplane.service import apply_manifest
from firstmile.experiments import service as experiments
from firstmile.experiments.allocation import allocate
from firstmile.experiments.orchestrator import ExperimentOrchestrator, to_allocation
from firstmile.kit.db import tenant_transaction
from firstmile.kit.scope import OperatorContext
from firstmile.nudges.bandit import ThompsonSampler
from firstmile.nudges.policy import NudgePolicy
from firstmile.nudges.service import NudgeExecutor, set_consent
from firstmile.onboarding.catalog import CatalogCache
from firstmile.onboarding.service import OnboardingService
from firstmile.tenancy.cli import create_key
from firstmile.tenancy.manifest import ExperimentsSpec
from tests.conftest import PEPPER, REGION, TenantFixture, sequenced
from tests.factories import demo_document, manifest_for

Client = AsyncTestClient[Litestar]
OPS = OperatorContext("operator:test-nudge-experiments")
ANYTIME = NudgePolicy(quiet_start=None, quiet_end=None)
EXPERIMENT_ID = "stuck-channel"
EXPERIMENT: dict[str, Any] = {
    "id": EXPERIMENT_ID,
    "kind": "nudge",
    "trigger": "stuck",
    "control": "email",
    "variants": [{"name": "email", "channel": "email"}, {"name": "in-app", "channel": "in_app"}],
    "guardrails": ["stuck_rate", "nudge_unsubscribes"],
}
CHANNEL = {"email": "email", "in-app": "in_app"}


def _document(**changes: Any) -> dict[str, Any]:
    doc = demo_document()
    doc["nudges"]["policy"]["daily_cap"] = 5  # a user's second decision of the day is allowed
    doc["experiments"] = {"experiments": [EXPERIMENT | changes]}
    return doc


async def _tenant(admin_engine: AsyncEngine) -> TenantFixture:
    slug = f"nx-{secrets.token_hex(5)}"
    manifest = manifest_for(slug, REGION, _document())
    result = await apply_manifest(admin_engine, manifest)
    created = await create_key(admin_engine, PEPPER, slug, ["onboarding:write"], "test")
    return TenantFixture(result.tenant_id, slug, created.key, manifest)


def _executor() -> NudgeExecutor:
    orchestrator = ExperimentOrchestrator()
    return NudgeExecutor(OnboardingService(CatalogCache()), ["email", "in_app"], ANYTIME,
                         ThompsonSampler(random.Random(3)), experiments=orchestrator)  # fmt: skip


async def _start(client: Client, tenant: TenantFixture, user_id: str) -> str:
    """Start a developer; their current step."""
    traits = {"persona": "developer", "email": f"{user_id}@x.test"}
    r = await client.post("/v1/onboarding/start", headers=tenant.headers, json={"user_id": user_id, "traits": traits})
    assert r.status_code == 201, r.text
    step: str = r.json()["current_step"]
    return step


async def _rows(admin_engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with admin_engine.connect() as conn:
        return list(await conn.execute(text(sql), params))


async def _run(admin_engine: AsyncEngine, app_engine: AsyncEngine, tenant: TenantFixture) -> None:
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        await experiments.approve(tx, EXPERIMENT_ID, "admin:owner")
        await experiments.start(tx, EXPERIMENT_ID, "admin:editor", datetime.now(UTC))


def _expected(user_ids: list[str], **changes: Any) -> dict[str, str | None]:
    spec = ExperimentsSpec.model_validate({"experiments": [EXPERIMENT | changes]}).experiments[0]
    out: dict[str, str | None] = {}
    for user_id in user_ids:
        outcome = allocate(to_allocation(spec), user_id, {"persona": "developer"})
        out[user_id] = outcome.allocation.variant if outcome.allocation is not None else None
    return out


async def test_a_running_nudge_experiment_decides_the_channel_and_records_each_exposure_once(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    executor = _executor()
    draft_user = "nx-draft"
    step = await _start(client, tenant, draft_user)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:  # a draft changes no decision
        decided = await executor.on_stuck(tx, draft_user, step, datetime.now(UTC))
    assert decided.status == "scheduled"
    [(decision,)] = await _rows(admin_engine, "SELECT decision FROM nudge_sends WHERE tenant_id = :t AND user_id = :u",
                                t=tenant.id, u=draft_user)  # fmt: skip
    assert "experiment" not in decision

    await _run(admin_engine, app_engine, tenant)
    users = [f"nx-{i}" for i in range(16)]
    expected = _expected(users)
    assert set(expected.values()) == {"email", "in-app"}  # both variants among these users
    for user_id in users:
        step = await _start(client, tenant, user_id)
        async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
            decided = await executor.on_stuck(tx, user_id, step, datetime.now(UTC))
        assert decided.status == "scheduled" and decided.arm is not None, user_id
        assert decided.arm.split("|")[1] == CHANNEL[str(expected[user_id])], (user_id, decided.arm)

    sends = await _rows(admin_engine, "SELECT user_id, channel, decision FROM nudge_sends WHERE tenant_id = :t "
                        "AND user_id LIKE 'nx-%' AND user_id <> :d", t=tenant.id, d=draft_user)  # fmt: skip
    assert len(sends) == len(users)
    for user_id, channel, record in sends:
        assert channel == CHANNEL[str(expected[user_id])]
        assert record["experiment"]["id"] == EXPERIMENT_ID and record["experiment"]["variant"] == expected[user_id]
        assert record["experiment"]["honoured"] is True and record["experiment"]["inputs"]["hash"] == "sha256"
    exposures = await _rows(admin_engine, "SELECT user_id, variant FROM experiment_exposures WHERE tenant_id = :t",
                            t=tenant.id)  # fmt: skip
    assert dict(exposures) == expected
    events = await _rows(admin_engine, "SELECT payload FROM outbox WHERE tenant_id = :t AND event_type = "
                         "'experiment.exposed'", t=tenant.id)  # fmt: skip
    assert len(events) == len(users)
    assert {(e[0]["user_id"], e[0]["variant"], e[0]["kind"]) for e in events} == {
        (u, v, "nudge") for u, v in expected.items()
    }
    sent = {str(r[0]): str(r[1]) for r in await _rows(
        admin_engine, "SELECT user_id, send_id FROM nudge_sends WHERE tenant_id = :t", t=tenant.id)}  # fmt: skip
    assert all(e[0]["send_id"] == sent[e[0]["user_id"]] for e in events)
    await sequenced(app_engine, tenant.id)
    audits = await _rows(admin_engine, "SELECT payload FROM audit_entries WHERE tenant_id = :t AND kind = 'decision' "
                         "AND actor = 'nudge_executor'", t=tenant.id)  # fmt: skip
    audited = [a[0]["experiment"] for a in audits if a[0].get("experiment")]
    assert len(audited) == len(users) and {a["id"] for a in audited} == {EXPERIMENT_ID}


async def test_an_exposed_user_keeps_the_variant_a_user_without_every_option_stays_out_and_a_failure_is_the_bandits(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    executor = _executor()
    await _run(admin_engine, app_engine, tenant)
    users = [f"nk-{i}" for i in range(12)]
    expected = _expected(users)
    for user_id in users:
        step = await _start(client, tenant, user_id)
        async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
            await executor.on_stuck(tx, user_id, step, datetime.now(UTC))

    # the traffic goes to 0: new users are out, exposed users keep their variant at their next decision
    slug = tenant.manifest.tenant.slug
    lowered = await apply_manifest(admin_engine, manifest_for(slug, REGION, _document(traffic_percent=0)))
    assert f"experiment {EXPERIMENT_ID}: definition updated (running)" in lowered.changes
    r = await client.post(f"/v1/onboarding/{users[0]}/steps/create-api-key/complete", headers=tenant.headers)
    assert r.status_code == 200, r.text
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        again = await executor.on_stuck(tx, users[0], r.json()["current_step"], datetime.now(UTC))
    assert again.arm is not None and again.arm.split("|")[1] == CHANNEL[str(expected[users[0]])]
    newcomer = "nk-new"
    step = await _start(client, tenant, newcomer)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        await executor.on_stuck(tx, newcomer, step, datetime.now(UTC))
    [(record,)] = await _rows(admin_engine, "SELECT decision FROM nudge_sends WHERE tenant_id = :t AND user_id = :u",
                              t=tenant.id, u=newcomer)  # fmt: skip
    assert "experiment" not in record
    counts = await _rows(admin_engine, "SELECT count(*) FROM experiment_exposures WHERE tenant_id = :t", t=tenant.id)
    assert counts == [(len(users),)]  # the second decision of users[0] recorded nothing new

    # back to all traffic; a user who refused in-app messages cannot get every variant: not exposed, still nudged
    await apply_manifest(admin_engine, manifest_for(slug, REGION, _document()))
    refusing = next(f"nr-{i}" for i in range(100) if _expected([f"nr-{i}"])[f"nr-{i}"] == "email")
    step = await _start(client, tenant, refusing)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        await set_consent(tx, refusing, "in_app", "onboarding", False, "test")
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        decided = await executor.on_stuck(tx, refusing, step, datetime.now(UTC))
    assert decided.status == "scheduled" and decided.arm is not None and "|email|" in decided.arm
    assert await _rows(admin_engine, "SELECT 1 FROM experiment_exposures WHERE tenant_id = :t AND user_id = :u",
                       t=tenant.id, u=refusing) == []  # fmt: skip

    # a definition that no longer parses: allocation fails, the bandit decides, no exposure
    async with admin_engine.begin() as conn:
        await conn.execute(text("UPDATE experiments SET definition = '{\"id\": 1}'::jsonb WHERE tenant_id = :t"),
                           {"t": tenant.id})  # fmt: skip
        await conn.execute(text("UPDATE tenants SET revision = revision + 1 WHERE id = :t"), {"t": tenant.id})
    broken = "nk-broken"
    step = await _start(client, tenant, broken)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        decided = await executor.on_stuck(tx, broken, step, datetime.now(UTC))
    assert decided.status == "scheduled"
    [(record,)] = await _rows(admin_engine, "SELECT decision FROM nudge_sends WHERE tenant_id = :t AND user_id = :u",
                              t=tenant.id, u=broken)  # fmt: skip
    assert "experiment" not in record and json.dumps(record)
    assert await _rows(admin_engine, "SELECT 1 FROM experiment_exposures WHERE tenant_id = :t AND user_id = :u",
                       t=tenant.id, u=broken) == []  # fmt: skip


async def test_a_nudge_experiment_cannot_be_promoted_and_a_draft_naming_an_unknown_template_is_refused(
    client: Client, admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    tenant = await _tenant(admin_engine)
    variants = [{"name": "direct", "template": "direct"}, {"name": "ghost", "template": "no-such-wording"}]
    spec = ExperimentsSpec.model_validate(
        {"experiments": [EXPERIMENT | {"id": "wording", "control": "direct", "variants": variants}]}
    )
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        with pytest.raises(experiments.ExperimentError, match=r"unknown nudge templates \['no-such-wording'\]") as bad:
            await experiments.draft(tx, spec.experiments[0], "admin:editor")
    assert bad.value.status == 400
    await _run(admin_engine, app_engine, tenant)
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id)) as tx:
        await experiments.conclude(tx, EXPERIMENT_ID, "admin:owner", datetime.now(UTC),
                                   {"kind": "winner", "variant": "in-app"})  # fmt: skip
    async with tenant_transaction(app_engine, OPS.tenant(tenant.id), commit=False) as tx:
        with pytest.raises(experiments.ExperimentError, match="is a nudge experiment") as refused:
            await experiments.promote(tx, EXPERIMENT_ID, "admin:owner")
    assert refused.value.status == 409
