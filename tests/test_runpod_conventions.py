"""RunPod's conventions: the root test_input.json runs through the SDK's `--test_input` on the emulators, and the
Hub's .runpod/tests.json scenario (inline generation, no Firebase behind the worker) passes, both on tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from google.cloud.firestore import SERVER_TIMESTAMP

from firegen_core.contract import parse_runsync_input

ROOT = Path(__file__).resolve().parent.parent
TEST_INPUT = json.loads((ROOT / "test_input.json").read_text())
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())


def run_test_input(body: dict, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m listener --test_input '<json>'`, as README says; tiny models, the default tiny cache."""
    base = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    env = {**base, "IMAGE_MODEL": "tiny", "VIDEO_MODEL": "tiny", "SHUTDOWN_GRACE_SECONDS": "60", **env}
    return subprocess.run(
        [sys.executable, "-m", "listener", "--test_input", json.dumps(body)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_test_input_is_a_contract_request():
    request = parse_runsync_input(TEST_INPUT["input"])
    assert request.task_type == "text2image" and request.seed == 42
    # Inline: `--test_input` exits as soon as the handler answers, so the result must come back in the answer.
    assert request.use_cloud_storage is False


def test_test_input_runs_locally_against_the_emulators(emulator_env, firestore_client):
    # A job of the project's own, queued: a one-shot local test must leave it alone (an audit saw each run claim
    # such a job, hold it through the shutdown grace and release it, until its releases failed it).
    queued = firestore_client.document("generations/someone/images/not-for-the-test")
    queued.set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "a red car", "width": 256})
    done = run_test_input(TEST_INPUT, emulator_env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "Local testing complete" in out
    assert "'status': 'completed'" in out and "'seed': 42" in out and "'image_count': 1" in out
    # Inline generation writes no job doc, and is logged.
    key = TEST_INPUT["input"]
    assert not firestore_client.document(f"generations/{key['user_id']}/images/{key['file_uid']}").get().exists
    [completed] = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "inline_completed"]
    assert (completed["file_uid"], completed["task_type"]) == (key["file_uid"], "text2image")
    left = queued.get().to_dict()
    assert left["status"] == "queued" and not {"attempts", "releases", "worker_id"} & left.keys(), left


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_hub_test_passes_with_no_firebase_behind_the_worker():
    """The Hub runs tests.json on a GPU without any Firebase project: inline generation must still work."""
    [test] = HUB_TESTS["tests"]
    assert parse_runsync_input(test["input"]).use_cloud_storage is False
    env = {item["key"]: item["value"] for item in HUB_TESTS["config"]["env"]}
    assert env["VIDEO_MODEL"] == "none"
    # Nothing listens where the emulator variables point (here: ports nobody holds), as on the Hub.
    env.update(
        FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{_closed_port()}",
        STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_closed_port()}",
    )
    done = run_test_input({"input": test["input"]}, {**env, "SHUTDOWN_GRACE_SECONDS": "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "'status': 'completed'" in out and "'image_count': 1" in out
    # The libraries' own warnings (here transformers', torchvision being absent, as in the image) are JSON lines
    # too, not their plain-text handlers' "[transformers] ..." on stderr.
    assert "[transformers]" not in done.stderr and "[diffusers]" not in done.stderr


@pytest.mark.parametrize("key", ["title", "description", "type", "category", "config"])
def test_hub_json_has_what_the_hub_requires(key):
    assert HUB[key]
    assert HUB["type"] == "serverless" and HUB["category"] in ("image", "video")
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["allowedCudaVersions"] == HUB_TESTS["config"]["allowedCudaVersions"]
    # cu128 torch wheels in the image: CUDA 12.8 or newer only (README "On RunPod Serverless").
    assert min(tuple(map(int, v.split("."))) for v in config["allowedCudaVersions"]) >= (12, 8)


def test_the_hubs_description_asks_for_a_longer_idle_timeout():
    """hub.json has no idle-timeout field, and RunPod's default (5 s) stops a worker mid-video (the handler answers
    before the work ends): a Hub deploy reads what to set in the description (the deploy review)."""
    assert "idle timeout" in HUB["description"] and "5 s" in HUB["description"]


def test_the_endpoint_settings_name_what_keeps_a_worker_generating():
    """A review of RunPod's lifecycle: Request count scaling counts RunPod's own requests, answered at once here,
    so it keeps no worker for a Firestore job; a backlog outlasts any idle timeout; a first start that downloads
    the models outlasts RunPod's 7-minute start unless RUNPOD_INIT_TIMEOUT says more. The Hub's description and
    the README's endpoint settings say so."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "Queue delay" in HUB["description"] and "active workers" in HUB["description"]
    assert "- **auto-scaling type**: Queue delay." in readme and "keep active workers for a backlog" in readme
    assert "`RUNPOD_INIT_TIMEOUT=1800`" in readme


def test_the_hubs_root_handler_py_is_the_worker():
    """The RunPod Hub looks for a root handler.py: it must run the same worker as the Dockerfile's CMD."""
    import importlib.util

    import listener.__main__

    spec = importlib.util.spec_from_file_location("hub_handler", ROOT / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is listener.__main__.main


def test_the_worker_imports_the_sdk_without_its_cpu_probe(emulator_env):
    """The SDK's import asks py-cpuinfo for the processor's name (only --rp_debugger shows it), and py-cpuinfo
    starts an interpreter of its own to answer: 1.3 s of CPU on each worker start. The worker reads the name from
    /proc/cpuinfo instead, and leaves py-cpuinfo as it found it. On RunPod's job loop, where the start deadline's
    unhealthy report is the SDK's first import (a review: the probe still ran there); the engine is stood in for
    by one that stops the start, as a card the speed options refuse does."""
    code = """
import sys
import cpuinfo

def probe():
    sys.exit("py-cpuinfo's probe ran")

cpuinfo.get_cpu_info = probe
import generation.engine

class Refused:
    def __init__(self, config):
        raise ValueError("the start ends here")

generation.engine.Engine = Refused
from listener.__main__ import main
from listener.startup import processor_name

code = main([])
from runpod.serverless.utils import rp_debugger

assert rp_debugger.PROCESSOR == processor_name() != "", rp_debugger.PROCESSOR
assert cpuinfo.get_cpu_info is probe
sys.exit(code)
"""
    env = {**emulator_env, "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/$ID", "RUNPOD_POD_ID": "probe"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the start ends here" in done.stderr
