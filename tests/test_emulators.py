"""Sanity checks of the emulator harness: the Firestore features the worker relies on, Storage round trips,
restarts on the same port, a rules-enforcing emulator, and clean process-group shutdown."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from devtools import emulators as emu

DEADLINE_S = 15


def test_write_and_read_a_document(firestore_client):
    ref = firestore_client.collection("generations").document("u1").collection("images").document("f1")
    ref.set({"status": "queued", "prompt": "a red car", "created_at": firestore.SERVER_TIMESTAMP})
    snap = ref.get()
    assert snap.exists
    assert snap.get("status") == "queued" and snap.get("prompt") == "a red car"
    assert snap.get("created_at") is not None


def test_each_test_has_its_own_project(firestore_client, firestore_emulator, project_id):
    assert firestore_client.project == project_id
    assert os.environ["FIRESTORE_EMULATOR_HOST"] == firestore_emulator.host_port
    assert list(firestore_client.collection_group("images").stream()) == []


def test_transaction_reads_then_writes(firestore_client):
    ref = firestore_client.collection("counters").document("c")

    @firestore.transactional
    def bump(transaction):
        snap = ref.get(transaction=transaction)
        n = snap.get("n") if snap.exists else 0
        transaction.set(ref, {"n": n + 1})
        return n + 1

    assert [bump(firestore_client.transaction()) for _ in range(3)] == [1, 2, 3]
    assert ref.get().get("n") == 3


def test_concurrent_transactions_both_apply(firestore_client):
    """Two transactions racing on one document both land (the emulator locks pessimistically: a conflict
    costs it a lock timeout of a few seconds before one side retries, so keep contention in tests small)."""
    ref = firestore_client.collection("counters").document("c")
    ref.set({"n": 0})
    barrier = threading.Barrier(2)
    errors = []

    @firestore.transactional
    def bump(transaction):
        snap = ref.get(transaction=transaction)
        transaction.update(ref, {"n": snap.get("n") + 1})

    def worker():
        try:
            barrier.wait(DEADLINE_S)
            bump(firestore_client.transaction())
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 2)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert ref.get().get("n") == 2


def test_collection_group_query_on_status(firestore_client):
    gens = firestore_client.collection("generations")
    gens.document("alice").collection("images").document("a1").set({"status": "queued"})
    gens.document("alice").collection("images").document("a2").set({"status": "completed"})
    gens.document("bob").collection("images").document("b1").set({"status": "queued"})
    gens.document("bob").collection("videos").document("v1").set({"status": "queued"})

    query = firestore_client.collection_group("images").where(filter=FieldFilter("status", "==", "queued"))
    paths = sorted(snap.reference.path for snap in query.stream())
    assert paths == ["generations/alice/images/a1", "generations/bob/images/b1"]


def test_on_snapshot_listener_sees_a_new_queued_doc(firestore_client):
    seen: list[str] = []
    initial = threading.Event()
    added = threading.Event()

    def on_snapshot(snapshots, changes, read_time):
        initial.set()
        for change in changes:
            if change.type.name == "ADDED":
                seen.append(change.document.reference.path)
                added.set()

    query = firestore_client.collection_group("images").where(filter=FieldFilter("status", "==", "queued"))
    watch = query.on_snapshot(on_snapshot)
    try:
        assert initial.wait(DEADLINE_S), "no initial snapshot"
        firestore_client.document("generations/u9/images/f9").set({"status": "queued"})
        assert added.wait(DEADLINE_S), "listener saw no ADDED event"
        assert seen == ["generations/u9/images/f9"]
    finally:
        watch.unsubscribe()


def test_reset_endpoint_clears_a_project(firestore_client, firestore_emulator, project_id):
    ref = firestore_client.document("generations/u/images/f")
    ref.set({"status": "queued"})
    firestore_emulator.reset(project_id)
    assert not ref.get().exists


def test_storage_upload_and_download(bucket, storage_emulator):
    blob = bucket.blob("generating/u/image/f.png")
    blob.upload_from_string(b"\x89PNG fake", content_type="image/png")
    again = bucket.get_blob("generating/u/image/f.png")
    assert again.download_as_bytes() == b"\x89PNG fake"
    assert again.content_type == "image/png"
    url = f"{storage_emulator.url}/download/storage/v1/b/{bucket.name}/o/generating%2Fu%2Fimage%2Ff.png?alt=media"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.read() == b"\x89PNG fake"


def test_firestore_restart_on_the_same_port(firestore_emulator, project_id):
    port = firestore_emulator.port
    firestore_emulator.restart()
    assert firestore_emulator.port == port
    client = firestore_emulator.client(project_id)
    try:
        client.document("generations/u/images/f").set({"status": "queued"})
        assert client.document("generations/u/images/f").get().get("status") == "queued"
    finally:
        emu.close_firestore(client)


def test_a_closed_firestore_client_has_its_grpc_channel_closed_too(firestore_emulator, project_id):
    """The library's own close() ends only the HTTP session: the channel was left to the garbage collector, which
    closes it in whatever thread collects it."""
    client = firestore_emulator.client(project_id)
    client.document("generations/u/images/f").set({"status": "queued"})
    emu.close_firestore(client)
    with pytest.raises(ValueError, match="Channel closed"):
        client.document("generations/u/images/f").get(retry=None, timeout=5)
    emu.close_firestore(firestore_emulator.client(project_id))  # a client that never called has no channel yet


def test_storage_restart_keeps_data_and_serves_new_clients(bucket, storage_emulator, project_id):
    bucket.blob("kept.txt").upload_from_string(b"kept")
    port = storage_emulator.port
    storage_emulator.restart()
    assert storage_emulator.port == port
    fresh = storage_emulator.client(project_id)
    assert fresh.bucket(bucket.name).blob("kept.txt").download_as_bytes() == b"kept"
    fresh.bucket(bucket.name).blob("new.txt").upload_from_string(b"new")
    assert requests.get(f"{storage_emulator.url}/{bucket.name}/new.txt", timeout=5).content == b"new"


def test_emulator_env_reaches_a_subprocess(emulator_env, firestore_client, storage_client):
    code = (
        "import os; from google.cloud import firestore, storage\n"
        "from google.auth.credentials import AnonymousCredentials as A\n"
        "firestore.Client(credentials=A()).document('from/subprocess').set({'ok': True})\n"
        "storage.Client(credentials=A(), project=os.environ['GOOGLE_CLOUD_PROJECT'])"
        ".bucket(os.environ['STORAGE_BUCKET']).blob('sub.txt').upload_from_string(b'sub')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in emulator_env}
    subprocess.run([sys.executable, "-c", code], env={**env, **emulator_env}, check=True, timeout=60)
    assert firestore_client.document("from/subprocess").get().get("ok") is True
    assert storage_client.bucket(emulator_env["STORAGE_BUCKET"]).blob("sub.txt").download_as_bytes() == b"sub"


def test_rules_emulator_enforces_rules_and_stops_cleanly(firestore_emulator_factory, tmp_path, project_id):
    rules = tmp_path / "firestore.rules"
    rules.write_text(
        "rules_version = '2';\n"
        "service cloud.firestore {\n"
        "  match /databases/{database}/documents {\n"
        "    match /open/{doc} { allow read, write: if true; }\n"
        "    match /{document=**} { allow read, write: if false; }\n"
        "  }\n"
        "}\n"
    )
    secured = firestore_emulator_factory(rules, fresh=True)
    base = f"{secured.url}/v1/projects/{project_id}/databases/(default)/documents"
    body = json.dumps({"fields": {"status": {"stringValue": "queued"}}})
    headers = {"Content-Type": "application/json"}
    # Unauthenticated REST calls obey the rules...
    assert requests.patch(f"{base}/open/d", data=body, headers=headers, timeout=10).status_code == 200
    assert requests.patch(f"{base}/closed/d", data=body, headers=headers, timeout=10).status_code == 403
    # ...while the admin client (Bearer owner) bypasses them.
    admin = secured.client(project_id)
    try:
        admin.document("closed/d").set({"status": "queued"})
        assert admin.document("closed/d").get().exists
    finally:
        emu.close_firestore(admin)

    pgid = secured.pid
    secured.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # nothing of its process group (the Java child included) is left
    assert not emu.port_open(secured.host, secured.port)


def test_the_firestore_emulators_java_runs_with_the_harness_options_then_the_users(
    emulator_logs, monkeypatch, project_id
):
    """C2 and G1 off (JVM_OPTIONS: most of an emulator's CPU in a test run); an option of the user's own comes
    after them, so it wins, and a collector of the user's is the only one (a review: with two, the JVM refused to
    start, and so did every emulator). The `java` launcher itself says which options it took."""
    assert emu.with_jvm_options({"JDK_JAVA_OPTIONS": "-Xmx512m"})["JDK_JAVA_OPTIONS"] == (
        "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx512m"
    )
    assert emu.with_jvm_options({"JAVA_TOOL_OPTIONS": "-XX:+UseParallelGC"})["JDK_JAVA_OPTIONS"] == (
        "-XX:TieredStopAtLevel=1"
    )
    monkeypatch.setenv("JDK_JAVA_OPTIONS", "-XX:+UseG1GC -Xmx512m")
    with emu.FirestoreEmulator(emulator_logs) as firestore_emulator:
        with emu.closing_firestore(firestore_emulator.client(project_id)) as client:
            client.document("jvm/options").set({"ok": True})
            assert client.document("jvm/options").get().to_dict() == {"ok": True}
        # Where its Java writes: its log, or under the Firebase CLI (the backend where gcloud is missing), the CLI's
        logs = [firestore_emulator.log_path, firestore_emulator._workdir / "firestore-debug.log"]
        said = "".join(log.read_text() for log in logs if log.is_file())
        assert "Picked up JDK_JAVA_OPTIONS: -XX:TieredStopAtLevel=1 -XX:+UseG1GC -Xmx512m" in said


def test_the_clis_java_takes_the_options_except_beside_the_storage_emulators_rules_runtime(tmp_path):
    """The CLI says each line its Storage rules runtime writes on stderr as an error: the launcher's note on the
    options would be one (tests/test_storage_rules.py runs that CLI). There they go on java's command line, through
    a `java` of the CLI's own first on its PATH (make dev runs Firestore beside that Storage emulator: without
    them, both took seconds more to start on two cores)."""
    from devtools.firebase_cli import FirebaseCli, setup

    def cli(*emulators: str) -> FirebaseCli:
        return FirebaseCli(
            tmp_path, tmp_path / "project", "demo-jvm", "http://127.0.0.1:9/runsync", emulators=emulators
        )

    assert cli("functions", "auth", "firestore").jvm and cli("firestore").jvm
    with_storage = cli("storage", "auth")
    assert not with_storage.jvm
    env = with_storage.process_env()
    java = Path(env["PATH"].split(os.pathsep)[0]) / "java"
    assert "JDK_JAVA_OPTIONS" not in env or env["JDK_JAVA_OPTIONS"] == os.environ.get("JDK_JAVA_OPTIONS")
    if not (setup.JDK / "bin" / "java").exists():
        pytest.skip("no Java runtime in .emulators/ (python3 scripts/setup_firebase_cli.py)")
    flags = subprocess.run(
        [str(java), "-XX:+PrintFlagsFinal", "-version"],
        env={k: v for k, v in env.items() if k not in ("JDK_JAVA_OPTIONS", "JAVA_TOOL_OPTIONS")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert flags.returncode == 0 and "Picked up" not in flags.stderr, flags.stderr
    assert re.search(r"\bTieredStopAtLevel\s+= 1\b", flags.stdout) and re.search(
        r"\bUseSerialGC\s+= true\b", flags.stdout
    )


def test_storage_emulator_runs_in_memory_on_a_given_port(emulator_logs):
    port = emu.free_port()
    with emu.StorageEmulator(emulator_logs, port=port, in_memory=True) as s:
        assert s.port == port and emu.http_status(s.url + "/") == 200
        pgid = s.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not emu.port_open(emu.HOST, port)


def test_free_ports_are_below_the_outgoing_connections_range_and_never_repeat():
    """CI: a port picked by the kernel for a free one (from the range it also gives outgoing connections) was
    taken by a connection before make dev's server could bind it ("port 39765 is already taken")."""
    from devtools import emulators

    ports = [emulators.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(port < emulators._ephemeral_low() for port in ports)


def test_parallel_test_processes_pick_free_ports_from_slices_of_their_own(monkeypatch):
    """`make test` runs the suite in several processes: a port one of them picked as free (handed to an emulator
    that binds it seconds later) must never be another's pick meanwhile. A subprocess inherits the slice."""
    monkeypatch.delenv(emu.FREE_PORTS_ENV, raising=False)
    slices = []
    for index in range(3):
        emu.use_port_slice(index, 3)
        low, high = (int(part) for part in os.environ[emu.FREE_PORTS_ENV].split("-"))
        assert all(low <= emu.free_port() < high for _ in range(20))
        slices.append(range(low, high))
        inherited = subprocess.run(
            [sys.executable, "-c", "from devtools import emulators; print(emulators.free_port())"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[1],
        )
        assert int(inherited.stdout) in slices[-1]
    assert slices[0].stop <= slices[1].start and slices[1].stop <= slices[2].start <= slices[2].stop
    assert slices[2].stop <= emu._ephemeral_low()


def _free_run(length: int) -> int:
    """The first of `length` consecutive ports, each free now, in this process's range."""

    def bindable(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind((emu.HOST, port))
            except OSError:
                return False
            return True

    start = emu.free_port()
    while not all(bindable(port) for port in range(start, start + length)):
        start += length
    return start


def test_ports_given_to_the_cli_are_never_its_own_picks(monkeypatch, tmp_path):
    """CI: make dev, run by a test that gave it ports on its command line (not bound yet), picked the Firebase
    CLI's other ports (hub, logging, websocket) among them; the CLI refused to start: "port taken"."""
    from devtools import firebase_cli

    base = _free_run(len(firebase_cli.PORT_NAMES))
    monkeypatch.setenv(emu.FREE_PORTS_ENV, f"{base}-{base + len(firebase_cli.PORT_NAMES)}")
    monkeypatch.setattr(emu, "_HANDED_OUT", set())  # as in a process just started
    given = dict(zip(("auth", "functions", "firestore", "hosting"), range(base, base + 4), strict=True))
    cli = firebase_cli.FirebaseCli(
        tmp_path / "logs", tmp_path / "firebase", "demo-ports", "http://127.0.0.1:1/runsync", ports=given
    )
    assert {name: cli.ports[name] for name in given} == given
    assert sorted(cli.ports.values()) == list(range(base, base + len(firebase_cli.PORT_NAMES)))


def test_every_emulator_the_cli_starts_listens_on_a_port_of_ours(tmp_path):
    """The Functions emulator also starts Eventarc's and Cloud Tasks' emulators, on 9299 and 9499 unless told: a
    second CLI (a make dev beside another, with --free-ports; the web tests' stack beside a make dev test's) failed
    to start ("listen EADDRINUSE 127.0.0.1:9299") and its stack fell back to the standalone Firestore."""
    import json

    from devtools import firebase_cli

    cli = firebase_cli.FirebaseCli(
        tmp_path / "logs", tmp_path / "firebase", "demo-ports", "http://127.0.0.1:1/runsync", hosting=True
    )
    emulators = json.loads((tmp_path / "firebase" / "firebase.json").read_text())["emulators"]
    listening = {name: spec["port"] for name, spec in emulators.items() if isinstance(spec, dict) and "port" in spec}
    assert set(listening) == {"auth", "functions", "firestore", "hub", "logging", "hosting", "eventarc", "tasks"}
    assert listening == {name: cli.ports[name] for name in listening}
    assert emulators["firestore"]["websocketPort"] == cli.ports["websocket"]


def test_ports_given_to_make_dev_are_never_its_free_picks(monkeypatch):
    """The same within make dev's own arguments: `--free-ports` beside given ports picks none of them."""
    from devtools import stack

    base = _free_run(len(stack.PORT_NAMES))
    monkeypatch.setenv(emu.FREE_PORTS_ENV, f"{base}-{base + len(stack.PORT_NAMES)}")
    given = [arg for i, name in enumerate(stack.PORT_NAMES[1:], 1) for arg in (f"--{name}-port", str(base + i))]
    for _ in range(5):  # one pick among 6 ports: a random one would be one of the given 5 times in 6
        monkeypatch.setattr(emu, "_HANDED_OUT", set())
        args = stack.parse_args(["--free-ports", *given])
        assert args.ports[stack.PORT_NAMES[0]] == base


def test_make_dev_ports_from_its_environment_empty_is_unset_and_a_bad_one_says_which(monkeypatch, capsys):
    """Audit: FIREGEN_DEV_WORKER_PORT exported empty (or not a number) ended make dev in a ValueError traceback."""
    from devtools import stack

    monkeypatch.setenv("FIREGEN_DEV_WORKER_PORT", "")
    assert stack.parse_args([]).ports["worker"] == 8000
    monkeypatch.setenv("FIREGEN_DEV_WORKER_PORT", " 8123 ")
    assert stack.parse_args([]).ports["worker"] == 8123
    for bad in ("abc", "0", "70000"):
        monkeypatch.setenv("FIREGEN_DEV_WORKER_PORT", bad)
        with pytest.raises(SystemExit) as stopped:
            stack.parse_args([])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"make dev: error: FIREGEN_DEV_WORKER_PORT must be a port number from 1 to 65535 (got '{bad}')" in err
        assert "Traceback" not in err
    monkeypatch.delenv("FIREGEN_DEV_WORKER_PORT")
    with pytest.raises(SystemExit):
        stack.parse_args(["--worker-port", "http"])
    assert "argument --worker-port: must be a port number from 1 to 65535 (got 'http')" in capsys.readouterr().err


def test_the_cli_gives_the_functions_time_to_load_on_a_busy_machine(monkeypatch, tmp_path):
    """Audit: under load the functions took past the CLI's 10 s to declare themselves, and make dev fell back to
    the stack without Functions. The CLI's own override is set (a value of the user's own is kept)."""
    from devtools import firebase_cli

    monkeypatch.delenv("FUNCTIONS_DISCOVERY_TIMEOUT", raising=False)
    cli = firebase_cli.FirebaseCli(tmp_path / "logs", tmp_path / "firebase", "demo-slow", "http://127.0.0.1:1/r")
    assert int(cli.process_env()["FUNCTIONS_DISCOVERY_TIMEOUT"]) >= 60
    # ...and its start waits that long beyond the others' (the review: a 60 s wait for "All emulators ready" cut
    # the 60 s discovery short).
    assert cli.start_timeout() == emu.START_TIMEOUT_S + int(cli.process_env()["FUNCTIONS_DISCOVERY_TIMEOUT"])
    monkeypatch.setenv("FUNCTIONS_DISCOVERY_TIMEOUT", "120")
    assert cli.process_env()["FUNCTIONS_DISCOVERY_TIMEOUT"] == "120"
    assert cli.start_timeout() == emu.START_TIMEOUT_S + 120


def test_a_start_waits_as_long_as_its_emulator_says(monkeypatch, tmp_path):
    """Mutation audit: nothing checked that a start waits `start_timeout()` (the Firebase CLI's: the others' and
    its functions' discovery) rather than EMULATOR_START_TIMEOUT alone."""

    class Slow(emu.Emulator):
        name = "slow"

        def command(self) -> list[str]:
            return [sys.executable, "-c", "import time; time.sleep(30)"]

        def is_ready(self) -> bool:
            return self._proc is not None and time.monotonic() - self.started_at > 1.5

        def start_timeout(self) -> float:
            return 20.0

    monkeypatch.setattr(emu, "START_TIMEOUT_S", 0.5)
    slow = Slow(tmp_path)
    slow.started_at = time.monotonic()
    try:
        slow.start()
        assert slow.last_start_seconds >= 1.4
    finally:
        slow.stop(grace=1)


def test_an_unknown_firegen_emulators_value_stops_the_run_once_with_one_line(tmp_path, monkeypatch):
    """A typo (`dokcer`) ran the emulators the `auto` way and said nothing: one usage error, before any test (an
    audit: tests needing no emulator ran first, and under pytest-xdist the run ended in INTERNALERRORs)."""
    monkeypatch.setenv("FIREGEN_EMULATORS", "Dokcer")
    with pytest.raises(ValueError, match="^FIREGEN_EMULATORS must be local, docker or auto, not 'dokcer'$"):
        emu.emulator_mode()
    (tmp_path / "test_sample.py").write_text(
        "def test_zero():\n    pass\n\ndef test_one(emulator_mode):\n    pass\n\ndef test_two(emulator_mode):\n    pass\n"
    )
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "FIREGEN_EMULATORS": "dokcer", "PYTHONPATH": f"{tests}{os.pathsep}{tests.parent}"}
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-c", os.devnull]
    for processes in ([], ["-n", "2"]):  # as `make test` runs it, too
        result = subprocess.run(
            [*command, *processes, "--rootdir", str(tmp_path), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        said = result.stdout + result.stderr
        assert result.returncode == pytest.ExitCode.USAGE_ERROR, said
        assert said.count("FIREGEN_EMULATORS must be local, docker or auto, not 'dokcer'") == 1, said
        assert "passed" not in said and "INTERNALERROR" not in said, said


@pytest.mark.parametrize(
    "setting,local_emulator,docker_answers,mode",
    [
        ("docker", True, False, "docker"),  # forced: even where a local emulator could run
        ("local", False, True, "local"),
        ("auto", True, True, "local"),
        ("auto", False, True, "docker"),
        ("auto", False, False, "local"),  # then the tests that need an emulator say it is missing
        (None, False, True, "docker"),  # auto is the default
        (None, True, True, "local"),
    ],
)
def test_firegen_emulators_chooses_local_processes_or_docker_compose(
    monkeypatch, setting, local_emulator, docker_answers, mode
):
    """README: `FIREGEN_EMULATORS=docker` runs both emulators from docker-compose.yml; `auto`, the default, does so
    only where no local Firestore emulator can be had and `docker info` answers. Both findings are stand-ins
    (this machine has a local emulator and no Docker engine, whatever a case needs); a forced mode asks neither."""
    asked: list[str] = []

    def backend() -> tuple[str, str]:
        asked.append("local emulator")
        if not local_emulator:
            raise emu.EmulatorUnavailable("no Firestore emulator here")
        return "binary", "/opt/cloud_firestore_emulator"

    def docker_available() -> bool:
        asked.append("docker info")
        return docker_answers

    monkeypatch.setattr(emu, "firestore_backend", backend)
    monkeypatch.setattr(emu, "docker_available", docker_available)
    if setting is None:
        monkeypatch.delenv("FIREGEN_EMULATORS", raising=False)
    else:
        monkeypatch.setenv("FIREGEN_EMULATORS", setting)
    assert emu.emulator_mode() == mode
    if setting in ("docker", "local"):
        assert asked == []


# A stand-in for the docker CLI (no Docker engine here): each call recorded with the ports it was handed.
FAKE_DOCKER = """#!/bin/sh
echo "$FIRESTORE_EMULATOR_PORT $STORAGE_EMULATOR_PORT $*" >> "$DOCKER_CALLS"
"""


def interpolated(text: str, env: dict[str, str]) -> str:
    """docker-compose.yml's `${VAR:-default}`, read as compose reads it."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], text)


def test_docker_mode_publishes_each_emulator_on_the_port_the_harness_looks_for_it(monkeypatch, tmp_path):
    """README: `FIREGEN_EMULATORS=docker` runs both emulators from docker-compose.yml. No Docker engine runs here:
    `docker` is a stand-in that records its calls, and the services count as answering. What is checked is the
    harness's side: it brings up the repository's compose file (and takes it down), hands compose the host ports
    it picked, and docker-compose.yml publishes each emulator on that port of 127.0.0.1 (the Storage emulator's
    URLs with it), which is where the tests' clients are pointed."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "docker").write_text(FAKE_DOCKER)
    (tools / "docker").chmod(0o755)
    calls = tmp_path / "docker-calls"
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CALLS", str(calls))
    monkeypatch.setattr(emu.DockerService, "is_ready", lambda self: True)
    compose_file = Path(__file__).resolve().parent.parent / "docker-compose.yml"
    compose = emu.DockerCompose(compose_file, tmp_path)
    with compose.up() as (firestore_service, storage_service):
        assert len(calls.read_text().splitlines()) == 1  # up, and nothing else yet
    ports = {"FIRESTORE_EMULATOR_PORT": str(firestore_service.port), "STORAGE_EMULATOR_PORT": str(storage_service.port)}
    handed = " ".join(ports.values())
    assert calls.read_text().splitlines() == [
        f"{handed} compose -f {compose_file} -p {compose.project} up -d --wait",
        f"{handed} compose -f {compose_file} -p {compose.project} down -v",
    ]
    assert firestore_service.port != storage_service.port
    services = yaml.safe_load(interpolated(compose_file.read_text(), ports))["services"]
    for service in (firestore_service, storage_service):
        [published] = services[service.service]["ports"]
        host, port, inside = published.split(":")
        assert f"{host}:{port}" == service.host_port  # FIRESTORE_EMULATOR_HOST, STORAGE_EMULATOR_HOST's host
        command = services[service.service]["command"]  # and the container's emulator listens on its side
        assert any(arg.endswith((f"-port={inside}", f"0.0.0.0:{inside}")) for arg in command), command
    storage_command = services["storage"]["command"]
    assert f"-external-url={storage_service.url}" in storage_command
    assert f"-public-host={storage_service.host_port}" in storage_command
