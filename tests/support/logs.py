"""Reading log records as the app's logging leaves them."""

from __future__ import annotations

import logging


def traceback_of(record: logging.LogRecord) -> str:
    """The record's traceback: its ``exc_info``, or what the PII log filter formatted (``exc_text`` or a field).

    Once the app has configured logging, the redacting filter replaces ``exc_info`` with the redacted text.
    """
    if record.exc_info is not None:
        return logging.Formatter().formatException(record.exc_info)
    fields = getattr(record, "fields", None) or {}
    formatted = [v for v in fields.values() if isinstance(v, str) and "Traceback" in v]
    return record.exc_text or (formatted[0] if formatted else "")
