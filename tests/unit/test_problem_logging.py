"""A server error is answered as a problem and logged with its traceback, whichever exception carried it.

docs/api.md promises a traceback in the log for every internal error; a Litestar HTTPException of status
500 (ImproperlyConfiguredException, e.g. a handler reading a user no middleware set) was answered
``internal-error`` without a log line.
"""

from __future__ import annotations

import logging

import pytest
from litestar import Litestar, get
from litestar.exceptions import ImproperlyConfiguredException
from litestar.testing import TestClient

from firstmile.kit.errors import exception_handlers
from tests.support.logs import traceback_of


@get("/broken")
async def broken() -> None:
    raise ImproperlyConfiguredException("user not set in scope")


@get("/bad")
async def bad() -> None:
    raise RuntimeError("a bug")


def test_every_internal_error_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    app = Litestar([broken, bad], exception_handlers=exception_handlers(), logging_config=None)
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="firstmile.errors"):
        for path in ("/broken", "/bad"):
            response = client.get(path)
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"] == "https://firstmile.dev/problems/internal-error"
            assert "user not set" not in response.text and "a bug" not in response.text  # nothing leaks
    # the traceback: on the record, or already formatted (and redacted) by the PII log filter when the
    # app's logging is configured
    tracebacks = [traceback_of(r) for r in caplog.records if r.name == "firstmile.errors"]
    assert len(tracebacks) == 2
    assert "ImproperlyConfiguredException" in tracebacks[0] and "Traceback" in tracebacks[0]
    assert "RuntimeError" in tracebacks[1] and "Traceback" in tracebacks[1]
