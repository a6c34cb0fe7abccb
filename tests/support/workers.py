"""Worker processes for the tests: `firstmile scheduler`, `relay`, … started as Kubernetes runs them, with a
probe port (the ``start_worker`` fixture of ``tests/conftest.py``)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import pytest


class _Database(Protocol):
    @property
    def app_url(self) -> str: ...

    @property
    def admin_url(self) -> str: ...


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(path: Path) -> str:
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32), encoding="ascii")
    return str(path)


@dataclass
class Worker:
    process: subprocess.Popen[str]
    base: str
    log: Path
    handle: IO[str]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_for(self, path: str, status: int, within: float = 60.0) -> str:
        deadline = time.monotonic() + within
        last: tuple[int, str] | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                last = self.get(path)
                if last[0] == status:
                    return last[1]
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        pytest.fail(f"{path} never answered {status} (last: {last}):\n{self.log.read_text()[-3000:]}")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as Kubernetes stops a pod; the exit status and what the process wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.handle.flush()
                pytest.fail(f"the worker did not stop within 30 s of SIGTERM:\n{self.log.read_text()[-6000:]}")
        self.handle.close()
        return self.process.returncode, self.log.read_text()


def workers(tmp_path: Path, pepper: bytes, region: str) -> Iterator[object]:
    """What the ``start_worker`` fixture yields: ``start(command, database, **env)`` gives a :class:`Worker`;
    whatever is still running at the end is killed."""
    started: list[Worker] = []

    def start(command: list[str], database: _Database, **extra: str) -> Worker:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_") or k.startswith("FIRSTMILE_TEST")}
        env |= {
            "FIRSTMILE_DATABASE_URL": database.app_url,
            "FIRSTMILE_DATABASE_ADMIN_URL": database.admin_url,
            "FIRSTMILE_API_KEY_PEPPER": pepper.decode(),
            "FIRSTMILE_REGION": region,
            "FIRSTMILE_DATA_DIR": str(tmp_path / "data"),
            "FIRSTMILE_AUDIT_SIGNING_KEY_FILE": _key(tmp_path / "audit_signing_key"),
            "FIRSTMILE_KEK_FILE": _key(tmp_path / "kek"),
            "FIRSTMILE_MODEL_REGISTRY_URI": str(tmp_path / "no-models"),
            "FIRSTMILE_PROBE_HOST": "127.0.0.1",
            "FIRSTMILE_PROBE_PORT": str(port),
            "FIRSTMILE_LOG_LEVEL": "INFO",
        }
        env |= extra
        log = tmp_path / f"{command[0]}-{len(started)}.log"
        handle = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "firstmile.cli", *command],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker = Worker(process, f"http://127.0.0.1:{port}", log, handle)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        worker.handle.close()
