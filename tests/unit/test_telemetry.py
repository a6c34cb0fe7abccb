"""Log formatting."""

from __future__ import annotations


def test_console_logs_keep_structured_fields() -> None:
    import logging

    from firstmile.kit.telemetry import ConsoleFormatter, request_id_var

    token = request_id_var.set("rid-1")
    try:
        record = logging.LogRecord("firstmile.access", logging.INFO, __file__, 1, "request", None, None)
        record.fields = {"status": 201}
        line = ConsoleFormatter("%(name)s %(message)s").format(record)
    finally:
        request_id_var.reset(token)
    assert line == "firstmile.access request status=201 request_id=rid-1"
