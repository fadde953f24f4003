"""`make dev` end to end: `python -m devtools.stack` as a subprocess, on free ports and a project of its own (so a
developer's `make dev` and other tests can run beside it), acting as the contract's client.

- Through the Firebase CLI's Auth, Functions and Firestore emulators: the two examples, then `make submit` and a
  refused request against the running stack, then Ctrl-C.
- The fallback without the CLI, with `--once`.
- A worker killed under it: said, restarted (a bounded number of times), its job finished by the new one.
- The client's wait for a job's end when its listener goes silent (as the emulator's Listen stream can).

Each run must leave no process and no port behind: every process the stack starts inherits a marker variable
from it, and none may carry it after the stack exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from fixtures_stack import running_stack

from devtools import emulators as emu
from devtools import firebase_cli, web
from devtools.client import Client, StackInfo, firestore_client, post_runsync, state_of
from devtools.client import main as client_main
from devtools.stack import IMAGE_EXAMPLE, function_settings

ROOT = Path(__file__).resolve().parent.parent
MARK = "FIREGEN_DEV_STACK_TEST"


class StackRun:
    """The command line, environment and ports of one `python -m devtools.stack` run."""

    def __init__(self, tmp_path: Path, *flags: str):
        self.out = tmp_path / "dev"
        # As a user in the repository types it: relative to where the stack starts (ROOT).
        self.given = os.path.relpath(self.out, ROOT)
        self.ports = {
            name: emu.free_port() for name in ("auth", "functions", "firestore", "storage", "worker", "hosting")
        }
        self.mark = uuid.uuid4().hex
        self.cmd = [
            sys.executable,
            "-m",
            "devtools.stack",
            "--out",
            self.given,
            "--project",
            emu.unique_id("demo-devstack"),
            *flags,
            *(arg for name, port in self.ports.items() for arg in (f"--{name}-port", str(port))),
        ]
        self.env = {**os.environ, MARK: self.mark, "PYTHONUNBUFFERED": "1"}

    def processes(self) -> dict[int, str]:
        """pid → command line of each process that carries this run's marker."""
        found = {}
        needle = f"{MARK}={self.mark}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    found[int(proc.name)] = (
                        (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    )
            except OSError:
                continue
        return found

    def worker_pid(self) -> int:
        """The worker's process (`python -m listener`), which the stack started."""
        (pid,) = [pid for pid, command in self.processes().items() if " -m listener " in command]
        return pid

    def left_behind(self) -> list[str]:
        """Processes that still carry this run's marker, and ports still taken."""
        found = [f"port {port} ({name})" for name, port in self.ports.items() if emu.port_open(emu.HOST, port)]
        return found + [f"pid {pid}: {command[:120]}" for pid, command in self.processes().items()]


def read_doc(info: StackInfo, path: str) -> dict:
    """A doc of the stack's Firestore, read as admin by a client closed after it (see emu.close_firestore)."""
    db = firestore_client(info)
    try:
        return db.document(path).get().to_dict() or {}
    finally:
        emu.close_firestore(db)


def statuses(output: str, file_uid: str) -> list[str]:
    return re.findall(rf"^\[{file_uid}\]\s+[\d.]+s  (\w+)", output, re.M)


def assert_examples_done(output: str, out: Path) -> None:
    """Both of the contract's examples went queued → processing → completed, and their files decode."""
    import av
    from PIL import Image

    order = ["queued", "processing", "completed"]
    for file_uid in ("test-img-001", "test-vid-001"):
        seen = statuses(output, file_uid)
        # A listener is not promised every state: a doc claimed within moments of its write may first be seen
        # `processing` (snapshots coalesce). What is seen never goes back, and it goes through processing.
        assert seen and "processing" in seen and seen[-1] == "completed", output
        assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), output
    with Image.open(out / "test-img-001.png") as image:
        assert (image.format, image.size) == ("PNG", (512, 512))
    with av.open(str(out / "test-vid-001.mp4")) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 16
        assert stream.average_rate == 8 and (stream.width, stream.height) == (512, 512)


@pytest.mark.skipif(
    firebase_cli.missing() is not None,
    reason=f"Firebase CLI emulators: {firebase_cli.missing()} (run `python3 scripts/setup_firebase_cli.py`)",
)
def test_make_dev_then_make_submit_a_refused_request_and_ctrl_c(tmp_path, capsys):
    run = StackRun(tmp_path)
    # The settings the worker and the functions share, from make dev's environment (before, the functions got
    # their params' defaults: the callable admitted what the worker refused). Wide enough for what runs here.
    shared = {
        "USER_MAX_RUNNING": "3",
        "USER_MAX_PENDING": "6",
        "USER_DAILY_BUDGET": "30",
        "RETENTION_DAYS": "7",
        "PLACEHOLDER_GRACE_SECONDS": "4",
    }
    run.env.update(shared)
    # The functions' own params too (before: their defaults, whatever make dev's environment said).
    functions_only = {"RUNPOD_TIMEOUT_SECONDS": "25", "MAX_DISPATCHES": "4"}
    run.env.update(functions_only)
    state = run.out / "stack.json"
    with running_stack(run.cmd, run.env) as stack, contextlib.ExitStack() as closing:
        output = stack.output
        assert "falling back" not in output
        assert f"settings the worker and the functions share: {' '.join(f'{k}={v}' for k, v in shared.items())}\n" in (
            output
        )
        assert "[test-img-001] generateWithRunPod answered accepted: Generation started" in output
        if web.missing() is None:  # the Hosting emulator serves the web app (tests/test_web_app.py drives it)
            assert f"web app: http://127.0.0.1:{run.ports['hosting']}/\n" in output
        assert_examples_done(output, run.out)
        info = StackInfo(**json.loads(state.read_text()))
        assert info.auth == f"127.0.0.1:{run.ports['auth']}" and info.functions
        storage = f"127.0.0.1:{run.ports['storage']}"
        if firebase_cli.missing_storage() is None:
            # The CLI's own Storage emulator (storage.rules, the Firebase Storage API the JS SDK calls), and the
            # worker's token URLs in Firebase's form on it, as getDownloadURL() gives there.
            assert info.storage_emulator == "firebase-cli" and f", storage {storage}, " in output
            assert "gcp-storage-emulator" not in output
            assert f"[test-img-001] http://{storage}/v0/b/{info.bucket}/o/generating%2F" in output
        else:
            assert info.storage_emulator == "gcp-storage-emulator"
            assert "make dev: the Firebase CLI's Storage emulator cannot run (" in output

        submit = subprocess.run(  # make submit, as README says (through the callable)
            [
                "make",
                "--no-print-directory",
                "submit",
                "PROMPT=a lighthouse at dusk",
                'OPTIONS={"width": 256, "height": 256}',
                f"SUBMIT_ARGS=--stack {state}",
            ],
            env=run.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "generateWithRunPod answered accepted" in submit.stdout and "completed" in submit.stdout
        first_state = re.search(r"\] +\d+\.\ds  \w+", submit.stdout)  # "[id]   0.1s  queued", or processing
        assert first_state and submit.stdout.index("answered accepted") < first_state.start(), submit.stdout
        saved = re.search(r"saved (\S+\.png)", submit.stdout)
        assert saved and (ROOT / saved.group(1)).is_file()

        # A request the contract refuses, as the contract's client sample sends it: the rules let the doc in
        # (the worker's contract is the judge), the callable answers invalid-argument with the contract's message
        # and fails the doc with the contract's error fields, which the client reads on it.
        client = closing.enter_context(Client(info))
        capsys.readouterr()
        request = {"prompt": "too wide", "file_uid": "too-wide-1", "use_cloud_storage": True, "width": 2048}
        assert client.generate(request)["status"] == "failed" and client.failures == 1
        said = capsys.readouterr().out
        assert "PERMISSION_DENIED" not in said
        assert (
            "[too-wide-1] generateWithRunPod refused it (INVALID_ARGUMENT): width must be between 256 and 1024" in said
        )
        assert "[too-wide-1] failed (ValidationError): width must be between 256 and 1024" in said
        # In the order of events: the call's answer, then the failed doc it recorded (the lines came in any order).
        assert said.index("refused it (INVALID_ARGUMENT)") < said.index("s  failed\n"), said
        assert "[too-wide-1] taken from the queue" not in said  # the newcomer audit: it never ran
        # The client sample's camelCase options name a video too (the newcomer audit: `make submit` watched
        # images/ and exited 1, silently, while the video ran under videos/).
        camel = dict(numFrames=16, videoWidth=256, videoHeight=256, numInferenceSteps=10)
        video = client.generate({"prompt": "waves", "file_uid": "camel-1", "use_cloud_storage": True, **camel})
        assert video["status"] == "completed" and video["video_info"]["width"] == 256 and client.failures == 1
        assert firebase_cli.call(f"{info.functions}/generateWithRunPod", request, client.token) == {
            "error": {"message": "width must be between 256 and 1024", "status": "INVALID_ARGUMENT"}
        }
        doc = read_doc(info, f"generations/{client.uid}/images/too-wide-1")
        assert (doc["status"], doc["error"], doc["generated"], doc["error_type"]) == (
            "failed",
            True,
            False,
            "ValidationError",
        )
        assert doc["error_message"] == "width must be between 256 and 1024" and "failed_at" in doc
        assert abs(doc["expire_at"] - doc["failed_at"] - timedelta(days=7)) < timedelta(minutes=1)  # RETENTION_DAYS
        # A field the rules refuse (the newcomer audit: the rules' refusal named nothing, and the callable's failed
        # doc was said "not written", beside the failed status the client had just shown).
        bogus = {"prompt": "a kite", "file_uid": "bogus-1", "use_cloud_storage": True, "bogus": 1}
        assert client.generate(bogus)["status"] == "failed"
        said = capsys.readouterr().out
        unknown = "Validation failed: unknown field 'bogus'"
        assert f"[bogus-1] firestore.rules refused the queued doc (PERMISSION_DENIED): {unknown}" in said
        assert f"[bogus-1] failed (ValidationError): {unknown}" in said and "not written" not in said
        assert client.generate({**bogus, "file_uid": "bogus-2"}, via="document") is None
        said = capsys.readouterr().out
        assert f"[bogus-2] firestore.rules refused the queued doc (PERMISSION_DENIED): {unknown}" in said
        assert "[bogus-2] no result to watch: the job's doc was not written" in said

        # USER_DAILY_BUDGET reached the functions: the callable itself refuses a video that costs more than the
        # whole budget (about 44 GPU-seconds), naming make dev's 30 (the params' default, 600, admitted it).
        costly = {"prompt": "a long video", "file_uid": "costly-1", "num_frames": 81, "num_inference_steps": 50}
        refused = firebase_cli.call(f"{info.functions}/generateWithRunPod", costly, client.token)["error"]
        assert refused["status"] == "RESOURCE_EXHAUSTED", refused
        assert "(USER_DAILY_BUDGET)" in refused["message"] and "the whole daily budget of 30;" in refused["message"]
        # Whoever wrote the user's usage doc last (the callable or the worker), its limits are make dev's.
        usage = read_doc(info, f"usage/{client.uid}")
        assert usage["limits"] == {"max_running": 3, "max_pending": 6, "daily_budget": 30}
        env_file = (run.out / "firebase" / "functions" / ".env.local").read_text().splitlines()
        assert all(f"{k}={v}" in env_file for k, v in {**shared, **functions_only}.items()), env_file
        assert "settings for the functions: RUNPOD_TIMEOUT_SECONDS=25 MAX_DISPATCHES=4\n" in output
    output = stack.output
    assert stack.proc.returncode == 0, output
    assert "stopping..." in output and "all processes stopped" in output
    assert not state.exists()
    assert run.left_behind() == []


def test_make_dev_passes_on_the_words_the_functions_take_for_on_and_off():
    for word in ("on", "off", "1", "0", "TRUE", "false", "yes", "No"):
        assert function_settings({"ENFORCE_APP_CHECK": word}) == {"ENFORCE_APP_CHECK": word.lower()}
    assert function_settings({"ENFORCE_APP_CHECK": " "}) == {}


@pytest.mark.parametrize(
    "name,value,said",
    [
        (
            "USER_MAX_PENDING",
            "five",
            "USER_MAX_PENDING must be a whole number from 1 to 1000000 (got 'five'): the worker and the functions read it",
        ),
        # The worker would take it; the functions' int param would not.
        (
            "USER_DAILY_BUDGET",
            "30.5",
            "USER_DAILY_BUDGET must be a whole number from 1 to 1000000000 (got '30.5'): the worker and the functions "
            "read it",
        ),
        (
            "USER_MAX_RUNNING",
            "0",
            "USER_MAX_RUNNING must be a whole number from 1 to 1000000 (got '0'): the worker and the functions read it",
        ),
        # "No limit" as an operator may write it: past what Firestore holds in the usage doc.
        (
            "USER_MAX_PENDING",
            "99999999999999999999",
            "USER_MAX_PENDING must be a whole number from 1 to 1000000 (got '99999999999999999999'): the worker and "
            "the functions read it",
        ),
        (
            "RETENTION_DAYS",
            "-1",
            "RETENTION_DAYS must be a number of days from 0 to 36500 (got '-1'): the worker and the functions read it",
        ),
        (
            "PLACEHOLDER_GRACE_SECONDS",
            "2.5",
            "PLACEHOLDER_GRACE_SECONDS must be a whole number from 0 to 60 (got '2.5'): the worker and the functions "
            "read it",
        ),
        # The functions' own params (passed on from make dev's environment where set).
        (
            "RUNPOD_ATTEMPTS",
            "three",
            "RUNPOD_ATTEMPTS must be a whole number from 1 to 10 (got 'three'): the functions read it",
        ),
        ("ENFORCE_APP_CHECK", "maybe", "ENFORCE_APP_CHECK must be on or off (got 'maybe'): the functions read it"),
    ],
)
def test_make_dev_names_a_bad_shared_setting_in_one_line(tmp_path, name, value, said):
    """A setting the worker and the functions read, set wrong in make dev's environment: one line naming it, exit
    code 1, nothing started (before, the worker's start failed with its log's tail, or the functions took it)."""
    run = StackRun(tmp_path)
    result = subprocess.run(run.cmd, env={**run.env, name: value}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (result.stdout, result.stderr) == (f"make dev: {said}\n", "")
    assert run.left_behind() == []


def test_make_dev_names_a_taken_port_and_the_way_around_it_before_starting_anything(tmp_path):
    """Another process holds a port make dev needs (another make dev, a dev server on 5000...): one line naming it
    and `--free-ports`, exit code 1, nothing started (before: the emulators started, and 15 s later one line with
    no way around it; a taken hosting port sent it to the fallback, which needs the same port)."""
    import socket

    run = StackRun(tmp_path, "--no-firebase-cli")
    with socket.socket() as holder:
        holder.bind((emu.HOST, run.ports["worker"]))
        holder.listen()
        result = subprocess.run(run.cmd, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    # Who holds it, where /proc says (here: this test's own process), so that a newcomer can stop it (the newcomer
    # audit: a make dev killed with SIGKILL left its processes holding the ports, found by hand).
    me = os.getpid()
    assert result.stderr == "" and result.stdout.startswith(
        f"make dev: port {run.ports['worker']} (worker) already taken by pid {me} ("
    )
    assert result.stdout.endswith(
        f'): stop it (kill {me}), or run beside it with DEV_ARGS="--free-ports" (or --worker-port N)\n'
    )
    assert result.stdout.count("\n") == 1
    assert not (run.out / "logs").exists() and run.left_behind() == []


def test_make_dev_once_without_the_firebase_cli(tmp_path):
    """The fallback (`--no-firebase-cli`, or where the CLI cannot run): the standalone Firestore emulator, the
    image posted to runsync by the client, the video found by the worker's listener; `--once` then exits."""
    try:
        emu.firestore_backend()
    except emu.EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    import socket

    run = StackRun(tmp_path, "--once", "--no-firebase-cli")
    # Beside another running make dev (--free-ports), whose folder is the default one: this run takes its own
    # (the newcomer audit: the second wrote over the first's page settings and stack.json, and removed them).
    other = run.out.with_name("other")
    other.mkdir()
    with socket.socket() as firestore:
        firestore.bind((emu.HOST, 0))
        firestore.listen()
        other_state = json.dumps({"firestore": f"{emu.HOST}:{firestore.getsockname()[1]}"})
        (other / "stack.json").write_text(other_state)
        cmd = [arg for arg in run.cmd if arg not in ("--out", run.given)]
        env = {**run.env, "FIREGEN_DEV_OUT": str(other)}
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert (other / "stack.json").read_text() == other_state and sorted(os.listdir(other)) == ["stack.json"]
    run.out = other.with_name(f"other-{run.ports['hosting']}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    stack = run.out / "stack.json"  # a command that runs as it stands: PROMPT= left out, make submit refuses it
    assert (
        f"make dev: {other} is another running make dev's; this one's is {run.out} (make submit PROMPT='...' SUBMIT_ARGS=\"--stack {stack}\")\n"
        in output
    )
    assert output.count("make dev: the Firebase CLI cannot run (--no-firebase-cli):") == 1
    assert (
        f"starting the Storage emulator (PyPI gcp-storage-emulator, no rules) on 127.0.0.1:{run.ports['storage']}"
        in output
    )
    assert "[test-img-001] runsync answered COMPLETED" in output
    if web.missing() is None:  # a static server for the web app
        assert f"web app: http://127.0.0.1:{run.ports['hosting']}/\n" in output
    assert_examples_done(output, run.out)
    assert "all processes stopped" in output and not (run.out / "stack.json").exists()
    assert run.left_behind() == []


def test_make_dev_restarts_a_killed_worker_even_while_it_restarts_then_gives_up_after_its_restarts(tmp_path):
    """`kill -9` of the worker: `make dev` says so in one line and starts another on the same port, which finishes
    the job the killed one had accepted (from the queue in Firestore). One that dies while it is being started
    again is tried again, within --worker-restarts (before, the failed start ended `make dev` after one restart).
    The next death past them ends `make dev` (exit code 1), saying why, and leaves nothing behind. (The fallback:
    the quicker stack to start; the watch is the same under the Firebase CLI.)"""
    try:
        emu.firestore_backend()
    except emu.EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    # A video model that is no model (an empty folder: this test runs no video): its start's warnings are said on
    # the terminal, where a newcomer looks, at each start (they were in the worker's log alone).
    no_model = tmp_path / "no-video-model"
    no_model.mkdir()
    run = StackRun(
        tmp_path, "--no-firebase-cli", "--no-examples", "--worker-restarts", "2", "--video-model", str(no_model)
    )
    with running_stack(run.cmd, run.env) as stack:
        info = StackInfo(**json.loads((run.out / "stack.json").read_text()))
        missing = (
            f"make dev: the worker warns: model_not_available (text2video): Video model folder {no_model} not found"
        )
        assert emu.wait_until(lambda: missing in stack.output, 10, 0.05), stack.output
        import torch

        no_gpu = "make dev: the worker warns: no_gpu: torch sees no CUDA device: the full models run on the CPU"
        assert (no_gpu in stack.output) != torch.cuda.is_available(), stack.output
        job = {**IMAGE_EXAMPLE, "file_uid": "killed-worker-1", "width": 256, "height": 256}
        assert post_runsync(info.runsync_url, job)["output"]["status"] == "accepted"
        killed = run.worker_pid()
        os.kill(killed, signal.SIGKILL)
        assert emu.wait_until(lambda: "restarting it (1 of 2)" in stack.output, 60, 0.05), stack.output
        assert f"make dev: the worker (pid {killed}) was killed by SIGKILL (log " in stack.output
        assert "; restarting it (1 of 2). A job it was running goes back to the queue" in stack.output

        def starting() -> list[int]:
            return [pid for pid, cmd in run.processes().items() if " -m listener " in cmd and pid != killed]

        assert emu.wait_until(starting, 30, 0.02), stack.output
        os.kill(starting()[0], signal.SIGKILL)  # before it is ready (loading its models takes seconds)
        assert emu.wait_until(lambda: "make dev: the worker is back" in stack.output, 120, 0.2), stack.output
        assert "make dev: the restarted worker did not start (" in stack.output
        assert "; restarting it (2 of 2)" in stack.output
        path = f"generations/{job['user_id']}/images/killed-worker-1"
        assert emu.wait_until(lambda: read_doc(info, path).get("status") == "completed", 120, 0.5)

        restarted = run.worker_pid()
        assert restarted != killed
        os.kill(restarted, signal.SIGKILL)
        assert emu.wait_until(lambda: stack.proc.poll() is not None, 90, 0.2), stack.output
    output = stack.output
    assert stack.proc.returncode == 1, output
    assert (
        f"make dev: the worker (pid {restarted}) was killed by SIGKILL (log " in output
        and "after 2 restart(s) (--worker-restarts 2): stopping everything; run `make dev` again" in output
    ), output
    assert output.count("make dev: the worker is back") == 1 and "all processes stopped" in output
    assert output.count(missing) == 2, output  # the first start's, and the restart's
    assert run.left_behind() == []


def kill_and_expect_the_end(run: StackRun, pick: Callable[[StackRun], int], said: str) -> None:
    """`kill -9` of a process `make dev` does not restart (`pick` finds it once the stack runs): it ends (exit
    code 1) saying `said` ({pid}: the killed process) and to run it again, and leaves nothing behind."""
    with running_stack(run.cmd, run.env) as stack:
        pid = pick(run)
        os.kill(pid, signal.SIGKILL)
        assert emu.wait_until(lambda: stack.proc.poll() is not None, 90, 0.2), stack.output
    output = stack.output
    assert stack.proc.returncode == 1, output
    assert said.format(pid=pid) in output, output
    assert ": stopping everything; run `make dev` again" in output and "all processes stopped" in output
    assert run.left_behind() == []


def test_make_dev_ends_saying_so_when_an_emulator_dies(tmp_path):
    """An emulator is not restarted (its data went with it): `make dev` says which process died and how, stops
    the rest and exits 1."""
    try:
        emu.firestore_backend()
    except emu.EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    run = StackRun(tmp_path, "--no-firebase-cli", "--no-examples")

    def storage(run: StackRun) -> int:
        (pid,) = [pid for pid, cmd in run.processes().items() if "storage_emulator" in cmd.replace("-", "_")]
        return pid

    kill_and_expect_the_end(run, storage, "make dev: the Storage emulator (pid {pid}) was killed by SIGKILL (log ")


@pytest.mark.skipif(
    firebase_cli.missing() is not None,
    reason=f"Firebase CLI emulators: {firebase_cli.missing()} (run `python3 scripts/setup_firebase_cli.py`)",
)
def test_make_dev_ends_saying_so_when_the_clis_firestore_emulator_dies(tmp_path):
    """The Firebase CLI outlives a Java emulator killed under it: `make dev` watches the CLI's ports too (before,
    it ran on silently with no Firestore)."""
    run = StackRun(tmp_path, "--no-examples")

    def java(run: StackRun) -> int:
        (pid,) = [pid for pid, cmd in run.processes().items() if "firestore" in cmd and "java" in cmd]
        return pid

    said = f"the Firebase CLI's firestore (port {run.ports['firestore']}) emulator stopped answering"
    kill_and_expect_the_end(run, java, said)


def firestore_only(firestore_emulator, firestore_client, **more) -> StackInfo:
    """A stack of the Firestore emulator alone, for the client's own logic."""
    return StackInfo(
        project=firestore_client.project,
        firestore=firestore_emulator.host_port,
        storage="",
        bucket="",
        runsync_url="",
        out=".",
        **more,
    )


@contextlib.contextmanager
def writing(worker: Callable[[], None]) -> Iterator[None]:
    """`worker` (what a worker writes) in a thread of its own, ended before the test's Firestore client closes,
    failed or not: a call in flight on a gRPC channel being closed can crash the test process (a CI run's did)."""
    helper = threading.Thread(target=worker, daemon=True)
    helper.start()
    try:
        yield
    finally:
        helper.join(60)
        assert not helper.is_alive(), "the worker's writes did not end"


def test_the_client_sees_the_end_of_a_job_its_listener_missed(firestore_emulator, firestore_client, capsys):
    """The emulator's Listen stream for a doc can stall around the doc's first write (seen under `make dev --once`:
    the worker completed the video while its listener never got a message after the queued doc, and the client
    said "no result after 300 s"). Here the listener is made to go silent after its first state, as that one did:
    the client still sees each state it reads, in order, and the end well before its timeout."""
    from google.cloud.firestore_v1.document import DocumentReference

    real = DocumentReference.on_snapshot

    def stalling(ref, callback):  # the first state (no doc yet), then nothing
        heard: list = []
        return real(ref, lambda *args: None if heard else heard.append(callback(*args)))

    info = firestore_only(firestore_emulator, firestore_client)
    request = {"prompt": "a stalled listener", "user_id": "u1", "file_uid": "stalled-1", "use_cloud_storage": True}
    doc = firestore_client.document("generations/u1/images/stalled-1")

    def worker() -> None:  # what a worker writes: processing, then completed
        assert emu.wait_until(lambda: doc.get().exists, 30, 0.05)
        doc.update({"status": "processing", "progress": 0.5})
        doc.update({"status": "completed", "progress": 1.0, "generated": True, "images": []})

    with writing(worker), mock.patch.object(DocumentReference, "on_snapshot", stalling), Client(info) as client:
        started = time.monotonic()
        final = client.generate(request, via="document", timeout=30)
    said = capsys.readouterr().out
    assert final is not None and final["status"] == "completed", said
    assert client.failures == 0 and time.monotonic() - started < 20, said
    seen = statuses(said, "stalled-1")
    order = ["queued", "processing", "completed"]
    assert seen[-1] == "completed" and [order.index(s) for s in seen] == sorted(order.index(s) for s in seen), said
    assert "no result" not in said


def test_a_client_that_stops_waiting_says_where_the_job_stands(firestore_emulator, firestore_client, capsys):
    """A job longer than the client's wait (a big video on the tiny model on a CPU): it said only "no result after
    300 s", as if the job were lost. It now says the job's state and progress, that it goes on in the worker, and
    how to wait longer."""
    info = firestore_only(firestore_emulator, firestore_client, web_url="http://127.0.0.1:5000/")
    request = {"prompt": "a long video", "user_id": "u1", "file_uid": "long-1", "use_cloud_storage": True}
    doc = firestore_client.document("generations/u1/images/long-1")
    written = threading.Event()

    def worker() -> None:  # 40%, then the steps done: a video's decode and encode, the upload, take their time
        assert emu.wait_until(lambda: doc.get().exists, 30, 0.05)
        doc.update({"status": "processing", "progress": 0.4})
        doc.update({"status": "processing", "progress": 1.0})
        written.set()

    with writing(worker), Client(info) as client:
        final = client.generate(request, via="document", timeout=3)
    said = capsys.readouterr().out
    assert written.is_set() and final is None and client.failures == 1, said
    assert re.search(r"^\[long-1\]\s+[\d.]+s  processing 100%, finishing$", said, re.M), said
    assert (
        "[long-1] no result after 3 s: the job is processing 100%, finishing and goes on in the worker (wait longer "
        "with SUBMIT_ARGS='--wait 1800' or watch it in the web app (http://127.0.0.1:5000/))"
    ) in said, said


def test_the_client_says_a_docs_state_as_the_web_app_does():
    assert state_of({"status": "queued", "progress": 0}) == "queued"
    assert state_of({"status": "processing"}) == "processing"
    assert state_of({"status": "processing", "progress": 0.4}) == "processing 40%"
    assert state_of({"status": "processing", "progress": 1.0}) == "processing 100%, finishing"
    assert state_of({"status": "completed", "progress": 1.0}) == "completed"


def test_make_submit_wait_must_be_a_positive_number(capsys):
    for bad in ("0", "-5", "soon", "nan"):
        with pytest.raises(SystemExit) as exited:
            client_main(["--prompt", "x", "--wait", bad])
        assert exited.value.code == 2
        assert f"argument --wait: a number of seconds above 0 (got '{bad}')" in capsys.readouterr().err


def test_a_process_logs_harness_lines_are_json_and_its_tail_is_its_latest_start(tmp_path):
    """make dev's worker log held `===== start #2 ...` lines among the worker's JSON (a log shipper or jq choked on
    them); the tail shown when a start fails is still only the latest start's output."""
    log = tmp_path / "worker.log"
    first = emu._mark("harness_process_started", start=1, command="python -m listener")
    second = emu._mark("harness_process_started", start=2, command="python -m listener")
    stopped = emu._mark("harness_process_stopped", start=1, exit_code=-9)
    # Appended as the harness appends them: a start after an unended line (a killed process) starts a line of its
    # own, and no blank line comes before a mark (audit: each log began with one, which a JSON-lines reader refuses).
    for part in (first, b'{"event": "earlier"}\n', stopped, b'{"event": "cut short', second, b'{"event": "later"}\n'):
        with open(log, "ab") as out:
            out.write((emu._line_start(log) if part.startswith(b'{"event": "harness') else b"") + part)
    lines = log.read_text().splitlines()
    assert all(json.loads(line)["event"] for line in lines if line != '{"event": "cut short')
    assert lines[0] == first.decode().strip() and "" not in lines
    tail = emu._tail(log)
    assert "earlier" not in tail and tail.splitlines()[1] == '{"event": "later"}'
    assert json.loads(tail.splitlines()[0])["start"] == 2


def test_the_warnings_make_dev_says_are_its_workers_latest_start_up_ones_one_line_each(tmp_path):
    """Only the latest start's, up to `worker_ready`; a library's said as its own (its text on one line: the Hub's
    offline warning is two), the worker's with what it names."""
    from devtools.worker import WorkerProcess

    worker = WorkerProcess(tmp_path, {})
    hub = "Couldn't connect to the Hub: [Errno -2] Name or service not known.\nWill try to load from local cache."
    lines = [
        emu._mark("harness_process_started", start=1, command="python -m listener"),
        {"event": "no_gpu", "severity": "WARNING", "note": "an earlier start's"},
        emu._mark("harness_process_started", start=2, command="python -m listener"),
        {"event": "reconciler_started", "severity": "INFO"},
        {"event": "no_gpu", "severity": "WARNING", "note": "torch sees no CUDA device"},
        {"event": hub, "severity": "WARNING", "logger": "diffusers.pipelines.pipeline_utils"},
        {"event": "model_not_available", "severity": "ERROR", "task_type": "text2video", "error": "not found"},
        "not JSON: a line a crash printed",
        {"event": "worker_ready", "severity": "INFO"},
        {"event": "job_failed", "severity": "ERROR", "error": "a job's, after the start"},
    ]
    worker.log_path.write_bytes(
        b"".join(
            line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode() + b"\n"
            for line in lines
        )
    )
    assert worker.start_warnings() == [
        "no_gpu: torch sees no CUDA device",
        "diffusers: Couldn't connect to the Hub: [Errno -2] Name or service not known. Will try to load from local cache.",
        "model_not_available (text2video): not found",
    ]


def test_make_dev_waits_for_the_video_models_load_and_says_its_failure_too(tmp_path):
    """The video model loads after `worker_ready` (`loading`), in the background: its failure, said before that
    line, is said after it now, up to `models_loaded`; a later job's is not a start-up warning."""
    from devtools.worker import WorkerProcess

    worker = WorkerProcess(tmp_path, {})
    lines = [
        emu._mark("harness_process_started", start=1, command="python -m listener"),
        {"event": "no_gpu", "severity": "WARNING", "note": "torch sees no CUDA device"},
        {"event": "worker_ready", "severity": "INFO", "loading": ["text2video"]},
        {"event": "job_failed", "severity": "ERROR", "error": "a job's, while the video model loads"},
    ]
    worker.log_path.write_bytes(
        b"".join(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n" for line in lines)
    )
    assert worker.loading()
    later = [
        {"event": "model_not_available", "severity": "ERROR", "task_type": "text2video", "error": "not found"},
        {"event": "models_loaded", "severity": "INFO", "task_types": [], "failed": ["text2video"]},
        {"event": "job_failed", "severity": "ERROR", "error": "a job's, after the start"},
    ]
    with worker.log_path.open("a") as log:
        log.write("".join(json.dumps(line) + "\n" for line in later))
    assert not worker.loading()
    assert worker.start_warnings() == [
        "no_gpu: torch sees no CUDA device",
        "model_not_available (text2video): not found",
    ]


@pytest.mark.parametrize("options", ['{"width": 768,}', "[1]", "768"])
def test_make_submit_with_options_that_are_no_json_object_says_so(tmp_path, capsys, options):
    """A review: `make submit OPTIONS='{"width": 768,}'` ended in a JSONDecodeError traceback."""
    from devtools import client

    state = tmp_path / "stack.json"
    assert client.main(["--prompt", "x", "--options", options, "--stack", str(state)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make submit: OPTIONS must be a JSON object") and "Traceback" not in err
    state.write_text('{"project": "p"')  # a state file cut short
    assert client.main(["--prompt", "x", "--stack", str(state)]) == 2
    assert capsys.readouterr().err == f"make submit: {state} is no stack state file (start `make dev` again)\n"


def test_make_submit_without_a_prompt_says_how_to_give_one(tmp_path):
    """The newcomer audit: `make submit` alone sent a job with an empty prompt (refused, a failed doc in the user's
    history). Left out, PROMPT is a usage error; given empty (PROMPT=""), it is sent, for the contract to refuse."""
    env = {k: v for k, v in os.environ.items() if k != "PROMPT"}
    stamp = [f"--old-file={ROOT / '.venv' / '.installed'}"]  # never a set-up here
    result = subprocess.run(["make", "-s", *stamp, "submit"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith('make submit: PROMPT is required, e.g. make submit PROMPT="a lighthouse at dusk"')
    given = subprocess.run(
        ["make", "-n", *stamp, "submit", "PROMPT=", f"SUBMIT_ARGS=--stack {tmp_path / 'none.json'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert given.returncode == 0 and '-m devtools.client --prompt ""' in given.stdout, given.stdout + given.stderr
    # The README's `SUBMIT_ARGS=--help` lists the flags; it needs no prompt (it said PROMPT is required).
    usage = subprocess.run(
        ["make", "-s", *stamp, "submit", "SUBMIT_ARGS=--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert usage.returncode == 0 and usage.stderr == "", usage.stderr
    assert usage.stdout.startswith("usage: make submit") and "--via {callable,document}" in usage.stdout
