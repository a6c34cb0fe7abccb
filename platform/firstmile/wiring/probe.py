"""The probe server of the worker processes (``relay``, ``consume``, ``scheduler``).

A worker serves no API, but Kubernetes needs to know that it is alive and ready, and
Prometheus needs its metrics. With ``FIRSTMILE_PROBE_PORT`` set, the worker serves, on
``FIRSTMILE_PROBE_HOST``, the same ``/health/live``, ``/health/ready`` and ``/metrics`` as the
API (``firstmile.kit.health``), from a small Litestar app run by uvicorn on the worker's own
event loop. Readiness is the worker's: its supervised tasks (and its database, when it has a pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import uvicorn
from litestar import Litestar
from litestar.di import Provide

from firstmile.kit.errors import exception_handlers
from firstmile.kit.health import HealthController, Readiness, metrics
from firstmile.settings import ServerSettings

log = logging.getLogger("firstmile.probe")


def probe_app(readiness: Readiness) -> Litestar:
    """``/health/live``, ``/health/ready`` and ``/metrics`` for ``readiness``."""

    def provide_readiness() -> Readiness:
        return readiness

    return Litestar(
        [HealthController, metrics],
        dependencies={"readiness": Provide(provide_readiness, sync_to_thread=False)},
        exception_handlers=exception_handlers(),  # a 503 readiness answer is application/problem+json here too
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the worker's own handlers stop the worker, and the worker this."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def probe_server(server: ServerSettings, readiness: Readiness) -> AsyncIterator[int | None]:
    """Serve the probes while the block runs (nothing when ``probe_port`` is 0); yields the port served."""
    if server.probe_port == 0:
        yield None
        return
    config = uvicorn.Config(
        probe_app(readiness),
        host=server.probe_host,
        port=server.probe_port,
        lifespan="off",
        log_config=None,
        access_log=False,
        log_level="warning",
    )
    probe = _Server(config)
    task = asyncio.create_task(probe.serve(), name="probe-server")
    while not probe.started:
        if task.done():  # e.g. the port is taken: the worker must not run unobserved
            task.result()
            raise RuntimeError(f"probe server on {server.probe_host}:{server.probe_port} did not start")
        await asyncio.sleep(0.01)
    log.info("probe server listening", extra={"fields": {"host": server.probe_host, "port": server.probe_port}})
    try:
        yield server.probe_port
    finally:
        probe.should_exit = True
        await task


__all__ = ["probe_app", "probe_server"]
