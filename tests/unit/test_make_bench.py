"""`make bench-security` runs three benchmarks; a failure of any of them fails the target.

It used to run them joined with ``;`` and keep only the last one's exit status, so a crypto or audit
benchmark that failed went unnoticed. The target is run here with stand-ins for the interpreter and
the PostgreSQL script, so it takes a second and starts nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.factories import ROOT


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("failing", ["crypto", "audit", "pii", ""])
def test_bench_security_fails_when_any_benchmark_fails(tmp_path: Path, failing: str) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed to run the Makefile")
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir / "python",
        f'echo "python $*" >> {log}\n[ -n "{failing}" ] && [ "$3" = "{failing}" ] && exit 3\nexit 0\n',
    )
    pg = _stub(tmp_path / "pg.sh", f'echo "pg $*" >> {log}\n[ "$1" = url ] && echo postgresql://stub\nexit 0\n')
    stamp = tmp_path / "installed"
    stamp.touch()
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "bench-security", f"BIN={bin_dir}", f"PG={pg}", f"STAMP={stamp}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    calls = log.read_text(encoding="utf-8").splitlines()
    assert [c for c in calls if c.startswith("python")] == [
        "python -m benchmarks crypto",
        "python -m benchmarks audit",
        "python -m benchmarks pii",
    ]  # every benchmark ran, whichever failed
    assert calls[-1] == "pg stop bench"  # and the bench PostgreSQL was stopped
    assert (result.returncode != 0) == bool(failing), result.stderr
