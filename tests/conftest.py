"""Shared fixtures: the Firestore and Storage emulators (one of each per session) and fresh clients per test.

Session-scoped:  emulator_logs, emulator_mode, firestore_emulator, firestore_emulator_factory, storage_emulator,
                 tiny_cache and engine (tests/fixtures_generation.py)
Function-scoped: project_id, firestore_client, storage_client, bucket, emulator_env

Each test gets its own Firestore project id and its own bucket, so tests never see each other's data. A test
may stop or restart a session emulator (outage tests): the function-scoped fixtures start it again if needed.
When a test that used an emulator fails, the report shows each emulator's log path and last lines.

A test skips only when something it needs is missing here (an emulator, the Firebase CLI, functions/venv).
Under CI (`CI` set, as CI services do) every such skip is a failure: the run must not pass having tested less.
On a developer's machine the summary says, in one line per reason, what was skipped and why.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

# torch on one thread in every process of the suite (these and the workers, stacks and scripts they start, which
# inherit it) unless set otherwise: the tiny models gain nothing from a second thread, and on two cores shared by
# two test processes and their subprocesses OpenMP's spin-waits cost a job three times its CPU (an image and a
# video beside one busy process: 8.7-10.1 s of CPU on two threads, 2.9-3.5 s on one). Before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

# The tiny pipelines' session fixtures, for every module from here: a session fixture imported into a test module
# is that module's own (pytest makes one per module that defines it), and each such module built and loaded the
# tiny pipelines again.
from fixtures_generation import engine, tiny_cache  # noqa: F401

from devtools import emulators as emu

EMULATOR_FIXTURES = {
    "firestore_emulator",
    "firestore_emulator_factory",
    "storage_emulator",
    "firestore_client",
    "storage_client",
    "bucket",
    "emulator_env",
}


@pytest.fixture(autouse=True)
def _pytests_exception_hooks():
    """A test that calls listener.logs.configure() in-process sets threading.excepthook and sys.excepthook for good:
    pytest's own thread hook (pyproject: a thread that dies of an exception fails its test) would be gone for every
    later test of the process. Set back after each test."""
    import sys
    import threading

    hooks = threading.excepthook, sys.excepthook
    yield
    threading.excepthook, sys.excepthook = hooks


def pytest_configure(config):
    try:  # before any test is collected, and once: in the main process, before pytest-xdist's start
        emu.requested_mode()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    # Under pytest-xdist (`make test` runs the suite in parallel processes), each process and the subprocesses it
    # starts pick free ports from a slice of their own.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    if worker.startswith("gw"):
        emu.use_port_slice(int(worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    else:
        # The functions' copy of firegen_core, written once before the processes start: a process starting the
        # Firebase CLI would otherwise swap it in while another copies functions/ for its own CLI.
        from devtools.firebase_cli import vendor_shared

        try:
            vendor_shared.vendor()
        except OSError:  # a read-only checkout: the tests that start the CLI say so themselves
            pass


# ------------------------------------------------------------------------------------------------ session
@pytest.fixture(scope="session")
def emulator_logs(tmp_path_factory) -> Path:
    """The folder where every emulator's log (and the Storage emulator's data) goes."""
    return tmp_path_factory.mktemp("emulators")


@pytest.fixture(scope="session")
def emulator_mode() -> str:
    """'local' (processes on this machine) or 'docker' (docker-compose.yml via pytest-docker)."""
    return emu.emulator_mode()  # a wrong FIREGEN_EMULATORS stopped the run in pytest_configure


@pytest.fixture(scope="session")
def _docker_emulators(pytestconfig, emulator_logs):
    compose = emu.DockerCompose(Path(pytestconfig.rootpath) / "docker-compose.yml", emulator_logs)
    with compose.up() as pair:
        yield pair


def _session_emulator(request, emulator_mode, docker_index, make):
    """The docker-compose service in docker mode, else a local process started for the session."""
    if emulator_mode == "docker":
        yield request.getfixturevalue("_docker_emulators")[docker_index]
        return
    try:
        emulator = make()
    except emu.EmulatorUnavailable as e:
        pytest.skip(str(e))
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def firestore_emulator(request, emulator_mode, emulator_logs):
    """The session's Firestore emulator (no rules). API: host_port, url, start(), stop(), restart(),
    ensure_running(), reset(project), client(project), log_path, log_tail()."""
    yield from _session_emulator(request, emulator_mode, 0, lambda: emu.FirestoreEmulator(emulator_logs))


@pytest.fixture(scope="session")
def firestore_emulator_factory(emulator_logs):
    """`factory(rules=None, fresh=False) -> FirestoreEmulator`: a further local Firestore emulator, started,
    that enforces the given rules file (e.g. the repo's firestore.rules). One per rules path is reused for
    the session unless `fresh=True`; all are stopped at the end of the session."""
    made: dict[str | None, emu.FirestoreEmulator] = {}
    extra: list[emu.FirestoreEmulator] = []  # all started here, stopped at the end

    def factory(rules: str | Path | None = None, *, fresh: bool = False) -> emu.FirestoreEmulator:
        key = str(Path(rules).resolve()) if rules else None
        if not fresh and key in made:
            return made[key].ensure_running()
        try:
            emulator = emu.FirestoreEmulator(emulator_logs, rules=rules)
        except emu.EmulatorUnavailable as e:
            pytest.skip(str(e))
        emulator.start()
        if not fresh:
            made[key] = emulator
        extra.append(emulator)
        return emulator

    yield factory
    for emulator in extra:
        emulator.stop()


@pytest.fixture(scope="session")
def storage_emulator(request, emulator_mode, emulator_logs):
    """The session's Cloud Storage emulator. API: url (the STORAGE_EMULATOR_HOST value), host_port, start(),
    stop(), restart(), ensure_running(), client(project), wipe(), log_path, log_tail()."""
    yield from _session_emulator(request, emulator_mode, 1, lambda: emu.StorageEmulator(emulator_logs))


# ------------------------------------------------------------------------------------------------ per test
@pytest.fixture
def project_id() -> str:
    """A project id of this test's own: its Firestore data is invisible to every other test."""
    return emu.unique_id("demo-test")


@pytest.fixture
def firestore_client(firestore_emulator, project_id, monkeypatch):
    """google.cloud.firestore.Client on the emulator, anonymous (admin), project `project_id`.
    FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT are set for the test (monkeypatch)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    firestore_emulator.ensure_running()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host_port)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", project_id)
    client = firestore.Client(project=project_id, credentials=AnonymousCredentials())
    yield client
    emu.close_firestore(client)


@pytest.fixture
def unreachable_firestore(monkeypatch):
    """A Firestore client of a port nothing listens on (FIRESTORE_EMULATOR_HOST: that port, for the test)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{emu.free_port()}")
    client = firestore.Client(project="demo-down", credentials=AnonymousCredentials())
    yield client
    emu.close_firestore(client)


@pytest.fixture
def storage_client(storage_emulator, project_id, monkeypatch):
    """google.cloud.storage.Client on the emulator (explicit api_endpoint), anonymous.
    STORAGE_EMULATOR_HOST is set for the test (monkeypatch)."""
    storage_emulator.ensure_running()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    client = storage_emulator.client(project_id)
    yield client
    client.close()


@pytest.fixture
def bucket(storage_client, storage_emulator):
    """A new, empty google.cloud.storage.Bucket of this test's own, on the emulator."""
    created = storage_client.create_bucket(emu.unique_id("test-bucket"))
    yield created
    try:  # best effort; the emulator's data folder is temporary anyway
        storage_emulator.ensure_running()
        created.delete(force=True)
    except Exception:
        pass


@pytest.fixture
def emulator_env(firestore_emulator, storage_emulator, project_id, bucket) -> dict[str, str]:
    """FIRESTORE_EMULATOR_HOST, STORAGE_EMULATOR_HOST, GOOGLE_CLOUD_PROJECT (and GCLOUD_PROJECT), STORAGE_BUCKET
    for a subprocess: `subprocess.run(..., env={**os.environ, **emulator_env})`."""
    firestore_emulator.ensure_running()
    return emu.emulator_env(firestore_emulator, storage_emulator, project_id, bucket.name)


# ------------------------------------------------------------------------------------------------ reporting
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        report.outcome = "failed"
        report.longrepr = f"CI is set: a missing component fails the run instead of skipping: {_skip_reason(report)}"
    if report.failed and report.when == "call":  # the web app's tests: what each page showed, while it is open
        for n, page in enumerate(getattr(getattr(item, "funcargs", {}).get("open_page"), "pages", []), 1):
            try:
                report.sections.append((f"web page {n}", page.diagnosis()))
            except Exception as exc:  # a page that is gone says so, and the report goes on
                report.sections.append((f"web page {n}", f"no diagnosis: {exc!r}"))
    if report.failed and EMULATOR_FIXTURES & set(getattr(item, "fixturenames", ())):
        for emulator in list(emu.STARTED):
            report.sections.append(
                (f"emulator {emulator.name} {emulator.host_port} log {emulator.log_path}", emulator.log_tail())
            )
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = Counter(_skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
    for reason, count in skipped.items():
        terminalreporter.write_line(f"SKIPPED {count} test(s), missing here: {reason}", yellow=True, bold=True)
    if exitstatus != 0 and emu.STARTED:
        terminalreporter.write_line("emulator logs: " + ", ".join(str(e.log_path) for e in emu.STARTED))
