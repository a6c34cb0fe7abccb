"""Health, readiness, metrics, OpenAPI, JSON logs and traces."""

from __future__ import annotations

import json
import logging

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from firstmile.app import create_app
from firstmile.kit import telemetry
from tests.conftest import PEPPER, Database, TenantFixture, make_settings

Client = AsyncTestClient[Litestar]


async def test_live_and_ready(client: Client) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok"}


async def test_ready_reports_a_database_outage() -> None:
    app = create_app(make_settings(), "postgresql+asyncpg://nobody@127.0.0.1:1/none", PEPPER)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as down:
        response = await down.get("/health/ready")
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["checks"] == {"database": "down"}
        assert (await down.get("/health/live")).status_code == 200


async def test_metrics_count_what_happened(client: Client, tenant: TenantFixture) -> None:
    await client.post(
        "/v1/onboarding/start", json={"user_id": "m1", "traits": {"persona": "developer"}}, headers=tenant.headers
    )
    await client.post("/v1/onboarding/m1/steps/create-api-key/complete", headers=tenant.headers)
    await client.post("/v1/onboarding/m1/steps/view-live-events/complete", headers=tenant.headers)
    text = (await client.get("/metrics")).text
    assert 'firstmile_onboarding_starts_total{selected_by="rules"}' in text
    assert "firstmile_step_completions_total" in text
    assert "firstmile_activations_total" in text
    assert 'firstmile_path_selection_duration_seconds_count{selected_by="rules"}' in text
    assert 'route="/v1/onboarding/start",status="201"' in text
    assert 'firstmile_errors_total{status="409",type="step-prerequisites-unmet"}' in text


async def test_openapi_documents_the_contract(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    paths = schema["paths"]
    assert "post" in paths["/v1/onboarding/start"]
    assert "get" in paths["/v1/onboarding/{user_id}"]
    assert "post" in paths["/v1/onboarding/{user_id}/steps/{step_id}/complete"]
    body = paths["/v1/onboarding/start"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "#/components/schemas/StartRequest" in json.dumps(body)
    assert "apiKey" in schema["components"]["securitySchemes"]


async def test_logs_are_json_with_request_id_and_tenant(
    client: Client, tenant: TenantFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    telemetry.configure_logging("INFO", "json")
    response = await client.post(
        "/v1/onboarding/start", json={"user_id": "logged"}, headers=tenant.headers | {"x-request-id": "req-abc-123"}
    )
    assert response.headers["x-request-id"] == "req-abc-123"
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [
        entry
        for entry in lines
        if entry["logger"] == "firstmile.access" and entry.get("path") == "/v1/onboarding/start"
    ]
    assert access, lines
    assert access[-1]["request_id"] == "req-abc-123"
    assert access[-1]["tenant"] == tenant.slug
    assert access[-1]["status"] == 201
    logging.getLogger().setLevel(logging.WARNING)


async def test_requests_are_traced(database: Database, tenant: TenantFixture) -> None:
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing("firstmile-test", "none", None, extra_exporter=exporter)
    traced = create_app(make_settings(otel_exporter="console"), database.app_url, PEPPER)
    async with AsyncTestClient(app=traced, raise_server_exceptions=False) as client:
        await client.post("/v1/onboarding/start", json={"user_id": "traced"}, headers=tenant.headers)
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind.name == "SERVER"]
    assert server, [s.name for s in spans]
    assert any("/v1/onboarding/start" in s.name for s in server), [s.name for s in server]
    assert any(s.name == "path_planner.plan" for s in spans)


async def test_no_server_spans_without_an_exporter(client: Client, tenant: TenantFixture) -> None:
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing("firstmile-test", "none", None, extra_exporter=exporter)
    await client.post("/v1/onboarding/start", json={"user_id": "untraced"}, headers=tenant.headers)
    assert not [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]


async def test_auth_failures_carry_request_id_and_real_status(client: Client) -> None:
    refused = await client.post("/v1/onboarding/start", json={"user_id": "x"}, headers={"x-request-id": "rid-401"})
    assert refused.status_code == 401
    assert refused.headers["x-request-id"] == "rid-401"
    assert refused.json()["request_id"] == "rid-401"
    missing = await client.get("/v1/no-such-route", headers={"x-request-id": "rid-404"})
    assert missing.headers["x-request-id"] == "rid-404"
    assert missing.json()["request_id"] == "rid-404"
    metrics = (await client.get("/metrics")).text
    assert 'route="/v1/onboarding/start",status="401"' in metrics
