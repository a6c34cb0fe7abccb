"""Models are loaded at startup, before the first request, and off the event loop.

The first start in each worker used to import torch and load the weights on its event loop, inside the
start's open transaction; startup only began the load in the background. Now startup waits (on a worker
thread) until the staged models are in memory, so the first start is served by the model.
"""

from __future__ import annotations

from pathlib import Path

from litestar.testing import AsyncTestClient

from firstmile.analytics.chdb_store import ChdbStore
from firstmile.app import create_app
from firstmile.ml.inference import InProcessClient
from firstmile_inference.registry import Registry
from tests.conftest import PEPPER, Database, make_settings


async def test_the_staged_models_are_loaded_before_the_first_request(
    database: Database, analytics_store: ChdbStore, tiny_registry: Path
) -> None:
    production = {
        name: Registry(str(tiny_registry)).stages(name).production for name in ("path_classifier", "stuck_detector")
    }
    app = create_app(
        make_settings(model_registry_uri=str(tiny_registry)), database.app_url, PEPPER, analytics=analytics_store
    )
    async with AsyncTestClient(app=app):
        container = app.state.container
        client = container.inference.client
        assert isinstance(client, InProcessClient)
        loaded = set(client._loaded)
        for name, version in production.items():
            assert version is not None
            assert (name, version) in loaded, (name, version, loaded)  # in memory before any request
            info = container.stages.stages(name)  # cached at startup: no registry read on the loop
            assert info is not None and info.production == version
