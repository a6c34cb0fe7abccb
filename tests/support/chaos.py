"""The chaos test's own services and processes (``tests/integration/test_chaos.py``).

The chaos test kills its dependencies with SIGKILL, so it never touches the suite's shared ``test``
instances: it starts a PostgreSQL cluster (``initdb`` and ``pg_ctl`` in a temporary folder), a Redis
server, a single-node KRaft Kafka broker (from the jars ``deploy/local/kafka.sh`` fetched) and a Ray
node (``deploy/local/ray.sh`` with an instance name and ports of its own), and runs the platform as
the processes a deployment runs (``firstmile serve``, ``relay``, ``consume``).

Everything listens on 127.0.0.1, on ports above Linux's ephemeral range (32768-60999 by default), so
that no client socket of a busy machine can take a killed service's port before it comes back on it.
Each class can :meth:`kill` its service the way a crash or the OOM killer does (SIGKILL to every
process of it, nothing flushed or closed) and :meth:`start` it again on the same files and port;
:meth:`stop` ends it for good and never raises, so a test can always clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

from tests.factories import ROOT

FIRSTMILE = Path(sys.executable).with_name("firstmile")
RAY_SH = ROOT / "deploy" / "local" / "ray.sh"
KAFKA_DIR = ROOT / "deploy" / "local" / "kafka"
KAFKA_LIBS = ROOT / ".firstmile" / "services" / "kafka-libs"

PORT_LOW, PORT_HIGH = 61000, 64000
"""Where the chaos test's ports come from: above the ephemeral range, below the Ray test instance's blocks
(deploy/local/ray.sh: 64100 and 64300)."""

_given: set[int] = set()


class ServiceError(RuntimeError):
    """A service of the chaos test did not start or stop as it should."""


# ---------------------------------------------------------------------------------------- ports


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, contiguous: bool = False) -> list[int]:
    """``count`` loopback ports nobody listens on (one block of them with ``contiguous``)."""
    rng = random.SystemRandom()
    for _ in range(500):
        if contiguous:
            base = rng.randrange(PORT_LOW, PORT_HIGH - count)
            ports = list(range(base, base + count))
        else:
            ports = rng.sample(range(PORT_LOW, PORT_HIGH), count)
        if not _given.intersection(ports) and all(_bindable(p) for p in ports):
            _given.update(ports)
            return ports
    raise ServiceError(f"no {count} free ports in {PORT_LOW}-{PORT_HIGH}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(what: str, check: Callable[[], bool], timeout: float, *, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ServiceError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


# ------------------------------------------------------------------------------------ processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _kill_all(pids: Sequence[int], what: str, timeout: float = 15) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(f"{what} to die", lambda: not any(_alive(p) for p in pids), timeout, every=0.05)


def processes_in(folder: Path) -> list[int]:
    """The processes whose working directory is ``folder`` (a PostgreSQL cluster's are its data folder)."""
    found = []
    target = str(folder.resolve())
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd") == target:
                    found.append(int(entry.name))
    return found


class Spawned:
    """A command in a process session of its own, its output appended to ``log``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            raise ServiceError(f"{self.name} is already running")
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole process session: the process and anything it started."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(15)

    def stop(self, grace: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self._signal_group(signal.SIGKILL)  # whatever of the session is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


# ----------------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise ServiceError("PostgreSQL is not installed (deploy/local/postgres.sh start test installs it)")
    return found[-1].parent


class PostgresCluster:
    """A cluster of its own: ``initdb`` once, ``pg_ctl start``; killed, it recovers from its WAL at the next start.

    PostgreSQL's durable defaults (fsync, synchronous commit), unlike the suite's ``test`` cluster: a
    write acknowledged before the kill must be there after it.
    """

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = port
        self.bin = _pg_bin()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.as_pg, *argv], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ServiceError(f"{argv[0]} exited {done.returncode}: {done.stdout}{done.stderr}")

    def init(self) -> None:
        """``initdb``, once."""
        if (self.data / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_pg:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C.UTF-8",
        )  # fmt: skip

    def hold_in_recovery(self) -> None:
        """From the next start on, stay in recovery and refuse every connection, as a cluster starting up does.

        A standby with no primary to follow and hot standby off never leaves recovery, and answers each
        connection with SQLSTATE 57P03 (cannot_connect_now), the error a restarting cluster gives while it
        replays its WAL.
        """
        self.init()
        (self.data / "standby.signal").touch()
        with (self.data / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            conf.write("hot_standby = off\n")
        if self.as_pg:
            shutil.chown(self.data / "standby.signal", "postgres", "postgres")

    def start(self) -> None:
        self.init()
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"),
            "-w", "-t", "90", "start",
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend at once, as when the host's OOM killer takes the container."""
        pids = processes_in(self.data)
        if not pids:
            raise ServiceError("no PostgreSQL process to kill")
        _kill_all(pids, "PostgreSQL")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", timeout=30)
        with contextlib.suppress(Exception):
            _kill_all(processes_in(self.data), "PostgreSQL")


# ---------------------------------------------------------------------------------------- Redis


class RedisServer:
    """A redis-server of its own, in memory only (as the suite's: nothing survives a kill)."""

    def __init__(self, folder: Path, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
        self.process = Spawned("redis", argv, dict(os.environ), folder / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            try:
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

    def start(self) -> None:
        self.process.start()
        wait_until("redis answering PING", self._pong, 30)

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(grace=5)


# ---------------------------------------------------------------------------------------- Kafka


class KafkaBroker:
    """A single-node KRaft broker (combined broker and controller) from ``deploy/local/kafka``'s config."""

    def __init__(self, folder: Path, ports: Sequence[int]) -> None:
        if not (KAFKA_LIBS / ".complete").exists():
            raise ServiceError(f"no Kafka jars in {KAFKA_LIBS}: run deploy/local/kafka.sh start test once")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port, controller, sasl = ports
        template = (KAFKA_DIR / "server.properties.in").read_text(encoding="utf-8")
        for marker, value in (
            ("@PORT@", self.port),
            ("@CONTROLLER_PORT@", controller),
            ("@SASL_PORT@", sasl),
            ("@DATA@", folder / "data"),
        ):
            template = template.replace(marker, str(value))
        # Killed, the broker is registered with the (combined) controller until its session times out, and the
        # restarted one is fenced until then: 2 s instead of 9 s (a restart took 12.6 s here, 4.6 s with this).
        template += "\nbroker.session.timeout.ms=2000\nbroker.heartbeat.interval.ms=500\n"
        self.properties = folder / "server.properties"
        self.properties.write_text(template, encoding="utf-8")
        java = ["java", "-cp", f"{KAFKA_LIBS}/*", f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.yaml'}"]
        self.java = [*java, f"-Dkafka.logs.dir={folder / 'logs'}"]
        argv = [self.java[0], "-Xms128m", "-Xmx384m", "-XX:+UseG1GC", "-Djava.awt.headless=true", *self.java[1:]]
        self.process = Spawned(
            "kafka", [*argv, "kafka.Kafka", str(self.properties)], dict(os.environ), folder / "out.log"
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        from confluent_kafka.admin import AdminClient

        if not port_open(self.port):
            return False
        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
        except Exception:  # not up yet, whatever librdkafka says
            return False
        return True

    def start(self) -> None:
        if not (self.folder / "data" / "meta.properties").exists():
            cluster = uuid.uuid4().hex[:22]
            done = subprocess.run(
                [*self.java, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(self.properties)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise ServiceError(f"kafka storage format exited {done.returncode}: {done.stdout}{done.stderr}")
        self.process.start()
        try:
            wait_until("the Kafka broker answering", self._answers, 90, every=0.5)
        except ServiceError as exc:
            raise ServiceError(f"{exc}\n{self.process.tail()}") from exc

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(grace=10)


# ------------------------------------------------------------------------------------ Ray Serve


class RayServe:
    """A Ray node of its own (``deploy/local/ray.sh`` with this instance's name and ports) serving ``models``.

    :meth:`kill` SIGKILLs the model's Serve replica, the process that runs the model and answers its HTTP;
    Serve's controller restarts it (as it does in a cluster), :meth:`recovered` says when it predicts again.
    """

    def __init__(self, name: str, registry: Path, models: Sequence[str] = ("path_classifier",)) -> None:
        # short (ray.sh allows 7 characters: HAProxy's socket paths) and apart for each run and worker
        self.name = "c" + hashlib.sha256(name.encode()).hexdigest()[:6]
        block = free_ports(170, contiguous=True)  # GCS and the node's ports (100), HTTP and the ingresses (70)
        self.gcs, self.http = block[0], block[100]
        self.registry = registry
        self.models = list(models)
        self.env = {**os.environ, "FIRSTMILE_RAY_PORT": str(self.gcs), "FIRSTMILE_RAY_SERVE_PORT": str(self.http)}
        self.env.pop("FIRSTMILE_RAY_INGRESS", None)
        # Serve gives a starting proxy 3 readiness checks of 5 s, then kills it; on a busy 2-core machine its
        # actor takes longer than that to import, and the deploy failed (the controller reads this at start).
        self.env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
        self.folder = ROOT / ".firstmile" / "services" / f"ray-{self.name}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def _ray(self, *args: str, timeout: float = 300) -> None:
        done = subprocess.run(
            ["bash", str(RAY_SH), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise ServiceError(f"ray.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")

    def _start(self, before_deploy: Callable[[], object]) -> None:
        try:
            self._ray("start", self.name)
        except ServiceError as failed:
            # On a busy 2-core machine the raylet or the GCS can miss Ray's own startup deadline ("timed out
            # during startup"; ray.sh has stopped what began): once more, as an operator would.
            if "timed out during startup" not in str(failed):
                raise
            self._ray("start", self.name)
        before_deploy()
        args = [f"models={','.join(self.models)}", "min_replicas=1", "max_replicas=1", "health_check_period_s=2"]
        self._ray("deploy", self.name, f"file://{self.registry}", *args)

    def replica_pids(self, model: str) -> list[int]:
        session = (self.folder / "session.id").read_text(encoding="ascii").strip()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) != int(session):
                    continue
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title.startswith(f"ray::ServeReplica:{model}:"):
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        pids = [pid for model in self.models for pid in self.replica_pids(model)]
        if not pids:
            raise ServiceError("no Serve replica to kill")
        _kill_all(pids, "the Serve replicas")

    def predicts(self, model: str = "path_classifier", timeout: float = 2) -> bool:
        try:
            response = httpx.post(
                f"{self.url}/v1/models/{model}/predict",
                json={"instances": [{"traits": {"persona": "developer"}}]},
                timeout=timeout,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def start(self, before_deploy: Callable[[], object] = lambda: None) -> None:
        """Start the node, call ``before_deploy`` (the registry must be ready by its end) and deploy; once more
        from scratch if that failed (on a busy machine Serve may give up on its proxy while it starts)."""
        try:
            self._start(before_deploy)
        except ServiceError as first:
            self.stop()
            try:
                self._start(before_deploy)
            except ServiceError as second:
                raise ServiceError(f"{first}\n\nand again:\n{second}") from second

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._ray("stop", self.name, timeout=60)

    def forget(self) -> None:
        """Remove ray.sh's state of this instance and Ray's temporary folder, logs included."""
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(f"/tmp/fm-ray-{self.name}", ignore_errors=True)


# --------------------------------------------------------------------------------------- helpers


class Stack:
    """What the test started, stopped in reverse order at the end whatever happened."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []

    def started(self, stop: Callable[[], None]) -> None:
        self._stops.append(stop)

    def close(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            with contextlib.suppress(Exception):
                stop()


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


def secret_file(path: Path) -> str:
    """32 random bytes, hex, mode 0600: a key file a process with an external database needs provisioned."""
    path.touch(mode=0o600)
    path.write_text(os.urandom(32).hex(), encoding="ascii")
    return str(path)
