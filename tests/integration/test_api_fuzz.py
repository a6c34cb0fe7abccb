"""Reliability harness: schemathesis over the whole OpenAPI document, with a key that has every scope.

Every operation of ``/schema/openapi.json`` is fuzzed in process (the ASGI transport: the real app,
the worker's PostgreSQL and chdb), with schemathesis' phases (the document's examples, the coverage
phase's boundary and invalid values, then Hypothesis' generation), a fixed seed and a fixed number
of examples per operation, so a run is reproducible and stays within the suite's time. Each answer
must be what the document says (schemathesis' checks: no 5xx, a documented status and content type,
a body that matches its schema, invalid input refused, authentication enforced, …) and, when it is
an error, an RFC 9457 problem (``problem_details`` below).

``positive_data_acceptance`` (a request the document admits must not be refused) runs where the
document states every rule the server applies (``EXACT_OPERATIONS``). Elsewhere the server applies
rules the document does not say: calendar dates and ranges between two parameters (analytics, audit
entries and consistency), "at most 5 minutes in the future" (a completion's ``occurred_at``), a
Segment batch whose every message is invalid (events), the limits on trait names and values (start),
an email address (users lookup).

The admin API (``/admin/api``) is not in the document (session cookie and CSRF, for the admin UI
only) and is not fuzzed here. The figures (operations, requests, answers by class, failures) are
printed at the end of the run (tests/support/figures.py).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from litestar import Litestar
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from sqlalchemy.ext.asyncio import AsyncEngine

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.kit.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from firstmile.tenancy.keys import SCOPES
from tests.conftest import PEPPER, Database, make_settings, new_tenant
from tests.support import figures

SEED = int(os.environ.get("FIRSTMILE_TEST_FUZZ_SEED", "14"))
MAX_EXAMPLES = int(os.environ.get("FIRSTMILE_TEST_FUZZ_EXAMPLES", "25"))
"""Hypothesis examples per operation, besides the explicit and coverage-phase ones. The suite runs the
defaults; a longer hunt sets both variables (200 examples and other seeds found nothing more)."""
EXACT_OPERATIONS = [
    "/health/live",
    "/health/ready",
    "/v1/onboarding/{user_id}",
    "/v1/webhooks/segment/{tenant}",
    "/v1/audit/entries/{ref}/proof",
    "/v1/audit/checkpoints",
    "/v1/audit/public-key",
    "/v1/users/{user_id}",
    "/v1/users/{user_id}/export",
]
"""Paths whose parameters and bodies the document states exactly: a request it admits is never refused."""

# The document does not depend on the database: it is made from the code, as the server makes it.
_DOCUMENT = create_app(make_settings(), "postgresql+asyncpg://unused@127.0.0.1:1/unused", PEPPER).openapi_schema
schema = schemathesis.openapi.from_dict(
    _DOCUMENT.to_schema(),
    config=SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": "http://testserver",
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            # unknown query parameters are ignored, as HTTP APIs do (the document does not say otherwise)
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "allow-extra-parameters": False},
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                # a refusal is any 4xx (413 for a batch over 2,500 messages, too), never a 5xx or a 2xx
                "negative_data_rejection": {"expected-statuses": ["4XX"]},
            },
            "operations": [
                {"include-path": EXACT_OPERATIONS, "checks": {"positive_data_acceptance": {"enabled": True}}}
            ],
        }
    ),
)


def problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx or 5xx answer is an RFC 9457 problem: its media type, and type, title, status and detail."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.split(";")[0].strip() == PROBLEM_MEDIA_TYPE, (
        f"{response.status_code} answered as {content_type!r}, not {PROBLEM_MEDIA_TYPE}"
    )
    body = json.loads(response.content)
    assert isinstance(body, dict), f"a problem is a JSON object, not {body!r}"
    expected = {"type": str, "title": str, "status": int, "detail": str}
    wrong = [name for name, kind in expected.items() if not isinstance(body.get(name), kind)]
    assert not wrong, f"the problem lacks {wrong}: {body}"
    assert body["status"] == response.status_code, f"status {body['status']} in a {response.status_code} answer"
    assert body["type"].startswith(PROBLEM_BASE), f"type {body['type']!r} is not one of ours"
    return True


@dataclass
class Target:
    """The in-process app the fuzzing sends to, the all-scope key, and what was sent."""

    app: Litestar
    headers: dict[str, str]
    operations: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    failed: set[str] = field(default_factory=set)

    def bind(self, case: Any) -> None:
        # The schema was loaded before the database existed: its operations learn the app here, so
        # every request (and each check's probe, e.g. without credentials) goes to it in process.
        case.operation.app = self.app
        case.operation.schema.app = self.app


@pytest.fixture(scope="module")
async def fuzz_target(
    database: Database, analytics_store: ChdbStore, admin_engine: AsyncEngine, worker_id: str
) -> AsyncIterator[Target]:
    tenant = await new_tenant(admin_engine, scopes=SCOPES)
    app = create_app(make_settings(), database.app_url, PEPPER, analytics=analytics_store)
    target = Target(app, tenant.headers)
    yield target
    asgi.shutdown_lifespans()  # the app was started once, on schemathesis' event-loop thread
    requests = sum(target.answers.values())
    figures.add(
        "openapi fuzzing",
        worker_id,
        {
            "operations": len(target.operations),
            "requests fuzzed": requests,
            **{f"answers {k}": v for k, v in sorted(target.answers.items())},
            "failures": len(target.failed),
            "seed": str(SEED),
            "examples per operation": str(MAX_EXAMPLES),
        },
    )


@schema.parametrize()
def test_every_operation_answers_as_documented(case: Any, fuzz_target: Target) -> None:
    fuzz_target.bind(case)
    label = case.operation.label
    fuzz_target.operations.add(label)
    response = case.call(headers=fuzz_target.headers)
    fuzz_target.answers[f"{response.status_code // 100}xx"] += 1
    try:
        case.validate_response(
            response,
            headers=fuzz_target.headers,
            additional_checks=[problem_details],
            transport_kwargs={"headers": fuzz_target.headers},
        )
    except BaseException:
        fuzz_target.failed.add(label)
        raise
