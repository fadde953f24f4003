"""The worker in its production mode: the RunPod SDK's own job loop (`runpod.serverless.start` without
`--rp_serve_api`), which takes jobs from RunPod's job API, posts their outputs back, pings, runs the fitness
checks and installs its own SIGTERM handling.

RunPod's job API cannot run here (it is RunPod's hosted service), so `JobApi` is a small stand-in for it,
started by the test: the SDK is pointed at it through its own environment variables (RUNPOD_WEBHOOK_GET_JOB,
RUNPOD_WEBHOOK_POST_OUTPUT, RUNPOD_WEBHOOK_PING, RUNPOD_POD_ID, RUNPOD_AI_API_KEY), and everything on the
worker's side (the SDK's get-job, post-output and ping calls, its loop, the handler, the reconciler) is real,
on the Firestore and Storage emulators with the tiny models.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import runpod
from fixtures_http import LocalServer, QuietHandler
from fixtures_keys import pem_body, service_account_key
from google.api_core.exceptions import Cancelled
from google.cloud.firestore import SERVER_TIMESTAMP
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from devtools import emulators as emu
from devtools.worker import REPO, WorkerProcess

API_KEY = "rpa_TESTKEY0123456789abcdefSECRET"
POD = "test-pod"
HOLD_SECONDS = 2.0  # the job-take long poll, as RunPod's holds a request open until a job comes


class JobApi(LocalServer):
    """A stand-in for RunPod's job API: job-take (single and batch, each queued job handed out once, held
    open up to HOLD_SECONDS like the real long poll), job-done (outputs recorded), job-stop, ping."""

    def __init__(self):
        self.jobs: queue.Queue[dict] = queue.Queue()
        self.outputs: dict[str, dict] = {}
        self.takes: list[dict] = []  # each take that handed out jobs: batch size asked, ids, outputs posted before
        self.pings: list[dict] = []
        self.auth: set[str | None] = set()
        self.failing = 0  # job-takes still to answer 503 (an outage of the job API)
        self.failed: list[float] = []  # when each of those came
        self.lock = threading.Lock()
        api = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                url = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                api.auth.add(self.headers.get("Authorization"))
                if "/job-take" in url.path:
                    with api.lock:
                        if api.failing:
                            api.failing -= 1
                            api.failed.append(time.monotonic())
                            return self.reply(503, {"error": "unavailable"})
                    batch = "/job-take-batch/" in url.path
                    jobs = api.take(int(params.get("batch_size", 1)) if batch else 1)
                    if not jobs:
                        return self.reply(204)
                    return self.reply(200, jobs if batch else jobs[0])
                if "/job-stop/" in url.path:
                    time.sleep(0.5)
                    return self.reply(204)
                if "/ping/" in url.path:
                    with api.lock:
                        api.pings.append(params)
                    return self.reply(200, {})
                return self.reply(404)

            def do_POST(self):
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                api.auth.add(self.headers.get("Authorization"))
                if "/job-done/" in url.path:
                    job_id = url.path.rstrip("/").split("/")[-1]
                    with api.lock:
                        api.outputs[job_id] = json.loads(body)
                    return self.reply(200, {})
                return self.reply(404)

        super().__init__(Handler)
        self.base = f"{self.origin}/v2/test-endpoint"

    def take(self, count: int) -> list[dict]:
        jobs = []
        try:
            jobs.append(self.jobs.get(timeout=HOLD_SECONDS))
            while len(jobs) < count:
                jobs.append(self.jobs.get_nowait())
        except queue.Empty:
            pass
        if jobs:
            with self.lock:
                self.takes.append({"asked": count, "ids": [j["id"] for j in jobs], "posted": len(self.outputs)})
        return jobs

    def queue_runsync(self, job_id: str, job_input: dict) -> None:
        self.jobs.put({"id": job_id, "input": job_input})

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_POD_ID": POD,
            "RUNPOD_AI_API_KEY": API_KEY,
            "RUNPOD_ENDPOINT_ID": "test-endpoint",
            "RUNPOD_PING_INTERVAL": "1000",
            # The SDK's own GPU and system checks need a GPU and the internet: ours is what is tested here.
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }


@pytest.fixture
def job_api():
    api = JobApi()
    yield api
    api.close()


@pytest.fixture
def project(firestore_emulator, storage_emulator):
    project = emu.unique_id("demo-loop")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("loop-bucket"))
    return project, bucket.name


def worker_env(firestore_emulator, storage_emulator, project, job_api, cache, key_json=None) -> dict[str, str]:
    project_id, bucket = project
    env = {
        **emu.emulator_env(firestore_emulator, storage_emulator, project_id, bucket),
        **job_api.env(),
        "FIREGEN_CACHE": str(cache),
    }
    if key_json:
        env["FIREBASE_SERVICE_ACCOUNT_JSON"] = key_json
    return env


def image_input(file_uid: str, **more) -> dict:
    return {
        "prompt": "A sunset over mountains",
        "user_id": "loop-user",
        "file_uid": file_uid,
        "use_cloud_storage": True,
        "width": 256,
        "height": 256,
        "num_inference_steps": 10,
        **more,
    }


def doc(firestore_emulator, project, path: str) -> dict:
    client = firestore_emulator.client(project[0])  # polled: each read's client closed, not left to the GC
    try:
        return client.document(path).get().to_dict() or {}
    finally:
        emu.close_firestore(client)


def fault_worker(fault, firestore_emulator, storage_emulator, emulator_logs, cache, job_api, project) -> WorkerProcess:
    """The production worker in RunPod's job loop with a fault of tests/fault_worker.py, and no model (it starts
    quicker)."""
    return WorkerProcess(
        emulator_logs,
        {**worker_env(firestore_emulator, storage_emulator, project, job_api, cache), "FAULT": fault},
        serve_api=False,
        module="tests.fault_worker",
        IMAGE_MODEL="none",
        VIDEO_MODEL="none",
    )


def run_to_its_exit(fault: str, stack: tuple, job_id: str, file_uid: str) -> tuple[WorkerProcess, int | None]:
    """A fault worker (`stack`: the emulators, logs, cache, job API and project fixtures, in fault_worker's order)
    given one image runsync, run until it exits (60 s at most): the worker and its exit code."""
    job_api = stack[4]
    worker = fault_worker(fault, *stack)
    worker.start()
    try:
        job_api.queue_runsync(job_id, image_input(file_uid))
        return worker, worker.wait_exit(60)
    finally:
        worker.stop()


def queue_in_firestore(firestore_emulator, project, file_uid: str) -> str:
    """A doc queued in Firestore (not RunPod's queue): its path."""
    path = f"generations/loop-user/images/{file_uid}"
    client = firestore_emulator.client(project[0])
    try:
        client.document(path).set({**image_input(file_uid), "status": "queued", "created_at": SERVER_TIMESTAMP})
    finally:
        emu.close_firestore(client)
    return path


def assert_untouched(firestore_emulator, project, path: str) -> None:
    """Still queued, never claimed: left for a healthy worker."""
    job = doc(firestore_emulator, project, path)
    assert job["status"] == "queued" and "worker_id" not in job and not job.get("attempts"), job


def json_lines(worker: WorkerProcess) -> list[dict]:
    return [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]


def events_of(worker: WorkerProcess) -> list[dict]:
    return [line for line in json_lines(worker) if "event" in line]


def ended_by_sigterm(worker: WorkerProcess) -> int | None:
    """SIGTERM, as RunPod stops a worker: its exit code (None: not within 30 s), the worker stopped either way."""
    worker.signal(signal.SIGTERM)
    code = worker.wait_exit(30)
    worker.stop()
    return code


def test_runsync_jobs_go_through_the_sdk_loop_several_at_once(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    key_json, _ = service_account_key(project[0])
    for n in range(4):
        job_api.queue_runsync(f"rp-job-{n}", image_input(f"loop-{n}"))
    worker = WorkerProcess(
        emulator_logs,
        worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache, key_json),
        serve_api=False,
        URL_STYLE="token",
        RUNSYNC_CONCURRENCY="4",
    )
    worker.start()
    try:
        assert emu.wait_until(lambda: len(job_api.outputs) == 4, 60), worker.log_tail()
        for n in range(4):
            output = job_api.outputs[f"rp-job-{n}"].get("output", job_api.outputs[f"rp-job-{n}"])
            assert (output["status"], output["file_uid"]) == ("accepted", f"loop-{n}")
        # The concurrency_modifier: one take asked for 4 and got all 4 before any output was posted.
        assert {"asked": 4, "ids": [f"rp-job-{n}" for n in range(4)], "posted": 0} in job_api.takes
        assert job_api.auth == {API_KEY}  # the SDK's calls carry RUNPOD_AI_API_KEY
        assert emu.wait_until(lambda: job_api.pings, 10)  # the SDK's heartbeat reached the stand-in
        paths = [f"generations/loop-user/images/loop-{n}" for n in range(4)]
        assert emu.wait_until(
            lambda: all(doc(firestore_emulator, project, p).get("status") == "completed" for p in paths), 60
        )
        urls = [doc(firestore_emulator, project, p)["image_url"] for p in paths]
    finally:
        code = ended_by_sigterm(worker)
    assert code == 0
    # Every line of the worker's log is JSON: the SDK's start banner and gRPC's notes (a plain line each before)
    # included, and the harness's own start/stop lines.
    plain = [line for line in worker.log_path.read_text().splitlines() if line and not line.startswith("{")]
    assert plain == []
    assert [line["event"] for line in json_lines(worker) if line.get("logger") == "devtools.harness"] == [
        "harness_process_started",
        "harness_process_stopped",
    ]
    lines = json_lines(worker)
    ours = [line for line in lines if "event" in line]
    sdk = [line for line in ours if line["event"] == "runpod_sdk"]
    said = [line["said"] for line in sdk]
    banner = said.index(f"Starting Serverless Worker |  Version {runpod.__version__}")
    # The fitness checks (the SDK's runner, ours among them) before anything was claimed, and not run again.
    checked = [n for n, line in enumerate(ours) if line.get("said", "").startswith("All fitness checks passed")]
    first_claim = min(n for n, line in enumerate(ours) if line["event"] in ("job_claimed", "worker_ready"))
    assert len(checked) == 1 and checked[0] < first_claim and said.index(ours[checked[0]]["said"]) < banner
    # The SDK's own logger, through ours (its JSON on RunPod has no `severity`): a job's lines carry its id.
    assert {line["requestId"] for line in sdk if line.get("requestId")} >= {f"rp-job-{n}" for n in range(4)}
    assert all(line["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in sdk)
    assert [(line["code"], line["reason"]) for line in ours if line["event"] == "worker_exit"] == [(0, "shutdown")]
    assert ours and all(line["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in ours)
    assert all(line["message"] == line["event"] for line in ours)
    accepted = {line["requestId"]: line["file_uid"] for line in ours if line["event"] == "request_accepted"}
    assert accepted == {f"rp-job-{n}": f"loop-{n}" for n in range(4)}
    # The job's own lines, on the worker its runsync reached, carry that request's id too.
    for event in ("job_claimed", "job_started", "job_completed"):
        lines = {line["file_uid"]: line.get("requestId") for line in ours if line["event"] == event}
        assert lines == {f"loop-{n}": f"rp-job-{n}" for n in range(4)}, event
    # No secret in any line: the API key, the service account's private key, the download tokens.
    text = worker.log_path.read_text()
    tokens = [parse_qs(urlsplit(url).query)["token"][0] for url in urls]
    assert all(len(token) >= 32 for token in tokens)
    for secret in (API_KEY, pem_body(key_json), *tokens):
        assert secret not in text


def test_a_failing_job_api_is_asked_again_backed_off_then_its_job_runs(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path
):
    """The SDK's loop asked again at once after a failed job-take: with the job API out of reach a worker spun a
    core and wrote 91,324 `Failed to get job` lines in 35 s (a review). Now 1 s, 2 s, 4 s... between tries."""
    job_api.failing = 2
    job_api.queue_runsync("rp-after-outage", image_input("after-outage"))
    worker = WorkerProcess(
        emulator_logs,
        worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache),
        serve_api=False,
        VIDEO_MODEL=str(tmp_path),  # a folder with no model in it: said at start, the worker serves images
    )
    worker.start()
    try:
        assert emu.wait_until(lambda: "rp-after-outage" in job_api.outputs, 60), worker.log_tail()
        assert job_api.outputs["rp-after-outage"]["output"]["status"] == "accepted"
    finally:
        code = ended_by_sigterm(worker)
    assert code == 0
    gaps = [later - earlier for earlier, later in zip(job_api.failed, job_api.failed[1:])]
    assert len(job_api.failed) == 2 and gaps[0] >= 0.9, gaps
    said = [line for line in json_lines(worker) if line.get("event") == "runpod_job_api_unreachable"]
    assert [(line["failures"], line["retry_in_seconds"], line["severity"]) for line in said] == [
        (1, 1.0, "WARNING"),
        (2, 2.0, "WARNING"),
    ]
    assert said[0]["error_type"] == "ClientResponseError" and "503" in said[0]["error"]
    sdk = [line["said"] for line in json_lines(worker) if line.get("event") == "runpod_sdk"]
    assert not [line for line in sdk if line.startswith("Failed to get job")]
    # The README's start-up warnings: on RunPod with no CUDA device, and a model that could not be loaded.
    events = {line.get("event"): line for line in json_lines(worker)}
    assert events["no_gpu"]["severity"] == "WARNING"
    assert events["fitness_check_passed"]["severity"] == "INFO"
    ready = events["worker_ready"]  # where its results go, said once (a stray emulator host sends them nowhere)
    assert (ready["url_style"], ready["storage_emulator_host"]) == ("token", storage_emulator.url)
    assert (events["reconciler_started"]["listening"], events["reconciler_started"]["concurrency"]) == (True, 1)
    missing = events["model_not_available"]
    assert (missing["severity"], missing["task_type"]) == ("ERROR", "text2video")
    assert missing["error"] == f"Video model folder {tmp_path} not found or not a diffusers pipeline"
    # The video model loads once the worker is ready: its failure, and its load's end, said after `worker_ready`.
    names = [line.get("event") for line in json_lines(worker)]
    assert names.index("worker_ready") < names.index("model_not_available") < names.index("models_loaded")
    assert (events["models_loaded"]["task_types"], events["models_loaded"]["failed"]) == ([], ["text2video"])


def running_a_long_video(firestore_emulator, job_api, project, file_uid: str) -> str:
    """A video job through the job loop, once it is processing: many short steps, each of which sees a stop, for far
    longer than a shutdown's grace. Its doc's path."""
    path = f"generations/loop-user/videos/{file_uid}"
    video = {"prompt": "A drone shot", "user_id": "loop-user", "file_uid": file_uid, "use_cloud_storage": True}
    video |= {"num_frames": 81, "num_inference_steps": 50, "video_width": 256, "video_height": 256}
    job_api.queue_runsync(f"rp-{file_uid}", video)
    assert emu.wait_until(lambda: doc(firestore_emulator, project, path).get("status") == "processing", 60)
    return path


def test_sigterm_stops_claiming_releases_within_the_grace_and_exits_0(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    grace = 1.0
    worker = WorkerProcess(
        emulator_logs,
        worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache),
        serve_api=False,
        SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    worker.start()
    try:
        long_path = running_a_long_video(firestore_emulator, job_api, project, "long-job")
        worker.signal(signal.SIGTERM)
        # Written after the signal: a stopping worker never claims it (its slot frees when the job is released).
        # The emulator may answer a call made while the worker's streams are torn down with CANCELLED: send again.
        retry = Retrying(retry=retry_if_exception_type(Cancelled), stop=stop_after_attempt(3), reraise=True)
        with emu.closing_firestore(firestore_emulator.client(project[0])) as client:
            late = {"status": "queued", "prompt": "late", "created_at": time.time()}
            retry(client.document("generations/loop-user/images/after-term").set, late)
        assert emu.wait_until(lambda: doc(firestore_emulator, project, long_path).get("status") == "queued", 30)
        code = worker.wait_exit(30)
    finally:
        worker.stop()
    assert code == 0
    # The job-take poll was still open when the signal came: the release did not wait for the SDK's loop. As the
    # worker's own clock says it (the test's polls, under the parallel suite's load, took a second more).
    said = {name: json.loads(worker.events(name)[0])["timestamp"] for name in ("shutdown_started", "job_released")}
    released_after = datetime.fromisoformat(said["job_released"]) - datetime.fromisoformat(said["shutdown_started"])
    assert released_after.total_seconds() < grace + HOLD_SECONDS, said
    long_doc = doc(firestore_emulator, project, long_path)
    assert long_doc["attempts"] == 0 and "worker_id" not in long_doc
    assert doc(firestore_emulator, project, "generations/loop-user/images/after-term")["status"] == "queued"
    assert worker.events("job_released") and worker.events("reconciler_stopped")
    assert not [line for line in worker.events("job_claimed") if "after-term" in line]
    # Said once: the SDK's ping process, forked with the worker's signal handlers, said it too from its copy.
    assert len(worker.events("shutdown_started")) == 1


def test_a_second_sigterm_releases_the_running_job_at_once(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    """A review: on RunPod's job loop the SDK's own handler replaced the one a second signal released the running
    jobs by (as `test_worker_api` shows for the other modes): the job waited out the whole grace."""
    worker = WorkerProcess(
        emulator_logs,
        worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache),
        serve_api=False,
        SHUTDOWN_GRACE_SECONDS="120",
    )
    worker.start()
    try:
        long_path = running_a_long_video(firestore_emulator, job_api, project, "twice")
        worker.signal(signal.SIGTERM)
        assert emu.wait_until(lambda: worker.events("shutdown_started"), 30)
        worker.signal(signal.SIGTERM)
        assert emu.wait_until(lambda: doc(firestore_emulator, project, long_path).get("status") == "queued", 30)
        code = worker.wait_exit(60)  # far within the 120 s grace
    finally:
        worker.stop()
    assert code == 0, worker.log_tail()
    assert worker.events("shutdown_hurried") and worker.events("job_released")


def test_a_cuda_error_releases_the_job_and_ends_the_worker(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    worker, code = run_to_its_exit("job", stack, "rp-broken", "on-a-broken-card")
    assert code == 1, worker.log_tail()
    assert job_api.outputs["rp-broken"]["output"]["status"] == "accepted"
    job = doc(firestore_emulator, project, "generations/loop-user/images/on-a-broken-card")
    # Released, not failed: the job is fine, the card is not; another worker runs it.
    assert (job["status"], job["attempts"]) == ("queued", 0) and "error_type" not in job
    assert worker.events("device_failed") and worker.events("job_released")
    assert worker.events("job_failed") == []


def test_a_bucket_that_refuses_the_worker_mid_run_releases_the_job_and_ends_the_worker(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    """A resilience review: with the worker's grant on the bucket revoked while it ran, each job's upload was
    refused 403 after its generation, the job failed `ConnectionError` (charged), and the worker claimed the next:
    the queue drained into failures. The job goes back to the queue and the worker leaves (its replacement's
    start-up check refuses to start while the access is missing); the other queued job, claimed meanwhile where it
    was (a slot goes to the next claim as a generation ends), is released with it: none fails."""
    waiting = queue_in_firestore(firestore_emulator, project, "behind-it")
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    worker, code = run_to_its_exit("storage", stack, "rp-refused", "upload-refused")
    assert code == 1, worker.log_tail()
    refused = doc(firestore_emulator, project, "generations/loop-user/images/upload-refused")
    claimed = doc(firestore_emulator, project, waiting)
    ran = refused if refused.get("releases") else claimed  # the worker takes either first
    assert (ran["status"], ran["attempts"], ran["releases"]) == ("queued", 0, 1) and "error_type" not in ran, ran
    other = claimed if ran is refused else refused
    assert other["status"] == "queued" and not other.get("attempts"), other
    [said] = [line for line in json_lines(worker) if line["event"] == "storage_refused"]
    assert said["level"] == "error" and "403" in said["error"] and said["action"] == "release the job and exit"
    assert worker.events("job_released") and worker.events("job_failed") == []


def video_input(file_uid: str) -> dict:
    video = {"prompt": "A drone shot", "user_id": "loop-user", "file_uid": file_uid, "use_cloud_storage": True}
    return video | {"num_frames": 16, "num_inference_steps": 10, "video_width": 256, "video_height": 256}


GATED = {"video": ("videos", video_input), "image": ("images", image_input)}


def gated_worker(
    stack: tuple, gate: Path, gated: str = "video", serve_api: bool = False, **settings: str
) -> tuple[WorkerProcess, str, str, str]:
    """A worker whose `gated` model's load ("video" or "image") waits for `gate` (FAULT=gate-<gated>), both models
    `tiny`, started with a job of the other model queued in Firestore (its model loads first, the gated one in the
    background), and a runsync of the gated model, `rp-<gated>`, waiting in RunPod's queue; once it is ready, a job
    of the gated model queued too (newer than the other): the worker and the paths of the gated job, the other job
    and the runsync's job."""
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project = stack
    client, now = firestore_emulator.client(project[0]), datetime.now(UTC)
    other = next(kind for kind in GATED if kind != gated)
    paths = {}

    def queue(kind: str, name: str, age: float) -> None:
        media, make_input = GATED[kind]
        paths[kind] = f"generations/loop-user/{media}/{name}"
        queued = {"status": "queued", "created_at": now - timedelta(seconds=age)}
        client.document(paths[kind]).set(make_input(name) | queued)

    queue(other, "while-its-model-loads", 60)
    media, make_input = GATED[gated]
    job_api.queue_runsync(f"rp-{gated}", make_input("asked-by-runsync"))
    env = worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache)
    worker = WorkerProcess(
        emulator_logs,
        {**env, "FAULT": f"gate-{gated}", "FAULT_GATE": str(gate)},
        serve_api=serve_api,
        module="tests.fault_worker",
        **settings,
    )
    worker.start()
    queue(gated, "waits-for-its-model", 30)  # after the start: queued before it, its model would load first
    emu.close_firestore(client)
    return worker, paths[gated], paths[other], f"generations/loop-user/{media}/asked-by-runsync"


@pytest.mark.parametrize("gated", ["video", "image"])
def test_the_waiting_jobs_model_loads_first_and_the_others_jobs_stay_queued_while_it_loads(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path, gated
):
    """A cold start loaded SDXL (seconds) and Wan (tens of seconds) before the first claim: an image job waited for
    both, and so did a video. The worker loads first the model whose jobs wait (where only one's do), is ready once
    it is, and loads the other in the background (held here until the test opens its gate): that job runs
    meanwhile; the other model's job stays queued (for a worker that has its model: claimed here, it would hold the
    one slot waiting for the load) until its model is loaded, then runs here. That model's runsync is answered once it is
    loaded: RunPod counts a worker whose requests are all answered as idle, and would stop it (its idle timeout)
    before the load ended."""
    gate = tmp_path / "gate"
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    worker, gated_path, first_path, asked_path = gated_worker(stack, gate, gated)
    first, later = ("text2image", "text2video") if gated == "video" else ("text2video", "text2image")
    try:
        ready = json.loads(worker.events("worker_ready")[-1])
        assert (ready["loaded"], ready["loading"]) == ([first], [later])
        done = emu.wait_until(lambda: doc(firestore_emulator, project, first_path).get("status") == "completed", 60)
        assert done, worker.log_tail()
        assert emu.wait_until(lambda: doc(firestore_emulator, project, asked_path), 30)  # its runsync was taken
        assert_untouched(firestore_emulator, project, gated_path)
        assert_untouched(firestore_emulator, project, asked_path)
        assert f"rp-{gated}" not in job_api.outputs  # answered once its model is loaded
        gate.touch()
        for path in (gated_path, asked_path):
            done = emu.wait_until(lambda p=path: doc(firestore_emulator, project, p).get("status") == "completed", 60)
            assert done, worker.log_tail()
        assert job_api.outputs[f"rp-{gated}"].get("output", {}).get("status") == "accepted", job_api.outputs
    finally:
        code = ended_by_sigterm(worker)
    assert code == 0
    lines = events_of(worker)
    [loaded] = [line for line in lines if line["event"] == "models_loaded"]
    assert (loaded["task_types"], loaded["failed"], loaded["severity"]) == ([later], [], "INFO")
    claimed = [n for n, line in enumerate(lines) if line["event"] == "job_claimed"]
    assert [lines[n]["file_uid"] for n in claimed[:2]] == ["while-its-model-loads", "waits-for-its-model"]
    assert len(claimed) == 3 and lines.index(loaded) < claimed[1]
    assert len(worker.events("shutdown_started")) == 1  # not also from the SDK's forked ping process


def test_a_video_model_load_that_never_ends_ends_the_worker_at_the_starts_deadline(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path
):
    """A network volume that stalls the background load would leave the video jobs queued for good behind a worker
    that serves images. The load is held to what is left of the start's deadline (STARTUP_TIMEOUT_SECONDS): past
    it the worker says where the load was stuck and leaves (exit 1, for RunPod to replace it); the video job was
    never claimed, and the image job ran meanwhile; a video's runsync, held for the model, is answered as the
    worker leaves (it does not hold the process up)."""
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    # Waited out: the image model's load and its job end before it (4-6 s from its start here, beside a compile;
    # more under the parallel suite's load).
    worker, video_path, image_path, asked_path = gated_worker(stack, tmp_path / "never", STARTUP_TIMEOUT_SECONDS="20")
    try:
        code = worker.wait_exit(60)
    finally:
        worker.stop()
    assert code == 1, worker.log_tail()
    assert doc(firestore_emulator, project, image_path)["status"] == "completed"
    assert_untouched(firestore_emulator, project, video_path)
    assert_untouched(firestore_emulator, project, asked_path)
    lines = events_of(worker)
    [said] = [line for line in lines if line["event"] == "model_load_timed_out"]
    assert said["severity"] == "ERROR" and said["task_types"] == ["text2video"]
    assert said["error"] == "a model's load ran past the start's 20 s (STARTUP_TIMEOUT_SECONDS)"
    assert any(":gated_load:" in frame for frame in said["stuck_in"]), said["stuck_in"]
    [exit_line] = [line for line in lines if line["event"] == "worker_exit"]
    assert (exit_line["code"], exit_line["reason"], said["action"]) == (1, "model load timed out", "exit")
    assert len(worker.events("shutdown_started")) == 1  # not also from the SDK's forked ping process


def test_a_worker_stopped_while_its_video_model_loads_ends_cleanly(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path
):
    """RunPod stops a cold worker after its idle timeout whatever it is loading: torch in the loading thread at the
    interpreter's end aborted the process (exit 134, `terminate called without an active exception`: a crash to
    RunPod). It ends 0, as any shutdown, its video jobs left queued."""
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    worker, video_path, image_path, asked_path = gated_worker(stack, tmp_path / "never")
    try:
        done = emu.wait_until(lambda: doc(firestore_emulator, project, image_path).get("status") == "completed", 60)
        assert done, worker.log_tail()
        worker.signal(signal.SIGTERM)
        code = worker.wait_exit(30)
    finally:
        worker.stop()
    assert code == 0, worker.log_tail()
    assert_untouched(firestore_emulator, project, video_path)
    assert_untouched(firestore_emulator, project, asked_path)
    [exit_line] = [line for line in json_lines(worker) if line.get("event") == "worker_exit"]
    assert (exit_line["code"], exit_line["reason"]) == (0, "shutdown")


def test_an_inline_video_waiting_for_its_model_does_not_hold_the_workers_end_up(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path
):
    """The SDK's local API (as `make dev` runs the worker) waits for its open requests as it shuts down: an inline
    video waiting in its model's load held the worker's end up for good (a Ctrl-C, or the load's own deadline, ended
    nothing). It is refused once the worker leaves."""
    stack = (firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project)
    worker, *_ = gated_worker(stack, tmp_path / "never", serve_api=True)
    answers: list = []
    inline = {**video_input("inline-while-loading"), "use_cloud_storage": False}

    def requests_taken() -> int:  # the SDK's `Started.` line, one per request
        return len([line for line in json_lines(worker) if line.get("said") == "Started."])

    started = requests_taken()
    sending = threading.Thread(
        target=lambda: answers.append(requests.post(worker.runsync_url, json={"input": inline}, timeout=60).json()),
        daemon=True,
    )
    try:
        sending.start()
        assert emu.wait_until(lambda: requests_taken() > started, 30), worker.log_tail()
        worker.signal(signal.SIGINT)
        code = worker.wait_exit(30)
    finally:
        worker.stop()
    assert code == 0, worker.log_tail()
    sending.join(10)
    output = answers[0].get("output", answers[0]) if answers else {}
    assert output.get("error") == "The worker stopped before the generation finished; please retry", answers


def run_fault_worker(fault: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tests.fault_worker` with `fault` and no models, run to its end: it exits on its own (WorkerProcess waits
    for a server that stays up)."""
    env = {**env, "FAULT": fault, "IMAGE_MODEL": "none", "VIDEO_MODEL": "none", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_worker"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_failed_fitness_check_ends_the_worker_before_it_takes_a_job(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    job_api.queue_runsync("rp-never", image_input("never-taken"))
    # And one in Firestore's queue: the SDK ran the check after the listeners had started, and a worker that
    # could not write its results failed the docs it claimed meanwhile (an audit).
    queued = queue_in_firestore(firestore_emulator, project, "queued-in-firestore")
    # The models' load stalls too (a stand-in): the checks come first, so the worker exits without loading them (a
    # review of RunPod's lifecycle: a worker that cannot work paid for the load at each restart).
    env = {
        **worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache),
        "STARTUP_TIMEOUT_SECONDS": "20",
    }
    result = run_fault_worker("fitness,stall", env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"event": "startup_timed_out"' not in result.stdout
    assert '"event": "fitness_check_failed"' in result.stdout and '"event": "worker_exit"' in result.stdout
    assert "Fitness check failed: firegen_fitness_check" in result.stdout  # the SDK's line, through ours
    assert not job_api.takes and job_api.jobs.qsize() == 1  # the job stays with RunPod for a healthy worker
    assert any(ping.get("status") == "unhealthy" for ping in job_api.pings)  # the SDK told RunPod why
    assert_untouched(firestore_emulator, project, queued)
    assert '"event": "job_claimed"' not in result.stdout and '"event": "worker_ready"' not in result.stdout


def test_a_bug_in_the_sdks_loop_ends_the_worker_saying_so(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    """The deploy review: an exception out of the SDK's loop (here its start() raises) was a plain traceback on
    stderr after a `worker_exit` of code 0, reason shutdown: the platforms' last word was a clean exit."""
    result = run_fault_worker(
        "crash-sdk", worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache)
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    said = [e["event"] for e in events if e["event"] in ("reconciler_started", "worker_crashed", "worker_exit")]
    assert said == ["reconciler_started", "worker_crashed", "worker_exit"]
    [crashed] = [e for e in events if e["event"] == "worker_crashed"]
    assert crashed["severity"] == "ERROR" and crashed["exception"].endswith("RuntimeError: a bug in the SDK's loop")
    assert (events[-1]["event"], events[-1]["code"], events[-1]["reason"]) == (
        "worker_exit",
        1,
        "crashed: RuntimeError",
    )


def hanging_start(step: str, folder: Path) -> dict[str, str]:
    """The settings of a worker whose start hangs at `step`, with what hangs under `folder`."""
    if step == "checks":
        # A card whose driver hangs hangs `nvidia-smi`, which the SDK's system checks ask (with no time limit)
        # before anything else: a script on PATH that never answers (this machine has no driver to hang).
        smi = folder / "bin" / "nvidia-smi"
        smi.parent.mkdir()
        smi.write_text("#!/bin/sh\nexec sleep 300\n")
        smi.chmod(0o755)
        return {
            "PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}",
            "FITNESS_CHECK_TIMEOUT_SECONDS": "3",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "false",  # the SDK's system checks on
            "IMAGE_MODEL": "none",
        }
    # A stand-in (tests/fault_worker.py): a load that never returns, as from a network volume that stalls.
    return {"STARTUP_TIMEOUT_SECONDS": "3", "FAULT": "stall", "IMAGE_MODEL": "tiny"}


@pytest.mark.parametrize(
    "step,event,check",
    [
        ("checks", "fitness_check_failed", "firegen_fitness_deadline"),
        ("model load", "startup_timed_out", "firegen_start_deadline"),
    ],
)
def test_a_start_that_hangs_ends_the_worker_at_its_deadline(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project, tmp_path, step, event, check
):
    """A hung start kept the worker initializing for good, neither ready nor gone for RunPod to replace. Past its
    deadline (FITNESS_CHECK_TIMEOUT_SECONDS for the start-up checks, STARTUP_TIMEOUT_SECONDS for the whole start)
    the worker says where it was stuck, tells RunPod it is unhealthy and exits 1, having claimed nothing."""
    queued = queue_in_firestore(firestore_emulator, project, "queued-behind-a-hung-start")
    env = {
        **worker_env(firestore_emulator, storage_emulator, project, job_api, tiny_cache),
        "VIDEO_MODEL": "none",
        "PYTHONUNBUFFERED": "1",
        **hanging_start(step, tmp_path),
    }
    # Files, not pipes: the hung `sleep`s outlive the worker (as on a broken card) and would hold a pipe open.
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout_file, err.open("w") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_worker" if "FAULT" in env else "listener"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=stdout_file,
            stderr=stderr_file,
            start_new_session=True,  # its group: the `sleep`s it left are killed below
        )
    try:
        process.wait(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stdout, stderr = out.read_text(), err.read_text()
    assert process.returncode == 1, stdout[-3000:] + stderr[-3000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    [said] = [e for e in events if e.get("event") == event]
    assert said["severity"] == "ERROR"
    if step == "checks":
        assert said["error_type"] == "FitnessCheckTimeout" and "FITNESS_CHECK_TIMEOUT_SECONDS" in said["error"]
        assert any(frame.startswith("runpod.serverless.utils.rp_cuda:is_available") for frame in said["stuck_in"])
    else:
        assert "STARTUP_TIMEOUT_SECONDS" in said["error"]
        assert any(":stalled_preload:" in frame for frame in said["stuck_in"]), said["stuck_in"]
    assert events[-1]["event"] == "worker_exit" and events[-1]["code"] == 1, events[-3:]
    unhealthy = [ping for ping in job_api.pings if ping.get("status") == "unhealthy"]
    assert [ping.get("check") for ping in unhealthy] == [check], job_api.pings
    assert not any(e.get("event") in ("worker_ready", "job_claimed") for e in events)
    assert not job_api.takes
    assert_untouched(firestore_emulator, project, queued)


def test_listeners_not_current_at_start_are_said_and_the_sweep_covers_for_them(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
):
    """README: `listeners_not_current` (at start: the sweep covers until they are). Stand-ins (tests/fault_worker.py,
    FAULT=listeners): no snapshot of the listeners reaches the worker, and its 30 s wait for them is cut to 1 s. The
    rest is the production worker: it says so before it is ready, and a doc queued in Firestore is still claimed,
    found by the sweep (every second here), and run (no model is loaded, to start quicker: it fails as such)."""
    worker = fault_worker(
        "listeners", firestore_emulator, storage_emulator, emulator_logs, tiny_cache, job_api, project
    )
    worker.start()
    path = "generations/loop-user/images/swept"
    try:
        with emu.closing_firestore(firestore_emulator.client(project[0])) as client:
            client.document(path).set({**image_input("swept"), "status": "queued", "created_at": SERVER_TIMESTAMP})
        done = emu.wait_until(lambda: doc(firestore_emulator, project, path).get("status") == "failed", 60)
        assert done, worker.log_tail()
    finally:
        code = ended_by_sigterm(worker)
    assert code == 0
    lines = events_of(worker)
    events = [line["event"] for line in lines]
    assert events.index("listeners_not_current") < events.index("worker_ready") < events.index("job_claimed")
    [said] = [line for line in lines if line["event"] == "listeners_not_current"]
    assert (said["severity"], said["note"]) == ("WARNING", "the sweep covers until they are")
    job = doc(firestore_emulator, project, path)
    assert (job["error_type"], job["attempts"]) == ("ModelNotAvailable", 1)


def test_a_paced_fetch_waits_longer_with_each_failure_in_a_row_and_stops_waiting_when_the_worker_leaves():
    """The pacing of listener/job_api.py, on a fetch that fails as aiohttp does when nothing listens (a stand-in
    for the SDK's get_job, whose failures a real loop shows in the test above). The waits are recorded, not
    slept: 1 s, 2 s, 4 s... 30 s across the SDK's calls, from 1 s again after a fetch that worked."""
    import asyncio

    import aiohttp
    from runpod.http_client import TooManyRequests

    from listener import job_api

    answers: list = []
    waited: list[float] = []

    async def fetch(session, num_jobs=1):
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    leaving = threading.Event()
    paced = job_api.PacedFetch(fetch, leaving.is_set)

    async def wait(seconds):
        waited.append(seconds)

    paced._wait = wait  # type: ignore[method-assign]
    down = aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:9")
    answers += [down] * 7 + [[{"id": "j"}], down]
    results = [asyncio.run(paced(None, 1)) for _ in range(9)]
    assert results == [None] * 7 + [[{"id": "j"}], None]
    assert waited == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 1.0]
    # What is no outage goes to the SDK as it came: its own 429 debounce, and any other error.
    for error in (TooManyRequests(None, (), status=429), ValueError("a bug")):
        answers.append(error)
        with pytest.raises(type(error)):
            asyncio.run(paced(None, 1))
    # A real wait, cut short by the worker leaving (a SIGTERM was held up to the SDK's 90 s fetch bound).
    paced = job_api.PacedFetch(fetch, leaving.is_set)
    paced.failures = 10  # the next wait is 30 s
    answers.append(down)
    leaving.set()
    started = time.monotonic()
    assert asyncio.run(paced(None, 1)) is None
    assert time.monotonic() - started < 5


def test_the_hubs_tests_run_the_production_way_with_no_firebase_behind_the_worker(emulator_logs, tiny_cache, job_api):
    """The Hub deploys the image and sends .runpod/tests.json's inputs through RunPod's queue: the SDK's job loop,
    its fitness checks, the listeners started (a deploy review: only `--test_input`'s one-job path was tested). Its
    emulator variables point where nothing listens; the inline job is answered all the same, the worker stays up."""
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    env = {item["key"]: item["value"] for item in tests["config"]["env"]}
    env.update(  # ports nobody holds, as 127.0.0.1:8080 and :9199 are on the Hub (here an emulator may hold them)
        FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{emu.free_port()}",
        STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{emu.free_port()}",
    )
    for n, test in enumerate(tests["tests"]):
        job_api.queue_runsync(f"rp-hub-{n}", test["input"])
    worker = WorkerProcess(
        emulator_logs,
        {**env, **job_api.env(), "FIREGEN_CACHE": str(tiny_cache)},
        serve_api=False,
        VIDEO_MODEL=env.get("VIDEO_MODEL", "tiny"),
    )
    # Ready ~45 s after its start, having waited for Firestore (README "On RunPod Serverless"): past the default.
    worker.start_timeout = lambda: 300.0  # type: ignore[method-assign]
    worker.start()
    try:
        for n, test in enumerate(tests["tests"]):
            assert emu.wait_until(lambda n=n: f"rp-hub-{n}" in job_api.outputs, test["timeout"] / 1000), (
                worker.log_tail()
            )
            output = job_api.outputs[f"rp-hub-{n}"].get("output", {})
            assert (output.get("status"), output.get("image_count")) == ("completed", 1), job_api.outputs
        assert worker.running and not worker.events("worker_exit"), worker.log_tail()  # served, and stays up
    finally:
        worker.stop()
