"""The HTTP contract as a client sees it: OPTIONS answers, and an OpenAPI document that states every answer."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.conftest import TenantFixture

Client = AsyncTestClient[Litestar]
PROBLEM_REF = "#/components/schemas/Problem"

# every path that answered OPTIONS with 500 internal-error (and logged nothing)
GUARDED_PATHS = [
    "/v1/analytics/funnel",
    "/v1/analytics/dropoff",
    "/v1/analytics/cohorts",
    "/v1/analytics/time-to-activation",
    "/v1/analytics/step-completion",
    "/v1/analytics/activation-rate",
    "/v1/audit/entries",
    "/v1/audit/entries/1/proof",
    "/v1/audit/checkpoints",
    "/v1/audit/consistency",
    "/v1/audit/public-key",
    "/v1/onboarding/start",
    "/v1/onboarding/u-1",
    "/v1/onboarding/u-1/steps/create-api-key/complete",
    "/v1/users/u-1",
    "/v1/users/u-1/export",
    "/v1/users/",
    "/v1/onboarding/u-1/path",
    "/v1/reviews",
    "/v1/reviews/1",
    "/v1/reviews/1/decision",
    "/v1/reviews/decisions",
    "/v1/overrides",
    "/v1/overrides/pins",
    "/v1/overrides/1",
    "/admin/api/me",
]


@pytest.mark.parametrize("path", GUARDED_PATHS)
async def test_options_answers_the_allowed_methods_without_credentials(
    client: Client, tenant: TenantFixture, path: str
) -> None:
    for headers in ({}, tenant.headers):
        response = await client.options(path, headers=headers)
        assert response.status_code == 204, (path, response.text)
        assert "OPTIONS" in response.headers["allow"]
        assert response.content == b""


async def test_a_guarded_path_still_refuses_a_real_method_without_credentials(client: Client) -> None:
    response = await client.get("/v1/audit/public-key")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"


@pytest.fixture(scope="module")
async def openapi(client: Client) -> dict[str, Any]:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def _problem(operation: dict[str, Any], status: int) -> dict[str, Any] | None:
    response = operation["responses"].get(str(status))
    if response is None:
        return None
    content: dict[str, Any] = response["content"]["application/problem+json"]["schema"]
    return content


async def test_every_operation_declares_its_problem_answers(openapi: dict[str, Any]) -> None:
    operations = _operations(openapi)
    assert len(operations) >= 20
    problem = openapi["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "instance"}
    for path, method, operation in operations:
        assert _problem(operation, 500) == {"$ref": PROBLEM_REF}, (method, path)
        public = path.startswith(("/health", "/v1/webhooks/", "/v1/nudges/", "/embed/v1/"))  # links sign themselves
        for status in () if public else (401, 403, 421, 429, 503):
            assert _problem(operation, status) == {"$ref": PROBLEM_REF}, (method, path, status)
        if not public:  # a refusal says when to retry and what is left, and the document says so
            assert set(operation["responses"]["429"]["headers"]) == {"Retry-After", "RateLimit-Policy", "RateLimit"}
        if operation.get("parameters") or "requestBody" in operation:
            assert _problem(operation, 400) == {"$ref": PROBLEM_REF}, (method, path)
        if public:
            assert operation["security"] == [], path


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        # 200: the user had already started (schemathesis found it undocumented)
        ("post", "/v1/onboarding/start", {200, 201, 400, 401, 403, 413, 421, 429, 500, 503}),
        ("get", "/v1/onboarding/{user_id}", {200, 400, 401, 403, 404, 421, 429, 500, 503}),
        (
            "post",
            "/v1/onboarding/{user_id}/steps/{step_id}/complete",
            {200, 202, 400, 401, 403, 404, 409, 413, 421, 429, 500, 503},  # 202: the completion waits for a review
        ),
        ("put", "/v1/onboarding/{user_id}/path", {200, 400, 401, 403, 404, 409, 413, 421, 429, 500, 503}),
        ("get", "/v1/reviews", {200, 400, 401, 403, 421, 429, 500, 503}),
        ("post", "/v1/reviews/{review_id}/decision", {200, 400, 401, 403, 404, 409, 413, 421, 429, 500, 503}),
        ("post", "/v1/reviews/decisions", {200, 400, 401, 403, 404, 409, 413, 421, 429, 500, 503}),
        ("post", "/v1/overrides/pins", {201, 400, 401, 403, 404, 413, 421, 429, 500, 503}),
        ("delete", "/v1/overrides/{override_id}", {200, 400, 401, 403, 404, 421, 429, 500, 503}),
        ("post", "/v1/events", {202, 400, 401, 403, 413, 415, 421, 429, 500, 503}),
        # Segment's tracking API answers 200 (RudderStack's library takes nothing else for a success)
        ("post", "/v1/batch", {200, 400, 401, 403, 413, 415, 421, 429, 500, 503}),
        ("post", "/v1/track", {200, 400, 401, 403, 413, 415, 421, 429, 500, 503}),
        ("post", "/v1/alias", {200, 400, 401, 403, 413, 415, 421, 429, 500, 503}),
        ("get", "/v1/analytics/funnel", {200, 400, 401, 403, 404, 421, 429, 500, 503}),
        ("get", "/v1/audit/entries/{ref}/proof", {200, 202, 400, 401, 403, 404, 409, 421, 429, 500, 503}),
        ("get", "/v1/users/{user_id}/export", {200, 400, 401, 403, 404, 421, 429, 500, 503}),
        ("get", "/health/ready", {200, 500, 503}),
    ],
)
async def test_the_answers_of_each_operation_are_exactly_what_the_server_sends(
    openapi: dict[str, Any], method: str, path: str, statuses: set[int]
) -> None:
    assert {int(s) for s in openapi["paths"][path][method]["responses"]} == statuses


async def test_the_document_admits_no_input_the_server_refuses(
    openapi: dict[str, Any], client: Client, tenant: TenantFixture
) -> None:
    schemas = openapi["components"]["schemas"]
    # unknown body fields are refused (forbid_unknown_fields), and the schema says so
    assert schemas["StartRequest"]["additionalProperties"] is False
    assert schemas["CompleteRequest"]["additionalProperties"] is False
    refused = await client.post("/v1/onboarding/start", json={"user_id": "a", "admin": True}, headers=tenant.headers)
    assert refused.status_code == 400
    # empty from= and a path that is not a slug are refused, and the parameters say so
    funnel = openapi["paths"]["/v1/analytics/funnel"]["get"]["parameters"]
    parameters = {p["name"]: p["schema"] for p in funnel}
    # the handler refuses a funnel without a path, and the document says it is required (it said optional)
    assert {p["name"]: p["required"] for p in funnel}["path"] is True
    assert parameters["from"]["minLength"] >= 1
    assert parameters["to"]["minLength"] >= 1
    assert parameters["path"]["pattern"] == "^[a-z][a-z0-9-]{0,62}[a-z0-9]$"
    assert parameters["window"]["pattern"]
    assert parameters["variant"]["maxLength"] == 128
    kind = {p["name"]: p["schema"] for p in openapi["paths"]["/v1/audit/entries"]["get"]["parameters"]}["kind"]
    assert kind["pattern"]
    # path parameters carry the formats the handlers check (schemathesis found '0' admitted as a step id)
    for path, method in [
        ("/v1/onboarding/{user_id}", "get"),
        ("/v1/onboarding/{user_id}/steps/{step_id}/complete", "post"),
        ("/v1/users/{user_id}", "delete"),
        ("/v1/users/{user_id}/export", "get"),
        ("/v1/webhooks/segment/{tenant}", "post"),
    ]:
        for parameter in openapi["paths"][path][method]["parameters"]:
            assert parameter["in"] == "path" and parameter["schema"]["pattern"], (path, parameter)
    complete = openapi["paths"]["/v1/onboarding/{user_id}/steps/{step_id}/complete"]["post"]["parameters"]
    step = {p["name"]: p["schema"] for p in complete}["step_id"]
    assert step["pattern"] == "^[a-z][a-z0-9-]{0,62}[a-z0-9]$"
    refused = await client.post("/v1/onboarding/u-1/steps/0/complete", headers=tenant.headers)
    assert refused.status_code == 400
    # the events endpoints read raw bodies and still state them (the document had no body for them)
    for path in ("/v1/events", "/v1/batch"):
        body = openapi["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        batch = body["content"]["application/json"]["schema"]
        assert batch["required"] == ["batch"] and batch["properties"]["batch"]["minItems"] == 1, path
    for call in ("track", "identify", "page", "screen", "group", "alias"):  # Segment's single calls
        single = openapi["paths"][f"/v1/{call}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert single["required"] == ["messageId"] and single["properties"]["type"]["enum"] == [call]
    webhook = openapi["paths"]["/v1/webhooks/segment/{tenant}"]["post"]["requestBody"]
    assert webhook["content"]["application/json"]["schema"]["type"] == "object"
    # the audit's integers say their bounds (limit 1..1000, tree sizes from 1), as the handlers check them
    checkpoints = {p["name"]: p["schema"] for p in openapi["paths"]["/v1/audit/checkpoints"]["get"]["parameters"]}
    assert checkpoints["limit"]["pattern"] == "^0*([1-9][0-9]{0,2}|1000)$"
    consistency = openapi["paths"]["/v1/audit/consistency"]["get"]["parameters"]
    assert {p["name"]: p["required"] for p in consistency} == {"first": True, "second": True}
    proof = openapi["paths"]["/v1/audit/entries/{ref}/proof"]["get"]["parameters"]
    assert {p["name"]: p["schema"] for p in proof}["tree_size"]["pattern"] == "^0*[1-9][0-9]*$"


async def test_admin_pages_send_one_charset(client: Client, tenant: TenantFixture) -> None:
    token = client.app.state.container.admin_auth.bootstrap_token(tenant.slug, "viewer")
    for path in (
        f"/admin/bootstrap?token={token}",  # it said "text/html; charset=utf-8; charset=utf-8"
        "/admin/signin",
        "/admin/logged-out",
        "/admin/static/admin.css",
        "/admin/static/admin.js",
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        content_type = response.headers["content-type"]
        assert content_type.count("charset") == 1, (path, content_type)
    bootstrap = await client.get("/admin/bootstrap", params={"token": "not-a-token"})
    assert bootstrap.status_code == 400  # refused, as problem+json
    assert bootstrap.headers["content-type"] == "application/problem+json"
