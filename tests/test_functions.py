"""The Cloud Functions' logic (functions/dispatch.py, owner_calls.py, runpod_client.py) on the real Firestore emulator
and a real worker (`python -m listener --rp_serve_api`, tiny models) serving RunPod's local /runsync API.

The functions import the shared core as `firegen_core`; at deploy it is a copy of the package that
scripts/vendor_shared.py writes into functions/. Here functions/ goes at the end of sys.path, so this process
imports the functions' own modules (dispatch, runpod_client) and the repository's `firegen_core`; the deployed
shape (the copy, imported by the functions' own Python 3.11 venv) is checked below.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fixtures_http import LocalServer, QuietHandler
from google.cloud import firestore

from devtools import emulators as emu
from devtools import firebase_cli
from devtools.firebase_cli import FirebaseCli, load_script
from devtools.worker import WorkerProcess
from firegen_core.dispatches import DISPATCHED_INPUTS

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
FUNCTIONS_PYTHON = firebase_cli.FUNCTIONS_PYTHON


sys.path.append(str(FUNCTIONS))
import dispatch  # noqa: E402
import owner_calls  # noqa: E402
import runpod_client  # noqa: E402
import sweep  # noqa: E402

vendor_shared = load_script("vendor_shared")
CallError, Policy, RunPodClient = dispatch.CallError, dispatch.Policy, runpod_client.RunPodClient

API_KEY = "rp-test-key-5e3f9a"  # must never show up in a doc, a reply or a log line
FAST = dict(attempts=3, timeout=5.0, connect_timeout=1.0, deadline=10.0, wait_initial=0.05, wait_max=0.2)


# ---------------------------------------------------------------------------------------------- fixtures
class Worker:
    """A worker process with its own project and bucket, and an admin Firestore client on that project."""

    def __init__(self, process: WorkerProcess, db: firestore.Client):
        self.process, self.db = process, db

    def client(self, **kw) -> RunPodClient:
        return RunPodClient(self.process.runsync_url, API_KEY, **{**FAST, **kw})

    def runsync_calls(self, file_uid: str) -> int:
        """How many runsync requests for this job the worker's handler answered."""
        return sum(
            1
            for event in ("request_accepted", "request_rejected")
            for line in self.process.events(event)
            if f'"{file_uid}"' in line
        )

    def doc(self, path: str) -> dict | None:
        snapshot = self.db.document(path).get()
        return snapshot.to_dict() if snapshot.exists else None

    def wait_status(self, path: str, statuses=("completed", "failed"), timeout: float = 60) -> dict:
        assert emu.wait_until(lambda: (self.doc(path) or {}).get("status") in statuses, timeout, 0.1), self.doc(path)
        return self.doc(path)


@pytest.fixture(scope="module")
def worker(firestore_emulator, storage_emulator, emulator_logs, tmp_path_factory):
    project = emu.unique_id("demo-functions")
    bucket = storage_emulator.client(project).create_bucket(emu.unique_id("functions-bucket"))
    env = emu.emulator_env(firestore_emulator, storage_emulator, project, bucket.name)
    cache = os.environ.get("FIREGEN_CACHE") or str(tmp_path_factory.mktemp("tiny-models"))
    process = WorkerProcess(emulator_logs, {**env, "FIREGEN_CACHE": cache})
    process.start()
    db = firestore_emulator.client(project)
    try:
        yield Worker(process, db)
    finally:
        process.stop()
        emu.close_firestore(db)


class BrokenBody:
    """A stub's answer: `status` and the start of its body, then nothing for `stall` seconds, then the connection
    closed: an answer that broke off (or stalled past the client's read timeout) after RunPod had the request."""

    def __init__(self, stall: float = 0.0, status: int = 200):
        self.stall, self.status = stall, status


class StubRunPod(LocalServer):
    """A scripted stand-in for api.runpod.ai on 127.0.0.1: answers (status, body) in turn, the last one for
    ever (None: closes the connection unanswered); records each request's Authorization header and body.

    Used only where the real local worker (the `worker` fixture) cannot serve: answers it never gives (5xx,
    IN_QUEUE, 401, TIMED_OUT, a FAILED from a newer worker's contract); what RunPod receives, which the SDK's
    local API neither checks nor shows (the Bearer key, the exact request body); and tests that must send
    nothing, in a project of their own where no worker's listener would take the doc first. Everything that
    needs RunPod to accept a job and run it uses the real worker.
    """

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[tuple[str | None, dict]] = []
        self.arrived: list[float] = []  # time.monotonic() of each request
        stub = self

        class Handler(QuietHandler):
            def do_POST(self):
                stub.arrived.append(time.monotonic())
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                stub.requests.append((self.headers.get("Authorization"), body))
                scripted = stub.answers[min(len(stub.requests), len(stub.answers)) - 1]
                if scripted is None:  # DROP: the request read in full, the connection closed unanswered
                    self.close_connection = True
                    return
                if isinstance(scripted, BrokenBody):
                    self.send_response(scripted.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "200")
                    self.end_headers()
                    self.wfile.write(b'{"id": "job-1", "status": "IN_QUE')
                    self.wfile.flush()
                    time.sleep(scripted.stall)
                    self.close_connection = True
                    return
                self.reply(*scripted)

        super().__init__(Handler)
        self.url = f"{self.origin}/v2/endpoint/runsync"

    def client(self, **kw) -> RunPodClient:
        return RunPodClient(self.url, API_KEY, **{**FAST, **kw})


@pytest.fixture
def stub():
    made = []

    def make(*answers):
        made.append(StubRunPod(answers))
        return made[-1]

    yield make
    for s in made:
        s.close()


def nobody_listening() -> RunPodClient:
    return RunPodClient(f"http://127.0.0.1:{emu.free_port()}/runsync", API_KEY, **FAST)


DISPATCH_MARKERS = {"dispatch_count", "dispatched_at", "dispatched_by", "dispatched_inputs", "dispatch_error"}


def client_doc(**options) -> dict:
    """The contract's client sample, as the Admin SDK writes it (rules are tested in test_rules.py)."""
    return {
        "status": "queued",
        "created_at": firestore.SERVER_TIMESTAMP,
        "prompt": "A red sports car",
        "generated": False,
        "error": False,
        **options,
    }


def worker_gone(since: datetime) -> dict:
    """A job's fields while it runs on a worker that died: dispatched once, claimed, its lease run out `since`."""
    return {
        "status": "processing",
        "dispatch_count": 1,
        "dispatched_at": since,
        "worker_id": "w-gone",
        "lease_expires_at": since,
        "attempts": 1,
    }


def assert_key_nowhere(*texts):
    for text in texts:
        assert API_KEY not in str(text)


SMALL = {"width": 256, "height": 256, "numInferenceSteps": 10}
ACCEPTED = (
    200,
    {
        "id": "job-1",
        "status": "COMPLETED",
        "output": {
            "status": "accepted",
            "message": "Generation task accepted and processing",
            "user_id": "u",
            "file_uid": "f",
            "task_type": "text2image",
        },
    },
)


# ---------------------------------------------------------------------------------------------- callable
def test_callable_accepted_end_to_end(worker, caplog):
    caplog.set_level(logging.DEBUG)
    data = {
        "prompt": "A sunset over mountains",
        "user_id": "u-accept",
        "file_uid": "img-1",
        "use_cloud_storage": True,
        **SMALL,
    }
    reply = dispatch.generate(worker.db, worker.client(), uid="u-accept", data=data)
    assert reply == {
        "success": True,
        "fileUid": "img-1",
        "mediaType": "images",
        "status": "accepted",
        "message": "Generation started",
    }
    path = "generations/u-accept/images/img-1"
    doc = worker.wait_status(path)
    assert (doc["status"], doc["generated"], doc["image_count"]) == ("completed", True, 1)
    # The callable wrote the queued doc in the worker's own shape, with snake_case fields and its dispatch marker.
    assert doc["num_inference_steps"] == 10 and "numInferenceSteps" not in doc
    assert (doc["dispatch_count"], doc["dispatched_by"]) == (1, "callable") and doc["dispatched_at"]
    assert doc["created_at"] and doc["task_type"] == "text2image"
    assert worker.runsync_calls("img-1") == 1
    assert_key_nowhere(reply, doc, caplog.text, *(str(vars(record)) for record in caplog.records))


def test_callable_after_the_client_sample_wrote_its_doc(worker):
    """The contract's client flow: setDoc (camelCase options, in videos) then the callable with the same
    options. The client's doc is kept as written, and the job is dispatched at most once."""
    options = {"numFrames": 16, "fps": 8, "videoWidth": 256, "videoHeight": 256, "numInferenceSteps": 10}
    path = "generations/u-sample/videos/vid-1"
    worker.db.document(path).set(client_doc(**options))
    created = worker.doc(path)["created_at"]
    reply = dispatch.generate(
        worker.db,
        worker.client(),
        uid="u-sample",
        data={
            "prompt": "A red sports car",
            "user_id": "u-sample",
            "file_uid": "vid-1",
            "use_cloud_storage": True,
            **options,
        },
    )
    assert reply["success"] is True and reply["mediaType"] == "videos" and reply["fileUid"] == "vid-1"
    doc = worker.wait_status(path, timeout=90)
    assert doc["status"] == "completed" and doc["video_info"]["frames"] == 16
    assert doc["numFrames"] == 16 and doc["created_at"] == created  # the client's doc, untouched
    # The worker's own listener may take the client's doc before the call arrives: then nothing is sent.
    assert worker.runsync_calls("vid-1") == doc.get("dispatch_count", 0) <= 1


def test_callable_defaults_user_id_and_file_uid(worker):
    reply = dispatch.generate(worker.db, worker.client(), uid="u-default", data={"prompt": "a cat", **SMALL})
    assert reply["success"] is True and reply["fileUid"]
    doc = worker.wait_status(f"generations/u-default/images/{reply['fileUid']}")
    assert doc["user_id"] == "u-default" and doc["status"] == "completed"


def test_callable_takes_a_null_use_cloud_storage_as_left_out(firestore_client, stub):
    """Null is "not given" for every field the callable reads (before: "use_cloud_storage is required" for null
    alone, and the client's doc failed with it)."""
    runpod = stub(ACCEPTED)
    data = {"prompt": "a car", "file_uid": "null-ucs", "use_cloud_storage": None}
    reply = dispatch.generate(firestore_client, runpod.client(), uid="u-null", data=data)
    assert reply["status"] == "accepted" and runpod.requests[0][1]["input"]["use_cloud_storage"] is True


@pytest.mark.parametrize("data", [[1], "a car", None, 5])
def test_a_call_whose_data_is_no_object_is_refused_naming_its_data(firestore_client, stub, data):
    """Audit: refused as "input must be a JSON object", runsync's field, which no call sends."""
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as refused:
        dispatch.generate(firestore_client, runpod.client(), uid="u-nothing", data=data)
    assert (refused.value.code, refused.value.message) == (
        "invalid-argument",
        "Validation failed: the call's data must be a JSON object",
    )
    assert runpod.requests == []


LONG = "type.googleapis.com/google.protobuf.Int64Value"


def test_the_callable_reads_the_client_sdks_wrapped_64_bit_integers(firestore_client, stub):
    """Firebase's Android and iOS SDKs send a Long / Int64 as {"@type": ".../Int64Value", "value": "..."}, which
    the Node Functions SDK reads as a number and the Python one does not (audit: an Android app's seed was
    refused "seed must be an integer or null"). Read as the int it states; a wrapper that states no integer is
    refused as the field's wrong type."""
    runpod = stub(ACCEPTED)
    seed = {"@type": LONG, "value": "9223372036854775807"}
    width = {"@type": "type.googleapis.com/google.protobuf.UInt64Value", "value": "512"}
    data = {"prompt": "a car", "file_uid": "long-1", "seed": seed, "width": width}
    assert dispatch.generate(firestore_client, runpod.client(), uid="u-long", data=data)["status"] == "accepted"
    sent = runpod.requests[0][1]["input"]
    assert (sent["seed"], sent["width"]) == (2**63 - 1, 512)
    doc = firestore_client.document("generations/u-long/images/long-1").get().to_dict()
    assert (doc["seed"], doc["width"]) == (2**63 - 1, 512)
    for wrapped, message in (
        ({"@type": LONG, "value": "4.5"}, "Validation failed: seed must be an integer or null"),
        ({"@type": LONG, "value": "9" * 5000}, "Validation failed: seed must be an integer or null"),  # no INTERNAL
        ({"@type": LONG, "value": 7}, None),  # the SDKs send text; anything else is no wrapped integer
        ({"@type": LONG, "value": None}, None),
        ({"@type": LONG, "value": "7", "extra": 1}, None),
        (
            {"@type": LONG, "value": "9223372036854775808"},
            "Validation failed: seed must fit in a signed 64-bit integer",
        ),
        ({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "7"}, None),
        ({"@type": [], "value": "7"}, None),  # the fuzz audit: unhashable, a TypeError (INTERNAL)
        ({"@type": {}, "value": "7"}, None),
    ):
        with pytest.raises(CallError) as raised:
            dispatch.generate(
                firestore_client, runpod.client(), uid="u-long", data={"prompt": "a car", "seed": wrapped}
            )
        assert raised.value.code == "invalid-argument"
        assert raised.value.message == (message or "Validation failed: seed must be an integer or null")
    assert len(runpod.requests) == 1


def test_the_callables_answer_unavailable_with_a_message_when_firestore_is_away(stub, monkeypatch):
    """Audit: with Firestore unresponsive, the callable raised its client library's timeout, which the framework
    answers INTERNAL (the web app showed just that). A Firestore that refuses connections here (a closed port),
    each call's bound shortened."""
    from google.api_core import retry as retries
    from google.api_core.exceptions import ServiceUnavailable
    from google.auth.credentials import AnonymousCredentials

    from firegen_core import jobs

    short = retries.Retry(predicate=retries.if_exception_type(ServiceUnavailable), initial=0.05, timeout=0.5)
    monkeypatch.setitem(jobs.BOUND, "retry", short)
    monkeypatch.setitem(jobs.BOUND, "timeout", 0.5)
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    away = firestore.Client(
        project="demo-firegen",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": f"127.0.0.1:{emu.free_port()}"},
    )
    with emu.closing_firestore(away):
        runpod = stub(ACCEPTED)
        with pytest.raises(CallError) as raised:
            dispatch.generate(away, runpod.client(), uid="u-away", data={"prompt": "a car", "file_uid": "away-1"})
        assert (raised.value.code, raised.value.message) == (
            "unavailable",
            "Could not record the job in Firestore; please try again",
        )
        with pytest.raises(CallError) as raised:
            owner_calls.cancel(away, uid="u-away", data={"fileUid": "away-1", "mediaType": "images"})
        assert (raised.value.code, raised.value.message) == (
            "unavailable",
            "Could not record the cancel in Firestore; please try again",
        )
        assert runpod.requests == []


@pytest.mark.parametrize(
    "data,message",
    [
        ({"numFrames": 100}, "num_frames must be between 16 and 81"),
        ({"width": 2048}, "width must be between 256 and 1024"),
        ({"width": 10**400}, "width must be between 256 and 1024"),  # was INTERNAL (an OverflowError)
        ({"prompt": "  "}, "prompt is required"),
        # JavaScript strings carry lone surrogates and httpsCallable sends them: was INTERNAL
        (
            {"prompt": "a \ud800"},
            "Validation failed: prompt must be valid Unicode text (it holds a lone UTF-16 surrogate)",
        ),
        ({"guidanceScale": "high"}, "Validation failed: guidance_scale must be a number"),
        ({"colour": "red"}, "Validation failed: unknown field 'colour'"),
        (
            {"use_cloud_storage": False},
            "Validation failed: use_cloud_storage must be true: results go to Cloud Storage",
        ),
        # Fuzz audit: refused, but the client's doc was left queued, to run at its defaults, charged.
        (
            {"guidance_scale": 7.5, "guidanceScale": 8},
            "Validation failed: guidance_scale is given twice with different values",
        ),
        ({"Width": 512}, "Validation failed: unknown field 'Width' (did you mean 'width'?)"),
        ({"num_frames": 16, "numFrames": 17}, "Validation failed: num_frames is given twice with different values"),
    ],
)
def test_callable_refuses_bad_params_with_the_contracts_message(firestore_client, stub, data, message):
    """The client wrote its doc, then called with bad parameters: invalid-argument with the contract's message,
    and the doc carries the contract's error fields. Nothing is sent to RunPod."""
    media = "videos" if "numFrames" in data else "images"
    path = f"generations/u-bad/{media}/bad-1"
    firestore_client.document(path).create(client_doc())
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-bad", data={"prompt": "a car", "file_uid": "bad-1", **data}
        )
    assert (raised.value.code, raised.value.message) == ("invalid-argument", message)
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["generated"], doc["error"], doc["status"]) == (False, True, "failed")
    assert (doc["error_message"], doc["error_type"]) == (message, "ValidationError")
    assert doc["failed_at"] and doc["modified"] and doc["prompt"] == "A red sports car"
    assert runpod.requests == []


def test_bad_params_without_a_doc_leave_a_failed_doc(firestore_client, stub):
    """The contract's flow: a rejected job's doc ends failed with the error fields, even where the client
    wrote none (its write was refused by the rules, or it only called the function)."""
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-bad", data={"prompt": "x", "file_uid": "nodoc", "fps": 99}
        )
    assert (raised.value.code, raised.value.message) == ("invalid-argument", "fps must be between 6 and 15")
    doc = firestore_client.document("generations/u-bad/videos/nodoc").get().to_dict()
    assert (doc["status"], doc["generated"], doc["error"]) == ("failed", False, True)
    assert (doc["error_message"], doc["error_type"]) == ("fps must be between 6 and 15", "ValidationError")
    assert {"failed_at", "modified", "created_at"} <= doc.keys() and (doc["user_id"], doc["file_uid"]) == (
        "u-bad",
        "nodoc",
    )
    assert runpod.requests == []


WIDTH, FPS = "width must be between 256 and 1024", "fps must be between 6 and 15"


def test_a_field_given_twice_fails_the_job_it_names_and_names_none_when_it_is_the_file_uid(firestore_client, stub):
    """Fuzz audit: a call refused for a field given in two spellings left no failed doc (the client sample's
    listener waits on one). One whose file_uid is the doubled field names no job: it leaves none. A user_id
    naming another user in either spelling is refused as such."""
    runpod = stub(ACCEPTED)
    twice = "Validation failed: num_frames is given twice with different values"
    calls = [
        ({"prompt": "x", "file_uid": "twice", "num_frames": 16, "numFrames": 17}, ("invalid-argument", twice)),
        (
            {"prompt": "x", "file_uid": "a", "fileUid": "b"},
            ("invalid-argument", "Validation failed: file_uid is given twice with different values"),
        ),
        # The fuzz audit: one value twice (0 and 0.0) named no job either, and ran under a made-up id.
        (
            {"prompt": "x", "file_uid": 0, "fileUid": 0.0},
            ("invalid-argument", "Validation failed: file_uid must be a string"),
        ),
        (
            {"prompt": "x", "file_uid": "c", "user_id": "u-twice", "userId": "other"},
            ("permission-denied", "user_id must be the signed-in user's uid"),
        ),
        # A review: a null spelling is no second value (the call named no job, and its client's doc ran); nor does
        # a null first spelling decide the media type; `1` is not `true`.
        ({"prompt": "x", "file_uid": "nulled", "fileUid": None, "width": 2048}, ("invalid-argument", WIDTH)),
        (
            {"prompt": "x", "fileUid": "order", "numFrames": None, "num_frames": 16, "fps": 99},
            ("invalid-argument", FPS),
        ),
        (
            {"prompt": "x", "file_uid": "typed", "useCloudStorage": 1, "use_cloud_storage": True},
            ("invalid-argument", "Validation failed: use_cloud_storage is given twice with different values"),
        ),
    ]
    for data, refusal in calls:
        with pytest.raises(CallError) as raised:
            dispatch.generate(firestore_client, runpod.client(), uid="u-twice", data=data)
        assert (raised.value.code, raised.value.message) == refusal
    docs = {
        doc.reference.path: doc.to_dict()
        for media in ("images", "videos")
        for doc in firestore_client.collection(f"generations/u-twice/{media}").stream()
    }
    ended = {path: (doc["status"], doc["error_type"], doc["error_message"]) for path, doc in docs.items()}
    assert ended == {
        "generations/u-twice/videos/twice": ("failed", "ValidationError", twice),
        "generations/u-twice/images/nulled": ("failed", "ValidationError", WIDTH),
        "generations/u-twice/videos/order": ("failed", "ValidationError", FPS),
        "generations/u-twice/images/typed": (
            "failed",
            "ValidationError",
            "Validation failed: use_cloud_storage is given twice with different values",
        ),
    }
    assert runpod.requests == []


def test_bad_params_of_a_call_that_names_no_job_leave_no_doc(firestore_client, stub):
    """The protocol audit: a refused call without a file_uid left a failed doc under an id of the callable's own,
    which its answer does not carry: nothing could find it, and it stayed for the retention's days."""
    runpod = stub(ACCEPTED)
    for data in ({"prompt": 123}, {}, {"prompt": "x", "fps": 99}):
        with pytest.raises(CallError) as raised:
            dispatch.generate(firestore_client, runpod.client(), uid="u-nameless", data=data)
        assert raised.value.code == "invalid-argument"
    for media in ("images", "videos"):
        assert list(firestore_client.collection(f"generations/u-nameless/{media}").stream()) == []
    assert runpod.requests == []


MISFILED = "Validation failed: fps is a video field: video jobs belong under generations/{user_id}/videos"
CLIENT_DOC_STATES = {
    "queued": {},
    "refused on sight": {"status": "failed", "error": True, "error_type": "ValidationError", "error_message": MISFILED},
    "running": {"status": "processing", "worker_id": "w1", "attempts": 1},
    "cancelled": {
        "status": "failed",
        "error": True,
        "error_type": "Cancelled",
        "error_message": "Cancelled by the user",
    },
    "refused for its limits": {"status": "failed", "error": True, "error_type": "QuotaExceeded", "error_message": "x"},
    "completed": {"status": "completed", "generated": True},
}


@pytest.mark.parametrize("state", list(CLIENT_DOC_STATES))
def test_a_video_call_for_a_doc_the_client_sample_filed_under_images_is_refused(firestore_client, stub, state):
    """The contract's client sample files its doc by `numFrames` alone: `{fps: 10}` wrote it under images, where
    it failed ("fps is a video field"), while the callable ran, charged, a video under videos that the client
    never listened to. The client's doc is the call's job, whatever its state (the day's review: a cancelled one,
    or one a worker ran from the doc alone, let the call, or the same call sent again, run the video): the call
    is refused with the message of that doc's contract, every time; a live doc fails with it."""
    images, videos = "generations/u-filed/images/fps-only", "generations/u-filed/videos/fps-only"
    firestore_client.document(images).create(client_doc(fps=10, **CLIENT_DOC_STATES[state]))
    runpod = stub(ACCEPTED)
    data = {"prompt": "A red sports car", "user_id": "u-filed", "file_uid": "fps-only", "fps": 10}
    for _ in range(2):  # and the same call again
        with pytest.raises(CallError) as raised:
            dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
        assert (raised.value.code, raised.value.message) == ("invalid-argument", MISFILED)
    doc = firestore_client.document(images).get().to_dict()
    if state in ("queued", "running"):
        assert (doc["status"], doc["error_type"], doc["error_message"]) == ("failed", "ValidationError", MISFILED)
    else:
        assert doc["status"] == CLIENT_DOC_STATES[state]["status"]  # its end stands
    assert not firestore_client.document(videos).get().exists and runpod.requests == []
    assert (firestore_client.document("usage/u-filed").get().to_dict() or {}).get("spent_today", 0) == 0


def test_a_call_refused_for_its_values_answers_with_the_message_of_the_doc_the_client_filed(firestore_client, stub):
    """Audit: the client sample's `{fps: 99}` (its doc under images) was answered "fps must be between 6 and 15"
    while its doc said "fps is a video field", and the callable created a failed doc under videos that nobody
    listened to. The call is the doc's: one message, one doc."""
    runpod = stub(ACCEPTED)
    images = "generations/u-filed/images/fps-99"
    firestore_client.document(images).create(client_doc(fps=99))
    data = {"prompt": "A red sports car", "file_uid": "fps-99", "fps": 99}
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
    assert raised.value.message == MISFILED
    doc = firestore_client.document(images).get().to_dict()
    assert (doc["status"], doc["error_message"]) == ("failed", MISFILED)
    assert not firestore_client.document("generations/u-filed/videos/fps-99").get().exists and runpod.requests == []


def test_a_refused_call_is_not_answered_for_another_job_of_the_other_media_type(firestore_client, stub):
    """The last review: a video call with `fps: 99` whose file_uid also named a finished client image of another
    prompt was answered "fps is a video field" (that image's contract), and its own failed doc was never made."""
    runpod = stub(ACCEPTED)
    firestore_client.document("generations/u-filed/images/x").create(
        client_doc(status="completed", generated=True, prompt="a boat")
    )
    data = {"prompt": "A red sports car", "file_uid": "x", "num_frames": 33, "fps": 99}
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
    assert raised.value.message == "fps must be between 6 and 15"
    assert firestore_client.document("generations/u-filed/videos/x").get().to_dict()["error_message"] == (
        "fps must be between 6 and 15"
    )


def test_an_image_call_for_a_cancelled_video_the_client_filed_answers_for_it(firestore_client, stub):
    """The day's review: the owner cancelled the doc before the call arrived; the call ran a new job beside it."""
    runpod = stub(ACCEPTED)
    firestore_client.document("generations/u-filed/videos/gone").create(client_doc(**CLIENT_DOC_STATES["cancelled"]))
    data = {"prompt": "A red sports car", "file_uid": "gone"}  # the doc's prompt: the sample writes it into both
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
    assert raised.value.message == "Cancelled by the user"
    assert not firestore_client.document("generations/u-filed/images/gone").get().exists and runpod.requests == []


def test_an_image_call_for_a_doc_the_client_filed_under_videos_runs_that_video(firestore_client, stub):
    """A client's videos doc with its prompt alone, then the call with image options only: the doc is the job (it
    ran its defaults after the grace, and the call ran an image besides, both charged)."""
    runpod = stub(ACCEPTED)
    firestore_client.document("generations/u-filed/videos/v-doc").create(client_doc())
    data = {"prompt": "A red sports car", "file_uid": "v-doc", "seed": 5}
    reply = dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
    assert (reply["status"], reply["mediaType"]) == ("accepted", "videos")
    doc = firestore_client.document("generations/u-filed/videos/v-doc").get().to_dict()
    assert (doc["status"], doc["seed"]) == ("queued", 5)
    assert not firestore_client.document("generations/u-filed/images/v-doc").get().exists
    assert [body["input"].get("num_frames") for _, body in runpod.requests] == [16]


@pytest.mark.parametrize(
    "filed",
    [
        {"requested_at": firestore.SERVER_TIMESTAMP},  # a request created it
        {"width": 768},  # the client wrote it, for a job the call does not state
        {"prompt": "a boat"},
    ],
)
def test_a_finished_job_of_the_other_media_type_does_not_take_another_call(firestore_client, stub, filed):
    """One file_uid may name an image and a video: a finished image does not make a video call for the same
    file_uid misfiled when a request created it, or when it states what the call does not (the re-review: a
    completed client image refused every later video call with its file_uid, "num_frames is a video field")."""
    runpod = stub(ACCEPTED)
    firestore_client.document("generations/u-filed/images/both").create(
        client_doc(status="completed", generated=True, **filed)
    )
    data = {"prompt": "A red sports car", "file_uid": "both", "num_frames": 33}
    reply = dispatch.generate(firestore_client, runpod.client(), uid="u-filed", data=data)
    assert (reply["status"], reply["mediaType"]) == ("accepted", "videos")
    assert firestore_client.document("generations/u-filed/videos/both").get().to_dict()["num_frames"] == 33


@pytest.mark.parametrize("client_wrote", [False, True])
def test_a_refused_call_fixed_and_sent_again_with_its_file_uid_runs(firestore_client, stub, client_wrote):
    """The contract's answer to a refusal is "fix parameters and retry": the fixed call with the same file_uid is
    that try (it answered the first call's stale message, quoting a field it no longer breaks)."""
    path = "generations/u-fix/images/fixed"
    if client_wrote:
        firestore_client.document(path).create(client_doc())
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-fix", data={"prompt": "a car", "file_uid": "fixed", "width": 2048}
        )
    assert raised.value.message == "width must be between 256 and 1024"
    assert firestore_client.document(path).get().to_dict()["error_type"] == "ValidationError"
    if client_wrote:  # its trigger and the sweep dispatched the client's doc before; the fixed job starts afresh
        firestore_client.document(path).update({"dispatch_count": 3, "dispatch_error": "RunPod did not answer"})
    reply = dispatch.generate(
        firestore_client, runpod.client(), uid="u-fix", data={"prompt": "a car", "file_uid": "fixed", "width": 256}
    )
    assert (reply["status"], reply["fileUid"]) == ("accepted", "fixed")
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["error"], doc["width"], doc["prompt"]) == ("queued", False, 256, "a car")
    assert (doc["dispatch_count"], doc["dispatched_by"]) == (1, "callable") and "dispatch_error" not in doc
    assert not {"error_type", "error_message", "failed_at"} & doc.keys()
    assert [r[1]["input"]["width"] for r in runpod.requests] == [256]


@pytest.mark.parametrize(
    "prompt,kept",
    [
        ("a red sports car", "a red sports car"),
        ("w" * 5000, "w" * 1999 + "…"),  # refused for its length, kept cut to the contract's 2000 characters
        (42, None),  # not a string: nothing to show
        ("a \udc00", "a \ufffd"),  # refused for its lone surrogate, which a Firestore string cannot hold
    ],
)
def test_a_failed_doc_the_callable_creates_keeps_the_requests_prompt(firestore_client, stub, prompt, kept):
    """The client's job list shows the refused job with what was asked, not '(no prompt recorded)'."""
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError):
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-bad", data={"prompt": prompt, "file_uid": "kept", "width": 2000}
        )
    doc = firestore_client.document("generations/u-bad/images/kept").get().to_dict()
    assert (doc["status"], doc["error_type"]) == ("failed", "ValidationError")
    assert doc.get("prompt") == kept
    assert runpod.requests == []


def test_a_huge_unknown_field_name_gets_a_short_message_on_the_doc_and_in_the_reply(firestore_client, stub):
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-bad", data={"prompt": "x", "file_uid": "huge", "n" * 900_000: 1}
        )
    assert raised.value.code == "invalid-argument" and len(raised.value.message) <= 300
    assert raised.value.message.startswith("Validation failed: unknown field 'nnn")
    doc = firestore_client.document("generations/u-bad/images/huge").get().to_dict()
    assert (doc["status"], doc["error_message"]) == ("failed", raised.value.message)
    assert runpod.requests == []


def test_bad_params_with_an_unsafe_file_uid_write_nothing(firestore_client, stub):
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid="u-bad", data={"prompt": "x", "file_uid": "a/b/c"})
    assert raised.value.code == "invalid-argument" and "file_uid" in raised.value.message
    assert list(firestore_client.collection_group("images").stream()) == []
    assert runpod.requests == []


def test_the_real_workers_refusal_is_read_as_rejected(worker):
    verdict = worker.client().runsync(
        {"prompt": "a car", "user_id": "u-r", "file_uid": "r-1", "use_cloud_storage": True, "width": 100}
    )
    assert (verdict.outcome, verdict.message) == ("rejected", "width must be between 256 and 1024")
    assert worker.doc("generations/u-r/images/r-1") is None


def test_a_refusal_from_runpod_fails_the_doc(firestore_client, stub):
    """Version skew: the worker refuses what this codebase's contract let through. Its message reaches the
    client as invalid-argument, and the doc gets the contract's error fields."""
    runpod = stub((200, {"id": "j", "status": "FAILED", "error": "width must be a multiple of 64"}))
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-skew", data={"prompt": "a car", "file_uid": "skew-1"}
        )
    assert (raised.value.code, raised.value.message) == ("invalid-argument", "width must be a multiple of 64")
    doc = firestore_client.document("generations/u-skew/images/skew-1").get().to_dict()
    assert (doc["status"], doc["error"], doc["generated"], doc["error_type"]) == (
        "failed",
        True,
        False,
        "ValidationError",
    )
    assert doc["error_message"] == "width must be a multiple of 64" and doc["failed_at"] and doc["modified"]
    assert len(runpod.requests) == 1
    # Calling again is the refused job's next try (it never ran: the contract's "fix parameters and retry"), sent
    # again, and refused again here.
    with pytest.raises(CallError) as again:
        dispatch.generate(
            firestore_client, runpod.client(), uid="u-skew", data={"prompt": "a car", "file_uid": "skew-1"}
        )
    assert again.value.message == "width must be a multiple of 64" and len(runpod.requests) == 2
    assert firestore_client.document("generations/u-skew/images/skew-1").get().to_dict()["status"] == "failed"


def test_a_worker_of_an_earlier_deploy_refusing_a_field_it_does_not_know_leaves_the_job_queued(
    firestore_client, stub, caplog
):
    """The functions deployed before the workers' rollout ended (README, Upgrading): a worker of the earlier deploy
    refuses a field this contract knows ("unknown field"). That is no verdict on the user's request (the callable
    validated it): the job stays queued, the refusal noted, for the sweep to dispatch again to a newer worker;
    before, it failed ValidationError, blaming the user."""
    refusal = "Validation failed: unknown field 'video_guidance_scale'"
    runpod = stub((200, {"id": "j-old", "status": "FAILED", "error": refusal}))
    data = {"prompt": "a fox", "file_uid": "behind-1", "num_frames": 16, "video_guidance_scale": 4.0}
    with caplog.at_level("WARNING", logger="functions.runpod"):
        answer = dispatch.generate(firestore_client, runpod.client(), uid="u-behind", data=data)
    assert (answer["success"], answer["status"]) == (True, "queued")
    doc = firestore_client.document("generations/u-behind/videos/behind-1").get().to_dict()
    assert (doc["status"], doc["error"]) == ("queued", False) and "error_type" not in doc
    assert doc["dispatch_error"] == (
        f"a worker of another deploy refused the job ({refusal}): deploy the workers first, then the functions"
    )
    assert [r.refused for r in caplog.records if r.getMessage() == "worker_behind"] == [refusal]


def test_uid_checks(firestore_client, stub):
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid=None, data={"prompt": "a car"})
    assert raised.value.code == "unauthenticated"
    for claimed in ({"user_id": "mallory"}, {"userId": "mallory"}):
        with pytest.raises(CallError) as raised:
            dispatch.generate(
                firestore_client,
                runpod.client(),
                uid="alice",
                data={"prompt": "a car", "file_uid": "steal-1", **claimed},
            )
        assert (raised.value.code, raised.value.message) == (
            "permission-denied",
            "user_id must be the signed-in user's uid",
        )
    assert list(firestore_client.collection_group("images").stream()) == []
    assert runpod.requests == []
    # Naming oneself is fine, in either spelling.
    reply = dispatch.generate(
        firestore_client, runpod.client(), uid="alice", data={"prompt": "a car", "userId": "alice", "fileUid": "mine-1"}
    )
    assert reply["fileUid"] == "mine-1" and runpod.requests[0][1]["input"]["user_id"] == "alice"


def test_runpod_down_leaves_the_job_queued(firestore_client, caplog):
    caplog.set_level(logging.DEBUG)
    down = nobody_listening()
    t0 = time.monotonic()
    verdict = down.runsync({"prompt": "x"})
    elapsed = time.monotonic() - t0
    assert (verdict.outcome, verdict.attempts) == ("undelivered", 3) and elapsed < 5
    assert "connection failed" in verdict.message
    [undelivered] = logged(caplog, "runsync_undelivered")
    assert (undelivered.levelno, undelivered.attempts) == (logging.WARNING, 3)
    assert "connection failed" in undelivered.error

    reply = dispatch.generate(firestore_client, down, uid="u-down", data={"prompt": "a car", "file_uid": "down-1"})
    assert reply == {
        "success": True,
        "fileUid": "down-1",
        "mediaType": "images",
        "status": "queued",
        "message": dispatch.PENDING_MESSAGE,
    }
    doc = firestore_client.document("generations/u-down/images/down-1").get().to_dict()
    assert doc["status"] == "queued" and doc["dispatch_count"] == 1 and "did not answer" in doc["dispatch_error"]
    [sent] = logged(caplog, "dispatched")
    assert (sent.path, sent.outcome, sent.attempts, sent.runpod_job_id, sent.levelno) == (
        "generations/u-down/images/down-1",
        "undelivered",
        3,
        None,
        logging.WARNING,  # no worker woken: an operator's alert sees it
    )
    assert "did not answer" in sent.error
    # The client retries (the contract: "Timeout: Retry the request"): dispatched again, the error cleared on success.
    up = StubRunPod([ACCEPTED])
    try:
        again = dispatch.generate(
            firestore_client, up.client(), uid="u-down", data={"prompt": "a car", "file_uid": "down-1"}
        )
    finally:
        up.close()
    assert again["status"] == "accepted"
    doc = firestore_client.document("generations/u-down/images/down-1").get().to_dict()
    assert doc["dispatch_count"] == 2 and "dispatch_error" not in doc
    assert_key_nowhere(reply, doc, caplog.text, verdict, *(str(vars(record)) for record in caplog.records))


def test_5xx_is_retried_with_the_bearer_key_and_in_queue_means_queued(firestore_client, stub):
    runpod = stub((503, {"error": "busy"}), (502, {}), (200, {"id": "job-9", "status": "IN_QUEUE"}))
    reply = dispatch.generate(
        firestore_client, runpod.client(), uid="u-cold", data={"prompt": "a car", "file_uid": "cold-1", "width": 256}
    )
    assert reply["status"] == "queued" and reply["message"] == dispatch.QUEUED_MESSAGE
    assert len(runpod.requests) == 3
    assert {auth for auth, _ in runpod.requests} == {f"Bearer {API_KEY}"}
    assert runpod.requests[0][1] == {
        "input": {"prompt": "a car", "user_id": "u-cold", "file_uid": "cold-1", "use_cloud_storage": True, "width": 256}
    }
    doc = firestore_client.document("generations/u-cold/images/cold-1").get().to_dict()
    assert doc["status"] == "queued" and "dispatch_error" not in doc
    assert doc["runpod_job_id"] == "job-9"  # the worker logs it as the job's requestId


def test_a_connection_dropped_after_the_job_was_sent_is_not_sent_again(firestore_client, stub):
    """Each send is one more RunPod job (and RunPod starts workers for its queue): a connection that dropped once
    the request was sent was retried as if it never connected (audit: 3 POSTs of one job, each read in full)."""
    runpod = stub(None)
    reply = dispatch.generate(
        firestore_client, runpod.client(), uid="u-drop", data={"prompt": "a car", "file_uid": "drop-1"}
    )
    assert len(runpod.requests) == 1
    assert reply["status"] == "queued" and reply["message"] == dispatch.QUEUED_MESSAGE
    doc = firestore_client.document("generations/u-drop/images/drop-1").get().to_dict()
    assert doc["status"] == "queued" and "dispatch_error" not in doc  # a client's retry does not send it again
    refused = nobody_listening().runsync({"prompt": "a car"})  # never connected: sent again, then undelivered
    assert refused.outcome == "undelivered" and refused.attempts == FAST["attempts"] > 1


@pytest.mark.parametrize("stall", [0.0, 2.0], ids=["broke-off", "stalled"])
def test_an_answer_that_breaks_off_after_its_status_line_is_queued_and_not_sent_again(firestore_client, stub, stall):
    """A review: an answer cut short (ChunkedEncodingError) or stalled past the read timeout once RunPod had sent
    its status line counted as never delivered: the job was POSTed again (3 times a call), its dispatch record
    dropped, and a client's retry sent it once more."""
    runpod = stub(BrokenBody(stall))
    data = {"prompt": "a car", "file_uid": f"cut-{stall:g}"}
    reply = dispatch.generate(firestore_client, runpod.client(timeout=1.0), uid="u-cut", data=data)
    assert len(runpod.requests) == 1
    assert reply["status"] == "queued" and reply["message"] == dispatch.QUEUED_MESSAGE
    doc = firestore_client.document(f"generations/u-cut/images/{data['file_uid']}").get().to_dict()
    assert doc["status"] == "queued" and "dispatch_error" not in doc and doc[DISPATCHED_INPUTS]
    again = dispatch.generate(firestore_client, runpod.client(timeout=1.0), uid="u-cut", data=data)
    # The client's retry: the job is RunPod's already, answered started and not sent again.
    assert again["status"] == "accepted" and len(runpod.requests) == 1


def test_a_refusal_that_breaks_off_is_undelivered(stub):
    """A 400 whose body broke off: a refusal (RunPod's, or the worker's) that could not be read, and nothing
    queued, as before the answers were read apart."""
    runpod = stub(BrokenBody(status=400))
    verdict = runpod.client().runsync({"prompt": "a car", "user_id": "u", "file_uid": "f", "use_cloud_storage": True})
    assert verdict.outcome == "undelivered" and len(runpod.requests) == 1
    assert verdict.message == "RunPod answered HTTP 400 and its answer broke off (ChunkedEncodingError)"


def test_a_job_a_warm_worker_finished_during_a_failed_dispatch_is_answered_started_without_a_dispatch_error(
    firestore_client,
):
    """A warm worker's listener takes the doc, and completes it, while the callable's runsync fails: the verdict
    was written after the completion (which removes `dispatch_error` for good), so the completed doc said its
    dispatch never arrived, and the caller was told "queued" (audit). Stand-in for RunPod: a failed delivery
    during which the worker's own job store claims and completes the job (a network failure cannot be staged
    with the real worker)."""
    from firegen_core.claims import WorkerJobs
    from firegen_core.jobs import JobKey

    class FinishedMeanwhile:
        def runsync(self, job_input):
            worker = WorkerJobs(firestore_client, worker_id="warm")
            job = worker.claim(JobKey(job_input["user_id"], "images", job_input["file_uid"]))
            assert job is not None and worker.complete(job, {"status": "completed", "generated": True})
            return runpod_client.Verdict(runpod_client.UNDELIVERED, "RunPod did not answer after 3 attempt(s)")

    reply = dispatch.generate(
        firestore_client, FinishedMeanwhile(), uid="u-warm", data={"prompt": "a car", "file_uid": "warm-1"}
    )
    assert reply["status"] == "accepted" and reply["message"] == dispatch.STARTED_MESSAGE
    doc = firestore_client.document("generations/u-warm/images/warm-1").get().to_dict()
    assert doc["status"] == "completed" and "dispatch_error" not in doc


def test_a_client_used_in_a_with_block_closes_its_connections(stub):
    """The functions make a client per call: its pooled connections are closed with it, not left to a warm
    instance's garbage collector."""
    import requests

    class Closing(requests.Session):
        closed = False

        def close(self):
            self.closed = True
            super().close()

    runpod, session = stub((200, {"id": "j", "status": "IN_QUEUE"})), Closing()
    with runpod.client(session=session) as client:
        assert client.runsync({"prompt": "a car"}).outcome == "queued" and not session.closed
    assert session.closed


def test_no_runpod_attempt_starts_past_the_clients_deadline(stub):
    """A review: the deadline was checked before each backoff wait, not after it, so a last attempt started up to
    a wait past it (and read for at least a second more): a call ran ~60 s on a 50 s deadline, which the
    callable's 70 s timeout barely held. Now the next attempt's wait counts: none starts past the deadline."""
    busy = stub((503, {"error": "busy"}))
    started = time.monotonic()
    verdict = busy.client(attempts=10, deadline=1.0, wait_initial=0.3, wait_max=0.3).runsync({"prompt": "x"})
    assert verdict.outcome == "undelivered" and len(busy.arrived) == verdict.attempts >= 2  # a third: if fast
    assert max(busy.arrived) - started < 1.0  # before: the fifth began 1.2 s in


@pytest.mark.parametrize(
    "status,setting", [(401, "RUNPOD_API_KEY"), (403, "RUNPOD_API_KEY"), (404, "RUNPOD_ENDPOINT_ID")]
)
def test_runpod_refusing_the_call_itself_is_an_error_naming_the_setting(
    firestore_client, stub, caplog, status, setting
):
    """The diagnosability review: a wrong or rotated API key, or a wrong endpoint id, fails every dispatch, and it
    was logged at INFO without a reason (a warm worker's listener then ran the jobs anyway, hiding it until the
    endpoint scaled to zero). ERROR, naming the setting to check, on the log line and the doc."""
    caplog.set_level(logging.INFO)
    runpod = stub((status, {"error": "Unauthorized"}))
    reply = dispatch.generate(firestore_client, runpod.client(), uid="u-key", data={"prompt": "a car", "file_uid": "k"})
    assert reply["status"] == "queued"
    said = f"RunPod refused the call: HTTP {status} (check {setting})"
    [sent] = logged(caplog, "dispatched")
    assert (sent.levelno, sent.outcome, sent.error) == (logging.ERROR, "undelivered", said)
    assert firestore_client.document("generations/u-key/images/k").get().get("dispatch_error") == said


def test_a_key_set_with_its_trailing_newline_still_dispatches(stub):
    """`echo $KEY | firebase functions:secrets:set RUNPOD_API_KEY` stores the newline too, which no HTTP header may
    hold: every dispatch was undelivered ("InvalidHeader") and every job waited out the scheduler's give-up."""
    runpod = stub((200, {"id": "job-1", "status": "IN_QUEUE"}))
    client = RunPodClient(runpod.url, f"{API_KEY}\n", **FAST)
    assert client.runsync({"prompt": "a car"}).outcome == "queued"
    assert [auth for auth, _ in runpod.requests] == [f"Bearer {API_KEY}"]


@pytest.mark.parametrize(
    "answer,outcome",
    [
        ((200, {"id": "j", "status": "IN_PROGRESS"}), "queued"),
        ((401, {"error": "Unauthorized"}), "undelivered"),
        (
            (
                200,
                {
                    "id": "j",
                    "status": "FAILED",
                    "error": json.dumps(
                        {"error_type": "<class 'KeyError'>", "error_message": "x", "error_traceback": "..."}
                    ),
                },
            ),
            "undelivered",
        ),
        ((200, {"id": "j", "status": "FAILED", "error": "Could not record the job, please retry: ..."}), "undelivered"),
        ((200, {"id": "j", "status": "FAILED", "error": "fps must be between 6 and 15"}), "rejected"),
        (
            (200, {"id": "j", "status": "COMPLETED", "output": {"error": "prompt is required", "status": "failed"}}),
            "rejected",
        ),
        ((200, {"id": "j", "status": "TIMED_OUT"}), "undelivered"),
        # The worker's answers unwrapped, as the contract prints them (a stand-in for RunPod in front of it).
        ((200, {"status": "accepted", "message": "Generation task accepted and processing"}), "accepted"),
        ((200, {"error": "prompt is required", "status": "failed"}), "rejected"),
        ((400, {"error": "width must be between 256 and 1024", "status": "failed"}), "rejected"),
        ((400, {"error": "Bad Request"}), "undelivered"),
        ((400, {"error": {"message": "x"}, "status": "failed"}), "undelivered"),
    ],
)
def test_runpod_envelopes(stub, answer, outcome):
    runpod = stub(answer)
    verdict = runpod.client().runsync({"prompt": "x"})
    assert verdict.outcome == outcome and len(runpod.requests) == 1  # none of these is retried
    assert_key_nowhere(verdict)


def test_the_callable_reads_the_contracts_own_answers_unwrapped(firestore_client, stub):
    """The contract prints the worker's answers bare ({"status": "accepted"}, or HTTP 400 {"error", "status":
    "failed"}) and its client sample reads them so: in front of a RunPod stand-in that answers that way, a refusal
    was "RunPod refused the call: HTTP 400" (the doc left queued, the caller told it started) and an acceptance
    undelivered. A refusal fails the doc with the worker's message; an acceptance is "Generation started"."""
    refusing = stub((400, {"error": "width must be between 256 and 1024", "status": "failed"}))
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, refusing.client(), uid="u-bare", data={"prompt": "a car", "file_uid": "r"})
    assert (raised.value.code, raised.value.message) == ("invalid-argument", "width must be between 256 and 1024")
    doc = firestore_client.document("generations/u-bare/images/r").get().to_dict()
    assert (doc["status"], doc["error_message"]) == ("failed", "width must be between 256 and 1024")
    accepting = stub((200, {"status": "accepted", "message": "Generation task accepted and processing"}))
    reply = dispatch.generate(
        firestore_client, accepting.client(), uid="u-bare", data={"prompt": "a car", "file_uid": "a"}
    )
    assert (reply["success"], reply["status"], reply["message"]) == (True, "accepted", "Generation started")


def test_runsync_url():
    runsync_url = runpod_client.runsync_url
    assert runsync_url("abc123") == "https://api.runpod.ai/v2/abc123/runsync"
    assert runsync_url("abc123", "http://127.0.0.1:8000/runsync") == "http://127.0.0.1:8000/runsync"
    with pytest.raises(ValueError, match="RUNPOD_ENDPOINT_ID"):
        runsync_url("")
    assert API_KEY not in repr(RunPodClient("http://x", API_KEY))


# ---------------------------------------------------------------------------------------------- trigger
def test_trigger_dispatches_once_under_duplicate_delivery(worker, busy_slot):
    """Three deliveries at once and a late one, to the real worker (its one slot kept busy, so its listener
    cannot take the doc first): exactly one runsync, and the job runs once."""
    busy = busy_slot("dup-busy")
    path = "generations/u-trigger/images/trig-1"
    worker.db.document(path).set(client_doc(width=256, height=256, num_inference_steps=10))
    barrier = threading.Barrier(3)
    outcomes = []

    def deliver():
        barrier.wait(10)
        outcomes.append(
            dispatch.dispatch_created(
                worker.db, worker.client(), user_id="u-trigger", media_type="images", file_uid="trig-1"
            )
        )

    threads = [threading.Thread(target=deliver, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    outcomes.append(
        dispatch.dispatch_created(
            worker.db, worker.client(), user_id="u-trigger", media_type="images", file_uid="trig-1"
        )
    )  # a late redelivery
    assert worker.doc(busy)["status"] == "processing"  # the slot was still busy: only the trigger dispatched
    assert sorted(outcomes) == ["accepted", "skipped", "skipped", "skipped"]
    runs_once_dispatched_by_the_trigger(worker, busy, path)


def busy_video(worker, file_uid: str) -> str:
    """Occupy the worker's one slot with a video job long enough to cover a few dispatches; returns its path."""
    path = f"generations/u-trigger/videos/{file_uid}"
    body = {"prompt": "busy", "user_id": "u-trigger", "file_uid": file_uid, "use_cloud_storage": True}
    body.update(num_frames=49, num_inference_steps=40, video_width=256, video_height=256)
    assert worker.client().runsync(body).outcome == "accepted"
    worker.wait_status(path, ("processing",), 30)
    return path


@pytest.fixture
def busy_slot(worker):
    """`busy_slot(file_uid)`: `busy_video` on the module's worker, its video cancelled at the test's end whatever
    that end (the test review: a failed assertion left the shared worker's one slot busy with a long video, and
    the tests after it failed for want of a free worker)."""
    occupied: list[str] = []

    def occupy(file_uid: str) -> str:
        occupied.append(busy_video(worker, file_uid))
        return occupied[-1]

    yield occupy
    for path in occupied:
        free_the_slot(worker, path)  # done already by a test that passed: the job has ended, nothing changes


def free_the_slot(worker, busy: str) -> None:
    """The busy video cancelled (the owner's cancel) once the test needs the slot busy no more: what waits for the
    slot runs now, not after the rest of a video that is ~10 s of a shared core."""
    from firegen_core.jobs import JobKey, JobStore

    JobStore(worker.db).cancel(JobKey.from_path(busy))


def runs_once_dispatched_by_the_trigger(worker, busy: str, path: str) -> None:
    """Once the slot is free, the doc completes on its first attempt, dispatched once, by the trigger."""
    free_the_slot(worker, busy)
    doc = worker.wait_status(path, timeout=120)
    assert (doc["status"], doc["attempts"], doc["dispatch_count"], doc["dispatched_by"]) == (
        "completed",
        1,
        1,
        "trigger",
    )
    assert worker.runsync_calls(path.rsplit("/", 1)[1]) == 1


def test_the_trigger_wakes_a_busy_real_worker_once(worker, busy_slot):
    """The trigger comes first (the worker's one slot is busy, so its listener cannot take the doc): one
    dispatch is accepted, the redelivery skips, and the doc runs once, after the busy job."""
    busy = busy_slot("trig-busy")
    path = "generations/u-trigger/images/trig-first"
    worker.db.document(path).set(client_doc(width=256, height=256, num_inference_steps=10))
    runpod = worker.client()
    outcomes = [
        dispatch.dispatch_created(worker.db, runpod, user_id="u-trigger", media_type="images", file_uid="trig-first")
        for _ in range(2)
    ]
    assert worker.doc(busy)["status"] == "processing"  # the slot was still busy: the trigger was first
    assert outcomes == ["accepted", "skipped"]
    runs_once_dispatched_by_the_trigger(worker, busy, path)


def test_the_callable_answers_as_the_job_ended_when_it_ended_before_its_dispatch_arrived(worker, busy_slot):
    """The owner's cancel lands while the callable's dispatch is on its way: the real worker answers it
    failed, "Cancelled by the user", and the call says the same, `failed-precondition` (before: the worker's
    failed answer read as a refusal of the parameters, `invalid-argument`: "fix parameters and retry")."""
    from firegen_core.jobs import JobKey, JobStore

    key = JobKey("u-late", "images", "late-cancel")
    busy = busy_slot("late-cancel-busy")  # its listener could take the job first: the cancel would wait

    class CancelledOnTheWay(RunPodClient):
        def _once(self, job_input, timeout):
            JobStore(worker.db).cancel(key)
            return super()._once(job_input, timeout)

    runpod = CancelledOnTheWay(worker.process.runsync_url, API_KEY, **FAST)
    with pytest.raises(dispatch.CallError) as raised:
        dispatch.generate(worker.db, runpod, uid="u-late", data={"prompt": "a car", "file_uid": "late-cancel"})
    assert (raised.value.code, raised.value.message) == ("failed-precondition", "Cancelled by the user")
    free_the_slot(worker, busy)
    refused = lambda: [e for e in worker.process.events("request_refused") if '"late-cancel"' in e]  # noqa: E731
    assert emu.wait_until(refused, 10, 0.05) and '"Cancelled"' in refused()[0]  # the worker's answer, as it said
    doc = worker.doc(key.path)
    assert (doc["status"], doc["error_type"]) == ("failed", "Cancelled")


def test_the_trigger_skips_a_doc_a_real_worker_already_took(worker):
    """The worker's listener comes first (an idle worker claims a client's doc at once): the trigger, delivered
    after, sends nothing, and the job runs once."""
    path = "generations/u-trigger/images/trig-late"
    worker.db.document(path).set(client_doc(width=256, height=256, num_inference_steps=10))
    worker.wait_status(path, ("processing", "completed"), 30)
    runpod = worker.client()
    outcomes = [
        dispatch.dispatch_created(worker.db, runpod, user_id="u-trigger", media_type="images", file_uid="trig-late")
        for _ in range(2)
    ]
    assert outcomes == ["skipped", "skipped"]
    doc = worker.wait_status(path)
    assert (doc["status"], doc["attempts"], doc.get("dispatch_count")) == ("completed", 1, None)
    assert worker.runsync_calls("trig-late") == 0


def test_trigger_and_callable_dispatch_once_between_them(worker, busy_slot):
    """Against the real worker, its one slot kept busy so that its listener cannot take the docs first."""
    busy = busy_slot("both-busy")
    small = {"width": 256, "height": 256, "num_inference_steps": 10}
    # The callable wrote and dispatched the doc: its creation trigger skips it.
    reply = dispatch.generate(
        worker.db, worker.client(), uid="u-both", data={"prompt": "a car", "file_uid": "both-1", **small}
    )
    assert reply["status"] == "accepted"
    assert (
        dispatch.dispatch_created(worker.db, worker.client(), user_id="u-both", media_type="images", file_uid="both-1")
        == "skipped"
    )
    # The client wrote the doc and its trigger dispatched it: the callable answers from the doc.
    worker.db.document("generations/u-both/images/both-2").set(client_doc(**small))
    assert (
        dispatch.dispatch_created(worker.db, worker.client(), user_id="u-both", media_type="images", file_uid="both-2")
        == "accepted"
    )
    again = dispatch.generate(
        worker.db, worker.client(), uid="u-both", data={"prompt": "A red sports car", "file_uid": "both-2", **small}
    )
    assert again == {
        "success": True,
        "fileUid": "both-2",
        "mediaType": "images",
        "status": "accepted",
        "message": "Generation started",
    }
    assert worker.doc(busy)["status"] == "processing"  # all of it happened while the slot was busy
    free_the_slot(worker, busy)
    for file_uid, by in (("both-1", "callable"), ("both-2", "trigger")):
        doc = worker.wait_status(f"generations/u-both/images/{file_uid}", timeout=120)
        assert (doc["status"], doc["attempts"], doc["dispatch_count"], doc["dispatched_by"]) == (
            "completed",
            1,
            1,
            by,
        )
        assert worker.runsync_calls(file_uid) == 1


def test_the_trigger_leaves_a_doc_awaiting_its_parameters_to_its_request(firestore_client, stub):
    """A doc with only its prompt: the contract's function flow (its runsync brings the parameters) or a client's
    doc before its callable call. Dispatched at once, the trigger's runsync ran the defaults first (a second run
    once the request came, or the request refused as "already finished with other parameters")."""
    import threading
    import time

    grace, awaited = 3.0, 15.0  # awaited: a grace a call 0.5 s late is well within, however loaded the machine
    runpod = stub(ACCEPTED)
    key = "generations/u-grace/images/{}"
    # The callable's call comes within the grace: it dispatches the job, the trigger sends nothing.
    firestore_client.document(key.format("g-callable")).set(client_doc())
    call = threading.Timer(
        0.5,
        lambda: dispatch.generate(
            firestore_client,
            runpod.client(),
            uid="u-grace",
            data={"prompt": "A red sports car", "file_uid": "g-callable", "width": 768},
        ),
    )
    call.start()
    outcome = dispatch.dispatch_created(
        firestore_client, runpod.client(), user_id="u-grace", media_type="images", file_uid="g-callable", grace=awaited
    )
    call.join()
    assert outcome == "skipped"
    assert [body["input"].get("width") for _, body in runpod.requests] == [768]  # the callable's request alone
    # The function's runsync restates the doc at a worker within the grace (the worker's own write, naming the
    # RunPod job that brought it): that worker has the job, and the trigger wakes no second one (the review: it
    # dispatched the doc as it then stood, one more RunPod job).
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    firestore_client.document(key.format("g-runsync")).set(client_doc())
    runsync = parse_runsync_input(
        {"prompt": "A red sports car", "user_id": "u-grace", "file_uid": "g-runsync", "use_cloud_storage": True}
        | {"width": 384}
    )
    threading.Timer(0.5, lambda: JobStore(firestore_client).ensure_queued(runsync, "rp-function-runsync")).start()
    sent = len(runpod.requests)
    assert (
        dispatch.dispatch_created(
            firestore_client,
            runpod.client(),
            user_id="u-grace",
            media_type="images",
            file_uid="g-runsync",
            grace=awaited,
        )
        == "skipped"
    )
    assert len(runpod.requests) == sent
    restated = firestore_client.document(key.format("g-runsync")).get().to_dict()
    assert (restated["width"], restated["runpod_job_id"], restated["status"]) == (384, "rp-function-runsync", "queued")
    assert "dispatch_count" not in restated
    # Nothing comes: dispatched with its defaults once the grace from its creation has passed; a doc that states a
    # parameter is dispatched at once.
    for file_uid, fields, at_least, at_most in (
        ("g-bare", {}, grace - 0.3, grace + 2),
        ("g-metadata", {"task_type": "text2image", "user_id": "u-grace", "file_uid": "g-metadata"}, grace - 0.3, 9),
        ("g-stated", {"width": 512}, 0, grace - 1),  # at once: well before the grace
    ):
        started = time.monotonic()  # before the write: the grace counts from its server time
        firestore_client.document(key.format(file_uid)).set(client_doc(**fields))
        assert (
            dispatch.dispatch_created(
                firestore_client,
                runpod.client(),
                user_id="u-grace",
                media_type="images",
                file_uid=file_uid,
                grace=grace,
            )
            == "accepted"
        )
        assert at_least <= time.monotonic() - started <= at_most, file_uid
        assert runpod.requests[-1][1]["input"]["file_uid"] == file_uid


def test_trigger_fails_a_doc_that_breaks_the_contract_without_waking_a_worker(firestore_client, stub):
    path = "generations/u-inv/images/inv-1"
    firestore_client.document(path).set(client_doc(numFrames=16))  # a video field in images
    runpod = stub(ACCEPTED)
    assert (
        dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-inv", media_type="images", file_uid="inv-1"
        )
        == "invalid"
    )
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["error_type"]) == ("failed", "ValidationError")
    assert doc["error_message"].startswith("Validation failed: num_frames is a video field")
    assert runpod.requests == []
    # Nothing went out: no dispatch recorded (the audit: dispatched_by "trigger" with no dispatch_error).
    assert not DISPATCH_MARKERS & doc.keys(), doc


def test_a_doc_the_callable_restates_while_the_trigger_refuses_it_is_the_callables_job(
    firestore_client, stub, monkeypatch
):
    """The contract's client flow (its doc, then the callable with the same file_uid) with a bad value in the doc:
    the callable restates and dispatches the job between the trigger's read of the doc and its write. The
    trigger's refusal is written in the same compare-and-set as a dispatch would be, so it decides again on the
    restated doc (a review: failed apart from that read, it failed the dispatched job with the old message)."""
    path = "generations/u-race/images/race-1"
    firestore_client.document(path).set(client_doc(width=99999))
    runpod = stub(ACCEPTED)
    replies = []
    read = dispatch.stated_request

    def callable_in_between(key, doc):
        if not replies:
            data = {"prompt": "A red sports car", "width": 512, "file_uid": "race-1"}
            replies.append(dispatch.generate(firestore_client, runpod.client(), uid="u-race", data=data))
        return read(key, doc)

    monkeypatch.setattr(dispatch, "stated_request", callable_in_between)
    outcome = dispatch.dispatch_created(
        firestore_client, runpod.client(), user_id="u-race", media_type="images", file_uid="race-1"
    )
    doc = firestore_client.document(path).get().to_dict()
    assert (outcome, replies[0]["status"], len(runpod.requests)) == ("skipped", "accepted", 1)
    assert (doc["status"], doc["width"], doc["dispatched_by"], doc.get("error")) == ("queued", 512, "callable", False)


def test_trigger_and_schedule_end_a_doc_cancelled_by_its_flag_without_waking_a_worker(firestore_client, stub, bucket):
    """The web app's Cancel on a doc it just wrote (no callable): within the grace no worker may be up to hear
    the flag, and a dispatch would wake a GPU worker for a job nobody wants. The sweep ends so a queued job, and
    a running one whose worker is gone (as a claim would), removing what that worker had uploaded (a review: it
    stayed). Refunded where it never ran."""
    from firegen_core.jobs import JobKey, JobStore
    from firegen_core.results import OWNER_METADATA_KEY, object_name

    for file_uid, count in (("c-gone", 2), ("c-other", 1)):  # c-other: another job's, which stays
        for index in range(count):
            blob = bucket.blob(object_name("u-cx", file_uid, "text2image", index))
            blob.metadata = {OWNER_METADATA_KEY: file_uid}
            blob.upload_from_string(b"\x89PNG", content_type="image/png")

    path = "generations/u-cx/images/{}"
    old = datetime.now(UTC) - timedelta(hours=1)
    stale = {**client_doc(width=256), "created_at": old, "dispatch_count": 1, "dispatched_at": old}
    gone = {**stale, "status": "processing", "attempts": 1, "worker_id": "w-gone", "lease_expires_at": old}
    for name, fields in (("c-trigger", client_doc()), ("c-swept", stale), ("c-gone", gone)):
        firestore_client.document(path.format(name)).set(fields)
        if name != "c-gone":
            JobStore(firestore_client).admit(JobKey("u-cx", "images", name))  # charged: its refund is checked
        firestore_client.document(path.format(name)).update({"cancel_requested": True})
    spent = firestore_client.document("usage/u-cx").get().to_dict()["spent_today"]
    assert spent > 0
    runpod = stub(ACCEPTED)
    outcome = dispatch.dispatch_created(
        firestore_client, runpod.client(), user_id="u-cx", media_type="images", file_uid="c-trigger"
    )
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=2)
    assert (
        outcome,
        sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy, bucket=lambda: bucket),
    ) == (
        "cancelled",
        Counter(cancelled=2),
    )
    assert runpod.requests == []
    assert [blob.name for blob in bucket.list_blobs()] == ["generating/u-cx/image/c-other.png"]
    for name in ("c-trigger", "c-swept", "c-gone"):
        doc = firestore_client.document(path.format(name)).get().to_dict()
        assert (doc["status"], doc["error_type"], doc["error_message"]) == (
            "failed",
            "Cancelled",
            "Cancelled by the user",
        ), name
    usage = firestore_client.document("usage/u-cx").get().to_dict()
    assert (usage["pending"], usage["running"], usage["spent_today"]) == (0, 0, 0)


def test_trigger_sends_num_frames_for_a_video_doc_with_defaults_only(firestore_client, stub):
    firestore_client.document("generations/u-v/videos/v-1").set(client_doc())
    runpod = stub(ACCEPTED)
    assert (
        dispatch.dispatch_created(firestore_client, runpod.client(), user_id="u-v", media_type="videos", file_uid="v-1")
        == "accepted"
    )
    assert runpod.requests[0][1]["input"]["num_frames"] == 16


def test_trigger_ignores_docs_that_are_not_queued_jobs(firestore_client, stub):
    firestore_client.document("generations/u-x/images/done").set({**client_doc(), "status": "completed"})
    # A doc a worker's runsync handler created (someone called RunPod directly): that worker runs it.
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    JobStore(firestore_client).ensure_queued(
        parse_runsync_input({"prompt": "a car", "user_id": "u-x", "file_uid": "direct", "use_cloud_storage": True})
    )
    runpod = stub(ACCEPTED)
    assert (
        dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-x", media_type="images", file_uid="direct"
        )
        == "skipped"
    )
    assert (
        dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-x", media_type="images", file_uid="done"
        )
        == "skipped"
    )
    assert (
        dispatch.dispatch_created(firestore_client, runpod.client(), user_id="u-x", media_type="audio", file_uid="done")
        == "skipped"
    )
    assert runpod.requests == []


# ---------------------------------------------------------------------------------------------- schedule
def logged(caplog, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == message]


def test_a_lost_workers_job_whose_dates_an_admin_wrote_as_text_is_dispatched_again(firestore_client, stub):
    """The clock review: a processing doc whose worker is gone, its `dispatched_at` and `created_at` written by an
    admin as text and a number, raised TypeError comparing them: `redispatch_error` at every sweep, for ever. No
    readable date counts as long ago."""
    old = datetime.now(UTC) - timedelta(hours=1)
    lost = {**client_doc(width=256), **worker_gone(old), "dispatched_at": "2026-12-01T10:00:00Z", "created_at": 5}
    firestore_client.document("generations/u-s/images/text-dates").set(lost)
    runpod = stub(ACCEPTED)
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=2)
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy) == Counter(redispatched=1)
    assert [body["input"]["file_uid"] for _, body in runpod.requests] == ["text-dates"]


def test_a_job_whose_calls_spent_its_dispatches_at_once_is_not_given_up_before_their_periods(firestore_client, stub):
    """The functions review: a client's calls retrying an undelivered dispatch (each answered "queued") spend
    MAX_DISPATCHES in seconds, and the first sweep once the job was stale failed it "after 3 dispatches, 10 minutes
    apart", 10 minutes after it was made rather than 30. It is dispatched again until it has waited MAX_DISPATCHES
    stale periods; then given up as before."""
    now = datetime.now(UTC)
    retried = {"dispatch_count": 2, "dispatched_at": now - timedelta(minutes=11)}
    young = firestore_client.document("generations/u-r/images/retried-young")
    young.set({**client_doc(width=256), "created_at": now - timedelta(minutes=12), **retried})
    old = firestore_client.document("generations/u-r/images/retried-old")
    old.set({**client_doc(width=256), "created_at": now - timedelta(minutes=21), **retried})
    runpod = stub(ACCEPTED)
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=2)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy)
    assert (counts["redispatched"], counts["failed"]) == (1, 1)
    assert (young.get().get("status"), young.get().get("dispatch_count")) == ("queued", 3)
    assert old.get().get("error_message") == (
        "No GPU worker picked up the job after 2 dispatches, 10 minutes apart; please try again"
    )


def test_scheduled_redispatch_is_bounded(firestore_client, stub, caplog):
    caplog.set_level(logging.INFO)
    old = datetime.now(UTC) - timedelta(hours=1)
    base = {**client_doc(width=256), "created_at": old}
    docs = {
        "generations/u-s/images/never": base,  # the trigger never ran: dispatch it
        "generations/u-s/images/once": {**base, "dispatch_count": 1, "dispatched_at": old},
        "generations/u-s/images/given-up": {**base, "dispatch_count": 2, "dispatched_at": old},
        "generations/u-s/images/recent": {**base, "dispatch_count": 1, "dispatched_at": datetime.now(UTC)},
        "generations/u-s/images/fresh": client_doc(),
        "generations/u-s/videos/lost-worker": {**base, **worker_gone(old), "numFrames": 16},
        "generations/u-s/images/done": {**base, "status": "completed"},
        # Another app's `images` and `videos` in the same project, met by the collection-group queries: counted
        # (the operator sees them in the sweep's line), never dispatched nor written.
        "posts/p1/images/old": base,
        "users/u9/videos/lost": {**base, **worker_gone(old)},
    }
    for path, doc in docs.items():
        firestore_client.document(path).set(doc)
    runpod = stub(ACCEPTED)
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=2)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy)
    assert counts == Counter(redispatched=3, failed=1, skipped=1, foreign=2)  # skipped: "recent"
    for path in ("posts/p1/images/old", "users/u9/videos/lost"):
        assert firestore_client.document(path).get().to_dict() == docs[path]
    sent = sorted(body["input"]["file_uid"] for _, body in runpod.requests)
    assert sent == ["lost-worker", "never", "once"]
    # Logged as the README says: each dispatch with its path, outcome, attempts and RunPod's job id; the sweep's
    # counts once.
    said = sorted((r.path, r.outcome, r.attempts, bool(r.runpod_job_id)) for r in logged(caplog, "dispatched"))
    assert said == [
        (f"generations/u-s/{path}", "accepted", 1, True)
        for path in ("images/never", "images/once", "videos/lost-worker")
    ]
    [swept] = logged(caplog, "redispatch_sweep")
    assert swept.counts == {"redispatched": 3, "failed": 1, "skipped": 1, "foreign": 2}
    assert swept.levelno == logging.ERROR  # it gave a job up: no worker took it (an alert on errors sees it)

    def read(name, media="images"):
        return firestore_client.document(f"generations/u-s/{media}/{name}").get().to_dict()

    assert (read("never")["dispatch_count"], read("never")["dispatched_by"]) == (1, "scheduler")
    assert read("once")["dispatch_count"] == 2
    given_up = read("given-up")
    assert (given_up["status"], given_up["error"], given_up["generated"], given_up["error_type"]) == (
        "failed",
        True,
        False,
        "Exception",
    )
    assert given_up["error_message"] == (
        "No GPU worker picked up the job after 2 dispatches, 10 minutes apart; please try again"
    )
    assert read("recent")["dispatch_count"] == 1 and read("fresh").get("dispatch_count") is None
    # A second sweep right away sends nothing: everything was just dispatched or is final.
    assert set(sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy)) == {"skipped", "foreign"}
    assert len(runpod.requests) == 3


def test_a_sweep_reaches_stale_jobs_behind_a_page_of_just_redispatched_ones(firestore_client, stub, monkeypatch):
    """A scale review: a sweep read `scan_limit` oldest queued docs and no more; a re-dispatched job keeps its
    `created_at`, so for the next 10 minutes the same page was all "skipped" and the stale jobs behind it waited
    (behind 10,000 stale jobs of a broken endpoint, the last failed ~50 hours late). It pages past them, up to
    SCAN_PAGES pages."""
    now = datetime.now(UTC)
    old = now - timedelta(hours=2)
    for n in range(12):
        firestore_client.document(f"generations/u-p{n:02d}/images/j").set(
            {
                **client_doc(width=256),
                "created_at": old + timedelta(seconds=n),
                "dispatch_count": 1,
                "dispatched_at": old,
            }
        )
    runpod = stub(ACCEPTED)
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=3, scan_limit=5)

    def sent_by(at: datetime) -> list[str]:
        before = len(runpod.requests)
        counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy, now=at)
        users = sorted(body["input"]["user_id"] for _, body in runpod.requests[before:])
        assert counts["redispatched"] == len(users), counts
        return users

    assert sent_by(now) == [f"u-p{n:02d}" for n in range(5)]
    assert sent_by(now + timedelta(minutes=5)) == [f"u-p{n:02d}" for n in range(5, 10)]
    pages = sweep.SCAN_PAGES
    monkeypatch.setattr(sweep, "SCAN_PAGES", 2)  # the read bound: 10 docs, the first 10 just re-dispatched
    assert sent_by(now + timedelta(minutes=6)) == []
    monkeypatch.setattr(sweep, "SCAN_PAGES", pages)
    assert sent_by(now + timedelta(minutes=6)) == ["u-p10", "u-p11"]


def test_a_sweep_past_its_budget_leaves_the_rest_for_the_next(firestore_client, stub):
    """The scheduled function ends at 300 s and one dispatch can take RunPod's 50 s deadline: a sweep starts no
    dispatch past `sweep_budget`, leaves those jobs untouched and says how many (here each dispatch "takes"
    100 s of the sweep's clock, so two go out with a budget of 150 s). It serves first a job whose worker died
    mid-run, then the oldest queued, a video before newer images (a review: images always went first)."""
    old = datetime.now(UTC) - timedelta(hours=1)
    images = [f"generations/u-b/images/j{n}" for n in range(3)]
    for n, path in enumerate(images):
        firestore_client.document(path).set({**client_doc(), "created_at": old + timedelta(seconds=n)})
    firestore_client.document("generations/u-b/videos/v-oldest").set(
        {**client_doc(numFrames=16), "created_at": old - timedelta(minutes=1)}
    )
    firestore_client.document("generations/u-b/images/lost").set(
        {**client_doc(), "created_at": old + timedelta(minutes=5), **worker_gone(old)}
    )
    runpod = stub(ACCEPTED)
    policy = Policy(sweep_budget=timedelta(seconds=150))
    counts = sweep.redispatch_stale(
        firestore_client, runpod.client(), policy=policy, clock=lambda: 100.0 * len(runpod.requests)
    )
    assert counts == Counter(redispatched=2, deferred=3)
    assert [body["input"]["file_uid"] for _, body in runpod.requests] == ["lost", "v-oldest"]
    left = [firestore_client.document(path).get().to_dict() for path in images]
    assert [(doc["status"], doc.get("dispatch_count")) for doc in left] == [("queued", None)] * 3
    # The next sweep, with its own budget, sends them.
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy) == Counter(
        redispatched=3, skipped=2
    )


@pytest.fixture(params=["sent again", "given up"])
def lost_answer(monkeypatch, request):
    """The first commit that marks a dispatch lands, and its answer is lost: the client library sends it again,
    which the doc's new update time refuses (FailedPrecondition); or its retries ran out meanwhile (RetryError, as
    the client raises it past its bound: Firestore slow). A stand-in at the batch's commit: the emulator loses no
    answer on demand."""
    from google.api_core.exceptions import FailedPrecondition, RetryError
    from google.cloud.firestore_v1.batch import WriteBatch

    real = WriteBatch.commit
    lost: list[str] = []

    def commit(self, *args, **kwargs):
        marking = any("dispatched_by" in str(write) for write in self._write_pbs)  # emptied by the commit
        result = real(self, *args, **kwargs)
        if marking and not lost:
            lost.append("lost")
            if request.param == "given up":
                raise RetryError("Timeout of 15.0s exceeded", None)
            raise FailedPrecondition("the stored version does not match the required base version")
        return result

    monkeypatch.setattr(WriteBatch, "commit", commit)
    return lost


@pytest.mark.parametrize("dispatcher", ["callable", "trigger", "sweep"])
def test_a_marking_whose_answer_was_lost_is_known_for_its_own_and_goes_out(
    firestore_client, stub, lost_answer, dispatcher
):
    """The review: read again, the doc showed the job marked dispatched, by another as it seemed; nothing was sent
    (the callable even said "Generation started"), and the job waited for the sweep. Each dispatcher knows its
    own marking by its token, and sends the job once."""
    runpod = stub(ACCEPTED)
    path = f"generations/u-lost/images/{dispatcher}"
    if dispatcher == "callable":
        reply = dispatch.generate(
            firestore_client, runpod.client(), uid="u-lost", data={"prompt": "a car", "file_uid": dispatcher}
        )
        assert (reply["status"], reply["message"]) == ("accepted", "Generation started")
    elif dispatcher == "trigger":
        firestore_client.document(path).set(client_doc(width=512))
        outcome = dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-lost", media_type="images", file_uid=dispatcher
        )
        assert outcome == "accepted"
    else:
        firestore_client.document(path).set(
            {**client_doc(width=512), "created_at": datetime.now(UTC) - timedelta(hours=1)}
        )
        assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=Policy()) == Counter(redispatched=1)
    assert lost_answer == ["lost"]
    assert [body["input"]["file_uid"] for _, body in runpod.requests] == [dispatcher]
    doc = firestore_client.document(path).get().to_dict()
    assert doc["dispatch_count"] == 1 and doc["runpod_job_id"]


def test_one_jobs_unexpected_error_leaves_the_sweep_to_the_others(firestore_client, stub, caplog, monkeypatch):
    """The review: nothing caught an error of one job's dispatch (Firestore contended past its bound, away a
    moment): the rest of the sweep was abandoned, its counts never logged. Here the first job's transition raises
    (a stand-in: no emulator fault hits one doc alone); the others go, and the sweep says it."""
    caplog.set_level(logging.INFO)
    old = datetime.now(UTC) - timedelta(hours=1)
    for n in range(3):
        firestore_client.document(f"generations/u-e/images/j{n}").set(
            {**client_doc(), "created_at": old + timedelta(seconds=n)}
        )
    real = sweep._redispatch_one

    def first_fails(store, runpod, key, policy, **kw):
        if key.file_uid == "j0":
            raise RuntimeError("409 Too much contention on these documents")
        return real(store, runpod, key, policy, **kw)

    monkeypatch.setattr(sweep, "_redispatch_one", first_fails)
    runpod = stub(ACCEPTED)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=Policy())
    assert counts == Counter(redispatched=2, error=1)
    assert sorted(body["input"]["file_uid"] for _, body in runpod.requests) == ["j1", "j2"]
    [error] = logged(caplog, "redispatch_error")
    assert error.path == "generations/u-e/images/j0" and "contention" in error.error
    [swept] = logged(caplog, "redispatch_sweep")
    assert swept.counts == {"redispatched": 2, "error": 1} and swept.levelno == logging.INFO  # none given up


def test_a_sweep_while_runpod_is_down_records_why(firestore_client):
    old = datetime.now(UTC) - timedelta(hours=1)
    firestore_client.document("generations/u-d/images/j").set({**client_doc(), "created_at": old})
    counts = sweep.redispatch_stale(firestore_client, nobody_listening(), policy=Policy())
    assert counts == Counter(undelivered=1)
    doc = firestore_client.document("generations/u-d/images/j").get().to_dict()
    assert doc["status"] == "queued" and doc["dispatch_count"] == 1 and doc["dispatch_error"]
    assert_key_nowhere(doc)


# ---------------------------------------------------------------------------------------------- packaging
def test_the_functions_import_the_repository_core():
    import firegen_core

    assert Path(dispatch.__file__).parent == FUNCTIONS
    assert Path(dispatch.lifecycle.__file__).parent == Path(firegen_core.__file__).parent == ROOT / "firegen_core"


def test_the_shipped_core_is_the_whole_package_world_readable(tmp_path):
    dest = tmp_path / "functions"
    dest.mkdir()
    (dest / "listener").mkdir()  # a copy under the worker's own name, from an older layout
    assert vendor_shared.stale(ROOT, dest)
    assert vendor_shared.vendor(ROOT, dest) is True
    assert vendor_shared.stale(ROOT, dest) == [] and not (dest / "listener").exists()
    copied = sorted(p.relative_to(dest / "firegen_core") for p in (dest / "firegen_core").rglob("*.py"))
    assert copied == sorted(p.relative_to(ROOT / "firegen_core") for p in (ROOT / "firegen_core").rglob("*.py"))
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (dest / "firegen_core").rglob("*.py"))
    assert vendor_shared.vendor(ROOT, dest) is False

    # Drift of any kind is seen, and the next run repairs it.
    (dest / "firegen_core" / "jobs.py").write_text("# edited by hand\n")
    (dest / "firegen_core" / "extra.py").write_text("")
    (dest / "firegen_core" / "errors.py").chmod(0o600)
    assert vendor_shared.stale(ROOT, dest) == [
        "firegen_core/errors.py (not world-readable)",
        "firegen_core/jobs.py",
        "firegen_core/extra.py (extra)",
    ]
    vendor_shared.vendor(ROOT, dest)
    assert vendor_shared.stale(ROOT, dest) == []


def _deploy_folder(tmp_path: Path) -> Path:
    """functions/ as `firebase deploy` uploads it: its predeploy hook run, then the source minus `ignore`."""
    import fnmatch

    config = json.loads((ROOT / "firebase.json").read_text())["functions"][0]
    for hook in config["predeploy"]:
        subprocess.run(hook, shell=True, check=True, env={**os.environ, "PROJECT_DIR": str(ROOT)}, cwd=ROOT)
    source, out = ROOT / config["source"], tmp_path / "deploy"

    def ignored(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in config["ignore"])}

    shutil.copytree(source, out, ignore=ignored)
    return out


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_the_functions_deploy_the_versions_the_tests_ran():
    """Cloud Build installs functions/requirements.txt at each deploy: exact pins, equal to functions/venv's, of
    every package there (a review: 7 of 56 were pinned, Cloud Build took the newest of the others)."""
    pins = dict(
        line.split("==")
        for line in (FUNCTIONS / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    script = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    done = subprocess.run([str(FUNCTIONS_PYTHON), "-c", script, *pins], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == pins
    script = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    # -I: the repository's own firegen_worker.egg-info (in the working directory) is not the venv's.
    done = subprocess.run([str(FUNCTIONS_PYTHON), "-I", "-c", script], capture_output=True, text=True, check=True)

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    installed = {normal(name) for name in done.stdout.split()} - {"pip", "setuptools", "wheel"}
    assert installed == {normal(name) for name in pins}
    assert "google-api-core" in pins  # firegen_core imports it directly
    assert "urllib3" in pins  # runpod_client reads its tracebacks' frames (`_sent`)


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_the_manifest_is_served_again_by_the_same_process(tmp_path):
    """The Functions framework's discovery server runs main.py afresh for each request for the manifest: the
    emulator, under load, sent its request again, the second run raised "Duplicate Parameter Error" (a param
    declared twice), and the emulator ran with no functions (audit: every callable answered 404)."""
    deploy = _deploy_folder(tmp_path)
    script = (
        "from firebase_functions.private import serving\n"
        "first, second = serving.get_functions(), serving.get_functions()\n"
        "print(sorted(first) == sorted(second), sorted(second))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FUNCTIONS_EMULATOR="true", GCLOUD_PROJECT="demo-firegen")
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", script], cwd=deploy, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True" and "'generateWithRunPod'" in result.stdout


def test_the_deploys_prompt_takes_each_int_param_within_its_range_alone():
    """A value typed at the deploy's prompt comes after the check at load: the Firebase CLI's prompt retries what its
    param's `validationRegex` refuses (its JavaScript RegExp, run here in Node on every value near the bounds)."""
    from firegen_core.function_params import INT_PARAMS, range_pattern

    cases = {}
    for name, (low, high) in INT_PARAMS.items():
        near = {*range(0, 120), high - 1, high, high + 1, high * 10, low - 1, 10 ** len(str(high)) - 1, 1440, 999}
        values = [str(n) for n in sorted(near)] + ["", "05", "1.5", "+3", " 4", "1e3", "abc"]
        cases[name] = [
            range_pattern(low, high),
            values,
            [v.isdigit() and str(int(v)) == v and low <= int(v) <= high for v in values],
        ]
    script = "const cases = JSON.parse(process.argv[1]); for (const [name, [p, values, want]] of Object.entries(cases)) { const r = new RegExp(p); values.forEach((v, i) => { if (r.test(v) !== want[i]) { console.log(name, JSON.stringify(v)); process.exitCode = 1; } }); }"
    result = subprocess.run(["node", "-e", script, json.dumps(cases)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _whole(name: str, value: str, low: int, high: int) -> tuple[str, str, str]:
    return name, value, f"{name} must be a whole number from {low} to {high} (got {value!r})"


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
@pytest.mark.parametrize(
    "name,value,said",
    [
        ("RETENTION_DAYS", "thirty", "RETENTION_DAYS must be a number of days from 0 to 36500 (got 'thirty')"),
        _whole("USER_MAX_PENDING", "abc", 1, 1000000),
        _whole("USER_MAX_RUNNING", "99999999999999999999", 1, 1000000),
        _whole("MAX_DISPATCHES", "0", 1, 100),
        _whole("RUNPOD_TIMEOUT_SECONDS", "0", 1, 50),
        _whole("REDISPATCH_AFTER_MINUTES", "-10", 1, 1440),
        _whole("RUNPOD_ATTEMPTS", "0", 1, 10),
        _whole("USER_DAILY_BUDGET", "30.5", 1, 1000000000),
        _whole("PLACEHOLDER_GRACE_SECONDS", "2.5", 0, 60),  # a worker's value (it takes fractions)
        _whole("PLACEHOLDER_GRACE_SECONDS", "90", 0, 60),
        # As the workers refuse it (before: deleteGeneration deleted the job's files in no bucket, `delete_elsewhere`).
        (
            "STORAGE_BUCKET",
            "gs://my-app.firebasestorage.app",
            "STORAGE_BUCKET must be a bucket's name alone, without gs:// or a path (e.g. my-app.firebasestorage.app) "
            "(got 'gs://my-app.firebasestorage.app')",
        ),
        (
            "STORAGE_BUCKET",
            "ab",
            "STORAGE_BUCKET must be a bucket's name: 3 to 63 characters, or up to 222 with dots and at most 63 between "
            "two dots (got 'ab')",
        ),
        # A long value may be a secret pasted into the wrong variable: never quoted back.
        (
            "USER_MAX_RUNNING",
            "x" * 100,
            "USER_MAX_RUNNING must be a whole number from 1 to 1000000 (got 100 characters, not shown)",
        ),
    ],
)
def test_a_bad_setting_stops_the_functions_from_loading_naming_it(tmp_path, name, value, said):
    """Before, a bad value showed only at the first call that read it (the Functions SDK reads an int param with
    int() at each use, and the Firebase CLI checks no .env value): every callable answered INTERNAL, every trigger
    crashed, or worse, it was taken (MAX_DISPATCHES=0 failed every queued job at the first sweep). Checked when the
    functions load: the deploy's discovery fails, naming it."""
    deploy = _deploy_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"FUNCTIONS_EMULATOR": "true", "GCLOUD_PROJECT": "demo-firegen", name: value})
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", "import main"], cwd=deploy, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"ValueError: {said}" in result.stderr


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_two_requests_logging_at_once_never_share_a_line(tmp_path):
    """A review: the functions' logger and the root logger (the SDK's and the libraries' records) had a handler
    each, and the SDK's `print` writes an entry and its newline apart: two requests (concurrency=4) logging at once
    shared lines, which Cloud Logging keeps as text with no severity (292 of 6,000 lines, unbuffered)."""
    deploy = _deploy_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"FUNCTIONS_EMULATOR": "true", "GCLOUD_PROJECT": "demo-firegen", "PYTHONUNBUFFERED": "1"})
    script = (
        "import logging, threading, main\n"
        "def say(logger, n):\n"
        "    for i in range(n): logger.warning('entry_%d', i)\n"
        "threads = [threading.Thread(target=say, args=(logging.getLogger(name), 3000)) for name in ('functions.x', 'y')]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
    )
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", script], cwd=deploy, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "entry_" in line or not line.strip()]
    entries = [json_entry(line) for line in lines]
    assert len(entries) == 6000 and all(entry and entry["severity"] == "WARNING" for entry in entries)


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_the_deploy_folder_imports_in_the_functions_venv(tmp_path):
    """main.py imports from the deploy folder alone, with only functions/requirements.txt installed."""
    from firegen_core.function_params import range_pattern

    deploy = _deploy_folder(tmp_path)
    assert not (deploy / "venv").exists() and (deploy / "firegen_core" / "jobs.py").is_file()
    unreadable = [str(p) for p in deploy.rglob("*") if p.is_file() and p.stat().st_mode & 0o444 != 0o444]
    assert unreadable == []
    script = (
        "import json, sys, main\n"
        "out = {}\n"
        "for name in ('generateWithRunPod', 'dispatchQueuedJob', 'redispatchStaleJobs'):\n"
        "    e = getattr(main, name).__firebase_endpoint__\n"
        "    out[name] = {'callable': e.callableTrigger is not None, 'event': e.eventTrigger,\n"
        "                 'schedule': (e.scheduleTrigger or {}).get('schedule'),\n"
        "                 'secrets': e.secretEnvironmentVariables,\n"
        "                 'cpu': str(e.cpu), 'concurrency': str(e.concurrency), 'max_instances': str(e.maxInstances)}\n"
        "import firegen_core.contract, firegen_core.jobs\n"
        "out['core'] = [firegen_core.contract.__file__, firegen_core.jobs.__file__]\n"
        "out['params'] = [main.RUNPOD_ATTEMPTS.value, main.RUNPOD_TIMEOUT_SECONDS.value,\n"
        "                 main.REDISPATCH_AFTER_MINUTES.value, main._policy().max_dispatches,\n"
        "                 main._limits().max_pending, main._grace()]\n"
        "from firebase_functions.private import manifest\n"  # what the deploy's prompt is given
        "out['prompt'] = manifest._param_to_spec(main.RUNPOD_ATTEMPTS)['input']\n"
        "import contextlib, io, logging\n"
        "buffer = io.StringIO()\n"
        "with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):\n"
        "    logging.getLogger('functions.dispatch').warning('dispatch_not_recorded', extra={'path': 'generations/u/images/f'})\n"
        "out['log'] = buffer.getvalue()\n"
        "from firebase_functions.private import util\n"  # the SDK's own records, through the root logger
        "from werkzeug.test import EnvironBuilder\n"
        "request = EnvironBuilder(method='POST', json={'data': {}}, headers={'Authorization': 'Bearer ' + sys.argv[1]})\n"
        "buffer = io.StringIO()\n"
        "with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):\n"
        "    util.on_call_check_tokens(request.get_request())\n"
        "    import flask\n"
        "    from firebase_functions import https_fn\n"  # a GET, no callable request: the SDK answers 400
        "    with flask.Flask('probe').test_request_context(method='GET'):\n"
        "        https_fn._on_call_handler(lambda r: None, flask.request, False)\n"
        "out['sdk_log'] = buffer.getvalue()\n"
        "from google.api_core import client_logging\n"  # what a Google client runs first: `google` stops propagating
        "client_logging.initialize_logging()\n"
        "buffer = io.StringIO()\n"
        "with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):\n"
        "    logging.getLogger('google.api_core.bidi').warning('Background thread did not exit.')\n"
        "    import warnings\n"
        "    warnings.warn('Detected filter using positional arguments.', UserWarning)\n"
        "    logging.getLogger('google.auth').warning('refresh answered %s', '{\"access_token\": \"ya29.fn\"}',"
        " extra={'urls': ['https://x/o?alt=media&token=fnt0k3n']})\n"
        "out['google_log'] = buffer.getvalue()\n"
        "for worker_only in ('generation', 'listener', 'torch'):\n"
        "    try:\n"
        "        __import__(worker_only); out[worker_only] = True\n"
        "    except ImportError:\n"
        "        out[worker_only] = False\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FUNCTIONS_EMULATOR="true", GCLOUD_PROJECT="demo-firegen", RUNPOD_ATTEMPTS="5", MAX_DISPATCHES="4")
    env.update(PLACEHOLDER_GRACE_SECONDS="7", USER_MAX_PENDING=" ")  # blank: unset, as on the workers
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", script, BAD_TOKEN],
        cwd=deploy,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["generateWithRunPod"]["callable"] is True
    assert out["dispatchQueuedJob"]["event"]["eventType"] == "google.cloud.firestore.document.v1.created"
    assert out["dispatchQueuedJob"]["event"]["eventFilterPathPatterns"] == {
        "document": "generations/{uid}/{media}/{fileUid}"
    }
    assert out["redispatchStaleJobs"]["schedule"] == "every 5 minutes"
    for name in ("generateWithRunPod", "dispatchQueuedJob", "redispatchStaleJobs"):
        assert out[name]["secrets"] == [{"key": "RUNPOD_API_KEY"}]
        # A whole CPU and 4 calls at once (the runtime server's threads per CPU): the SDK's default "gcf_gen1"
        # served one at a time, and 10 instances were 10 calls waiting on RunPod (deploy audit).
        assert (out[name]["cpu"], out[name]["concurrency"], out[name]["max_instances"]) == ("1", "4", "10")
    assert all(path.startswith(str(deploy)) for path in out["core"])
    assert (out["generation"], out["listener"], out["torch"]) == (False, False, False)
    # Tuning values are typed params: set ones are read as ints, unset (or blank) ones take their defaults.
    assert out["params"] == [5, 20, 10, 4, 20, 7.0]
    assert out["prompt"] == {
        "text": {
            "example": "3",
            "validationRegex": range_pattern(1, 10),
            "validationErrorMessage": "RUNPOD_ATTEMPTS must be a whole number from 1 to 10",
        }
    }
    # The functions' standard-logging records are written by firebase_functions.logger: Cloud Logging's fields.
    entry = json.loads(out["log"].strip().splitlines()[-1])
    assert entry["severity"] == "WARNING"
    assert (entry["message"], entry["path"]) == ("dispatch_not_recorded", "generations/u/images/f")  # fields
    # So are the SDK's, which it writes through the root logger (a token that is no JWT: refused, and why logged),
    # each once, without the token google-auth's error quotes.
    sdk = [json.loads(line) for line in out["sdk_log"].strip().splitlines()]
    # A caller's bad token is the caller's doing, answered 401: WARNING (an alert on ERROR is for ours to act on).
    assert [(e["severity"], e["logger"]) for e in sdk] == [("WARNING", "root")] * 4, sdk
    assert sdk[3]["message"] == "Invalid request, unable to process."  # a caller's mistake too (after the SDK's own)
    assert (
        sdk[0]["message"]
        == "Error validating token: (the rest is withheld: it may quote the caller's token or request)"
    )
    assert sdk[1]["message"].startswith("Callable request verification failed: ") and BAD_TOKEN not in out["sdk_log"]
    # Google's client libraries' records too, though google-api-core turns their logger's propagation off (they
    # came out as plain text from Python's last resort).
    google = [json.loads(line) for line in out["google_log"].strip().splitlines()]
    assert [(e["severity"], e.get("logger"), e["message"]) for e in google] == [
        ("WARNING", "google.api_core.bidi", "Background thread did not exit."),
        ("WARNING", "py.warnings", "python_warning"),  # a Python warning too (it was plain text on stderr)
        ("WARNING", "google.auth", 'refresh answered {"access_token": "<redacted>"}'),
    ], google
    assert google[2]["urls"] == ["https://x/o?alt=media&token=<redacted>"]  # the worker's last guard, here too
    assert (google[1]["category"], google[1]["said"]) == ("UserWarning", "Detected filter using positional arguments.")


_APP_CHECK_PROBE = """
import json, main
from flask import Flask, request
out = {"flag": main.enforce_app_check()}
calls = [("generateWithRunPod", {"prompt": "a car"}), ("cancelGeneration", {"fileUid": "f", "mediaType": "images"})]
for name, data in calls:
    with Flask("probe").test_request_context("/", method="POST", json={"data": data}):
        reply = getattr(main, name)(request)
        out[name] = [reply.status_code, reply.get_json()]
print(json.dumps(out))
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_app_check_is_enforced_when_deployed_and_off_under_the_emulators(tmp_path):
    """The callable, through the SDK's own request handling, without an App Check token (nor an ID token):
    enforced, the SDK refuses it before our code runs; not enforced, our code answers (sign in first)."""
    deploy = _deploy_folder(tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FUNCTIONS_EMULATOR")}
    base.update(
        GCLOUD_PROJECT="demo-firegen",
        FIRESTORE_EMULATOR_HOST="127.0.0.1:1",  # never reached: the call stops at the tokens
        RUNPOD_ENDPOINT_ID="probe",
        RUNPOD_API_KEY="probe-key",
    )
    refused = {"error": {"message": "Unauthenticated", "status": "UNAUTHENTICATED"}}
    ours = {"error": {"message": "Sign in to generate", "status": "UNAUTHENTICATED"}}
    ours_cancel = {"error": {"message": "Sign in to cancel a generation", "status": "UNAUTHENTICATED"}}
    for env, flag, body in [
        ({}, True, refused),  # deployed: on by default
        ({"FUNCTIONS_EMULATOR": "true"}, False, ours),  # emulators: off by default
        ({"FUNCTIONS_EMULATOR": "true", "ENFORCE_APP_CHECK": "on"}, True, refused),
        ({"ENFORCE_APP_CHECK": "false"}, False, ours),
    ]:
        result = subprocess.run(
            [str(FUNCTIONS_PYTHON), "-c", _APP_CHECK_PROBE],
            cwd=deploy,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["flag"] == flag, env
        assert out["generateWithRunPod"] == [401, body], env
        assert out["cancelGeneration"] == [401, refused if flag else ours_cancel], env


def _probe(tmp_path: Path, script: str, *args: str) -> Any:
    """What `script` prints last (JSON), run by the functions' Python in the deploy folder, under the emulators'
    settings: Firestore at a closed port (nothing reaches it), the Auth emulator's unsigned tokens taken."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FUNCTIONS_EMULATOR="true", GCLOUD_PROJECT="demo-firegen", FIRESTORE_EMULATOR_HOST="127.0.0.1:1")
    env.update(FIREBASE_AUTH_EMULATOR_HOST="127.0.0.1:1", RUNPOD_ENDPOINT_ID="probe", RUNPOD_API_KEY="probe-key")
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", script, *args],
        cwd=_deploy_folder(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


ORIGIN = "https://app.example"  # a browser's call: the answer must name it, or the page sees a CORS error
_BODY_PROBE = """
import contextlib, io, json, sys, main
from flask import Flask, request
JSON = "application/json"
bodies = [(b"not json", JSON), (b"5", JSON), (b"true", JSON), (b"[]", JSON), (b"\\xff\\xfe{", JSON),
          (b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON), (b'{"data": {"seed": ' + b"9" * 5000 + b"}}", JSON),
          (b"{}", JSON), (b'{"dat": {}}', JSON), (b'{"data": {}, "x": 1}', JSON),
          (b'{"data": {}}', "text/plain"), (b'{"data": {}}', None),
          (b'{"data": {"prompt": "a car"}}', JSON), (b'{"data": {}}', "Application/JSON; charset=utf-8")]
calls = [("POST", body, content_type) for body, content_type in bodies] + [("GET", b"", None), ("OPTIONS", b"", None)]
# Nested just short of the recursion limit of the guard's parse, past the SDK's, a few frames deeper.
calls += [("POST", b'{"data": {"prompt": "p", "seed": ' + b"[" * n + b"]" * n + b"}}", JSON) for n in (970, 976, 982)]
out = []
for method, body, content_type in calls:
    for name in ("generateWithRunPod", "cancelGeneration"):
        log = io.StringIO()
        headers = {"Origin": sys.argv[1], **({"Content-Type": content_type} if content_type else {})}
        if method == "OPTIONS":  # a browser's CORS preflight
            headers.update({"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            with Flask("probe").test_request_context("/", method=method, data=body, headers=headers):
                reply = getattr(main, name)(request)
        entries = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
        out.append([name, reply.status_code, reply.get_json(), reply.headers.get("Access-Control-Allow-Origin"),
                    [(e["severity"], e["message"], e.get("error")) for e in entries]])
print(json.dumps(out))
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_a_callable_body_that_is_no_callable_request_is_refused_saying_what_is_wrong(tmp_path):
    """Through the SDK's own request handling: a body that is not JSON, JSON that is no object, or JSON Python's
    parser refuses (5,000 digits, 5,000 deep) was HTTP 500 INTERNAL with an ERROR "Unhandled error" (the SDK
    parses the body before our code runs); an object without `data` or with more, or a body not sent as JSON, was
    "Bad Request" alone. Now 400 INVALID_ARGUMENT saying what is wrong, a WARNING, and the CORS header a browser
    needs to read it. A callable request is answered as before, whatever its charset."""
    replies = _probe(tmp_path, _BODY_PROBE, ORIGIN)
    not_a_call = 'Bad Request: the body must be a JSON object {"data": ...} and nothing else'
    not_json = "Bad Request: send the body as JSON (Content-Type: application/json)"
    for (name, status, body, origin, entries), message in zip(replies[:24], [not_a_call] * 20 + [not_json] * 4):
        assert (status, body, origin) == (400, {"error": {"status": "INVALID_ARGUMENT", "message": message}}, ORIGIN)
        assert entries == [["WARNING", "callable_body_unreadable", message]], (name, entries)
    signed_out = {"generateWithRunPod": "Sign in to generate", "cancelGeneration": "Sign in to cancel a generation"}
    for name, status, body, origin, _ in replies[24:28]:
        assert (status, body["error"]["message"], origin) == (401, signed_out[name], ORIGIN)
    # A GET is the SDK's to refuse, as before (the emulator probes each function so); a preflight is answered.
    for _, status, body, origin, entries in replies[28:30]:
        assert (status, body, origin) == (
            400,
            {"error": {"status": "INVALID_ARGUMENT", "message": "Bad Request"}},
            ORIGIN,
        )
        assert {severity for severity, *_ in entries} == {"WARNING"}
    assert [(status, origin) for _, status, _, origin, _ in replies[30:32]] == [(200, ORIGIN)] * 2
    # The fuzz audit: these passed the guard, and the SDK's own parse raised RecursionError: HTTP 500 INTERNAL.
    too_deep = "Bad Request: the body nests arrays or objects more than 64 deep"
    for _, status, body, origin, _ in replies[32:]:
        assert (status, body, origin) == (400, {"error": {"status": "INVALID_ARGUMENT", "message": too_deep}}, ORIGIN)
    assert len(replies) == 38


_REFUSAL_PROBE = """
import base64, contextlib, io, json, sys, main
from flask import Flask, request
def b64(obj): return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
claims = {"sub": "u1", "user_id": "u1", "aud": "demo-firegen", "iss": "https://securetoken.google.com/demo-firegen",
          "iat": 1, "exp": 9999999999, "auth_time": 1}
token = b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims) + "."  # the Auth emulator's kind: unsigned
log = io.StringIO()
data = {"prompt": "a car", "Bearer " + sys.argv[1]: 1}
with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    with Flask("probe").test_request_context("/", method="POST", json={"data": data},
                                             headers={"Authorization": "Bearer " + token}):
        reply = main.generateWithRunPod(request)
print(json.dumps([reply.status_code, reply.get_json(), log.getvalue()]))
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_a_callables_outcome_entry_passes_the_redaction_guard_and_a_nameless_refusal_reads_nothing(tmp_path):
    """The callables' outcome entries were written by firebase_functions.logger directly, past the guard every
    other entry passes: a refusal quoting the caller's text (an unknown field's name) wrote a token as sent. A
    refused call that names no file_uid looked Firestore up for a doc under the id the callable made up (none can
    be there): with Firestore away, a `refusal_not_recorded` WARNING for nothing."""
    secret = "s3cr3t-t0ken-9f1b2c"
    status, body, log = _probe(tmp_path, _REFUSAL_PROBE, secret)
    assert (status, body["error"]["message"]) == (400, f"Validation failed: unknown field 'Bearer {secret}'")
    entries = [json.loads(line) for line in log.splitlines()]
    assert [(e["severity"], e["logger"], e["message"], e["error"]) for e in entries] == [
        ("INFO", "functions", "generateWithRunPod", "Validation failed: unknown field 'Bearer <redacted>'")
    ], entries
    assert secret not in log


def test_the_indexes_cover_the_queries():
    config = json.loads((ROOT / "firestore.indexes.json").read_text())
    composite = {
        (i["collectionGroup"], i["queryScope"], tuple((f["fieldPath"], f["order"]) for f in i["fields"]))
        for i in config["indexes"]
    }
    for media in ("images", "videos"):
        for scope, fields in [
            ("COLLECTION_GROUP", (("status", "ASCENDING"), ("lease_expires_at", "ASCENDING"))),  # sweeps
            ("COLLECTION_GROUP", (("status", "ASCENDING"), ("created_at", "ASCENDING"))),  # re-dispatch
            ("COLLECTION", (("status", "ASCENDING"), ("created_at", "DESCENDING"))),  # active generations
            ("COLLECTION", (("status", "ASCENDING"), ("created_at", "ASCENDING"))),  # a user's oldest queued
            ("COLLECTION", (("status", "ASCENDING"), ("modified", "ASCENDING"))),  # stuck jobs
            ("COLLECTION_GROUP", (("error", "ASCENDING"), ("failed_at", "ASCENDING"))),  # failure rate
            # A user's jobs recounted for their limits (`JobStore._counted`: an equality and an `in`), which index
            # merging would likely serve; stated, so that it never depends on it.
            ("COLLECTION", (("quota_admitted", "ASCENDING"), ("status", "ASCENDING"))),
        ]:
            assert (media, scope, fields) in composite
        status = [o for o in config["fieldOverrides"] if (o["collectionGroup"], o["fieldPath"]) == (media, "status")]
        assert {"order": "ASCENDING", "queryScope": "COLLECTION_GROUP"} in status[0]["indexes"]  # queued listener
        assert {"order": "ASCENDING", "queryScope": "COLLECTION"} in status[0]["indexes"]  # defaults kept
        # README "Retention": the TTL policy lives here too, or every `firebase deploy` offers to delete it.
        ttl = [o for o in config["fieldOverrides"] if (o["collectionGroup"], o["fieldPath"]) == (media, "expire_at")]
        assert ttl == [{"collectionGroup": media, "fieldPath": "expire_at", "ttl": True, "indexes": []}]
    # The liveness docs of workers that never stopped cleanly (firegen_core.workers.EXPIRE_DAYS), and the usage
    # docs of users with nothing pending (quota.usage_expiry), and deleted jobs' tombstones (dispatches.tombstone).
    for group in ("workers", "usage", "deleted_jobs"):
        ttl = [o for o in config["fieldOverrides"] if (o["collectionGroup"], o["fieldPath"]) == (group, "expire_at")]
        assert ttl == [{"collectionGroup": group, "fieldPath": "expire_at", "ttl": True, "indexes": []}]


# ---------------------------------------------------------------------------------------------- Firebase CLI
CLI_KEY = "cli-secret-key-7b1d"
BAD_TOKEN = "not-a-jwt-4f2a9c"  # must never show up in a log line


def json_entry(line: str) -> dict | None:
    """The JSON entry a function wrote on this line of the CLI's output (after the CLI's own prefix), or None."""
    start = line.find("{")
    try:
        entry = json.loads(line[start:]) if start >= 0 else None
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


@pytest.mark.skipif(
    firebase_cli.missing() is not None,
    reason=f"Firebase CLI emulators: {firebase_cli.missing()} (run `python3 scripts/setup_firebase_cli.py`)",
)
def test_through_the_firebase_cli_emulators(emulator_logs, tmp_path, stub):
    """The deployed shape, under the Firebase CLI's Auth, Functions and Firestore emulators: a real ID token
    reaches the callable, the secret and the params reach RunPod's request, rules guard the client's write,
    and the creation trigger dispatches a client's doc (and skips the callable's)."""
    runpod = stub(ACCEPTED)
    project = emu.unique_id("demo-cli")
    cli = FirebaseCli(
        emulator_logs,
        tmp_path / "project",
        project,
        runpod.url,
        api_key=CLI_KEY,
        function_env={"RUNPOD_ENDPOINT_ID": "local-test", "RUNPOD_ATTEMPTS": "1"},
    )
    cli.start()
    try:
        uid, token = cli.sign_up("ada@example.com")
        other_uid, _ = cli.sign_up("bob@example.com")
        reply = cli.call("generateWithRunPod", {"prompt": "a car", "file_uid": "cli-1", "numFrames": 16}, token)
        assert reply == {
            "result": {
                "success": True,
                "fileUid": "cli-1",
                "mediaType": "videos",
                "status": "accepted",
                "message": "Generation started",
            }
        }
        auth, body = runpod.requests[0]
        assert auth == f"Bearer {CLI_KEY}"
        assert body == {
            "input": {
                "prompt": "a car",
                "user_id": uid,
                "file_uid": "cli-1",
                "use_cloud_storage": True,
                "num_frames": 16,
            }
        }
        assert cli.call("generateWithRunPod", {"prompt": "a car"}) == {
            "error": {"message": "Sign in to generate", "status": "UNAUTHENTICATED"}
        }
        # A token that is no JWT: the SDK refuses it before our code runs, and logs why through the root logger.
        # Those records are JSON entries with their severity too (before: "WARNING:root:..." plain text), and
        # the token, which google-auth's error quotes, is in none of them.
        assert cli.call("generateWithRunPod", {"prompt": "a car"}, BAD_TOKEN) == {
            "error": {"message": "Unauthenticated", "status": "UNAUTHENTICATED"}
        }

        def sdk_entries() -> list[tuple[str, str]]:
            entries = (json_entry(line) for line in cli.log_path.read_text().splitlines())
            return [
                (entry["severity"], entry["message"].split(": ")[0])
                for entry in entries
                if entry and entry.get("logger") == "root" and "token" in entry.get("message", "")
            ]

        expected = [("WARNING", "Error validating token"), ("WARNING", "Callable request verification failed")]
        assert emu.wait_until(lambda: sdk_entries() == expected, 30, 0.1), (sdk_entries(), cli.log_tail())
        assert "Error validating token: (the rest is withheld" in cli.log_path.read_text()
        logged = cli.log_path.read_text()
        assert BAD_TOKEN not in logged and "WARNING:root:" not in logged and "ERROR:root:" not in logged
        assert (
            cli.call("generateWithRunPod", {"prompt": "a car", "user_id": other_uid}, token)["error"]["status"]
            == "PERMISSION_DENIED"
        )
        assert cli.call("generateWithRunPod", {"prompt": "a car", "width": 9}, token) == {
            "error": {"message": "width must be between 256 and 1024", "status": "INVALID_ARGUMENT"}
        }
        assert len(runpod.requests) == 1
        # An Android app's Long, as its SDK puts it on the wire, through the real Functions SDK.
        long_seed = {"prompt": "a car", "file_uid": "cli-long", "seed": {"@type": LONG, "value": "-42"}}
        assert cli.call("generateWithRunPod", long_seed, token)["result"]["status"] == "accepted"
        assert runpod.requests[1][1]["input"]["seed"] == -42

        # Each call's outcome is an entry of its own (audit: a refusal left nothing but the emulator's lines).
        def calls() -> list[dict]:
            entries = (json_entry(line) for line in cli.log_path.read_text().splitlines())
            return [entry for entry in entries if entry and entry.get("message") == "generateWithRunPod"]

        def outcomes() -> list:
            return [(e.get("status") or e.get("refused"), e.get("user_id"), e.get("error")) for e in calls()]

        width = ("invalid-argument", uid, "width must be between 256 and 1024")
        assert emu.wait_until(lambda: width in outcomes(), 30, 0.1), cli.log_tail()
        assert {("accepted", uid, None), ("permission-denied", uid, "user_id must be the signed-in user's uid")} <= set(
            outcomes()
        )
        # A job named as the worker's entries name it.
        [answered] = [e for e in calls() if e.get("file_uid") == "cli-1"]
        assert (answered["media_type"], answered["status"]) == ("videos", "accepted")

        # The client's own write, with its real ID token, through the rules; its trigger wakes a worker.
        from test_rules import SERVER_TIME, Rest, encode

        rest = Rest(f"http://{cli.host}:{cli.ports['firestore']}", project)
        rest.session.headers["Authorization"] = f"Bearer {token}"
        doc = {
            "status": "queued",
            "created_at": SERVER_TIME,
            "prompt": "a boat",
            "generated": False,
            "error": False,
            "width": 768,
        }
        written = rest.session.post(
            f"{rest.url}:commit",
            json={
                "writes": [
                    {
                        "update": {
                            "name": f"{rest.root}/generations/{uid}/images/cli-2",
                            "fields": {k: encode(v) for k, v in doc.items() if v is not SERVER_TIME},
                        },
                        "updateTransforms": [{"fieldPath": "created_at", "setToServerValue": "REQUEST_TIME"}],
                    }
                ]
            },
            timeout=10,
        )
        assert written.status_code == 200, written.text
        assert emu.wait_until(lambda: len(runpod.requests) == 3, 30, 0.1), cli.log_tail()
        assert runpod.requests[2] == (
            f"Bearer {CLI_KEY}",
            {
                "input": {
                    "prompt": "a boat",
                    "user_id": uid,
                    "file_uid": "cli-2",
                    "use_cloud_storage": True,
                    "width": 768,
                }
            },
        )
        # The trigger logs through firebase_functions.logger: one JSON entry per outcome.
        # The two triggers run concurrently: their lines may come in either order.
        skipped = f'"path": "generations/{uid}/videos/cli-1", "outcome": "skipped"'
        accepted = f'"path": "generations/{uid}/images/cli-2", "outcome": "accepted"'
        assert emu.wait_until(lambda: skipped in cli.log_tail(400) and accepted in cli.log_tail(400), 30, 0.1), (
            cli.log_tail()
        )
        assert CLI_KEY not in cli.log_path.read_text()
    finally:
        cli.stop()


# ---------------------------------------------------------------------------------------------- README claims
class HangingRunPod(LocalServer):
    """An endpoint that accepts the connection and never answers. A stand-in on purpose: a real local worker
    always answers; this is RunPod's side of a network or platform stall."""

    def __init__(self):
        self.stop = threading.Event()
        self.requests = 0
        hanging = self

        class Handler(QuietHandler):
            def do_POST(self):
                hanging.requests += 1
                hanging.stop.wait(60)

        super().__init__(Handler)
        self.url = f"{self.origin}/v2/endpoint/runsync"

    def close(self):
        self.stop.set()
        super().close()


def test_a_hanging_endpoint_is_read_as_queued_after_one_send(firestore_client):
    """RunPod holds runsync open during a cold start: after RUNPOD_TIMEOUT_SECONDS the callable answers "queued",
    with the doc left queued, and sends nothing more (each send would be one more RunPod job, and RunPod starts
    workers for its queue; before, RUNPOD_ATTEMPTS sends)."""
    hanging = HangingRunPod()
    try:
        runpod = RunPodClient(hanging.url, API_KEY, attempts=2, timeout=1.0, deadline=10.0, wait_initial=0.05)
        started = time.monotonic()
        reply = dispatch.generate(firestore_client, runpod, uid="u-hang", data={"prompt": "a car", "file_uid": "h-1"})
        took = time.monotonic() - started
    finally:
        hanging.close()
    assert (reply["status"], reply["success"]) == ("queued", True)
    assert hanging.requests == 1 and 1.0 <= took < 4.0
    doc = firestore_client.document("generations/u-hang/images/h-1").get().to_dict()
    assert doc["status"] == "queued" and doc["dispatch_count"] == 1 and "dispatch_error" not in doc
    assert_key_nowhere(doc, reply)


def test_a_stale_invalid_doc_is_failed_by_the_sweep_without_waking_a_worker(firestore_client, stub):
    old = datetime.now(UTC) - timedelta(hours=1)
    path = "generations/u-sv/images/bad-old"
    firestore_client.document(path).set({**client_doc(width=100), "created_at": old})
    runpod = stub(ACCEPTED)
    counts = sweep.redispatch_stale(firestore_client, runpod.client(), policy=Policy())
    assert counts == Counter(invalid=1)
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["error_type"], doc["error_message"]) == (
        "failed",
        "ValidationError",
        "width must be between 256 and 1024",
    )
    assert not DISPATCH_MARKERS & doc.keys(), doc
    assert runpod.requests == []  # nothing sent: a stand-in that records requests, in a project of its own


FUNCTIONS_ENV_SCRIPT = """
import json, os, main
client, policy = main._runpod(), main._policy()
print(json.dumps({"url": client.url, "attempts": client.attempts, "timeout": client.timeout,
                  "redispatch_minutes": policy.redispatch_after.total_seconds() / 60,
                  "max_dispatches": policy.max_dispatches}))
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
@pytest.mark.parametrize(
    "env,expected",
    [
        (
            {},
            {
                "url": "https://api.runpod.ai/v2/ep-123/runsync",
                "attempts": 3,
                "timeout": 20.0,
                "redispatch_minutes": 10.0,
                "max_dispatches": 3,
            },
        ),
        (
            {
                "RUNPOD_RUNSYNC_URL": "http://127.0.0.1:8000/runsync",
                "RUNPOD_ATTEMPTS": "5",
                "RUNPOD_TIMEOUT_SECONDS": "8",
                "REDISPATCH_AFTER_MINUTES": "2",
                "MAX_DISPATCHES": "4",
            },
            {
                "url": "http://127.0.0.1:8000/runsync",
                "attempts": 5,
                "timeout": 8.0,
                "redispatch_minutes": 2.0,
                "max_dispatches": 4,
            },
        ),
    ],
    ids=["defaults", "set"],
)
def test_the_functions_environment_settings(tmp_path, env, expected):
    """The README's settings table for the functions, read by the deployed main.py in the functions' venv."""
    deploy = _deploy_folder(tmp_path)
    names = (
        "RUNPOD_RUNSYNC_URL",
        "RUNPOD_ATTEMPTS",
        "RUNPOD_TIMEOUT_SECONDS",
        "REDISPATCH_AFTER_MINUTES",
        "MAX_DISPATCHES",
    )
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *names)}
    base.update(FUNCTIONS_EMULATOR="true", GCLOUD_PROJECT="demo-firegen", RUNPOD_ENDPOINT_ID="ep-123")
    base.update(RUNPOD_API_KEY=API_KEY, **env)
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", FUNCTIONS_ENV_SCRIPT],
        cwd=deploy,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
    assert_key_nowhere(result.stdout, result.stderr)


SCHEDULED_SCRIPT = """
import flask, main
app = flask.Flask("scheduler")
headers = {"X-CloudScheduler-JobName": "firebase-schedule-redispatchStaleJobs-us-central1",
           "X-CloudScheduler-ScheduleTime": "2026-01-01T00:05:00Z"}
with app.test_request_context("/", method="POST", headers=headers):
    response = main.redispatchStaleJobs(flask.request)
print("status", response.status_code)
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_redispatch_stale_jobs_invoked_as_deployed(
    tmp_path, firestore_emulator, firestore_client, project_id, worker, busy_slot
):
    """`redispatchStaleJobs` as Cloud Scheduler invokes it (an HTTP request with the scheduler's headers to the
    deployed function in the functions' venv), on the emulator: a stale queued doc is dispatched to the real
    worker, which runs it; a fresh one is left alone."""
    old = datetime.now(UTC) - timedelta(hours=1)
    stale, fresh = "generations/u-cron/images/stale-1", "generations/u-cron/images/fresh-1"
    busy = busy_slot("cron-busy")  # its one slot busy: its listener leaves the docs queued meanwhile
    small = client_doc(width=256, height=256, num_inference_steps=10)
    worker.db.document(stale).set({**small, "created_at": old})
    worker.db.document(fresh).set(small)
    deploy = _deploy_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        FUNCTIONS_EMULATOR="true",
        GCLOUD_PROJECT=worker.db.project,
        FIRESTORE_EMULATOR_HOST=firestore_emulator.host_port,
        RUNPOD_ENDPOINT_ID="local",
        RUNPOD_RUNSYNC_URL=worker.process.runsync_url,
        RUNPOD_API_KEY=API_KEY,
    )
    result = subprocess.run(
        [str(FUNCTIONS_PYTHON), "-c", SCHEDULED_SCRIPT],
        cwd=deploy,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert worker.doc(busy)["status"] == "processing"  # the docs were still queued when the sweep ran
    free_the_slot(worker, busy)
    assert "status 200" in result.stdout
    assert '"counts": {"redispatched": 1}, "message": "redispatchStaleJobs"' in result.stdout
    doc = worker.wait_status(stale, timeout=120)
    assert (doc["status"], doc["dispatch_count"], doc["dispatched_by"]) == ("completed", 1, "scheduler")
    assert "dispatch_count" not in worker.wait_status(fresh) and worker.runsync_calls("stale-1") == 1
    assert_key_nowhere(result.stdout, result.stderr)


@pytest.mark.skipif(
    firebase_cli.missing() is not None,
    reason=f"Firebase CLI emulators: {firebase_cli.missing()} (run `python3 scripts/setup_firebase_cli.py`)",
)
def test_a_cli_that_fails_to_start_leaves_no_emulator_running(emulator_logs, tmp_path):
    """A port the CLI was given is taken after its own check and before it binds it (CI: another process got the
    same free port meanwhile): it exits, and the Firestore emulator (Java) it had started outlived it, holding its
    port (before: the start's error was masked by "ports ... still taken after stop", and the Java stayed). The
    logging port, the last the CLI binds, is taken once its hub runs (its ports checked). A start where the CLI
    bound it first (CI once: the hub seen open only after the CLI had started) proves nothing: it is tried again;
    so does one that failed before its Firestore emulator started (CI once: exit code 1, another of its free ports
    taken by another test process), though it too must leave nothing running."""
    for attempt in range(3):
        cli = FirebaseCli(
            emulator_logs, tmp_path / f"project-{attempt}", emu.unique_id("demo-cli"), "http://127.0.0.1:9/runsync"
        )
        with _logging_port_taken_once_the_hub_runs(cli) as taken:
            try:
                cli.start()
            except emu.EmulatorError as error:
                failed = str(error)
            else:
                failed = ""
        if not failed:
            assert not taken.is_set(), "the CLI started though its logging port was taken"
            cli.stop()
            continue
        assert "exited with code" in failed, failed
        assert not emu.port_open("127.0.0.1", cli.ports["firestore"])
        assert not [process for process in cli._descendants if firebase_cli._stat(process[0])]
        if taken.is_set() and "Firestore Emulator was started" in failed:  # before the CLI failed: its Java stopped
            break
    else:
        pytest.fail("the CLI never failed on its logging port after starting its Firestore emulator, in 3 tries")


@contextlib.contextmanager
def _logging_port_taken_once_the_hub_runs(cli: FirebaseCli):
    """Yields an event set once a socket of the test's listens on the CLI's logging port; closed on leaving."""
    import socket

    holder = socket.socket()
    taken = threading.Event()

    def take() -> None:
        if emu.wait_until(lambda: emu.port_open("127.0.0.1", cli.ports["hub"]), 60, 0.01):
            with contextlib.suppress(OSError):  # the CLI has it
                holder.bind(("127.0.0.1", cli.ports["logging"]))
                holder.listen()
                taken.set()

    thief = threading.Thread(target=take, daemon=True)
    thief.start()
    try:
        yield taken
    finally:
        thief.join(60)
        holder.close()


# --- a runsync the functions sent, arriving late (a cold start) ------------------------------------------------


def late_runsync_handler(db, submitted: list):
    """The worker's own runsync handler on the test's project (the request a cold endpoint's worker takes
    minutes later); `submitted`: what it hands to the worker's slot."""
    from firegen_core.claims import WorkerJobs
    from listener.handler import RunsyncHandler

    return RunsyncHandler(WorkerJobs(db, worker_id="late"), lambda key, request, *rest: submitted.append(request))


def test_a_late_runsync_never_puts_back_parameters_a_later_call_replaced(firestore_client, stub):
    """The callable dispatched A to a cold endpoint; a second call for the file_uid restated the queued job as B
    (no second dispatch: one is on its way). When A's runsync reached a worker, minutes later, the job took A's
    parameters back, a mix nobody asked for, and a run of B under way was stopped, its try charged (audit)."""
    from firegen_core.claims import WorkerJobs
    from firegen_core.jobs import JobKey

    runpod = stub((200, {"id": "rp-a", "status": "IN_QUEUE"}))
    path = "generations/u-late/images/late-1"
    call = {"prompt": "A: a red car", "file_uid": "late-1"}
    assert dispatch.generate(firestore_client, runpod.client(), uid="u-late", data=call)["status"] == "queued"
    restated = {"prompt": "B: a blue boat", "file_uid": "late-1", "num_inference_steps": 40}
    assert dispatch.generate(firestore_client, runpod.client(), uid="u-late", data=restated)["status"] == "accepted"
    [(_, sent)] = runpod.requests  # A's, still on its way
    submitted: list = []
    handler = late_runsync_handler(firestore_client, submitted)

    assert handler.handle(sent["input"], "rp-a")["status"] == "accepted"  # it wakes a worker for the job
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["prompt"], doc["num_inference_steps"]) == ("queued", "B: a blue boat", 40)
    assert [(request.prompt, request.num_inference_steps) for request in submitted] == [("B: a blue boat", 40)]

    job = WorkerJobs(firestore_client, worker_id="w1").claim(JobKey("u-late", "images", "late-1"))
    assert job is not None and job.doc["prompt"] == "B: a blue boat"
    handler.handle(sent["input"], "rp-a")  # RunPod's duplicate of it, while B runs
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["worker_id"], doc["attempts"]) == ("processing", "w1", 1)  # its run goes on
    assert WorkerJobs(firestore_client, worker_id="w1").complete(job, {"status": "completed", "generated": True})
    usage = firestore_client.document("usage/u-late").get().to_dict()
    assert usage["spent_today"] == pytest.approx(doc["cost"]) and usage["pending"] == 0  # one try, charged once


def test_a_late_runsync_never_brings_back_a_job_the_callable_refused(firestore_client, stub):
    """The client wrote its doc, whose trigger dispatched it to a cold endpoint; then its callable call broke the
    contract, which failed the doc (refunded). The late runsync read as the refused job's next try: queued again,
    admitted, charged, and ran on the doc's parameters after the app was told invalid-argument (audit)."""
    runpod = stub((200, {"id": "rp-t", "status": "IN_QUEUE"}))
    path = "generations/u-refused/images/ref-1"
    firestore_client.document(path).set(client_doc())
    assert (
        dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-refused", media_type="images", file_uid="ref-1"
        )
        == "queued"
    )
    bad = {"prompt": "A red sports car", "file_uid": "ref-1", "guidance_scale": 99}
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, runpod.client(), uid="u-refused", data=bad)
    assert raised.value.code == "invalid-argument"
    [(_, sent)] = runpod.requests
    submitted: list = []

    answer = late_runsync_handler(firestore_client, submitted).handle(sent["input"], "rp-t")
    assert answer["status"] == "failed" and submitted == []
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["error_type"]) == ("failed", "ValidationError")
    usage = firestore_client.document("usage/u-refused").get().to_dict()
    assert usage["pending"] == 0 and usage.get("spent_today", 0) == 0


def test_a_new_request_for_a_dispatched_job_still_restates_it(firestore_client, stub):
    """Only the functions' own dispatches are wake-ups: a runsync stating other parameters (the contract's own
    Firebase Function flow, a caller's fixed request) restates the live job as before."""
    runpod = stub((200, {"id": "rp-n", "status": "IN_QUEUE"}))
    call = {"prompt": "a car", "file_uid": "new-1"}
    dispatch.generate(firestore_client, runpod.client(), uid="u-new", data=call)
    handler = late_runsync_handler(firestore_client, [])
    other = {**runpod.requests[0][1]["input"], "prompt": "a boat"}
    assert handler.handle(other, "rp-other")["status"] == "accepted"
    assert firestore_client.document("generations/u-new/images/new-1").get().to_dict()["prompt"] == "a boat"


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a car"},
        {"prompt": "a car", "guidance_scale": 7, "seed": 2**53, "width": 768, "negative_prompt": "blur"},
        {"prompt": "a fox", "num_frames": 16},  # a video whose doc names no video field but its count
        {"prompt": "a fox", "fps": 8, "video_guidance_scale": 5.0},
    ],
)
def test_a_dispatch_is_recognised_after_its_json_hop(fields):
    """What the worker parses from the runsync input the functions built has the request's fingerprint, also
    where a JSON hop wrote 7.0 as 7 (JavaScript's numbers)."""
    from firegen_core.contract import parse_runsync_input
    from firegen_core.dispatches import arrived, dispatched, dispatches_with, fingerprint

    request = parse_runsync_input({**fields, "user_id": "u", "file_uid": "f", "use_cloud_storage": True})
    sent = dispatch.runsync_input(request)
    hopped = {
        name: int(value) if isinstance(value, float) and value.is_integer() else value for name, value in sent.items()
    }
    assert fingerprint(parse_runsync_input(json.loads(json.dumps(hopped)))) == fingerprint(request)
    doc = {"dispatched_inputs": dispatches_with(None, request)}
    doc = {"dispatched_inputs": dispatches_with(doc, request)}  # two of it on their way
    assert dispatched(doc, parse_runsync_input(sent))
    once = {**doc, **arrived(doc, request, "rp-1")}
    assert dispatched(once, request) and dispatched(once, request, "rp-1")  # one more to come; rp-1 redelivered
    assert arrived(once, request, "rp-1") is None  # a redelivery changes nothing
    none_left = {**once, **arrived(once, request, "rp-2")}
    assert none_left["dispatched_inputs"] is firestore.DELETE_FIELD and none_left["arrived_dispatches"] == [
        "rp-1",
        "rp-2",
    ]
    assert dispatched(none_left, request, "rp-2") and not dispatched(none_left, request, "rp-3")
    assert not dispatched(doc, parse_runsync_input({**sent, "prompt": "another"}))
    assert not dispatched(doc, parse_runsync_input({**sent, "seed": (sent.get("seed") or 0) + 1}))  # every digit counts


def test_a_dispatch_is_recognised_across_a_rollout():
    """Functions and workers of two deploys run side by side for minutes (RunPod rolls its workers; functions deploy
    apart). The digest leaves out what the request did not give: a release whose default differs (played by the
    parsed request's default replaced) or that adds an optional field digests it alike. The last release's digests
    (every field, defaults included), which its functions wrote, are recognised and taken off as they arrive."""
    import hashlib
    from dataclasses import asdict, replace

    from firegen_core.contract import parse_runsync_input
    from firegen_core.dispatches import arrived, dispatched, fingerprint, undelivered

    request = parse_runsync_input(
        {"prompt": "a fox", "width": 768, "user_id": "u", "file_uid": "f", "use_cloud_storage": True}
    )
    other_defaults = replace(request, height=2048, num_inference_steps=12, guidance_scale=3.0)
    assert fingerprint(other_defaults) == fingerprint(request)
    assert fingerprint(replace(request, width=1024)) != fingerprint(request)  # a given field's value counts

    old = {name: value for name, value in asdict(request).items() if name != "given"}
    old_mark = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:32]
    doc = {"dispatched_inputs": ["elsewhere", old_mark]}
    assert dispatched(doc, request)
    assert arrived(doc, request, "rp-1") == {"dispatched_inputs": ["elsewhere"], "arrived_dispatches": ["rp-1"]}
    assert undelivered(doc, request) == {"dispatched_inputs": ["elsewhere"]}
    assert not dispatched(doc, replace(request, width=1024, given=request.given))


def test_the_trigger_dispatch_arriving_behind_the_contracts_refused_runsync_changes_nothing_and_a_fixed_retry_runs(
    firestore_client, stub
):
    """The contract's function flow with the trigger deployed, on a cold endpoint: the trigger dispatched the
    placeholder's defaults after its grace, behind the app's own runsync in RunPod's queue. The app's runsync broke
    the contract (the doc failed); the trigger's, arriving next, must not bring the job back (a re-review: queued,
    run and charged on the defaults). The app's fixed retry, stating exactly those defaults, is a request: it runs
    (the review: refused with the old message)."""
    runpod = stub((200, {"id": "rp-t", "status": "IN_QUEUE"}))
    path = "generations/u-fix/images/fix-1"
    firestore_client.document(path).set({**client_doc(), "prompt": "a red car"})
    assert (
        dispatch.dispatch_created(
            firestore_client, runpod.client(), user_id="u-fix", media_type="images", file_uid="fix-1"
        )
        == "queued"
    )
    [(_, sent)] = runpod.requests  # the placeholder's defaults, on their way
    submitted: list = []
    handler = late_runsync_handler(firestore_client, submitted)
    fixed = {"prompt": "a red car", "user_id": "u-fix", "file_uid": "fix-1", "use_cloud_storage": True}
    assert handler.handle({**fixed, "width": 2000}, "app-1")["status"] == "failed"

    assert handler.handle(sent["input"], "rp-t")["status"] == "failed"  # the trigger's, late: still the refusal
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["error_type"], submitted) == ("failed", "ValidationError", [])
    assert firestore_client.document("usage/u-fix").get().to_dict().get("spent_today", 0) == 0

    assert handler.handle(fixed, "app-2")["status"] == "accepted"
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc.get("width"), len(submitted)) == ("queued", None, 1)


def test_the_trigger_dispatch_arriving_behind_the_contracts_runsync_never_puts_back_the_defaults(
    firestore_client, stub
):
    """As above, the app's runsync valid (33 frames at 12 fps): the trigger's dispatch of the placeholder's
    defaults (16 frames, named by the dispatch), arriving next, restated the video back to 16 frames at 12 fps, a
    mix nobody asked for (a re-review)."""
    runpod = stub((200, {"id": "rp-v", "status": "IN_QUEUE"}))
    path = "generations/u-vid/videos/vid-1"
    firestore_client.document(path).set({**client_doc(), "prompt": "a fox"})
    dispatch.dispatch_created(firestore_client, runpod.client(), user_id="u-vid", media_type="videos", file_uid="vid-1")
    [(_, sent)] = runpod.requests
    assert sent["input"]["num_frames"] == 16
    submitted: list = []
    handler = late_runsync_handler(firestore_client, submitted)
    app = {"prompt": "a fox", "user_id": "u-vid", "file_uid": "vid-1", "use_cloud_storage": True}
    assert handler.handle({**app, "num_frames": 33, "fps": 12}, "app-1")["status"] == "accepted"
    assert handler.handle(sent["input"], "rp-v")["status"] == "accepted"
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["num_frames"], doc["fps"]) == ("queued", 33, 12)
    assert [(request.num_frames, request.fps) for request in submitted] == [(33, 12), (33, 12)]


def test_a_runsync_restating_a_dispatched_job_back_to_its_dispatched_parameters_restates_it(firestore_client, stub):
    """A direct runsync caller restated a dispatched job (steps 25) after its dispatch arrived, then sent the
    dispatched request (steps 40) again: it was taken for the dispatch and answered "accepted" for a job that kept
    steps 25 (the review's case). A dispatch is recognised once."""
    runpod = stub((200, {"id": "rp-d", "status": "IN_QUEUE"}))
    call = {"prompt": "a car", "file_uid": "back-1", "num_inference_steps": 40}
    dispatch.generate(firestore_client, runpod.client(), uid="u-back", data=call)
    handler = late_runsync_handler(firestore_client, [])
    [(_, sent)] = runpod.requests
    assert handler.handle(sent["input"], "rp-d")["status"] == "accepted"  # the dispatch arrives
    assert handler.handle({**sent["input"], "num_inference_steps": 25}, "direct-1")["status"] == "accepted"
    assert handler.handle(sent["input"], "direct-2")["status"] == "accepted"
    doc = firestore_client.document("generations/u-back/images/back-1").get().to_dict()
    assert doc["num_inference_steps"] == 40 and "dispatched_inputs" not in doc


def test_runpods_redelivery_of_a_runsync_never_puts_back_what_a_later_one_replaced(firestore_client):
    """RunPod delivers a request again when its worker died before answering it: `app-1`, which created the job,
    came again after `app-2` restated it (steps 40), and took the job back to steps 25, as would a redelivery of
    `app-2` after `app-3`. A RunPod job's request is heard once, whichever runsync it was."""
    submitted: list = []
    handler = late_runsync_handler(firestore_client, submitted)
    app = {"prompt": "a car", "user_id": "u-redo", "file_uid": "redo-1", "use_cloud_storage": True}
    for request_id, steps in (("app-1", 25), ("app-2", 40), ("app-1", 25), ("app-3", 30), ("app-2", 40)):
        assert handler.handle({**app, "num_inference_steps": steps}, request_id)["status"] == "accepted"
    doc = firestore_client.document("generations/u-redo/images/redo-1").get().to_dict()
    assert (doc["num_inference_steps"], doc["runpod_job_id"], doc["arrived_dispatches"]) == (
        30,
        "app-1",
        ["app-1", "app-2", "app-3"],
    )
    assert [request.num_inference_steps for request in submitted] == [25, 40, 40, 30, 30]


def test_a_redelivery_is_known_after_the_functions_dispatch_named_the_job_anew(firestore_client, stub):
    """`app-1` created the job; the functions' sweep dispatched it again and named it by its own RunPod job
    (`runpod_job_id`, for the logs); app-2 restated it. RunPod's redelivery of app-1 took the job back to app-1's
    parameters: its id had gone with `runpod_job_id` (the review)."""
    handler = late_runsync_handler(firestore_client, [])
    app = {"prompt": "a car", "user_id": "u-anew", "file_uid": "anew-1", "use_cloud_storage": True}
    path = "generations/u-anew/images/anew-1"
    assert handler.handle({**app, "num_inference_steps": 25}, "app-1")["status"] == "accepted"
    firestore_client.document(path).update({"created_at": datetime.now(UTC) - timedelta(hours=1)})
    runpod = stub(ACCEPTED)
    policy = Policy(redispatch_after=timedelta(minutes=10), max_dispatches=2)
    assert sweep.redispatch_stale(firestore_client, runpod.client(), policy=policy) == Counter(redispatched=1)
    [(_, sent)] = runpod.requests
    assert handler.handle(sent["input"], "job-1")["status"] == "accepted"
    assert firestore_client.document(path).get().get("runpod_job_id") == "job-1"
    assert handler.handle({**app, "num_inference_steps": 40}, "app-2")["status"] == "accepted"
    assert handler.handle({**app, "num_inference_steps": 25}, "app-1")["status"] == "accepted"  # redelivered
    assert firestore_client.document(path).get().get("num_inference_steps") == 40


def test_a_refused_requests_redelivery_is_that_refusal_again(firestore_client):
    """A request refused for its user's limits (rp-1, and rp-3 restating the refused job) kept no mark of its
    RunPod job: once the owner's retry (rp-2, 40 steps) ran it, rp-1's redelivery took the job back to 25 steps
    (the review)."""
    from firegen_core.claims import WorkerJobs
    from firegen_core.jobs import JobKey
    from firegen_core.quota import Limits
    from listener.handler import RunsyncHandler

    store = WorkerJobs(firestore_client, worker_id="late", limits=Limits(max_pending=1))
    handler = RunsyncHandler(store, lambda *_: None)
    app = {"prompt": "a car", "user_id": "u-full", "use_cloud_storage": True}
    assert handler.handle({**app, "file_uid": "first"}, "rp-0")["status"] == "accepted"
    refused = handler.handle({**app, "file_uid": "then", "num_inference_steps": 25}, "rp-1")
    assert refused["status"] == "failed" and refused["error"].startswith("Too many jobs")
    again = handler.handle({**app, "file_uid": "then", "num_inference_steps": 30}, "rp-3")
    assert again["status"] == "failed"
    assert handler.handle({**app, "file_uid": "then", "num_inference_steps": 30}, "rp-3") == again  # redelivered
    store.cancel(JobKey("u-full", "images", "first"))  # room again
    path = "generations/u-full/images/then"
    assert handler.handle({**app, "file_uid": "then", "num_inference_steps": 40}, "rp-2")["status"] == "accepted"
    for steps, request_id in ((25, "rp-1"), (30, "rp-3")):  # redelivered: refused once, each
        assert handler.handle({**app, "file_uid": "then", "num_inference_steps": steps}, request_id)["status"] == (
            "accepted"
        )
    doc = firestore_client.document(path).get().to_dict()
    assert (doc["status"], doc["num_inference_steps"], doc["runpod_job_id"]) == ("queued", 40, "rp-2")


def test_the_sdks_local_test_id_names_no_one_request(firestore_client):
    """The SDK's `--test_input` runs all carry the id "local_test": a run with other parameters is a request of its
    own, not RunPod's redelivery of the one before."""
    import asyncio

    handler = late_runsync_handler(firestore_client, [])
    app = {"prompt": "a car", "user_id": "u-local", "file_uid": "local-1", "use_cloud_storage": True}
    for steps in (25, 40):
        answer = asyncio.run(handler({"id": "local_test", "input": {**app, "num_inference_steps": steps}}))
        assert answer["status"] == "accepted"
    assert firestore_client.document("generations/u-local/images/local-1").get().get("num_inference_steps") == 40


def test_a_reset_during_the_tls_handshake_is_sent_again(tmp_path):
    """urllib3 wraps a reset in the TLS handshake in the same "Connection aborted" as one after the request was
    sent: it was taken as sent, answered "queued" with no `dispatch_error`, although RunPod never got the call
    (the review's case). A raw socket stands in for a server whose connections reset after the ClientHello."""
    import socket
    import struct

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    connections: list[int] = []

    def reset_after_hello():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connections.append(1)
            connection.recv(4096)  # the ClientHello
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()  # RST

    threading.Thread(target=reset_after_hello, daemon=True).start()
    try:
        client = RunPodClient(f"https://127.0.0.1:{server.getsockname()[1]}/runsync", API_KEY, **FAST)
        verdict = client.runsync({"prompt": "a car"})
    finally:
        server.close()
    assert (verdict.outcome, verdict.attempts, len(connections)) == ("undelivered", FAST["attempts"], FAST["attempts"])


def test_a_dispatch_that_never_reached_runpod_leaves_no_digest_to_take_a_later_request_for_it(firestore_client, stub):
    """The trigger's dispatch of a placeholder's defaults was not delivered (429 on every try): its digest stayed,
    and the app's fixed retry after a refusal, stating those defaults, was taken for it and refused with the old
    message (a re-check)."""
    runpod = stub((429, {"error": "Too Many Requests"}))
    path = "generations/u-gone/images/gone-1"
    firestore_client.document(path).set({**client_doc(), "prompt": "a red car"})
    outcome = dispatch.dispatch_created(
        firestore_client, runpod.client(), user_id="u-gone", media_type="images", file_uid="gone-1"
    )
    assert outcome == "undelivered" and len(runpod.requests) == FAST["attempts"]
    doc = firestore_client.document(path).get().to_dict()
    assert "dispatch_error" in doc and "dispatched_inputs" not in doc
    handler = late_runsync_handler(firestore_client, [])
    app = {"prompt": "a red car", "user_id": "u-gone", "file_uid": "gone-1", "use_cloud_storage": True}
    assert handler.handle({**app, "width": 2000}, "app-1")["status"] == "failed"
    assert handler.handle(app, "app-2")["status"] == "accepted"
    assert firestore_client.document(path).get().to_dict()["status"] == "queued"


# ---------------------------------------------------------------------------------------------- mutation audit
# Each of these failed under a hand mutation the suite let through (audit16).
def test_a_dispatch_the_worker_refused_leaves_no_digest(firestore_client, stub):
    runpod = stub((200, {"id": "rp-r", "status": "FAILED", "error": "Validation failed: something the worker refused"}))
    path = "generations/u-rej/images/rej-1"
    firestore_client.document(path).set({**client_doc(), "prompt": "a red car"})
    outcome = dispatch.dispatch_created(
        firestore_client, runpod.client(), user_id="u-rej", media_type="images", file_uid="rej-1"
    )
    assert outcome == "rejected"
    assert "dispatched_inputs" not in firestore_client.document(path).get().to_dict()


def test_an_older_dispatch_failing_writes_no_dispatch_error_over_a_newer_one(firestore_client):
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobKey, JobStore

    path = "generations/u-old/images/old-1"
    firestore_client.document(path).set({**client_doc(), "prompt": "a car", "dispatch_count": 2})
    req = parse_runsync_input({"prompt": "a car", "user_id": "u-old", "file_uid": "old-1", "use_cloud_storage": True})
    verdict = runpod_client.Verdict(runpod_client.UNDELIVERED, "RunPod refused the call: HTTP 404")
    dispatch._record_verdict(JobStore(firestore_client), JobKey("u-old", "images", "old-1"), verdict, 1, req)
    assert "dispatch_error" not in firestore_client.document(path).get().to_dict()


def test_the_digests_kept_are_bounded():
    from firegen_core.contract import parse_runsync_input
    from firegen_core.dispatches import DISPATCHED_INPUTS, DISPATCHES_KEPT, dispatches_with

    req = parse_runsync_input({"prompt": "a car", "user_id": "u", "file_uid": "f", "use_cloud_storage": True})
    doc: dict = {}
    for _ in range(DISPATCHES_KEPT + 3):
        doc[DISPATCHED_INPUTS] = dispatches_with(doc, req)
    assert len(doc[DISPATCHED_INPUTS]) == DISPATCHES_KEPT


@pytest.mark.parametrize("error", ["DeadlineExceeded", "InternalServerError", "Aborted", "Cancelled"])
def test_each_firestore_failure_answers_unavailable(firestore_client, stub, monkeypatch, error, caplog):
    from google.api_core import exceptions

    from firegen_core.jobs import JobStore

    def away(*args, **kwargs):
        raise getattr(exceptions, error)("Firestore away")  # a stand-in: the emulator fails none of these on demand

    monkeypatch.setattr(JobStore, "transition", away)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client, stub(ACCEPTED).client(), uid="u-dl", data={"prompt": "a car", "file_uid": "dl-1"}
        )
    assert raised.value.code == "unavailable"
    [said] = logged(caplog, "firestore_unavailable")
    assert (said.levelno, said.call) == (logging.ERROR, "generate") and said.error.endswith(" Firestore away")


def test_a_refused_client_doc_of_the_other_media_type_takes_the_call(firestore_client, stub):
    images = "generations/u-rf/images/rf-1"
    firestore_client.document(images).create(
        client_doc(fps=10, width=512, **CLIENT_DOC_STATES["refused for its limits"])
    )
    runpod = stub(ACCEPTED)
    with pytest.raises(CallError) as raised:
        dispatch.generate(
            firestore_client,
            runpod.client(),
            uid="u-rf",
            data={"prompt": "A red sports car", "file_uid": "rf-1", "fps": 10},
        )
    assert raised.value.message == MISFILED
    assert not firestore_client.document("generations/u-rf/videos/rf-1").get().exists and runpod.requests == []


# ---------------------------------------------------------------------------------------------- mutation audit
def test_a_null_user_id_is_left_out_and_a_file_uid_of_no_string_is_refused_as_such(firestore_client, stub):
    """Null is "not given" for user_id too, in either spelling (not "user_id must be the signed-in user's uid");
    a file_uid that is a list or an object is the contract's invalid-argument, not INTERNAL (a TypeError)."""
    runpod = stub(ACCEPTED)
    data = {"prompt": "a car", "file_uid": "null-uid", "user_id": None, "userId": None}
    assert dispatch.generate(firestore_client, runpod.client(), uid="u-nulluid", data=data)["status"] == "accepted"
    # A blank one is left out as an empty one is: the callable makes the id (the contract reads blank as missing).
    reply = dispatch.generate(firestore_client, runpod.client(), uid="u-nulluid", data={"prompt": "x", "fileUid": " "})
    assert reply["status"] == "accepted" and reply["fileUid"].strip() == reply["fileUid"] != ""
    for file_uid in (["a"], {"a": 1}):
        with pytest.raises(CallError) as raised:
            dispatch.generate(
                firestore_client, runpod.client(), uid="u-nulluid", data={"prompt": "x", "file_uid": file_uid}
            )
        assert (raised.value.code, raised.value.message) == (
            "invalid-argument",
            "Validation failed: file_uid must be a string",
        )
    assert len(runpod.requests) == 2


def test_a_refused_calls_created_doc_keeps_its_prompt_beside_a_field_given_twice(firestore_client, stub):
    """A field given twice refuses the call, and the failed doc the refusal leaves still shows its prompt (contract:
    normalise_document_fields(first=True), "a refusal's record")."""
    data = {"prompt": "a cat", "negative_prompt": "blur", "negativePrompt": "rain", "file_uid": "p"}
    with pytest.raises(CallError) as raised:
        dispatch.generate(firestore_client, stub(ACCEPTED).client(), uid="u-first", data=data)
    assert raised.value.message == "Validation failed: negative_prompt is given twice with different values"
    doc = firestore_client.document("generations/u-first/images/p").get().to_dict()
    assert (doc["status"], doc["prompt"]) == ("failed", "a cat")


_BODY_FIELDS_PROBE = """
import contextlib, io, json, main
from flask import Flask, request
out = []
for name in ("generateWithRunPod", "cancelGeneration"):
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        with Flask("probe").test_request_context("/", method="POST", data=b"[1, 2]", content_type="application/json"):
            getattr(main, name)(request)
    out += [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
print(json.dumps(out))
"""


@pytest.mark.skipif(not FUNCTIONS_PYTHON.exists(), reason="functions/venv (python3.11) is not built")
def test_a_refused_callable_body_is_logged_naming_its_function_and_its_size(tmp_path):
    """`callable_body_unreadable` says which callable got the body and how many bytes it was (an operator's
    first questions: a client's bug or someone's probing)."""
    entries = _probe(tmp_path, _BODY_FIELDS_PROBE)
    assert [(e["message"], e.get("function"), e.get("bytes")) for e in entries] == [
        ("callable_body_unreadable", "generateWithRunPod", 6),
        ("callable_body_unreadable", "cancelGeneration", 6),
    ], entries
