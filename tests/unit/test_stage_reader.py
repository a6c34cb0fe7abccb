"""Reading the model registry never blocks the event loop of a request.

The planner asks for the model's stages on every start. Reading them imports the registry (torch with
it) and reads ``stages.json``; that used to run on the event loop, inside the start's transaction, on
the first start of each worker and again each time the cache expired. Now it runs on a worker thread:
at startup (:meth:`StageReader.load`), and in the background when the cache is stale.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from firstmile.ml.inference import StageInfo, StageReader


class RecordingReader(StageReader):
    """A stage reader whose registry read records the thread it ran on (and takes a while, like torch's import)."""

    def __init__(self, registry_uri: str, ttl_s: float) -> None:
        super().__init__(registry_uri, ttl_s=ttl_s)
        self.threads: list[int] = []

    def read(self, model: str) -> StageInfo | None:
        self.threads.append(threading.get_ident())
        time.sleep(0.05)
        info = StageInfo(production="1.0.0", canary=None, canary_weight=0.0, shadow=None)
        self._cache[model] = (time.monotonic(), info)
        return info


async def test_stages_are_read_off_the_event_loop(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    reader = RecordingReader(str(tmp_path), ttl_s=0.0)
    loaded = await reader.load(["path_classifier"])  # what the app does at startup
    assert loaded["path_classifier"] is not None and loaded["path_classifier"].production == "1.0.0"
    stale = reader.stages("path_classifier")  # expired (ttl 0): answered from the cache, refreshed behind
    assert stale is not None and stale.production == "1.0.0"
    for _ in range(200):
        if len(reader.threads) >= 2:
            break
        await asyncio.sleep(0.01)
    assert len(reader.threads) == 2
    assert loop_thread not in reader.threads  # neither read ran on the loop's thread


async def test_a_model_never_read_is_not_read_on_the_loop(tmp_path: Path) -> None:
    reader = RecordingReader(str(tmp_path), ttl_s=10.0)
    assert reader.stages("stuck_detector") is None  # unknown yet: the planner uses its rules this once
    for _ in range(200):
        if "stuck_detector" in reader._cache:
            break
        await asyncio.sleep(0.01)
    assert reader.threads and reader.threads[0] != threading.get_ident()
    assert reader.stages("stuck_detector") is not None  # read in the background, cached for the next start
