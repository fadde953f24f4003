"""Cancellation, deadlines and the release limit (issue #11, points 3 and 4), with real workers on the
emulators. The rules cases for the client's cancel update are in test_rules.py (test_cancel_update)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fixtures_scheduling import (  # noqa: F401  (fixtures)
    StepGenerator,
    StubGenerator,
    finished,
    queue_jobs,
    read,
    results,
    sched_worker,
    wait_until,
)

from firegen_core.claims import WorkerJobs
from firegen_core.deadline import Deadline
from firegen_core.jobs import JobKey
from listener.storage_outage import StorageOutage

sys.path.append(str(Path(__file__).resolve().parent.parent / "functions"))
import dispatch
import owner_calls

CANCELLED = ("failed", True, False, "Cancelled", "Cancelled by the user")


def outcome(doc: dict) -> tuple:
    return doc["status"], doc["error"], doc["generated"], doc["error_type"], doc["error_message"]


def objects(bucket) -> list[str]:
    return sorted(blob.name for blob in bucket.list_blobs())


@pytest.fixture
def events(monkeypatch):
    """The reconciler's, the runner's and its leases' events (loggers made inside the capture, as test_reconciler's
    runner_logs), as (event, file_uid, during)."""
    import structlog

    import listener.admission as admission_module
    import listener.lease as lease_module
    import listener.listeners as listeners_module
    import listener.reconciler as reconciler_module
    import listener.runner as runner_module

    with structlog.testing.capture_logs() as logs:
        modules = (reconciler_module, listeners_module, admission_module, runner_module, lease_module)
        for module in modules:
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield logs


def cancel_events(logs: list[dict]) -> list[tuple]:
    said = [e for e in logs if e["event"] in ("job_cancel_requested", "job_cancelled")]
    return [(e["event"], e["file_uid"], e.get("during")) for e in said]


def cancel(client, key: JobKey) -> None:
    """What the client does: updateDoc(ref, {cancel_requested: true}) (allowed by firestore.rules)."""
    client.document(key.path).update({"cancel_requested": True})


# ---------------------------------------------------------------------------------------------- by the client
def test_a_cancelled_queued_job_never_runs(sched_worker, firestore_client, events):
    generator = StubGenerator(threading.Event())
    sched_worker("w", generator, sweep=30)  # the listeners alone
    running, waiting = JobKey("u1", "images", "running"), JobKey("u1", "images", "waiting")
    queue_jobs(firestore_client, [running])
    assert generator.started.wait(15)
    queue_jobs(firestore_client, [waiting])
    cancel(firestore_client, waiting)
    # Failed at once, while the worker's only slot is still busy.
    assert outcome(wait_until(lambda: finished(firestore_client, waiting), timeout=10)) == CANCELLED
    assert read(firestore_client, running)["status"] == "processing"
    generator.gate.set()
    assert wait_until(lambda: finished(firestore_client, running))["status"] == "completed"
    assert generator.calls == ["running"]
    assert cancel_events(events) == [("job_cancelled", "waiting", "queue")]


def test_a_running_job_stops_at_its_next_step_and_frees_the_slot(sched_worker, firestore_client, bucket, events):
    """Within seconds (10.6 ms at p50 on an idle machine: `make bench`), not at the lease's next renewal (10 s)."""
    generator = StepGenerator(threading.Event())  # holds each job, reporting progress at every "step"
    worker = sched_worker("w", generator)
    running, next_job = JobKey("u1", "images", "long"), JobKey("u2", "images", "next")
    queue_jobs(firestore_client, [running])
    assert generator.started.wait(15)
    queue_jobs(firestore_client, [next_job])
    asked = time.monotonic()
    cancel(firestore_client, running)
    doc = wait_until(lambda: finished(firestore_client, running), timeout=5)
    assert time.monotonic() - asked < 5.0  # wall clock, under the parallel suite's load
    assert outcome(doc) == CANCELLED and doc["cancel_requested"] is True
    wait_until(lambda: "next" in generator.calls)  # the slot went to the next job
    generator.gate.set()
    assert wait_until(lambda: finished(firestore_client, next_job))["status"] == "completed"
    assert objects(bucket) == ["generating/u2/image/next.png"]  # nothing of the cancelled job
    assert worker.wait_idle(5)
    # A cancel mid-run is said as asked, and ends as the job's failure (job_failed, Cancelled).
    assert cancel_events(events) == [("job_cancel_requested", "long", None)]
    [failed] = [e for e in events if e["event"] == "job_failed"]
    assert (failed["file_uid"], failed["error_type"]) == ("long", "Cancelled")
    # A run's failure has its task type and time, as README "Logs" says (an audit: a cancel's had neither).
    assert failed["task_type"] == "text2image" and 0 < failed["seconds"] < 60


def test_a_cancel_the_listener_missed_stops_the_run_at_its_next_lease_renewal(
    sched_worker, firestore_client, events, monkeypatch
):
    """The cancel listener holds CANCEL_LIMIT requests, in no order: past that (many users cancelling queued jobs
    at once) a running job's request may be outside its window. The renewal reads the doc anyway: the run stops a
    beat later, not at its end, charged in full (the fencing review)."""
    from listener.listeners import Listeners

    # A window that holds none of this job's: the full window stood for by a query of a collection with no docs.
    monkeypatch.setattr(Listeners, "_cancel_requests", lambda self, media: self.store.cancelling("nothing"))
    generator = StubGenerator(threading.Event())  # holds the job, reporting progress at every "step"
    sched_worker("w", generator, lease=3.0)  # a renewal each second
    key = JobKey("u1", "images", "missed")
    queue_jobs(firestore_client, [key])
    assert generator.started.wait(15)
    cancel(firestore_client, key)
    doc = wait_until(lambda: finished(firestore_client, key), timeout=15)
    assert outcome(doc) == CANCELLED
    [heard] = [e for e in events if e["event"] == "job_cancel_requested"]
    assert (heard["file_uid"], heard["heard"]) == ("missed", "lease renewal")
    assert not generator.gate.is_set()  # stopped, not run to its end


class CancelDuringUpload:
    """The real ResultStore; the owner's cancel lands while the results are being uploaded."""

    def __init__(self, results, client):
        self.results, self.client = results, client

    def upload(self, user_id, file_uid, task_type, files, **kwargs):
        urls = self.results.upload(user_id, file_uid, task_type, files, **kwargs)
        cancel(self.client, JobKey(user_id, "images", file_uid))
        return urls

    def remove(self, *args):
        return self.results.remove(*args)

    def remove_beyond(self, *args):
        return self.results.remove_beyond(*args)


class FirstFileThenDeleted:
    """The real ResultStore; the job's first file lands, then its owner deletes the job and the worker hears it as a
    stop before the second is written: the upload's window (the runner's `until`) closes, and it stops."""

    def __init__(self, results, client, key: JobKey, stop: threading.Event):
        self.results, self.client, self.key, self.stop = results, client, key, stop

    def upload(self, user_id, file_uid, task_type, files, **kwargs):
        self.results.upload(user_id, file_uid, task_type, files[:1], **kwargs)
        self.client.document(self.key.path).delete()
        self.stop.set()
        return self.results.upload(user_id, file_uid, task_type, files, **kwargs)

    def remove_written(self, *args):
        return self.results.remove_written(*args)


def test_an_upload_stopped_for_a_job_no_longer_its_claims_removes_what_it_wrote(firestore_client, results, bucket):
    """A review: an upload cut short once the job was no longer the claim's (deleted, taken over, restated) left the
    files it had written (before the cut, the upload went on, and its completion, refused, removed them)."""
    from listener.runner import JobRunner

    key = JobKey("u1", "images", "deleted-mid-upload")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w")
    stop = threading.Event()
    uploads = FirstFileThenDeleted(results, firestore_client, key, stop)
    assert JobRunner(store, StubGenerator(), uploads, renew_interval=100).run(store.claim(key), stop) == "lost"
    assert objects(bucket) == []


class DeletedOnceUploaded(FirstFileThenDeleted):
    """The real ResultStore; every file lands, then its owner deletes the job before its completion is written."""

    def upload(self, user_id, file_uid, task_type, files, **kwargs):
        urls = self.results.upload(user_id, file_uid, task_type, files, **kwargs)
        self.client.document(self.key.path).delete()
        return urls


def test_a_job_deleted_before_its_completion_is_said_deleted_and_its_files_go(
    firestore_client, results, bucket, events
):
    """Its completion found no doc: before, `job_lost` said "lease taken over during the upload" (a WARNING) of a job
    its owner deleted; now the doc's word (`lifecycle.lost_to`), at INFO, and what the try wrote is removed."""
    from listener.runner import JobRunner

    key = JobKey("u1", "images", "deleted-before-completion")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w")
    uploads = DeletedOnceUploaded(results, firestore_client, key, threading.Event())
    assert JobRunner(store, StubGenerator(), uploads, renew_interval=100).run(store.claim(key)) == "lost"
    wait_until(lambda: objects(bucket) == [])
    [lost] = [e for e in events if e["event"] == "job_lost"]
    assert (lost["log_level"], lost["reason"], lost["when"]) == ("info", "deleted", "during its upload")


def test_a_cancel_during_the_upload_removes_the_partial_results(firestore_client, results, bucket, events):
    from listener.runner import JobRunner

    key = JobKey("u1", "images", "uploading")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w")
    job = store.claim(key)
    assert JobRunner(store, StubGenerator(), CancelDuringUpload(results, firestore_client)).run(job) == "failed"
    assert outcome(read(firestore_client, key)) == CANCELLED
    assert objects(bucket) == []
    assert cancel_events(events) == [("job_cancelled", "uploading", "upload")]


class SlowRenewals(WorkerJobs):
    """Lease renewals answered after 2.5 s (a stand-in for a distant Firestore): the renewal of a job's progress 1,
    sent at its last step, has not landed when its upload ends."""

    def renew(self, job, progress=None):
        time.sleep(2.5)  # past the completion's wait for it (QUIET_WAIT_SECONDS)
        return super().renew(job, progress=progress)


def test_a_cancel_once_its_results_are_readable_is_charged_the_whole_estimate(firestore_client, results, bucket):
    """The security review: a client that cancelled its job as its first image appeared in the bucket (its owner may
    read it there before the doc says `completed`) kept the images and was charged the 0.29 GPU-seconds the try
    had run, not their 1.05. A try stopped during its upload is charged its whole estimate, as its completion would
    have been: its end says progress 1."""
    from listener.runner import JobRunner

    key = JobKey("u1", "images", "cancel-at-first-object")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2)
    store = SlowRenewals(firestore_client, worker_id="w")
    job = store.claim(key)
    estimate = read(firestore_client, key)["cost"]
    uploads = CancelDuringUpload(results, firestore_client)
    assert JobRunner(store, StubGenerator(), uploads, renew_interval=100).run(job) == "failed"
    ended = read(firestore_client, key)
    assert outcome(ended) == CANCELLED
    assert ended["cost"] == ended["stopped_cost"] == estimate > 1 and ended["progress"] == 1
    assert objects(bucket) == []


def test_a_cancelled_job_its_heartbeat_ends_past_its_deadline_after_its_denoising_pays_its_whole_estimate(
    firestore_client,
):
    """Its denoising over, a job stuck in its encode or upload past its deadline, its owner's cancel heard, is
    failed `Cancelled` by its heartbeat with progress 1 (`lifecycle.DELIVERED`), as a run stopped in its upload
    ends: charged its whole estimate (its results may be readable). Before, that end said nothing of its progress,
    and the cancel was charged the time the try had run."""
    from firegen_core.errors import TIMEOUT, GenerationError
    from listener.lease import Heartbeat, RunOutcome

    key = JobKey("u1", "images", "stuck-after-denoising")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2)
    store = WorkerJobs(firestore_client, worker_id="w")
    job = store.claim(key)
    estimate = read(firestore_client, key)["cost"]
    cancel(firestore_client, key)
    asked = threading.Event()
    asked.set()  # as its cancel listener or a renewal would
    overrun = GenerationError(TIMEOUT, "too long")
    deadline = time.monotonic() + 0.5
    with Heartbeat(store, job, interval=100, hard_deadline=deadline, overrun=overrun, cancel=asked) as heartbeat:
        heartbeat.generated.set()
        assert heartbeat.lost.wait(10)
    assert heartbeat.ended == RunOutcome.FAILED
    ended = read(firestore_client, key)
    assert outcome(ended) == CANCELLED
    assert ended["progress"] == 1 and ended["cost"] == estimate > 1


def failing_storage(retried: threading.Event, max_seconds: float = 30):
    """A ResultStore whose Storage is down (a port nobody listens on: each request refused at once), retrying for
    `max_seconds` (by default far past what these tests wait); `retried` is set at its first retry."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from devtools import emulators as emu
    from listener.storage import ResultStore, RetryPolicy

    down = f"http://127.0.0.1:{emu.free_port()}"
    client = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": down})
    return ResultStore(
        client,
        "b",
        emulator_host=down,
        retry=RetryPolicy(attempts=100, max_seconds=max_seconds, initial_wait=0.1, max_wait=0.3, request_timeout=1),
        on_retry=lambda name, attempt, exc: retried.set(),
    )


def test_a_cancel_while_storage_fails_the_upload_stops_its_retries_and_ends_cancelled(firestore_client, events):
    """A Storage audit: a cancel that came while the upload retried a failing Storage was lost, the job failed
    `ConnectionError` once the retries ran out (a minute, by default). The cancel, heard by a lease renewal too
    (the renewal skipped it once the job was generated), stops the retries: `Cancelled`, in about a beat."""
    from listener.runner import JobRunner

    key = JobKey("u1", "images", "cancelled-unstored")
    queue_jobs(firestore_client, [key])
    store = WorkerJobs(firestore_client, worker_id="w")
    retried = threading.Event()
    runner = JobRunner(store, StubGenerator(), failing_storage(retried), renew_interval=0.2)
    # What pauses claims (listener/storage_outage.py): Storage was failing the upload cut short.
    runner.storage_outage = outage = StorageOutage(storage_never_answers, lambda: None)
    ended: list = []
    running = threading.Thread(target=lambda: ended.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    assert retried.wait(15)
    cancel(firestore_client, key)
    cancelled_at = time.monotonic()
    running.join(timeout=15)
    assert ended == ["failed"] and time.monotonic() - cancelled_at < 5  # its budget had 30 s left
    assert outage.ongoing
    outage.close()
    stopped = read(firestore_client, key)
    assert outcome(stopped) == CANCELLED
    assert stopped["progress"] == 1 and stopped["cost"] > 1  # stopped in its upload: its whole estimate
    [heard] = [e for e in events if e["event"] == "job_cancel_requested"]
    assert heard["heard"] == "lease renewal"


def storage_never_answers() -> None:
    raise ConnectionError("Storage is away")


@pytest.mark.parametrize("stop", ["cancel", "leave", "stop", "patience"])
def test_a_job_waiting_for_storage_after_another_jobs_failure_stops_when_it_must(
    firestore_client, events, monkeypatch, stop
):
    """A job generated beside one whose upload failure paused claims (its slot went to it as that generation
    ended) waits for Storage rather than fail too (`JobRunner._upload`), its lease kept. Its owner's cancel still
    ends it `Cancelled` within a beat; the worker leaving releases it at once, its probe closed first or not (a
    review: the stop's close woke it for one more try, which failed it `ConnectionError`); and it waits no longer
    than a generated job waits out a Firestore outage (FINISH_PATIENCE_SECONDS), then fails as the first did."""
    import listener.runner as runner_module
    from listener.runner import JobRunner

    monkeypatch.setattr(runner_module, "FINISH_PATIENCE_SECONDS", 8.0 if stop == "patience" else 600.0)
    key = JobKey("u1", "images", f"waits-for-storage-{stop}")
    queue_jobs(firestore_client, [key])
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=2)
    retried = threading.Event()
    runner = JobRunner(store, StubGenerator(), failing_storage(retried, max_seconds=0.5), renew_interval=0.2)
    runner.storage_outage = outage = StorageOutage(storage_never_answers, lambda: None)
    assert outage.begin(ConnectionError("another job's upload failed past its retries"))  # that job failed
    ended: list = []
    running = threading.Thread(target=lambda: ended.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    try:
        [waits] = wait_until(lambda: [e for e in events if e["event"] == "job_waits_for_storage"], timeout=15)
        assert waits["file_uid"] == key.file_uid
        lease = read(firestore_client, key)["lease_expires_at"]
        # Its lease (2 s) renewed past its end as it waits: the job is still this worker's, not another's to take.
        wait_until(lambda: read(firestore_client, key)["lease_expires_at"].timestamp() > lease.timestamp() + 3)
        assert read(firestore_client, key)["status"] == "processing" and not ended
        if stop == "cancel":
            cancel(firestore_client, key)
        elif stop == "stop":
            outage.close()
            runner.release_running()
        elif stop == "leave":
            runner.release_running()
        stopped_at = time.monotonic()
        running.join(timeout=15)
        assert time.monotonic() - stopped_at < (15 if stop == "patience" else 3)
    finally:
        outage.close()
    doc = read(firestore_client, key)
    if stop == "cancel":
        assert ended == ["failed"] and outcome(doc) == CANCELLED
    elif stop == "patience":
        assert ended == ["failed"] and (doc["status"], doc["error_type"]) == ("failed", "ConnectionError")
    else:
        assert ended == ["released"] and (doc["status"], doc["releases"]) == ("queued", 1)


def test_a_job_that_waited_for_storage_still_waits_out_firestore_for_its_completion(
    firestore_client, results, events, monkeypatch
):
    """A review: the wait for Storage used up the time a generated job's completion waits out Firestore (one
    patience from the generation's end), so a Firestore error on its completion right after found no time left for
    a second try: `job_not_recorded`, the job left to its lease and generated again. The completion gets its own."""
    from google.api_core import exceptions as api_exceptions

    import listener.runner as runner_module
    from listener import storage_outage
    from listener.runner import JobRunner
    from listener.storage import StorageUnavailable

    monkeypatch.setattr(runner_module, "FINISH_PATIENCE_SECONDS", 4.0)
    monkeypatch.setattr(storage_outage, "FIRST_PROBE_SECONDS", 0.05)
    monkeypatch.setattr(storage_outage, "LONGEST_PROBE_SECONDS", 0.1)

    class AwayOnce:
        """The emulator's Storage, but the first upload fails past its retries (an outage: a stand-in)."""

        failed = False

        def __getattr__(self, name):
            return getattr(results, name)

        def upload(self, *args, **kwargs):
            if not self.failed:
                self.failed = True
                raise StorageUnavailable("Storage away")
            return results.upload(*args, **kwargs)

    class SlowFailingCompletion(WorkerJobs):
        """Firestore: the completion's first try takes 2.5 s and fails 503 (the same outage's tail; a stand-in)."""

        tries = 0

        def complete(self, job, fields):
            self.tries += 1
            if self.tries == 1:
                time.sleep(2.5)  # the try's own time, which the patience must cover
                raise api_exceptions.ServiceUnavailable("503")
            return super().complete(job, fields)

    key = JobKey("u1", "images", "waited-then-completes")
    queue_jobs(firestore_client, [key])
    store = SlowFailingCompletion(firestore_client, worker_id="w", lease_seconds=2)
    answers = threading.Event()

    def probe() -> None:
        if not answers.is_set():
            raise ConnectionError("Storage is away")

    runner = JobRunner(store, StubGenerator(), AwayOnce(), renew_interval=0.2)
    runner.storage_outage = outage = StorageOutage(probe, lambda: None)
    assert outage.begin(ConnectionError("another job's upload failed past its retries"))
    ended: list = []
    running = threading.Thread(target=lambda: ended.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    try:
        wait_until(lambda: [e for e in events if e["event"] == "job_waits_for_storage"], timeout=15)
        lease = read(firestore_client, key)["lease_expires_at"]
        # Waited 2 s and more: with the 2.5 s try, past the generation's patience (4 s), within the completion's.
        wait_until(lambda: read(firestore_client, key)["lease_expires_at"].timestamp() > lease.timestamp() + 2)
        answers.set()
        running.join(timeout=30)
    finally:
        outage.close()
    assert ended == ["completed"] and store.tries == 2
    assert read(firestore_client, key)["status"] == "completed"


def test_a_worker_leaving_releases_a_generated_job_whose_upload_storage_keeps_failing(
    firestore_client, events, monkeypatch
):
    """A Storage audit: SIGTERM while a generated job's upload retried a hanging Storage; the worker's stop gave
    its delivery 30 s, the upload had a minute, and the worker exited with the job `processing` under its claim,
    unsaid: it waited out its lease, and its next claim counted a try the worker had lost (3 such stops failed
    it). A generated job delivers within LEAVING_DELIVERY_SECONDS of the leaving, or is released."""
    import listener.runner as runner_module
    from listener.runner import JobRunner

    monkeypatch.setattr(runner_module, "LEAVING_DELIVERY_SECONDS", 1.0)
    key = JobKey("u1", "images", "leaving-unstored")
    queue_jobs(firestore_client, [key])
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=300)
    retried = threading.Event()
    runner = JobRunner(store, StubGenerator(), failing_storage(retried))
    ended: list = []
    running = threading.Thread(target=lambda: ended.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    assert retried.wait(15)
    runner.release_running()
    left_at = time.monotonic()
    running.join(timeout=15)
    assert ended == ["released"] and time.monotonic() - left_at < 4  # its budget had 30 s left
    doc = read(firestore_client, key)
    assert (doc["status"], doc["releases"], doc["attempts"]) == ("queued", 1, 0)  # the try given back
    assert [e["event"] for e in events if e["event"] in ("job_released", "job_failed")] == ["job_released"]


@pytest.mark.parametrize("ended", ["cancelled", "given up"])
def test_a_job_a_takeover_ends_after_its_worker_died_mid_upload_leaves_no_objects(
    firestore_client, storage_client, results, bucket, events, ended
):
    """A review: a running job's owner cancelled it, its worker died mid-upload; the worker that took it over once
    its lease ran out failed it `Cancelled` (or gave it up, past MAX_ATTEMPTS), and the dead try's objects stayed
    in the bucket (README "Cancellation": anything already uploaded for it is deleted). Another job's stay."""
    from listener.settings import load_settings
    from listener.storage import claim_stamp
    from listener.worker import build_worker

    key, other = JobKey("u1", "images", "orphaned"), JobKey("u1", "images", "neighbour")
    queue_jobs(firestore_client, [key, other], num_images_per_prompt=2)
    dead = WorkerJobs(firestore_client, worker_id="dead", lease_seconds=1)
    job = dead.claim(key)
    png = (b"\x89PNG\r\n\x1a\n" + b"pixels" * 40, "png", "image/png")
    results.upload("u1", "orphaned", "text2image", [png, png], claim=claim_stamp(job.claimed_at))
    results.upload("u1", "neighbour", "text2image", [png])
    if ended == "cancelled":
        cancel(firestore_client, key)
    settings = load_settings(storage_bucket=bucket.name, max_attempts=1 if ended == "given up" else 3)
    taker = build_worker(settings, StubGenerator(), firestore_client, storage_client, worker_id="taker").store

    def taken_over() -> dict | None:  # refused while the dead worker's lease lasts
        assert taker.claim(key) is None
        return finished(firestore_client, key)

    doc = wait_until(taken_over, timeout=15)
    assert doc["error_type"] == ("Cancelled" if ended == "cancelled" else "Exception")
    wait_until(lambda: objects(bucket) == ["generating/u1/image/neighbour.png"], timeout=15)
    removed = wait_until(lambda: [e for e in events if e["event"] == "job_results_removed"])  # said once done
    assert [(e["file_uid"], e["objects"]) for e in removed] == [("orphaned", 2)]


@pytest.mark.parametrize("by", ["the doc's flag", "the callable"])
def test_a_cancelled_queued_job_an_earlier_try_ran_leaves_no_objects(firestore_client, results, bucket, by):
    """Queued again after a try whose worker died mid-upload (taken over, then released), the job is cancelled:
    the cancel thread's write (`drop`), or `cancelGeneration` (the web app's Cancel; a review: it left them),
    removes what the dead try had uploaded, as a takeover's claim does."""
    from listener.runner import JobRunner

    key = JobKey("u1", "images", f"ran-then-queued-{by.split()[-1]}")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2, attempts=1, releases=1)
    png = (b"\x89PNG\r\n\x1a\n" + b"pixels" * 40, "png", "image/png")
    results.upload("u1", key.file_uid, "text2image", [png, png])
    if by == "the callable":
        data = {"fileUid": key.file_uid, "mediaType": "images"}
        assert owner_calls.cancel(firestore_client, uid="u1", data=data, bucket=lambda: bucket)["status"] == "cancelled"
    else:
        cancel(firestore_client, key)
        store = WorkerJobs(firestore_client, worker_id="w")
        store.on_ended_after_run = JobRunner(store, StubGenerator(), results).remove_left_behind
        assert store.drop(key)
    assert outcome(read(firestore_client, key)) == CANCELLED
    wait_until(lambda: objects(bucket) == [], timeout=15)


def test_cancels_of_queued_jobs_never_hold_up_the_workers_claims(sched_worker, firestore_client):
    """Audit: 2,426 queued jobs cancelled at once were failed one by one by the loop that claims, so no job of
    anyone started for 11 minutes. Here one cancel's write is held (a slow Firestore) while another user's job
    comes: it is claimed and runs meanwhile."""
    generator = StubGenerator()
    worker = sched_worker("w", generator, sweep=30)
    dropping, held = threading.Event(), threading.Event()
    drop = worker._drop

    def slow_drop(key):
        dropping.set()
        held.wait(30)
        drop(key)

    worker._drop = slow_drop
    cancelled, runs = JobKey("userA", "images", "cancelled"), JobKey("userB", "images", "runs")
    queue_jobs(firestore_client, [cancelled], cancel_requested=True)
    assert dropping.wait(15)
    queue_jobs(firestore_client, [runs])
    try:
        assert wait_until(lambda: finished(firestore_client, runs), timeout=20)["status"] == "completed"
    finally:
        held.set()
    assert outcome(wait_until(lambda: finished(firestore_client, cancelled))) == CANCELLED
    assert generator.calls == ["runs"]


def test_a_cancel_of_a_finished_job_changes_nothing(sched_worker, firestore_client):
    sched_worker("w")
    key = JobKey("u1", "images", "done")
    queue_jobs(firestore_client, [key])
    done = wait_until(lambda: finished(firestore_client, key))
    with pytest.raises(dispatch.CallError) as refused:
        owner_calls.cancel(firestore_client, uid="u1", data={"fileUid": "done", "mediaType": "images"})
    assert (refused.value.code, refused.value.message) == (
        "failed-precondition",
        "Generation already completed: nothing to cancel",
    )
    cancel(firestore_client, key)  # through the Admin SDK (the rules refuse it for a client: test_rules.py)
    # Nothing happens to a finished job, nothing to wait for: a job cancelled after it, which the worker ends, says
    # it has heard what came before (the test review: a fixed wait).
    marker = JobKey("u1", "images", "cancelled-after")
    queue_jobs(firestore_client, [marker], cancel_requested=True)
    assert outcome(wait_until(lambda: finished(firestore_client, marker))) == CANCELLED
    assert {k: v for k, v in read(firestore_client, key).items() if k != "cancel_requested"} == done


# ---------------------------------------------------------------------------------------------- the callable
def test_the_callable_cancels_queued_and_running_jobs(sched_worker, firestore_client):
    generator = StubGenerator(threading.Event())
    sched_worker("w", generator)
    running, waiting = JobKey("u1", "videos", "run"), JobKey("u1", "images", "wait")
    queue_jobs(firestore_client, [running], numFrames=16)
    assert generator.started.wait(15)
    queue_jobs(firestore_client, [waiting])

    reply = owner_calls.cancel(firestore_client, uid="u1", data={"fileUid": "wait", "mediaType": "images"})
    assert reply == {
        "success": True,
        "fileUid": "wait",
        "mediaType": "images",
        "status": "cancelled",
        "message": "Generation cancelled",
    }
    assert outcome(read(firestore_client, waiting)) == CANCELLED  # at once, by the callable itself
    again = owner_calls.cancel(firestore_client, uid="u1", data={"fileUid": "wait", "mediaType": "images"})
    assert again["status"] == "cancelled"  # a retried call is harmless

    reply = owner_calls.cancel(firestore_client, uid="u1", data={"fileUid": "run", "mediaType": "videos"})
    assert (reply["status"], reply["message"]) == (
        "cancelling",
        "Cancelling: the worker stops the generation at its next step",
    )
    assert outcome(wait_until(lambda: finished(firestore_client, running), timeout=5)) == CANCELLED
    assert generator.calls == ["run"]


def test_the_callable_refuses_other_users_and_bad_input(firestore_client):
    key = JobKey("owner", "images", "mine")
    queue_jobs(firestore_client, [key])

    def invalid(data, message: str, uid: str = "owner") -> tuple:
        return (uid, data, "invalid-argument", message)

    # Worded as generateWithRunPod's refusals are (before: "mediaType must be one of ..." without the contract's
    # prefix, a call's data that is no object without it, a missing fileUid as "must be a string").
    cases = [
        (None, {"fileUid": "mine", "mediaType": "images"}, "unauthenticated", "Sign in to cancel a generation"),
        ("thief", {"fileUid": "mine", "mediaType": "images"}, "not-found", "No such generation"),  # the caller's path
        (
            "thief",
            {"fileUid": "mine", "mediaType": "images", "userId": "owner"},
            "permission-denied",
            "userId must be the signed-in user's uid",
        ),
        invalid({"fileUid": "mine", "mediaType": "gifs"}, "Validation failed: mediaType must be one of images, videos"),
        invalid({"fileUid": "mine"}, "mediaType is required"),
        invalid({"mediaType": "images"}, "fileUid is required"),
        invalid({"fileUid": 7, "mediaType": "images"}, "Validation failed: fileUid must be a string"),
        invalid({"fileUid": "../x", "mediaType": "images"}, "Validation failed: fileUid may"),
        invalid(["mine"], "Validation failed: the call's data must be a JSON object"),
        invalid(None, "Validation failed: the call's data must be a JSON object"),
        # Strict as generateWithRunPod: a misspelt name was taken for no field (the call cancelled by the other).
        invalid(
            {"fileID": "other", "file_uid": "mine", "mediaType": "images"}, "Validation failed: unknown field 'fileID'"
        ),
        invalid({"fileUid": "mine", "mediaType": "images", "force": True}, "Validation failed: unknown field 'force'"),
        invalid(
            {"fileUid": "other", "file_uid": "mine", "mediaType": "images"},
            "Validation failed: fileUid is given twice with different values",  # its words, as "fileUid is required"
        ),
        # Two spellings a field, as the rules and the web app know them: any other is refused, never read (audit:
        # `fileUID` cancelled the job it named, and a review: a `UserId` the user check missed was let through).
        invalid(
            {"fileUid": "mine", "mediaType": "images", "UserId": "owner"},
            "Validation failed: unknown field 'UserId' (did you mean 'user_id'?)",
            uid="thief",
        ),
        invalid({"fileUID": "mine", "mediaType": "images"}, "Validation failed: unknown field 'fileUID' (did you mean"),
        invalid({"File_Uid": "mine", "Media_Type": "images"}, "Validation failed: unknown field 'File_Uid' (did you"),
    ]
    for uid, data, code, message in cases:
        with pytest.raises(dispatch.CallError) as refused:
            owner_calls.cancel(firestore_client, uid=uid, data=data)
        assert refused.value.code == code and refused.value.message.startswith(message), (uid, data, refused.value)
    assert read(firestore_client, key)["status"] == "queued" and "cancel_requested" not in read(firestore_client, key)


def test_the_callable_takes_snake_case_names_and_a_name_given_in_both_spellings_alike(firestore_client):
    """A null or empty spelling beside one that says something is no second value (a review: it was refused)."""
    keys = [JobKey("owner", "images", "snake"), JobKey("owner", "videos", "both"), JobKey("owner", "images", "nulled")]
    queue_jobs(firestore_client, keys)
    for data in (
        {"file_uid": "snake", "media_type": "images", "user_id": "owner"},
        {"fileUid": "both", "file_uid": "both", "mediaType": "videos", "media_type": "videos"},
        {"fileUid": "nulled", "file_uid": None, "media_type": "", "mediaType": "images", "user_id": None},
    ):
        assert owner_calls.cancel(firestore_client, uid="owner", data=data)["status"] == "cancelled", data
    assert [outcome(read(firestore_client, key)) for key in keys] == [CANCELLED] * 3


def test_the_callable_refuses_a_snake_case_user_id_naming_another_user(firestore_client):
    """The callable takes `user_id` as well as `userId`: one naming another user is refused too, and the call
    does not go on to cancel the caller's own job of that fileUid (the path is built from the auth uid)."""
    own = JobKey("thief", "images", "mine")
    queue_jobs(firestore_client, [JobKey("owner", "images", "mine"), own])
    with pytest.raises(dispatch.CallError) as refused:
        owner_calls.cancel(
            firestore_client, uid="thief", data={"fileUid": "mine", "mediaType": "images", "user_id": "owner"}
        )
    assert (refused.value.code, refused.value.message) == (
        "permission-denied",
        "user_id must be the signed-in user's uid",
    )
    assert read(firestore_client, own)["status"] == "queued" and "cancel_requested" not in read(firestore_client, own)


# ---------------------------------------------------------------------------------------------- bounded work
def test_a_job_past_its_deadline_is_stopped_as_timeout(sched_worker, firestore_client, events):
    generator = StubGenerator(threading.Event())  # never finishes on its own
    sched_worker("w", generator, deadline=Deadline(floor_seconds=0.5, multiple=0.1))  # the floor decides
    key, after = JobKey("u1", "images", "slow"), JobKey("u1", "images", "after")
    queue_jobs(firestore_client, [key])
    queue_jobs(firestore_client, [after])
    doc = wait_until(lambda: finished(firestore_client, key), timeout=10)
    assert (doc["status"], doc["error_type"], doc["error_message"]) == (
        "failed",
        "Timeout",
        "Generation stopped: it ran past its time limit of 0.5 s",
    )
    wait_until(lambda: "after" in generator.calls)  # the slot went on to the next job
    [failed] = [e for e in events if e["event"] == "job_failed" and e["file_uid"] == "slow"]
    assert (failed["error_type"], failed["log_level"], failed["task_type"]) == ("Timeout", "warning", "text2image")
    assert failed["seconds"] >= 0.5  # its time limit (an audit: a run's failure without its time and task type)


class Stuck:
    """A generation stuck inside one step: it never comes back to its progress callback."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, request, progress=None):
        self.started.set()
        self.release.wait(30)
        raise RuntimeError("unstuck")


@contextmanager
def running_stuck(store, runner, generator: Stuck, key: JobKey):
    """(the thread running the claimed job, its outcome once it ends); the step comes back on leaving."""
    outcome: list = []
    running = threading.Thread(target=lambda: outcome.append(runner.run(store.claim(key))), daemon=True)
    running.start()
    try:
        yield running, outcome
    finally:
        generator.release.set()
        running.join(30)


def test_a_generation_stuck_in_a_step_is_failed_by_the_heartbeat(sched_worker, firestore_client):
    generator = Stuck()
    worker = sched_worker("w", generator, deadline=Deadline(floor_seconds=0.5, multiple=1), renew=0.2)
    key = JobKey("u1", "images", "stuck")
    queue_jobs(firestore_client, [key])
    try:
        doc = wait_until(lambda: finished(firestore_client, key), timeout=10)
        assert (doc["status"], doc["error_type"]) == ("failed", "Timeout")
    finally:
        generator.release.set()
    # When the step finally returns, the worker finds the job is no longer its own and writes nothing.
    assert worker.wait_idle(10)
    assert read(firestore_client, key)["error_type"] == "Timeout"


def test_a_stuck_job_its_owner_cancelled_ends_cancelled_past_its_deadline(firestore_client, results):
    """A review: a job its owner cancelled, stuck in a step past its deadline, was failed `Timeout` by its heartbeat
    (the page said Failed, not Cancelled), where the runner, had the step come back, wrote `Cancelled`."""
    from listener.lease import RunOutcome
    from listener.runner import JobRunner

    generator = Stuck()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=30)
    deadline = Deadline(floor_seconds=0.5, multiple=1)
    runner = JobRunner(store, generator, results, renew_interval=0.2, deadline=deadline)
    key = JobKey("u1", "images", "stuck-cancelled")
    queue_jobs(firestore_client, [key])
    stop, ended = threading.Event(), []
    running = threading.Thread(target=lambda: ended.append(runner.run(store.claim(key), stop)), daemon=True)
    running.start()
    try:
        assert generator.started.wait(10)
        stop.set()  # the owner's cancel, heard; the step never comes back to stop at
        assert outcome(wait_until(lambda: finished(firestore_client, key), timeout=10)) == CANCELLED
    finally:
        generator.release.set()
        running.join(30)
    assert ended == [RunOutcome.FAILED]  # its end, as its doc says: not lost


def test_a_stuck_generation_failed_by_the_heartbeat_ends_failed_not_lost(firestore_client, results):
    """Audit: the worker that failed its own stuck job `Timeout` then logged `job_lost` ("lease taken over;
    nothing written") when the step came back: its run ends failed, as its doc says."""
    from listener.lease import RunOutcome
    from listener.runner import JobRunner

    generator = Stuck()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=30)
    runner = JobRunner(store, generator, results, deadline=Deadline(floor_seconds=0.5, multiple=1), renew_interval=0.2)
    key = JobKey("u1", "images", "stuck-alone")
    queue_jobs(firestore_client, [key])
    with running_stuck(store, runner, generator, key) as (_, outcome):
        doc = wait_until(lambda: finished(firestore_client, key), timeout=10)
        assert (doc["status"], doc["error_type"]) == ("failed", "Timeout")
    assert outcome == [RunOutcome.FAILED]


def test_a_worker_that_stalled_past_its_deadline_while_another_took_over_ends_lost(firestore_client, events):
    """The re-check of the chaos audit: a worker stopped (SIGSTOP) past its job's deadline, while another took the
    job over and completed it, woke up to its heartbeat's `Timeout`, which the fence turned away, and logged
    `job_timeout_forced`: its run ends lost (`job_lost`), as it is, and the new owner's doc stands."""
    from firegen_core.errors import TIMEOUT, GenerationError
    from listener.lease import Heartbeat, RunOutcome

    key = JobKey("u1", "images", "stalled")
    queue_jobs(firestore_client, [key])
    store = WorkerJobs(firestore_client, worker_id="stalled", lease_seconds=300)
    job = store.claim(key)
    firestore_client.document(key.path).update({"worker_id": "new-owner", "attempts": 2})  # the takeover
    overrun = GenerationError(TIMEOUT, "too long")
    with Heartbeat(store, job, interval=100, hard_deadline=time.monotonic() + 0.2, overrun=overrun) as heartbeat:
        assert heartbeat.lost.wait(10)
    assert heartbeat.ended == RunOutcome.LOST
    doc = read(firestore_client, key)
    assert (doc["status"], doc["worker_id"]) == ("processing", "new-owner")
    [lost] = [e for e in events if e["event"] == "job_lost"]
    assert (lost["log_level"], lost["reason"], lost["when"]) == (
        "warning",
        "taken over by another worker",
        "at its deadline",
    )


@pytest.mark.parametrize("left", ["while it runs", "before it began"])
def test_a_worker_leaving_releases_a_job_stuck_in_a_step_at_once(firestore_client, results, left):
    """A video audit: past the shutdown grace, a job in its decode and encode (no step to stop at) was released
    only once they came back, 10-15 s later, when RunPod may have killed the worker already. Its heartbeat
    releases it now; the generation coming back later writes nothing more. So too a job whose claim landed after
    the worker began to leave (a review: its heartbeat waited its first beat, the worker exited meanwhile)."""
    from listener.lease import RunOutcome
    from listener.runner import JobRunner

    generator = Stuck()
    store = WorkerJobs(firestore_client, worker_id="w", lease_seconds=300)
    # Beats 100 s apart: the release must not wait for the next one.
    runner = JobRunner(store, generator, results, renew_interval=100)
    key = JobKey("u1", "images", f"stuck-leaving-{left.split()[0]}")
    queue_jobs(firestore_client, [key])
    if left == "before it began":
        runner.release_running()
    with running_stuck(store, runner, generator, key) as (running, outcome):
        assert generator.started.wait(10)
        if left == "while it runs":
            runner.release_running()
        doc = wait_until(lambda: (d := read(firestore_client, key))["status"] == "queued" and d, timeout=5)
        assert doc["releases"] == 1 and "worker_id" not in doc
        assert running.is_alive()  # released while the generation is still out
    assert outcome == [RunOutcome.RELEASED]
    doc = read(firestore_client, key)
    assert (doc["status"], doc["releases"]) == ("queued", 1)


def test_a_job_released_too_many_times_fails_with_a_clear_message(firestore_client):
    key = JobKey("u1", "videos", "bouncing")
    queue_jobs(firestore_client, [key], numFrames=16)
    for i in range(3):
        store = WorkerJobs(firestore_client, worker_id=f"leaving-{i}", max_releases=2)
        job = store.claim(key)
        assert job is not None and store.release(job)
    doc = read(firestore_client, key)
    assert (doc["status"], doc["error_type"], doc["error_message"], doc["releases"]) == (
        "failed",
        "Exception",
        "Generation stopped: its workers shut down before it ended 3 times; please try again",
        3,  # as its message says
    )


ENDINGS_SCRIPT = """
import sys
from google.cloud import firestore
from google.cloud.firestore import SERVER_TIMESTAMP
from firegen_core.claims import WorkerJobs
from firegen_core.jobs import JobKey
from listener.logs import configure
from listener.runner import JobRunner

class Leaving:  # the worker is leaving while the job runs (SIGTERM past the grace): its job is released
    def generate(self, request, progress=None):
        progress(0.5)

configure("w-log")
client = firestore.Client()
for name in ("bounced", "abandoned"):
    client.document(f"generations/u1/images/{name}").set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "p"})
bounced, abandoned = JobKey("u1", "images", "bounced"), JobKey("u1", "images", "abandoned")
store = WorkerJobs(client, worker_id="w-log", lease_seconds=0.2, max_releases=0, max_attempts=1)
runner = JobRunner(store, Leaving(), results=None)
runner.abort.set()
print("outcome", runner.run(store.claim(bounced)), flush=True)
store.claim(abandoned)  # then the worker dies: its lease runs out, and attempts are used up
import time; time.sleep(0.5)
print("claimed", store.claim(abandoned), flush=True)

# A client's doc that breaks the contract, refused on sight by the claim; a step that never comes back in time,
# failed `Timeout` by the heartbeat.
from firegen_core.deadline import Deadline
client.document("generations/u1/images/broken").set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "p", "width": 2048})
print("refused", store.claim(JobKey("u1", "images", "broken")), flush=True)

class Stuck:
    def generate(self, request, progress=None):
        time.sleep(3)

client.document("generations/u1/images/stuck").set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "p"})
timed = WorkerJobs(client, worker_id="w-log", lease_seconds=30)
runner = JobRunner(timed, Stuck(), results=None, renew_interval=0.2, deadline=Deadline(1.0, 0.001))
print("stuck", runner.run(timed.claim(JobKey("u1", "images", "stuck"))), flush=True)

# Storage down: the upload's retries name the job.
from types import SimpleNamespace
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from listener.storage import ResultStore, RetryPolicy

class TwoImages:  # uploaded at once, each on a thread of its own
    def generate(self, request, progress=None):
        import logging
        logging.getLogger("diffusers.pipelines").warning("a library's warning, during the job")
        return SimpleNamespace(seed=1, files=[(b"png", "png", "image/png")] * 2, video_info=None)

down = f"http://127.0.0.1:{sys.argv[1]}"
results = ResultStore(
    storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": down}),
    "b",
    emulator_host=down,
    retry=RetryPolicy(attempts=2, max_seconds=3, initial_wait=0.01, max_wait=0.01, request_timeout=1),
)
client.document("generations/u1/images/unstored").set({"status": "queued", "created_at": SERVER_TIMESTAMP, "prompt": "p"})
store = WorkerJobs(client, worker_id="w-log")
print("stored", JobRunner(store, TwoImages(), results).run(store.claim(JobKey("u1", "images", "unstored"))), flush=True)
"""


def test_endings_a_transition_writes_and_upload_retries_are_logged_with_the_job(emulator_env):
    """Two endings are written by a transition (a release past MAX_RELEASES, a claim past MAX_ATTEMPTS), not by
    a run that fails: the worker that wrote one says so (before: a `job_released` line, and nothing at all). An
    upload's retries are events named like the others, with the job's ids (before: a sentence naming the object)."""
    import json
    import os
    import subprocess

    from devtools import emulators as emu

    done = subprocess.run(
        [sys.executable, "-c", ENDINGS_SCRIPT, str(emu.free_port())],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **emulator_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outcome failed" in done.stdout and "claimed None" in done.stdout and "stored failed" in done.stdout
    assert "refused None" in done.stdout and "stuck failed" in done.stdout
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # A library's line in the job's thread names the job (audit: CLIP's truncation warning named nothing).
    [library] = [e for e in events if e["event"] == "a library's warning, during the job"]
    assert (library["logger"], library["user_id"], library["file_uid"]) == ("diffusers.pipelines", "u1", "unstored")
    # Each of a job's files, uploaded on threads of their own (a Storage audit: those lines named no job).
    retries = sorted((e for e in events if e["event"] == "upload_retry"), key=lambda e: e["object"])
    assert [(e["message"], e["file_uid"], e["user_id"], e["retry"], e["severity"]) for e in retries] == [
        ("upload_retry", "unstored", "u1", 1, "WARNING")
    ] * 2
    assert [e["object"] for e in retries] == ["generating/u1/image/unstored.png", "generating/u1/image/unstored_1.png"]
    failed = {e["file_uid"]: e for e in events if e["event"] == "job_failed"}
    # Severity by who must act (audit: a job lost to Storage being down was a WARNING, like a user's bad width):
    # infrastructure and bugs are errors, a job past its time limit a warning, a client's doing news.
    assert {name: event["severity"] for name, event in failed.items()} == {
        "unstored": "ERROR",
        "bounced": "ERROR",
        "abandoned": "ERROR",
        "stuck": "WARNING",
    }
    assert failed.pop("unstored")["error_type"] == "ConnectionError"
    # The heartbeat's forced Timeout is a `job_failed` like the others (audit: only `job_timeout_forced`, which a
    # count of failures missed).
    assert [e["file_uid"] for e in events if e["event"] == "job_failed"].count("stuck") == 1  # once, by either
    stuck = failed.pop("stuck")
    assert (stuck["error_type"], stuck["by"], stuck["task_type"]) == ("Timeout", "heartbeat", "text2image")
    assert stuck["seconds"] > 0
    # A doc refused on sight by a claim is `job_refused`, as by a listener (audit: `job_failed` on one worker,
    # `job_refused` on another, for the same doc).
    [refused] = [e for e in events if e.get("file_uid") == "broken" and e["event"] in ("job_failed", "job_refused")]
    assert (refused["event"], refused["error_type"], refused["severity"]) == ("job_refused", "ValidationError", "INFO")
    assert failed.keys() == {"bounced", "abandoned"} and not [e for e in events if e["event"] == "job_released"]
    assert failed["bounced"]["error_message"].startswith("Generation stopped: its workers shut down before it ended")
    assert failed["abandoned"]["error_message"] == "Generation failed after 1 attempt: its worker stopped responding"
    for event in failed.values():
        assert (event["severity"], event["user_id"], event["worker_id"], event["error_type"]) == (
            "ERROR",
            "u1",
            "w-log",
            "Exception",
        )


def test_shutdown_releases_are_counted_on_the_doc(sched_worker, firestore_client):
    generator = StubGenerator(threading.Event())
    worker = sched_worker("leaving", generator)
    key = JobKey("u1", "images", "long")
    queue_jobs(firestore_client, [key])
    assert generator.started.wait(15)
    worker.stop(grace=0.2)
    doc = read(firestore_client, key)
    assert (doc["status"], doc["releases"], doc["attempts"]) == ("queued", 1, 0)


# ---------------------------------------------------------------------------------------------- restated
def test_a_run_restated_on_another_worker_stops_at_once_and_runs_again_with_the_new_parameters(
    sched_worker, firestore_client, events
):
    """The contract's function flow when this worker's listener took the placeholder doc and the request reached
    another worker: that worker's restate queues the job again; this worker hears it queued with its own claim's
    attempt and stops the stale run at its next step (before, only at its next lease renewal: a third of the
    lease, 10 s here, 40 s by default), then claims it again."""
    generator = StepGenerator(threading.Event())  # holds each job, reporting progress at every "step"
    worker = sched_worker("w", generator)
    key = JobKey("u1", "images", "restated")
    queue_jobs(firestore_client, [key])
    assert generator.started.wait(15)
    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore

    request = {"prompt": "A red sports car", "user_id": "u1", "file_uid": "restated", "use_cloud_storage": True}
    outcome = JobStore(firestore_client).ensure_queued(parse_runsync_input({**request, "width": 256}))
    assert outcome.displaced is not None and outcome.displaced.worker_id == "w"
    asked = time.monotonic()
    again = wait_until(lambda: read(firestore_client, key).get("attempts") == 2 or None, timeout=5)
    assert again and time.monotonic() - asked < 5.0  # not the next renewal's 10 s
    generator.gate.set()
    doc = wait_until(lambda: finished(firestore_client, key))
    assert (doc["status"], doc["attempts"], doc["width"]) == ("completed", 2, 256)
    assert generator.calls == ["restated", "restated"]
    assert worker.wait_idle(5)
    # Its owner's doing, no worker's trouble: said at INFO (an alert on WARNINGs fired at each restatement).
    lost = [(e["event"], e["log_level"], e["reason"]) for e in events if e["event"] in ("job_lost", "lease_lost")]
    assert lost and set(lost) <= {(event, "info", "restated by its request") for event in ("job_lost", "lease_lost")}


def test_a_run_restated_in_a_backlogs_middle_stops_when_the_sweep_finds_it(sched_worker, firestore_client, monkeypatch):
    """An audit: a restated job whose old `created_at` puts it in the middle of a backlog, in neither listener's
    window, was found queued by the sweep alone, which offered it without stopping the stale run: that went on to
    its next lease renewal (40 s by default), its user's running count already given back."""
    from google.cloud.firestore import Query

    from firegen_core.contract import parse_runsync_input
    from firegen_core.jobs import JobStore
    from listener import listeners

    monkeypatch.setitem(listeners.WINDOWS, "oldest", (Query.ASCENDING, 2))
    monkeypatch.setitem(listeners.WINDOWS, "newest", (Query.DESCENDING, 1))
    held, running = threading.Event(), threading.Event()

    class HoldsOne(StubGenerator):
        """Holds the restated job, at 0% (no progress write, whose fence would find the run stale after 5 s); the
        backlog's jobs are quick."""

        def generate(self, request, progress=None):
            if request.file_uid == "restated":
                running.set()
            while request.file_uid == "restated" and not held.is_set():
                progress(0.0)  # a step: where a stop is heard
                held.wait(0.02)
            return super().generate(request, progress)

    generator = HoldsOne()
    sched_worker("w", generator, lease=120.0)
    key = JobKey("u1", "images", "restated")
    queue_jobs(firestore_client, [key])
    assert running.wait(15)
    before = [JobKey("u2", "images", f"older-{i}") for i in range(3)]
    # Written before it by the clock its restatement keeps (`created_at`), after it by the queue's: the worker,
    # busy, leaves them queued, filling the oldest window; newer ones fill the newest.
    queue_jobs(firestore_client, before, created_at=datetime(2020, 1, 1, tzinfo=UTC))
    queue_jobs(firestore_client, [JobKey("u3", "images", f"newer-{i}") for i in range(2)])
    request = {"prompt": "A red sports car", "user_id": "u1", "file_uid": "restated", "use_cloud_storage": True}
    outcome = JobStore(firestore_client).ensure_queued(parse_runsync_input({**request, "width": 256}))
    assert outcome.displaced is not None and outcome.displaced.worker_id == "w"
    assert wait_until(lambda: read(firestore_client, key).get("attempts") == 2 or None, timeout=15)
    held.set()
    doc = wait_until(lambda: finished(firestore_client, key), timeout=30)
    assert (doc["status"], doc["width"]) == ("completed", 256)


# ---------------------------------------------------------------------------------------------- mutation audit
def test_a_retried_cancel_of_a_running_job_answers_cancelling_again(firestore_client):
    """A second press of Cancel while the worker has not yet stopped (the doc is still processing, its
    cancel_requested already set) is no error: it answers "cancelling" as the first did, not "Generation already
    processing: nothing to cancel" (failed-precondition)."""
    key = JobKey("owner", "videos", "running-twice")
    queue_jobs(firestore_client, [key], numFrames=16)
    firestore_client.document(key.path).update({"status": "processing"})  # a worker took it (no worker here)
    data = {"fileUid": "running-twice", "mediaType": "videos"}
    first = owner_calls.cancel(firestore_client, uid="owner", data=data)
    again = owner_calls.cancel(firestore_client, uid="owner", data=data)
    assert (first["status"], again["status"]) == ("cancelling", "cancelling"), (first, again)
    assert again["message"] == "Cancelling: the worker stops the generation at its next step"
    doc = read(firestore_client, key)
    assert (doc["status"], doc["cancel_requested"]) == ("processing", True)


def test_an_empty_file_uid_or_media_type_is_required_as_a_missing_one(firestore_client):
    """The contract reads "" as left out: an empty fileUid or mediaType is "X is required", as a missing one is
    (not the id check's or the media type's "Validation failed: ..." message)."""
    queue_jobs(firestore_client, [JobKey("owner", "images", "e")])
    for data, message in [
        ({"fileUid": "", "mediaType": "images"}, "fileUid is required"),
        ({"fileUid": "e", "mediaType": ""}, "mediaType is required"),
    ]:
        with pytest.raises(dispatch.CallError) as refused:
            owner_calls.cancel(firestore_client, uid="owner", data=data)
        assert (refused.value.code, refused.value.message) == ("invalid-argument", message), data
    assert read(firestore_client, JobKey("owner", "images", "e"))["status"] == "queued"


def test_a_refused_call_that_fails_a_queued_job_an_earlier_try_ran_leaves_no_objects(firestore_client, results, bucket):
    """Queued again after a try whose worker died mid-upload (released), the client's own doc is failed by a
    generateWithRunPod call naming its file_uid with a parameter the contract refuses (`_record_refusal`): what
    the gone try uploaded goes, as a cancel, the sweep or a worker's drop ending such a job removes it."""
    from runpod_client import RunPodClient

    key = JobKey("u1", "images", "ran-then-refused")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2, attempts=1, releases=1)
    png = (b"\x89PNG\r\n\x1a\n" + b"pixels" * 40, "png", "image/png")
    results.upload("u1", key.file_uid, "text2image", [png, png])
    assert len(objects(bucket)) == 2
    nobody = RunPodClient("http://127.0.0.1:9/runsync", "k" * 16, attempts=1, timeout=1.0, deadline=1.0)
    data = {"file_uid": key.file_uid, "prompt": "A red sports car", "width": 2000}
    with pytest.raises(dispatch.CallError) as refused:
        dispatch.generate(firestore_client, nobody, uid="u1", data=data, bucket=lambda: bucket)
    assert refused.value.code == "invalid-argument"
    assert read(firestore_client, key)["error_type"] == "ValidationError"
    wait_until(lambda: objects(bucket) == [], timeout=15)


def test_a_workers_refusal_that_fails_a_queued_job_an_earlier_try_ran_leaves_no_objects(
    firestore_client, results, bucket
):
    """The same, where the call was valid here and the worker RunPod woke refused it (a worker of another contract
    version: `deliver`'s REJECTED): the queued job is failed there, and the gone try's uploads go too (a review:
    they stayed, no doc's). RunPod's hosted runsync cannot run here: a stand-in answers the worker's refusal."""
    from fixtures_http import LocalServer, QuietHandler
    from runpod_client import RunPodClient

    class Refusing(QuietHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply(200, {"id": "j", "status": "FAILED", "error": "width must be a multiple of 64"})

    key = JobKey("u1", "images", "ran-then-rejected")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2, attempts=1, releases=1)
    png = (b"\x89PNG\r\n\x1a\n" + b"pixels" * 40, "png", "image/png")
    results.upload("u1", key.file_uid, "text2image", [png, png])
    assert len(objects(bucket)) == 2
    server = LocalServer(Refusing)
    try:
        runpod = RunPodClient(f"{server.origin}/runsync", "k" * 16, attempts=1, timeout=5.0, deadline=5.0)
        data = {"file_uid": key.file_uid, "prompt": "A red sports car", "num_images_per_prompt": 2}
        with pytest.raises(dispatch.CallError) as refused:
            dispatch.generate(firestore_client, runpod, uid="u1", data=data, bucket=lambda: bucket)
    finally:
        server.close()
    assert (refused.value.code, refused.value.message) == (
        "failed-precondition",
        "width must be a multiple of 64; a worker ran it before its request was refused, so send it as a new job "
        "(a new file_uid)",
    )
    assert read(firestore_client, key)["error_type"] == "ValidationError"
    wait_until(lambda: objects(bucket) == [], timeout=15)


@pytest.mark.parametrize("door", ["runsync", "the callable"])
def test_a_request_that_ends_a_cancelled_job_an_earlier_try_ran_leaves_no_objects(
    firestore_client, results, bucket, door
):
    """Queued again after a try whose worker died mid-upload, its owner's cancel asked, the job is stated again by a
    request before any worker's listener failed it: the request ends it cancelled (`lifecycle.restate`), and what
    the gone try uploaded goes, as where the cancel thread's drop ends it (a review: it stayed, no doc's)."""
    from runpod_client import RunPodClient

    from listener.handler import RunsyncHandler
    from listener.runner import JobRunner

    key = JobKey("u1", "images", f"ran-cancelled-restated-{door.split()[-1]}")
    queue_jobs(firestore_client, [key], num_images_per_prompt=2, attempts=1, releases=1, cancel_requested=True)
    png = (b"\x89PNG\r\n\x1a\n" + b"pixels" * 40, "png", "image/png")
    results.upload("u1", key.file_uid, "text2image", [png, png])
    assert len(objects(bucket)) == 2
    data = {"file_uid": key.file_uid, "prompt": "A red sports car", "num_images_per_prompt": 2}
    if door == "runsync":
        store = WorkerJobs(firestore_client, worker_id="w")
        store.on_ended_after_run = JobRunner(store, StubGenerator(), results).remove_left_behind
        answer = RunsyncHandler(store, lambda *args: None).handle({**data, "user_id": "u1", "use_cloud_storage": True})
        assert answer == {"error": "Cancelled by the user", "status": "failed"}
    else:
        nobody = RunPodClient("http://127.0.0.1:9/runsync", "k" * 16, attempts=1, timeout=1.0, deadline=1.0)
        with pytest.raises(dispatch.CallError) as refused:
            dispatch.generate(firestore_client, nobody, uid="u1", data=data, bucket=lambda: bucket)
        assert (refused.value.code, refused.value.message) == ("failed-precondition", "Cancelled by the user")
    assert outcome(read(firestore_client, key)) == CANCELLED
    wait_until(lambda: objects(bucket) == [], timeout=15)
