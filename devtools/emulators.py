"""Local Firestore and Cloud Storage emulators for the tests.

Each emulator runs as a real process in a session (process group) of its own, on a free port on 127.0.0.1,
with its output appended to a log file in a temp folder. `stop()` ends the whole group (SIGTERM, then SIGKILL
after a grace period) and waits until the port is free, so no Java process is left listening and `start()`
can bind the same port again (tests use this to simulate an outage).

Firestore: the Cloud Firestore emulator that ships with the gcloud SDK (`cloud_firestore_emulator`, Java 17+),
else `gcloud emulators firestore start`, else the Firebase CLI; none of them → `EmulatorUnavailable`.
Storage: the PyPI `gcp-storage-emulator`, which google-cloud-storage talks to through `STORAGE_EMULATOR_HOST`
(or an explicit `api_endpoint`). It keeps its data on disk by default, so buckets and objects survive a
restart.

With `FIREGEN_EMULATORS=docker` (or `auto` where a local Firestore emulator is missing and `docker info`
answers), the repo's docker-compose.yml runs both instead, through pytest-docker; see `DockerCompose`.

Nothing here sets process-wide environment variables: fixtures use monkeypatch, subprocesses get
`emulator_env(...)`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

HOST = "127.0.0.1"
START_TIMEOUT_S = float(os.environ.get("EMULATOR_START_TIMEOUT", "60"))
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 40

# Every emulator started in this process, so logs can be shown on failure and nothing outlives the run.
STARTED: list[Emulator] = []
_started_lock = threading.Lock()


class EmulatorUnavailable(Exception):
    """No way to run this emulator on this machine (tests skip with this reason)."""


class EmulatorError(RuntimeError):
    """The emulator failed to start or to stop; the message carries its log's path and tail."""


# ---------------------------------------------------------------------------------------------- helpers
_HANDED_OUT: set[int] = set()


# "LOW-HIGH": the ports free_port picks from (HIGH excluded), inherited by subprocesses. Parallel test processes
# each set a slice of their own (`use_port_slice`): a port one picked as free could be bound by another meanwhile.
FREE_PORTS_ENV = "FIREGEN_FREE_PORTS"


def free_port(host: str = HOST) -> int:
    """A port free now, below the range the kernel takes outgoing connections' ports from (one picked from that
    range was taken by such a connection before its server bound it: seen once in CI), within FIREGEN_FREE_PORTS
    when set, and never the same twice in a process."""
    low, high = _port_range()
    for _ in range(200 if high > low + 1 else 0):
        port = random.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hold_ports(ports: Iterable[int | None]) -> None:
    """Never pick these ports as free in this process: ports given to it (by the command line of a process that
    picked them) and not bound yet (seen: a stack run by a test picked its CLI's websocket port among the ports
    the test had given it, and the CLI refused to start, "port taken")."""
    _HANDED_OUT.update(port for port in ports if port)


def _port_range() -> tuple[int, int]:
    low, high = 10_000, _ephemeral_low()
    try:
        first, last = (int(part) for part in os.environ.get(FREE_PORTS_ENV, "").split("-"))
    except ValueError:  # unset or not LOW-HIGH
        return low, high
    return max(first, 1024), min(last, high)


def use_port_slice(index: int, count: int) -> None:
    """Pick free ports, here and in every subprocess started from now on, from the `index`th of `count` equal
    slices of the usual range (one per parallel test process)."""
    low, high = 10_000, _ephemeral_low()
    size = (high - low) // count
    os.environ[FREE_PORTS_ENV] = f"{low + index * size}-{low + (index + 1) * size}"


def _ephemeral_low() -> int:
    """The lowest port of the kernel's range for outgoing connections (Linux's default where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def close_firestore(client) -> None:
    """Close a google.cloud.firestore.Client's gRPC channel as well as its HTTP session (all its own close() ends): a
    channel left to the garbage collector is closed in whichever thread happens to collect it, maybe in the middle
    of that thread's own gRPC call (a test process once died of a segfault in gRPC)."""
    api = client._firestore_api_internal  # None until the client's first call
    if api is not None:
        api.transport.close()
    client.close()


@contextlib.contextmanager
def closing_firestore(client):
    """`client`, closed as `close_firestore` closes it when the block ends."""
    try:
        yield client
    finally:
        close_firestore(client)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is truthy or `timeout` seconds pass; returns whether it became truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def http_status(url: str, method: str = "GET", timeout: float = 1.0, headers: dict | None = None) -> int | None:
    """The HTTP status of a request, or None when nothing answered."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# The harness's own lines in a process's log are JSON, as the worker's are, so a reader of JSON lines (jq, a log
# shipper) takes the whole file; the start line marks where the latest start's output begins.
START_MARK = '{"event": "harness_process_started"'


def _mark(event: str, **fields: object) -> bytes:
    at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    line = {
        "event": event,
        **fields,
        "severity": "INFO",
        "message": event,
        "timestamp": at,
        "logger": "devtools.harness",
    }
    return (json.dumps(line) + "\n").encode()


def _line_start(path: Path) -> bytes:
    """What to write before a line appended to `path` so that it starts a line: a newline after an unended one."""
    try:
        with open(path, "rb") as log:
            log.seek(-1, os.SEEK_END)
            return b"" if log.read(1) == b"\n" else b"\n"
    except OSError:  # empty, or none yet
        return b""


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The end of what the process's latest start wrote: a log is appended to across starts (and runs), and an
    earlier start's lines would read as this one's."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    latest = text.rfind("\n" + START_MARK)
    return "\n".join(text[latest + 1 if latest >= 0 else 0 :].splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- base class
# The emulators are JVMs that do little work each: HotSpot's optimising compiler (C2) and G1's concurrent threads
# cost them more CPU than they save (a Firestore emulator's start and 1,500 writes: 17 s of CPU, 10 s with these),
# and on a machine of two cores a test run's CPU is its time. Put before the user's own JDK_JAVA_OPTIONS (the
# `java` launcher's variable), which win where they say otherwise; a collector of the user's (there or in
# JAVA_TOOL_OPTIONS) is the only one: the JVM refuses to start with two.
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
_COLLECTOR = re.compile(r"-XX:\+Use\w*GC\b")


def jvm_options(env: dict[str, str]) -> list[str]:
    """JVM_OPTIONS, but a collector where `env`'s JAVA_TOOL_OPTIONS or JDK_JAVA_OPTIONS choose one."""
    chosen = _COLLECTOR.search(f"{env.get('JAVA_TOOL_OPTIONS', '')} {env.get('JDK_JAVA_OPTIONS', '')}")
    return [option for option in JVM_OPTIONS if not (chosen and _COLLECTOR.fullmatch(option))]


def with_jvm_options(env: dict[str, str]) -> dict[str, str]:
    users = env.get("JDK_JAVA_OPTIONS", "")
    return {**env, "JDK_JAVA_OPTIONS": " ".join([*jvm_options(env), users]).strip()}


class Emulator:
    """A restartable emulator on a fixed host:port. Subclasses say how to start it and when it is ready."""

    name = "emulator"
    health_path = "/"
    jvm = False  # a Java program, or one that starts Java: it runs with JVM_OPTIONS

    def __init__(self, log_dir: Path, port: int | None = None, host: str = HOST):
        self.host = host
        self.port = port or free_port(host)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"
        self.starts = 0
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()

    # what subclasses provide
    def command(self) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str]:
        return dict(os.environ)

    def cwd(self) -> Path | None:
        return None

    def is_ready(self) -> bool:
        return http_status(self.url + self.health_path, timeout=0.5) == 200

    # the common part
    @property
    def host_port(self) -> str:
        """`127.0.0.1:PORT`, the form FIRESTORE_EMULATOR_HOST takes."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How its process ended without stop() (negative: the signal that ended it); None while it runs or once
        stopped."""
        return self._proc.poll() if self._proc else None

    def start(self) -> Emulator:
        with self._lock:
            if self.running:
                return self
            if port_open(self.host, self.port):
                raise EmulatorError(f"{self.name}: port {self.port} is already taken by another process")
            cmd = self.command()
            self.starts += 1
            t0 = time.monotonic()
            with open(self.log_path, "ab") as log:
                # On a line of its own (a killed process may have left one unended), and no blank line: JSON lines.
                log.write(
                    _line_start(self.log_path)
                    + _mark("harness_process_started", start=self.starts, command=" ".join(cmd))
                )
                log.flush()
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=with_jvm_options(self.process_env()) if self.jvm else self.process_env(),
                    cwd=self.cwd(),
                    start_new_session=True,  # its own process group: stop() ends the Java child too
                )
            with _started_lock:
                if self not in STARTED:
                    STARTED.append(self)
            proc = self._proc
            limit = self.start_timeout()
            if not wait_until(lambda: proc.poll() is not None or self.is_ready(), limit, 0.05) or (
                proc.poll() is not None
            ):
                code = proc.poll()
                self.stop()
                why = f"exited with code {code}" if code is not None else f"not ready after {limit:.0f}s"
                raise EmulatorError(
                    f"{self.name} on {self.host_port} {why}; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            self.last_start_seconds = time.monotonic() - t0
            return self

    def start_timeout(self) -> float:
        """How long a start may take to be ready (EMULATOR_START_TIMEOUT)."""
        return START_TIMEOUT_S

    def ensure_running(self) -> Emulator:
        """Start it if a test left it stopped (or its process died, or it stopped answering)."""
        if self.running and wait_until(self.is_ready, 10.0, 0.1):
            return self
        self.stop()
        return self.start()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """End the whole process group and wait until the port is free. Safe to call when stopped."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            self._before_terminate(proc)
            for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                if not self._group_alive(proc, pgid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
                wait_until(lambda: not self._group_alive(proc, pgid), wait_s, 0.02)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
            if self._group_alive(proc, pgid):
                raise EmulatorError(f"{self.name}: process group {pgid} survived SIGKILL; log {self.log_path}")
            if not wait_until(lambda: not port_open(self.host, self.port), 10.0, 0.02):
                raise EmulatorError(
                    f"{self.name}: port {self.port} still accepts connections after stop (a child outside the "
                    f"process group?); log {self.log_path}"
                )
            with open(self.log_path, "ab") as log:
                log.write(_mark("harness_process_stopped", start=self.starts, exit_code=proc.returncode))

    def _group_alive(self, proc: subprocess.Popen, pgid: int) -> bool:
        proc.poll()
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _before_terminate(self, proc: subprocess.Popen) -> None:
        """Hook: a polite first signal for launchers that shut their own children down (Firebase CLI)."""

    def restart(self) -> Emulator:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host_port} {state} log={self.log_path}>"


# ---------------------------------------------------------------------------------------------- Firestore
@functools.cache
def gcloud_sdk_root() -> str | None:
    return _setup_script().gcloud_sdk_root()


@functools.cache
def firestore_backend() -> tuple[str, str]:
    """("binary" | "gcloud" | "firebase", path), the first way to run the Firestore emulator found here."""
    java = os.environ.get("JAVA") or shutil.which("java")
    root = gcloud_sdk_root()
    if root:
        binary = Path(root) / "platform" / "cloud-firestore-emulator" / "cloud_firestore_emulator"
        if binary.is_file() and java:
            return "binary", str(binary)
    if root and java:
        return "gcloud", shutil.which("gcloud") or "gcloud"
    firebase = shutil.which("firebase")
    if firebase:
        return "firebase", firebase
    setup = _setup_script()
    if setup.FIREBASE.exists() and (setup.JDK / "bin" / "java").exists() and setup.cli_firestore_jar():
        # `make test` set up the Firebase CLI and it downloaded its Firestore emulator (no gcloud component)
        return "firebase", str(setup.FIREBASE)
    raise EmulatorUnavailable(
        "no Firestore emulator here: need the gcloud SDK's cloud-firestore-emulator component with Java, "
        "or the Firebase CLI (`firebase`) on PATH"
    )


@functools.cache
def _setup_script():
    """scripts/setup_firebase_cli.py (standard library only; scripts/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "setup_firebase_cli.py"
    spec = importlib.util.spec_from_file_location("setup_firebase_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FirestoreEmulator(Emulator):
    """The Cloud Firestore emulator. `rules`: a firestore.rules file the emulator enforces (None: no rules,
    i.e. every request is allowed)."""

    name = "firestore"
    jvm = True

    def __init__(self, log_dir: Path, port: int | None = None, host: str = HOST, rules: str | Path | None = None):
        self.rules = Path(rules).resolve() if rules else None
        if self.rules and not self.rules.is_file():
            raise FileNotFoundError(f"rules file {self.rules} does not exist")
        self.backend, self.executable = firestore_backend()
        super().__init__(log_dir, port, host)
        if self.rules:
            self.log_path = self.log_dir / f"{self.name}-rules-{self.port}.log"
        self._workdir = self.log_dir / f"{self.name}-{self.port}.d"

    def command(self) -> list[str]:
        rules = [f"--rules={self.rules}"] if self.rules else []
        if self.backend == "binary":
            return [self.executable, "start", f"--host={self.host}", f"--port={self.port}", *rules]
        if self.backend == "gcloud":
            return [self.executable, "emulators", "firestore", "start", f"--host-port={self.host_port}", *rules]
        # Firebase CLI: a firebase.json of our own in a work folder.
        self._workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "emulators": {
                "firestore": {"host": self.host, "port": self.port},
                "hub": {"host": self.host, "port": free_port(self.host)},
                "logging": {"host": self.host, "port": free_port(self.host)},
                "ui": {"enabled": False},
                "singleProjectMode": False,
            },
        }
        if self.rules:
            config["firestore"] = {"rules": str(self.rules)}
        (self._workdir / "firebase.json").write_text(json.dumps(config, indent=2))
        return [self.executable, "emulators:start", "--only", "firestore", "--project", "demo-firegen"]

    def cwd(self) -> Path | None:
        return self._workdir if self.backend == "firebase" else None

    def process_env(self) -> dict[str, str]:
        if self.backend == "firebase":  # the repo's CLI needs its Java 21 runtime first on PATH
            return {**os.environ, **_setup_script().cli_env()}
        return dict(os.environ)

    def _before_terminate(self, proc: subprocess.Popen) -> None:
        if self.backend == "firebase":
            # The Firebase CLI runs Java in a process group of its own and stops it on SIGINT.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            wait_until(lambda: not port_open(self.host, self.port), STOP_GRACE_S * 2, 0.05)
        elif http_status(f"{self.url}/shutdown", method="POST", timeout=1) == 200:
            # The emulator's own shutdown takes ~1 s; after SIGTERM the JVM lingers ~2 s. Signals follow anyway.
            wait_until(lambda: not self._group_alive(proc, proc.pid), 3.0, 0.02)

    def reset(self, project: str, database: str = "(default)") -> None:
        """Delete every document of `project` (the emulator's reset endpoint)."""
        url = f"{self.url}/emulator/v1/projects/{project}/databases/{database}/documents"
        status = http_status(url, method="DELETE", timeout=10)
        if status != 200:
            raise EmulatorError(f"reset of {project} answered {status}")

    def client(self, project: str, credentials=None):
        """A google.cloud.firestore.Client on this emulator (admin: the client sends `Bearer owner`, which
        bypasses rules). The library reads FIRESTORE_EMULATOR_HOST only while it builds the client, so the
        variable is set just for that call."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import firestore

        with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": self.host_port}):
            return firestore.Client(project=project, credentials=credentials or AnonymousCredentials())


# ---------------------------------------------------------------------------------------------- Storage
class StorageEmulator(Emulator):
    """gcp-storage-emulator. Data lives in `data_dir` (kept across restarts) unless `in_memory`."""

    name = "storage"

    def __init__(self, log_dir: Path, port: int | None = None, host: str = HOST, in_memory: bool = False):
        super().__init__(log_dir, port, host)
        self.in_memory = in_memory
        self.data_dir = self.log_dir / f"{self.name}-{self.port}.data"
        self._argv = self._find()

    @staticmethod
    def _find() -> list[str]:
        import importlib.util

        if importlib.util.find_spec("gcp_storage_emulator") is not None:
            return [sys.executable, "-m", "gcp_storage_emulator"]
        exe = shutil.which("gcp-storage-emulator")
        if exe:
            return [exe]
        raise EmulatorUnavailable("gcp-storage-emulator is not installed (pip install -e '.[dev]')")

    def command(self) -> list[str]:
        store = ["--in-memory"] if self.in_memory else []
        data = [] if self.in_memory else ["-d", str(self.data_dir)]
        return [*self._argv, *data, "start", *store, "--host", self.host, "--port", str(self.port)]

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("STORAGE_EMULATOR_HOST", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def client(self, project: str, credentials=None):
        """A google.cloud.storage.Client on this emulator, anonymous."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=project,
            credentials=credentials or AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def wipe(self) -> None:
        if http_status(f"{self.url}/wipe", timeout=10) != 200:
            raise EmulatorError("storage wipe failed")


# ---------------------------------------------------------------------------------------------- Docker
def docker_available() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        return (
            subprocess.run([docker, "info"], capture_output=True, timeout=20, stdin=subprocess.DEVNULL).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerService:
    """One service of docker-compose.yml, with the restart interface of `Emulator` (ports are fixed by the
    compose file's variables, so a stopped and started container comes back on the same port)."""

    def __init__(self, compose: DockerCompose, service: str, port: int, health_path: str):
        self.compose, self.service, self.host, self.port = compose, service, HOST, port
        self.health_path = health_path
        self.name = service
        self.log_path = compose.log_dir / f"docker-{service}.log"
        self.starts = 1
        self.last_start_seconds = None

    host_port = Emulator.host_port
    url = Emulator.url
    reset = FirestoreEmulator.reset
    wipe = StorageEmulator.wipe

    @property
    def running(self) -> bool:
        return self.is_ready()

    def is_ready(self) -> bool:
        return http_status(self.url + self.health_path, timeout=0.5) == 200

    def client(self, project: str, credentials=None):
        cls = FirestoreEmulator if self.service == "firestore" else StorageEmulator
        return cls.client(self, project, credentials)  # type: ignore[arg-type]

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        self.compose.run(f"stop -t {int(grace)} {self.service}")

    def start(self) -> DockerService:
        self.compose.run(f"start {self.service}")
        if not wait_until(self.is_ready, START_TIMEOUT_S):
            raise EmulatorError(f"docker service {self.service} not ready on {self.port}")
        self.starts += 1
        return self

    def ensure_running(self) -> DockerService:
        return self if self.is_ready() else self.start()

    def restart(self) -> DockerService:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            out = self.compose.run(f"logs --no-color --tail {lines} {self.service}")
        except Exception as e:
            return f"(docker compose logs failed: {e})"
        self.log_path.write_bytes(out)
        return out.decode(errors="replace")


class DockerCompose:
    """Both emulators from docker-compose.yml, brought up and down with pytest-docker's helpers. The host
    ports are chosen here and handed to compose as FIRESTORE_EMULATOR_PORT / STORAGE_EMULATOR_PORT."""

    def __init__(self, compose_file: Path, log_dir: Path):
        from pytest_docker.plugin import DockerComposeExecutor

        self.compose_file, self.log_dir = Path(compose_file), Path(log_dir)
        self.project = f"firegen{os.getpid()}"
        self.ports = {"FIRESTORE_EMULATOR_PORT": free_port(), "STORAGE_EMULATOR_PORT": free_port()}
        # pytest-docker runs its commands through a shell, so the ports travel as an `env` prefix.
        self.command = "env " + " ".join(f"{k}={v}" for k, v in self.ports.items()) + " docker compose"
        self._executor = DockerComposeExecutor(self.command, str(self.compose_file), self.project)

    def run(self, subcommand: str) -> bytes:
        return self._executor.execute(subcommand)

    @contextlib.contextmanager
    def up(self) -> Iterator[tuple[DockerService, DockerService]]:
        from pytest_docker.plugin import get_docker_services

        with get_docker_services(self.command, str(self.compose_file), self.project, ["up -d --wait"], ["down -v"]):
            firestore = DockerService(self, "firestore", self.ports["FIRESTORE_EMULATOR_PORT"], "/")
            storage = DockerService(self, "storage", self.ports["STORAGE_EMULATOR_PORT"], "/storage/v1/b")
            for svc in (firestore, storage):
                if not wait_until(svc.is_ready, START_TIMEOUT_S):
                    raise EmulatorError(f"docker service {svc.service} not ready:\n{svc.log_tail()}")
            yield firestore, storage


def requested_mode() -> str:
    """FIREGEN_EMULATORS as asked: local, docker or auto (the default). ValueError: another value (a typo ran the
    emulators some other way than asked, and said nothing)."""
    mode = os.environ.get("FIREGEN_EMULATORS", "").strip().lower() or "auto"
    if mode not in ("local", "docker", "auto"):
        raise ValueError(f"FIREGEN_EMULATORS must be local, docker or auto, not {mode!r}")
    return mode


def emulator_mode() -> str:
    """`local` or `docker`: FIREGEN_EMULATORS (`requested_mode`), `auto` decided on this machine."""
    mode = requested_mode()
    if mode != "auto":
        return mode
    try:
        firestore_backend()
        return "local"
    except EmulatorUnavailable:
        try:
            import pytest_docker  # noqa: F401
        except ImportError:
            return "local"
        return "docker" if docker_available() else "local"


# ---------------------------------------------------------------------------------------------- env, cleanup
def emulator_env(firestore, storage, project: str, bucket: str | None = None) -> dict[str, str]:
    """The variables a subprocess needs to use these emulators (merge into os.environ yourself)."""
    env = {
        "FIRESTORE_EMULATOR_HOST": firestore.host_port,
        "STORAGE_EMULATOR_HOST": storage.url,
        "GOOGLE_CLOUD_PROJECT": project,
        "GCLOUD_PROJECT": project,
    }
    if bucket:
        env["STORAGE_BUCKET"] = bucket
    return env


def stop_all() -> None:
    with _started_lock:
        emulators = list(STARTED)
    for emu in emulators:
        with contextlib.suppress(Exception):
            emu.stop(grace=2.0)


atexit.register(stop_all)
