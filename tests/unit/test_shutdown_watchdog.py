"""The workers' shutdown watchdog (``FIRSTMILE_SHUTDOWN_TIMEOUT_SECONDS``): a process that SIGTERM does not stop
within the timeout writes every thread's stack and exits with status 1; one that stops in time exits normally."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading, time
    from firstmile.events.topics import stop_on_signals

    def stuck_call():  # a blocking call that never returns, as a hung client library would make
        time.sleep(60)

    async def main(hang):
        stop = asyncio.Event()
        stop_on_signals(stop, timeout_s=1.0)
        print("ready", flush=True)
        await stop.wait()
        print("stopping", flush=True)
        if hang:
            await asyncio.to_thread(stuck_call)

    asyncio.run(main(sys.argv[1] == "hang"))
    print("stopped", flush=True)
    """
)


def _run(mode: str) -> tuple[int, str, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    return process.returncode, out, err


def test_a_shutdown_that_hangs_is_ended_with_every_threads_stack() -> None:
    code, out, err = _run("hang")
    assert code == 1
    assert "stopping" in out and "stopped" not in out
    assert "stuck_call" in err  # the stack of the thread that hung names the call it is stuck in
    assert "Thread 0x" in err


def test_a_shutdown_in_time_exits_normally() -> None:
    code, out, err = _run("ok")
    assert code == 0, err
    assert out.split() == ["stopping", "stopped"]
    assert "Thread 0x" not in err
