"""What the logs say where something nobody expected breaks: a bug in a job, in a callable, in an inline request, a
CUDA error, and torch's own warnings. The platforms read these lines (RunPod's log view, Cloud Logging and Error
Reporting): each is one JSON entry, at the level an alert reads, saying where it was raised (a logs review)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from fixtures_scheduling import StubGenerator, read, results  # noqa: F401  (fixtures)
from test_reconciler import write_job

from devtools import firebase_cli
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import JobKey
from listener import handler as handler_module
from listener import lease as lease_module
from listener import runner as runner_module
from listener.handler import RunsyncHandler
from listener.runner import JobRunner
from listener.worker import Worker

FUNCTIONS = Path(__file__).resolve().parents[1] / "functions"


class Buggy(StubGenerator):
    def generate(self, request, progress=None):
        pipeline: dict = {}
        return pipeline["unet"]  # a bug of ours


def job_failed(monkeypatch, run) -> dict:
    """The `job_failed` entry `run()` logs, its traceback formatted as the worker's JSON chain does. Captured, not
    configured: the worker's configuration in this process would bind loggers that cache it (structlog's
    `cache_logger_on_first_use`) to this test's output, closed after it, for every later test of the process."""
    monkeypatch.setattr(lease_module, "log", structlog.get_logger("listener.lease"))
    with structlog.testing.capture_logs() as logs:
        run()
    [failed] = [line for line in logs if line["event"] == "job_failed"]
    return structlog.processors.format_exc_info(None, "error", failed)


def test_a_job_a_bug_failed_logs_where_it_was_raised(firestore_client, results, monkeypatch):
    """`job_failed` said `Unexpected error during generation: 'unet'` at ERROR, and nothing of where, nor what kind
    of job ran how long."""
    key = JobKey("u1", "images", "buggy")
    write_job(firestore_client, key)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    failed = job_failed(monkeypatch, lambda: JobRunner(store, Buggy(), results).run(store.claim(key)))
    assert (failed["log_level"], failed["error_type"]) == ("error", "Exception")
    assert "in generate" in failed["exception"] and "KeyError: 'unet'" in failed["exception"]
    assert failed["task_type"] == "text2image" and failed["seconds"] >= 0
    assert read(firestore_client, key)["status"] == "failed"


def test_a_job_whose_document_a_bug_could_not_read_logs_where_it_was_raised(firestore_client, results, monkeypatch):
    """The same where reading the job's document raised (a stand-in for a bug there: none is known to raise)."""

    def unreadable(*args):
        return {}["width"]

    monkeypatch.setattr(runner_module, "parse_document", unreadable)
    key = JobKey("u1", "images", "unreadable")
    write_job(firestore_client, key)
    store = WorkerJobs(firestore_client, worker_id="w1", lease_seconds=30)
    failed = job_failed(monkeypatch, lambda: JobRunner(store, StubGenerator(), results).run(store.claim(key)))
    assert "in unreadable" in failed["exception"] and "KeyError: 'width'" in failed["exception"]


# A callable whose dispatch raises what nothing answers, called as the Functions SDK calls it.
UNHANDLED = """
import main, owner_calls
from flask import Flask, request
def bug(*args, **kwargs):
    return {}["missing"]
owner_calls.cancel = bug
with Flask("probe").test_request_context("/", method="POST", json={"data": {"fileUid": "f", "mediaType": "images"}}):
    reply = main.cancelGeneration(request)
    print("STATUS", reply.status_code, reply.get_json())
"""


@pytest.mark.skipif(not firebase_cli.FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_a_callables_unexpected_error_is_one_entry_with_its_traceback_function_and_user():
    """The SDK's own entry was `Unhandled error: 'missing'` alone: no traceback (Error Reporting takes none without
    one), no function, no user. The client's answer is the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FUNCTIONS_EMULATOR="true", GCLOUD_PROJECT="demo-firegen", PYTHONPATH=str(FUNCTIONS))
    env.update(FIRESTORE_EMULATOR_HOST="127.0.0.1:1", RUNPOD_ENDPOINT_ID="x")
    done = subprocess.run(
        [str(firebase_cli.FUNCTIONS_PYTHON), "-c", UNHANDLED],
        cwd=FUNCTIONS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "STATUS 500 {'error': {'message': 'INTERNAL', 'status': 'INTERNAL'}}" in done.stdout, done
    entries = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith("{")]
    errors = [entry for entry in entries if entry["severity"] == "ERROR"]
    assert len(errors) == 1, errors  # one entry per failure: an alert counts each once
    [entry] = errors
    assert entry["message"].startswith("cancelGeneration\nTraceback (most recent call last):")
    assert "KeyError: 'missing'" in entry["message"] and entry["logger"] == "functions"


def test_an_inline_request_a_bug_failed_is_an_error_with_its_message(monkeypatch):
    """It was `request_refused` at INFO with no message, where the same failure of a queued job is `job_failed` at
    ERROR: an alert on ERROR never saw it."""
    inline = {"prompt": "a car", "use_cloud_storage": False, "width": 256, "height": 256}
    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(handler_module, "log", structlog.get_logger("listener.handler"))
        answer = RunsyncHandler(store=None, submit=None, generator=Buggy()).handle(inline)
    assert answer["status"] == "failed"
    [refused] = [line for line in logs if line["event"] == "request_refused"]
    assert (refused["log_level"], refused["error_type"]) == ("error", "Exception")
    assert refused["error_message"] == "Unexpected error during generation: 'unet'"


def test_device_failed_says_which_cuda_error():
    """The job is released, not failed, so no doc says it either: an ECC error (the host's) read as an assert
    (ours)."""
    said = []
    worker = SimpleNamespace(_leave=lambda event, failure, **fields: said.append((event, fields)))
    Worker.device_failed(worker, RuntimeError("CUDA error: uncorrectable ECC error encountered\nCUDA kernel errors"))
    [(event, fields)] = said
    assert event == "device_failed" and fields["error_type"] == "RuntimeError"
    assert fields["error"].startswith("CUDA error: uncorrectable ECC error encountered")


# torch gives its loggers a plain-text stderr handler at import (torch._logging); the worker's are JSON.
TORCH_LOGS = """
import logging
from listener.logs import configure
configure("w1", "INFO")
from generation.engine import quiet_loading
quiet_loading()
logging.getLogger("torch._dynamo.convert_frame").warning("torch._dynamo hit config.recompile_limit (%s)\\n   x", 8)
logging.getLogger("torch._inductor.utils").warning("not enough SMs to use max_autotune_gemm mode")
logging.getLogger("torch._dynamo.convert_frame").debug("below the level: not written")
"""


def test_torchs_own_loggers_write_json_events_not_plain_text():
    """The background compile's warnings came out as `W1206 11:58:14.077000 ...] ...`, a line per line."""
    done = subprocess.run([sys.executable, "-c", TORCH_LOGS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(event["logger"], event["severity"]) for event in events] == [
        ("torch._dynamo.convert_frame", "WARNING"),
        ("torch._inductor.utils", "WARNING"),
    ], events
    assert events[0]["message"] == "torch._dynamo hit config.recompile_limit (8)\n   x"


TORCH_LOGS_ASKED = """
import logging
from listener.logs import configure
configure("w1", "INFO")
from generation.engine import quiet_loading
quiet_loading()
from torch._logging import _internal as torch_logs
torch_logs.getArtifactLogger("torch._dynamo.guards", "recompiles").debug("Recompiling function forward: x changed")
"""


def test_torch_logs_an_operator_asks_for_are_still_written():
    """TORCH_LOGS=recompiles (or +dynamo) sets torch's loggers to DEBUG and torch's handler wrote them; routed to the
    worker's handler, which stops at LOG_LEVEL (INFO), they went nowhere."""
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    done = subprocess.run(
        [sys.executable, "-c", TORCH_LOGS_ASKED], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "Recompiling function forward: x changed" in done.stdout + done.stderr, done
