"""CPU accounting per process tree, from /proc, during a measured run."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.database import _count
from benchmarks.servers import Server
from benchmarks.wrk import WrkResult, _run_wrk


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) for every process we can read.

    The CPU seconds include those of its children that exited and were waited
    for (cutime, cstime), so short-lived PostgreSQL backends are not lost.
    """
    ticks = float(os.sysconf("SC_CLK_TCK"))
    table: dict[int, tuple[int, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "stat").read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            rest = raw[raw.rindex(")") + 2 :].split()
            used = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
            table[int(entry.name)] = (int(rest[1]), used / ticks)
    return table


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text(encoding="utf-8").splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / float(os.sysconf("SC_CLK_TCK"))


def _tree(table: dict[int, tuple[int, float]], root: int | None) -> set[int]:
    if root is None or root not in table:
        return set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during one measured run, by who spent them."""

    wall_s: float
    server_s: float
    postgres_s: float
    wrk_s: float
    busy_s: float
    server_split: tuple[float, ...] = ()
    """CPU seconds of each busy process of the server (uvicorn's workers), largest first."""
    new_sessions: int = 0

    @property
    def other_s(self) -> float:
        return max(0.0, self.busy_s - self.server_s - self.postgres_s - self.wrk_s)


@contextlib.contextmanager
def _cpu_meter(server_pid: int, postmaster_pid: int | None, out: list[CpuUse]) -> Iterator[None]:
    before, busy0 = _proc_table(), _busy_seconds()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    yield
    wall = time.monotonic() - began
    after, busy1 = _proc_table(), _busy_seconds()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def spent(root: int | None) -> float:
        # a process of the tree that exited during the run shows up again in its
        # parent's waited-for children's time, whole: take off what it had before
        gone = _tree(before, root) - set(after)
        alive = sum(after[p][1] - before.get(p, (0, 0.0))[1] for p in _tree(after, root))
        return alive - sum(before[p][1] for p in gone)

    wrk_s = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    per_process = (after[p][1] - before.get(p, (0, 0.0))[1] for p in _tree(after, server_pid))
    split = tuple(sorted((c for c in per_process if c >= 0.02 * wall), reverse=True))
    out.append(CpuUse(wall, spent(server_pid), spent(postmaster_pid), wrk_s, busy1 - busy0, split))


_SESSIONS = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"


def _measure(
    wrk: str,
    script: Path,
    server: Server,
    threads: int,
    connections: int,
    seconds: int,
    *,
    db: str,
    postmaster: int | None,
) -> tuple[WrkResult, CpuUse]:
    """One measured wrk run, with the CPU it cost and the PostgreSQL sessions it opened."""
    sessions0 = _count(db, _SESSIONS)
    out: list[CpuUse] = []
    with _cpu_meter(server.proc.pid, postmaster, out):
        result = _run_wrk(wrk, script, server.base, threads, connections, seconds)
    # the probe's own session ends before the second count: it is not the run's
    opened = max(0, _count(db, _SESSIONS) - sessions0 - 1)
    return result, replace(out[0], new_sessions=opened)
