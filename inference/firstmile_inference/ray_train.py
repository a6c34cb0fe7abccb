"""A tenant's path model trained as a Ray task on a Ray cluster (``FIRSTMILE_TRAINING_RAY_ADDRESS``).

:func:`train_on_ray` runs what :func:`firstmile_inference.tenant.train_logged` runs (fitting and the off-policy
report) as one Ray task (``num_cpus=1``, no retries) on the cluster at ``address``, and returns the same
:class:`~firstmile_inference.train.TrainedModel`; the caller registers it, as after an in-process run, so the
registry and the audit log stay where they are. What travels to the cluster is the training set as numpy arrays
and plain dicts (the nine features of each decision, the path taken, its propensity, the outcome, the eligible
paths: no user id, no database URL, no personal data) and the keyword arguments of ``train_logged``; what comes
back is the state dict (numpy arrays), the config, the metrics and the encoder's reference statistics.

The Ray driver is a child process (``python -m firstmile_inference.ray_train``), not the caller: ``ray.init`` is
process-wide state, a driver of an unreachable GCS address waits for minutes, and a child can be stopped. The
child probes the address (TCP, :data:`PROBE_TIMEOUT_S`), connects within :data:`CONNECT_TIMEOUT_S`, waits for the
task at most ``timeout_s`` (queueing for a free CPU included; a task past it is cancelled) and reports a failure
as one sentence naming the address. The caller gets :class:`RayTrainingError`; it never falls back to training
in process.

Addresses: ``ray://host:port`` (Ray Client, the head's client server: what a pod outside the Ray cluster uses,
``ray://<release>-inference-head-svc:10001`` in the Helm chart) or ``host:port`` (the GCS address, for a driver on
a node of the cluster, as the loopback cluster of ``deploy/local/ray.sh``). No credentials go in the address: a
cluster with token authentication reads its token from Ray's own ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` in the caller's environment, which the child inherits. The child sets
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray keeps loopback addresses on Linux) and turns usage stats off.

Same seed, same model: the task runs ``train_logged`` on one torch thread as the in-process run does, so with the
same torch and numpy builds on both sides the weights and the off-policy report are identical
(``tests/integration/test_tenant_training_ray.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from firstmile_inference.tenant import LoggedData
from firstmile_inference.train import Hyper, TrainedModel

__all__ = [
    "ADDRESS_PATTERN",
    "CONNECT_TIMEOUT_S",
    "RayTrainingError",
    "check_address",
    "train_on_ray",
]

ADDRESS_PATTERN: Final = r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}$"
"""``ray://host:port`` or ``host:port`` (an IPv6 host in brackets); no user, password, path or query."""
PROBE_TIMEOUT_S: Final = 5.0
"""How long the child waits for a TCP connection to the address before refusing (nothing listens)."""
CONNECT_TIMEOUT_S: Final = 60.0
"""How long the child waits for ``ray.init`` (Ray Client's own handshake gives up after about 30 s)."""
_EXIT_GRACE_S: Final = 30.0
"""Beyond the connect and task timeouts: the child's start (importing torch and ray) and its disconnect."""
_ENV: Final = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


class RayTrainingError(Exception):
    """Training on the Ray cluster did not produce a model; the message names the address and what happened."""


def check_address(address: str) -> str:
    """``address`` stripped, or :class:`ValueError` saying what an address looks like."""
    given = address.strip()
    if not re.match(ADDRESS_PATTERN, given):
        raise ValueError(
            f"{address!r} is not a Ray address: expected ray://host:port (Ray Client, e.g. "
            "ray://firstmile-inference-head-svc:10001) or host:port (the GCS, from a node of the cluster), with no "
            "credentials (a token goes in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        )
    port = int(given.rsplit(":", 1)[1])
    if not 0 < port < 65_536:
        raise ValueError(f"{address!r}: port {port} is out of range")
    return given


def _host_port(address: str) -> tuple[str, int]:
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- the caller's side


def _plain(data: LoggedData) -> dict[str, Any]:
    """The training set as numpy arrays and plain dicts (what is shipped)."""
    return {
        "features": [dict(f) for f in data.features],
        "actions": np.asarray(data.actions, dtype=np.int64),
        "rewards": np.asarray(data.rewards, dtype=np.float64),
        "propensities": np.asarray(data.propensities, dtype=np.float64),
        "eligible": np.asarray(data.eligible, dtype=np.bool_),
        "paths": list(data.paths),
    }


def train_on_ray(
    address: str,
    data: LoggedData,
    *,
    seed: int = 7,
    hyper: Hyper | None = None,
    timeout_s: float = 3600.0,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    **train_kwargs: Any,
) -> TrainedModel:
    """Train on the Ray cluster at ``address`` what ``train_logged(data, seed=seed, hyper=hyper, **train_kwargs)``
    trains in process; :class:`RayTrainingError` when the cluster is unreachable, the task fails, or it has not
    finished within ``timeout_s`` (waiting for a CPU included)."""
    import torch

    from firstmile_inference.tenant import TENANT_HYPER

    address = check_address(address)
    payload = {
        "address": address,
        "data": _plain(data),
        "seed": seed,
        "hyper": dataclasses.asdict(hyper or TENANT_HYPER),
        "kwargs": dict(train_kwargs),
        "timeout_s": float(timeout_s),
        "connect_timeout_s": float(connect_timeout_s),
    }
    with tempfile.TemporaryDirectory(prefix="firstmile-ray-train-") as tmp:
        given, answer = Path(tmp) / "in.pickle", Path(tmp) / "out.pickle"
        given.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        limit = connect_timeout_s + timeout_s + PROBE_TIMEOUT_S + _EXIT_GRACE_S
        try:
            child = subprocess.run(
                [sys.executable, "-m", "firstmile_inference.ray_train", str(given), str(answer)],
                env={**os.environ, **_ENV}, capture_output=True, text=True, timeout=limit, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise RayTrainingError(
                f"training on the Ray cluster at {address} did not finish within {limit:.0f} s (its driver was "
                "stopped); nothing was trained"
            ) from exc
        result: dict[str, Any] | None = pickle.loads(answer.read_bytes()) if answer.exists() else None
    if result is None or not result.get("ok"):
        reason = result["error"] if result else _last_lines(child.stderr) or f"its driver exited {child.returncode}"
        raise RayTrainingError(str(reason))
    trained = result["trained"]
    return TrainedModel(
        trained["name"],
        {k: torch.from_numpy(np.array(v)) for k, v in trained["state_dict"].items()},  # writable copies
        trained["config"],
        trained["metrics"],
        trained["reference"],
        trained["history"],
    )


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


# ---------------------------------------------------------------- the Ray task (on a worker of the cluster)


def fit_task(data: Mapping[str, Any], seed: int, hyper: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What the Ray task runs: ``train_logged`` on one thread; the result as numpy arrays and plain dicts."""
    from firstmile_inference.tenant import train_logged

    logged = LoggedData(
        features=data["features"],
        actions=data["actions"],
        rewards=data["rewards"],
        propensities=data["propensities"],
        eligible=data["eligible"],
        paths=tuple(data["paths"]),
    )
    params = dict(hyper)
    params["hidden"] = tuple(params["hidden"])
    trained = train_logged(logged, seed=seed, hyper=Hyper(**params), threads=1, **kwargs)
    return {
        "name": trained.name,
        "state_dict": {k: v.detach().cpu().numpy() for k, v in trained.state_dict.items()},
        "config": trained.config,
        "metrics": trained.metrics,
        "reference": trained.reference,
        "history": trained.history,
        "node": socket.gethostname(),
    }


# ---------------------------------------------------------------- the driver (the child process)


def _connect(address: str, timeout_s: float) -> None:
    """``ray.init`` bounded by ``timeout_s`` (a GCS address that does not answer would keep it for minutes)."""
    import ray

    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayTrainingError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); nothing was trained. Start it, "
            "fix FIRSTMILE_TRAINING_RAY_ADDRESS (or --ray), or train in process (--in-process)"
        ) from exc
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
        except BaseException as exc:  # reported to the waiting thread
            failure.append(exc)

    thread = threading.Thread(target=init, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayTrainingError(
            f"the Ray cluster at {address} did not accept a driver within {timeout_s:.0f} s (is it a Ray "
            "GCS or client server, with the same Ray version?); nothing was trained"
        )
    if failure:
        raise RayTrainingError(
            f"cannot connect to the Ray cluster at {address}: {_one_line(failure[0])}; nothing was trained"
        )


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _drive(payload: Mapping[str, Any]) -> dict[str, Any]:
    import ray
    from ray.exceptions import GetTimeoutError

    from firstmile_inference.ray_train import fit_task  # by reference: the workers import it (not __main__'s copy)

    address = str(payload["address"])
    _connect(address, float(payload["connect_timeout_s"]))
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fit_task)
        ref = task.remote(payload["data"], payload["seed"], payload["hyper"], payload["kwargs"])
        timeout_s = float(payload["timeout_s"])
        try:
            trained: dict[str, Any] = ray.get(ref, timeout=timeout_s)
        except GetTimeoutError as exc:
            ray.cancel(ref, force=True)
            raise RayTrainingError(
                f"the training task on the Ray cluster at {address} did not finish within {timeout_s:.0f} s "
                "(FIRSTMILE_TRAINING_RAY_TIMEOUT_SECONDS; waiting for a free CPU counts) and was cancelled; "
                "nothing was trained"
            ) from exc
        except Exception as exc:  # a task error, a worker or node lost
            raise RayTrainingError(
                f"the training task failed on the Ray cluster at {address}: {_one_line(exc)}; nothing was trained"
            ) from exc
    finally:
        with contextlib.suppress(Exception):  # the child ends anyway
            ray.shutdown()
    return trained


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m firstmile_inference.ray_train",
        description="Train a tenant's path model as a Ray task (the driver that train_on_ray starts).",
    )
    parser.add_argument("input", type=Path, help="the pickled request train_on_ray wrote")
    parser.add_argument("output", type=Path, help="where to write the pickled answer")
    args = parser.parse_args(argv)
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    payload = pickle.loads(args.input.read_bytes())
    began = time.perf_counter()
    try:
        answer: dict[str, Any] = {"ok": True, "trained": _drive(payload)}
    except RayTrainingError as exc:
        answer = {"ok": False, "error": str(exc)}
    except Exception as exc:  # anything else is reported, naming the address
        answer = {
            "ok": False,
            "error": f"training on the Ray cluster at {payload['address']} failed: {_one_line(exc)}; nothing was "
            "trained",
        }
    answer["seconds"] = time.perf_counter() - began
    args.output.write_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()
    # os._exit: a ray.init still waiting in its thread (a cluster that never answered) must not hold the exit
    os._exit(0)


if __name__ == "__main__":
    main()
