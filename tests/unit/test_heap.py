"""The long-running processes freeze their startup heap (firstmile.kit.heap), in a process of its own here:
a frozen heap would keep this test process's later cyclic garbage alive."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from firstmile.app import app_factory
from firstmile.kit.heap import freeze_startup_heap
import firstmile.wiring.workers as workers, inspect
assert gc.get_freeze_count() == 0
freeze_startup_heap()
frozen = gc.get_freeze_count()
assert frozen > 10_000, frozen
assert len(gc.get_objects()) < frozen, "the startup heap is out of the collected generations"
assert "freeze_startup_heap" in inspect.getsource(app_factory)
assert "freeze_startup_heap()" in inspect.getsource(workers.run_consumers)
print(frozen)
"""


def test_the_startup_heap_is_frozen_out_of_collections() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 10_000
