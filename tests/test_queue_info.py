"""scripts/queue_info.py on the real Firestore emulator: the queue's state and one job's reasons for waiting, read
from docs the real job store and workers' heartbeats wrote (README "When a job stays queued")."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fixtures_generation import image_request, video_request

from firegen_core import lifecycle, quota, workers
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import JobKey

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "queue_info.py"
spec = importlib.util.spec_from_file_location("queue_info", SCRIPT)
queue_info = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = queue_info
spec.loader.exec_module(queue_info)


@pytest.fixture
def store(firestore_client):
    return WorkerJobs(firestore_client, worker_id="w-busy", limits=quota.Limits(max_running=1, max_pending=9))


def queue(store, media: str, user: str, *file_uids: str) -> list[JobKey]:
    make = image_request if media == "images" else video_request
    keys = []
    for file_uid in file_uids:  # one after another: created_at orders them
        request = make(user_id=user, file_uid=file_uid)
        assert store.ensure_queued(request).applied
        keys.append(JobKey.of(request))
    return keys


def test_ago_says_a_duration_as_a_person_does():
    said = [queue_info.ago(timedelta(seconds=s)) for s in (-3, 0, 4, 60, 200, 3600, 7500, 86400 + 3 * 3600 + 59)]
    assert said == ["0 s", "0 s", "4 s", "1 min", "3 min 20 s", "1 h", "2 h 5 min", "1 d 3 h"]


def test_the_summary_counts_each_media_types_jobs_names_the_busiest_users_and_the_workers(store, firestore_client):
    first, *_ = queue(store, "images", "u1", "a", "b", "c")
    queue(store, "images", "u2", "d")
    queue(store, "videos", "u2", "v")
    assert store.claim(first) is not None  # u1 at USER_MAX_RUNNING=1: the others wait
    gone = store.claim(JobKey("u2", "videos", "v"))
    firestore_client.document(gone.key.path).update({"lease_expires_at": datetime.now(UTC) - timedelta(minutes=3)})
    started = datetime.now(UTC) - timedelta(hours=2, minutes=5)
    workers.beat(firestore_client, "w-busy", busy=1, concurrency=1, started_at=started, finished=4, code_version="c1")
    workers.beat(firestore_client, "w-left", busy=0, concurrency=1, started_at=started, finished=2)
    workers.leave(firestore_client, "w-left", finished=2)
    firestore_client.document("workers/w-dead").set({"seen_at": datetime.now(UTC) - timedelta(minutes=30), "busy": 1})

    lines = queue_info.summary(firestore_client, datetime.now(UTC))
    images, videos, users, *seen = lines
    assert images.startswith("images: 3 queued (the oldest for ") and images.endswith(
        ": generations/u1/images/b), 1 processing"
    ), images
    assert (
        videos
        == "videos: nothing queued, 1 processing, 1 of them past their lease (their worker gone: a sweep takes them over)"
    )
    assert users == (
        "users with jobs pending: 2 (the most first: u1 3 pending, 1 of 1 running; u2 2 pending, 1 of 1 running)"
    )
    [up, silent, left] = seen
    assert up.startswith(
        "workers up (seen within 2 min): w-busy (1 generation slot, 1 job in hand, 4 jobs finished, up 2 h 5 min"
    )
    assert up.endswith(", code c1)")
    assert silent.startswith("workers gone silent: w-dead (last seen 30 min") and "killed" in silent
    assert left.startswith("workers that left: w-left (left ") and left.endswith(" ago, 2 jobs finished)")


def test_a_queued_job_behind_its_users_running_one_says_why(store, firestore_client):
    first, second, third = queue(store, "images", "u1", "a", "b", "c")
    assert store.claim(first) is not None
    firestore_client.document(third.path).update(
        {
            lifecycle.DISPATCH_COUNT: 2,
            "dispatched_by": "scheduler",
            "runpod_job_id": "rp-9",
            lifecycle.DISPATCH_ERROR: "check RUNPOD_ENDPOINT_ID",
        }
    )
    lines = queue_info.job_lines(firestore_client, third, datetime.now(UTC))
    assert lines[0].startswith("generations/u1/images/c: queued for ")
    assert lines[1] == (
        "  dispatched 2 times, last by the scheduler (RunPod job rp-9); why its last dispatch woke no worker: "
        "check RUNPOD_ENDPOINT_ID"
    )
    assert lines[2] == "  its user: u1 3 pending, 1 of 1 running"
    assert lines[3] == "  it waits for one of its user's 1 running job to end (USER_MAX_RUNNING)"
    assert lines[4] == "  1 of its user's own queued images ahead of it (each user's oldest first)"
    assert lines[5] == "  workers up (seen within 2 min): none"

    [second_line] = [
        line for line in queue_info.job_lines(firestore_client, second, datetime.now(UTC)) if "dispatch" in line
    ]
    assert second_line.startswith("  never dispatched: no function saw it")


def test_a_running_a_finished_and_a_missing_job(store, firestore_client):
    running, done = queue(store, "images", "u1", "a", "b")
    claimed = store.claim(running)
    store.renew(claimed, progress=0.4)
    lines = queue_info.job_lines(firestore_client, running, datetime.now(UTC))
    assert lines[0].startswith("generations/u1/images/a: processing, 40%, by worker w-busy (try 1); its lease runs ")
    assert lines[1].startswith("  never dispatched")
    result = lifecycle.success(task_type="text2image", user_id="u1", file_uid="a", urls=["https://x/a.png"], seed=1)
    assert store.complete(claimed, result) == lifecycle.COMPLETED
    lines = queue_info.job_lines(firestore_client, running, datetime.now(UTC))
    assert lines[0].startswith("generations/u1/images/a: completed ") and len(lines) == 1
    assert store.cancel(done).applied
    [failed] = queue_info.job_lines(firestore_client, done, datetime.now(UTC))
    assert failed.startswith("generations/u1/images/b: failed ") and failed.endswith(
        ": Cancelled: Cancelled by the user"
    )
    gone = JobKey("u1", "videos", "nothing")
    assert queue_info.job_lines(firestore_client, gone, datetime.now(UTC)) == [
        "generations/u1/videos/nothing: no such job (never written, deleted by its owner, or its retention ended)"
    ]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_the_command_prints_the_summary_and_refuses_a_path_that_is_no_jobs(firestore_client):
    env = {"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]}
    done = run("--project", firestore_client.project, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:4] == [
        f"queue_info: project {firestore_client.project}, in the emulator at {env['FIRESTORE_EMULATOR_HOST']}",
        "images: nothing queued, 0 processing",
        "videos: nothing queued, 0 processing",
        "users with jobs pending: none",
    ]
    for path in ("users/u1/images/a", "generations//images/a", "generations/u1/images/a/b"):
        refused = run("--project", firestore_client.project, "--job", path, env=env)
        assert refused.returncode == 2 and "not a job's path" in refused.stderr and "Traceback" not in refused.stderr


def test_an_unreachable_firestore_is_said_in_a_line(unreachable_firestore):
    down = run("--project", "demo-down", env={"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]})
    assert down.returncode == 2 and down.stderr.startswith("queue_info: Firestore failed (")
    assert "Traceback" not in down.stderr
