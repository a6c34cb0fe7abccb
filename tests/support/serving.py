"""An app served by uvicorn on a loopback port, in a thread of the test process (for clients that need a socket:
a browser, an official SDK, an EventSource)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from litestar import Litestar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(app: Litestar, port: int | None = None, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` while ``app`` is served there (its lifespan run); stopped on exit."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(int(start_timeout_s / 0.05)):
        if server.started:
            break
        threading.Event().wait(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
