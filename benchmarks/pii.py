"""Redaction throughput on ~1 KB JSON log lines, against a one-regex baseline.

``bench_redaction()`` returns a markdown snippet for ``docs/benchmarks.md``.
The baseline is a single precompiled email regex substitution over the same
lines: the least any redactor must do. Run it with ``python -m benchmarks pii``.
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
import re
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from firstmile.security.pii import KnownPii, Redactor

_EMAIL_ONLY = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_WORDS = [
    "user",
    "completed",
    "the",
    "import",
    "wizard",
    "after",
    "several",
    "attempts",
    "retry",
    "budget",
    "next",
    "poll",
    "source",
    "connected",
    "workspace",
    "invited",
    "teammate",
    "dashboard",
    "opened",
    "checklist",
    "step",
    "skipped",
    "template",
    "applied",
    "sync",
    "finished",
]
_PII = (
    "contact jane.doe@example.com",
    "phone +1 (415) 555-2671",
    "card 4111 1111 1111 1111",
    "iban GB82 WEST 1234 5698 7654 32",
    "from 203.0.113.77",
    "ssn 123-45-6789",
    "Jane Doe at Initech",
)


def _line(rng: random.Random, with_pii: bool) -> str:
    entry: dict[str, object] = {
        "ts": f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T1{rng.randint(0, 9)}:{rng.randint(10, 59)}:"
        f"{rng.randint(10, 59)}.{rng.randint(100, 999)}Z",
        "level": "info",
        "logger": "firstmile.access",
        "msg": "request",
        "request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "tenant": "acme",
        "trace_id": f"{rng.getrandbits(128):032x}",
        "method": "POST",
        "route": "/v1/users/{user_id}/steps/{step_id}",
        "status": 201,
        "duration_ms": round(rng.uniform(1, 90), 2),
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0",
        "bytes": rng.randint(200, 9000),
        "remote": f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "path": "default-v3",
    }
    note = [rng.choice(_WORDS) for _ in range(40)]
    if with_pii:
        note.insert(rng.randint(0, len(note)), rng.choice(_PII))
    entry["note"] = " ".join(note)
    text = json.dumps(entry)
    return text[:1024] if len(text) > 1024 else text + " " * (1024 - len(text))


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _per_line_seconds(lines: list[str], fn: Callable[[str], object], repeats: int) -> list[float]:
    """Best-of-``repeats`` time for each line."""
    best = [float("inf")] * len(lines)
    for _ in range(repeats):
        for index, line in enumerate(lines):
            start = time.perf_counter()
            fn(line)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def bench_redaction(n_lines: int = 1000, repeats: int = 3, seed: int = 7) -> str:
    """Lines per second for full redaction vs. an email-regex-only pass (markdown)."""
    rng = random.Random(seed)
    clean = [_line(rng, with_pii=False) for _ in range(n_lines)]
    mixed = [_line(rng, with_pii=rng.random() < 0.2) for _ in range(n_lines)]
    redactor = Redactor()
    known = KnownPii(name="Jane Doe", company="Initech Inc.")
    for line in mixed[:50]:  # warm caches (regex, phonenumbers metadata)
        redactor.redact(line, known)

    def baseline(line: str) -> object:
        return _EMAIL_ONLY.sub("[EMAIL]", line)

    cases: list[tuple[str, list[str], Callable[[str], object]]] = [
        ("baseline: one email regex `sub`", clean, baseline),
        ("full redaction, lines without PII", clean, redactor.redact),
        ("full redaction, 20% of lines with PII", mixed, redactor.redact),
        ("…plus known name and company", mixed, lambda line: redactor.redact(line, known)),
    ]
    rows: list[tuple[str, float, float, float]] = []
    for label, lines, fn in cases:
        times = _per_line_seconds(lines, fn, repeats)
        total = sum(times)
        p99 = statistics.quantiles(times, n=100)[98]
        rows.append((label, len(lines) / total, total / len(lines), p99))
    base_rate = rows[0][1]
    out = [
        f"PII redaction of ~1 KB JSON log lines ({n_lines} lines, best of {repeats} per line; "
        f"Python {platform.python_version()}, {_cpu()}, one thread).",
        "",
        "| Pass | lines/s | mean µs/line | p99 µs/line | vs. baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    out.extend(
        f"| {label} | {rate:,.0f} | {mean * 1e6:.1f} | {p99 * 1e6:.1f} | {base_rate / rate:.1f}x slower |"
        if index
        else f"| {label} | {rate:,.0f} | {mean * 1e6:.1f} | {p99 * 1e6:.1f} | 1.0x |"
        for index, (label, rate, mean, p99) in enumerate(rows)
    )
    return "\n".join(out) + "\n"
