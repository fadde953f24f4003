"""`python -m listener --rp_serve_api` as a subprocess on the emulators: the contract's runsync examples, end to end.

Requests go to the RunPod SDK's own local API (`/runsync`), which wraps the handler's output in RunPod's
envelope (`{"id", "status": "COMPLETED", "output": ...}` or `{"status": "FAILED", "error": ...}`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import pytest
from google.api_core.exceptions import Cancelled
from google.cloud.firestore import SERVER_TIMESTAMP
from PIL import Image
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from devtools import emulators as emu
from devtools import stack as examples
from devtools.worker import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent

# The contract's "Testing Examples", as written (make dev's examples too).
IMAGE_EXAMPLE = {"input": examples.IMAGE_EXAMPLE}
VIDEO_EXAMPLE = {"input": examples.VIDEO_EXAMPLE}


def post(url: str, body: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def object_of(url: str) -> str:
    """The Storage object a download URL names (the emulator's URLs quote it as one path segment)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.split("/o/", 1)[1])


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


class Stack:
    def __init__(self, worker: WorkerProcess, firestore, bucket):
        self.worker, self.firestore, self.bucket = worker, firestore, bucket

    def runsync(self, body: dict) -> dict:
        return post(self.worker.runsync_url, body)

    def stop(self) -> None:
        self.worker.stop()
        emu.close_firestore(self.firestore)

    def doc(self, path: str) -> dict | None:
        snapshot = self.firestore.document(path).get()
        return snapshot.to_dict() if snapshot.exists else None

    def client_writes_queued_doc(self, path: str, body: dict) -> StatusLog:
        """Step 1 of the contract's flow: the client listens to its doc and creates it queued, before any call.

        (A listener delivers the latest state, not every state: one started after the doc was written could see
        it first as processing, since a worker's reconciler claims a client-written doc by itself.)
        """
        log = StatusLog(self.firestore.document(path))
        assert log.listening.wait(60)  # a listener's attach under the parallel suite's load took over 10 s
        options = {k: v for k, v in body["input"].items() if k not in ("user_id", "file_uid", "use_cloud_storage")}
        self.firestore.document(path).set(
            {"status": "queued", "created_at": SERVER_TIMESTAMP, "generated": False, "error": False, **options}
        )
        return log

    def wait_finished(self, path: str, timeout: float = 60) -> dict:
        assert emu.wait_until(lambda: (self.doc(path) or {}).get("status") in ("completed", "failed"), timeout)
        return self.doc(path)


class StatusLog:
    """Every status (and progress) a doc shows, as its on_snapshot listener sees them."""

    def __init__(self, ref):
        self.seen: list[tuple[str, float | None]] = []
        self.finished = threading.Event()
        self.listening = threading.Event()
        self._watch = ref.on_snapshot(self._on)

    def _on(self, docs, changes, read_time):
        self.listening.set()
        for snapshot in docs:
            data = snapshot.to_dict() or {}
            if data:
                self.seen.append((data.get("status"), data.get("progress")))
            if data.get("status") in ("completed", "failed"):
                self.finished.set()

    def statuses(self) -> list[str]:
        out: list[str] = []
        for status, _ in self.seen:
            if not out or out[-1] != status:
                out.append(status)
        return out

    def close(self):
        self._watch.unsubscribe()


def make_stack(firestore_emulator, storage_emulator, emulator_logs, cache, **settings) -> Stack:
    project = emu.unique_id("demo-worker")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("worker-bucket"))
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name)
    worker = WorkerProcess(emulator_logs, {**env, "FIREGEN_CACHE": str(cache)}, **settings)
    worker.start()
    return Stack(worker, firestore_emulator.client(project), bucket)


@pytest.fixture(scope="module")
def stack(firestore_emulator, storage_emulator, emulator_logs, tiny_cache):
    stack = make_stack(firestore_emulator, storage_emulator, emulator_logs, tiny_cache)
    yield stack
    stack.stop()


def test_the_contracts_image_example_end_to_end(stack):
    path = "generations/test-user/images/test-img-001"
    log = stack.client_writes_queued_doc(path, IMAGE_EXAMPLE)
    try:
        assert stack.runsync(IMAGE_EXAMPLE)["output"] == {
            "status": "accepted",
            "message": "Generation task accepted and processing",
            "user_id": "test-user",
            "file_uid": "test-img-001",
            "task_type": "text2image",
        }
        assert log.finished.wait(60)
    finally:
        log.close()
    assert log.statuses() == ["queued", "processing", "completed"]
    doc = stack.doc(path)
    assert (doc["generated"], doc["error"], doc["image_count"], doc["task_type"]) == (True, False, 1, "text2image")
    assert (
        doc["images"] == [doc["image_url"]]
        and object_of(doc["image_url"]) == "generating/test-user/image/test-img-001.png"
    )
    assert isinstance(doc["seed"], int) and (doc["user_id"], doc["file_uid"]) == ("test-user", "test-img-001")
    assert "prompt_truncated" not in doc  # its prompt fits the text encoders
    image = Image.open(io.BytesIO(download(doc["image_url"])))
    assert (image.format, image.size) == ("PNG", (512, 512))


def test_every_line_of_the_local_workers_output_is_json(stack):
    """Under --rp_serve_api (no RUNPOD_ENDPOINT_ID) the SDK's logger wrote `INFO   | <id> | Started.` per runsync
    request and uvicorn its own lines, in plain text (a soak audit: 1,585 such lines): now events of the stream."""
    path = "generations/json-user/images/json-1"
    request = {**IMAGE_EXAMPLE["input"], "user_id": "json-user", "file_uid": "json-1", "width": 256, "height": 256}
    assert stack.runsync({"input": request})["output"]["status"] == "accepted"
    assert emu.wait_until(lambda: (stack.doc(path) or {}).get("status") == "completed", 60), stack.doc(path)
    lines = [line for line in stack.worker.log_path.read_text().splitlines() if line]
    assert [line for line in lines if not line.startswith("{")] == []  # the harness's start/stop lines too
    events = [json.loads(line) for line in lines]
    assert any(e.get("logger") == "uvicorn.error" and e["event"].startswith("Uvicorn running on") for e in events)
    assert not [e for e in events if "color_message" in e]  # uvicorn's copy of the message with terminal colours
    assert any(e["event"] == "runpod_sdk" and e["said"] == "Started." and e.get("requestId") for e in events)
    # A webhook the local API could not send: the SDK printed its URL, a token in it too, in plain text (logs audit).
    hook = "http://127.0.0.1:9/hook?token=WEBHOOKSECRET&Signature=SIGSECRET"
    webhook_request = {**request, "file_uid": "json-2"}
    assert stack.runsync({"input": webhook_request, "webhook": hook})["output"]["status"] == "accepted"

    def webhook_failed():
        return [json.loads(line) for line in stack.worker.log_path.read_text().splitlines() if "WEBHOOK" in line]

    assert emu.wait_until(webhook_failed, 60)
    [event] = webhook_failed()
    assert (event["event"], event["severity"]) == ("runpod_sdk", "WARNING")
    assert event["said"].startswith("WEBHOOK | Request to http://127.0.0.1:9/<redacted> failed: ")
    assert "SECRET" not in stack.worker.log_path.read_text() and "/hook" not in event["said"]


def test_a_worker_logs_nothing_of_the_optional_backends_it_never_uses(stack):
    """FIREGEN_FP8 is off (the default), yet transformers and diffusers import torchao while the worker loads its
    models; on this CPU that import warns of kernels it cannot load, which this worker never calls. Nor of
    torchvision, which neither this venv nor the GPU image has: transformers warned at every start (two WARNING
    lines) that CLIP's and SigLIP's image processors fall back to PIL, processors no job of the worker's uses."""
    log = stack.worker.log_path.read_text()
    assert '"event": "worker_ready"' in log
    noise = [line for line in log.splitlines() if "torchao" in line or "triton" in line.lower() or "_pytree" in line]
    assert noise == []
    assert [line for line in log.splitlines() if "torchvision" in line] == []


def test_the_contracts_video_example_end_to_end(stack):
    path = "generations/test-user/videos/test-vid-001"
    log = stack.client_writes_queued_doc(path, VIDEO_EXAMPLE)
    try:
        output = stack.runsync(VIDEO_EXAMPLE)["output"]
        assert output["status"] == "accepted" and output["task_type"] == "text2video"
        assert output["file_uid"] == "test-vid-001" and output["user_id"] == "test-user"
        assert log.finished.wait(90)
    finally:
        log.close()
    assert log.statuses() == ["queued", "processing", "completed"]
    doc = stack.doc(path)
    assert doc["video_info"] == {"frames": 16, "fps": 8, "duration_seconds": 2.0, "width": 512, "height": 512}
    assert (
        doc["videos"] == [doc["video_url"]]
        and object_of(doc["video_url"]) == "generating/test-user/video/test-vid-001.mp4"
    )
    with av.open(io.BytesIO(download(doc["video_url"]))) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (frames, stream.average_rate, stream.codec_context.name) == (16, 8, "h264")
        assert (stream.width, stream.height) == (512, 512)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"user_id": None}, "user_id and file_uid are required for cloud storage"),
        ({"prompt": None}, "prompt is required"),
        ({"width": 2048}, "width must be between 256 and 1024"),
        ({"numFrames": 16}, "Validation failed: unknown field 'numFrames' (did you mean 'num_frames'?)"),
        # An int past float's range was a traceback (OverflowError); a lone surrogate, which JSON and JavaScript
        # strings carry and UTF-8 cannot, was "Could not record the job ... please retry", or an HTTP 500 when
        # quoted in the refusal.
        ({"width": 10**400}, "width must be between 256 and 1024"),
        (
            {"prompt": "a \ud800 b"},
            "Validation failed: prompt must be valid Unicode text (it holds a lone UTF-16 surrogate)",
        ),
        ({"\ud800x": 1}, "Validation failed: unknown field '\\ud800x'"),
        (
            {"file_uid": "../x"},
            "Validation failed: file_uid may contain only ASCII letters, digits and - _ . : @ + = ~, "
            "must start with a letter, a digit, - or _ and must not look like __name__",
        ),
    ],
)
def test_bad_inputs_are_refused_over_http_and_write_nothing(stack, change, message):
    body = {"input": {**IMAGE_EXAMPLE["input"], "file_uid": "bad-input", **change}}
    body["input"] = {k: v for k, v in body["input"].items() if v is not None}
    answer = stack.runsync(body)
    assert (answer["status"], answer["error"]) == ("FAILED", message)
    assert stack.doc("generations/test-user/images/bad-input") is None


@pytest.mark.parametrize(
    "body,status,detail",
    [
        (b"[]", 422, list),  # no object
        (b'{"prompt": "a car"}', 422, list),  # no `input`
        (b'{"input": 5}', 422, list),  # an `input` that is no object
        (b'{"input": ' + b"9" * 5000 + b"}", 400, "There was an error parsing the body"),  # past Python's int limit
    ],
)
def test_a_body_that_is_no_runsync_request_never_reaches_the_worker(stack, body, status, detail):
    """README: the SDK's local API answers such a body itself, with a `detail` of its own."""
    request = urllib.request.Request(
        stack.worker.runsync_url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    answer = json.loads(raised.value.read())
    assert raised.value.code == status
    assert isinstance(answer["detail"], list) if detail is list else answer["detail"] == detail


def test_eight_identical_requests_start_one_generation(stack):
    body = {"input": {**IMAGE_EXAMPLE["input"], "file_uid": "same-eight"}}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: stack.runsync(body), range(8)))
    assert all(a["output"]["status"] == "accepted" for a in answers)
    doc = stack.wait_finished("generations/test-user/images/same-eight")
    assert doc["status"] == "completed" and doc["attempts"] == 1
    assert len([e for e in stack.worker.events("job_started") if "same-eight" in e]) == 1


def test_a_prompt_the_model_takes_only_the_start_of_says_so_on_its_doc_and_inline(stack):
    """The unicode review: 2,000 characters are far more than SDXL's 77 CLIP tokens (a CJK or emoji prompt takes
    several a character), and the cut was said in the worker's log alone. The doc says it, as does an inline
    answer."""
    prompt = "a lighthouse on a cliff at dusk, " * 4  # 132 bytes: the tiny CLIP tokenizer's 132 tokens
    body = {"input": {**IMAGE_EXAMPLE["input"], "prompt": prompt, "file_uid": "long-prompt", "width": 256}}
    assert stack.runsync(body)["output"]["status"] == "accepted"
    doc = stack.wait_finished("generations/test-user/images/long-prompt")
    assert (doc["status"], doc["prompt_truncated"]) == ("completed", True)
    # Its log line says what it cost, as its doc does (the diagnosability review: an operator reads the logs).
    said = lambda: [json.loads(e) for e in stack.worker.events("job_completed") if '"long-prompt"' in e]  # noqa: E731
    assert emu.wait_until(said, 10, 0.05)
    [completed] = said()
    assert completed["task_type"] == "text2image"
    for name in ("queue_seconds", "generation_seconds", "upload_seconds"):
        assert completed[name] == doc[name]
    inline = {"input": {"prompt": prompt, "use_cloud_storage": False, "width": 256, "height": 256}}
    assert stack.runsync(inline)["output"]["prompt_truncated"] is True


def test_a_completed_job_is_never_generated_again(stack):
    body = {"input": {**IMAGE_EXAMPLE["input"], "file_uid": "done-once"}}
    stack.runsync(body)
    first = stack.wait_finished("generations/test-user/images/done-once")
    assert stack.runsync(body)["output"]["status"] == "accepted"
    # Something to wait for: a job accepted after it. The worker runs one job at a time, its runsync jobs in the
    # order they came, and any queued doc its listener hears of: had the second call re-queued the done job or
    # handed it to the slot, it would have run before this one finished.
    marker = {"input": {**IMAGE_EXAMPLE["input"], "file_uid": "after-the-done-job", "width": 256, "height": 256}}
    assert stack.runsync(marker)["output"]["status"] == "accepted"
    assert stack.wait_finished("generations/test-user/images/after-the-done-job")["status"] == "completed"
    assert stack.doc("generations/test-user/images/done-once") == first
    assert len([e for e in stack.worker.events("job_started") if "done-once" in e]) == 1


def test_the_contracts_function_flow_runs_the_parameters_runsync_sends(stack):
    """The contract's Firebase Function writes the queued doc with the prompt ("... other metadata"), then sends
    the parameters to runsync: "accepted" means the job runs with them, whether the worker's listener claimed the
    placeholder doc first or not (before, the doc's defaults ran: one 512x512 image, a random seed)."""
    path = "generations/test-user/images/function-flow"
    stack.firestore.document(path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "a cat", "generated": False, "error": False}
    )
    # Sides SDXL cannot take (it takes multiples of 8): generated larger, cropped to the size asked.
    sizes = {"width": 380, "height": 261, "num_images_per_prompt": 2, "seed": 7, "num_inference_steps": 10}
    body = {"input": {**IMAGE_EXAMPLE["input"], "prompt": "a cat", "file_uid": "function-flow", **sizes}}
    assert stack.runsync(body)["output"]["status"] == "accepted"
    doc = stack.wait_finished(path)
    assert (doc["status"], doc["image_count"], doc["seed"]) == ("completed", 2, 7)
    assert {k: doc[k] for k in sizes} == sizes
    for url in doc["images"]:
        assert Image.open(io.BytesIO(download(url))).size == (380, 261)
    # Sent again as it was (the contract's "Timeout: retry the request"): the same job, accepted, not run again.
    assert stack.runsync(body)["output"]["status"] == "accepted"
    assert stack.doc(path) == doc


def test_the_function_flows_refused_request_fails_its_doc_and_the_fixed_one_runs(stack):
    """The contract's function flow with a refused request: the doc (prompt alone) was left queued, and after the
    grace the worker ran its defaults, charged, a job nobody asked for. The refusal now fails that doc at once,
    and the request sent again fixed (the contract's "fix parameters and retry") runs with its parameters."""
    path = "generations/test-user/images/function-refused"
    stack.firestore.document(path).set(
        {"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "a cat", "generated": False, "error": False}
    )
    # The worker's listener admits the doc as soon as it hears of it (charged its defaults' cost): the refusal
    # refunds it, and the fixed request is admitted anew (it was refused "failed before" when the admission won).
    assert emu.wait_until(lambda: (stack.doc(path) or {}).get("quota_admitted"), 10)
    body = {"input": {**IMAGE_EXAMPLE["input"], "prompt": "a cat", "file_uid": "function-refused", "width": 2048}}
    assert stack.runsync(body)["error"] == "width must be between 256 and 1024"
    doc = stack.doc(path)
    assert (doc["status"], doc["error_type"], doc["error_message"]) == (
        "failed",
        "ValidationError",
        "width must be between 256 and 1024",
    )
    body["input"]["width"] = 256
    assert stack.runsync(body)["output"]["status"] == "accepted"
    doc = stack.wait_finished(path)
    assert (doc["status"], doc["width"], doc["attempts"], doc["quota_admitted"]) == ("completed", 256, 1, True)
    assert Image.open(io.BytesIO(download(doc["image_url"]))).size == (256, 512)
    # A video's placeholder, its request refused for a camelCase name (the review: looked for under images/).
    video = "generations/test-user/videos/function-camel"
    stack.firestore.document(video).set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "waves"})
    camel = {**IMAGE_EXAMPLE["input"], "prompt": "waves", "file_uid": "function-camel", "numFrames": 16}
    assert stack.runsync({"input": camel})["error"].startswith("Validation failed: unknown field 'numFrames'")
    assert stack.doc(video)["error_type"] == "ValidationError"
    # A doc that states its job (a parameter, or a request's own) is not failed by another's refused request.
    stated = "generations/test-user/images/function-stated"
    stack.firestore.document(stated).set({"status": "queued", "prompt": "a dog", "width": 256})
    body["input"].update(file_uid="function-stated", width=2048)
    assert stack.runsync(body)["error"] == "width must be between 256 and 1024"
    assert stack.wait_finished(stated)["status"] == "completed"


def test_the_function_flows_doc_under_the_other_media_type_is_the_requests_job(stack):
    """The contract's function flow, its doc filed by `numFrames` alone as the client sample files it: a request
    with `fps` and no `num_frames` ran a video under videos (charged) while the function's images doc, its prompt
    alone, ran its defaults after the grace (charged too). The doc is the request's job: under images the request's
    `fps` breaks it (refused, the doc failed with the message); under videos an image-only request runs that video."""
    images = "generations/test-user/images/filed-images"
    stack.firestore.document(images).set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "waves"})
    body = {"input": {**IMAGE_EXAMPLE["input"], "prompt": "waves", "file_uid": "filed-images", "fps": 10}}
    message = "Validation failed: fps is a video field: video jobs belong under generations/{user_id}/videos"
    assert stack.runsync(body)["error"] == message
    assert (stack.doc(images)["status"], stack.doc(images)["error_message"]) == ("failed", message)
    assert stack.doc("generations/test-user/videos/filed-images") is None
    videos = "generations/test-user/videos/filed-videos"
    stack.firestore.document(videos).set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "waves"})
    # `num_inference_steps` is either medium's: the video's defaults otherwise (512x512, 16 frames, 20 steps).
    body = {
        "input": {**IMAGE_EXAMPLE["input"], "prompt": "waves", "file_uid": "filed-videos", "seed": 3}
        | {"num_inference_steps": 10}
    }
    assert stack.runsync(body)["output"]["status"] == "accepted"
    doc = stack.wait_finished(videos)
    assert (doc["status"], doc["seed"], doc["attempts"], doc["num_inference_steps"]) == ("completed", 3, 1, 10)
    assert doc["video_url"]
    assert stack.doc("generations/test-user/images/filed-videos") is None


@pytest.mark.parametrize(
    "media,change,message",
    [
        ("images", {"fps": 99}, "fps must be between 6 and 15"),
        ("videos", {"width": 2048}, "width must be between 256 and 1024"),
    ],
)
def test_a_refused_request_fails_its_placeholder_filed_under_the_other_media_type(stack, media, change, message):
    """Audit (the client sample's filing, in the contract's function flow): a refused request's placeholder under
    the other media type stayed queued, admitted and charged (the function's own `updateDoc` then failed it past
    the usage counts: 20 such refusals and the user was locked out at USER_MAX_PENDING); left alone, its defaults
    ran. It is failed with the refusal, and refunded."""
    file_uid = f"filed-refused-{media}"
    path = f"generations/test-refused/{media}/{file_uid}"
    stack.firestore.document(path).set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "waves"})
    assert emu.wait_until(lambda: (stack.doc(path) or {}).get("quota_admitted"), 10)  # the listener's admission
    body = {"input": {**IMAGE_EXAMPLE["input"], "user_id": "test-refused", "file_uid": file_uid, **change}}
    assert stack.runsync(body)["error"] == message
    doc = stack.doc(path)
    assert (doc["status"], doc["error_type"], doc["error_message"]) == ("failed", "ValidationError", message)
    usage = stack.doc("usage/test-refused")
    assert (usage["pending"], usage["spent_today"]) == (0, 0)


def test_a_running_job_restated_by_its_request_stops_and_runs_with_the_requests_parameters(stack):
    """The listener took the placeholder doc before the request came: that run (a long one here) stops at its
    next step, writes nothing, and the job runs again with the request's parameters."""
    path = "generations/test-user/images/restated-running"
    stack.firestore.document(path).set(
        {**queued_doc(width=1024, height=1024, num_inference_steps=50), "created_at": SERVER_TIMESTAMP}
    )
    # Claimed is enough: its run stops at its next step whether that is its first or a later one (the first
    # progress write, at 25 %, is 12 steps of 1024x1024 away: ~13 s of a shared core).
    assert emu.wait_until(lambda: (stack.doc(path) or {}).get("status") == "processing", 60)
    short = {"prompt": "Waves", "file_uid": "restated-running", **SHORT_IMAGE}
    assert stack.runsync({"input": {**IMAGE_EXAMPLE["input"], **short}})["output"]["status"] == "accepted"
    doc = stack.wait_finished(path, timeout=30)  # the 1024x1024 run alone takes longer than this on a CPU
    assert (doc["status"], doc["attempts"], doc["width"], doc["num_inference_steps"]) == ("completed", 2, 256, 10)
    assert Image.open(io.BytesIO(download(doc["image_url"]))).size == (256, 256)
    assert [e for e in stack.worker.events("job_preempted") if "restated-running" in e]
    assert not [e for e in stack.worker.events("job_failed") if "restated-running" in e]  # nobody cancelled it


def test_a_completed_video_asked_again_with_other_image_fields_is_the_same_job(stack):
    """The image fields change nothing in a video: asked again with others, a finished video is that job, not
    generated again, and its doc stays as it was (a review: it was refused as 'other parameters (width)', and a
    running one ran again, charged, for the same video)."""
    path = "generations/test-user/videos/video-image-fields"
    body = {
        "input": {**VIDEO_EXAMPLE["input"], "file_uid": "video-image-fields", "video_width": 256, "video_height": 256}
    }
    stack.runsync(body)
    first = stack.wait_finished(path)
    assert first["status"] == "completed"
    image_fields = {"width": 1024, "height": 768, "num_images_per_prompt": 4, "guidance_scale": 3.0}
    assert stack.runsync({"input": {**body["input"], **image_fields}})["output"]["status"] == "accepted"
    assert stack.doc(path) == first
    assert len([e for e in stack.worker.events("job_started") if "video-image-fields" in e]) == 1


def test_a_completed_job_asked_again_with_other_parameters_says_so(stack):
    body = {"input": {**IMAGE_EXAMPLE["input"], "file_uid": "done-other", **SHORT_IMAGE}}
    stack.runsync(body)
    first = stack.wait_finished("generations/test-user/images/done-other")
    other = {"input": {**body["input"], "num_images_per_prompt": 3, "prompt": "other"}}
    answer = stack.runsync(other)
    assert (answer["status"], answer["error"]) == (
        "FAILED",
        "Validation failed: file_uid 'done-other' already finished with other parameters "
        "(num_images_per_prompt, prompt); use a new file_uid for a new job",
    )
    assert stack.doc("generations/test-user/images/done-other") == first


def test_a_failed_job_answers_with_its_recorded_error(stack):
    path = "generations/test-user/images/failed-before"
    stack.firestore.document(path).set(
        {
            "status": "failed",
            "error": True,
            "generated": False,
            "prompt": IMAGE_EXAMPLE["input"]["prompt"],
            "error_message": "Out of memory during generation",
            "error_type": "OutOfMemoryError",
        }
    )
    answer = stack.runsync({"input": {**IMAGE_EXAMPLE["input"], "file_uid": "failed-before"}})
    assert (answer["status"], answer["error"]) == ("FAILED", "Out of memory during generation")
    assert stack.doc(path)["status"] == "failed"
    # The contract's "fix parameters and retry" under the same file_uid: told why the old error comes back (an
    # audit: it read as if the smaller request had run out of memory too).
    smaller = stack.runsync({"input": {**IMAGE_EXAMPLE["input"], "file_uid": "failed-before", "width": 256}})
    assert (smaller["status"], smaller["error"]) == (
        "FAILED",
        "Out of memory during generation; it failed with other parameters (width), so send them as a new job "
        "(a new file_uid)",
    )
    assert stack.doc(path)["status"] == "failed"


def test_a_client_written_doc_is_run_without_any_runsync_call(stack):
    path = "generations/client-user/videos/written-by-client"
    stack.firestore.document(path).set(
        {
            "status": "queued",
            "prompt": "Waves",
            "generated": False,
            "error": False,
            "numFrames": 17,
            "fps": 6,
            "videoWidth": 256,
            "videoHeight": 256,
        }
    )
    doc = stack.wait_finished(path)
    assert doc["status"] == "completed"
    assert doc["video_info"] == {"frames": 17, "fps": 6, "duration_seconds": 17 / 6, "width": 256, "height": 256}


LONG_VIDEO = {"num_frames": 81, "num_inference_steps": 50, "video_width": 256, "video_height": 256}  # many short steps
SHORT_IMAGE = {"width": 256, "height": 256, "num_inference_steps": 10}
MODES = {"rp_serve_api": True, "reconciler_only": False}  # `python -m listener --rp_serve_api`, and no flags


def queued_doc(**options) -> dict:
    return {"status": "queued", "prompt": "Waves", "generated": False, "error": False, **options}


@pytest.fixture
def stack_in(firestore_emulator, storage_emulator, emulator_logs, tiny_cache):
    """`stack_in(mode, **settings)`: a worker in one of MODES, with its own project and bucket."""

    def start(mode: str, **settings) -> Stack:
        return make_stack(
            firestore_emulator, storage_emulator, emulator_logs, tiny_cache, serve_api=MODES[mode], **settings
        )

    return start


@pytest.mark.parametrize("mode", list(MODES))
def test_an_idle_worker_claims_nothing_after_sigterm(stack_in, mode):
    """An idle worker told to stop (SIGTERM) exits 0 and leaves a doc queued after the signal to other workers,
    even while its listener still hears of it."""
    # No model to load (a quicker start): a claim would still show, as a job failed ModelNotAvailable.
    stack = stack_in(mode, IMAGE_MODEL="none", VIDEO_MODEL="none")
    try:
        stack.worker.signal(signal.SIGTERM)
        late = "generations/test-user/images/after-sigterm"
        # The emulator may answer a call made while the worker's streams are torn down with CANCELLED: send again.
        retry = Retrying(retry=retry_if_exception_type(Cancelled), stop=stop_after_attempt(3), reraise=True)
        retry(stack.firestore.document(late).set, queued_doc(**SHORT_IMAGE))
        assert stack.worker.wait_exit(60) == 0
        assert stack.doc(late) == queued_doc(**SHORT_IMAGE)
        assert not stack.worker.events("job_claimed")
    finally:
        stack.stop()


@pytest.mark.parametrize("within_grace", [False, True], ids=["released", "finished"])
@pytest.mark.parametrize("mode", list(MODES))
def test_sigterm_stops_claiming_and_ends_the_running_job_cleanly(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, mode, within_grace
):
    """SIGTERM, as RunPod sends it before stopping a worker: exit code 0; nothing is claimed after the signal (a
    doc queued after it stays queued, though the slot frees); the running job finishes within the grace period,
    or is given back to the queue with its attempt restored."""
    grace = "60" if within_grace else "0.5"
    stack = make_stack(
        firestore_emulator,
        storage_emulator,
        emulator_logs,
        tiny_cache,
        serve_api=MODES[mode],
        SHUTDOWN_GRACE_SECONDS=grace,
        SWEEP_INTERVAL_SECONDS="0.2",
        # Only the model the running job needs: a quicker start.
        **({"VIDEO_MODEL": "none"} if within_grace else {"IMAGE_MODEL": "none"}),
    )
    try:
        running = "generations/test-user/images/short" if within_grace else "generations/test-user/videos/long"
        stack.firestore.document(running).set(queued_doc(**(SHORT_IMAGE if within_grace else LONG_VIDEO)))
        assert emu.wait_until(lambda: (stack.doc(running) or {}).get("status") == "processing", 60)
        stack.worker.signal(signal.SIGTERM)
        late = "generations/test-user/images/after-sigterm"
        # The emulator may answer a call made while the worker's streams are torn down with CANCELLED: send again.
        retry = Retrying(retry=retry_if_exception_type(Cancelled), stop=stop_after_attempt(3), reraise=True)
        retry(stack.firestore.document(late).set, queued_doc(**SHORT_IMAGE))
        assert stack.worker.wait_exit(90) == 0
        doc = stack.doc(running)
        if within_grace:
            assert (doc["status"], doc["attempts"]) == ("completed", 1)
            assert not stack.worker.events("job_released") and not stack.worker.events("shutdown_grace_exceeded")
        else:
            assert doc["status"] == "queued" and doc["attempts"] == 0 and "worker_id" not in doc
            assert stack.worker.events("job_released")
            [exceeded] = stack.worker.events("shutdown_grace_exceeded")  # README: said, with what it releases
            assert '"releasing": 1' in exceeded and '"severity": "WARNING"' in exceeded
        assert stack.doc(late) == {**queued_doc(**SHORT_IMAGE)}  # never claimed: no attempts, no worker_id
        assert not [e for e in stack.worker.events("job_claimed") if "after-sigterm" in e]
    finally:
        stack.stop()


# Without the local API both signals go to one handler (`leave`): Ctrl-C there stands for both. uvicorn's handler
# tells them apart (a second SIGINT forces its exit): both there.
@pytest.mark.parametrize(
    "mode,signum",
    [("rp_serve_api", signal.SIGTERM), ("rp_serve_api", signal.SIGINT), ("reconciler_only", signal.SIGINT)],
    ids=["rp_serve_api-SIGTERM", "rp_serve_api-SIGINT", "reconciler_only-SIGINT"],
)
def test_a_second_signal_releases_the_running_job_at_once_and_exits_cleanly(stack_in, mode, signum):
    """A video audit: a second SIGTERM (or Ctrl-C) within the grace ended the `finally` that waits for the job,
    and the process aborted in torch's threads (SIGABRT, "terminate called without an active exception" in
    plain text), no `job_released`, no `worker_exit`, the job `processing` until its lease ran out."""
    stack = stack_in(mode, SHUTDOWN_GRACE_SECONDS="120", IMAGE_MODEL="none")
    try:
        running = "generations/test-user/videos/twice"
        stack.firestore.document(running).set(queued_doc(**LONG_VIDEO))
        assert emu.wait_until(lambda: (stack.doc(running) or {}).get("status") == "processing", 60)
        stack.worker.signal(signum)
        # The scenario: a second signal once the first's shutdown has begun (the audit's was 3 s later).
        assert emu.wait_until(lambda: stack.worker.events("shutdown_started"), 30)
        stack.worker.signal(signum)
        assert stack.worker.wait_exit(60) == 0  # far within the 120 s grace the first signal left it
        doc = stack.doc(running)
        assert doc["status"] == "queued" and doc["attempts"] == 0 and "worker_id" not in doc
        assert stack.worker.events("shutdown_hurried") and stack.worker.events("job_released")
        exits = [json.loads(line) for line in stack.worker.events("worker_exit")]
        assert [(e["code"], e["reason"]) for e in exits] == [(0, "shutdown")]
    finally:
        stack.stop()


def test_a_full_model_on_a_cpu_only_torch_is_warned_of_at_start(
    firestore_emulator, storage_emulator, emulator_logs, tiny_cache, tmp_path
):
    """README (Two commands): `IMAGE_MODEL=<a hub id> make dev` on the CPU wheel warns that torch sees no CUDA
    device (it said so, yet only RunPod's job loop warned: the full SDXL ran on the CPU without a word). A folder is
    a full model by its name: it need not load for the warning, so an empty one keeps the start quick."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: the full model runs on it, unwarned")
    project = emu.unique_id("demo-worker")
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, "bkt")
    worker = WorkerProcess(
        emulator_logs, {**env, "FIREGEN_CACHE": str(tiny_cache)}, IMAGE_MODEL=str(tmp_path), VIDEO_MODEL="none"
    )
    worker.start()
    try:
        [warned] = [json.loads(line) for line in worker.events("no_gpu")]
    finally:
        worker.stop()
    assert warned["severity"] == "WARNING"
    assert warned["note"].startswith("torch sees no CUDA device: the full models run on the CPU")
    assert "FIREGEN_DEVICE=cpu" in warned["note"]


@pytest.mark.parametrize(
    ("production", "chosen", "device", "models", "said"),
    [
        (True, False, "cpu", ["tiny", "none"], "NO_GPU"),  # a RunPod GPU worker whose torch sees no card
        (True, True, "cpu", ["tiny", "none"], None),  # FIREGEN_DEVICE=cpu: on purpose
        (True, False, "cuda", ["stabilityai/stable-diffusion-xl-base-1.0", "tiny"], None),
        (False, False, "cpu", [" Tiny ", "NONE"], None),  # make dev's models
        (False, False, "cpu", ["tiny", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], "FULL_MODELS_ON_CPU"),
        (False, True, "cpu", ["stabilityai/stable-diffusion-xl-base-1.0", "none"], None),
        (False, False, "cuda:1", ["stabilityai/stable-diffusion-xl-base-1.0", "none"], None),
    ],
)
def test_which_cpu_starts_are_warned_of(production, chosen, device, models, said):
    from listener import __main__ as worker_main

    note = worker_main.no_gpu_note(production=production, device_chosen=chosen, device=device, model_refs=models)
    assert note == (getattr(worker_main, said) if said else None)


def test_the_tiny_models_on_the_cpu_are_not_warned_of(stack):
    """make dev's own models on the CPU are what it is for: no `no_gpu` line to alarm a newcomer."""
    assert '"event": "worker_ready"' in stack.worker.log_path.read_text()
    assert stack.worker.events("no_gpu") == []


def test_a_taken_port_is_not_a_clean_exit(firestore_emulator, storage_emulator, emulator_logs, tiny_cache):
    """The audit: the SDK's local API could not bind its port (uvicorn exits 3), and the worker's last line said
    `worker_exit` code 0, reason shutdown."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project = emu.unique_id("demo-worker")
        env = emu.emulator_env(firestore_emulator, storage_emulator, project, "bkt")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "listener",
                "--rp_serve_api",
                "--rp_api_host",
                "127.0.0.1",
                "--rp_api_port",
                str(port),
            ],
            env={**os.environ, **env, "IMAGE_MODEL": "none", "VIDEO_MODEL": "none", "FIREGEN_CACHE": str(tiny_cache)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    [exit_line] = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "worker_exit"]
    assert (exit_line["code"], exit_line["reason"], exit_line["severity"]) == (3, "exit 3", "ERROR")


def job_count(stack) -> int:
    return sum(len(list(stack.firestore.collection_group(media).stream())) for media in ("images", "videos"))


def test_inline_generation_returns_the_media_and_writes_nothing(stack):
    before = job_count(stack)
    answer = stack.runsync(
        {
            "input": {
                "prompt": "A sunset over mountains",
                "use_cloud_storage": False,
                "width": 256,
                "height": 320,
                "num_images_per_prompt": 2,
                "seed": 5,
            }
        }
    )
    output = answer["output"]
    assert (answer["status"], output["status"], output["task_type"], output["seed"]) == (
        "COMPLETED",
        "completed",
        "text2image",
        5,
    )
    assert output["image_count"] == 2 and output["generated"] is True
    sizes = [Image.open(io.BytesIO(base64.b64decode(data))).size for data in output["images"]]
    assert sizes == [(256, 320), (256, 320)]
    assert job_count(stack) == before


def test_inline_video_carries_its_video_info(stack):
    output = stack.runsync(
        {
            "input": {
                "prompt": "Waves",
                "use_cloud_storage": False,
                "num_frames": 16,
                "fps": 8,
                "video_width": 256,
                "video_height": 256,
            }
        }
    )["output"]
    assert output["video_info"] == {"frames": 16, "fps": 8, "duration_seconds": 2.0, "width": 256, "height": 256}
    with av.open(io.BytesIO(base64.b64decode(output["videos"][0]))) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16


def test_the_ready_worker_has_frozen_its_startup_heap(stack):
    """A full garbage collection over torch's and the clients' objects costs 100-200 ms on a request's path;
    the worker freezes them once ready (gc.freeze), so only later allocations are ever scanned."""
    ready = json.loads(stack.worker.events("worker_ready")[-1])
    assert ready["frozen_objects"] > 100_000


def test_the_worker_limits_the_c_allocators_arenas(stack):
    """listener.allocator: started as RunPod and make dev start it (no MALLOC_ARENA_MAX), the worker keeps two."""
    assert "MALLOC_ARENA_MAX" not in stack.worker.process_env()
    assert json.loads(stack.worker.events("worker_ready")[-1])["malloc_arena_max"] == 2


def test_the_worker_says_which_code_it_runs_in_its_log_and_its_doc(stack, tmp_path):
    """A rollout runs two deploys' workers side by side; README (Upgrading) has the functions deployed once the
    last old worker has gone, which its `code_version` tells: a digest of this checkout's sources and installed
    distributions, on `worker_ready` and on `workers/{worker_id}`. Any source changed, it changes."""
    from listener.version import PACKAGES, code_version, source_digest

    ready = json.loads(stack.worker.events("worker_ready")[-1])
    assert ready["code_version"] == code_version() and re.fullmatch(r"[0-9a-f]{12}", ready["code_version"])
    assert emu.wait_until(lambda: stack.firestore.document(f"workers/{ready['worker_id']}").get().to_dict() or {}, 30)
    assert (
        stack.firestore.document(f"workers/{ready['worker_id']}").get().to_dict()["code_version"]
        == ready["code_version"]
    )

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(tmp_path) == ready["code_version"]
    changed = tmp_path / "listener" / "runner.py"
    changed.write_text(changed.read_text() + "\n# another deploy\n")
    assert source_digest(tmp_path) != ready["code_version"]
