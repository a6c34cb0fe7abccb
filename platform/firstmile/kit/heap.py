"""The long-running processes' heap: what startup made stays out of the cycle collector's way.

CPython's cycle collector scans every tracked container object of a generation when that
generation is collected, and the oldest one holds everything a process made at startup
(modules, the app and its routes, pools, models, manifests): about 175,000 objects in an API
process. A request that builds many containers (a Segment batch is hundreds of dicts) starts
collections often enough that those scans showed: freezing the startup heap took the API's
CPU per ingested event from 51-68 µs to 43-44 µs in the event benchmark (docs/benchmarks.md,
"Event path"). ``gc.freeze()`` moves every object alive now into a permanent generation that
collections skip; reference counting still frees them, only a cycle among them would stay.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then leave everything alive now out of later collections (call once, after startup)."""
    gc.collect()
    gc.freeze()


__all__ = ["freeze_startup_heap"]
