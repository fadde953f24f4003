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

WITHIN = timedelta(seconds=30)
NOBODY = "  workers up: none"


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


def beat(client, worker_id: str, *, busy: int, slots: int = 1, **more) -> None:
    started = datetime.now(UTC) - timedelta(hours=2, minutes=5)
    workers.beat(client, worker_id, busy=busy, concurrency=slots, started_at=started, **more)


def lines_of(client, key: JobKey) -> list[str] | None:
    return queue_info.job_lines(client, key, datetime.now(UTC), WITHIN)


def test_ago_says_a_duration_as_a_person_does():
    said = [queue_info.ago(timedelta(seconds=s)) for s in (-3, 0, 4, 60, 200, 3600, 7500, 86400 + 3 * 3600 + 59)]
    assert said == ["0 s", "0 s", "4 s", "1 min", "3 min 20 s", "1 h", "2 h 5 min", "1 d 3 h"]


def test_a_worker_is_up_for_three_of_its_beats_and_at_least_30_s():
    assert [queue_info.silent_after(beat) for beat in (10, 60, 0.5, "x", None, float("nan"), -1)] == [
        timedelta(seconds=seconds) for seconds in (30, 180, 30, 30, 30, 30, 30)
    ]
    assert queue_info.up_within({}) == timedelta(seconds=30)
    assert queue_info.up_within({"SWEEP_INTERVAL_SECONDS": "60"}) == timedelta(seconds=180)
    assert queue_info.up_within({"SWEEP_INTERVAL_SECONDS": "1"}) == timedelta(seconds=30)
    assert queue_info.up_within({"SWEEP_INTERVAL_SECONDS": "soon"}) == timedelta(seconds=30)


def test_the_summary_counts_each_media_types_jobs_names_the_busiest_users_and_the_workers(store, firestore_client):
    # An app's own collections of the same names, older, are no jobs: neither counted nor named the oldest.
    long_ago = datetime.now(UTC) - timedelta(days=3)
    firestore_client.document("albums/a0/images/p0").set({"status": "queued", "created_at": long_ago})
    firestore_client.document("albums/a0/videos/p1").set({"status": "processing", "lease_expires_at": long_ago})
    first, *_ = queue(store, "images", "u1", "a", "b", "c")
    queue(store, "images", "u2", "d")
    queue(store, "videos", "u2", "v")
    assert store.claim(first) is not None  # u1 at USER_MAX_RUNNING=1: the others wait
    gone = store.claim(JobKey("u2", "videos", "v"))
    firestore_client.document(gone.key.path).update({"lease_expires_at": datetime.now(UTC) - timedelta(minutes=3)})
    beat(firestore_client, "w-busy", busy=1, finished=4, code_version="c1")
    beat(firestore_client, "w-paused", busy=0, slots=2, claims_paused="storage")
    beat(firestore_client, "w-left", busy=0, finished=2)
    workers.leave(firestore_client, "w-left", finished=2)
    firestore_client.document("workers/w-dead").set({"seen_at": datetime.now(UTC) - timedelta(seconds=45), "busy": 1})
    # One that beats every minute (its doc says so) is up 45 s after its last beat; one of an older release, which
    # says nothing, is read by SWEEP_INTERVAL_SECONDS here.
    beat(firestore_client, "w-slow", busy=0, beat_seconds=60)
    firestore_client.document("workers/w-slow").update({workers.SEEN_AT: datetime.now(UTC) - timedelta(seconds=45)})

    lines = queue_info.summary(firestore_client, datetime.now(UTC), WITHIN)
    images, videos, users, up, silent, left = lines
    assert images.startswith("images: 3 queued (the oldest for ") and images.endswith(
        ": generations/u1/images/b), 1 processing"
    ), images
    assert (
        videos
        == "videos: nothing queued, 1 processing, 1 of them past their lease (their worker gone: a worker takes them over)"
    )
    assert users == (
        "users with jobs pending: 2 (the most first: u1 3 pending, 1 of 1 running; u2 2 pending, 1 of 1 running)"
    )
    assert up.startswith("workers up: w-")
    busy = next(part for part in up.split("; ") if "w-busy (" in part)
    assert busy.endswith("1 generation slot, 1 job in hand, 4 jobs finished, up 2 h 5 min, code c1)"), busy
    assert "w-paused (last beat " in up and "2 generation slots, 0 jobs in hand" in up
    assert "w-slow (last beat 45 s ago, 1 generation slot, 0 jobs in hand" in up
    assert up.endswith("claims paused: storage failing)") or "claims paused: storage failing)" in up
    assert silent.startswith("workers gone silent: w-dead (last beat 45 s ago: killed, or its machine gone")
    assert left.startswith("workers that left: w-left (left ") and left.endswith(" ago, 2 jobs finished)")


def test_a_queued_job_behind_its_users_running_one_says_why(store, firestore_client):
    queue(store, "images", "u0", "z")  # another user's, older: not among its user's own ahead of it
    first, second, third = queue(store, "images", "u1", "a", "b", "c")
    assert store.claim(first) is not None
    dispatched = {
        lifecycle.DISPATCH_COUNT: 2,
        "dispatched_by": "scheduler",
        "runpod_job_id": "rp-9",
        lifecycle.DISPATCH_ERROR: "check RUNPOD_ENDPOINT_ID",
    }
    firestore_client.document(third.path).update(dispatched)
    lines = lines_of(firestore_client, third)
    assert lines[0].startswith("generations/u1/images/c: queued for ")
    assert lines[1:] == [
        "  its user: u1 3 pending, 1 of 1 running",
        "  dispatched 2 times, last by the scheduler (RunPod job rp-9); why its last dispatch woke no worker: "
        "check RUNPOD_ENDPOINT_ID",
        "  it waits for one of its user's 1 running job to end (USER_MAX_RUNNING)",
        "  1 of its user's own queued images ahead of it (each user's oldest first)",
        NOBODY,
    ]
    assert lines_of(firestore_client, second)[2].startswith("  not dispatched yet: a worker up takes it")


def test_a_queued_job_under_its_users_limits_waits_for_a_worker_or_a_free_slot(store, firestore_client):
    mine, theirs = queue(store, "images", "u1", "a"), queue(store, "images", "u2", "b")
    firestore_client.document("albums/a0/images/p0").set({"status": "queued"})  # an app's own: no job
    assert lines_of(firestore_client, mine[0])[3:] == [
        "  no worker is up: it runs once one starts (on RunPod, a dispatch starts one)",
        NOBODY,
    ]
    beat(firestore_client, "w-full", busy=1)
    assert lines_of(firestore_client, mine[0])[3] == (
        "  every worker up has its slots full: it waits for a free one, with 1 other queued images (each user's "
        "oldest first)"
    )
    beat(firestore_client, "w-free", busy=0, slots=2)
    assert lines_of(firestore_client, theirs[0])[3] == (
        "  a worker up has a free slot: it takes the job at its next sweep (SWEEP_INTERVAL_SECONDS)"
    )


def test_a_running_a_finished_and_a_missing_job(store, firestore_client):
    running, done = queue(store, "images", "u1", "a", "b")
    claimed = store.claim(running)
    store.renew(claimed, progress=0.4)
    lines = lines_of(firestore_client, running)
    assert lines[0].startswith("generations/u1/images/a: processing, 40%, by worker w-busy (try 1); its lease runs ")
    assert lines[1:] == ["  its user: u1 2 pending, 1 of 1 running", NOBODY]  # no dispatch advice: it runs
    firestore_client.document(running.path).update({lifecycle.CANCEL_REQUESTED: True})
    lines = lines_of(firestore_client, running)
    assert lines[1] == "  its owner asked to cancel it: it ends at its next step (or at once, queued)"
    lapsed = datetime.now(UTC) - timedelta(seconds=90)
    firestore_client.document(running.path).update({lifecycle.CANCEL_REQUESTED: False, "lease_expires_at": lapsed})
    assert lines_of(firestore_client, running)[0].endswith(
        "; its lease ran out 1 min 30 s ago: its worker is gone, a worker takes it over"
    )
    firestore_client.document(running.path).update({"lease_expires_at": datetime.now(UTC) + timedelta(minutes=2)})
    result = lifecycle.success(task_type="text2image", user_id="u1", file_uid="a", urls=["https://x/a.png"], seed=1)
    assert store.complete(claimed, result) == lifecycle.COMPLETED
    [completed] = lines_of(firestore_client, running)
    assert completed.startswith("generations/u1/images/a: completed ") and completed.endswith(" ago")
    assert store.cancel(done).applied
    [failed] = lines_of(firestore_client, done)
    assert failed.startswith("generations/u1/images/b: failed ") and failed.endswith(
        ": Cancelled: Cancelled by the user"
    )
    assert lines_of(firestore_client, JobKey("u1", "videos", "nothing")) is None


def test_hand_written_docs_of_odd_shapes_are_said_as_they_are(firestore_client):
    stuck = JobKey("u1", "images", "stuck")
    odd = {"status": "processing", "lease_expires_at": "soon", "progress": 7.5, "worker_id": None}
    firestore_client.document(stuck.path).set(odd)
    firestore_client.document("usage/u1").set({"running": 1, "pending": 2, "limits": {"max_running": "2"}})
    assert lines_of(firestore_client, stuck) == [
        "generations/u1/images/stuck: processing, 100%, by worker (none named); no readable lease: a worker's scan "
        "for such jobs takes it over (within 5 min)",
        "  its user: u1 2 pending, 1 running",  # a limit that is no number is not said
        NOBODY,
    ]
    paused, bare = JobKey("u1", "images", "paused"), JobKey("u1", "images", "bare")
    firestore_client.document(paused.path).set({"status": "paused", lifecycle.DISPATCH_COUNT: 0})
    firestore_client.document(bare.path).set({"status": "failed"})
    assert lines_of(firestore_client, paused) == [
        "generations/u1/images/paused: status 'paused', which no worker reads (the contract's: queued, processing, "
        "completed, failed)"
    ]
    assert lines_of(firestore_client, bare) == ["generations/u1/images/bare: failed"]


def run(*args: str, env: dict[str, str], shell_tail: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args]
    if shell_tail:  # through a pipe, as an operator reads it
        command = ["bash", "-c", " ".join(f"'{part}'" for part in command) + shell_tail]
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_the_command_prints_the_summary_and_one_job_and_refuses_a_path_that_is_no_jobs(firestore_client):
    env = {"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]}
    project = firestore_client.project
    done = run("--project", project, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"queue_info: project {project}, in the emulator at {env['FIRESTORE_EMULATOR_HOST']}",
        "images: nothing queued, 0 processing",
        "videos: nothing queued, 0 processing",
        "users with jobs pending: none",
        "workers up: none",
    ]
    piped = run("--project", project, env=env, shell_tail=" | head -1")
    assert piped.returncode == 0 and piped.stdout.startswith("queue_info: project ") and piped.stderr == ""
    missing = run("--project", project, "--job", "generations/u1/images/none", env=env)
    assert missing.returncode == 1 and missing.stdout.splitlines()[1].endswith(
        ": no such job (never written, deleted by its owner, or its retention ended)"
    )
    paths = (
        "users/u1/images/a",
        "generations//images/a",
        "generations/u1/images/a/b",
        "",
        "generations/__x__/images/a",
    )
    for path in (*paths, "generations/u1/images/.."):
        refused = run("--project", project, "--job", path, env=env)
        assert refused.returncode == 2 and "not a job's path" in refused.stderr and "Traceback" not in refused.stderr


def test_an_unreachable_firestore_is_said_in_a_line(unreachable_firestore):
    down = run("--project", "demo-down", env={"FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"]})
    assert down.returncode == 2 and down.stderr.startswith("queue_info: Firestore failed (")
    assert "Traceback" not in down.stderr


def test_a_doc_its_client_wrote_is_not_yet_admitted(firestore_client):
    written = JobKey("u3", "videos", "w")
    firestore_client.document(written.path).set({"status": "queued", "created_at": datetime.now(UTC), "prompt": "x"})
    assert lines_of(firestore_client, written)[1:4] == [
        "  its user: u3 0 pending, 0 running",
        "  not dispatched yet: a worker up takes it from the queue itself; else dispatchQueuedJob (or the callable) "
        "should have (its log, where it did not), and the scheduled sweep dispatches it within "
        "REDISPATCH_AFTER_MINUTES",
        "  not yet admitted against its user's limits: the worker that claims it admits it",
    ]
