"""`make dev`: the whole system on this machine, then the contract's two examples as an app would run them.

Starts, each in a process group of its own:
- the Firebase CLI's Auth, Functions, Firestore and Storage emulators (Storage under storage.rules, where
  scripts/setup_firebase_cli.py built its rules runtime; else the PyPI gcp-storage-emulator, beside it), and
  Hosting's where the web app is built (`firebase emulators:start --only functions,auth,firestore,storage,hosting`,
  set up by scripts/setup_firebase_cli.py; devtools/firebase_cli.py), with the functions pointed at the local
  worker (RUNPOD_RUNSYNC_URL) and a local RUNPOD_API_KEY secret;
- a worker (`python -m listener --rp_serve_api`, tiny models), once the Firestore and Storage emulators answer,
then acts as the contract's client, signed in to the Auth emulator:
- image example: writes the queued doc with the user's ID token (firestore.rules apply), then calls the
  `generateWithRunPod` callable, which dispatches it to the worker's runsync;
- video example: writes the queued doc only; the `dispatchQueuedJob` Firestore trigger dispatches it;
and prints each doc's status progression live, with the result URLs and the files saved under out/dev/.
It keeps running for `make submit PROMPT=...` until Ctrl-C (or SIGTERM, or SIGHUP: its terminal closed), which
stops every process it started.
It watches what it started: a worker that dies is said in one line and started again (at most
`--worker-restarts` times; the queue is in Firestore, so the new worker takes the dead one's job over once its
lease ends); any other process that dies ends `make dev` (its state went with it), saying which one.

Where the Firebase CLI cannot run (not set up, no Node or Java, or it fails to start), or with
`--no-firebase-cli`, it says so in one line and runs the fallback: the standalone Firestore emulator (no
rules) and the PyPI Storage emulator, the image example posted to runsync directly (as the function would), the
video example found by the worker's reconciler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import requests

from devtools import emulators as emu
from devtools import firebase_cli, web
from devtools.client import Client, StackInfo, shown_path
from devtools.worker import WorkerProcess
from firegen_core import function_params, lifecycle
from firegen_core.quota import Limits

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "out" / "dev"
PORT_NAMES = ("auth", "functions", "firestore", "storage", "worker", "hosting")
WORKER_RESTARTS = 3  # a worker that keeps dying has something to read in its log, not a restart to wait for
WATCH_INTERVAL_S = 0.5
BACKGROUND_LOAD_WAIT = 120.0  # the worker's second model's load, for its warnings (then said without them)
# What a dead process is called in the line that says so (by Emulator.name).
LABELS = {
    "worker": "the worker",
    "storage": "the Storage emulator",  # the PyPI one (the CLI's is watched on its port, as the CLI's others)
    "firestore": "the Firestore emulator",
    "firebase-cli": "the Firebase CLI's emulators",
    "web": "the web app's static server",
}

IMAGE_EXAMPLE = {
    "prompt": "A sunset over mountains",
    "user_id": "test-user",
    "file_uid": "test-img-001",
    "use_cloud_storage": True,
    "width": 512,
    "height": 512,
}
VIDEO_EXAMPLE = {
    "prompt": "Waves crashing on beach",
    "user_id": "test-user",
    "file_uid": "test-vid-001",
    "use_cloud_storage": True,
    "num_frames": 16,
    "fps": 8,
}


def firebase_config() -> tuple[str, dict[str, int]]:
    """The demo project from .firebaserc and the emulator ports from firebase.json (defaults where absent)."""
    project = "demo-firegen"
    ports = {"auth": 9099, "functions": 5001, "firestore": 8080, "storage": 9199, "worker": 8000, "hosting": 5000}
    try:
        project = json.loads((REPO / ".firebaserc").read_text())["projects"]["default"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        emulators = json.loads((REPO / "firebase.json").read_text()).get("emulators", {})
        ports.update({name: int(emulators[name]["port"]) for name in PORT_NAMES if name in emulators})
    except (OSError, ValueError, KeyError):
        pass
    return project, ports


# The settings both the worker and the functions read (README "Per-user limits", "Retention"). The Firebase CLI
# does not hand its own environment's values of the functions' params to them: it writes the params' defaults into
# the project's functions/.env.local and uses those. So make dev writes each of these there itself, with the same
# value the worker gets, or the callable admits what the worker refuses.
USER_LIMITS = ("USER_MAX_RUNNING", "USER_MAX_PENDING", "USER_DAILY_BUDGET")
SHARED_INT_PARAMS = (*USER_LIMITS, "PLACEHOLDER_GRACE_SECONDS")
SHARED_DEFAULTS = {
    "USER_MAX_RUNNING": Limits.max_running,
    "USER_MAX_PENDING": Limits.max_pending,
    "USER_DAILY_BUDGET": int(Limits.daily_budget),
    "PLACEHOLDER_GRACE_SECONDS": 5,
}


def shared_settings(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """USER_MAX_RUNNING, USER_MAX_PENDING, USER_DAILY_BUDGET, RETENTION_DAYS and PLACEHOLDER_GRACE_SECONDS from
    `environ` (unset or empty: the default both sides share). ValueError naming the variable when a value is one
    either side would refuse: the functions declare the limits and the grace as int params, so they must be whole
    there, though the worker would take 30.5."""
    try:
        values = {**SHARED_DEFAULTS, **function_params.whole_numbers(environ, SHARED_INT_PARAMS)}
        lifecycle.retention_days(environ)
    except ValueError as exc:
        raise ValueError(f"{exc}: the worker and the functions read it") from None
    shared = {name: str(values[name]) for name in USER_LIMITS}
    shared["RETENTION_DAYS"] = (environ.get("RETENTION_DAYS") or "").strip() or f"{lifecycle.RETENTION_DAYS_DEFAULT:g}"
    shared["PLACEHOLDER_GRACE_SECONDS"] = str(values["PLACEHOLDER_GRACE_SECONDS"])
    return shared


# The functions' own params (functions/main.py), which the worker does not read: passed on from make dev's
# environment where set, for the same reason (else the Firebase CLI writes their defaults).
FUNCTION_SETTINGS = ("RUNPOD_ATTEMPTS", "RUNPOD_TIMEOUT_SECONDS", "REDISPATCH_AFTER_MINUTES", "MAX_DISPATCHES")


def function_settings(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """FUNCTION_SETTINGS and ENFORCE_APP_CHECK set in `environ`; ValueError naming a value the functions refuse."""
    try:
        values = {name: str(value) for name, value in function_params.whole_numbers(environ, FUNCTION_SETTINGS).items()}
    except ValueError as exc:
        raise ValueError(f"{exc}: the functions read it") from None
    enforce = (environ.get("ENFORCE_APP_CHECK") or "").strip().lower()
    # The words functions/main.py's enforce_app_check() takes (a review: make dev refused its `true`).
    if enforce and enforce not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"ENFORCE_APP_CHECK must be on or off (got {enforce!r}): the functions read it")
    if enforce:
        values["ENFORCE_APP_CHECK"] = enforce
    return values


def taken_ports(args, cli: bool) -> list[str]:
    """The ports this run needs that something else already holds, as "8000 (worker)"."""
    needed = PORT_NAMES if cli else tuple(name for name in PORT_NAMES if name not in ("auth", "functions"))
    return [f"{args.ports[name]} ({name})" for name in needed if emu.port_open(emu.HOST, args.ports[name])]


def port_holders(ports: list[int]) -> dict[int, str]:
    """pid → command line (cut short) of the processes listening on `ports` that this user may look into (from
    Linux's /proc; none found elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders: dict[int, str] = {}
    for fds in Path("/proc").glob("[0-9]*/fd") if inodes else ():
        try:
            if any(os.readlink(fd) in inodes for fd in fds.iterdir()):
                command = " ".join((fds.parent / "cmdline").read_bytes().decode(errors="replace").split())
                holders[int(fds.parent.name)] = command if len(command) <= 60 else command[:59] + "…"
        except OSError:  # another user's, or gone meanwhile
            continue
    return holders


def taken_hint(ports: list[str]) -> str:
    """One line for the ports (as "8000 (worker)") something else holds: by whom where it can be seen (a make dev
    killed with SIGKILL leaves its processes running: the newcomer audit had to find them by hand)."""
    first = ports[0].split(" (")[1].rstrip(")")
    holders = port_holders([int(port.split(" ")[0]) for port in ports])
    if holders:
        who = ", ".join(f"{pid} ({command})" for pid, command in sorted(holders.items()))
        by = f"pid{'s' * (len(holders) > 1)} {who}"
        stop = f"stop {'them' if len(holders) > 1 else 'it'} (kill {' '.join(map(str, sorted(holders)))})"
    else:
        by, stop = "another process (another make dev?)", "stop it"
    return (
        f"port{'s' * (len(ports) > 1)} {', '.join(ports)} already taken by {by}: "
        f'{stop}, or run beside it with DEV_ARGS="--free-ports" (or --{first}-port N)'
    )


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(text: str) -> None:
    try:
        print(text, flush=True)
    except OSError:  # its terminal is gone (closed: SIGHUP, then EIO): stopping the processes must go on
        pass


def parse_args(argv: list[str] | None):
    project, ports = firebase_config()
    parser = argparse.ArgumentParser(prog="make dev", description=__doc__.splitlines()[0])
    # An empty IMAGE_MODEL= is unset, not the worker's own default (the full-size model, not on this machine).
    parser.add_argument("--image-model", default=os.environ.get("IMAGE_MODEL") or "tiny")
    parser.add_argument("--video-model", default=os.environ.get("VIDEO_MODEL") or "tiny")
    parser.add_argument("--once", action="store_true", help="stop after the two examples (for scripts and CI)")
    parser.add_argument("--no-examples", action="store_true", help="start the stack only")
    parser.add_argument(
        "--no-firebase-cli",
        action="store_true",
        help="the fallback: standalone Firestore emulator, runsync posted by the client",
    )
    parser.add_argument(
        "--worker-restarts",
        type=int,
        default=WORKER_RESTARTS,
        help=f"how many times a worker that died is started again (default {WORKER_RESTARTS}; 0: never)",
    )
    parser.add_argument("--project", default=project, help=f"Firebase project id (default {project}, .firebaserc)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results, logs and stack.json (default out/dev, or FIREGEN_DEV_OUT; where another running make dev "
        "holds that folder, the folder's name plus -HOSTING_PORT)",
    )
    for name in PORT_NAMES:
        env = f"FIREGEN_DEV_{name.upper()}_PORT"
        raw = os.environ.get(env, "").strip()  # exported empty: as if unset
        try:
            default = port_number(raw) if raw else None
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{env} {exc}")
        parser.add_argument(
            f"--{name}-port",
            type=port_number,
            default=default,
            help=f"default {ports[name]}{'' if name == 'worker' else ' (firebase.json)'}, or {env}",
        )
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="free ports for every port not given (for tests beside a running `make dev`)",
    )
    args = parser.parse_args(argv)
    args.out_given = args.out is not None
    # Absolute: the Firebase CLI runs in another folder, where a relative one named nothing (a review: `--out out`
    # failed its start, and the stack fell back to the standalone emulators).
    args.out = (args.out or Path(os.environ.get("FIREGEN_DEV_OUT", OUT))).absolute()
    emu.hold_ports(getattr(args, f"{name}_port") for name in PORT_NAMES)
    args.ports = {
        name: getattr(args, f"{name}_port") or (emu.free_port() if args.free_ports else ports[name])
        for name in PORT_NAMES
    }
    return args


def port_number(text: str) -> int:
    value = int(text) if re.fullmatch(r"[0-9]{1,5}", text.strip()) else 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535 (got {text!r})")
    return value


class CliFailed(Exception):
    """The Firebase CLI's emulators did not start (the message: the first line of why)."""


class Stack:
    """The processes of one `make dev`, started in order and stopped in reverse, whatever happens between."""

    def __init__(self, args, shared: dict[str, str], functions_only: dict[str, str] | None = None):
        self.args, self.ports = args, args.ports
        self.shared = shared  # shared_settings(): the same values to the worker and to the functions
        self.functions_only = functions_only or {}  # function_settings()
        self.logs = args.out / "logs"
        self.started: list[emu.Emulator] = []
        self._guard = threading.Lock()  # a start in a helper thread vs. stop_all()
        self._stopping = False
        self.worker_restarts = 0

    def start(self, process: emu.Emulator, what: str) -> emu.Emulator:
        with self._guard:
            if self._stopping:
                raise KeyboardInterrupt
            self.started.append(process)  # before start(): an interrupted start is stopped too
        say(f"starting {what} (log {shown_path(process.log_path)})")
        return process.start()

    def worker(self, env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(
            self.logs,
            env,
            port=self.ports["worker"],
            IMAGE_MODEL=self.args.image_model,
            VIDEO_MODEL=self.args.video_model,
            **self.shared,
        )
        self.start(
            worker,
            f"the worker on {worker.url} (IMAGE_MODEL={self.args.image_model}, VIDEO_MODEL={self.args.video_model})",
        )
        self.say_warnings(worker)
        return worker

    @staticmethod
    def say_warnings(worker: WorkerProcess) -> None:
        # Ready once its first model is: the other's load, in the background, may still warn (a second or two).
        emu.wait_until(lambda: not worker.loading(), BACKGROUND_LOAD_WAIT, interval=0.2)
        for warning in worker.start_warnings():
            say(f"make dev: the worker warns: {warning}")

    def pypi_storage(self, bucket: str) -> emu.StorageEmulator:
        """The PyPI gcp-storage-emulator (no storage.rules, no Firebase Storage API), its bucket made."""
        storage = emu.StorageEmulator(self.logs, port=self.ports["storage"], in_memory=True)
        self.start(storage, f"the Storage emulator (PyPI gcp-storage-emulator, no rules) on {storage.host_port}")
        storage.client(self.args.project).create_bucket(bucket)
        return storage

    def with_firebase_cli(self, storage: emu.StorageEmulator | None, bucket: str) -> StackInfo:
        """The CLI's emulators, its Storage emulator too where `storage` (the PyPI one) is None, and the worker on
        their Firestore and Storage as soon as both answer (while the functions load)."""
        runsync_url = f"http://{emu.HOST}:{self.ports['worker']}/runsync"
        own_storage = storage is None
        names = ("auth", "functions", "firestore", *(("storage",) if own_storage else ()), "hosting")
        storage_url = f"http://{emu.HOST}:{self.ports['storage']}" if storage is None else storage.url
        cli = firebase_cli.FirebaseCli(
            self.logs,
            self.args.out / "firebase",
            self.args.project,
            runsync_url,
            ports={name: self.ports[name] for name in names},
            # The results' bucket, for deleteGeneration: the worker's, on the Storage emulator.
            function_env={
                **self.shared,
                **self.functions_only,
                "STORAGE_BUCKET": bucket,
                "STORAGE_EMULATOR_HOST": storage_url,
            },
            hosting=web.missing() is None,
            emulators=(*firebase_cli.EMULATORS, *(("storage",) if own_storage else ())),
        )
        firestore, auth = cli.address("firestore"), cli.address("auth")
        if cli.hosting:
            web.prepare_site(cli.site_root, firestore=firestore, auth=auth, functions=cli.address("functions"))
        env = emu.emulator_env(
            SimpleNamespace(host_port=firestore), SimpleNamespace(url=storage_url), self.args.project, bucket
        )
        if own_storage:  # its token URLs in Firebase's form, which the JS SDK's ref(storage, url) reads
            env["FIREBASE_STORAGE_EMULATOR_HOST"] = cli.address("storage")
        outcome: dict = {}

        def answering() -> bool:
            return emu.port_open(emu.HOST, cli.ports["firestore"]) and (
                not own_storage or emu.port_open(emu.HOST, cli.ports["storage"])
            )

        def start_worker():
            if (
                emu.wait_until(lambda: answering() or "done" in outcome, emu.START_TIMEOUT_S, 0.1)
                and "done" not in outcome
            ):
                try:
                    if own_storage:
                        make_bucket(storage_url, self.args.project, bucket)
                    outcome["worker"] = self.worker(env)
                except BaseException as exc:
                    outcome["error"] = exc

        helper = threading.Thread(target=start_worker, name="start-worker", daemon=True)
        helper.start()
        try:
            self.start(
                cli,
                f"the Firebase CLI's emulators: auth {auth}, functions {cli.address('functions')}, "
                f"firestore {firestore}{', storage ' + cli.address('storage') if own_storage else ''}"
                f"{', hosting ' + cli.address('hosting') if cli.hosting else ''}, project {self.args.project}",
            )
        except emu.EmulatorError as exc:
            # A worker still starting (since the CLI's Storage emulator answered, late in the CLI's start) would
            # go on on emulators gone, saying their failures as its warnings: the fallback starts its own.
            outcome["done"] = True
            self.abort_starts(but=cli)
            raise CliFailed(str(exc).splitlines()[0].rstrip(":")) from exc
        except BaseException:  # Ctrl-C: end the worker's start now rather than wait until it is ready
            outcome["done"] = True
            self.abort_starts(but=cli)
            raise
        finally:
            outcome["done"] = True
            while helper.is_alive():
                helper.join(0.1)
        if "error" in outcome:
            raise outcome["error"]
        if "worker" not in outcome:  # the CLI was ready before its ports answered a probe
            if own_storage:
                make_bucket(storage_url, self.args.project, bucket)
            self.worker(env)
        return StackInfo(
            web_url=cli.web_url if cli.hosting else None,
            project=self.args.project,
            firestore=firestore,
            storage=storage_url,
            bucket=bucket,
            runsync_url=runsync_url,
            out=str(self.args.out),
            auth=auth,
            functions=cli.functions_url,
            storage_emulator="firebase-cli" if own_storage else "gcp-storage-emulator",
        )

    def fallback(self, storage: emu.StorageEmulator, bucket: str) -> StackInfo:
        firestore = emu.FirestoreEmulator(self.logs, port=self.ports["firestore"])
        self.start(firestore, f"the Firestore emulator on {firestore.host_port}")
        worker = self.worker(emu.emulator_env(firestore, storage, self.args.project, bucket))
        site = None
        if web.missing() is None:  # no Auth emulator: the page uses a fixed user and writes job docs itself
            root = web.prepare_site(
                self.args.out / "web",
                firestore=firestore.host_port,
                auth=None,
                functions=None,
                project=self.args.project,
                uid=IMAGE_EXAMPLE["user_id"],
            )
            site = self.start(web.StaticSite(self.logs, root, self.ports["hosting"]), "a static server for the web app")
        return StackInfo(
            web_url=f"{site.url}/" if site else None,
            project=self.args.project,
            firestore=firestore.host_port,
            storage=storage.url,
            bucket=bucket,
            runsync_url=worker.runsync_url,
            out=str(self.args.out),
        )

    def up(self) -> StackInfo:
        bucket = f"{self.args.project}.appspot.com"
        storage: emu.StorageEmulator | None = None
        why = "--no-firebase-cli" if self.args.no_firebase_cli else firebase_cli.missing()
        if why is None:
            # The CLI's own Storage emulator: storage.rules, and the Firebase Storage API (`/v0/b/...`) that the
            # JS SDK's getBytes, getDownloadURL and ref(storage, url) call (the PyPI one has neither: an app got
            # storage/object-not-found). Without its rules runtime, the PyPI one beside the CLI.
            no_rules = firebase_cli.missing_storage()
            if no_rules is not None:
                say(
                    f"make dev: the Firebase CLI's Storage emulator cannot run ({no_rules}; setup: python3 "
                    "scripts/setup_firebase_cli.py): the PyPI gcp-storage-emulator instead (no storage.rules, no "
                    "Firebase Storage API for the JS SDK)"
                )
                storage = self.pypi_storage(bucket)
            try:
                return self.with_firebase_cli(storage, bucket)
            except CliFailed as exc:
                if "already taken" in str(exc):  # the fallback needs the same ports: say which, and how around it
                    raise emu.EmulatorError(str(exc)) from exc
                why = f"it failed to start: {exc}"
                self.stop_all(keep=0 if storage is None else 1)  # a PyPI Storage emulator stays
        elif not self.args.no_firebase_cli:
            why += "; setup: python3 scripts/setup_firebase_cli.py"
        say(
            f"make dev: the Firebase CLI cannot run ({why}): "
            "falling back to the standalone Firestore emulator and direct runsync (no Auth, Functions or rules)"
        )
        return self.fallback(storage or self.pypi_storage(bucket), bucket)

    def watch(self) -> None:
        """Between waits, in the main thread (so Ctrl-C during a restart stops it like any start): a process that
        ended on its own is said in one line. The worker is started again on its port, as a supervisor would;
        anything else raises EmulatorError, which ends `make dev` (an emulator's data went with it)."""
        for process in list(self.started):
            code = process.exit_code
            if code is None:
                silent = process.silent() if isinstance(process, firebase_cli.FirebaseCli) else []
                if silent:
                    raise emu.EmulatorError(
                        f"the Firebase CLI's {', '.join(silent)} emulator stopped answering (log "
                        f"{shown_path(process.log_path)}): stopping everything; run `make dev` again"
                    )
                continue
            label = LABELS.get(process.name, process.name)
            died = f"{label} (pid {process.pid}) {ended(code)} (log {shown_path(process.log_path)})"
            if not isinstance(process, WorkerProcess):
                raise emu.EmulatorError(f"{died}: stopping everything; run `make dev` again")
            if self.worker_restarts >= self.args.worker_restarts:
                raise emu.EmulatorError(
                    f"{died}, after {self.worker_restarts} restart(s) (--worker-restarts {self.args.worker_restarts}):"
                    " stopping everything; run `make dev` again"
                )
            self.worker_restarts += 1
            lease = process.settings["LEASE_SECONDS"]
            say(
                f"make dev: {died}; restarting it ({self.worker_restarts} of {self.args.worker_restarts}). A job it "
                f"was running goes back to the queue when its lease ends (LEASE_SECONDS={lease})"
            )
            self._restart(process)

    def _restart(self, worker: WorkerProcess) -> None:
        """Start the dead worker again; one that dies while it starts is tried again, within --worker-restarts."""
        while True:
            try:
                worker.restart()
            except emu.EmulatorError as exc:
                why = str(exc).splitlines()[0]
                if self.worker_restarts >= self.args.worker_restarts:
                    raise emu.EmulatorError(
                        f"the restarted worker did not start ({why}), after {self.worker_restarts} restart(s) "
                        f"(--worker-restarts {self.args.worker_restarts}): stopping everything; run `make dev` again"
                    ) from None
                self.worker_restarts += 1
                say(
                    f"make dev: the restarted worker did not start ({why}); restarting it "
                    f"({self.worker_restarts} of {self.args.worker_restarts})"
                )
                continue
            say(f"make dev: the worker is back (pid {worker.pid}, ready in {worker.last_start_seconds:.1f} s)")
            self.say_warnings(worker)
            return

    def abort_starts(self, but: emu.Emulator) -> None:
        """SIGTERM to each process still starting in a helper thread: its start() then fails and cleans up."""
        for process in list(self.started):
            if process is not but and process.running and process.last_start_seconds is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)

    def stop_all(self, keep: int | None = None) -> None:
        """Stop what was started, last first: all of it for good (None), or all but the first `keep` (a fallback's
        start follows)."""
        with self._guard:
            self._stopping = keep is None
            keep = keep or 0
            stopping, self.started = self.started[keep:], self.started[:keep]
        for process in reversed(stopping):
            try:
                process.stop()
            except emu.EmulatorError as exc:
                say(f"make dev: {exc}")


def make_bucket(storage_url: str, project: str, bucket: str) -> None:
    """The results' bucket on the CLI's Storage emulator, which makes a bucket at the first request naming it (and
    answers a create 501): a listing of it, over the Cloud Storage API the worker and the functions use."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage

    client = storage.Client(
        project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": storage_url}
    )
    try:
        list(client.bucket(bucket).list_blobs(max_results=1, timeout=10))
    finally:
        client.close()


def ended(code: int) -> str:
    """A process's end in words, from Popen's returncode (negative: the signal)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def run_examples(client: Client, cli: bool, watch: Callable[[], None]) -> None:
    image_via, video_via = ("callable", "document") if cli else ("runsync", "document")
    if cli:
        say(
            f"signed in to the Auth emulator as {client.uid}. Image: the queued doc, then the generateWithRunPod "
            "callable; video: the queued doc only, for the dispatchQueuedJob trigger (a warm worker's listener may "
            "take it first)\n"
        )

    def example(data: dict, via: str) -> None:
        try:
            client.generate(data, via=via)
        except Exception as exc:
            client.failures += 1
            say(f"[{data['file_uid']}] the client failed: {exc!r}")

    # Daemons: after a Ctrl-C nobody waits for their docs any more.
    runs = [
        threading.Thread(target=example, args=(IMAGE_EXAMPLE, image_via), daemon=True),
        threading.Thread(target=example, args=(VIDEO_EXAMPLE, video_via), daemon=True),
    ]
    for run in runs:
        run.start()
    for run in runs:
        while run.is_alive():
            run.join(0.1)
            watch()  # a worker killed during the examples is restarted, and they finish


def running_in(out: Path) -> bool:
    """Whether `out` holds the state of a stack that still answers (another make dev's; a stopped one removes it,
    a killed one leaves it behind, with nothing listening)."""
    try:
        host, port = json.loads((out / "stack.json").read_text())["firestore"].rsplit(":", 1)
        return emu.port_open(host, int(port))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shared, functions_only = shared_settings(), function_settings()
    except ValueError as exc:  # before anything starts: the worker would fail on it, the functions later
        say(f"make dev: {exc}")
        return 1
    taken = taken_ports(args, cli=not args.no_firebase_cli and firebase_cli.missing() is None)
    if taken:  # before anything starts (a port found taken half-way stopped make dev after 15 s of starting)
        say(f"make dev: {taken_hint(taken)}")
        return 1
    if not args.out_given and running_in(args.out):
        # Beside another make dev (--free-ports): its page reads its emulators' addresses from its folder, and
        # make submit its stack.json; written over, they would lead to this stack, and after it to none.
        taken, args.out = args.out, args.out.with_name(f"{args.out.name}-{args.ports['hosting']}")
        say(
            f"make dev: {shown_path(taken)} is another running make dev's; this one's is {shown_path(args.out)} "
            f"(make submit PROMPT='...' SUBMIT_ARGS=\"--stack {shown_path(args.out / 'stack.json')}\")"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    state = args.out / "stack.json"
    stack = Stack(args, shared, functions_only)
    say(f"settings the worker and the functions share: {' '.join(f'{k}={v}' for k, v in shared.items())}")
    if functions_only:
        say(f"settings for the functions: {' '.join(f'{k}={v}' for k, v in functions_only.items())}")

    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C, SIGTERM, and SIGHUP (its terminal closed: the processes it started, each in a session of its own,
    # would keep running and holding their ports); also where SIGINT came in ignored (a background job).
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    t0 = time.monotonic()
    try:
        info = stack.up()
        state.write_text(json.dumps(info.__dict__, indent=2))
        took = ", ".join(f"{p.name} {p.last_start_seconds:.1f} s" for p in stack.started if p.last_start_seconds)
        say(f"stack ready in {time.monotonic() - t0:.1f} s ({took}; state {shown_path(state)})")
        say(f"web app: {info.web_url}" if info.web_url else f"web app: not served ({web.missing()})")
        client = None
        if not args.no_examples:
            t1 = time.monotonic()
            with Client(info) as client:
                run_examples(client, cli=info.functions is not None, watch=stack.watch)
            done = f"{client.failures} of the 2 examples failed" if client.failures else "both examples done"
            say(
                f"\n{done} in {time.monotonic() - t1:.1f} s ({time.monotonic() - t0:.1f} s after start); "
                f"results in {shown_path(args.out)}"
            )
        if args.once:
            return 0 if client is None or client.failures == 0 else 1
        # Where this stack is not the default folder's, make submit must be told which it is.
        target = "" if args.out == OUT else f' SUBMIT_ARGS="--stack {shown_path(state)}"'
        say(
            f"the stack keeps running: in another terminal, `make submit PROMPT='a lighthouse at dusk'{target}` "
            "(add VIDEO=1 for a video). Ctrl-C stops everything."
        )
        while True:
            stack.watch()
            time.sleep(WATCH_INTERVAL_S)
    except KeyboardInterrupt:
        say("\nstopping...")
        return 0
    except (emu.EmulatorError, emu.EmulatorUnavailable, requests.RequestException) as exc:
        taken = taken_ports(args, cli=True) if "already taken" in str(exc) else []
        say(f"make dev: {exc}" + (f"\nmake dev: {taken_hint(taken)}" if taken else ""))
        return 1
    finally:
        for signum in STOP_SIGNALS:  # a second Ctrl-C must not leave processes behind
            signal.signal(signum, signal.SIG_IGN)
        had = bool(stack.started)
        stack.stop_all()
        state.unlink(missing_ok=True)
        if had:
            say("all processes stopped")


if __name__ == "__main__":
    sys.exit(main())
