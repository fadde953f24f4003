"""Deleting a finished job (`deleteGeneration`, firegen_core.deletion) on the real Firestore and Storage emulators:
its results and its doc go, another job's results stay, a live job is refused, and a dispatch of the deleted job
that arrives late runs nothing (the tombstone). A user's data erased (`deleteAllGenerations`,
scripts/delete_user_data.py). The web app's Delete button, through the Functions emulator, is in test_web_app.py."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.api_core.exceptions import Forbidden, PermissionDenied, RetryError

from firegen_core import deletion, lifecycle, quota
from firegen_core.claims import WorkerJobs
from firegen_core.contract import TEXT2IMAGE, parse_runsync_input
from firegen_core.dispatches import DISPATCHED_INPUTS, TOMBSTONE_DAYS, dispatches_with
from firegen_core.errors import CANCELLED, CANCELLED_MESSAGE, TIMEOUT, GenerationError
from firegen_core.jobs import JobKey, tombstone_ref
from firegen_core.quota import Limits
from listener.handler import RunsyncHandler
from listener.storage import ResultStore, RetryPolicy

sys.path.append(str(Path(__file__).resolve().parent.parent / "functions"))
import dispatch
import owner_calls

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "delete_user_data.py"

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 40
FAST = RetryPolicy(attempts=2, max_seconds=5, initial_wait=0.01, max_wait=0.05, request_timeout=5)


def request_for(uid: str, file_uid: str, **more):
    return parse_runsync_input(
        {"user_id": uid, "file_uid": file_uid, "prompt": "a lighthouse", "use_cloud_storage": True, **more}
    )


@pytest.fixture
def store(firestore_client):
    return WorkerJobs(firestore_client, worker_id="w-delete")


@pytest.fixture
def files(storage_client, bucket, storage_emulator):
    return ResultStore(storage_client, bucket.name, retry=FAST, emulator_host=storage_emulator.url)


def completed(
    store: WorkerJobs, files: ResultStore, uid: str, file_uid: str, images: int = 1, request=None, **doc
) -> JobKey:
    """A job run as a worker runs it: queued, claimed, its images uploaded, completed. `doc`: fields written on the
    queued doc first (the functions' dispatch marks)."""
    request = request or request_for(uid, file_uid, num_images_per_prompt=images)
    key = JobKey.of(request)
    store.ensure_queued(request)
    if doc:
        store.ref(key).update(doc)
    job = store.claim(key)
    assert job is not None
    urls = files.upload(uid, file_uid, TEXT2IMAGE, [(PNG, "png", "image/png")] * images)
    fields = lifecycle.success(task_type=TEXT2IMAGE, user_id=uid, file_uid=file_uid, urls=urls, seed=7)
    assert store.complete(job, fields) == lifecycle.COMPLETED
    return key


def names(bucket) -> list[str]:
    return sorted(blob.name for blob in bucket.list_blobs())


def call(firestore_client, bucket, uid, **data):
    return owner_calls.delete(firestore_client, bucket, uid=uid, data=data)


def refusal(firestore_client, bucket, uid, **data) -> tuple[str, str]:
    with pytest.raises(dispatch.CallError) as refused:
        call(firestore_client, bucket, uid, **data)
    return refused.value.code, refused.value.message


def test_a_finished_job_is_deleted_with_its_results_and_no_other_jobs(firestore_client, bucket, store, files):
    # `x` has two images, `x_1.png` and all; `x_1` is another job whose first image is `x_1.png` too, so `x`'s
    # second went to its alternate name: deleting `x` takes what `x` owns and leaves `x_1`'s image.
    other = completed(store, files, "u-del", "x_1")
    key = completed(store, files, "u-del", "x", images=2)
    assert names(bucket) == [
        "generating/u-del/image/x!1.png",
        "generating/u-del/image/x.png",
        "generating/u-del/image/x_1.png",
    ]
    reply = call(firestore_client, bucket, "u-del", fileUid="x", mediaType="images")
    assert reply == {
        "success": True,
        "fileUid": "x",
        "mediaType": "images",
        "status": "deleted",
        "message": "Generation deleted",
    }
    assert names(bucket) == ["generating/u-del/image/x_1.png"]
    assert not store.ref(key).get().exists
    assert store.ref(other).get().get("status") == lifecycle.COMPLETED
    # Deleted already (a retried call): nothing to find.
    assert refusal(firestore_client, bucket, "u-del", fileUid="x", mediaType="images") == (
        "not-found",
        "No such generation",
    )


def test_a_failed_or_cancelled_job_is_deleted_too(firestore_client, bucket, store):
    request = request_for("u-fail", "f1")
    store.ensure_queued(request)
    assert store.cancel(JobKey.of(request)).written["status"] == lifecycle.FAILED
    assert call(firestore_client, bucket, "u-fail", file_uid="f1", media_type="images")["status"] == "deleted"
    assert not store.ref(JobKey.of(request)).get().exists


@pytest.mark.parametrize("running", [False, True])
def test_a_live_job_is_refused_and_kept(firestore_client, bucket, store, files, running):
    key = JobKey.of(request_for("u-live", "l1"))
    store.ensure_queued(request_for("u-live", "l1"))
    if running:
        assert store.claim(key) is not None
        files.upload("u-live", "l1", TEXT2IMAGE, [(PNG, "png", "image/png")])  # mid-upload, as it were
    status = "processing" if running else "queued"
    assert refusal(firestore_client, bucket, "u-live", fileUid="l1", mediaType="images") == (
        "failed-precondition",
        f"Generation is {status}: cancel it first, then delete it",
    )
    assert store.ref(key).get().get("status") == status
    assert names(bucket) == (["generating/u-live/image/l1.png"] if running else [])


def test_only_the_callers_own_job_and_only_a_well_formed_call(firestore_client, bucket, store, files):
    key = completed(store, files, "u-owner", "mine")
    assert refusal(firestore_client, bucket, "u-thief", fileUid="mine", mediaType="images") == (
        "not-found",
        "No such generation",
    )
    assert refusal(firestore_client, bucket, "u-thief", fileUid="mine", mediaType="images", userId="u-owner") == (
        "permission-denied",
        "userId must be the signed-in user's uid",
    )
    assert refusal(firestore_client, bucket, None, fileUid="mine", mediaType="images") == (
        "unauthenticated",
        "Sign in to delete a generation",
    )
    assert refusal(firestore_client, bucket, "u-owner", mediaType="images") == (
        "invalid-argument",
        "fileUid is required",
    )
    assert refusal(firestore_client, bucket, "u-owner", fileUid="mine", mediaType="images", force=True) == (
        "invalid-argument",
        "Validation failed: unknown field 'force'",
    )
    assert refusal(firestore_client, None, "u-owner", fileUid="mine", mediaType="images") == (
        "unavailable",
        "Could not delete the generation; please try again",
    )  # no bucket configured: said once the call is known good
    assert store.ref(key).get().exists and names(bucket) == ["generating/u-owner/image/mine.png"]


def test_a_job_started_again_while_it_is_deleted_is_not_deleted(firestore_client, bucket, store, monkeypatch):
    # A failed job's request restated (the contract's "fix parameters and retry", same file_uid) between the
    # deletion's read and its delete: the delete is fenced on the doc as read, reads again, and refuses.
    request = request_for("u-race", "r1", num_inference_steps=40)
    key = JobKey.of(request)
    store.ensure_queued(request)
    store.fail_unclaimed(key, GenerationError("ValidationError", "too many steps"))
    marked = deletion.tombstone

    def restated_then_marked(*args, **kwargs):  # between the read and the delete's commit
        store.ensure_queued(request_for("u-race", "r1", num_inference_steps=30))
        return marked(*args, **kwargs)

    monkeypatch.setattr(deletion, "tombstone", restated_then_marked)
    with pytest.raises(deletion.NotFinished):
        deletion.delete_finished(store, bucket, key)
    assert store.ref(key).get().get("status") == lifecycle.QUEUED


def test_a_job_never_claimed_takes_no_objects_with_it(firestore_client, bucket, store, files):
    """The fencing review: a refused job's deletion deleted whatever lay under its names before its fenced delete,
    so a try of the same file_uid queued again meanwhile (the contract's "fix parameters and retry") and uploading
    lost its objects, and completed with URLs to nothing. A job never claimed has no objects of its own: the new
    try's (uploaded here, as it would be while the deletion runs) stay."""
    request = request_for("u-never", "n1", num_inference_steps=40)
    key = JobKey.of(request)
    store.ensure_queued(request)
    store.fail_unclaimed(key, GenerationError("ValidationError", "too many steps"))
    files.upload("u-never", "n1", TEXT2IMAGE, [(PNG, "png", "image/png")], claim=1)
    assert deletion.delete_finished(store, bucket, key).removed == 0
    assert names(bucket) == ["generating/u-never/image/n1.png"]


def test_a_job_a_released_try_uploaded_for_takes_its_objects(firestore_client, bucket, store, files):
    """A release gives its try back to `attempts` (0 again here): the try ran, and what it uploaded before its worker
    left is the job's, deleted with it (`quota.ran`, not `attempts`, says a worker claimed it)."""
    request = request_for("u-left", "l1")
    key = JobKey.of(request)
    store.ensure_queued(request)
    job = store.claim(key)
    files.upload("u-left", "l1", TEXT2IMAGE, [(PNG, "png", "image/png")], claim=1)
    assert store.release(job)["status"] == lifecycle.QUEUED
    assert store.cancel(key).written["status"] == lifecycle.FAILED
    assert deletion.delete_finished(store, bucket, key).removed == 1
    assert names(bucket) == []


def test_a_late_dispatch_of_a_deleted_job_runs_nothing(firestore_client, bucket, store, files):
    # The functions dispatched the job (their mark on the doc), and a warm worker's listener ran it before the
    # dispatch reached a worker; its owner deleted it; then the dispatch arrives.
    request = request_for("u-late", "d1")
    key = completed(store, files, "u-late", "d1", **{DISPATCHED_INPUTS: dispatches_with(None, request)})
    before = datetime.now(UTC)
    assert call(firestore_client, bucket, "u-late", fileUid="d1", mediaType="images")["status"] == "deleted"
    mark = tombstone_ref(firestore_client, key).get().to_dict()
    assert before + timedelta(days=TOMBSTONE_DAYS) - timedelta(minutes=1) < mark[lifecycle.EXPIRE_AT]
    submitted: list = []
    handler = RunsyncHandler(store, submit=lambda key, *_: submitted.append(key))
    data = {"user_id": "u-late", "file_uid": "d1", "prompt": "a lighthouse", "use_cloud_storage": True}
    assert handler.handle(data, "runpod-job-1") == {"error": "Generation deleted by its owner", "status": "failed"}
    assert not store.ref(key).get().exists and not submitted
    # Its mark is used up: the same request sent again is the owner's new job.
    again = handler.handle(data, "runpod-job-2")
    assert again["status"] == "accepted" and submitted == [key]
    assert store.ref(key).get().get("status") == lifecycle.QUEUED


def test_a_dispatch_arriving_as_its_job_is_deleted_runs_nothing(firestore_client, bucket, store, files, monkeypatch):
    """The accept reads the job's tombstone with its doc (one round trip): the doc found, and deleted by its owner
    before the accept's write, the write's next try found no doc and took the first read's tombstone, from before
    the deletion (a review: the job was created again, a GPU run nobody asked for). Each try has its own."""
    from google.cloud.firestore_v1.batch import WriteBatch

    request = request_for("u-race", "d1")
    key = completed(store, files, "u-race", "d1", **{DISPATCHED_INPUTS: dispatches_with(None, request)})
    commit, deleted = WriteBatch.commit, []

    def deleted_first(batch, *args, **kwargs):  # the owner's deletion lands between the accept's read and write
        if not deleted:
            deleted.append("deleting")  # the deletion's own commits pass
            deleted[0] = call(firestore_client, bucket, "u-race", fileUid="d1", mediaType="images")["status"]
        return commit(batch, *args, **kwargs)

    monkeypatch.setattr(WriteBatch, "commit", deleted_first)
    handler = RunsyncHandler(store, submit=lambda *_: None)
    data = {"user_id": "u-race", "file_uid": "d1", "prompt": "a lighthouse", "use_cloud_storage": True}
    assert handler.handle(data, "runpod-job-1") == {"error": "Generation deleted by its owner", "status": "failed"}
    assert deleted == ["deleted"] and not store.ref(key).get().exists


def test_a_job_with_no_dispatch_to_come_leaves_no_tombstone(firestore_client, bucket, store, files):
    key = completed(store, files, "u-none", "n1")  # taken by a listener: no dispatch, no RunPod job
    call(firestore_client, bucket, "u-none", fileUid="n1", mediaType="images")
    assert not tombstone_ref(firestore_client, key).get().exists


# ------------------------------------------------------------------------------------------ a user's data erased
def running_video(store: WorkerJobs, uid: str, file_uid: str):
    request = request_for(uid, file_uid, num_frames=16)
    store.ensure_queued(request)
    job = store.claim(JobKey.of(request))
    assert job is not None
    return job


def user_docs(firestore_client, uid: str) -> list[str]:
    return [
        d.id for media in ("images", "videos") for d in firestore_client.collection("generations", uid, media).get()
    ]


def test_erasing_a_user_deletes_their_jobs_files_and_usage_and_no_one_elses(firestore_client, bucket, store, files):
    completed(store, files, "u-gone", "done1", images=2)
    store.ensure_queued(request_for("u-gone", "q1"))
    job = running_video(store, "u-gone", "p1")
    # A result whose doc the TTL policy deleted first (the bucket's rule deletes files two days later).
    bucket.blob("generating/u-gone/image/old.png").upload_from_string(PNG)
    completed(store, files, "u-stays", "s1")
    first = deletion.erase_user(store, bucket, "u-gone")
    assert (first.deleted, first.stopping, first.objects, first.done) == (2, 1, 0, False)
    assert user_docs(firestore_client, "u-gone") == ["p1"]
    assert store.ref(job.key).get().get(lifecycle.CANCEL_REQUESTED) is True
    # Its worker stops it at its next step, as a worker does.
    assert store.fail(job, GenerationError(CANCELLED, CANCELLED_MESSAGE))
    second = deletion.erase_user(store, bucket, "u-gone", usage=True)  # the operator's script: the usage doc too
    assert (second.deleted, second.stopping, second.objects, second.done) == (1, 0, 1, True)
    assert user_docs(firestore_client, "u-gone") == []
    assert not store.usage_ref("u-gone").get().exists
    assert names(bucket) == ["generating/u-stays/image/s1.png"]
    assert user_docs(firestore_client, "u-stays") == ["s1"] and store.usage_ref("u-stays").get().exists


def test_a_pass_takes_on_a_bounded_number_of_jobs(firestore_client, bucket, store, files):
    for n in range(3):
        completed(store, files, "u-many", f"m{n}")
    passes = []
    while not passes or not passes[-1].done:
        passes.append(deletion.erase_user(store, bucket, "u-many", page=2))
        assert len(passes) < 5
    assert [(p.deleted, p.done) for p in passes] == [(2, False), (1, True)]
    assert names(bucket) == [] and user_docs(firestore_client, "u-many") == []


def test_a_pass_whose_time_is_spent_leaves_the_rest_to_the_next(firestore_client, bucket, store, files):
    key = completed(store, files, "u-time", "t1")
    spent = deletion.erase_user(store, bucket, "u-time", seconds=0.0)  # Storage as slow as the whole pass
    assert (spent.deleted, spent.done) == (0, False) and store.ref(key).get().exists
    assert deletion.erase_user(store, bucket, "u-time").done and names(bucket) == []


def test_the_callable_erases_the_callers_own_data_alone(firestore_client, bucket, store, files):
    completed(store, files, "u-me", "a1")
    running_video(store, "u-me", "v1")
    completed(store, files, "u-else", "b1")
    reply = owner_calls.delete_all(firestore_client, bucket, uid="u-me", data=None)
    assert reply == {
        "success": True,
        "status": "deleting",
        "deleted": 1,
        "stopping": 1,
        "message": "Deleting: 1 running generation is stopping; call again in a moment to delete it",
    }
    for data, expected in (
        ({"userId": "u-else"}, ("permission-denied", "userId must be the signed-in user's uid")),
        ({"everything": True}, ("invalid-argument", "Validation failed: unknown field 'everything'")),
        (["u-me"], ("invalid-argument", "Validation failed: the call's data must be a JSON object")),
    ):
        with pytest.raises(dispatch.CallError) as refused:
            owner_calls.delete_all(firestore_client, bucket, uid="u-me", data=data)
        assert (refused.value.code, refused.value.message) == expected
    with pytest.raises(dispatch.CallError) as refused:
        owner_calls.delete_all(firestore_client, bucket, uid=None, data={})
    assert refused.value.code == "unauthenticated"
    assert user_docs(firestore_client, "u-else") == ["b1"]


def test_the_callable_keeps_the_usage_doc_under_the_deployed_limits_and_retention(
    firestore_client, bucket, store, monkeypatch
):
    """The maintainability review: deleteAllGenerations' cancels wrote the user's usage doc with the default
    limits and a 30-day expiry, whatever USER_MAX_* and RETENTION_DAYS the functions were deployed with (the
    page's limits line then showed 20 jobs where 5 were allowed)."""
    monkeypatch.setenv("RETENTION_DAYS", "3")
    store.ensure_queued(request_for("u-limited", "q1"))
    limits = Limits(max_running=1, max_pending=5, daily_budget=50.0)
    reply = owner_calls.delete_all(firestore_client, bucket, uid="u-limited", data={}, limits=limits)
    assert reply["status"] == "deleted" and user_docs(firestore_client, "u-limited") == []
    usage = store.usage_ref("u-limited").get().to_dict()
    assert usage["limits"] == {"max_running": 1, "max_pending": 5, "daily_budget": 50.0} and usage["pending"] == 0
    assert usage["expire_at"] - quota.resets_at(datetime.now(UTC)) == timedelta(days=3)


def test_the_callable_gives_back_no_spent_budget(firestore_client, bucket, store, files):
    # The caller may go on using the app: their usage doc stays, idle, its day's spend as it was.
    completed(store, files, "u-spent", "a1")
    spent = store.usage_ref("u-spent").get().get("spent_today")
    assert spent > 0
    assert owner_calls.delete_all(firestore_client, bucket, uid="u-spent", data={}) == {
        "success": True,
        "status": "deleted",
        "deleted": 1,
        "stopping": 0,
        "message": "All your generations are deleted",
    }
    usage = store.usage_ref("u-spent").get().to_dict()
    assert (usage["spent_today"], usage["pending"], usage["running"]) == (spent, 0, 0)
    assert user_docs(firestore_client, "u-spent") == [] and names(bucket) == []


def test_a_job_created_while_a_pass_runs_keeps_its_files(firestore_client, bucket, store, files, monkeypatch):
    completed(store, files, "u-busy", "old")
    checked = deletion._has_jobs

    def then_a_new_job(*args):  # created just after the pass looked for jobs, before it sweeps the folder
        found = checked(*args)
        files.upload("u-busy", "new", TEXT2IMAGE, [(PNG, "png", "image/png")])
        return found

    monkeypatch.setattr(deletion, "_has_jobs", then_a_new_job)
    assert deletion.erase_user(store, bucket, "u-busy").deleted == 1
    assert names(bucket) == ["generating/u-busy/image/new.png"]


def test_results_in_another_bucket_leave_the_erasure_undone_and_say_so(
    firestore_client, storage_client, bucket, store, files, emulator_env
):
    completed(store, files, "u-far", "f1")
    other = storage_client.create_bucket(f"{bucket.name}-far")
    erased = deletion.erase_user(store, other, "u-far")
    assert (erased.elsewhere, erased.done) == (1, False) and user_docs(firestore_client, "u-far") == ["f1"]
    with pytest.raises(dispatch.CallError) as refused:
        owner_calls.delete_all(firestore_client, other, uid="u-far", data={})
    assert refused.value.code == "unavailable"
    completed(store, files, "u-near", "n1")  # the script goes on to the next uid
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", other.name]
    # The dry run says so too (an operators' review: "would delete 1 jobs", exit 0, then the run left it).
    ran = subprocess.run(
        [*command, "--dry-run", "u-far"],
        env={**os.environ, **emulator_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 1, ran.stderr
    assert ran.stdout.splitlines()[1:] == [
        "u-far: would delete 1 jobs (completed 1), 0 objects in all and its usage doc; 1 jobs' results are in another "
        "bucket than --bucket: they would be left"
    ]
    ran = subprocess.run(
        [*command, "u-far", "u-near"], env={**os.environ, **emulator_env}, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 1, ran.stderr
    assert said(ran, firestore_client.project, other.name, emulator_env) == [
        "u-far: 0 jobs deleted, 0 other objects; 1 jobs' results are in another bucket than --bucket: left",
        "u-near: 0 jobs deleted, 0 other objects; 1 jobs' results are in another bucket than --bucket: left",
    ]


def test_a_used_tombstone_mark_drops_none_of_its_ids(firestore_client, store):
    # A tombstone of many deletions holds more RunPod ids than a doc keeps (DISPATCHES_KEPT): using one of its
    # marks drops none, so every redelivery stays refused.
    request = request_for("u-ids", "i1")
    key = JobKey.of(request)
    ids = [f"rp{n}" for n in range(15)]
    tombstone_ref(firestore_client, key).set(
        {DISPATCHED_INPUTS: dispatches_with(None, request), "arrived_dispatches": ids}
    )
    handler = RunsyncHandler(store, submit=lambda *_: None)
    data = {"user_id": "u-ids", "file_uid": "i1", "prompt": "a lighthouse", "use_cloud_storage": True}
    assert handler.handle(data, "rp-late")["error"] == "Generation deleted by its owner"
    assert handler.handle(data, "rp0")["error"] == "Generation deleted by its owner"
    assert not store.ref(key).get().exists


def test_a_runsync_that_restated_a_job_runs_nothing_when_redelivered_after_its_deletion(
    firestore_client, bucket, store, files
):
    # `rp-2` restated the job `rp-1` brought (12 steps): RunPod delivering rp-2 again once its owner deleted the job
    # (its worker died before answering) found no doc, and no mark of rp-2 on the tombstone: the job ran again.
    data = {"user_id": "u-again", "file_uid": "a1", "prompt": "a lighthouse", "use_cloud_storage": True}
    restated = {**data, "num_inference_steps": 12}
    handler = RunsyncHandler(store, submit=lambda *_: None)
    assert handler.handle(data, "rp-1")["status"] == handler.handle(restated, "rp-2")["status"] == "accepted"
    completed(store, files, "u-again", "a1", request=parse_runsync_input(restated))
    assert call(firestore_client, bucket, "u-again", fileUid="a1", mediaType="images")["status"] == "deleted"
    for redelivered, request_id in ((restated, "rp-2"), (data, "rp-1")):
        assert handler.handle(redelivered, request_id)["error"] == "Generation deleted by its owner"
    assert not store.ref(JobKey.of(parse_runsync_input(data))).get().exists
    assert handler.handle(data, "rp-3")["status"] == "accepted"  # the owner's new request for the file_uid


def said(ran: subprocess.CompletedProcess, project: str, bucket: str, emulator_env: dict) -> list[str]:
    """The script's lines after the first, which says what it works on (checked here)."""
    hosts = f"{emulator_env['FIRESTORE_EMULATOR_HOST']}, {emulator_env['STORAGE_EMULATOR_HOST']}"
    first, *rest = ran.stdout.splitlines()
    assert first == f"delete_user_data: project {project}, bucket {bucket}, in the emulators ({hosts})"
    return rest


def test_the_script_erases_users_and_says_what_it_could_not(firestore_client, bucket, store, files, emulator_env):
    completed(store, files, "u-s1", "a1")
    completed(store, files, "u-s2", "b1")
    running_video(store, "u-s3", "c1")  # its worker never comes back to it: still stopping at the end of --wait
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name]
    env = {**os.environ, **emulator_env}
    ran = subprocess.run([*command, "u-s1", "u-s2"], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert said(ran, firestore_client.project, bucket.name, emulator_env) == [
        "u-s1: 1 jobs deleted, 0 other objects; nothing left",
        "u-s2: 1 jobs deleted, 0 other objects; nothing left",
    ]
    ran = subprocess.run([*command, "--wait", "1", "u-s3"], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr
    assert said(ran, firestore_client.project, bucket.name, emulator_env) == [
        "u-s3: 0 jobs deleted, 0 other objects; 1 running jobs still stopping after 1 s: run it again later"
    ]
    assert names(bucket) == [] and user_docs(firestore_client, "u-s3") == ["c1"]


def test_a_pass_that_stops_part_way_leaves_the_usage_doc_with_the_deployments_limits(
    firestore_client, bucket, emulator_env
):
    """The script wrote the usage doc of a queued job's cancel with its own default limits and RETENTION_DAYS: a
    user still stopping (a running job) was left with a doc that told the page "2 running at most" where the
    deployment allows 5."""
    deployed = quota.Limits(max_running=5, max_pending=30, daily_budget=1000.0)
    store = WorkerJobs(firestore_client, worker_id="w-delete", limits=deployed)
    running_video(store, "u-lim", "runs")
    store.ensure_queued(request_for("u-lim", "waits"))
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name]
    env = {**os.environ, **emulator_env, "RETENTION_DAYS": "0"}
    ran = subprocess.run([*command, "--wait", "0", "u-lim"], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr
    assert user_docs(firestore_client, "u-lim") == ["runs"]  # the queued job went, the running one stops
    usage = firestore_client.collection(quota.USAGE_COLLECTION).document("u-lim").get().to_dict()
    assert (usage["pending"], usage["limits"]) == (1, deployed.document()), usage


# ------------------------------------------------------------------------------------ what a review found
def test_the_script_refuses_one_emulator_set_a_missing_bucket_and_says_when_it_found_nothing(
    firestore_client, bucket, emulator_env
):
    """The operator-scripts review: with FIRESTORE_EMULATOR_HOST alone, the jobs were looked for in the emulator and
    the files deleted in production, "nothing left"; a misspelt bucket deleted the jobs' docs and then stopped at
    their files; a misspelt uid read as a deletion done."""
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name, "u-x"]
    env = {**os.environ, **emulator_env}
    env.pop("STORAGE_EMULATOR_HOST")
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr.strip() == (
        "delete_user_data: FIRESTORE_EMULATOR_HOST is set and STORAGE_EMULATOR_HOST is not: "
        "set both (emulators) or neither"
    )
    env = {**os.environ, **emulator_env}
    command[command.index(bucket.name)] = f"{bucket.name}-misspelt"
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    assert (
        ran.stderr.strip()
        == f"delete_user_data: no bucket {bucket.name}-misspelt in project {firestore_client.project}"
    )
    command[command.index(f"{bucket.name}-misspelt")] = bucket.name
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert said(ran, firestore_client.project, bucket.name, emulator_env) == [
        "u-x: no jobs or files found (a misspelt uid, or deleted already); nothing left"
    ]


def test_a_dry_run_counts_what_the_script_would_delete_and_deletes_nothing(
    firestore_client, bucket, store, files, emulator_env
):
    completed(store, files, "u-dry", "d1", images=2)
    running_video(store, "u-dry", "d2")
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name]
    env = {**os.environ, **emulator_env}
    ran = subprocess.run(
        [*command, "--dry-run", "u-dry", "u-none"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    hosts = f"{emulator_env['FIRESTORE_EMULATOR_HOST']}, {emulator_env['STORAGE_EMULATOR_HOST']}"
    assert ran.stdout.splitlines() == [
        f"delete_user_data: project {firestore_client.project}, bucket {bucket.name}, in the emulators ({hosts}) "
        "(dry run: nothing is written)",
        "u-dry: would delete 2 jobs (completed 1, processing 1), 2 objects in all and its usage doc",
        "u-none: no jobs or files found",
    ]
    assert sorted(user_docs(firestore_client, "u-dry")) == ["d1", "d2"] and len(names(bucket)) == 2
    assert lifecycle.CANCEL_REQUESTED not in store.ref(JobKey("u-dry", "videos", "d2")).get().to_dict()


def test_passes_that_get_nowhere_end_within_the_wait(store, bucket, monkeypatch):
    """A diff review: with the wait counted only once running jobs were all that was left, passes that got nowhere
    (Storage slow or away: each pass's time spent, nothing done) went on until Ctrl-C. A stand-in for such a pass:
    the emulators cannot be made to hang."""
    import importlib.util
    import threading

    spec = importlib.util.spec_from_file_location("delete_user_data", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "erase_user", lambda *args, **kwargs: deletion.Erasure())
    monkeypatch.setattr(script, "POLL_SECONDS", 0.01)
    ended: list = []
    runs = threading.Thread(target=lambda: ended.append(script.erase(store, bucket, "u-stuck", wait=0.2)), daemon=True)
    runs.start()
    runs.join(30)
    assert ended and not ended[0].done and not ended[0].stopping


def test_a_usage_doc_whose_counts_no_job_backs_is_deleted_not_waited_on(firestore_client, bucket, store):
    """The operator-scripts review: a usage doc still counting a job none of the user's docs is (an older release's
    drift) kept the script passing until its --wait ran out, saying a running job was "still stopping"."""
    firestore_client.collection(quota.USAGE_COLLECTION).document("u-stale").set({"pending": 1, "running": 1})
    erased = deletion.erase_user(store, bucket, "u-stale", usage=True)
    assert erased.done and not store.usage_ref("u-stale").get().exists


def test_results_in_another_bucket_are_no_reason_to_delete_the_doc(
    firestore_client, storage_client, bucket, store, files
):
    # The functions' bucket is not the workers' (STORAGE_BUCKET unset, the default bucket another): an empty
    # bucket is not taken for a job whose files are all gone.
    key = completed(store, files, "u-where", "w1")
    other = storage_client.create_bucket(f"{bucket.name}-other")
    assert refusal(firestore_client, other, "u-where", fileUid="w1", mediaType="images") == (
        "unavailable",
        "Could not delete the generation; please try again",
    )
    assert store.ref(key).get().exists and names(bucket) == ["generating/u-where/image/w1.png"]


def test_an_object_of_a_release_before_owner_metadata_is_no_other_jobs_to_delete(
    firestore_client, bucket, store, files
):
    # `x_1.png` without owner metadata (written before it existed) is image 0 of job `x_1` as much as image 1 of
    # `x`: a job `x` of one image, or a failed one, takes none of it.
    legacy = "generating/u-old/image/x_1.png"
    bucket.blob(legacy).upload_from_string(PNG)
    completed(store, files, "u-old", "x")
    store.ensure_queued(request_for("u-old", "y", num_images_per_prompt=2))
    assert store.cancel(JobKey("u-old", "images", "y")).written["status"] == lifecycle.FAILED
    bucket.blob("generating/u-old/image/y_1.png").upload_from_string(PNG)  # likewise for a failed job
    for file_uid in ("x", "y"):
        assert call(firestore_client, bucket, "u-old", fileUid=file_uid, mediaType="images")["status"] == "deleted"
    assert names(bucket) == [legacy, "generating/u-old/image/y_1.png"]


def test_storage_past_the_deletions_time_leaves_the_job_to_delete_again(
    firestore_client, bucket, store, files, monkeypatch
):
    key = completed(store, files, "u-slow", "s1")
    monkeypatch.setattr(deletion, "STORAGE_BUDGET", 0.0)  # Storage as slow as the whole budget
    assert refusal(firestore_client, bucket, "u-slow", fileUid="s1", mediaType="images") == (
        "unavailable",
        "Could not delete the generation; please try again",
    )
    assert store.ref(key).get().exists


def test_a_job_deleted_twice_under_one_file_uid_keeps_both_tombstones(firestore_client, bucket, store, files):
    first = request_for("u-twice", "t1")
    key = completed(store, files, "u-twice", "t1", **{DISPATCHED_INPUTS: dispatches_with(None, first)})
    call(firestore_client, bucket, "u-twice", fileUid="t1", mediaType="images")
    second = request_for("u-twice", "t1", num_inference_steps=20)  # the owner's new job, under the same file_uid
    completed(store, files, "u-twice", "t1", request=second, **{DISPATCHED_INPUTS: dispatches_with(None, second)})
    call(firestore_client, bucket, "u-twice", fileUid="t1", mediaType="images")
    handler = RunsyncHandler(store, submit=lambda *_: None)
    for late in (first, second):  # both dispatches arrive late: neither runs
        data = {"user_id": "u-twice", "file_uid": "t1", "use_cloud_storage": True, **late.parameters()}
        assert handler.handle(data, None)["error"] == "Generation deleted by its owner"
    assert not store.ref(key).get().exists


class DeletedDuringUpload:
    """The real ResultStore; while this try uploads, its job ends (the heartbeat's `Timeout`, or another try) and
    its owner deletes it."""

    def __init__(self, results, store, bucket, job):
        self.results, self.store, self.bucket, self.job = results, store, bucket, job

    def upload(self, user_id, file_uid, task_type, files, **kwargs):
        assert self.store.fail(self.job, GenerationError(TIMEOUT, "Generation took too long"))
        assert deletion.delete_finished(self.store, self.bucket, self.job.key) is not None
        return self.results.upload(user_id, file_uid, task_type, files, **kwargs)

    def __getattr__(self, name):
        return getattr(self.results, name)


def test_an_upload_that_lands_after_its_job_was_deleted_is_removed(firestore_client, bucket, store, files):
    from test_reconciler import StubGenerator

    from listener.runner import JobRunner

    other = completed(store, files, "u-up", "keep")  # another job of the user's: left alone
    request = request_for("u-up", "late", num_images_per_prompt=2)
    store.ensure_queued(request)
    job = store.claim(JobKey.of(request))
    runner = JobRunner(store, StubGenerator(), DeletedDuringUpload(files, store, bucket, job))
    assert runner.run(job) == "lost"
    assert names(bucket) == ["generating/u-up/image/keep.png"]
    assert not store.ref(job.key).get().exists and store.ref(other).get().exists


class FailedDuringUpload:
    """The real ResultStore; while this try uploads, another writer fails its job: the functions' sweep giving it
    up (its lease expired, this worker stalled), written as the sweep writes it, no claim's."""

    def __init__(self, results, store, job):
        self.results, self.store, self.job = results, store, job

    def upload(self, user_id, file_uid, task_type, files, **kwargs):
        given_up = GenerationError("Timeout", "No worker took the job")
        failure = lifecycle.failure(given_up, user_id=user_id, file_uid=file_uid)
        assert self.store.transition(self.job.key, lambda doc, now: failure).applied
        return self.results.upload(user_id, file_uid, task_type, files, **kwargs)

    def __getattr__(self, name):
        return getattr(self.results, name)


def test_an_upload_that_lands_after_another_failed_its_job_is_removed(firestore_client, bucket, store, files):
    """The fencing review: only a deleted job's late objects went; a job failed meanwhile by another writer kept
    them, named by no doc, in the bucket for good."""
    from test_reconciler import StubGenerator

    from listener.runner import JobRunner

    other = completed(store, files, "u-gone", "keep")  # another job of the user's: left alone
    request = request_for("u-gone", "given-up", num_images_per_prompt=2)
    store.ensure_queued(request)
    job = store.claim(JobKey.of(request))
    assert JobRunner(store, StubGenerator(), FailedDuringUpload(files, store, job)).run(job) == "lost"
    assert names(bucket) == ["generating/u-gone/image/keep.png"]
    doc = store.ref(job.key).get().to_dict()
    assert (doc["status"], doc["error_message"]) == ("failed", "No worker took the job")
    assert store.ref(other).get().exists


def test_firestore_failing_a_pass_is_said_not_taken_for_a_pass_out_of_time(
    firestore_client, bucket, store, files, monkeypatch
):
    # Firestore away (its retries given up) while the pass still has time: the call fails (`unavailable`), rather
    # than answering "call again to delete the rest" for as long as the outage lasts.
    completed(store, files, "u-away", "a1")

    def away(*args, **kwargs):
        raise RetryError("Timeout of 15.0s exceeded", None)

    monkeypatch.setattr(deletion, "delete_finished", away)
    with pytest.raises(RetryError):
        deletion.erase_user(store, bucket, "u-away")
    with pytest.raises(dispatch.CallError) as refused:
        owner_calls.delete_all(firestore_client, bucket, uid="u-away", data={})
    assert (refused.value.code, refused.value.message) == (
        "unavailable",
        "Could not delete the generation; please try again",
    )


@pytest.mark.parametrize(
    "denied, grant",
    [
        (PermissionDenied("Missing or insufficient permissions."), "roles/datastore.user"),
        (Forbidden("storage.objects.delete denied"), "roles/storage.objectUser on the bucket"),
    ],
)
def test_a_permission_the_functions_lack_is_named_for_the_operator(bucket, denied, grant, caplog):
    # IAM cannot run on the emulators: the refusals are raised as Firestore's and Storage's clients raise them.
    with pytest.raises(dispatch.CallError) as refused, owner_calls._deleting_in(bucket):
        raise denied
    assert refused.value.code == "unavailable"
    [record] = [r for r in caplog.records if r.msg == "delete_forbidden"]
    assert (record.levelname, record.grant) == ("ERROR", grant)


def test_files_of_a_user_the_project_knows_nothing_of_are_left_unless_asked(
    firestore_client, bucket, store, files, emulator_env
):
    """The operators' review: a --project that was not the bucket's found no job of the user's, and the sweep of
    their folder deleted every file of theirs ("nothing left", exit 0), their docs in the right project left
    pointing at nothing. A user the project knows (a job, a tombstone, a usage doc) is deleted as before."""
    completed(store, files, "u-here", "h1")
    bucket.blob("generating/u-there/image/t1.png").upload_from_string(b"another project's result")
    # STORAGE_EMULATOR_HOST without its scheme, as README "Configuration" allows (before: a traceback).
    env = {**os.environ, **emulator_env}
    env["STORAGE_EMULATOR_HOST"] = env["STORAGE_EMULATOR_HOST"].removeprefix("http://")
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name]
    for extra in (["--dry-run"], []):
        ran = subprocess.run(
            [*command, *extra, "u-there", "u-here"], env=env, capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 1, ran.stderr
        lines = ran.stdout.splitlines()[1:]
        assert lines[0] == (
            "u-there: 1 files under generating/u-there/ in the bucket, and nothing of theirs in project "
            f"{firestore_client.project} (is --project the bucket's?): left; --files-without-jobs deletes them"
        )
        assert lines[1].startswith("u-here: would delete 1 jobs" if extra else "u-here: 1 jobs deleted")
    assert names(bucket) == ["generating/u-there/image/t1.png"]
    ran = subprocess.run(
        [*command, "--files-without-jobs", "u-there"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[1:] == ["u-there: 0 jobs deleted, 1 other objects; nothing left"]
    assert names(bucket) == []


def test_a_dry_run_says_a_uid_it_could_not_count_and_goes_on(firestore_client, bucket, emulator_env):
    """A review: `--dry-run a/b u` ended in a traceback at `a/b` and never counted `u` (the real run went on)."""
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name]
    env = {**os.environ, **emulator_env}
    ran = subprocess.run([*command, "--dry-run", "a/b", "u-fine"], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
    first, second = ran.stdout.splitlines()[1:]
    assert first.startswith("a/b: not counted: ValueError: ") and second == "u-fine: no jobs or files found"


def test_an_unreachable_storage_is_said_in_a_line(firestore_client, bucket, emulator_env):
    """A review: Storage unreachable held the script up two minutes in silence, then a traceback."""
    command = [sys.executable, str(SCRIPT), "--project", firestore_client.project, "--bucket", bucket.name, "u-x"]
    env = {**os.environ, **emulator_env, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"}
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert ran.stderr.startswith("delete_user_data: Storage failed (")
