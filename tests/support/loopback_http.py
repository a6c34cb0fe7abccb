"""The threading HTTP server every test stand-in runs on: loopback, daemon threads, and quiet about clients that
hang up.

``socketserver`` prints the traceback of an error in a request handler (``BrokenPipeError`` when a client closed its
keep-alive connection while the answer was written) to ``sys.stderr``. A command under ``click``'s ``CliRunner``
has ``sys.stderr`` swapped for the one it captures, so a stand-in's thread that fails at that moment wrote its
traceback into the command's output, after its JSON. Here such an error is kept on the server (``errors``) and
logged, never printed.
"""

from __future__ import annotations

import logging
import sys
from http.server import ThreadingHTTPServer
from typing import Any

log = logging.getLogger("tests.loopback_http")


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` with daemon threads whose handler errors are recorded, not printed."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.errors: list[BaseException] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            self.errors.append(error)
        log.debug("a stand-in's request from %s failed: %r", client_address, error)


__all__ = ["LoopbackHTTPServer"]
